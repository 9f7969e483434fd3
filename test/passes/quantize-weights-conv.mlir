// RUN: qcc-opt %s --random-params=0 -p 'quantize-weights{format=int8_sym_channel}' | filecheck %s
// RUN: qcc-opt %s --random-params=0 -p 'quantize-weights{format=int4_asym_g32}' | filecheck %s --check-prefix=G32
// RUN: qcc-opt %s --random-params=0 -p 'quantize-weights{format=int4_asym_g128}' | filecheck %s --check-prefix=G128
// RUN: qcc-opt %s --random-params=0 -p 'quantize-weights{format=int8_sym_channel},lower-qcc-to-linalg' | filecheck %s --check-prefix=LOWER

// A convolution's weight [O, I, kh, kw] is quantized as O rows of I * kh * kw columns of the
// format (here 8 rows of 36); the float weight leaves the signature and the convolution reads
// the codes decoded (qcc.dequantize) and viewed back to [O, I, kh, kw].  The convolution
// itself stays float (weight-only).

// CHECK-LABEL: func.func @conv
// CHECK-SAME: tensor<8x36xi8> {qcc.param = "conv.weight:int8_sym_channel:codes"}
// CHECK-SAME: tensor<8x1xf32> {qcc.param = "conv.weight:int8_sym_channel:scale"}
// CHECK-NOT: qcc.param = "conv.weight"}
// CHECK: %[[W:.*]] = "qcc.dequantize"(%{{.*}}, %{{.*}}) {format = #qcc.format<"int8_sym_channel">} : (tensor<8x36xi8>, tensor<8x1xf32>) -> tensor<8x36xf32>
// CHECK: %[[WT:.*]] = torch_c.from_builtin_tensor %[[W]] : tensor<8x36xf32> -> !torch.vtensor<[8,36],f32>
// CHECK: %[[W4:.*]] = torch.aten.view %[[WT]], %{{.*}} : !torch.vtensor<[8,36],f32>, !torch.list<int> -> !torch.vtensor<[8,4,3,3],f32>
// CHECK: torch.aten.convolution %{{.*}}, %[[W4]], %{{.*}}

// Groups of 32 or 128 do not tile @conv's 36 columns a row: its weight stays float (the
// driver's remark names it).  @conv32's rows are 8 * 2 * 2 = 32 columns: one group of 32.
// G32-LABEL: func.func @conv(
// G32: torch.aten.convolution %{{.*}}, %arg0,
// G32-LABEL: func.func @conv32(
// G32-SAME: tensor<8x16xi8> {qcc.param = "conv32.weight:int4_asym_g32:codes"}
// G32: "qcc.dequantize"(%{{.*}}, %{{.*}}, %{{.*}}) {format = #qcc.format<"int4_asym_g32">} : (tensor<8x16xi8>, tensor<8x1xf32>, tensor<8x1xi8>) -> tensor<8x32xf32>
// G32: torch.aten.view %{{.*}}, %{{.*}} : !torch.vtensor<[8,32],f32>, !torch.list<int> -> !torch.vtensor<[8,8,2,2],f32>
// G128-LABEL: func.func @conv(
// G128-NOT: qcc.dequantize
// G128: torch.aten.convolution %{{.*}}, %arg0,

// The reference lowering decodes the codes in one parallel generic.
// LOWER: call @qcc_dequantize_int8_sym_channel_8x36(
// LOWER: func.func private @qcc_dequantize_int8_sym_channel_8x36(%{{.*}}: tensor<8x36xi8>, %{{.*}}: tensor<8x1xf32>) -> tensor<8x36xf32>
// LOWER: linalg.generic
// LOWER: arith.sitofp %{{.*}} : i8 to f32
func.func @conv(%arg0: !torch.vtensor<[8,4,3,3],f32> {qcc.param = "conv.weight"}, %arg1: !torch.vtensor<[8],f32> {qcc.param = "conv.bias"}, %arg2: !torch.vtensor<[1,4,6,6],f32>) -> !torch.vtensor<[1,8,6,6],f32> {
  %int0 = torch.constant.int 0
  %false = torch.constant.bool false
  %int1 = torch.constant.int 1
  %0 = torch.prim.ListConstruct %int1, %int1 : (!torch.int, !torch.int) -> !torch.list<int>
  %1 = torch.prim.ListConstruct %int1, %int1 : (!torch.int, !torch.int) -> !torch.list<int>
  %2 = torch.prim.ListConstruct %int1, %int1 : (!torch.int, !torch.int) -> !torch.list<int>
  %3 = torch.prim.ListConstruct %int0, %int0 : (!torch.int, !torch.int) -> !torch.list<int>
  %4 = torch.aten.convolution %arg2, %arg0, %arg1, %0, %1, %2, %false, %3, %int1 : !torch.vtensor<[1,4,6,6],f32>, !torch.vtensor<[8,4,3,3],f32>, !torch.vtensor<[8],f32>, !torch.list<int>, !torch.list<int>, !torch.list<int>, !torch.bool, !torch.list<int>, !torch.int -> !torch.vtensor<[1,8,6,6],f32>
  return %4 : !torch.vtensor<[1,8,6,6],f32>
}

func.func @conv32(%arg0: !torch.vtensor<[8,8,2,2],f32> {qcc.param = "conv32.weight"}, %arg2: !torch.vtensor<[1,8,6,6],f32>) -> !torch.vtensor<[1,8,5,5],f32> {
  %none = torch.constant.none
  %int0 = torch.constant.int 0
  %false = torch.constant.bool false
  %int1 = torch.constant.int 1
  %0 = torch.prim.ListConstruct %int1, %int1 : (!torch.int, !torch.int) -> !torch.list<int>
  %1 = torch.prim.ListConstruct %int0, %int0 : (!torch.int, !torch.int) -> !torch.list<int>
  %4 = torch.aten.convolution %arg2, %arg0, %none, %0, %1, %0, %false, %1, %int1 : !torch.vtensor<[1,8,6,6],f32>, !torch.vtensor<[8,8,2,2],f32>, !torch.none, !torch.list<int>, !torch.list<int>, !torch.list<int>, !torch.bool, !torch.list<int>, !torch.int -> !torch.vtensor<[1,8,5,5],f32>
  return %4 : !torch.vtensor<[1,8,5,5],f32>
}
