// RUN: %PYTHON -c "import numpy as np; from safetensors.numpy import save_file; r = np.random.default_rng(0); x = r.standard_normal((64, 8)).astype(np.float32); x[:, 3] *= 30; h = np.abs(r.standard_normal((64, 16))).astype(np.float32); save_file({'q.weight/samples': x, 'q.weight/mean_abs': np.abs(x).mean(0), 'down.weight/samples': h, 'down.weight/mean_abs': np.abs(h).mean(0)}, '%t.stats')"
// RUN: qcc-opt %s --random-params=0 --output-params=%t.before
// RUN: qcc-opt %s --random-params=0 -p 'awq{format=int4_asym_g8 grid=10 stats=%t.stats}' --output-params=%t.after | filecheck %s
// RUN: %PYTHON -c "from safetensors.numpy import load_file as L; import numpy as np; b, a = L('%t.before'), L('%t.after'); s = a['q.weight'] / b['q.weight']; t = a['down.weight'] / b['down.weight']; print('largest s at channel', int(np.argmax(s[0]))); print('k same s:', np.allclose(a['k.weight'] / b['k.weight'], s[0])); print('norm g/s:', np.allclose(a['norm.weight'] * s[0], b['norm.weight'])); print('up rows / s:', np.allclose(a['up.weight'] * t[0][:, None], b['up.weight']))" | filecheck %s --check-prefix=VALUES
// RUN: not qcc-opt %s --random-params=0 -p 'awq{format=int4_asym_g128}' 2>&1 | filecheck %s --check-prefix=NOCAL
// RUN: not qcc-opt %s --random-params=0 -p 'awq{format=int4_asym_g128 stats=%t.stats}' 2>&1 | filecheck %s --check-prefix=GROUP

// AWQ searches s = mean|x|^a per group of linears sharing an input and, like
// SmoothQuant, changes weights only: readers' columns take s, the norm scale and
// the up projection's rows take 1/s.  The outlier channel 3 gets the largest s.
// CHECK-LABEL: func.func @main
// CHECK: torch.aten.mul.Tensor %arg0,
// CHECK-COUNT-5: torch.aten.mm
// VALUES: largest s at channel 3
// VALUES: k same s: True
// VALUES: norm g/s: True
// VALUES: up rows / s: True
// NOCAL: error: awq: this pass needs calibration data
// GROUP: error: awq: cannot quantize {{.*}} as int4_asym_g128: int4_asym_g128: K=8 is not divisible by group size G=128
func.func @main(%g: !torch.vtensor<[8],f32> {qcc.param = "norm.weight"}, %wq: !torch.vtensor<[8,8],f32> {qcc.param = "q.weight"},
                %wk: !torch.vtensor<[4,8],f32> {qcc.param = "k.weight"}, %wup: !torch.vtensor<[16,8],f32> {qcc.param = "up.weight"},
                %wgate: !torch.vtensor<[16,8],f32> {qcc.param = "gate.weight"}, %wdown: !torch.vtensor<[8,16],f32> {qcc.param = "down.weight"},
                %n: !torch.vtensor<[4,8],f32>) -> (!torch.vtensor<[4,8],f32>, !torch.vtensor<[4,4],f32>, !torch.vtensor<[4,8],f32>) {
  %int0 = torch.constant.int 0
  %int1 = torch.constant.int 1
  %t = torch.prim.ListConstruct %int1, %int0 : (!torch.int, !torch.int) -> !torch.list<int>
  %x = torch.aten.mul.Tensor %g, %n : !torch.vtensor<[8],f32>, !torch.vtensor<[4,8],f32> -> !torch.vtensor<[4,8],f32>
  %wqt = torch.aten.permute %wq, %t : !torch.vtensor<[8,8],f32>, !torch.list<int> -> !torch.vtensor<[8,8],f32>
  %q = torch.aten.mm %x, %wqt : !torch.vtensor<[4,8],f32>, !torch.vtensor<[8,8],f32> -> !torch.vtensor<[4,8],f32>
  %wkt = torch.aten.permute %wk, %t : !torch.vtensor<[4,8],f32>, !torch.list<int> -> !torch.vtensor<[8,4],f32>
  %k = torch.aten.mm %x, %wkt : !torch.vtensor<[4,8],f32>, !torch.vtensor<[8,4],f32> -> !torch.vtensor<[4,4],f32>
  %wgt = torch.aten.permute %wgate, %t : !torch.vtensor<[16,8],f32>, !torch.list<int> -> !torch.vtensor<[8,16],f32>
  %gt = torch.aten.mm %n, %wgt : !torch.vtensor<[4,8],f32>, !torch.vtensor<[8,16],f32> -> !torch.vtensor<[4,16],f32>
  %wut = torch.aten.permute %wup, %t : !torch.vtensor<[16,8],f32>, !torch.list<int> -> !torch.vtensor<[8,16],f32>
  %up = torch.aten.mm %n, %wut : !torch.vtensor<[4,8],f32>, !torch.vtensor<[8,16],f32> -> !torch.vtensor<[4,16],f32>
  %act = torch.aten.silu %gt : !torch.vtensor<[4,16],f32> -> !torch.vtensor<[4,16],f32>
  %h = torch.aten.mul.Tensor %act, %up : !torch.vtensor<[4,16],f32>, !torch.vtensor<[4,16],f32> -> !torch.vtensor<[4,16],f32>
  %wdt = torch.aten.permute %wdown, %t : !torch.vtensor<[8,16],f32>, !torch.list<int> -> !torch.vtensor<[16,8],f32>
  %d = torch.aten.mm %h, %wdt : !torch.vtensor<[4,16],f32>, !torch.vtensor<[16,8],f32> -> !torch.vtensor<[4,8],f32>
  return %q, %k, %d : !torch.vtensor<[4,8],f32>, !torch.vtensor<[4,4],f32>, !torch.vtensor<[4,8],f32>
}
