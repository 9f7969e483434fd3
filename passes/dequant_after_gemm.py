"""dequant-after-gemm: a qcc.qlinear with quantized activations becomes an integer GEMM.

    y = (xq * sx) @ ((wq - z) * sw)^T   ->   y = (xq @ (wq - z)^T) * sx * sw^T

x is quantized (qcc.quantize_dynamic: codes and per-token scales; or
qcc.quantize with the static per-tensor scale), qcc.matmul_int accumulates
i8 x i8 (int4 weights unpacked to i8) in i32, with the asymmetric zero point as
a row-sum correction, and qcc.scale_accumulate applies sx * sw once per
accumulator; group formats give per-group i32 partial sums scaled by the
group's weight scale and summed in f32.  This is the form integer dot products
(VNNI, IMMA tensor cores) compute (LLM.int8(), SmoothQuant, QServe).

A mixture of experts' product whose rows quantize-activations quantized,

    bmm(qcc.gather_dequantize(ids, codes, scale[, zero]), decode(xq, sx)[..., None]),

becomes the same chain with each row's expert: qcc.gather_matmul_int(xq, ids, codes[, zero])
(i32) and qcc.gather_scale_accumulate(acc, sx, ids, scale).
"""

import dataclasses

import numpy as np
from torch_mlir import ir

from qcc import irutil
from qcc.context import format_key
from qcc.dialects import formats
from qcc.dialects.formats import activation
from qcc.passes import PassError, QccPass, register


@register
class DequantAfterGemm(QccPass):
    name = "dequant-after-gemm"
    summary = "Rewrite activation-quantized qcc.qlinear into quantize -> integer matmul -> scale"

    @dataclasses.dataclass
    class Options:
        pass

    def run(self, module):
        for func in irutil.functions(module):
            for op in irutil.walk(func, "qcc.qlinear"):
                if format_key(op.attributes["act_format"]) != "none":
                    self._rewrite(op)
            for bmm in irutil.walk(func, "torch.aten.bmm"):
                chain = _expert_chain(bmm)
                if chain is not None:
                    self._rewrite_experts(bmm, *chain)

    def _rewrite(self, op):
        wfmt, afmt = _formats(op, op.attributes["weight_format"], op.attributes["act_format"])
        x, wq, ws = op.operands[0], op.operands[1], op.operands[2]
        wz = [op.operands[3]] if len(op.operands) > 3 else []
        m, k = irutil.tensor_shape(x)
        n = irutil.tensor_shape(op.result)[1]
        acc_shape = [m, n] + _accumulator_groups(op, wfmt, afmt, k)
        afmt_attr, wfmt_attr = op.attributes["act_format"], op.attributes["weight_format"]
        with ir.InsertionPoint(op), op.location:
            if afmt.dynamic:
                q = ir.Operation.create(
                    "qcc.quantize_dynamic",
                    results=[irutil.tensor_type([m, k], "i8"), irutil.tensor_type([m, 1], "f32")],
                    operands=[x], attributes={"format": afmt_attr})
                xq, sx = q.results[0], q.results[1]
            else:
                if "act_scale" not in op.attributes:
                    raise PassError(op, f"static activation format \"{afmt.key()}\" without an act_scale "
                                        f"attribute; run quantize-activations with calibration data")
                scale = ir.FloatAttr(op.attributes["act_scale"]).value
                if not (np.isfinite(scale) and scale > 0):
                    raise PassError(op, f"act_scale must be finite and > 0, got {scale}")
                sx = irutil.f32_splat([1, 1], scale)
                xq = ir.Operation.create(
                    "qcc.quantize", results=[irutil.tensor_type([m, k], "i8")],
                    operands=[x, sx], attributes={"format": afmt_attr}).result
            acc = ir.Operation.create(
                "qcc.matmul_int", results=[irutil.tensor_type(acc_shape, "i32")],
                operands=[xq, wq, *wz], attributes={"weight_format": wfmt_attr, "act_format": afmt_attr}).result
            y = ir.Operation.create(
                "qcc.scale_accumulate", results=[op.result.type], operands=[acc, sx, ws]).result
        op.result.replace_all_uses_with(y)
        op.erase()

    def _rewrite_experts(self, bmm, gather, quant, decoded):
        wfmt, afmt = _formats(bmm, gather.attributes["format"], quant.attributes["format"])
        ids, codes, wscale = gather.operands[0], gather.operands[1], gather.operands[2]
        wzero = [gather.operands[3]] if len(gather.operands) > 3 else []
        xq = quant.results[0]
        sx = quant.results[1] if quant.name == "qcc.quantize_dynamic" else quant.operands[1]
        t, k = irutil.tensor_shape(xq)
        n = irutil.tensor_shape(gather.result)[1]
        acc_shape = [t, n] + _accumulator_groups(bmm, wfmt, afmt, k)
        with ir.InsertionPoint(bmm), bmm.location:
            acc = ir.Operation.create(
                "qcc.gather_matmul_int", results=[irutil.tensor_type(acc_shape, "i32")],
                operands=[xq, ids, codes, *wzero],
                attributes={"weight_format": gather.attributes["format"], "act_format": quant.attributes["format"]}).result
            y = ir.Operation.create("qcc.gather_scale_accumulate", results=[irutil.tensor_type([t, n], "f32")],
                                    operands=[acc, sx, ids, wscale]).result
            yv = ir.Operation.create("torch_c.from_builtin_tensor", results=[irutil.vtensor_type([t, n])],
                                     operands=[y]).result
            y3 = ir.Operation.create("torch.aten.unsqueeze", results=[bmm.result.type],
                                     operands=[yv, irutil.const_int(-1)]).result
        weights = irutil.defining_op(bmm.operands[0])
        bmm.result.replace_all_uses_with(y3)
        bmm.erase()
        for op in (*decoded, weights, gather):  # what only the float product read
            if not any(list(r.uses) for r in op.results):
                op.erase()


def _formats(op, weight_attr, act_attr):
    try:
        return (formats.parse_weight_format(format_key(weight_attr)),
                activation.parse_act_format(format_key(act_attr)))
    except formats.FormatError as e:
        raise PassError(op, str(e))


def _accumulator_groups(op, wfmt, afmt, k: int) -> list[int]:
    """[K / G] for a group format's per-group partial sums, else []; an error where K is not whole
    groups or an i32 sum of the codes' products could overflow."""
    if wfmt.granularity == "group" and k % wfmt.group_size:
        raise PassError(op, f"K={k} is not a multiple of the group size of {wfmt.key()}")
    terms = wfmt.group_size if wfmt.granularity == "group" else k
    largest_w = (1 << wfmt.bits) - 1 if not wfmt.symmetric else (127 if wfmt.bits == 8 else 8)
    largest_x = 127 if afmt.bits == 8 else 8
    if terms * largest_w * largest_x > 2**31 - 1:
        raise PassError(op, f"an i32 accumulator of {terms} products of {afmt.key()} x {wfmt.key()} codes "
                            f"can overflow; use a group format (g128) for K={k}")
    return [k // wfmt.group_size] if wfmt.granularity == "group" else []


def _expert_chain(bmm):
    """(gather_dequantize, quantize op, decode ops) when `bmm` multiplies gathered experts' weights
    by rows quantize-activations quantized and decoded (`_quantize_rows`):
    bmm(from_builtin(gather), unsqueeze(mul(to.dtype(from_builtin(xq)), from_builtin(sx)), -1)).
    None otherwise."""
    weights = irutil.defining_op(bmm.operands[0])
    gather = weights and weights.name == "torch_c.from_builtin_tensor" and irutil.defining_op(weights.operands[0])
    if not gather or gather.name != "qcc.gather_dequantize":
        return None
    unsqueeze = irutil.defining_op(bmm.operands[1])
    mul = unsqueeze and unsqueeze.name == "torch.aten.unsqueeze" and irutil.defining_op(unsqueeze.operands[0])
    if not mul or mul.name != "torch.aten.mul.Tensor":
        return None
    wide, scale = irutil.defining_op(mul.operands[0]), irutil.defining_op(mul.operands[1])
    codes = wide and wide.name == "torch.aten.to.dtype" and irutil.defining_op(wide.operands[0])
    if not codes or codes.name != "torch_c.from_builtin_tensor" or scale is None \
            or scale.name != "torch_c.from_builtin_tensor":
        return None
    quant = irutil.defining_op(codes.operands[0])
    if quant is None or quant.name not in ("qcc.quantize_dynamic", "qcc.quantize") \
            or codes.operands[0] != quant.results[0]:
        return None
    sx = quant.results[1] if quant.name == "qcc.quantize_dynamic" else quant.operands[1]
    if scale.operands[0] != sx:
        return None
    return gather, quant, (unsqueeze, mul, wide, codes, scale)
