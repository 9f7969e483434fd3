"""gptq: quantize linear weights with Hessian-based error compensation instead of rounding.

GPTQ (Frantar et al. 2023, arXiv:2210.17323): columns of W are quantized one at a
time (largest diag(H) first with act-order) and each column's rounding error is
spread over the columns not yet quantized through the inverse Hessian
H = X^T X / rows of the layer's calibration inputs (damped by 1% of its mean
diagonal; lazy batch updates in blocks of 128).  Scales and zero points are the
format's round-to-nearest ones ("static groups"), so the codes land in exactly the
layout quantize-weights writes: this pass is quantize-weights with GPTQ's codes.
"""

import dataclasses
import re

import numpy as np

from qcc import irutil
from qcc.dialects import formats
from qcc.passes import PassError, register
from qcc.passes.quantize_weights import QuantizeWeights, linear_sites
from qcc.passes.smooth_channels import stats_or_error


def gptq_quantize(w, hessian, fmt, damp: float = 0.01, block: int = 128, act_order: bool = True):
    """GPTQ codes for w [N, K] under `fmt`, as a formats.QuantizedTensor (scales from RTN)."""
    w = np.asarray(w, np.float32)
    n, k = w.shape
    rtn = fmt.quantize(w)
    scale = rtn.scale
    zero = rtn.zero.astype(np.float32) if rtn.zero is not None else None
    qmin, qmax = fmt.storage_levels()
    rows = np.zeros(n, np.int64) if fmt.granularity == "tensor" else np.arange(n)

    h = np.array(hessian, np.float64, copy=True)
    wf = w.astype(np.float64)
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    wf[:, dead] = 0.0
    h[np.diag_indices(k)] += damp * np.mean(np.diag(h))
    perm = np.argsort(-np.diag(h), kind="stable") if act_order else np.arange(k)
    wf, h = wf[:, perm], h[np.ix_(perm, perm)]
    # upper Cholesky factor of H^-1: the GPTQ update rows
    hinv = np.linalg.cholesky(np.linalg.inv(h)).T
    codes = np.zeros((n, k), np.float32)
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        w1 = wf[:, i1:i2].copy()
        err1 = np.zeros_like(w1)
        for i in range(i2 - i1):
            col = perm[i1 + i]
            r, g = rows, (col // fmt.group_size if fmt.granularity == "group" else 0)
            s = scale[r, g]
            q = np.rint(w1[:, i].astype(np.float32) / s)
            if zero is not None:
                q = np.clip(q + zero[r, g], qmin, qmax)
                deq = (q - zero[r, g]) * s
            else:
                q = np.clip(q, qmin, qmax)
                deq = q * s
            codes[:, col] = q
            e = (w1[:, i] - deq) / hinv[i1 + i, i1 + i]
            w1[:, i:] -= np.outer(e, hinv[i1 + i, i1 + i:i2])
            err1[:, i] = e
        wf[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return formats.QuantizedTensor(codes=codes.astype(fmt.code_dtype), scale=scale, zero=rtn.zero,
                                   format=fmt, shape=(n, k))


class _Solved:
    """`fmt` whose quantize() returns a precomputed solution, for QuantizeWeights._rewrite to emit."""

    def __init__(self, fmt, solution):
        self._fmt, self._solution = fmt, solution

    def quantize(self, w):
        return self._solution

    def __getattr__(self, name):
        return getattr(self._fmt, name)


@register
class Gptq(QuantizeWeights):
    name = "gptq"
    summary = "GPTQ: quantize linear weights with Hessian-based error compensation (act-order, blocked)"

    @dataclasses.dataclass
    class Options:
        format: str = "int4_asym_g128"
        exclude: str = ""  # regex over parameter names left in float
        damp: float = 0.01
        block: int = 128
        act_order: bool = True
        stats: str = ""    # precomputed calibration statistics (calibration.save_stats)

    def run(self, module):
        try:
            self._fmt = formats.parse_weight_format(self.options.format)
        except formats.FormatError as e:
            raise PassError(None, str(e))
        if not self.options.damp > 0 or self.options.block < 1:
            raise PassError(None, f"damp must be > 0 and block >= 1, got damp={self.options.damp} "
                                  f"block={self.options.block}")
        exclude = re.compile(self.options.exclude) if self.options.exclude else None
        wanted = [irutil.Signature(f).param_name(i) for f in irutil.functions(module) for _, i in linear_sites(f)]
        if any(not (exclude and exclude.search(n)) for n in wanted):
            self._stats = stats_or_error(self.session, ("hessian",), self.options.stats)
        super().run(module)

    def _rewrite(self, func, sig, mm, w_name, fmt):
        if w_name not in self._stats or self._stats[w_name].hessian is None:
            raise PassError(mm, f"no calibration statistics (Hessian) for linear '{w_name}'")
        store = self.session.params
        if w_name not in store:
            raise PassError(mm, f"no value for parameter '{w_name}' in the parameter store")
        w = np.asarray(store[w_name], np.float32)
        hessian = self._stats[w_name].hessian
        if hessian.shape != (w.shape[1], w.shape[1]):
            raise PassError(mm, f"calibration statistics of '{w_name}' cover {hessian.shape[0]} input columns, "
                                f"its weight has K={w.shape[1]}")
        try:
            solution = gptq_quantize(w, hessian, fmt, self.options.damp,
                                     self.options.block, self.options.act_order)
        except formats.FormatError as e:
            raise PassError(mm, f"cannot quantize '{w_name}' {list(w.shape)} as {fmt.key()}: {e}")
        except np.linalg.LinAlgError as e:
            raise PassError(mm, f"GPTQ on '{w_name}': the damped Hessian is not positive definite ({e}); "
                                f"raise damp")
        super()._rewrite(func, sig, mm, w_name, _Solved(fmt, solution))
