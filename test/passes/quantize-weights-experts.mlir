// RUN: qcc-opt %s --random-params=0 -p 'quantize-weights{format=int4_asym_g128}' | filecheck %s
// RUN: qcc-opt %s --random-params=0 -p 'quantize-weights{format=int4_asym_g128},lower-qcc-to-linalg' | filecheck %s --check-prefix=LOWER
// RUN: qcc-opt %s --random-params=0 -p 'quantize-weights{format=int8_sym_tensor}' | filecheck %s --check-prefix=TENSOR

// A mixture of experts' weights [E, N, K] gathered per token (transformers' batched_mm
// experts: index, then bmm): quantized as E * N rows of the format, stored [E, N, ...], and
// the gather reads and decodes only the tokens' experts.  The float weight leaves the
// signature; the batched matmul stays as it was.

// CHECK-LABEL: func.func @experts
// CHECK-SAME: %[[IDS:[^:]*]]: !torch.vtensor<[6],si64>
// CHECK-SAME: tensor<4x96x128xi8> {qcc.param = "experts.w:int4_asym_g128:codes"}
// CHECK-SAME: tensor<4x96x2xf32> {qcc.param = "experts.w:int4_asym_g128:scale"}
// CHECK-SAME: tensor<4x96x2xi8> {qcc.param = "experts.w:int4_asym_g128:zero"}
// CHECK-NOT: qcc.param = "experts.w"}
// CHECK: %[[IB:.*]] = torch_c.to_builtin_tensor %[[IDS]] : !torch.vtensor<[6],si64> -> tensor<6xi64>
// CHECK: %[[W:.*]] = "qcc.gather_dequantize"(%[[IB]], %{{.*}}, %{{.*}}, %{{.*}}) {format = #qcc.format<"int4_asym_g128">} : (tensor<6xi64>, tensor<4x96x128xi8>, tensor<4x96x2xf32>, tensor<4x96x2xi8>) -> tensor<6x96x256xf32>
// CHECK: %[[WT:.*]] = torch_c.from_builtin_tensor %[[W]]
// CHECK-NOT: torch.aten.index
// CHECK: torch.aten.bmm %[[WT]]

// LOWER: call @qcc_gather_dequantize_int4_asym_g128_4x96x128(
// LOWER: func.func private @qcc_gather_dequantize_int4_asym_g128_4x96x128(%{{.*}}: tensor<?xi64>
// LOWER: tensor.extract %{{.*}} : tensor<4x96x128xi8>

// A per-tensor format keeps the experts float (one scale for all experts is no format of theirs).
// TENSOR-LABEL: func.func @experts
// TENSOR: torch.aten.index.Tensor_hacked_twin
func.func @experts(%w: !torch.vtensor<[4,96,256],f32> {qcc.param = "experts.w"}, %x: !torch.vtensor<[6,256,1],f32>,
                   %ids: !torch.vtensor<[6],si64>) -> !torch.vtensor<[6,96,1],f32> {
  %list = torch.prim.ListConstruct %ids : (!torch.vtensor<[6],si64>) -> !torch.list<vtensor>
  %g = torch.aten.index.Tensor_hacked_twin %w, %list : !torch.vtensor<[4,96,256],f32>, !torch.list<vtensor> -> !torch.vtensor<[6,96,256],f32>
  %y = torch.aten.bmm %g, %x : !torch.vtensor<[6,96,256],f32>, !torch.vtensor<[6,256,1],f32> -> !torch.vtensor<[6,96,1],f32>
  return %y : !torch.vtensor<[6,96,1],f32>
}
