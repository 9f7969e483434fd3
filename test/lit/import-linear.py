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


class Conv(torch.nn.Module):
    """A 3 x 3 convolution, padding 1, stride 2: 16 -> 8 channels."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(16, 8, 3, padding=1, stride=2)

    def forward(self, x):
        return self.conv(x)


def imported_conv(stages):
    torch.manual_seed(0)
    prog = import_program(export_module(Conv(), (torch.randn(1, 16, 10, 10),)), make_context())
    run_pipeline(prog.module, stages, Session(prog.params), "test")
    print(prog.module)
    print("convs:", prog.convs)


# A 2-D convolution is a linear layer over its patches: x padded, channels last, the 9
# shifted strided windows concatenated along the channels ([1, 5, 5, 9 * 16]), then
# mm with the weight stored [8, 3 * 3 * 16] (kh, kw, C order) read through a permute.
# CHECK-LABEL: TEST: import_conv
# CHECK: func.func @main(%[[W:.*]]: !torch.vtensor<[8,144],f32> {qcc.param = "conv.weight"}, %{{.*}}: !torch.vtensor<[8],f32> {qcc.param = "conv.bias"}, %[[X:.*]]: !torch.vtensor<[1,16,10,10],f32>)
# CHECK-NOT: torch.aten.convolution
# CHECK: torch.aten.constant_pad_nd %[[X]]
# CHECK: torch.aten.permute
# CHECK: torch.aten.slice.Tensor %{{.*}}, %{{.*}}, %{{.*}}, %{{.*}}, %int2 : !torch.vtensor<[1,12,12,16],f32>, !torch.int, !torch.int, !torch.int, !torch.int -> !torch.vtensor<[1,5,12,16],f32>
# CHECK: torch.aten.cat %{{.*}} -> !torch.vtensor<[1,5,5,144],f32>
# CHECK: %[[WT:.*]] = torch.aten.permute %[[W]], %{{.*}} -> !torch.vtensor<[144,8],f32>
# CHECK: torch.aten.mm %{{.*}}, %[[WT]] : !torch.vtensor<[25,144],f32>, !torch.vtensor<[144,8],f32> -> !torch.vtensor<[25,8],f32>
# CHECK: convs: {'conv.weight': [8, 16, 3, 3]}
# CHECK-LABEL: TEST: quantize_conv
# CHECK: "qcc.qlinear"
# CHECK-NOT: torch.aten.convolution
@run
def import_conv():
    imported_conv(pipelines.IMPORT)


@run
def quantize_conv():
    imported_conv(pipelines.IMPORT + ["quantize-weights{format=int8_sym_channel}"])
