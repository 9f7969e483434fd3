"""smooth-channels: SmoothQuant's per-channel migration of activation outliers into weights.

SmoothQuant (Xiao et al. 2023, arXiv:2211.10438): for linear layers reading one
input x, x W^T = (x / s) (W diag(s))^T with s_j = max|x_j|^a / max|W_:,j|^(1-a)
(a = alpha, default 0.5) from calibration, so activations get easier to quantize
and weights absorb the range.  The 1/s is folded into x's producer: the RMSNorm
scale (g / s), LayerNorm's scale and shift (g / s, b / s), or the rows of the linear
feeding an elementwise product, e.g. the up projection of a SwiGLU MLP (W_up / s).  Float function unchanged; layers whose
input has no such producer are left alone with a remark.
"""

import dataclasses

import numpy as np

from qcc import calibration, irutil
from qcc.errors import QccError
from qcc.passes import PassError, QccPass, register
from qcc.passes.fuse_rotation import VIEW_OPS, WeightEdits, const_number, shape_of, uses, weight_name, weight_use
from qcc.passes.quantize_weights import linear_sites, transposed_param

_BIAS_CHAIN = ("torch.aten.mul.Scalar", "torch.aten.add.Tensor")


@dataclasses.dataclass
class ScaleGroup:
    """Linear layers (`readers`) reading one value x whose producer can absorb diag(1/s).

    kind "norm": x = g * n (RMSNorm) or g * n + b (LayerNorm), producer = (mul op, operand
    index of g), bias = (add op, operand index of b) or None;
    kind "linear": x = a * y with y = linear(...) (+ bias), producer = that mm op,
    bias = (op, operand index) of its 1-D bias parameter or None.
    """

    kind: str
    readers: list
    producer: object
    bias: tuple | None = None

    @property
    def channels(self) -> int:
        return shape_of(self.readers[0].operands[0])[-1]


def linear_readers(func, value):
    """The mm ops reading `value` (through views) as their input, or None if anything else reads it."""
    found = []
    for op, index in uses(value):
        if op.name in VIEW_OPS and index == 0:
            more = linear_readers(func, op.result)
            if more is None:
                return None
            found += more
        elif op.name == "torch.aten.mm" and index == 0 and transposed_param(func, op.operands[1]) is not None:
            found.append(op)
        else:
            return None
    return found


def _param_vector(func, value, k):
    index = irutil.block_arg_number(value)
    if index is None or irutil.Signature(func).param_name(index) is None or shape_of(value) != [k]:
        return False
    return True


def _linear_producer(func, value):
    """(mm, bias use or None) if `value` is a linear layer's output (views, bias) used only here."""
    bias = None
    while True:
        if len(uses(value)) != 1:
            return None
        op = irutil.defining_op(value)
        if op is None:
            return None
        if op.name in VIEW_OPS:
            value = op.operands[0]
        elif op.name == "torch.aten.mul.Scalar":
            value = op.operands[0]
        elif op.name == "torch.aten.add.Tensor" and bias is None and len(shape_of(op.operands[1]) or []) == 1:
            b = op.operands[1]
            src = irutil.defining_op(b)
            bias = (src, 0) if src is not None and src.name == "torch.aten.mul.Scalar" else (op, 1)
            if not _param_vector(func, bias[0].operands[bias[1]], shape_of(b)[0]) or len(uses(b)) != 1:
                return None
            value = op.operands[0]
        elif op.name == "torch.aten.mm" and transposed_param(func, op.operands[1]) is not None:
            return op, bias
        else:
            return None


def _norm_bias(func, value):
    """(add op, 1) if `value`'s only use is `add(value, b)` with b a parameter vector, alpha 1:
    LayerNorm's shift after its scale."""
    users = uses(value)
    if len(users) != 1:
        return None
    op, index = users[0]
    if op.name != "torch.aten.add.Tensor" or index != 0 or const_number(op.operands[2]) != 1:
        return None
    return (op, 1) if _param_vector(func, op.operands[1], shape_of(value)[-1]) else None


def scale_groups(func):
    """(groups whose producer can absorb 1/s, readers of all other linear layers)."""
    groups, covered = [], set()
    for op in irutil.walk(func, "torch.aten.mul.Tensor"):
        k = shape_of(op.result)[-1]
        scale = next((i for i in (0, 1) if _param_vector(func, op.operands[i], k)), None)
        bias = _norm_bias(func, op.result) if scale is not None else None
        readers = linear_readers(func, (bias[0] if bias else op).result)
        if not readers:
            continue
        group = None
        if scale is not None:  # RMSNorm's g * n, or LayerNorm's g * n + b
            group = ScaleGroup("norm", readers, (op, scale), bias)
        if group is None:
            for i in (1, 0):
                found = _linear_producer(func, op.operands[i])
                if found is not None:
                    group = ScaleGroup("linear", readers, found[0], found[1])
                    break
        if group is not None:
            groups.append(group)
            covered.update(readers)
    others = [mm for mm, _ in linear_sites(func) if mm not in covered]
    return groups, others


def fold_scales(group, s, edits):
    """Adds edits: readers W diag(s), producer / s (the float function is unchanged)."""
    for mm in group.readers:
        op, index = weight_use(mm)
        edits.add(op, index, ("scale_cols", s))
    if group.kind == "norm":
        op, index = group.producer
        edits.add(op, index, ("scale_vec", 1.0 / s))
    else:
        op, index = weight_use(group.producer)
        edits.add(op, index, ("scale_rows", 1.0 / s))
    if group.bias is not None:  # LayerNorm's shift, a linear producer's bias
        edits.add(*group.bias, ("scale_vec", 1.0 / s))


def commit_edits(session, edits):
    """Writes the edits and tells the calibration view about the new values."""
    calib = edits.commit()
    view = calibration.view(session)
    view.params.update(calib)
    view.version += 1


def stats_or_error(session, want, stats_file, sample_rows=256):
    """calibration.session_stats, its QccError turned into this pass's error."""
    try:
        return calibration.session_stats(session, want=want, sample_rows=sample_rows, stats_file=stats_file)
    except QccError as e:
        raise PassError(None, f"{e.what}" + (f" ({e.hint})" if e.hint else ""))


def group_stats(func, group, stats):
    """The statistics of the group's shared input (any reader's)."""
    names = [weight_name(func, mm) for mm in group.readers]
    for name in names:
        if name in stats:
            return stats[name]
    raise PassError(group.readers[0], f"no calibration statistics for linear {' or '.join(repr(n) for n in names)}")


@register
class SmoothChannels(QccPass):
    name = "smooth-channels"
    summary = "SmoothQuant: migrate activation outliers into the weights by per-channel scales"

    @dataclasses.dataclass
    class Options:
        alpha: float = 0.5
        stats: str = ""  # precomputed calibration statistics (calibration.save_stats)

    def run(self, module):
        alpha = self.options.alpha
        if not 0.0 <= alpha <= 1.0:
            raise PassError(None, f"alpha must be in [0, 1], got {alpha}")
        store = self.session.params
        for func in irutil.functions(module):
            groups, others = scale_groups(func)
            if others:
                self.session.remarks.append(
                    f"{self.name}: left {len(others)} linear layer(s) unsmoothed (no producer to fold 1/s into): "
                    + ", ".join(weight_name(func, mm) for mm in others))
            if not groups:
                continue
            stats = stats_or_error(self.session, ("absmax",), self.options.stats)
            edits = WeightEdits(func, self.session)
            for group in groups:
                act = group_stats(func, group, stats).absmax
                wmax = np.zeros(group.channels)
                for mm in group.readers:
                    wmax = np.maximum(wmax, np.abs(np.asarray(store[weight_name(func, mm)], np.float64)).max(0))
                s = smooth_scales(act, wmax, alpha)
                fold_scales(group, s, edits)
            commit_edits(self.session, edits)


def smooth_scales(act_absmax, w_absmax, alpha):
    """s = act^alpha / w^(1 - alpha), 1 where a channel is all zero."""
    act = np.asarray(act_absmax, np.float64)
    w = np.asarray(w_absmax, np.float64)
    ok = (act > 0) & (w > 0)
    s = np.ones_like(act)
    s[ok] = act[ok] ** alpha / w[ok] ** (1.0 - alpha)
    return np.clip(s, 1e-5, None)
