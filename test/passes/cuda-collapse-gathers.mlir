// RUN: qcc-opt %s -p 'cuda-collapse-gathers' | filecheck %s
// RUN: qcc-opt %s -p 'cuda-collapse-gathers,func.func(linalg-fuse-elementwise-ops)' | filecheck %s --check-prefix=FUSED

#id5 = affine_map<(d0, d1, d2, d3, d4) -> (d0, d1, d2, d3, d4)>
#p = affine_map<(d0, d1, d2, d3, d4) -> (d0, d1, d2, d4)>
#v = affine_map<(d0, d1, d2, d3, d4) -> (d0, d1, d4, d3)>
#o = affine_map<(d0, d1, d2, d3, d4) -> (d0, d1, d2, d3)>

// Grouped-query attention's V at decode: the cache gather (concatenation of 8 cached
// positions and the new one, fused with repeat_kv's broadcast over 2 query heads a KV head:
// dim 2 is unread) collapsed into 4 heads, then p @ v. The gather becomes one over
// [1, 4, 9, 16] that reads KV head h floordiv 2, and fusion then folds it into p @ v: no
// rep-fold copy of the cache is left.
// CHECK-LABEL: func.func @gqa_pv
// CHECK-NOT: tensor.collapse_shape
// CHECK: %[[E:.*]] = tensor.empty() : tensor<1x4x9x16xf32>
// CHECK: linalg.generic {indexing_maps = [#{{.*}}], iterator_types = ["parallel", "parallel", "parallel", "parallel"]} outs(%[[E]] : tensor<1x4x9x16xf32>)
// CHECK: %[[H:.*]] = linalg.index 1 : index
// CHECK: %[[KV:.*]] = affine.apply #{{.*}}(%[[H]])
// CHECK-NOT: linalg.index 4
// CHECK: %[[S:.*]] = linalg.index 2 : index
// CHECK: %[[D:.*]] = linalg.index 3 : index
// CHECK: tensor.extract %arg0[%c0, %[[KV]], {{.*}}, %[[D]]]
// CHECK: tensor.extract %arg1[%c0, %[[KV]], {{.*}}, %[[D]]]
// CHECK: arith.select
// CHECK: -> tensor<1x4x9x16xf32>
// FUSED-LABEL: func.func @gqa_pv
// FUSED-NOT: tensor.collapse_shape
// FUSED: linalg.generic
// FUSED-SAME: ins(%arg2 : tensor<1x4x1x9xf32>)
// FUSED-SAME: outs({{.*}} : tensor<1x4x1x16xf32>)
// FUSED: affine.apply
// FUSED: tensor.extract %arg0
// FUSED: arith.mulf
// FUSED-NOT: linalg.generic
// FUSED-LABEL: func.func @two_uses
func.func @gqa_pv(%cache: tensor<1x2x8x16xf32>, %new: tensor<1x2x1x16xf32>, %p: tensor<1x4x1x9xf32>) -> tensor<1x4x1x16xf32> {
  %c0 = arith.constant 0 : index
  %c7 = arith.constant 7 : index
  %c8 = arith.constant 8 : index
  %e = tensor.empty() : tensor<1x2x2x9x16xf32>
  %g = linalg.generic {indexing_maps = [#id5], iterator_types = ["parallel", "parallel", "parallel", "parallel", "parallel"]}
      outs(%e : tensor<1x2x2x9x16xf32>) {
  ^bb0(%out: f32):
    %kv = linalg.index 1 : index
    %s = linalg.index 3 : index
    %d = linalg.index 4 : index
    %a = arith.minsi %s, %c7 : index
    %x = tensor.extract %cache[%c0, %kv, %a, %d] : tensor<1x2x8x16xf32>
    %y = tensor.extract %new[%c0, %kv, %c0, %d] : tensor<1x2x1x16xf32>
    %in = arith.cmpi ult, %s, %c8 : index
    %r = arith.select %in, %x, %y : f32
    linalg.yield %r : f32
  } -> tensor<1x2x2x9x16xf32>
  %v = tensor.collapse_shape %g [[0], [1, 2], [3], [4]] : tensor<1x2x2x9x16xf32> into tensor<1x4x9x16xf32>
  %z = arith.constant 0.0 : f32
  %oe = tensor.empty() : tensor<1x4x1x16xf32>
  %o0 = linalg.fill ins(%z : f32) outs(%oe : tensor<1x4x1x16xf32>) -> tensor<1x4x1x16xf32>
  %o = linalg.generic {indexing_maps = [#p, #v, #o], iterator_types = ["parallel", "parallel", "parallel", "parallel", "reduction"]}
      ins(%p, %v : tensor<1x4x1x9xf32>, tensor<1x4x9x16xf32>) outs(%o0 : tensor<1x4x1x16xf32>) {
  ^bb0(%pi: f32, %vi: f32, %acc: f32):
    %m = arith.mulf %pi, %vi : f32
    %s = arith.addf %acc, %m : f32
    linalg.yield %s : f32
  } -> tensor<1x4x1x16xf32>
  return %o : tensor<1x4x1x16xf32>
}

// A gather whose full shape is read elsewhere too keeps its shape (the collapse stays).
// CHECK-LABEL: func.func @two_uses
// CHECK: tensor.collapse_shape
func.func @two_uses(%cache: tensor<1x2x8x16xf32>) -> (tensor<1x2x2x8x16xf32>, tensor<1x4x8x16xf32>) {
  %c0 = arith.constant 0 : index
  %e = tensor.empty() : tensor<1x2x2x8x16xf32>
  %g = linalg.generic {indexing_maps = [#id5], iterator_types = ["parallel", "parallel", "parallel", "parallel", "parallel"]}
      outs(%e : tensor<1x2x2x8x16xf32>) {
  ^bb0(%out: f32):
    %kv = linalg.index 1 : index
    %s = linalg.index 3 : index
    %d = linalg.index 4 : index
    %x = tensor.extract %cache[%c0, %kv, %s, %d] : tensor<1x2x8x16xf32>
    linalg.yield %x : f32
  } -> tensor<1x2x2x8x16xf32>
  %v = tensor.collapse_shape %g [[0], [1, 2], [3], [4]] : tensor<1x2x2x8x16xf32> into tensor<1x4x8x16xf32>
  return %g, %v : tensor<1x2x2x8x16xf32>, tensor<1x4x8x16xf32>
}
