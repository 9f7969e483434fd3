"""dequant-after-gemm: a qcc.qlinear with quantized activations becomes an integer GEMM.

    y = (xq * sx) @ ((wq - z) * sw)^T   ->   y = (xq @ (wq - z)^T) * sx * sw^T

x is quantized (qcc.quantize_dynamic: codes and per-token scales; or
qcc.quantize with the static per-tensor scale), qcc.matmul_int accumulates
i8 x i8 (int4 weights unpacked to i8) in i32, with the asymmetric zero point as
a row-sum correction, and qcc.scale_accumulate applies sx * sw once per
accumulator; group formats give per-group i32 partial sums scaled by the
group's weight scale and summed in f32.  This is the form integer dot products
(VNNI, IMMA tensor cores) compute (LLM.int8(), SmoothQuant, QServe).
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

    def _rewrite(self, op):
        try:
            wfmt = formats.parse_weight_format(format_key(op.attributes["weight_format"]))
            afmt = activation.parse_act_format(format_key(op.attributes["act_format"]))
        except formats.FormatError as e:
            raise PassError(op, str(e))
        x, wq, ws = op.operands[0], op.operands[1], op.operands[2]
        wz = [op.operands[3]] if len(op.operands) > 3 else []
        m, k = irutil.tensor_shape(x)
        n = irutil.tensor_shape(op.result)[1]
        if wfmt.granularity == "group" and k % wfmt.group_size:
            raise PassError(op, f"K={k} is not a multiple of the group size of {wfmt.key()}")
        acc_shape = [m, n, k // wfmt.group_size] if wfmt.granularity == "group" else [m, n]
        terms = wfmt.group_size if wfmt.granularity == "group" else k
        largest_w = (1 << wfmt.bits) - 1 if not wfmt.symmetric else (127 if wfmt.bits == 8 else 8)
        largest_x = 127 if afmt.bits == 8 else 8
        if terms * largest_w * largest_x > 2**31 - 1:
            raise PassError(op, f"an i32 accumulator of {terms} products of {afmt.key()} x {wfmt.key()} codes "
                                f"can overflow; use a group format (g128) for K={k}")
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
