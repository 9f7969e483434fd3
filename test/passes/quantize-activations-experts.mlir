// RUN: qcc-opt %s --random-params=0 -p 'quantize-weights{format=int8_sym_channel},quantize-activations{format=int8_sym_token}' 2>&1 | filecheck %s
// RUN: qcc-opt %s --random-params=0 -p 'quantize-weights{format=int8_sym_channel},quantize-activations{format=int8_sym_token experts=false}' 2>&1 | filecheck %s --check-prefix=KEEP
// RUN: qcc-opt %s --random-params=0 -p 'quantize-weights{format=int8_sym_channel},quantize-activations{format=int8_sym_token exclude=experts}' 2>&1 | filecheck %s --check-prefix=EXCL
// RUN: %PYTHON -c "import numpy as np; from safetensors.numpy import save_file; a = np.ones(256, np.float32); b = a.copy(); b[7] = 12.7; save_file({'experts.w#0/absmax': a, 'experts.w#2/absmax': b}, '%t.stats')"
// RUN: qcc-opt %s --random-params=0 -p 'quantize-weights{format=int8_sym_channel},quantize-activations{format=int8_sym_tensor stats=%t.stats}' 2>&1 | filecheck %s --check-prefix=STATIC
// RUN: not qcc-opt %s --random-params=0 -p 'quantize-weights{format=int8_sym_channel},quantize-activations{format=int8_sym_tensor}' 2>&1 | filecheck %s --check-prefix=NOCAL

// A mixture of experts' product (bmm of the gathered, decoded weights and x[..., None]) has no
// qcc.qlinear: with a per-token format, quantize-activations quantizes its rows x[T, K] itself
// (qcc.quantize_dynamic: codes and per-row scales) and decodes them for the batched
// product (fake quantization, which dequant-after-gemm makes integer), a remark says so.  With
// experts=false (split-outliers{decide=dynamic}'s recipes) the rows stay float, said in a remark; `exclude`
// leaves them float silently, as it does linears. A per-tensor format takes one scale from the
// calibrated rows of all the experts.

// CHECK: qcc-opt: remark: quantize-activations: the experts' rows are quantized (int8_sym_token): experts.w
// CHECK-LABEL: func.func @experts
// CHECK: %[[W:.*]] = torch_c.from_builtin_tensor %{{.*}} : tensor<6x96x256xf32>
// CHECK: %[[ROWS:.*]] = torch.aten.squeeze.dim %arg{{.*}}, %{{.*}} : !torch.vtensor<[6,256,1],f32>, !torch.int -> !torch.vtensor<[6,256],f32>
// CHECK: %[[B:.*]] = torch_c.to_builtin_tensor %[[ROWS]]
// CHECK: %[[Q:.*]]:2 = "qcc.quantize_dynamic"(%[[B]]) {format = #qcc.format<"int8_sym_token">} : (tensor<6x256xf32>) -> (tensor<6x256xi8>, tensor<6x1xf32>)
// CHECK: %[[C:.*]] = torch_c.from_builtin_tensor %[[Q]]#0 : tensor<6x256xi8> -> !torch.vtensor<[6,256],si8>
// CHECK: %[[S:.*]] = torch_c.from_builtin_tensor %[[Q]]#1 : tensor<6x1xf32> -> !torch.vtensor<[6,1],f32>
// CHECK: %[[F:.*]] = torch.aten.to.dtype %[[C]]
// CHECK: %[[X:.*]] = torch.aten.mul.Tensor %[[F]], %[[S]]
// CHECK: %[[XC:.*]] = torch.aten.unsqueeze %[[X]], %{{.*}} : !torch.vtensor<[6,256],f32>, !torch.int -> !torch.vtensor<[6,256,1],f32>
// CHECK: torch.aten.bmm %[[W]], %[[XC]]

// KEEP: qcc-opt: remark: quantize-activations: the experts' products take float activations (split-outliers{decide=dynamic} does not split their products): experts.w
// KEEP-NOT: qcc.quantize_dynamic

// Per tensor: one scale for all the experts' rows, the largest calibrated |x| of any expert / 127.
// STATIC: qcc-opt: remark: quantize-activations: the experts' rows are quantized (int8_sym_tensor)
// STATIC: %[[S:.*]] = arith.constant dense<1.000000e-01> : tensor<1x1xf32>
// STATIC: "qcc.quantize"(%{{.*}}, %[[S]]) {format = #qcc.format<"int8_sym_tensor">} : (tensor<6x256xf32>, tensor<1x1xf32>) -> tensor<6x256xi8>
// NOCAL: error: quantize-activations: static activation scales need calibration

// EXCL-NOT: remark
// EXCL-NOT: qcc.quantize_dynamic

func.func @experts(%w: !torch.vtensor<[4,96,256],f32> {qcc.param = "experts.w"}, %x: !torch.vtensor<[6,256,1],f32>,
                   %ids: !torch.vtensor<[6],si64>) -> !torch.vtensor<[6,96,1],f32> {
  %list = torch.prim.ListConstruct %ids : (!torch.vtensor<[6],si64>) -> !torch.list<vtensor>
  %g = torch.aten.index.Tensor_hacked_twin %w, %list : !torch.vtensor<[4,96,256],f32>, !torch.list<vtensor> -> !torch.vtensor<[6,96,256],f32>
  %y = torch.aten.bmm %g, %x : !torch.vtensor<[6,96,256],f32>, !torch.vtensor<[6,256,1],f32> -> !torch.vtensor<[6,96,1],f32>
  return %y : !torch.vtensor<[6,96,1],f32>
}
