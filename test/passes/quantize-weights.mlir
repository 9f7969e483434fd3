// RUN: qcc-opt %s --random-params=0 -p 'quantize-weights{format=int4_asym_g128}' | filecheck %s
// RUN: qcc-opt %s --random-params=0 -p 'quantize-weights{format=int8_sym_channel}' | filecheck %s --check-prefix=INT8
// RUN: qcc-opt %s --random-params=0 -p 'quantize-weights{format=int4_asym_g128 exclude=^head}' | filecheck %s --check-prefix=EXCL
// RUN: qcc-opt %s --random-params=0 --output-params=%t.float
// RUN: qcc-opt %s --random-params=0 -p 'quantize-weights{format=int4_sym_channel}' --output-params=%t.rtn
// RUN: qcc-opt %s --random-params=0 -p 'quantize-weights{format=int4_sym_channel clip-search=10}' --output-params=%t.clip | filecheck %s --check-prefix=CLIP
// RUN: %PYTHON -c "from safetensors.numpy import load_file as L; import numpy as np; from qcc.dialects import formats as F; f = F.get_format('int4_sym_channel'); w = L('%t.float')['fc.weight']; r, c = L('%t.rtn'), L('%t.clip'); k = 'fc.weight:int4_sym_channel:'; err = lambda p: ((F.dequantize(F.QuantizedTensor(F.unpack(p[k + 'codes'], f, w.shape), p[k + 'scale'], None, f, w.shape)) - w) ** 2).sum(1); print('names:', sorted(r) == sorted(c)); print('scales clipped:', bool(np.all(c[k + 'scale'] <= r[k + 'scale']) and np.any(c[k + 'scale'] < r[k + 'scale']))); print('error per row not above rtn:', bool(np.all(err(c) <= err(r) * (1 + 1e-6)) and err(c).sum() < err(r).sum()))" | filecheck %s --check-prefix=CLIPVAL

// A linear layer (torch.export's mm of a transposed parameter) becomes one
// qcc.qlinear on builtin tensors; the float weight leaves the signature and
// the packed codes, scales and zero points arrive as named parameters.

// CHECK-LABEL: func.func @linear
// CHECK-SAME: %[[X:.*]]: !torch.vtensor<[4,256],f32>
// CHECK-SAME: tensor<64x128xi8> {qcc.param = "fc.weight:int4_asym_g128:codes"}
// CHECK-SAME: tensor<64x2xf32> {qcc.param = "fc.weight:int4_asym_g128:scale"}
// CHECK-SAME: tensor<64x2xi8> {qcc.param = "fc.weight:int4_asym_g128:zero"}
// CHECK-NOT: qcc.param = "fc.weight"}
// CHECK: %[[XB:.*]] = torch_c.to_builtin_tensor %[[X]]
// CHECK: %[[Y:.*]] = "qcc.qlinear"(%[[XB]], %{{.*}}, %{{.*}}, %{{.*}}) {act_format = #qcc.format<"none">, weight_format = #qcc.format<"int4_asym_g128">} : (tensor<4x256xf32>, tensor<64x128xi8>, tensor<64x2xf32>, tensor<64x2xi8>) -> tensor<4x64xf32>
// CHECK: torch_c.from_builtin_tensor %[[Y]] : tensor<4x64xf32> -> !torch.vtensor<[4,64],f32>
// CHECK-NOT: torch.aten.mm

// clip-search: same op and layout, per-channel scales chosen by an MSE search over clipping ratios.
// CLIP-LABEL: func.func @linear
// CLIP-SAME: tensor<64x128xi8> {qcc.param = "fc.weight:int4_sym_channel:codes"}
// CLIP-SAME: tensor<64x1xf32> {qcc.param = "fc.weight:int4_sym_channel:scale"}
// CLIP: "qcc.qlinear"(%{{.*}}, %{{.*}}, %{{.*}}) {act_format = #qcc.format<"none">, weight_format = #qcc.format<"int4_sym_channel">}
// CLIPVAL: names: True
// CLIPVAL: scales clipped: True
// CLIPVAL: error per row not above rtn: True

// INT8-LABEL: func.func @linear
// INT8-SAME: tensor<64x256xi8> {qcc.param = "fc.weight:int8_sym_channel:codes"}
// INT8-SAME: tensor<64x1xf32> {qcc.param = "fc.weight:int8_sym_channel:scale"}
// INT8-NOT: :zero"
// INT8: "qcc.qlinear"(%{{.*}}, %{{.*}}, %{{.*}}) {act_format = #qcc.format<"none">, weight_format = #qcc.format<"int8_sym_channel">}
func.func @linear(%w: !torch.vtensor<[64,256],f32> {qcc.param = "fc.weight"}, %x: !torch.vtensor<[4,256],f32>) -> !torch.vtensor<[4,64],f32> {
  %int0 = torch.constant.int 0
  %int1 = torch.constant.int 1
  %perm = torch.prim.ListConstruct %int1, %int0 : (!torch.int, !torch.int) -> !torch.list<int>
  %wt = torch.aten.permute %w, %perm : !torch.vtensor<[64,256],f32>, !torch.list<int> -> !torch.vtensor<[256,64],f32>
  %y = torch.aten.mm %x, %wt : !torch.vtensor<[4,256],f32>, !torch.vtensor<[256,64],f32> -> !torch.vtensor<[4,64],f32>
  return %y : !torch.vtensor<[4,64],f32>
}

// A weight that is also read elsewhere (here: a tied head) stays as a float
// parameter next to its quantized copy; a matmul with a non-parameter operand
// is left alone; `exclude` keeps matching weights in float.

// CHECK-LABEL: func.func @shared_and_activation_matmul
// CHECK-SAME: {qcc.param = "head.weight"}
// CHECK-SAME: {qcc.param = "head.weight:int4_asym_g128:codes"}
// CHECK: "qcc.qlinear"
// CHECK: torch.aten.mm %{{.*}}, %{{.*}} : !torch.vtensor<[4,256],f32>, !torch.vtensor<[256,4],f32>
// EXCL-LABEL: func.func @shared_and_activation_matmul
// EXCL-NOT: qcc.qlinear
func.func @shared_and_activation_matmul(%w: !torch.vtensor<[64,256],f32> {qcc.param = "head.weight"}, %x: !torch.vtensor<[4,256],f32>) -> (!torch.vtensor<[4,64],f32>, !torch.vtensor<[64,256],f32>, !torch.vtensor<[4,4],f32>) {
  %int0 = torch.constant.int 0
  %int1 = torch.constant.int 1
  %perm = torch.prim.ListConstruct %int1, %int0 : (!torch.int, !torch.int) -> !torch.list<int>
  %wt = torch.aten.permute %w, %perm : !torch.vtensor<[64,256],f32>, !torch.list<int> -> !torch.vtensor<[256,64],f32>
  %y = torch.aten.mm %x, %wt : !torch.vtensor<[4,256],f32>, !torch.vtensor<[256,64],f32> -> !torch.vtensor<[4,64],f32>
  %xt = torch.aten.permute %x, %perm : !torch.vtensor<[4,256],f32>, !torch.list<int> -> !torch.vtensor<[256,4],f32>
  %g = torch.aten.mm %x, %xt : !torch.vtensor<[4,256],f32>, !torch.vtensor<[256,4],f32> -> !torch.vtensor<[4,4],f32>
  return %y, %w, %g : !torch.vtensor<[4,64],f32>, !torch.vtensor<[64,256],f32>, !torch.vtensor<[4,4],f32>
}
