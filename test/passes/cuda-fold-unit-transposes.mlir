// RUN: qcc-opt %s -p 'cuda-fold-unit-transposes' | filecheck %s
// RUN: qcc-opt %s -p 'cuda-fold-unit-transposes,inline,canonicalize' | filecheck %s --check-prefix=VIEW

// The heads' transpose(1, 2) of one token moves only size-1 dims: it becomes a call of a
// reshape (collapse_shape + expand_shape, a view after bufferization); with two tokens it
// moves data and stays a copy.

#in = affine_map<(d0, d1, d2, d3) -> (d0, d2, d1, d3)>
#id = affine_map<(d0, d1, d2, d3) -> (d0, d1, d2, d3)>

// CHECK-LABEL: func.func @one_token
// CHECK-NOT: linalg.generic
// CHECK: %[[R:.*]] = call @qcc_cuda_reshape_1x1x4x64_to_1x4x1x64_f32(%arg0) : (tensor<1x1x4x64xf32>) -> tensor<1x4x1x64xf32>
// CHECK: return %[[R]]
// CHECK-LABEL: func.func @two_tokens
// CHECK: linalg.generic
// CHECK-LABEL: func.func private @qcc_cuda_reshape_1x1x4x64_to_1x4x1x64_f32
// CHECK: tensor.collapse_shape %{{.*}} {{\[\[}}0, 1, 2], [3]] : tensor<1x1x4x64xf32> into tensor<4x64xf32>
// CHECK: tensor.expand_shape %{{.*}} {{\[\[}}0, 1, 2], [3]] output_shape [1, 4, 1, 64] : tensor<4x64xf32> into tensor<1x4x1x64xf32>

// VIEW-LABEL: func.func @one_token
// VIEW-NEXT: tensor.collapse_shape
// VIEW-NEXT: tensor.expand_shape
// VIEW-NEXT: return
func.func @one_token(%x: tensor<1x1x4x64xf32>) -> tensor<1x4x1x64xf32> {
  %e = tensor.empty() : tensor<1x4x1x64xf32>
  %y = linalg.generic {indexing_maps = [#in, #id], iterator_types = ["parallel", "parallel", "parallel", "parallel"]}
      ins(%x : tensor<1x1x4x64xf32>) outs(%e : tensor<1x4x1x64xf32>) {
  ^bb0(%a: f32, %b: f32):
    linalg.yield %a : f32
  } -> tensor<1x4x1x64xf32>
  return %y : tensor<1x4x1x64xf32>
}

func.func @two_tokens(%x: tensor<1x2x4x64xf32>) -> tensor<1x4x2x64xf32> {
  %e = tensor.empty() : tensor<1x4x2x64xf32>
  %y = linalg.generic {indexing_maps = [#in, #id], iterator_types = ["parallel", "parallel", "parallel", "parallel"]}
      ins(%x : tensor<1x2x4x64xf32>) outs(%e : tensor<1x4x2x64xf32>) {
  ^bb0(%a: f32, %b: f32):
    linalg.yield %a : f32
  } -> tensor<1x4x2x64xf32>
  return %y : tensor<1x4x2x64xf32>
}
