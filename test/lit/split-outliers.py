# RUN: %PYTHON %s | filecheck %s
# split-outliers with calibration data: columns 3 and 17 of the input exceed
# the threshold, so the linear becomes an int8-bound part over x with those
# columns zeroed plus a float part over a static gather of them.

import numpy as np
import torch

from qcc import pipelines
from qcc.context import make_context
from qcc.frontend import export_module, import_program
from qcc.pipeline import Session, run_pipeline


def run(f):
    print(f"TEST: {f.__name__}")
    f()
    return f


class Linear(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(64, 8, bias=False)

    def forward(self, x):
        return self.fc(x)


def calibration_inputs():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 64, generator=g).clamp(-2, 2)
    x[:, 3] = 10.0
    x[1, 17] = -7.0
    return [(x,)]


def compiled(stages):
    torch.manual_seed(0)
    model = Linear().eval()
    calib = calibration_inputs()
    ep = export_module(model, calib[0])
    prog = import_program(ep, make_context())
    session = Session(prog.params, {"exported_program": ep, "calibration": calib})
    run_pipeline(prog.module, pipelines.IMPORT + stages, session, "test")
    print(prog.module)
    print("params:", sorted(prog.params.names()))
    mask = prog.params["fc.weight:inlier_mask"]
    print("masked columns:", np.flatnonzero(mask == 0).tolist())
    w = model.fc.weight.detach().numpy()
    print("outlier weight columns equal:", np.array_equal(prog.params["fc.weight:outliers_t"], w[:, [3, 17]].T))
    print("remarks:", session.remarks)


# CHECK-LABEL: TEST: split
# CHECK: func.func @main(%[[X:.*]]: !torch.vtensor<[4,64],f32>, %[[WOT:.*]]: !torch.vtensor<[2,8],f32> {qcc.param = "fc.weight:outliers_t"}, %[[MASK:.*]]: !torch.vtensor<[64],f32> {qcc.param = "fc.weight:inlier_mask"}, %[[WIN:.*]]: !torch.vtensor<[8,64],f32> {qcc.param = "fc.weight:inliers"})
# CHECK: %[[IDX:.*]] = torch.vtensor.literal(dense<[3, 17]> : tensor<2xsi64>) : !torch.vtensor<[2],si64>
# CHECK: %[[XO:.*]] = torch.aten.index_select %[[X]], %[[ONE:.*]], %[[IDX]] : !torch.vtensor<[4,64],f32>, !torch.int, !torch.vtensor<[2],si64> -> !torch.vtensor<[4,2],f32>
# CHECK: %[[YF:.*]] = torch.aten.mm %[[XO]], %[[WOT]] : !torch.vtensor<[4,2],f32>, !torch.vtensor<[2,8],f32> -> !torch.vtensor<[4,8],f32>
# CHECK: %[[XI:.*]] = torch.aten.mul.Tensor %[[X]], %[[MASK]]
# CHECK: %[[WT:.*]] = torch.aten.permute %[[WIN]]
# CHECK: %[[YI:.*]] = torch.aten.mm %[[XI]], %[[WT]]
# CHECK: torch.aten.add.Tensor %[[YI]], %[[YF]], %[[ONE]]
# CHECK: params: ['fc.weight:inlier_mask', 'fc.weight:inliers', 'fc.weight:outliers_t']
# CHECK: masked columns: [3, 17]
# CHECK: outlier weight columns equal: True
# CHECK: remarks: ['split-outliers: fc.weight: 2 of 64 input columns above 6.0 stay float']
@run
def split():
    compiled(["split-outliers"])


# Then quantize-weights quantizes only the masked weight (the float part is not
# a transposed-parameter matmul), and the activations of that part are int8.
# CHECK-LABEL: TEST: split_then_w8a8
# CHECK: torch.aten.index_select
# CHECK: torch.aten.mm %{{.*}}, %{{.*}} : !torch.vtensor<[4,2],f32>, !torch.vtensor<[2,8],f32>
# CHECK: "qcc.qlinear"(%{{.*}}, %{{.*}}, %{{.*}}) {act_format = #qcc.format<"int8_sym_token">, weight_format = #qcc.format<"int8_sym_channel">}
# CHECK: params: ['fc.weight:inlier_mask', 'fc.weight:inliers:int8_sym_channel:codes', 'fc.weight:inliers:int8_sym_channel:scale', 'fc.weight:outliers_t']
@run
def split_then_w8a8():
    compiled(["split-outliers", "quantize-weights{format=int8_sym_channel}", "quantize-activations{format=int8_sym_token}"])
