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
