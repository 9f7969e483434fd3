// RUN: qcc-opt %s -p 'cuda-concat-to-generic' | filecheck %s

// A KV cache append, torch.cat([cache, k], dim=2), becomes one gather-style generic (no
// inputs; the body picks the operand by the index along dim 2, reading it at a clamped
// index), which fusion later folds into its consumer: attention reads the cache in place.
// CHECK-LABEL: func.func @kv_append
// CHECK-NOT: tensor.concat
// CHECK: call @qcc_cuda_concat_1x4x8x16_1x4x1x16_d2_f32(%arg0, %arg1)
func.func @kv_append(%cache: tensor<1x4x8x16xf32>, %k: tensor<1x4x1x16xf32>) -> tensor<1x4x9x16xf32> {
  %keys = tensor.concat dim(2) %cache, %k : (tensor<1x4x8x16xf32>, tensor<1x4x1x16xf32>) -> tensor<1x4x9x16xf32>
  return %keys : tensor<1x4x9x16xf32>
}

// A cache kept in f16 and widened by `.float()`: the gather reads the f16 cache and widens
// each element (arith.extf in its body), so no launch writes an f32 copy of the cache.
// CHECK-LABEL: func.func @kv_f16
// CHECK: call @qcc_cuda_concat_1x4x8x16_1x4x1x16_d2_f32_extff16_id(%arg0, %arg1) : (tensor<1x4x8x16xf16>, tensor<1x4x1x16xf32>)
// CHECK-LABEL: func.func private @qcc_cuda_concat_1x4x8x16_1x4x1x16_d2_f32(
// CHECK: linalg.generic
// CHECK-SAME: outs(
// CHECK: linalg.index 2
// CHECK: arith.maxsi
// CHECK: arith.minsi
// CHECK: tensor.extract %arg0
// CHECK: tensor.extract %arg1
// CHECK: arith.cmpi ult
// CHECK: arith.select
// CHECK-LABEL: func.func private @qcc_cuda_concat_1x4x8x16_1x4x1x16_d2_f32_extff16_id(
// CHECK-SAME: %arg0: tensor<1x4x8x16xf16>
// CHECK: %[[X:.*]] = tensor.extract %arg0[{{.*}}] : tensor<1x4x8x16xf16>
// CHECK: arith.extf %[[X]] : f16 to f32
func.func @kv_f16(%cache: tensor<1x4x8x16xf16>, %k: tensor<1x4x1x16xf32>) -> tensor<1x4x9x16xf32> {
  %w0 = tensor.empty() : tensor<1x4x8x16xf32>
  %kw = linalg.generic {indexing_maps = [affine_map<(d0, d1, d2, d3) -> (d0, d1, d2, d3)>, affine_map<(d0, d1, d2, d3) -> (d0, d1, d2, d3)>],
                        iterator_types = ["parallel", "parallel", "parallel", "parallel"]}
      ins(%cache : tensor<1x4x8x16xf16>) outs(%w0 : tensor<1x4x8x16xf32>) {
  ^bb0(%in: f16, %out: f32):
    %x = arith.extf %in : f16 to f32
    linalg.yield %x : f32
  } -> tensor<1x4x8x16xf32>
  %keys = tensor.concat dim(2) %kw, %k : (tensor<1x4x8x16xf32>, tensor<1x4x1x16xf32>) -> tensor<1x4x9x16xf32>
  return %keys : tensor<1x4x9x16xf32>
}
