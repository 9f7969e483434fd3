"""reorder-channels: outlier input channels moved to the end of K and kept in a wider format.

Atom (Zhao et al. 2024, arXiv:2310.19102), QServe (Lin et al. 2024), RPTQ (Yuan et
al. 2023): from calibration absmax, each linear's input channels are permuted so
that the `outliers` largest sit last, and the linear is split along K into
x[:, :K-k] W[:, :K-k]^T (low-bit, weight '<W>:main') + x[:, K-k:] W[:, K-k:]^T
(weight '<W>:outliers'; a recipe override on ':outliers$' keeps it wider, e.g. int8
as the w4a4-reorder presets do).  The
permutation is folded into producers: the whole residual stream (embedding,
writers, norm scales, readers) or the rows of the linears feeding an elementwise
product (SwiGLU); elsewhere an explicit gather (aten.index_select) remains.
"""

import dataclasses
import re

import numpy as np
from torch_mlir import ir

from qcc import calibration, irutil
from qcc.passes import PassError, QccPass, register
from qcc.passes.fuse_rotation import VIEW_OPS, WeightEdits, find_streams, shape_of, uses, weight_name, weight_use
from qcc.passes.quantize_weights import linear_sites, transposed_param
from qcc.passes.smooth_channels import stats_or_error

_PERMUTABLE_UNARY = ("torch.aten.silu", "torch.aten.gelu", "torch.aten.relu", "torch.aten.sigmoid",
                     "torch.aten.tanh", "torch.aten.neg", "torch.aten.mul.Scalar", "torch.aten.div.Scalar")
_PERMUTABLE_BINARY = ("torch.aten.mul.Tensor", "torch.aten.add.Tensor", "torch.aten.sub.Tensor")


def outlier_permutation(scores, k: int) -> np.ndarray:
    """perm with the k highest-scoring channels last (both parts in ascending channel order)."""
    scores = np.asarray(scores, np.float64)
    top = np.sort(np.argsort(-scores, kind="stable")[:k])
    rest = np.setdiff1d(np.arange(len(scores)), top)
    return np.concatenate([rest, top]).astype(np.int64)


def _sharing_tables(streams) -> list[list]:
    """The streams grouped by the embedding tables they share (transitively)."""
    groups = []  # [(tables, [streams])]
    for stream in streams:
        tables = {op.operands[0] for op in stream.embeddings}
        joined = [g for g in groups if g[0] & tables]
        for g in joined:
            groups.remove(g)
            tables |= g[0]
        groups.append((tables, [s for g in joined for s in g[1]] + [stream]))
    return [members for _, members in groups]


def producer_leaves(func, value):
    """[(mm, bias use or None)]: the linear layers whose output channels, permuted, permute `value`'s
    channels (through views and elementwise ops, every value on the way used once), or None."""
    if len(uses(value)) != 1:
        return None
    op = irutil.defining_op(value)
    if op is None:
        return None
    if op.name in VIEW_OPS or op.name in _PERMUTABLE_UNARY:
        if op.name in VIEW_OPS and shape_of(op.operands[0])[-1] != shape_of(value)[-1]:
            return None
        return producer_leaves(func, op.operands[0])
    if op.name in _PERMUTABLE_BINARY:
        a, b = op.operands[0], op.operands[1]
        if op.name == "torch.aten.add.Tensor" and len(shape_of(b) or []) == 1:
            src = irutil.defining_op(b)
            bias = (src, 0) if src is not None and src.name == "torch.aten.mul.Scalar" else (op, 1)
            bias_arg = irutil.block_arg_number(bias[0].operands[bias[1]])
            if bias_arg is None or irutil.Signature(func).param_name(bias_arg) is None or len(uses(b)) != 1:
                return None
            inner = producer_leaves(func, a)
            if inner is None or len(inner) != 1 or inner[0][1] is not None:
                return None
            return [(inner[0][0], bias)]
        if shape_of(a) != shape_of(b):
            return None
        left, right = producer_leaves(func, a), producer_leaves(func, b)
        return None if left is None or right is None else left + right
    if op.name == "torch.aten.mm" and transposed_param(func, op.operands[1]) is not None:
        return [(op, None)]
    return None


@register
class ReorderChannels(QccPass):
    name = "reorder-channels"
    summary = "Atom/QServe/RPTQ: permute outlier input channels last and split them off in a wider format"

    @dataclasses.dataclass
    class Options:
        outliers: int = 32                          # channels split off into '<W>:outliers' per linear layer
        exclude: str = ""                           # regex over weight names left alone
        stats: str = ""                             # precomputed calibration statistics

    def run(self, module):
        opts = self.options
        k = opts.outliers
        if k < 1:
            raise PassError(None, f"outliers must be >= 1, got {k}")
        exclude = re.compile(opts.exclude) if opts.exclude else None
        for func in irutil.functions(module):
            sites = [mm for mm, _ in linear_sites(func)]
            if not sites:
                continue
            stats = stats_or_error(self.session, ("absmax",), opts.stats)
            self._reorder(module, func, sites, stats, k, exclude)

    def _absmax(self, func, mm, stats):
        name = weight_name(func, mm)
        if name not in stats:
            raise PassError(mm, f"no calibration statistics for linear '{name}'")
        return np.asarray(stats[name].absmax, np.float64)

    def _reorder(self, module, func, sites, stats, k, exclude):
        chosen = [mm for mm in sites if not (exclude and exclude.search(weight_name(func, mm)))]
        for mm in chosen:
            kk = shape_of(mm.operands[0])[-1]
            if k >= kk:
                raise PassError(mm, f"outliers={k} leaves no channels of K={kk} in '{weight_name(func, mm)}' "
                                    f"for the low-bit part")
        edits = WeightEdits(func, self.session)
        plan = {}  # mm -> (columns of its fx-visible input for [main, outliers], folded?)
        writers = set()
        streams = []
        for stream in find_streams(func, self.session.remarks, self.name, left="not permuted"):
            if stream.online:  # v g P = (v P)(g P) would need v's producer permuted too: not done
                self.session.remarks.append(
                    f"{self.name}: residual stream left not permuted: {len(stream.online)} product(s) by a norm "
                    f"scale added to it (at {next(iter(stream.online)).location})")
            else:
                streams.append(stream)
        for group in _sharing_tables(streams):  # streams sharing an embedding table: one permutation
            readers = [mm for stream in group for mm in stream.readers if mm in chosen]
            if not readers:
                continue
            scores = np.max([a / max(np.median(a), 1e-12) for a in (self._absmax(func, mm, stats) for mm in readers)],
                            axis=0)
            perm = outlier_permutation(scores, k)
            for stream in group:
                for mm in stream.readers:
                    edits.add(*weight_use(mm), ("perm_cols", perm))
                for mm in stream.writers:
                    edits.add(*weight_use(mm), ("perm_rows", perm))
                    writers.add(mm)
                for use in stream.vectors:
                    edits.add(*use, ("perm_vec", perm))
                for op in stream.embeddings:
                    edits.add(op, 0, ("perm_cols", perm))
                for gather in stream.expert_readers:  # permuted, not split: experts take float inputs
                    edits.add(gather, 0, ("perm_cols", perm))
                for gather in stream.expert_writers:
                    edits.add(gather, 0, ("perm_rows", perm))
                for scale in stream.norm_scales.values():
                    edits.add(scale.op, scale.index, ("perm_vec", perm))
                for use in stream.norm_biases:
                    edits.add(*use, ("perm_vec", perm))
            for mm in readers:
                plan[mm] = (np.arange(len(perm)), True)
            self.session.remarks.append(
                f"{self.name}: permuted a {len(perm)}-channel residual stream"
                f"{f' (and {len(group) - 1} sharing its embedding table)' if len(group) > 1 else ''}; outlier "
                f"channels {perm[-k:].tolist()} go last in {len(readers)} readers")
        gathers = []
        for mm in chosen:
            if mm in plan:
                continue
            perm = outlier_permutation(self._absmax(func, mm, stats), k)
            leaves = producer_leaves(func, mm.operands[0])
            if leaves and not any(leaf in writers for leaf, _ in leaves):
                for leaf, bias in leaves:
                    edits.add(*weight_use(leaf), ("perm_rows", perm))
                    if bias is not None:
                        edits.add(*bias, ("perm_vec", perm))
                edits.add(*weight_use(mm), ("perm_cols", perm))
                plan[mm] = (np.arange(len(perm)), True)
            else:
                plan[mm] = (perm, False)
                gathers.append(weight_name(func, mm))
        if gathers:
            self.session.remarks.append(f"{self.name}: permutation not foldable, explicit gather before: "
                                        + ", ".join(gathers))
        names = {mm: weight_name(func, mm) for mm in plan}
        view = calibration.view(self.session)
        view.params.update(edits.commit())
        sig = irutil.Signature(func)
        for mm, (cols, folded) in plan.items():
            self._split(sig, mm, names[mm], cols, folded, k)
        view.version += 1
        for name in sig.erase_unused_params():
            if name in self.session.params:
                del self.session.params[name]

    def _split(self, sig, mm, w_name, cols, folded, k):
        """mm(x, W^T) -> mm(x_main, W_main^T) + mm(x_out, W_out^T) over columns cols[:K-k], cols[K-k:]."""
        store = self.session.params
        w = np.asarray(store[w_name], np.float32)
        n, kk = w.shape
        x = mm.operands[0]
        m = shape_of(x)[0]
        parts = {"main": cols[:kk - k], "outliers": cols[kk - k:]}
        permute = irutil.defining_op(mm.operands[1])
        view = calibration.view(self.session)
        ys = []
        with ir.InsertionPoint(mm), mm.location:
            one = irutil.const_int(1)
            for i, (role, c) in enumerate(parts.items()):
                part_name = f"{w_name}:{role}"
                store[part_name] = np.ascontiguousarray(w[:, c])  # folded: W is permuted and c = a range
                view.add_derived(part_name, w_name, c)
                arg = sig.add_param(part_name, irutil.vtensor_type([n, len(c)]))
                if folded:
                    start, end = (0, kk - k) if role == "main" else (kk - k, kk)
                    xp = ir.Operation.create("torch.aten.slice.Tensor", results=[irutil.vtensor_type([m, len(c)])],
                                             operands=[x, one, irutil.const_int(start), irutil.const_int(end), one]).result
                else:
                    idx = ir.Operation.create(
                        "torch.vtensor.literal", results=[irutil.vtensor_type([len(c)], "si64")],
                        attributes={"value": ir.DenseElementsAttr.get(np.asarray(c, np.int64), signless=False)}).result
                    xp = ir.Operation.create("torch.aten.index_select", results=[irutil.vtensor_type([m, len(c)])],
                                             operands=[x, one, idx]).result
                wt = ir.Operation.create("torch.aten.permute", results=[irutil.vtensor_type([len(c), n])],
                                         operands=[arg, permute.operands[1]]).result
                ys.append(ir.Operation.create("torch.aten.mm", results=[mm.result.type], operands=[xp, wt]).result)
            total = ir.Operation.create("torch.aten.add.Tensor", results=[mm.result.type],
                                        operands=[ys[0], ys[1], one]).result
        mm.result.replace_all_uses_with(total)
        mm.erase()
        if not list(permute.result.uses):
            permute.erase()
