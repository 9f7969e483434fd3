"""awq: activation-aware per-channel weight scaling, searched on calibration samples.

AWQ (Lin et al. 2024, arXiv:2306.00978): for the linear layers reading one input x,
s = mean|x|^a (normalized to geometric mean 1) with a on a grid over [0, 1] is chosen
to minimize sum ||x W^T - (x / s) Q(W diag(s))^T||^2 over calibration rows, Q being
round-to-nearest in the target weight format (its numpy reference).  W diag(s) is
kept for quantize-weights and 1/s is folded into x's producer (RMSNorm scale, or the
rows of the linear feeding an elementwise product), so the float function is unchanged.
a = 0 (s = 1, plain rounding) is on the grid: never worse than RTN on those rows.
"""

import dataclasses

import numpy as np

from qcc import irutil
from qcc.dialects import formats
from qcc.passes import PassError, QccPass, register
from qcc.passes.fuse_rotation import WeightEdits, weight_name
from qcc.passes.smooth_channels import commit_edits, fold_scales, group_stats, scale_groups, stats_or_error


def search_scales(x, weights, fmt, grid: int, mean_abs=None):
    """(best s, best loss, loss at s = 1) for weights [N_i, K] read by samples x [S, K]."""
    x = np.asarray(x, np.float64)
    mean_abs = np.abs(x).mean(0) if mean_abs is None else np.asarray(mean_abs, np.float64)
    refs = [x @ w.T.astype(np.float64) for w in weights]
    best = None
    base = None
    for a in np.linspace(0.0, 1.0, grid + 1):
        s = np.maximum(mean_abs, 1e-8) ** a
        s = np.clip(s / np.sqrt(s.max() * s.min()), 1e-4, None)
        loss = 0.0
        for w, ref in zip(weights, refs):
            wq = formats.fake_quant((w * s[None, :]).astype(np.float32), fmt).astype(np.float64)
            loss += float(((x / s) @ wq.T - ref).__pow__(2).sum())
        if a == 0.0:
            base = loss
        if best is None or loss < best[1]:
            best = (s, loss)
    return best[0], best[1], base


@register
class Awq(QccPass):
    name = "awq"
    summary = "AWQ: per-channel weight scales searched on calibration data, folded into the producer"

    @dataclasses.dataclass
    class Options:
        format: str = "int4_asym_g128"  # the weight format quantize-weights will use
        grid: int = 20
        samples: int = 256              # calibration rows the search runs on
        stats: str = ""                 # precomputed calibration statistics (calibration.save_stats)

    def run(self, module):
        try:
            fmt = formats.parse_weight_format(self.options.format)
        except formats.FormatError as e:
            raise PassError(None, str(e))
        if self.options.grid < 1:
            raise PassError(None, f"grid must be >= 1, got {self.options.grid}")
        store = self.session.params
        for func in irutil.functions(module):
            groups, others = scale_groups(func)
            if others:
                self.session.remarks.append(
                    f"{self.name}: left {len(others)} linear layer(s) unscaled (no producer to fold 1/s into): "
                    + ", ".join(weight_name(func, mm) for mm in others))
            if not groups:
                continue
            stats = stats_or_error(self.session, ("mean_abs", "samples"), self.options.stats,
                                   sample_rows=self.options.samples)
            edits = WeightEdits(func, self.session)
            gains = []
            for group in groups:
                st = group_stats(func, group, stats)
                names = [weight_name(func, mm) for mm in group.readers]
                weights = [np.asarray(store[n], np.float32) for n in names]
                try:
                    s, loss, base = search_scales(st.samples, weights, fmt, self.options.grid, st.mean_abs)
                except formats.FormatError as e:
                    raise PassError(group.readers[0], f"cannot quantize {', '.join(names)} as {fmt.key()}: {e}")
                fold_scales(group, s, edits)
                gains.append(f"{names[0]}{'+' if len(names) > 1 else ''}: {base / max(loss, 1e-30):.2f}x")
            commit_edits(self.session, edits)
            self.session.remarks.append(f"{self.name}: output error reduction vs round-to-nearest on calibration "
                                        f"rows: " + ", ".join(gains))
