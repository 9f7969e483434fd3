# RUN: %PYTHON %s | filecheck %s
# The frontend imports parameters as named function arguments, never as
# literals, and the recipe's pass turns the linear layer into qcc.qlinear.

import torch

from qcc.context import make_context
from qcc.frontend import export_module, import_program
from qcc.pipeline import Session, run_pipeline
from qcc import pipelines


def run(f):
    print(f"TEST: {f.__name__}")
    f()
    return f


class Linear(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(256, 32)

    def forward(self, x):
        return self.fc(x)


class XTimesW(torch.nn.Module):
    """GPT-2's Conv1D: x @ W + b with W [K, N]."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(256, 32))
        self.bias = torch.nn.Parameter(torch.randn(32))

    def forward(self, x):
        return torch.addmm(self.bias, x, self.weight)


def imported(stages, model=Linear):
    torch.manual_seed(0)
    prog = import_program(export_module(model(), (torch.randn(2, 256),)), make_context())
    run_pipeline(prog.module, stages, Session(prog.params), "test")
    print(prog.module)
    print("params:", sorted(prog.params.names()))


# CHECK-LABEL: TEST: import_linear
# CHECK: func.func @main(%[[W:.*]]: !torch.vtensor<[32,256],f32> {qcc.param = "fc.weight"}, %[[B:.*]]: !torch.vtensor<[32],f32> {qcc.param = "fc.bias"}, %[[X:.*]]: !torch.vtensor<[2,256],f32>)
# CHECK-NOT: torch.vtensor.literal
# CHECK: torch.aten.permute %[[W]]
# CHECK: torch.aten.mm %[[X]]
# CHECK: params: ['fc.bias', 'fc.weight']
@run
def import_linear():
    imported(pipelines.IMPORT)


# CHECK-LABEL: TEST: import_and_quantize
# CHECK: func.func @main(%{{.*}}: !torch.vtensor<[32],f32> {qcc.param = "fc.bias"}, %{{.*}}: !torch.vtensor<[2,256],f32>, %{{.*}}: tensor<32x256xi8> {qcc.param = "fc.weight:int8_sym_channel:codes"}, %{{.*}}: tensor<32x1xf32> {qcc.param = "fc.weight:int8_sym_channel:scale"})
# CHECK: "qcc.qlinear"
# CHECK-NOT: torch.aten.mm
# CHECK: params: ['fc.bias', 'fc.weight:int8_sym_channel:codes', 'fc.weight:int8_sym_channel:scale']
@run
def import_and_quantize():
    imported(pipelines.IMPORT + ["quantize-weights{format=int8_sym_channel}"])


# An `x @ W` weight [K, N] is stored transposed ([N, K], as nn.Linear's) and read through a
# permute, so it is a linear layer like any other and gets quantized.
# CHECK-LABEL: TEST: import_x_times_w
# CHECK: func.func @main(%[[W:.*]]: !torch.vtensor<[32,256],f32> {qcc.param = "weight"}, %{{.*}}: !torch.vtensor<[32],f32> {qcc.param = "bias"}, %[[X:.*]]: !torch.vtensor<[2,256],f32>)
# CHECK: %[[WT:.*]] = torch.aten.permute %[[W]], %{{.*}} -> !torch.vtensor<[256,32],f32>
# CHECK: torch.aten.mm %[[X]], %[[WT]]
# CHECK-LABEL: TEST: quantize_x_times_w
# CHECK: "qcc.qlinear"
# CHECK-NOT: torch.aten.mm
# CHECK: params: ['bias', 'weight:int8_sym_channel:codes', 'weight:int8_sym_channel:scale']
@run
def import_x_times_w():
    imported(pipelines.IMPORT, XTimesW)


@run
def quantize_x_times_w():
    imported(pipelines.IMPORT + ["quantize-weights{format=int8_sym_channel}"], XTimesW)
