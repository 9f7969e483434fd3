// RUN: qcc-opt %s -p 'cpu-vectorize-contractions{lanes=8}' | filecheck %s
// RUN: qcc-opt %s -p 'cpu-vectorize-contractions{lanes=8}' | filecheck %s --check-prefix=KV

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

// Decode attention over a KV cache: B is the concatenation of the cache (a slice of
// the cache argument) and the step's new key / value.  The kernels take the parts
// and read each where it lies (strided memrefs, so the slice needs no copy): no
// tensor.concat is left to build an 8 x 513 x 16 copy of the cache.
// KV-LABEL: func.func @decode_attention
// KV-NOT: tensor.concat
// KV: %[[KS:.*]] = tensor.extract_slice %arg1[0, 0, 0, 0, 0] [1, 1, 8, 512, 16]
// KV: %[[KP:.*]] = tensor.collapse_shape %{{.*}} {{\[\[}}0, 1], [2], [3]] : tensor<1x8x512x16xf32> into tensor<8x512x16xf32>
// KV: %[[KN:.*]] = tensor.collapse_shape %arg2 {{\[\[}}0, 1], [2], [3]] : tensor<1x8x1x16xf32> into tensor<8x1x16xf32>
// KV: call @qcc_cpu_bmm_dot_8x1x513x16_parts512_1(%arg0, %[[KP]], %[[KN]])
// KV: call @qcc_cpu_bmm_axpy_8x1x16x513_parts512_1(%{{.*}}, %{{.*}}, %{{.*}})
// KV-NOT: tensor.concat
// KV-LABEL: func.func private @qcc_cpu_bmm_dot_8x1x513x16_parts512_1(
// KV-SAME: %{{.*}}: tensor<8x1x16xf32>, %{{.*}}: tensor<8x512x16xf32>, %{{.*}}: tensor<8x1x16xf32>)
// KV: bufferization.to_buffer %{{.*}} read_only : tensor<8x512x16xf32> to memref<8x512x16xf32, strided<[?, ?, 1], offset: ?>>
// KV-LABEL: func.func private @qcc_cpu_bmm_dot_8x1x513x16_parts512_1_row(
// KV: scf.for %{{.*}} = %{{.*}} to %{{.*}} step
// KV: vector.transfer_read %{{.*}} : memref<8x512x16xf32, strided<[?, ?, 1], offset: ?>>, vector<8xf32>
// KV: vector.transfer_read %{{.*}} : memref<8x1x16xf32, strided<[?, ?, 1], offset: ?>>, vector<8xf32>
// KV-LABEL: func.func private @qcc_cpu_bmm_axpy_8x1x16x513_parts512_1_row(
// KV: memref.load
// KV: vector.fma
// KV: arith.addi %{{.*}}, %c512
// KV: vector.fma
func.func @decode_attention(%q: tensor<8x1x16xf32>, %cache: tensor<2x1x8x512x16xf32>, %k: tensor<1x8x1x16xf32>,
                            %p: tensor<8x1x513xf32>, %vcache: tensor<2x1x8x512x16xf32>, %v: tensor<1x8x1x16xf32>) -> (tensor<8x1x513xf32>, tensor<8x1x16xf32>) {
  %zero = arith.constant 0.0 : f32
  %ks = tensor.extract_slice %cache[0, 0, 0, 0, 0] [1, 1, 8, 512, 16] [1, 1, 1, 1, 1] : tensor<2x1x8x512x16xf32> to tensor<1x1x8x512x16xf32>
  %kc = tensor.collapse_shape %ks [[0, 1], [2], [3], [4]] : tensor<1x1x8x512x16xf32> into tensor<1x8x512x16xf32>
  %keys = tensor.concat dim(2) %kc, %k : (tensor<1x8x512x16xf32>, tensor<1x8x1x16xf32>) -> tensor<1x8x513x16xf32>
  %e = tensor.empty() : tensor<1x8x16x513xf32>
  %kt = linalg.transpose ins(%keys : tensor<1x8x513x16xf32>) outs(%e : tensor<1x8x16x513xf32>) permutation = [0, 1, 3, 2]
  %ktc = tensor.collapse_shape %kt [[0, 1], [2], [3]] : tensor<1x8x16x513xf32> into tensor<8x16x513xf32>
  %s0 = tensor.empty() : tensor<8x1x513xf32>
  %s1 = linalg.fill ins(%zero : f32) outs(%s0 : tensor<8x1x513xf32>) -> tensor<8x1x513xf32>
  %s = linalg.batch_matmul ins(%q, %ktc : tensor<8x1x16xf32>, tensor<8x16x513xf32>) outs(%s1 : tensor<8x1x513xf32>) -> tensor<8x1x513xf32>
  %vs = tensor.extract_slice %vcache[1, 0, 0, 0, 0] [1, 1, 8, 512, 16] [1, 1, 1, 1, 1] : tensor<2x1x8x512x16xf32> to tensor<1x1x8x512x16xf32>
  %vc = tensor.collapse_shape %vs [[0, 1], [2], [3], [4]] : tensor<1x1x8x512x16xf32> into tensor<1x8x512x16xf32>
  %values = tensor.concat dim(2) %vc, %v : (tensor<1x8x512x16xf32>, tensor<1x8x1x16xf32>) -> tensor<1x8x513x16xf32>
  %vcl = tensor.collapse_shape %values [[0, 1], [2], [3]] : tensor<1x8x513x16xf32> into tensor<8x513x16xf32>
  %o0 = tensor.empty() : tensor<8x1x16xf32>
  %o1 = linalg.fill ins(%zero : f32) outs(%o0 : tensor<8x1x16xf32>) -> tensor<8x1x16xf32>
  %o = linalg.batch_matmul ins(%p, %vcl : tensor<8x1x513xf32>, tensor<8x513x16xf32>) outs(%o1 : tensor<8x1x16xf32>) -> tensor<8x1x16xf32>
  return %s, %o : tensor<8x1x513xf32>, tensor<8x1x16xf32>
}
