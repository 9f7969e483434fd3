"""gptq: quantize linear weights with Hessian-based error compensation instead of rounding.

GPTQ (Frantar et al. 2023, arXiv:2210.17323): columns of W are quantized one at a
time (largest diag(H) first with act-order) and each column's rounding error is
spread over the columns not yet quantized through the inverse Hessian
H = X^T X / rows of the layer's calibration inputs (damped by 1% of its mean
diagonal; lazy batch updates in blocks of 128).  Scales and zero points are
quantize-weights' round-to-nearest ones ("static groups"; with `clip-search` its
clipped ones), so only the rounding step differs: the codes are emitted by
quantize-weights' emitter in exactly its layout.
"""

import dataclasses

import numpy as np

from qcc import calibration
from qcc.dialects import formats
from qcc.passes import PassError, QccPass, register
from qcc.passes.quantize_convs import rewrite_convs
from qcc.passes.quantize_experts import rewrite_experts
from qcc.passes.quantize_weights import parse_common, rewrite_linears, rtn_scales, search_clip, wanted_linears
from qcc.passes.smooth_channels import stats_or_error


def gptq_quantize(w, hessian, fmt, damp: float = 0.01, block: int = 128, act_order: bool = True,
                  clip_search: int = 0):
    """GPTQ codes for w [N, K] under `fmt`, as a formats.QuantizedTensor (scales from rtn_scales)."""
    w = np.asarray(w, np.float32)
    n, k = w.shape
    scale, zero_u8 = rtn_scales(w, fmt, clip_search)
    zero = zero_u8.astype(np.float32) if zero_u8 is not None else None

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
    return formats.QuantizedTensor(codes=codes.astype(fmt.code_dtype), scale=scale, zero=zero_u8,
                                   format=fmt, shape=(n, k))


@register
class Gptq(QccPass):
    name = "gptq"
    summary = "GPTQ: quantize linear weights with Hessian-based error compensation (act-order, blocked)"

    @dataclasses.dataclass
    class Options:
        format: str = "int4_asym_g128"
        exclude: str = ""     # regex over parameter names left in float
        damp: float = 0.01
        block: int = 128
        act_order: bool = True
        clip_search: int = 0  # scales from quantize-weights' clip search (0: the format's own)
        stats: str = ""       # precomputed calibration statistics (calibration.save_stats)

    def run(self, module):
        opts = self.options
        fmt, exclude = parse_common(opts)
        if not opts.damp > 0 or opts.block < 1:
            raise PassError(None, f"damp must be > 0 and block >= 1, got damp={opts.damp} block={opts.block}")
        if not wanted_linears(module, exclude):
            return
        stats = stats_or_error(self.session, ("hessian",), opts.stats)

        def solve(mm, w_name, w):
            if w_name not in stats or stats[w_name].hessian is None:
                raise PassError(mm, f"no calibration statistics (Hessian) for linear '{w_name}'")
            hessian = stats[w_name].hessian
            if hessian.shape != (w.shape[1], w.shape[1]):
                raise PassError(mm, f"calibration statistics of '{w_name}' cover {hessian.shape[0]} input "
                                    f"columns, its weight has K={w.shape[1]}")
            try:
                return gptq_quantize(w, hessian, fmt, opts.damp, opts.block, opts.act_order, opts.clip_search)
            except np.linalg.LinAlgError as e:
                raise PassError(mm, f"GPTQ on '{w_name}': the damped Hessian is not positive definite ({e}); "
                                    f"raise damp")

        def rtn(w):
            return search_clip(w, fmt, opts.clip_search) if opts.clip_search else fmt.quantize(w)

        unrouted = []

        def solve_experts(w_name, w):
            """Each expert by GPTQ on the Hessian of the calibration rows routed to it (the
            calibration's per-expert statistics); an expert no row chose, to nearest."""
            parts = []
            for e, we in enumerate(w):
                st = stats.get(calibration.expert_key(w_name, e))
                if st is None or st.hessian is None or not st.rows:
                    unrouted.append(f"{w_name}[{e}]")
                    parts.append(rtn(we))
                    continue
                try:
                    parts.append(gptq_quantize(we, st.hessian, fmt, opts.damp, opts.block, opts.act_order,
                                               opts.clip_search))
                except np.linalg.LinAlgError as err:
                    raise PassError(None, f"GPTQ on expert {e} of '{w_name}': the damped Hessian is not positive "
                                          f"definite ({err}); raise damp")
            zero = None if parts[0].zero is None else np.concatenate([p.zero for p in parts])
            return formats.QuantizedTensor(codes=np.concatenate([p.codes for p in parts]),
                                           scale=np.concatenate([p.scale for p in parts]), zero=zero, format=fmt,
                                           shape=(w.shape[0] * w.shape[1], w.shape[2]))

        rewrite_experts(self, module, fmt, exclude, solve_experts)
        if unrouted:
            self.session.remarks.append(f"{self.name}: experts no calibration row chose, rounded to nearest: "
                                        + ", ".join(unrouted))
        convs = rewrite_convs(self, module, fmt, exclude, rtn)
        if convs:
            self.session.remarks.append(f"{self.name}: convolution weights rounded to nearest (no Hessian of "
                                        "their input patches): " + ", ".join(convs))
        rewrite_linears(self, module, fmt, exclude, solve)
