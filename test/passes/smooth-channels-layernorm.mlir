// RUN: %PYTHON -c "import numpy as np; from safetensors.numpy import save_file; a = np.ones(8, np.float32); a[5] = 30.0; save_file({'fc.weight/absmax': a}, '%t.stats')"
// RUN: qcc-opt %s --random-params=0 --output-params=%t.before
// RUN: qcc-opt %s --random-params=0 -p 'smooth-channels{alpha=0.5 stats=%t.stats}' --output-params=%t.after | filecheck %s
// RUN: %PYTHON -c "from safetensors.numpy import load_file as L; import numpy as np; b, a = L('%t.before'), L('%t.after'); s = a['fc.weight'][0] / b['fc.weight'][0]; print('largest s at channel', int(np.argmax(s))); print('g/s:', np.allclose(a['ln.weight'] * s, b['ln.weight'])); print('b/s:', np.allclose(a['ln.bias'] * s, b['ln.bias'])); print('rows same s:', np.allclose(a['fc.weight'] / b['fc.weight'], s))" | filecheck %s --check-prefix=VALUES

// LayerNorm's affine part x = g * n + b (GPT-2, OPT, BLOOM: SmoothQuant's own models) takes
// 1/s in both g and b; the linear reading x takes s in its input columns.  The IR keeps its ops.
// CHECK-LABEL: func.func @main
// CHECK: torch.aten.mul.Tensor %{{.*}}, %arg0
// CHECK: torch.aten.add.Tensor %{{.*}}, %arg1
// CHECK: torch.aten.mm
// VALUES: largest s at channel 5
// VALUES: g/s: True
// VALUES: b/s: True
// VALUES: rows same s: True
func.func @main(%g: !torch.vtensor<[8],f32> {qcc.param = "ln.weight"}, %b: !torch.vtensor<[8],f32> {qcc.param = "ln.bias"},
                %w: !torch.vtensor<[4,8],f32> {qcc.param = "fc.weight"}, %n: !torch.vtensor<[3,8],f32>) -> !torch.vtensor<[3,4],f32> {
  %int0 = torch.constant.int 0
  %int1 = torch.constant.int 1
  %t = torch.prim.ListConstruct %int1, %int0 : (!torch.int, !torch.int) -> !torch.list<int>
  %scaled = torch.aten.mul.Tensor %n, %g : !torch.vtensor<[3,8],f32>, !torch.vtensor<[8],f32> -> !torch.vtensor<[3,8],f32>
  %x = torch.aten.add.Tensor %scaled, %b, %int1 : !torch.vtensor<[3,8],f32>, !torch.vtensor<[8],f32>, !torch.int -> !torch.vtensor<[3,8],f32>
  %wt = torch.aten.permute %w, %t : !torch.vtensor<[4,8],f32>, !torch.list<int> -> !torch.vtensor<[8,4],f32>
  %y = torch.aten.mm %x, %wt : !torch.vtensor<[3,8],f32>, !torch.vtensor<[8,4],f32> -> !torch.vtensor<[3,4],f32>
  return %y : !torch.vtensor<[3,4],f32>
}
