// RUN: qcc-opt %s -p 'cpu-vectorize-contractions{lanes=8}' | filecheck %s

// Attention's q @ k^T: the transpose feeding B (through a collapse) is folded
// into a dot-product kernel that reads the keys in their own layout; p @ v
// becomes a row-accumulating (axpy) kernel.  Both run over rows in parallel.

// CHECK-LABEL: func.func @attention
// CHECK-NOT: linalg.batch_matmul
// CHECK: %[[KC:.*]] = tensor.collapse_shape %arg1 {{\[\[}}0, 1], [2], [3]] : tensor<1x4x9x16xf32> into tensor<4x9x16xf32>
// CHECK: call @qcc_cpu_bmm_dot_4x1x9x16(%arg0, %[[KC]]) : (tensor<4x1x16xf32>, tensor<4x9x16xf32>) -> tensor<4x1x9xf32>
// CHECK: call @qcc_cpu_bmm_axpy_4x1x16x9(%{{.*}}, %arg2) : (tensor<4x1x9xf32>, tensor<4x9x16xf32>) -> tensor<4x1x16xf32>
// CHECK-LABEL: func.func private @qcc_cpu_bmm_dot_4x1x9x16(
// CHECK: scf.parallel
// CHECK-LABEL: func.func private @qcc_cpu_bmm_dot_4x1x9x16_row(
// CHECK: vector.fma
// CHECK: vector.reduction <add>
// CHECK-LABEL: func.func private @qcc_cpu_bmm_axpy_4x1x16x9_row(
// CHECK: vector.broadcast
// CHECK: vector.fma
// CHECK: vector.transfer_write
func.func @attention(%q: tensor<4x1x16xf32>, %k: tensor<1x4x9x16xf32>, %v: tensor<4x9x16xf32>) -> tensor<4x1x16xf32> {
  %zero = arith.constant 0.0 : f32
  %e = tensor.empty() : tensor<1x4x16x9xf32>
  %kt = linalg.transpose ins(%k : tensor<1x4x9x16xf32>) outs(%e : tensor<1x4x16x9xf32>) permutation = [0, 1, 3, 2]
  %ktc = tensor.collapse_shape %kt [[0, 1], [2], [3]] : tensor<1x4x16x9xf32> into tensor<4x16x9xf32>
  %s0 = tensor.empty() : tensor<4x1x9xf32>
  %s1 = linalg.fill ins(%zero : f32) outs(%s0 : tensor<4x1x9xf32>) -> tensor<4x1x9xf32>
  %s = linalg.batch_matmul ins(%q, %ktc : tensor<4x1x16xf32>, tensor<4x16x9xf32>) outs(%s1 : tensor<4x1x9xf32>) -> tensor<4x1x9xf32>
  %o0 = tensor.empty() : tensor<4x1x16xf32>
  %o1 = linalg.fill ins(%zero : f32) outs(%o0 : tensor<4x1x16xf32>) -> tensor<4x1x16xf32>
  %o = linalg.batch_matmul ins(%s, %v : tensor<4x1x9xf32>, tensor<4x9x16xf32>) outs(%o1 : tensor<4x1x16xf32>) -> tensor<4x1x16xf32>
  return %o : tensor<4x1x16xf32>
}
