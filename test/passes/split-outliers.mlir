// RUN: %PYTHON -c "import numpy as np; from safetensors.numpy import save_file; a = np.ones(256, np.float32); a[17] = 9.0; a[3] = 6.5; a[40] = 6.0; save_file({'fc.weight/absmax': a}, '%t.stats')"
// RUN: qcc-opt %s --random-params=0 -p 'split-outliers{stats=%t.stats}' --output-params=%t.params | filecheck %s
// RUN: %PYTHON -c "from safetensors.numpy import load_file; import numpy as np; p = load_file('%t.params'); print('masked:', np.flatnonzero(p['fc.weight:inlier_mask'] == 0).tolist(), 'zeroed:', np.flatnonzero(~p['fc.weight:inliers'].any(0)).tolist(), 'outliers_t:', p['fc.weight:outliers_t'].shape)" | filecheck %s --check-prefix=VALUES
// RUN: qcc-opt %s --random-params=0 -p 'split-outliers{stats=%t.stats threshold=10.0}' | filecheck %s --check-prefix=NONE
// RUN: not qcc-opt %s --random-params=0 -p split-outliers 2>&1 | filecheck %s --check-prefix=NOCAL
// RUN: not qcc-opt %s --random-params=0 -p 'split-outliers{threshold=-1.0}' 2>&1 | filecheck %s --check-prefix=BADTH

// LLM.int8(): input columns whose calibrated absmax exceeds the threshold
// (3 and 17 here; 40 sits exactly at it) leave the quantizable matmul.  The
// float part gathers them with a static index list and multiplies the
// gathered weight columns (a plain parameter, so quantize-weights leaves it
// alone); the quantizable part is x with those columns zeroed times W with
// those columns zeroed, still a transposed-parameter matmul.
// CHECK-LABEL: func.func @linear
// CHECK-SAME: %[[X:[^:]*]]: !torch.vtensor<[4,256],f32>
// CHECK-SAME: %[[WOT:[^:]*]]: !torch.vtensor<[2,64],f32> {qcc.param = "fc.weight:outliers_t"}
// CHECK-SAME: %[[MASK:[^:]*]]: !torch.vtensor<[256],f32> {qcc.param = "fc.weight:inlier_mask"}
// CHECK-SAME: %[[WIN:[^:]*]]: !torch.vtensor<[64,256],f32> {qcc.param = "fc.weight:inliers"}
// CHECK-NOT: qcc.param = "fc.weight"}
// CHECK: %[[IDX:.*]] = torch.vtensor.literal(dense<[3, 17]> : tensor<2xsi64>) : !torch.vtensor<[2],si64>
// CHECK: %[[XO:.*]] = torch.aten.index_select %[[X]], %{{.*}}, %[[IDX]] : !torch.vtensor<[4,256],f32>, !torch.int, !torch.vtensor<[2],si64> -> !torch.vtensor<[4,2],f32>
// CHECK: %[[YF:.*]] = torch.aten.mm %[[XO]], %[[WOT]] {qcc.float_weights} : !torch.vtensor<[4,2],f32>, !torch.vtensor<[2,64],f32> -> !torch.vtensor<[4,64],f32>
// CHECK: %[[XI:.*]] = torch.aten.mul.Tensor %[[X]], %[[MASK]]
// CHECK: %[[WT:.*]] = torch.aten.permute %[[WIN]]
// CHECK: %[[YI:.*]] = torch.aten.mm %[[XI]], %[[WT]]
// CHECK: %[[Y:.*]] = torch.aten.add.Tensor %[[YI]], %[[YF]]
// CHECK: return %[[Y]]
// VALUES: masked: [3, 17] zeroed: [3, 17] outliers_t: (2, 64)

// No column above the threshold: the linear is left as it is.
// NONE-LABEL: func.func @linear
// NONE-SAME: {qcc.param = "fc.weight"}
// NONE-NOT: index_select

// Outlier columns are chosen from calibration data (or a statistics file),
// never guessed.
// NOCAL: error: split-outliers: outlier columns are chosen from calibration data: this pass needs calibration data
// BADTH: error: split-outliers: threshold must be > 0, got -1.0
func.func @linear(%w: !torch.vtensor<[64,256],f32> {qcc.param = "fc.weight"}, %x: !torch.vtensor<[4,256],f32>) -> !torch.vtensor<[4,64],f32> {
  %int0 = torch.constant.int 0
  %int1 = torch.constant.int 1
  %perm = torch.prim.ListConstruct %int1, %int0 : (!torch.int, !torch.int) -> !torch.list<int>
  %wt = torch.aten.permute %w, %perm : !torch.vtensor<[64,256],f32>, !torch.list<int> -> !torch.vtensor<[256,64],f32>
  %y = torch.aten.mm %x, %wt : !torch.vtensor<[4,256],f32>, !torch.vtensor<[256,64],f32> -> !torch.vtensor<[4,64],f32>
  return %y : !torch.vtensor<[4,64],f32>
}
