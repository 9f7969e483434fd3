"""quantize-activations: choose how each qcc.qlinear quantizes its input activation.

Sets `act_format` on qcc.qlinear ops whose activations are still float: per
token (e.g. "int8_sym_token": scales computed at run time) or per tensor
("int8_sym_tensor": calibrated absmax of the layer's input / qmax, in the op's
f32 attribute `act_scale`; from calibration data or `stats=FILE`).  Numerics:
dialects/formats/activation.py; dequant-after-gemm makes the integer GEMM.
Layers are named by the weight quantize-weights saw ('fc1.weight',
'fc1.weight:inliers'); `exclude` is a regex over those names.

A mixture of experts' products (`bmm(qcc.gather_dequantize(...), x[..., None])`, see
quantize_experts.py) have no qlinear: their rows x are quantized here (`qcc.quantize_dynamic`
per token; per tensor `qcc.quantize` by one scale from the calibrated absmax of all the
experts' rows, calibration.expert_key) and decoded back to f32 for the batched product: the
fake-quant form, which dequant-after-gemm makes an integer product.  With
`experts=false` (split-outliers{decide=dynamic}'s recipes: the per-call split does not reach
the experts) they keep float activations, said in a remark.
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
        experts: bool = True  # quantize the rows of the experts' products too

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
            self._experts(func, fmt, exclude)

    def _experts(self, func, fmt, exclude):
        """Quantizes the rows each gathered expert multiplies (see the module docstring)."""
        left, done = {}, []  # left: {why: [weight]}
        columns = {}  # (x, scale) -> its quantized column: rows two experts' weights multiply, quantized once
        for gather in list(irutil.walk(func, "qcc.gather_dequantize")):
            weight = qlinear_weight_name(func, gather)
            if exclude and exclude.search(weight):
                continue
            rows = _expert_rows(gather)
            why = ("split-outliers{decide=dynamic} does not split their products" if not self.options.experts else
                   "their weights are read other than as bmm(W[ids], x[..., None])" if rows is None else None)
            if why:
                left.setdefault(why, []).append(weight)
                continue
            scale = None if fmt.dynamic else activation.static_scale(self._experts_absmax(gather, weight), fmt)
            for bmm in rows:
                key = (bmm.operands[1], None if scale is None else float(np.asarray(scale).reshape(-1)[0]))
                if key not in columns:
                    columns[key] = _quantize_rows(bmm, fmt, scale)
                bmm.operands[1] = columns[key]
            done.append(weight)
        if done:
            self.session.remarks.append(
                f"{self.name}: the experts' rows are quantized ({fmt.key()}): " + ", ".join(sorted(set(done))))
        for why, weights in left.items():
            self.session.remarks.append(f"{self.name}: the experts' products take float activations ({why}): "
                                        + ", ".join(sorted(set(weights))))

    def _experts_absmax(self, op, weight: str) -> float:
        """max |x| over the calibration rows of every expert of `weight` (calibration.expert_key)."""
        try:
            stats = calibration.session_stats(self.session, want=("absmax",), stats_file=self.options.stats)
        except QccError as e:
            raise PassError(op, f"static activation scales need calibration: {e.what}"
                                + (f" ({e.hint})" if e.hint else ""))
        found = [float(st.tensor_absmax) for key, st in stats.items() if key.startswith(f"{weight}#")]
        if not found:
            raise PassError(op, f"no calibration statistics for the experts' weight '{weight}': calibration did not "
                                f"reach it")
        return max(found)


def _expert_rows(gather) -> list | None:
    """The torch.aten.bmm ops multiplying the gathered weights (through torch_c.from_builtin_tensor)
    by x[..., None]; None when anything else reads them."""
    bmms = []
    for use in gather.result.uses:
        back = use.owner
        if back.name != "torch_c.from_builtin_tensor":
            return None
        for u in back.result.uses:
            op = u.owner
            shape = irutil.vtensor_shape(op.operands[1].type)[0] if op.name == "torch.aten.bmm" else None
            if u.operand_number != 0 or shape is None or len(shape) != 3 or shape[2] != 1:
                return None
            bmms.append(op)
    return bmms


def _quantize_rows(bmm, fmt, scale=None) -> ir.Value:
    """decode(qcc.quantize_dynamic(x[T, K]))[..., None] for bmm(W, x[T, K, 1]), before the bmm; with a
    static per-tensor `scale` ([1, 1]), qcc.quantize by it."""
    x = bmm.operands[1]
    t, k, _ = irutil.vtensor_shape(x.type)[0]
    with ir.InsertionPoint(bmm), bmm.location:
        int_neg1 = irutil.const_int(-1)
        rows = ir.Operation.create("torch.aten.squeeze.dim", results=[irutil.vtensor_type([t, k])],
                                   operands=[x, int_neg1]).result
        builtin = ir.Operation.create("torch_c.to_builtin_tensor", results=[irutil.tensor_type([t, k], "f32")],
                                      operands=[rows]).result
        if scale is None:
            q = ir.Operation.create("qcc.quantize_dynamic",
                                    results=[irutil.tensor_type([t, k], "i8"), irutil.tensor_type([t, 1], "f32")],
                                    operands=[builtin], attributes={"format": format_attr(fmt.key())})
            q_codes, q_scale, s_rows = q.results[0], q.results[1], t
        else:
            q_scale = irutil.f32_splat([1, 1], np.asarray(scale).reshape(-1)[0])
            q_codes = ir.Operation.create("qcc.quantize", results=[irutil.tensor_type([t, k], "i8")],
                                          operands=[builtin, q_scale],
                                          attributes={"format": format_attr(fmt.key())}).result
            s_rows = 1
        codes = ir.Operation.create("torch_c.from_builtin_tensor", results=[irutil.vtensor_type([t, k], "si8")],
                                    operands=[q_codes]).result
        scale = ir.Operation.create("torch_c.from_builtin_tensor", results=[irutil.vtensor_type([s_rows, 1])],
                                    operands=[q_scale]).result
        none, false = irutil.const_none(), irutil.const_bool(False)
        wide = ir.Operation.create("torch.aten.to.dtype", results=[irutil.vtensor_type([t, k])],
                                   operands=[codes, irutil.const_int(6), false, false, none]).result  # 6: f32
        decoded = ir.Operation.create("torch.aten.mul.Tensor", results=[irutil.vtensor_type([t, k])],
                                      operands=[wide, scale]).result
        return ir.Operation.create("torch.aten.unsqueeze", results=[x.type], operands=[decoded, int_neg1]).result
