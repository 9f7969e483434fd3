// RUN: qcc-opt %s --random-params=0 -p 'split-outliers{decide=dynamic}' | filecheck %s
// RUN: qcc-opt %s --random-params=0 -p 'split-outliers{decide=dynamic threshold=4.0},quantize-weights{format=int8_sym_channel},quantize-activations{format=int8_sym_token}' | filecheck %s --check-prefix=QUANT
// RUN: not qcc-opt %s --random-params=0 -p 'split-outliers{decide=sometimes}' 2>&1 | filecheck %s --check-prefix=BADMODE
// RUN: not qcc-opt %s --random-params=0 -p 'split-outliers{decide=dynamic stats=x.stats}' 2>&1 | filecheck %s --check-prefix=NOSTATS

// LLM.int8() as bitsandbytes runs it: the outlier columns are those whose
// absmax over this call's rows exceeds the threshold, decided at run time
// (no calibration).  x_out keeps them, x_in = x - x_out the rest; both
// matmuls read the one weight, and the outlier one is marked to keep its
// input float.
// CHECK-LABEL: func.func @linear
// CHECK-SAME: %[[W:[^:]*]]: !torch.vtensor<[64,256],f32> {qcc.param = "fc.weight"}
// CHECK-SAME: %[[X:[^:]*]]: !torch.vtensor<[4,256],f32>
// CHECK: %[[WT:.*]] = torch.aten.permute %[[W]]
// CHECK: %[[ABS:.*]] = torch.aten.abs %[[X]]
// CHECK: %[[MAX:.*]], %{{.*}} = torch.aten.max.dim %[[ABS]], %{{.*}}, %{{.*}} : !torch.vtensor<[4,256],f32>, !torch.int, !torch.bool -> !torch.vtensor<[256],f32>, !torch.vtensor<[256],si64>
// CHECK: %[[T:.*]] = torch.constant.float 6.000000e+00
// CHECK: %[[OUT:.*]] = torch.aten.gt.Scalar %[[MAX]], %[[T]]
// CHECK: %[[OUTF:.*]] = torch.aten.to.dtype %[[OUT]]
// CHECK: %[[XO:.*]] = torch.aten.mul.Tensor %[[X]], %[[OUTF]]
// CHECK: %[[XI:.*]] = torch.aten.sub.Tensor %[[X]], %[[XO]]
// CHECK: %[[YI:.*]] = torch.aten.mm %[[XI]], %[[WT]] : !torch.vtensor
// CHECK: %[[YO:.*]] = torch.aten.mm %[[XO]], %[[WT]] {qcc.float_activations}
// CHECK: %[[Y:.*]] = torch.aten.add.Tensor %[[YI]], %[[YO]]
// CHECK: return %[[Y]]

// Quantized once: both qlinears take the same int8 codes and scales; the
// inlier part quantizes its input per token, the outlier part keeps it float.
// QUANT-LABEL: func.func @linear
// QUANT-SAME: %[[CODES:[^:]*]]: tensor<64x256xi8> {qcc.param = "fc.weight:int8_sym_channel:codes"}
// QUANT-SAME: %[[SCALE:[^:]*]]: tensor<64x1xf32> {qcc.param = "fc.weight:int8_sym_channel:scale"})
// QUANT: torch.constant.float 4.000000e+00
// QUANT: "qcc.qlinear"(%{{.*}}, %[[CODES]], %[[SCALE]]) {act_format = #qcc.format<"int8_sym_token">, weight_format = #qcc.format<"int8_sym_channel">}
// QUANT: "qcc.qlinear"(%{{.*}}, %[[CODES]], %[[SCALE]]) {act_format = #qcc.format<"none">, qcc.float_activations, weight_format = #qcc.format<"int8_sym_channel">}

// BADMODE: error: split-outliers: decide must be 'calibration' or 'dynamic', got 'sometimes'
// NOSTATS: error: split-outliers: decide=dynamic chooses the outlier columns per call: it takes no stats=FILE
func.func @linear(%w: !torch.vtensor<[64,256],f32> {qcc.param = "fc.weight"}, %x: !torch.vtensor<[4,256],f32>) -> !torch.vtensor<[4,64],f32> {
  %int0 = torch.constant.int 0
  %int1 = torch.constant.int 1
  %perm = torch.prim.ListConstruct %int1, %int0 : (!torch.int, !torch.int) -> !torch.list<int>
  %wt = torch.aten.permute %w, %perm : !torch.vtensor<[64,256],f32>, !torch.list<int> -> !torch.vtensor<[256,64],f32>
  %y = torch.aten.mm %x, %wt : !torch.vtensor<[4,256],f32>, !torch.vtensor<[256,64],f32> -> !torch.vtensor<[4,64],f32>
  return %y : !torch.vtensor<[4,64],f32>
}
