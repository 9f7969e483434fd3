"""split-outliers: LLM.int8() (Dettmers et al. 2022) mixed-precision decomposition.

`x @ W^T` becomes `(x * mask) @ W_in^T + x[:, outliers] @ W_out^T`: input columns
whose calibrated absmax exceeds `threshold` (6.0) stay float.  The selection is
folded into the weights at compile time (W_in: W with those columns zeroed, so
K stays intact as in bitsandbytes; W_out^T: the gathered columns), the float
part's gather is a static index_select, and the zeroed columns cannot inflate
the int8 part's per-token scales.  Outliers come from calibration data (or
`stats=FILE`), never from a run-time guess.  Runs before quantize-weights,
which then quantizes the `<weight>:inliers` linears.
"""

import dataclasses
import re

import numpy as np
from torch_mlir import ir

from qcc import calibration, irutil
from qcc.errors import QccError
from qcc.passes import PassError, QccPass, register
from qcc.passes.quantize_weights import linear_sites


def inlier_mask_name(weight: str) -> str:
    return f"{weight}:inlier_mask"


def _vtensor(shape, dtype: str) -> ir.Type:
    dims = ",".join("?" if d is None else str(d) for d in shape)
    return ir.Type.parse(f"!torch.vtensor<[{dims}],{dtype}>")


def _const_int(value: int) -> ir.Value:
    return ir.Operation.create(
        "torch.constant.int", results=[ir.Type.parse("!torch.int")],
        attributes={"value": ir.IntegerAttr.get(ir.IntegerType.get_signless(64), value)}).result


@register
class SplitOutliers(QccPass):
    name = "split-outliers"
    summary = "LLM.int8(): float matmul over calibrated outlier input columns, the rest quantized"

    @dataclasses.dataclass
    class Options:
        threshold: float = 6.0
        exclude: str = ""  # regex over weight names left alone
        stats: str = ""  # precomputed calibration statistics (calibration.save_stats) instead of calibration data

    def run(self, module):
        if not self.options.threshold > 0:
            raise PassError(None, f"threshold must be > 0, got {self.options.threshold}")
        try:
            exclude = re.compile(self.options.exclude) if self.options.exclude else None
        except re.error as e:
            raise PassError(None, f"bad exclude regex '{self.options.exclude}': {e}")
        for func in irutil.functions(module):
            sig = irutil.Signature(func)
            sites = [(mm, sig.param_name(i)) for mm, i in linear_sites(func)]
            sites = [(mm, w) for mm, w in sites if not (exclude and exclude.search(w))]
            if sites:
                stats = self._absmax(sites[0][0])
            for mm, w_name in sites:
                if w_name not in stats:
                    raise PassError(mm, f"no calibration statistics for linear '{w_name}': calibration did not reach it")
                outliers = np.flatnonzero(stats[w_name].absmax > self.options.threshold)
                if outliers.size:
                    self._split(sig, mm, w_name, outliers)
            for name in sig.erase_unused_params():
                if name in self.session.params:
                    del self.session.params[name]

    def _absmax(self, op):
        try:
            return calibration.session_stats(self.session, want=("absmax",), stats_file=self.options.stats)
        except QccError as e:
            raise PassError(op, f"outlier columns are chosen from calibration data: {e.what}"
                                  + (f" ({e.hint})" if e.hint else ""))

    def _split(self, sig, mm, w_name, outliers):
        store = self.session.params
        if w_name not in store:
            raise PassError(mm, f"no value for parameter '{w_name}' in the parameter store")
        w = np.asarray(store[w_name], np.float32)
        n, k = w.shape
        x = mm.operands[0]
        (m, kx), x_dtype = irutil.vtensor_shape(x.type)
        if x_dtype != "f32":
            raise PassError(mm, f"split-outliers expects f32 activations, got {x_dtype}")
        self.session.remarks.append(
            f"split-outliers: {w_name}: {outliers.size} of {k} input columns above {self.options.threshold} stay float")
        permute = irutil.defining_op(mm.operands[1])
        with ir.InsertionPoint(mm), mm.location:
            one = _const_int(1)
            # float part: the outlier columns, gathered from x by a static index list
            idx = ir.Operation.create(
                "torch.vtensor.literal", results=[_vtensor([outliers.size], "si64")],
                attributes={"value": ir.DenseElementsAttr.get(
                    outliers.astype(np.int64), signless=False)}).result
            x_out = ir.Operation.create(
                "torch.aten.index_select", results=[_vtensor([m, outliers.size], "f32")],
                operands=[x, one, idx]).result
            store[f"{w_name}:outliers_t"] = np.ascontiguousarray(w[:, outliers].T)
            w_out_t = sig.add_param(f"{w_name}:outliers_t", _vtensor([outliers.size, n], "f32"))
            y = ir.Operation.create("torch.aten.mm", results=[mm.result.type], operands=[x_out, w_out_t]).result
            if outliers.size < k:
                # quantized part: x and W with the outlier columns zeroed
                mask = np.ones(k, np.float32)
                mask[outliers] = 0.0
                w_in = w.copy()
                w_in[:, outliers] = 0.0
                store[inlier_mask_name(w_name)] = mask
                store[f"{w_name}:inliers"] = w_in
                # the quantized part's input (x masked, all K columns), for statistics gathered from here on
                calibration.view(self.session).add_derived(
                    f"{w_name}:inliers", w_name, np.flatnonzero(mask), width=k)
                mask_arg = sig.add_param(inlier_mask_name(w_name), _vtensor([k], "f32"))
                w_in_arg = sig.add_param(f"{w_name}:inliers", _vtensor([n, k], "f32"))
                x_in = ir.Operation.create("torch.aten.mul.Tensor", results=[x.type], operands=[x, mask_arg]).result
                w_in_t = ir.Operation.create("torch.aten.permute", results=[permute.result.type],
                                             operands=[w_in_arg, permute.operands[1]]).result
                y_int = ir.Operation.create("torch.aten.mm", results=[mm.result.type], operands=[x_in, w_in_t]).result
                y = ir.Operation.create("torch.aten.add.Tensor", results=[mm.result.type],
                                        operands=[y_int, y, one]).result
        mm.result.replace_all_uses_with(y)
        mm.erase()
        if not list(permute.result.uses):
            permute.erase()
