// RUN: %PYTHON -c "import numpy as np; from safetensors.numpy import save_file; a = np.ones(256, np.float32); a[7] = 12.7; b = np.ones(256, np.float32); b[200] = 9.0; save_file({'experts.w#0/absmax': a, 'experts.w#2/absmax': b}, '%t.stats')"
// RUN: qcc-opt %s --random-params=0 -p 'split-outliers{stats=%t.stats}' 2>&1 | filecheck %s
// RUN: qcc-opt %s --random-params=0 -p 'split-outliers{stats=%t.stats},quantize-weights{format=int8_sym_channel},quantize-activations{format=int8_sym_token}' 2>&1 | filecheck %s --check-prefix=QUANT

// LLM.int8() on a mixture of experts' product bmm(W[ids], x[..., None]): the input columns
// above the threshold in any expert's calibration rows (statistics keyed weight#expert: column 7
// of expert 0, column 200 of expert 2) stay float for every expert, bmm(W[:, :, outliers][ids],
// x[:, outliers]); the rest is bmm(W_in[ids], x * mask) with those columns of W zeroed.

// CHECK: qcc-opt: remark: split-outliers: experts.w: 2 of 256 input columns above 6.0 stay float (all 4 experts)
// CHECK-LABEL: func.func @experts
// CHECK-SAME: %[[X:arg0]]: !torch.vtensor<[6,256,1],f32>, %{{.*}}: !torch.vtensor<[6],si64>
// CHECK-SAME: %[[WOUT:arg[0-9]+]]: !torch.vtensor<[4,96,2],f32> {qcc.param = "experts.w:outliers"}
// CHECK-SAME: %[[WIN:arg[0-9]+]]: !torch.vtensor<[4,96,256],f32> {qcc.param = "experts.w:inliers"}
// CHECK-SAME: %[[MASK:arg[0-9]+]]: !torch.vtensor<[256],f32> {qcc.param = "experts.w:inlier_mask"}
// CHECK: %[[IDS:.*]] = torch.prim.ListConstruct
// CHECK: %[[COLS:.*]] = torch.vtensor.literal(dense<[7, 200]> : tensor<2xsi64>)
// CHECK: %[[XOUT:.*]] = torch.aten.index_select %[[X]], %{{.*}}, %[[COLS]] {{.*}} -> !torch.vtensor<[6,2,1],f32>
// CHECK: %[[GOUT:.*]] = torch.aten.index.Tensor_hacked_twin %[[WOUT]], %[[IDS]] {qcc.float_weights}
// CHECK: %[[YOUT:.*]] = torch.aten.bmm %[[GOUT]], %[[XOUT]]
// CHECK: %[[M:.*]] = torch.aten.unsqueeze %[[MASK]], %{{.*}} -> !torch.vtensor<[256,1],f32>
// CHECK: %[[XIN:.*]] = torch.aten.mul.Tensor %[[X]], %[[M]]
// CHECK: %[[GIN:.*]] = torch.aten.index.Tensor_hacked_twin %[[WIN]], %[[IDS]] :
// CHECK: %[[YIN:.*]] = torch.aten.bmm %[[GIN]], %[[XIN]]
// CHECK: %[[Y:.*]] = torch.aten.add.Tensor %[[YIN]], %[[YOUT]]
// CHECK: return %[[Y]]

// The float part's gather (qcc.float_weights) is left to the float product; the inliers are
// quantized as the experts' weights, their rows per token.
// QUANT: remark: quantize-activations: the experts' rows are quantized (int8_sym_token): experts.w:inliers
// QUANT: torch.aten.index.Tensor_hacked_twin %{{.*}} {qcc.float_weights} : !torch.vtensor<[4,96,2],f32>
// QUANT: "qcc.gather_dequantize"(%{{.*}}) {format = #qcc.format<"int8_sym_channel">} : (tensor<6xi64>, tensor<4x96x256xi8>, tensor<4x96x1xf32>)
// QUANT: "qcc.quantize_dynamic"

func.func @experts(%w: !torch.vtensor<[4,96,256],f32> {qcc.param = "experts.w"}, %x: !torch.vtensor<[6,256,1],f32>,
                   %ids: !torch.vtensor<[6],si64>) -> !torch.vtensor<[6,96,1],f32> {
  %list = torch.prim.ListConstruct %ids : (!torch.vtensor<[6],si64>) -> !torch.list<vtensor>
  %g = torch.aten.index.Tensor_hacked_twin %w, %list : !torch.vtensor<[4,96,256],f32>, !torch.list<vtensor> -> !torch.vtensor<[6,96,256],f32>
  %y = torch.aten.bmm %g, %x : !torch.vtensor<[6,96,256],f32>, !torch.vtensor<[6,256,1],f32> -> !torch.vtensor<[6,96,1],f32>
  return %y : !torch.vtensor<[6,96,1],f32>
}
