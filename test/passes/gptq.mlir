// RUN: %PYTHON -c "import numpy as np; from safetensors.numpy import save_file; r = np.random.default_rng(0); x = r.standard_normal((512, 8)) @ r.standard_normal((8, 64)); save_file({'fc.weight/hessian': x.T @ x / 512}, '%t.stats')"
// RUN: qcc-opt %s --random-params=0 -p 'gptq{format=int4_asym_g32 stats=%t.stats}' --output-params=%t.gptq | filecheck %s
// RUN: qcc-opt %s --random-params=0 -p 'quantize-weights{format=int4_asym_g32}' --output-params=%t.rtn
// RUN: %PYTHON -c "from safetensors.numpy import load_file as L; import numpy as np; g, r = L('%t.gptq'), L('%t.rtn'); k = 'fc.weight:int4_asym_g32:'; print('names:', sorted(g) == sorted(r)); print('same scales and zeros:', all(np.array_equal(g[k + n], r[k + n]) for n in ('scale', 'zero'))); print('codes differ:', not np.array_equal(g[k + 'codes'], r[k + 'codes']))" | filecheck %s --check-prefix=VALUES
// RUN: not qcc-opt %s --random-params=0 -p 'gptq{format=int4_asym_g32}' 2>&1 | filecheck %s --check-prefix=NOCAL

// GPTQ emits exactly what quantize-weights does (same op, parameter names,
// scales and zero points, packed layout); only the codes differ, chosen with
// Hessian-based error compensation.
// CHECK-LABEL: func.func @linear
// CHECK-SAME: tensor<16x32xi8> {qcc.param = "fc.weight:int4_asym_g32:codes"}
// CHECK-SAME: tensor<16x2xf32> {qcc.param = "fc.weight:int4_asym_g32:scale"}
// CHECK-SAME: tensor<16x2xi8> {qcc.param = "fc.weight:int4_asym_g32:zero"}
// CHECK: "qcc.qlinear"(%{{.*}}, %{{.*}}, %{{.*}}, %{{.*}}) {act_format = #qcc.format<"none">, weight_format = #qcc.format<"int4_asym_g32">}
// CHECK-NOT: torch.aten.mm
// VALUES: names: True
// VALUES: same scales and zeros: True
// VALUES: codes differ: True
// NOCAL: error: gptq: this pass needs calibration data
func.func @linear(%w: !torch.vtensor<[16,64],f32> {qcc.param = "fc.weight"}, %x: !torch.vtensor<[4,64],f32>) -> !torch.vtensor<[4,16],f32> {
  %int0 = torch.constant.int 0
  %int1 = torch.constant.int 1
  %perm = torch.prim.ListConstruct %int1, %int0 : (!torch.int, !torch.int) -> !torch.list<int>
  %wt = torch.aten.permute %w, %perm : !torch.vtensor<[16,64],f32>, !torch.list<int> -> !torch.vtensor<[64,16],f32>
  %y = torch.aten.mm %x, %wt : !torch.vtensor<[4,64],f32>, !torch.vtensor<[64,16],f32> -> !torch.vtensor<[4,16],f32>
  return %y : !torch.vtensor<[4,16],f32>
}
