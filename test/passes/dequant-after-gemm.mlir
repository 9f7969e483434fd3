// RUN: qcc-opt %s -p dequant-after-gemm | filecheck %s
// RUN: qcc-opt %s -p dequant-after-gemm,lower-qcc-to-linalg,inline,canonicalize | filecheck %s --check-prefix=LOWER

// A qlinear with quantized activations becomes quantize -> integer matmul ->
// one scaling of the i32 accumulator; weight-only qlinears are left alone.

// CHECK-LABEL: func.func @int8_token
// CHECK: %[[Q:.*]]:2 = "qcc.quantize_dynamic"(%arg0) {format = #qcc.format<"int8_sym_token">} : (tensor<4x256xf32>) -> (tensor<4x256xi8>, tensor<4x1xf32>)
// CHECK: %[[ACC:.*]] = "qcc.matmul_int"(%[[Q]]#0, %arg1) {act_format = #qcc.format<"int8_sym_token">, weight_format = #qcc.format<"int8_sym_channel">} : (tensor<4x256xi8>, tensor<64x256xi8>) -> tensor<4x64xi32>
// CHECK: %[[Y:.*]] = "qcc.scale_accumulate"(%[[ACC]], %[[Q]]#1, %arg2) : (tensor<4x64xi32>, tensor<4x1xf32>, tensor<64x1xf32>) -> tensor<4x64xf32>
// CHECK: return %[[Y]]
// CHECK-NOT: qcc.qlinear

// The integer path stays integer through the matmul: i8 codes in, extsi to
// i32, muli/addi, an i32 accumulator; floats come back only in the scaling.
// LOWER-LABEL: func.func @int8_token
// LOWER: math.roundeven
// LOWER: arith.fptosi %{{.*}} : f32 to i8
// LOWER: linalg.generic
// LOWER-SAME: iterator_types = ["parallel", "parallel", "reduction"]
// LOWER-SAME: ins(%{{.*}}, %arg1 : tensor<4x256xi8>, tensor<64x256xi8>) outs(%{{.*}} : tensor<4x64xi32>)
// LOWER-NEXT: ^bb0(%{{.*}}: i8, %{{.*}}: i8, %{{.*}}: i32):
// LOWER-NEXT: arith.extsi %{{.*}} : i8 to i32
// LOWER-NEXT: arith.extsi %{{.*}} : i8 to i32
// LOWER-NEXT: arith.muli %{{.*}}, %{{.*}} : i32
// LOWER-NEXT: arith.addi %{{.*}}, %{{.*}} : i32
// LOWER-NEXT: linalg.yield %{{.*}} : i32
// LOWER: linalg.generic
// LOWER-SAME: ins(%{{.*}}, %{{.*}}, %arg2 : tensor<4x64xi32>, tensor<4x1xf32>, tensor<64x1xf32>)
// LOWER: arith.sitofp %{{.*}} : i32 to f32
// LOWER: arith.mulf
// LOWER: arith.mulf
func.func @int8_token(%x: tensor<4x256xf32>, %w: tensor<64x256xi8>, %s: tensor<64x1xf32>) -> tensor<4x64xf32> {
  %y = "qcc.qlinear"(%x, %w, %s) {act_format = #qcc.format<"int8_sym_token">, weight_format = #qcc.format<"int8_sym_channel">} : (tensor<4x256xf32>, tensor<64x256xi8>, tensor<64x1xf32>) -> tensor<4x64xf32>
  return %y : tensor<4x64xf32>
}

// Grouped asymmetric int4 weights: per-group i32 partial sums [M, N, K/G], the
// zero point as a row-sum correction in i32, then scaled per group and summed in f32.
// CHECK-LABEL: func.func @int4_group_asym
// CHECK: "qcc.matmul_int"(%{{.*}}#0, %arg1, %arg3) {act_format = #qcc.format<"int8_sym_token">, weight_format = #qcc.format<"int4_asym_g128">} : (tensor<4x256xi8>, tensor<64x128xi8>, tensor<64x2xi8>) -> tensor<4x64x2xi32>
// CHECK: "qcc.scale_accumulate"(%{{.*}}, %{{.*}}#1, %arg2) : (tensor<4x64x2xi32>, tensor<4x1xf32>, tensor<64x2xf32>) -> tensor<4x64xf32>
// LOWER-LABEL: func.func @int4_group_asym
// int4 codes are unpacked to one i8 a byte (nibble select), then the contraction is i8 x i8 -> i32.
// LOWER: %[[WU:[0-9]+]] = linalg.generic {{.*}} ins(%arg1 : tensor<64x128xi8>) outs(%{{.*}} : tensor<64x256xi8>)
// LOWER: arith.shrui
// LOWER-NEXT: arith.andi
// LOWER-NEXT: linalg.yield %{{.*}} : i8
// LOWER: %[[XG:.*]] = tensor.expand_shape %{{.*}} {{\[\[}}0], [1, 2]] output_shape [4, 2, 128] : tensor<4x256xi8> into tensor<4x2x128xi8>
// LOWER: %[[WG:.*]] = tensor.expand_shape %[[WU]] {{\[\[}}0], [1, 2]] output_shape [64, 2, 128] : tensor<64x256xi8> into tensor<64x2x128xi8>
// LOWER: linalg.generic
// LOWER-SAME: iterator_types = ["parallel", "parallel", "parallel", "reduction"]
// LOWER-SAME: ins(%[[XG]], %[[WG]] : tensor<4x2x128xi8>, tensor<64x2x128xi8>) outs(%{{.*}} : tensor<4x64x2xi32>)
// LOWER-NEXT: ^bb0(%{{.*}}: i8, %{{.*}}: i8, %{{.*}}: i32):
// LOWER-NEXT: arith.extsi %{{.*}} : i8 to i32
// LOWER-NEXT: arith.extsi %{{.*}} : i8 to i32
// LOWER-NEXT: arith.muli %{{.*}}, %{{.*}} : i32
// LOWER-NEXT: arith.addi %{{.*}}, %{{.*}} : i32
// LOWER: ins(%[[XG]] : tensor<4x2x128xi8>) outs(%{{.*}} : tensor<4x2xi32>)
// LOWER: ins(%{{.*}}, %arg3, %{{.*}} : tensor<4x64x2xi32>, tensor<64x2xi8>, tensor<4x2xi32>)
// LOWER: arith.muli %{{.*}}, %{{.*}} : i32
// LOWER-NEXT: arith.subi %{{.*}}, %{{.*}} : i32
// LOWER: iterator_types = ["parallel", "parallel", "reduction"]
// LOWER-SAME: ins(%{{.*}}, %{{.*}}, %arg2 : tensor<4x64x2xi32>, tensor<4x1xf32>, tensor<64x2xf32>) outs(%{{.*}} : tensor<4x64xf32>)
// LOWER: arith.sitofp %{{.*}} : i32 to f32
// LOWER: arith.addf
func.func @int4_group_asym(%x: tensor<4x256xf32>, %w: tensor<64x128xi8>, %s: tensor<64x2xf32>, %z: tensor<64x2xi8>) -> tensor<4x64xf32> {
  %y = "qcc.qlinear"(%x, %w, %s, %z) {act_format = #qcc.format<"int8_sym_token">, weight_format = #qcc.format<"int4_asym_g128">} : (tensor<4x256xf32>, tensor<64x128xi8>, tensor<64x2xf32>, tensor<64x2xi8>) -> tensor<4x64xf32>
  return %y : tensor<4x64xf32>
}

// Static per-tensor activations: the calibrated scale becomes a constant
// operand of qcc.quantize and of the scaling.
// CHECK-LABEL: func.func @static_tensor
// CHECK: %[[SX:.*]] = arith.constant dense<5.000000e-01> : tensor<1x1xf32>
// CHECK: %[[XQ:.*]] = "qcc.quantize"(%arg0, %[[SX]]) {format = #qcc.format<"int4_sym_tensor">} : (tensor<4x256xf32>, tensor<1x1xf32>) -> tensor<4x256xi8>
// CHECK: %[[ACC4:.*]] = "qcc.matmul_int"(%[[XQ]], %arg1) {act_format = #qcc.format<"int4_sym_tensor">, weight_format = #qcc.format<"int4_sym_channel">} : (tensor<4x256xi8>, tensor<64x128xi8>) -> tensor<4x64xi32>
// CHECK: "qcc.scale_accumulate"(%[[ACC4]], %[[SX]], %arg2) : (tensor<4x64xi32>, tensor<1x1xf32>, tensor<64x1xf32>)
// LOWER-LABEL: func.func @static_tensor
// LOWER: %[[CQMIN:.*]] = arith.constant -8.000000e+00 : f32
// LOWER: math.roundeven
// LOWER: arith.maximumf %{{.*}}, %[[CQMIN]] : f32
// LOWER: ins(%arg1 : tensor<64x128xi8>) outs(%{{.*}} : tensor<64x256xi8>)
// LOWER: arith.andi
// LOWER-NEXT: arith.subi %{{.*}}, %{{.*}} : i8
// LOWER: ins(%{{.*}}, %{{.*}} : tensor<4x256xi8>, tensor<64x256xi8>) outs(%{{.*}} : tensor<4x64xi32>)
// LOWER-NEXT: ^bb0
// LOWER-NEXT: arith.extsi %{{.*}} : i8 to i32
// LOWER-NEXT: arith.extsi %{{.*}} : i8 to i32
// LOWER-NEXT: arith.muli %{{.*}}, %{{.*}} : i32
func.func @static_tensor(%x: tensor<4x256xf32>, %w: tensor<64x128xi8>, %s: tensor<64x1xf32>) -> tensor<4x64xf32> {
  %y = "qcc.qlinear"(%x, %w, %s) {act_format = #qcc.format<"int4_sym_tensor">, act_scale = 5.000000e-01 : f32, weight_format = #qcc.format<"int4_sym_channel">} : (tensor<4x256xf32>, tensor<64x128xi8>, tensor<64x1xf32>) -> tensor<4x64xf32>
  return %y : tensor<4x64xf32>
}

// CHECK-LABEL: func.func @weight_only
// CHECK: "qcc.qlinear"(%arg0, %arg1, %arg2) {act_format = #qcc.format<"none">
func.func @weight_only(%x: tensor<4x256xf32>, %w: tensor<64x256xi8>, %s: tensor<64x1xf32>) -> tensor<4x64xf32> {
  %y = "qcc.qlinear"(%x, %w, %s) {act_format = #qcc.format<"none">, weight_format = #qcc.format<"int8_sym_channel">} : (tensor<4x256xf32>, tensor<64x256xi8>, tensor<64x1xf32>) -> tensor<4x64xf32>
  return %y : tensor<4x64xf32>
}
