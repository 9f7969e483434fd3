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


def imported(stages):
    torch.manual_seed(0)
    prog = import_program(export_module(Linear(), (torch.randn(2, 256),)), make_context())
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
