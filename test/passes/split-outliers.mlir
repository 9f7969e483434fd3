// RUN: not qcc-opt %s --random-params=0 -p split-outliers 2>&1 | filecheck %s
// RUN: not qcc-opt %s --random-params=0 -p 'split-outliers{threshold=-1.0}' 2>&1 | filecheck %s --check-prefix=BADTH
// RUN: qcc-opt %s --random-params=0 -p 'split-outliers{exclude=^fc}' | filecheck %s --check-prefix=EXCL

// Outlier columns are chosen from calibration data (qcc-opt has none): the
// pass says so instead of guessing.  The rewrite itself, with calibration, is
// checked in test/lit/split-outliers.py and test/python/test_act_quant.py.
// CHECK: error: split-outliers: outlier columns are chosen from calibration data: this pass needs calibration data
// BADTH: error: split-outliers: threshold must be > 0, got -1.0
// Excluded layers need no statistics.
// EXCL-LABEL: func.func @linear
// EXCL: torch.aten.mm %arg1, %{{.*}} : !torch.vtensor<[4,256],f32>, !torch.vtensor<[256,64],f32>
func.func @linear(%w: !torch.vtensor<[64,256],f32> {qcc.param = "fc.weight"}, %x: !torch.vtensor<[4,256],f32>) -> !torch.vtensor<[4,64],f32> {
  %int0 = torch.constant.int 0
  %int1 = torch.constant.int 1
  %perm = torch.prim.ListConstruct %int1, %int0 : (!torch.int, !torch.int) -> !torch.list<int>
  %wt = torch.aten.permute %w, %perm : !torch.vtensor<[64,256],f32>, !torch.list<int> -> !torch.vtensor<[256,64],f32>
  %y = torch.aten.mm %x, %wt : !torch.vtensor<[4,256],f32>, !torch.vtensor<[256,64],f32> -> !torch.vtensor<[4,64],f32>
  return %y : !torch.vtensor<[4,64],f32>
}
