"""split-outliers: LLM.int8() (Dettmers et al. 2022) mixed-precision decomposition.

Input columns whose absmax exceeds `threshold` (6.0) stay float, the rest goes
through the quantized matmul.  Runs before quantize-weights.  Two ways to
decide the columns:

* `decide=calibration` (default): from calibration data (or `stats=FILE`), once.
  `x @ W^T` becomes `(x * mask) @ W_in^T + x[:, outliers] @ W_out^T`; the
  selection is folded into the weights at compile time (W_in: W with those
  columns zeroed, so K stays intact as in bitsandbytes; W_out^T: the gathered
  columns, float), the float part's gather is a static index_select, and the
  zeroed columns cannot inflate the int8 part's per-token scales;
  quantize-weights then quantizes the `<weight>:inliers` linears.  A mixture of experts'
  products bmm(W[ids], x[..., None]) split alike, over the columns above the threshold in
  any expert's rows (`_split_experts`); the float parts carry FLOAT_WEIGHTS.
* `decide=dynamic`: per call, as bitsandbytes does, no calibration needed.
  `out = (max_m |x[m, k]| > threshold)` over the call's M rows, `x_out = x * out`,
  `x_in = x - x_out`, and `x_in @ W^T + x_out @ W^T`: both matmuls read the one
  weight W, so it is quantized once (its calibration statistics, e.g. GPTQ's
  Hessian, are those of the whole input x, which the two parts sum to); the
  outlier matmul carries the unit attribute `qcc.float_activations`, which
  quantize-activations honours, so float outlier columns meet the quantized
  weights as bitsandbytes meets them with its dequantized int8 weights.  On the
  CPU the float part runs on the integer part's int8 blocks as a rank-k update
  over the columns the call made outliers (cpu-select-int-kernels); elsewhere it
  is a full-K matmul over a mostly-zero input.
"""

import dataclasses
import re

import numpy as np
from torch_mlir import ir

from qcc import calibration, irutil
from qcc.errors import QccError
from qcc.passes import PassError, QccPass, register
from qcc.passes.quantize_experts import expert_gathers
from qcc.passes.quantize_weights import FLOAT_ACTIVATIONS, FLOAT_WEIGHTS, linear_sites


def inlier_mask_name(weight: str) -> str:
    return f"{weight}:inlier_mask"


def _const_float(value: float) -> ir.Value:
    return ir.Operation.create(
        "torch.constant.float", results=[ir.Type.parse("!torch.float")],
        attributes={"value": ir.FloatAttr.get(ir.F64Type.get(), value)}).result


def _op(name: str, result_type: ir.Type, *operands) -> ir.Value:
    return ir.Operation.create(name, results=[result_type], operands=list(operands)).result


@register
class SplitOutliers(QccPass):
    name = "split-outliers"
    summary = "LLM.int8(): float matmul over calibrated outlier input columns, the rest quantized"

    @dataclasses.dataclass
    class Options:
        threshold: float = 6.0
        decide: str = "calibration"  # or "dynamic": per call, from that call's rows
        exclude: str = ""  # regex over weight names left alone
        stats: str = ""  # precomputed calibration statistics (calibration.save_stats) instead of calibration data

    def run(self, module):
        if not self.options.threshold > 0:
            raise PassError(None, f"threshold must be > 0, got {self.options.threshold}")
        if self.options.decide not in ("calibration", "dynamic"):
            raise PassError(None, f"decide must be 'calibration' or 'dynamic', got '{self.options.decide}'")
        if self.options.decide == "dynamic" and self.options.stats:
            raise PassError(None, "decide=dynamic chooses the outlier columns per call: it takes no stats=FILE")
        try:
            exclude = re.compile(self.options.exclude) if self.options.exclude else None
        except re.error as e:
            raise PassError(None, f"bad exclude regex '{self.options.exclude}': {e}")
        for func in irutil.functions(module):
            sig = irutil.Signature(func)
            sites = [(mm, sig.param_name(i)) for mm, i in linear_sites(func)]
            sites = [(mm, w) for mm, w in sites if not (exclude and exclude.search(w))]
            experts = [(g, w) for g, w, _ in expert_gathers(func) if not (exclude and exclude.search(w))]
            if self.options.decide == "dynamic":
                for mm, w_name in sites:
                    self._split_dynamic(mm, w_name)
            elif sites or experts:
                stats = self._absmax((sites or experts)[0][0])
                for mm, w_name in sites:
                    if w_name not in stats:
                        raise PassError(mm, f"no calibration statistics for linear '{w_name}': "
                                            f"calibration did not reach it")
                    outliers = np.flatnonzero(stats[w_name].absmax > self.options.threshold)
                    if outliers.size:
                        self._split(sig, mm, w_name, outliers)
                for gather, w_name in experts:
                    self._split_experts(sig, gather, w_name, stats)
            for name in sig.erase_unused_params():
                if name in self.session.params:
                    del self.session.params[name]

    def _absmax(self, op):
        try:
            return calibration.session_stats(self.session, want=("absmax",), stats_file=self.options.stats)
        except QccError as e:
            raise PassError(op, f"outlier columns are chosen from calibration data: {e.what}"
                                  + (f" ({e.hint})" if e.hint else ""))

    def _split_dynamic(self, mm, w_name):
        x = mm.operands[0]
        (_, k), x_dtype = irutil.vtensor_shape(x.type)
        if x_dtype != "f32":
            raise PassError(mm, f"split-outliers expects f32 activations, got {x_dtype}")
        t = self.options.threshold
        self.session.remarks.append(f"split-outliers: {w_name}: input columns above {t} stay float, chosen per call")
        with ir.InsertionPoint(mm), mm.location:
            # the decomposed ops the import pipeline leaves (aten.amax -> aten.max.dim, .to -> aten.to.dtype)
            false, none = irutil.const_bool(False), irutil.const_none()
            colmax = ir.Operation.create(
                "torch.aten.max.dim", results=[irutil.vtensor_type([k], "f32"), irutil.vtensor_type([k], "si64")],
                operands=[_op("torch.aten.abs", x.type, x), irutil.const_int(0), false]).results[0]
            is_out = _op("torch.aten.gt.Scalar", irutil.vtensor_type([k], "i1"), colmax, _const_float(t))
            out = _op("torch.aten.to.dtype", irutil.vtensor_type([k], "f32"), is_out, irutil.const_int(6), false, false, none)  # 6: f32
            x_out = _op("torch.aten.mul.Tensor", x.type, x, out)
            one = irutil.const_int(1)
            x_in = _op("torch.aten.sub.Tensor", x.type, x, x_out, one)
            y_in = _op("torch.aten.mm", mm.result.type, x_in, mm.operands[1])
            y_out = _op("torch.aten.mm", mm.result.type, x_out, mm.operands[1])
            y_out.owner.attributes[FLOAT_ACTIVATIONS] = ir.UnitAttr.get()
            y = _op("torch.aten.add.Tensor", mm.result.type, y_in, y_out, one)
        mm.result.replace_all_uses_with(y)
        mm.erase()

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
            one = irutil.const_int(1)
            # float part: the outlier columns, gathered from x by a static index list
            idx = ir.Operation.create(
                "torch.vtensor.literal", results=[irutil.vtensor_type([outliers.size], "si64")],
                attributes={"value": ir.DenseElementsAttr.get(
                    outliers.astype(np.int64), signless=False)}).result
            x_out = ir.Operation.create(
                "torch.aten.index_select", results=[irutil.vtensor_type([m, outliers.size], "f32")],
                operands=[x, one, idx]).result
            store[f"{w_name}:outliers_t"] = np.ascontiguousarray(w[:, outliers].T)
            w_out_t = sig.add_param(f"{w_name}:outliers_t", irutil.vtensor_type([outliers.size, n], "f32"))
            y = ir.Operation.create("torch.aten.mm", results=[mm.result.type], operands=[x_out, w_out_t]).result
            y.owner.attributes[FLOAT_WEIGHTS] = ir.UnitAttr.get()
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
                mask_arg = sig.add_param(inlier_mask_name(w_name), irutil.vtensor_type([k], "f32"))
                w_in_arg = sig.add_param(f"{w_name}:inliers", irutil.vtensor_type([n, k], "f32"))
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

    def _split_experts(self, sig, gather, w_name, stats):
        """A mixture of experts' products bmm(W[ids], x [T, K, 1]): the outlier columns of any
        expert's calibration rows (calibration.expert_key) stay float for every expert,
        bmm(W[:, :, out][ids], x[:, out]) + bmm(W_in[ids], x * mask) with W_in = W with those
        columns zeroed, which quantize-weights quantizes as experts (the float part's gather is
        marked FLOAT_WEIGHTS) and whose rows quantize-activations quantizes."""
        found = [st.absmax for key, st in stats.items() if key.startswith(f"{w_name}#") and st.absmax is not None]
        if not found:
            raise PassError(gather, f"no calibration statistics for the experts' weight '{w_name}': "
                                    f"calibration did not reach it")
        outliers = np.flatnonzero(np.max(found, axis=0) > self.options.threshold)
        bmms = [use.owner for use in gather.result.uses]
        if not outliers.size or any(op.name != "torch.aten.bmm" or op.operands[0] != gather.result for op in bmms):
            return
        store = self.session.params
        w = np.asarray(store[w_name], np.float32)
        e, n, k = w.shape
        self.session.remarks.append(f"split-outliers: {w_name}: {outliers.size} of {k} input columns above "
                                    f"{self.options.threshold} stay float (all {e} experts)")
        mask = np.ones(k, np.float32)
        mask[outliers] = 0.0
        store[f"{w_name}:outliers"] = np.ascontiguousarray(w[:, :, outliers])
        store[f"{w_name}:inliers"] = w * mask
        store[inlier_mask_name(w_name)] = mask
        calibration.view(self.session).add_derived(f"{w_name}:inliers", w_name, np.flatnonzero(mask), width=k)
        w_out = sig.add_param(f"{w_name}:outliers", irutil.vtensor_type([e, n, outliers.size], "f32"))
        w_in = sig.add_param(f"{w_name}:inliers", irutil.vtensor_type([e, n, k], "f32"))
        mask_arg = sig.add_param(inlier_mask_name(w_name), irutil.vtensor_type([k], "f32"))
        ids_list = gather.operands[1]
        for bmm in bmms:
            x = bmm.operands[1]
            t = irutil.vtensor_shape(x.type)[0][0]
            with ir.InsertionPoint(bmm), bmm.location:
                one = irutil.const_int(1)
                idx = ir.Operation.create(
                    "torch.vtensor.literal", results=[irutil.vtensor_type([outliers.size], "si64")],
                    attributes={"value": ir.DenseElementsAttr.get(outliers.astype(np.int64), signless=False)}).result
                x_out = _op("torch.aten.index_select", irutil.vtensor_type([t, outliers.size, 1]), x, one, idx)
                g_out = ir.Operation.create(gather.name, results=[irutil.vtensor_type([t, n, outliers.size])],
                                            operands=[w_out, ids_list])
                g_out.attributes[FLOAT_WEIGHTS] = ir.UnitAttr.get()
                y_out = _op("torch.aten.bmm", bmm.result.type, g_out.result, x_out)
                column = _op("torch.aten.unsqueeze", irutil.vtensor_type([k, 1]), mask_arg, irutil.const_int(-1))
                x_in = _op("torch.aten.mul.Tensor", x.type, x, column)
                g_in = _op(gather.name, gather.result.type, w_in, ids_list)
                y_in = _op("torch.aten.bmm", bmm.result.type, g_in, x_in)
                y = _op("torch.aten.add.Tensor", bmm.result.type, y_in, y_out, one)
            bmm.result.replace_all_uses_with(y)
            bmm.erase()
        gather.erase()
