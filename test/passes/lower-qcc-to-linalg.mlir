// RUN: qcc-opt %s -p lower-qcc-to-linalg,inline,canonicalize | filecheck %s

// qcc.qlinear becomes one linalg.generic contraction whose body decodes the
// int4 nibble (low nibble for even k, high for odd), subtracts the zero point
// and scales: dequantization is fused, no float weight tensor is built.

// CHECK-DAG: #[[WMAP:.*]] = affine_map<(d0, d1, d2) -> (d1, d2 floordiv 2)>
// CHECK-DAG: #[[SMAP:.*]] = affine_map<(d0, d1, d2) -> (d1, d2 floordiv 128)>
// CHECK-LABEL: func.func @int4_group
// CHECK-NOT: qcc.qlinear
// CHECK: linalg.generic
// CHECK-SAME: #[[WMAP]], #[[SMAP]], #[[SMAP]]
// CHECK-SAME: iterator_types = ["parallel", "parallel", "reduction"]
// CHECK-SAME: ins(%{{.*}}, %{{.*}}, %{{.*}}, %{{.*}} : tensor<4x256xf32>, tensor<64x128xi8>, tensor<64x2xf32>, tensor<64x2xi8>)
// CHECK: linalg.index 2
// CHECK: arith.shrui
// CHECK: arith.andi
// CHECK: arith.uitofp
// CHECK: arith.subf
// CHECK: arith.mulf
// CHECK-NOT: tensor<64x256xf32>
func.func @int4_group(%x: tensor<4x256xf32>, %w: tensor<64x128xi8>, %s: tensor<64x2xf32>, %z: tensor<64x2xi8>) -> tensor<4x64xf32> {
  %y = "qcc.qlinear"(%x, %w, %s, %z) {act_format = #qcc.format<"none">, weight_format = #qcc.format<"int4_asym_g128">} : (tensor<4x256xf32>, tensor<64x128xi8>, tensor<64x2xf32>, tensor<64x2xi8>) -> tensor<4x64xf32>
  return %y : tensor<4x64xf32>
}

// CHECK-LABEL: func.func @int8_channel
// CHECK: linalg.generic
// CHECK-SAME: ins(%{{.*}}, %{{.*}}, %{{.*}} : tensor<3x32xf32>, tensor<16x32xi8>, tensor<16x1xf32>)
// CHECK: arith.sitofp %{{.*}} : i8 to f32
// CHECK-NOT: arith.shrui
func.func @int8_channel(%x: tensor<3x32xf32>, %w: tensor<16x32xi8>, %s: tensor<16x1xf32>) -> tensor<3x16xf32> {
  %y = "qcc.qlinear"(%x, %w, %s) {act_format = #qcc.format<"none">, weight_format = #qcc.format<"int8_sym_channel">} : (tensor<3x32xf32>, tensor<16x32xi8>, tensor<16x1xf32>) -> tensor<3x16xf32>
  return %y : tensor<3x16xf32>
}

// The integer path of dequant-after-gemm.  Per-token quantization: a row
// absmax reduction, scale = amax / qmax (0 -> 1), then codes rounded half to
// even and clamped to the format's levels (int4: [-8, 7], qmax 7).
// CHECK-LABEL: func.func @quantize_int4_token
// CHECK-DAG: %[[C7:.*]] = arith.constant 7.000000e+00 : f32
// CHECK-DAG: %[[CM8:.*]] = arith.constant -8.000000e+00 : f32
// CHECK: linalg.generic
// CHECK-SAME: iterator_types = ["parallel", "reduction"]
// CHECK-SAME: ins(%arg0 : tensor<3x32xf32>) outs(%{{.*}} : tensor<3x1xf32>)
// CHECK: math.absf
// CHECK: arith.maximumf
// CHECK: arith.divf %{{.*}}, %[[C7]] : f32
// CHECK: arith.select
// CHECK: ins(%arg0, %{{.*}} : tensor<3x32xf32>, tensor<3x1xf32>) outs(%{{.*}} : tensor<3x32xi8>)
// CHECK: arith.divf
// CHECK-NEXT: math.roundeven
// CHECK-NEXT: arith.maximumf %{{.*}}, %[[CM8]] : f32
// CHECK-NEXT: arith.minimumf %{{.*}}, %[[C7]] : f32
// CHECK-NEXT: arith.fptosi %{{.*}} : f32 to i8
func.func @quantize_int4_token(%x: tensor<3x32xf32>) -> (tensor<3x32xi8>, tensor<3x1xf32>) {
  %q, %s = "qcc.quantize_dynamic"(%x) {format = #qcc.format<"int4_sym_token">} : (tensor<3x32xf32>) -> (tensor<3x32xi8>, tensor<3x1xf32>)
  return %q, %s : tensor<3x32xi8>, tensor<3x1xf32>
}

// A clip ratio scales each row's absmax before the division by qmax.
// CHECK-LABEL: func.func @quantize_int4_token_clip
// CHECK-DAG: %[[CLIP:.*]] = arith.constant 0.899999976 : f32
// CHECK-DAG: %[[C7:.*]] = arith.constant 7.000000e+00 : f32
// CHECK: arith.maximumf
// CHECK: %[[AC:.*]] = arith.mulf %{{.*}}, %[[CLIP]] : f32
// CHECK-NEXT: arith.divf %[[AC]], %[[C7]] : f32
func.func @quantize_int4_token_clip(%x: tensor<3x32xf32>) -> (tensor<3x32xi8>, tensor<3x1xf32>) {
  %q, %s = "qcc.quantize_dynamic"(%x) {format = #qcc.format<"int4_sym_token_clip0.9">} : (tensor<3x32xf32>) -> (tensor<3x32xi8>, tensor<3x1xf32>)
  return %q, %s : tensor<3x32xi8>, tensor<3x1xf32>
}

// Asymmetric int8 weights per channel: unsigned codes (extui), then the zero
// point as i32 row-sum correction acc - z[n] * sum_k xq[m, k].
// CHECK-LABEL: func.func @matmul_int8_asym_channel
// CHECK: %[[ACC:.*]] = linalg.generic
// CHECK-SAME: ins(%arg0, %arg1 : tensor<3x32xi8>, tensor<16x32xi8>) outs(%{{.*}} : tensor<3x16xi32>)
// CHECK: arith.extsi %{{.*}} : i8 to i32
// CHECK-NEXT: arith.extui %{{.*}} : i8 to i32
// CHECK: %[[RS:.*]] = linalg.generic
// CHECK-SAME: ins(%arg0 : tensor<3x32xi8>) outs(%{{.*}} : tensor<3x1xi32>)
// CHECK: linalg.generic
// CHECK-SAME: ins(%[[ACC]], %arg2, %[[RS]] : tensor<3x16xi32>, tensor<16x1xi8>, tensor<3x1xi32>) outs(%{{.*}} : tensor<3x16xi32>)
// CHECK: arith.extui %{{.*}} : i8 to i32
// CHECK-NEXT: arith.muli
// CHECK-NEXT: arith.subi
// CHECK-NOT: f32
// CHECK: return
func.func @matmul_int8_asym_channel(%x: tensor<3x32xi8>, %w: tensor<16x32xi8>, %z: tensor<16x1xi8>) -> tensor<3x16xi32> {
  %acc = "qcc.matmul_int"(%x, %w, %z) {act_format = #qcc.format<"int8_sym_token">, weight_format = #qcc.format<"int8_asym_channel">} : (tensor<3x32xi8>, tensor<16x32xi8>, tensor<16x1xi8>) -> tensor<3x16xi32>
  return %acc : tensor<3x16xi32>
}

// Per-group partial sums scaled by the group's weight scale and a per-tensor
// activation scale, summed over groups in f32.
// CHECK-LABEL: func.func @scale_accumulate_groups
// CHECK: linalg.generic
// CHECK-SAME: iterator_types = ["parallel", "parallel", "reduction"]
// CHECK-SAME: ins(%arg0, %arg1, %arg2 : tensor<3x16x4xi32>, tensor<1x1xf32>, tensor<16x4xf32>) outs(%{{.*}} : tensor<3x16xf32>)
// CHECK: arith.sitofp %{{.*}} : i32 to f32
// CHECK: arith.addf
func.func @scale_accumulate_groups(%acc: tensor<3x16x4xi32>, %sx: tensor<1x1xf32>, %sw: tensor<16x4xf32>) -> tensor<3x16xf32> {
  %y = "qcc.scale_accumulate"(%acc, %sx, %sw) : (tensor<3x16x4xi32>, tensor<1x1xf32>, tensor<16x4xf32>) -> tensor<3x16xf32>
  return %y : tensor<3x16xf32>
}
