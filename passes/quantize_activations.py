"""quantize-activations: choose how each qcc.qlinear quantizes its input activation.

Sets `act_format` on qcc.qlinear ops whose activations are still float: per
token (e.g. "int8_sym_token": scales computed at run time) or per tensor
("int8_sym_tensor": calibrated absmax of the layer's input / qmax, in the op's
f32 attribute `act_scale`; from calibration data or `stats=FILE`).  Numerics:
dialects/formats/activation.py; dequant-after-gemm makes the integer GEMM.
Layers are named by the weight quantize-weights saw ('fc1.weight',
'fc1.weight:inliers'); `exclude` is a regex over those names.
"""

import dataclasses
import re

import numpy as np
from torch_mlir import ir

from qcc import calibration, irutil
from qcc.context import format_attr, format_key
from qcc.dialects import formats
from qcc.dialects.formats import activation
from qcc.errors import QccError
from qcc.passes import PassError, QccPass, register
from qcc.passes.quantize_weights import FLOAT_ACTIVATIONS

_CODES_PARAM = re.compile(r"^(?P<weight>.*):(?P<format>int[48]_[a-z]+_[a-z0-9]+):codes$")


def qlinear_weight_name(func, op) -> str:
    """The float weight a qlinear was quantized from: 'fc1.weight' for 'fc1.weight:int8_sym_channel:codes'.

    Names derived by earlier passes keep their suffix ('fc1.weight:inliers' after split-outliers).
    """
    index = irutil.block_arg_number(op.operands[1])
    param = None if index is None else irutil.Signature(func).param_name(index)
    if param is None:
        raise PassError(op, "qcc.qlinear weight is not a named parameter; cannot name its layer")
    m = _CODES_PARAM.match(param)
    return m.group("weight") if m else param


def input_absmax(session, op, weight: str, stats_file: str = "") -> float:
    """max |x| of the input of the linear with weight `weight` over the calibration data.

    The statistics come from qcc.calibration (the float program as rewritten
    so far, e.g. outlier columns masked by split-outliers), or from the
    statistics file `stats_file`.
    """
    from qcc.passes.split_outliers import inlier_mask_name

    try:
        stats = calibration.session_stats(session, want=("absmax",), stats_file=stats_file)
    except QccError as e:
        raise PassError(op, f"static activation scales need calibration: {e.what}"
                            + (f" ({e.hint})" if e.hint else ""))
    if weight in stats:
        return float(stats[weight].tensor_absmax)
    parent, _, derived = weight.partition(":")
    mask = inlier_mask_name(parent)
    if derived == "inliers" and parent in stats and mask in session.params:  # a statistics file knows the parent
        return float(np.max(stats[parent].absmax[session.params[mask] > 0], initial=0.0))
    raise PassError(op, f"no calibration statistics for linear '{weight}': calibration did not reach it")


@register
class QuantizeActivations(QccPass):
    name = "quantize-activations"
    summary = "Set the activation format (dynamic per token, static per tensor) of qcc.qlinear ops"

    @dataclasses.dataclass
    class Options:
        format: str = "int8_sym_token"
        exclude: str = ""  # regex over float weight names whose activations stay float
        stats: str = ""  # precomputed calibration statistics (calibration.save_stats) for static formats

    def run(self, module):
        try:
            fmt = activation.parse_act_format(self.options.format)
        except formats.FormatError as e:
            raise PassError(None, str(e))
        if fmt is None:
            return
        try:
            exclude = re.compile(self.options.exclude) if self.options.exclude else None
        except re.error as e:
            raise PassError(None, f"bad exclude regex '{self.options.exclude}': {e}")
        for func in irutil.functions(module):
            for op in irutil.walk(func, "qcc.qlinear"):
                if format_key(op.attributes["act_format"]) != "none":
                    continue  # an earlier instance (a per-layer override) decided
                if FLOAT_ACTIVATIONS in op.attributes:
                    continue  # split-outliers' float part
                weight = qlinear_weight_name(func, op)
                if exclude and exclude.search(weight):
                    continue
                if not fmt.dynamic:
                    absmax = input_absmax(self.session, op, weight, self.options.stats)
                    scale = activation.static_scale(absmax, fmt)
                    with op.location:
                        op.attributes["act_scale"] = ir.FloatAttr.get(ir.F32Type.get(), float(scale[0, 0]))
                op.attributes["act_format"] = format_attr(fmt.key())
