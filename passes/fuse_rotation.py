"""fuse-rotation: rotate the residual stream by an orthogonal Q folded into the weights.

QuaRot (Ashkboos et al. 2024, arXiv:2404.00456), SpinQuant (Liu et al. 2024,
arXiv:2405.16406).  RMSNorm(x Q) = RMSNorm(x) Q, so once each norm's scale g is
absorbed into the linears reading it, rotating the embedding (E Q), every writer
of the stream (Q^T W, b Q) and every reader (W diag(g) Q) leaves the float function
unchanged while activations lose their outlier channels.  Inputs of MLP down
projections get an online Hadamard transform (an O(n log n) butterfly kernel), W H.
The stream is found in the graph (RMSNorm pattern, residual adds, linear readers and
writers); one the pass cannot prove invariant is left unrotated, with a remark.

LayerNorm streams: LayerNorm subtracts the mean over channels, which commutes with Q
only when Q 1 = 1.  For such a stream Q becomes Q R, R the reflection taking 1 to
Q^T 1 (still orthogonal, and it fixes 1), so LayerNorm(x Q R) = LayerNorm(x) Q R with
the graph, and the calibration program, unchanged; its bias b, like g, moves into the
readers (a bias b W^T added to each reader's output).  SliceGPT (Ashkboos et al. 2024)
instead centres every writer and turns the LayerNorms into RMSNorms.
"""

import dataclasses
import os

import numpy as np
from torch_mlir import ir

from qcc import calibration, hadamard, irutil
from qcc.passes import PassError, QccPass, register
from qcc.passes.quantize_weights import transposed_param

VIEW_OPS = ("torch.aten.view", "torch.aten.reshape", "torch.aten._unsafe_view")
_SCALE_OPS = ("torch.aten.mul.Scalar", "torch.aten.div.Scalar", "torch.aten.neg")
_SUM_OPS = ("torch.aten.sum.dim_IntList", "torch.aten.mean.dim")
_INVARIANT_MAPS = ("torch.aten.rsqrt", "torch.aten.sqrt", "torch.aten.reciprocal", "torch.aten.add.Scalar",
                   "torch.aten.sub.Scalar", "torch.aten.mul.Scalar", "torch.aten.div.Scalar")
_ELEMENTWISE = ("torch.aten.mul.Tensor", "torch.aten.silu", "torch.aten.gelu", "torch.aten.relu",
                "torch.aten.sigmoid", "torch.aten.tanh", "torch.aten.pow.Tensor_Scalar")  # pow: Nemotron's relu^2


class NotInvariant(Exception):
    """The residual stream reaches an op whose result would change under the rotation."""

    def __init__(self, op, reason: str, explored=()):
        super().__init__(reason)
        self.op, self.reason, self.explored = op, reason, explored


def shape_of(value):
    try:
        return irutil.vtensor_shape(value.type)[0]
    except ValueError:
        return None


def uses(value):
    return [(u.owner.operation, u.operand_number) for u in value.uses]


def const_number(value):
    op = irutil.defining_op(value)
    if op is None or op.name not in ("torch.constant.int", "torch.constant.float"):
        return None
    attr = op.attributes["value"]
    return ir.IntegerAttr(attr).value if op.name == "torch.constant.int" else ir.FloatAttr(attr).value


def is_last_dim_sum(op) -> bool:
    """aten.sum/mean over exactly the last dimension."""
    if op.name not in _SUM_OPS:
        return False
    dims = irutil.const_int_list(op.operands[1])
    rank = len(shape_of(op.operands[0]) or [])
    return dims is not None and len(dims) == 1 and dims[0] in (-1, rank - 1)


def is_square(op) -> bool:
    """x ** 2 or x * x (the square's operand is operands[0])."""
    if op.name == "torch.aten.mul.Tensor":
        return op.operands[0] == op.operands[1]
    return op.name == "torch.aten.pow.Tensor_Scalar" and const_number(op.operands[1]) == 2


def is_float_cast(op) -> bool:
    """aten.to.dtype to a floating-point type (LayerNorm's statistics in f64, HF's norms in f32)."""
    return op.name == "torch.aten.to.dtype" and str(op.result.type).rsplit(",", 1)[-1][:-1] in ("f16", "bf16",
                                                                                                "f32", "f64")


@dataclasses.dataclass(frozen=True)
class NormScale:
    """A norm's scale g = parameter + offset: the parameter's use (op, operand index) and the
    offset (0, or 1 for Gemma's `x * (1 + w)`)."""

    op: object
    index: int
    offset: float = 0.0

    def arg(self):
        return self.op.operands[self.index]


@dataclasses.dataclass
class ResidualStream:
    """One residual stream: its values and the ops that enter, read and leave it.

    readers: mm ops whose input is the stream (normalized or not), with the norm
    scale absorbed into them (a NormScale, or None); writers: mm ops whose output is
    added into the stream; vectors: (op, operand) of parameters added to it (biases [hidden],
    or gathered rows of per-expert biases [E, hidden]); embeddings: aten.embedding ops
    producing it; norm_scales: {(aten.mul.Tensor (g, n), n's operand index): NormScale} of
    the multiplications to erase; norm_biases:
    the additions of a LayerNorm's b to erase, each reader_biases' b moving into the readers;
    online: products by a per-channel scale added to the stream (Gemma 2's and OLMo 2's norms
    after each sublayer), rotated by an online transform after the product; expert_readers /
    expert_writers: a mixture of experts' weights [E, N, K], gathered per token (the frontend's
    form of transformers' experts), reading or writing the stream.
    """

    hidden: int
    values: set = dataclasses.field(default_factory=set)
    readers: dict = dataclasses.field(default_factory=dict)
    writers: dict = dataclasses.field(default_factory=dict)      # used as ordered sets
    vectors: dict = dataclasses.field(default_factory=dict)
    embeddings: dict = dataclasses.field(default_factory=dict)
    norm_scales: dict = dataclasses.field(default_factory=dict)
    norm_biases: dict = dataclasses.field(default_factory=dict)   # {(aten.add.Tensor, b's index): True}
    reader_biases: dict = dataclasses.field(default_factory=dict)  # {reader mm: (add op, b's index)}
    online: dict = dataclasses.field(default_factory=dict)  # {aten.mul.Tensor(v, g) added to it: NormScale of g}
    expert_readers: dict = dataclasses.field(default_factory=dict)  # {gather of W [E, N, K]: NormScale | None}
    expert_writers: dict = dataclasses.field(default_factory=dict)  # {gather of W [E, hidden, K]: True}
    fixes_ones: bool = False  # a channel sum (LayerNorm's mean) is read: Q must keep the all-ones vector


class StreamAnalysis:
    """Finds the residual stream containing `seed` in `func`; raises NotInvariant."""

    def __init__(self, func):
        self.func = func
        self.sig = irutil.Signature(func)

    def run(self, seed) -> ResidualStream:
        shape = shape_of(seed)
        self.stream = ResidualStream(hidden=shape[-1])
        self.work = []
        self.factors = []  # per-row factors of stream values: must not be computed from the stream
        try:
            self._need(seed, None)
            while self.work:
                value = self.work.pop()
                for op, index in uses(value):
                    self._forward(value, op, index)
            for op, factor in self.factors:
                if self._reads_stream(factor):
                    self._fail(op, "the residual stream is scaled per row by a value computed from it")
            for op, scale in self.stream.online.items():
                g = scale.arg() if scale.op is op else scale.op.result
                if self._reads_stream(op.operands[1] if op.operands[0] == g else op.operands[0]):
                    self._fail(op, "a product by a norm scale added to the residual stream reads the stream itself")
        except NotInvariant as e:
            e.explored = set(self.stream.values)
            raise
        return self.stream

    # -- helpers ---------------------------------------------------------------------------
    def _fail(self, op, reason):
        raise NotInvariant(op, reason)

    def _param(self, value):
        index = irutil.block_arg_number(value)
        return index if index is not None and self.sig.param_name(index) is not None else None

    def _mark(self, value, op):
        if value in self.stream.values:
            return
        shape = shape_of(value)
        if shape is None or shape[-1] != self.stream.hidden:
            self._fail(op, f"a value of type {value.type} would have to be rotated along "
                           f"{self.stream.hidden} channels")
        self.stream.values.add(value)
        self.work.append(value)

    def _vector(self, op, index):
        """A 1-D operand added to the stream must be a parameter (possibly scaled): a bias."""
        value = op.operands[index]
        src = irutil.defining_op(value)
        if src is not None and src.name in _SCALE_OPS:
            op, index, value = src, 0, src.operands[0]
        if self._param(value) is None or shape_of(value) != [self.stream.hidden]:
            self._fail(op, f"'{op.name}' adds a 1-D value that is not a parameter to the residual stream")
        self.stream.vectors[(op, index)] = True

    # -- backward: `value` must carry the rotated stream ----------------------------------------
    def _need(self, value, user):
        if value in self.stream.values:
            return
        op = irutil.defining_op(value)
        if op is None:
            self._fail(user, "the residual stream is a function argument (the rotation cannot be folded "
                             "into a caller)")
        name = op.name
        if name in VIEW_OPS or is_float_cast(op):
            self._mark(value, op)
            self._need(op.operands[0], op)
        elif name in ("torch.aten.add.Tensor", "torch.aten.sub.Tensor"):
            self._mark(value, op)
            self._add_operands(op, skip=None)
        elif name in _SCALE_OPS:
            self._mark(value, op)
            self._need(op.operands[0], op)
        elif name == "torch.aten.mul.Tensor" and any(self._scalar(v) for v in op.operands):
            self._mark(value, op)  # times a 0-d state tensor (Gemma's embedding scale)
            self._need(op.operands[1 if self._scalar(op.operands[0]) else 0], op)
        elif name == "torch.aten.mul.Tensor" and self._row_factor(op, None) is not None:
            self._mark(value, op)  # v * w, w one factor per row (a mixture's routing weights)
            self._need(op.operands[1 - self._row_factor(op, None)], op)
        elif _row_sum(op):
            self._mark(value, op)  # a sum over rows (a mixture's chosen experts): linear
            self._need(op.operands[0], op)
        elif _row_gather(op) and self._expert_bias(op.operands[0]):
            self._mark(value, op)  # b[ids], b [E, hidden]: each expert's output bias (gpt-oss)
            self.stream.vectors[(op, 0)] = True
        elif _row_gather(op) or _row_op(op):
            self._mark(value, op)
            self._need(op.operands[0], op)
        elif name == "torch.aten.where.self" and _row_mask_zero(op) is not None:
            self._mark(value, op)
            self._need(op.operands[_row_mask_zero(op)], op)
        elif (gather := _expert_output(self.func, op)) is not None:
            self._mark(value, op)  # squeeze(bmm(W[ids], x)): the chosen experts' output rows
            self.stream.expert_writers[gather] = True
        elif name == "torch.aten.mul.Tensor" and self._scale_of(op) is not None:
            self._mark(value, op)  # v * g written to the stream: v g Q = (v g D) H, H online
            self.stream.online[op] = self._scale_of(op)
        elif name == "torch.aten.mm" and transposed_param(self.func, op.operands[1]) is not None:
            self._mark(value, op)
            self.stream.writers[op] = True
        elif name == "torch.aten.embedding" and self._param(op.operands[0]) is not None:
            self._mark(value, op)
            self.stream.embeddings[op] = True
        else:
            self._fail(op, f"the residual stream is produced by '{name}', which cannot absorb the rotation")

    def _add_operands(self, op, skip):
        for j in (0, 1):
            if j == skip:
                continue
            shape = shape_of(op.operands[j])
            if shape is not None and len(shape) == 1:
                self._vector(op, j)
            elif shape and shape[-1] == 1 and self.stream.hidden > 1:
                # c 1^T added per token (LayerNorm's centring): (x + c 1^T) Q = x Q + c 1^T needs Q^T 1 = 1
                if not self._invariant(op.operands[j]):
                    self._fail(op, f"'{op.name}' adds a per-token value to the residual stream that is not a "
                                   f"function of its channel sums")
                self.stream.fixes_ones = True
            else:
                self._need(op.operands[j], op)

    # -- forward: every use of a rotated value must keep the function unchanged ------------------
    def _forward(self, value, op, index):
        name = op.name
        if (name in VIEW_OPS or is_float_cast(op)) and index == 0:
            self._mark(op.result, op)
        elif is_square(op):
            for user, _ in uses(op.result):
                if not is_last_dim_sum(user):
                    self._fail(user, "the square of the residual stream is used other than summed over channels")
        elif is_last_dim_sum(op) and index == 0:
            self.stream.fixes_ones = True  # sum(x Q) = sum(x) when Q 1 = 1 (LayerNorm's mean)
        elif name in ("torch.aten.add.Tensor", "torch.aten.sub.Tensor") and index in (0, 1):
            self._mark(op.result, op)
            self._add_operands(op, skip=index)
        elif name in _SCALE_OPS and index == 0:
            self._mark(op.result, op)
        elif (_row_sum(op) or _row_gather(op) or _row_op(op)) and index == 0:
            self._mark(op.result, op)
        elif name == "torch.aten.where.self" and index in (1, 2) and _row_mask_zero(op) == index:
            self._mark(op.result, op)
        elif name == "torch.aten.mul.Tensor" and self._row_factor(op, index) is not None:
            self._mark(op.result, op)
        elif name == "torch.aten.mul.Tensor":
            other = op.operands[1 - index]
            shape = shape_of(other)
            scale = self._norm_scale(op, 1 - index)
            if self._scalar(other) or (shape and shape[-1] == 1 and self._invariant(other)):
                self._mark(op.result, op)
            elif scale is not None:
                self.stream.norm_scales[(op, index)] = scale
                self._scaled(op.result, scale)
            else:
                self._fail(op, "'aten.mul.Tensor' of the residual stream by a value that is neither a "
                               "per-token scalar nor a norm scale")
        elif name == "torch.aten.mm" and index == 0 and transposed_param(self.func, op.operands[1]) is not None:
            self.stream.readers[op] = None
        elif name == "func.return":
            self._fail(op, "the residual stream is a result of the function")
        else:
            self._fail(op, f"the residual stream is read by '{name}', which is not rotation invariant")

    def _row_factor(self, op, index):
        """The operand index of w in op = v * w, w one factor per row ([..., 1], not the stream's
        channel sums: checked once the stream is known), v operand `index` (None: either); or None."""
        for j in ((1 - index,) if index is not None else (0, 1)):
            w, v = op.operands[j], op.operands[1 - j]
            ws, vs = shape_of(w), shape_of(v)
            if ws and vs and ws[-1] == 1 and vs[-1] == self.stream.hidden and len(ws) == len(vs):
                if not self._invariant(w):
                    self.factors.append((op, w))
                return j
        return None

    def _expert_bias(self, value) -> bool:
        return self._param(value) is not None and shape_of(value) is not None and len(shape_of(value)) == 2 \
            and shape_of(value)[-1] == self.stream.hidden

    def _scale_of(self, op) -> NormScale | None:
        return self._norm_scale(op, 0) or self._norm_scale(op, 1)

    def _reads_stream(self, value) -> bool:
        """Is a stream value among `value`'s producers, short of linear layers (readers absorb Q)?"""
        seen, todo = set(), [value]
        while todo:
            v = todo.pop()
            if v in self.stream.values:
                return True
            op = irutil.defining_op(v)
            if v in seen or op is None or op.name in _LAYERS:
                continue
            seen.add(v)
            todo.extend(op.operands)
        return False

    def _scalar(self, value) -> bool:
        """A 0-d state tensor (the same factor for every channel: it commutes with Q)."""
        return self._param(value) is not None and shape_of(value) == []

    def _norm_scale(self, op, index) -> NormScale | None:
        """op's operand `index` as a norm scale: a [hidden] parameter, or parameter + constant."""
        value = op.operands[index]
        if shape_of(value) != [self.stream.hidden]:
            return None
        if self._param(value) is not None:
            return NormScale(op, index)
        src = irutil.defining_op(value)
        if src is not None and src.name == "torch.aten.add.Scalar" and self._param(src.operands[0]) is not None \
                and const_number(src.operands[1]) is not None and const_number(src.operands[2]) == 1:
            return NormScale(src, 0, float(const_number(src.operands[1])))
        return None

    def _scaled(self, value, scale, bias=None):
        """`value` = stream * g (+ b): only linear layers may read it (they absorb g and b)."""
        for op, index in uses(value):
            if (op.name in VIEW_OPS or is_float_cast(op)) and index == 0:
                self._scaled(op.result, scale, bias)
            elif op.name in _SCALE_OPS and index == 0 and bias is None:  # T5's d_model^-0.5 before its tied head
                self._scaled(op.result, scale)
            elif (_row_gather(op) or _row_op(op)) and index == 0:  # the rows each expert takes
                self._scaled(op.result, scale, bias)
            elif op.name == "torch.aten.mul.Tensor" and self._row_factor(op, index) is not None:
                self._scaled(op.result, scale, bias)  # Llama 4 weights each expert's input rows
            elif index == 0 and bias is None and _expert_readers(self.func, op):
                for gather in _expert_readers(self.func, op):
                    self.stream.expert_readers[gather] = scale
            elif op.name == "torch.aten.mm" and index == 0 and transposed_param(self.func, op.operands[1]) is not None:
                self.stream.readers[op] = scale
                if bias is not None:
                    self.stream.reader_biases[op] = bias
            elif bias is None and self._norm_bias(op, index):
                self.stream.norm_biases[(op, 1 - index)] = True
                self._scaled(op.result, scale, (op, 1 - index))
            else:
                self._fail(op, f"a norm output is read by '{op.name}', which cannot absorb the norm scale")

    def _norm_bias(self, op, index) -> bool:
        """Is op value + b, value its operand `index`, b a [hidden] parameter (a LayerNorm's bias)?"""
        if op.name != "torch.aten.add.Tensor" or index not in (0, 1) or const_number(op.operands[2]) != 1:
            return False
        b = op.operands[1 - index]
        return shape_of(b) == [self.stream.hidden] and self._param(b) is not None

    def _invariant(self, value) -> bool:
        """Is `value` unchanged by the rotation: a function of sum(stream^2) over channels only?"""
        op = irutil.defining_op(value)
        if op is None:
            return False
        if op.name in ("torch.constant.float", "torch.constant.int"):
            return True
        if op.name in _INVARIANT_MAPS or is_float_cast(op):
            return self._invariant(op.operands[0])
        if is_last_dim_sum(op):
            sq = irutil.defining_op(op.operands[0])
            if sq is not None and is_square(sq):
                self._need(sq.operands[0], op)
            else:  # a channel sum of the stream itself (LayerNorm's mean): unchanged when Q 1 = 1
                self._need(op.operands[0], op)
                self.stream.fixes_ones = True
            return True
        return False


_GATHERS = ("torch.aten.index.Tensor_hacked_twin", "torch.aten.index.Tensor")


def _row_gather(op) -> bool:
    """x[ids]: rows of x picked by one index tensor (leading dim): commutes with x Q."""
    if op.name not in _GATHERS:
        return False
    idx = irutil.defining_op(op.operands[1])
    return idx is not None and idx.name == "torch.prim.ListConstruct" and len(idx.operands) == 1 \
        and shape_of(op.operands[0]) is not None and shape_of(op.result)[-1:] == shape_of(op.operands[0])[-1:]


def _row_op(op) -> bool:
    """An op moving or repeating rows with the channels (last dim) left as they are: unsqueeze
    before the last dim, broadcast_to / expand of leading dims, a permute of leading dims (Llama 4's
    `repeat` of the tokens for each expert).  Commutes with x Q."""
    if len(op.results) != 1 or not op.operands:
        return False
    src, out = shape_of(op.operands[0]), shape_of(op.result)
    if not src or not out or src[-1] != out[-1]:
        return False
    if op.name == "torch.aten.unsqueeze":
        d = const_number(op.operands[1])
        return d is not None and d % len(out) != len(out) - 1
    if op.name in ("torch.aten.broadcast_to", "torch.aten.expand"):
        return True
    if op.name == "torch.aten.permute":
        perm = irutil.const_int_list(op.operands[1])
        return perm is not None and perm[-1] % len(out) == len(out) - 1
    return False


_RESHAPES = VIEW_OPS + ("torch.aten.unsqueeze", "torch.aten.squeeze.dim", "torch.aten.squeeze", "torch.aten.permute")


def _column_reshape(op, to_column: bool) -> bool:
    """A reshape (no non-unit dim moves) between rows x[..., K] and columns x[..., K, 1]:
    unsqueeze(-1) / squeeze(-1), a view, or a permute moving only a size-1 dim (Llama 4's experts:
    unsqueeze(1) then permute(0, 2, 1)); rows to columns if `to_column`, else back."""
    if op.name not in _RESHAPES:
        return False
    src, out = shape_of(op.operands[0]), shape_of(op.result)
    if not src or not out:
        return False
    column, row = (out, src) if to_column else (src, out)
    return len(column) >= 2 and column[-1] == 1 and column[-2] == row[-1] \
        and [d for d in src if d != 1] == [d for d in out if d != 1]


def _to_column(op) -> bool:
    return _column_reshape(op, True)


def _from_column(op) -> bool:
    return _column_reshape(op, False)


def _row_sum(op) -> bool:
    """A sum over dims other than the last (a mixture's sum over its chosen experts)."""
    if op.name != "torch.aten.sum.dim_IntList":
        return False
    dims, rank = irutil.const_int_list(op.operands[1]), len(shape_of(op.operands[0]) or [])
    return bool(dims) and rank > 1 and all(d not in (-1, rank - 1) for d in dims) \
        and shape_of(op.result)[-1:] == shape_of(op.operands[0])[-1:]


def _row_mask_zero(op):
    """where(mask, a, b) with mask [..., 1] and one of a, b a literal 0: the other's operand index."""
    mask = shape_of(op.operands[0])
    if not mask or mask[-1] != 1:
        return None
    for j in (1, 2):
        lit = irutil.defining_op(op.operands[3 - j])
        if lit is not None and lit.name == "torch.vtensor.literal" and shape_of(op.operands[3 - j]) == [] and \
                not np.any(np.asarray(ir.DenseElementsAttr(lit.attributes["value"]))):
            return j
    return None


def _is_param(func, value) -> bool:
    arg = irutil.block_arg_number(value)
    return arg is not None and irutil.Signature(func).param_name(arg) is not None


def _gathered_param(func, value):
    """The gather op of W[ids] when `value` is that, W a [E, N, K] parameter; else None."""
    op = irutil.defining_op(value)
    if op is None or not _row_gather(op):
        return None
    return op if _is_param(func, op.operands[0]) and len(shape_of(op.operands[0])) == 3 else None


def _expert_output(func, op):
    """The gather W[ids] when op = squeeze(bmm(W[ids], x[..., None]), -1), or another _from_column
    reshape of that bmm (experts' output rows)."""
    if not _from_column(op):
        return None
    bmm = irutil.defining_op(op.operands[0])
    return _gathered_param(func, bmm.operands[0]) if bmm is not None and bmm.name == "torch.aten.bmm" else None


def _expert_readers(func, column) -> list:
    """The gathers W[ids] of every bmm(W[ids], x[..., None]) reading column = x[..., None] (a
    _to_column op); [] when any use of it is something else."""
    if not _to_column(column):
        return []
    found = []
    for user, index in uses(column.result):
        gather = _gathered_param(func, user.operands[0]) if user.name == "torch.aten.bmm" and index == 1 else None
        if gather is None:
            return []
        found.append(gather)
    return found


def _projection_output(value) -> bool:
    """Is `value` a linear layer's output (through views, permutes, slices and casts)?  Then a norm
    of it is a q / k norm (Qwen3's, OLMo 2's, Gemma 3's), a latent's (DeepSeek's MLA) or a norm
    after a sublayer (Gemma 2's), not a residual stream's; where the stream continues, another
    norm's seed finds it."""
    op = irutil.defining_op(value)
    while op is not None and (op.name in VIEW_OPS or op.name in ("torch.aten.permute", "torch.aten.slice.Tensor")
                              or is_float_cast(op)):
        op = irutil.defining_op(op.operands[0])
    return op is not None and op.name in _LAYERS


def _norm_read_by_weights(func, square, limit=64) -> bool:
    """Does a linear layer with a weight parameter read the norm whose sum of squares `square`
    feeds, contracting exactly the norm's channels (from the sum, through the per-token factor,
    products, sums, views, permutes, casts; at most `limit` values)?  A norm read by none is not a
    residual stream's: Llama 4's q / k norm after the rotary embeddings (read by attention alone),
    Qwen3-Next's per-head gated norm (its heads read together by out_proj)."""
    n = shape_of(square.operands[0])[-1]
    seen, todo = set(), [user.result for user, _ in uses(square.result)]
    follow = VIEW_OPS + _INVARIANT_MAPS + ("torch.aten.permute", "torch.aten.mul.Tensor", "torch.aten.div.Tensor",
                                           "torch.aten.add.Tensor")
    while todo and len(seen) < limit:
        value = todo.pop(0)
        if value in seen:
            continue
        seen.add(value)
        for op, index in uses(value):
            if op.name in _LAYERS:
                k = (shape_of(value) or [0, 0])[-2 if op.name == "torch.aten.bmm" and index == 1 else -1]
                if k == n and any(transposed_param(func, v) is not None or _gathered_param(func, v) is not None
                                  or _is_param(func, v)
                                  for j, v in enumerate(op.operands) if j != index):
                    return True
            elif op.name in follow or is_float_cast(op) or _row_op(op):
                todo.append(op.result)
    return False


def find_streams(func, remarks, pass_name, left="unrotated"):
    """Every residual stream of `func` (seeded at RMSNorm patterns) whose invariance is proven;
    for the others a remark '<pass_name>: residual stream left <left>: <why>'."""
    seen, streams = set(), []
    for op in irutil.walk(func):
        if not is_square(op) or not uses(op.result) or not all(is_last_dim_sum(u) for u, _ in uses(op.result)):
            continue
        seed = op.operands[0]
        if seed in seen or len(shape_of(seed) or []) < 2 or _projection_output(seed) \
                or not _norm_read_by_weights(func, op):
            continue
        try:
            stream = StreamAnalysis(func).run(seed)
        except NotInvariant as e:
            seen |= e.explored | {seed}
            where = e.op.location if e.op is not None else "?"
            remarks.append(f"{pass_name}: residual stream left {left}: {e.reason} (at {where})")
            continue
        seen |= stream.values
        streams.append(stream)
    return streams


def load_rotation(path: str, n: int) -> np.ndarray:
    """A user-given orthogonal [n, n] matrix from .npy or .safetensors (one tensor)."""
    if not os.path.isfile(path):
        raise ValueError(f"rotation file '{path}' does not exist")
    if path.endswith(".npy"):
        q = np.load(path, allow_pickle=False)
    elif path.endswith(".safetensors"):
        from safetensors.numpy import load_file

        try:
            tensors = load_file(path)
        except Exception as e:  # safetensors raises its own error types for malformed files
            raise ValueError(f"cannot read rotation file '{path}': {e}")
        if len(tensors) != 1:
            raise ValueError(f"rotation file '{path}' holds {len(tensors)} tensors ({', '.join(sorted(tensors))}); "
                             f"expected exactly one")
        q = next(iter(tensors.values()))
    else:
        raise ValueError(f"rotation file '{path}' must be .npy or .safetensors")
    q = np.asarray(q, dtype=np.float64)
    if q.shape != (n, n):
        raise ValueError(f"rotation in '{path}' has shape {list(q.shape)}, the residual stream needs [{n}, {n}]")
    dev = float(np.abs(q @ q.T - np.eye(n)).max())
    if not dev <= 1e-4:
        raise ValueError(f"rotation in '{path}' is not orthogonal: max |Q Q^T - I| = {dev:.3g} (> 1e-4)")
    return q


def rotation_matrix(spec: str, n: int, seed: int) -> np.ndarray:
    if spec == "hadamard":
        return hadamard.orthogonal(n)
    if spec == "random-hadamard":
        return hadamard.orthogonal(n, seed=seed)
    return load_rotation(spec, n)


def keeps_ones(q: np.ndarray) -> np.ndarray:
    """Q R, R the reflection taking the all-ones vector 1 to Q^T 1: orthogonal, and Q R 1 = 1."""
    ones = np.ones(len(q))
    v = ones - q.T @ ones
    vv = float(v @ v)
    return q if vv <= 1e-12 * len(q) else q - (2.0 / vv) * np.outer(q @ v, v)


def output_bias(func, mm):
    """(op, operand index, factor): the use of the bias parameter mm's linear layer adds to its
    output, adding u to mm's result being adding factor * u to that parameter; None without one."""
    users = uses(mm.result)
    if len(users) != 1:
        return None
    (op, index), c = users[0], 1.0
    if op.name == "torch.aten.mul.Scalar" and index == 0:  # y = c mm + alpha b, as linear's decomposition has it
        c, users = const_number(op.operands[1]), uses(op.result)
        if c is None or len(users) != 1:
            return None
        op, index = users[0]
    alpha = const_number(op.operands[2]) if op.name == "torch.aten.add.Tensor" and index in (0, 1) else None
    if alpha is None:
        return None
    b_op, b_index, cb = op, 1 - index, alpha if index == 0 else 1.0
    c *= 1.0 if index == 0 else alpha
    src = irutil.defining_op(op.operands[b_index])
    if src is not None and src.name == "torch.aten.mul.Scalar" and const_number(src.operands[1]) is not None:
        b_op, b_index, cb = src, 0, cb * const_number(src.operands[1])
    value = b_op.operands[b_index]
    arg = irutil.block_arg_number(value)
    if arg is None or irutil.Signature(func).param_name(arg) is None or shape_of(value) != shape_of(mm.result)[-1:] \
            or cb == 0:
        return None
    return b_op, b_index, c / cb


def add_output_bias(func, session, mm, name: str, u: np.ndarray) -> None:
    """mm's result + u, u a new parameter `name` (a linear layer without a bias of its own)."""
    session.params[name] = np.asarray(u, np.float32)
    arg = irutil.Signature(func).add_param(name, irutil.vtensor_type([len(u)]))
    with ir.InsertionPoint.after(mm), mm.location:
        total = ir.Operation.create("torch.aten.add.Tensor", results=[mm.result.type],
                                    operands=[mm.result, arg, irutil.const_int(1)])
    mm.result.replace_all_uses_with(total.result)
    total.operands[0] = mm.result


class WeightEdits:
    """Per-use rewrites of parameter arguments, applied together.

    Each use (op, operand) of a parameter gets a list of steps on its original value;
    uses of one parameter that end with different values get parameters of their own.
    """

    def __init__(self, func, session):
        self.func = func
        self.sig = irutil.Signature(func)
        self.session = session
        self.steps = {}  # (op, operand index) -> [step]

    def add(self, op, index, step):
        self.steps.setdefault((op, index), []).append(step)

    @staticmethod
    def _apply(value, steps):
        w = value.astype(np.float64)
        for kind, m in steps:
            if kind == "scale_cols":
                w = w * m[None, :]
            elif kind == "cols":       # W Q (W's input channels, an embedding's columns)
                w = w @ m
            elif kind == "rows":       # Q^T W (a writer's output channels)
                w = m.T @ w
            elif kind == "vec":        # b Q ([hidden] or [E, hidden])
                w = w @ m
            elif kind == "scale_rows":
                w = w * m[:, None]  # [N, K] or [E, N, K]
            elif kind == "scale_vec":
                w = w * m
            elif kind == "add_vec":
                w = w + m
            elif kind == "perm_rows":
                w = np.take(w, m, axis=-2)
            elif kind == "perm_cols":
                w = np.take(w, m, axis=-1)
            elif kind == "perm_vec":
                w = np.take(w, m, axis=-1)
            else:
                raise AssertionError(kind)
        return w.astype(np.float32)

    def commit(self):
        """Writes the new values; returns {parameter name: the value its exported-program placeholder
        should take for calibration}.

        The exported program has one placeholder per parameter, so when uses of one parameter
        get different values (an untied embedding and head) it can follow only one of them:
        the embedding's if there is one, else the one keeping the name; every other copy must
        feed only linear layers whose results are the function's (e.g. the model's head).
        """
        plan = []
        for arg_index in sorted({irutil.block_arg_number(op.operands[i]) for op, i in self.steps}):
            name = self.sig.param_name(arg_index)
            arg = self.sig.block.arguments[arg_index]
            if name not in self.session.params:
                op = next(op for op, i in self.steps if irutil.block_arg_number(op.operands[i]) == arg_index)
                raise PassError(op, f"no value for parameter '{name}' in the parameter store")
            original = np.asarray(self.session.params[name])
            groups = []  # [value, [(op, operand index)]]
            for op, index in uses(arg):
                steps = self.steps.get((op, index))
                value = self._apply(original, steps) if steps else original
                for g in groups:
                    if g[0] is value or (g[0].shape == value.shape and np.array_equal(g[0], value)):
                        g[1].append((op, index))
                        break
                else:
                    groups.append([value, [(op, index)]])
            # the name stays with the unedited uses if any, else with a linear layer
            groups.sort(key=lambda g: 0 if g[0] is original else
                        1 if any(op.name == "torch.aten.permute" for op, _ in g[1]) else 2)
            fx = next((g for g in groups if any(op.name == "torch.aten.embedding" for op, _ in g[1])), groups[0])
            for g in groups:
                if g is fx:
                    continue
                for op, _ in g[1]:
                    if op.name != "torch.aten.permute" or not all(
                            u.name == "torch.aten.mm" and terminal(u.result) for u, _ in uses(op.result)):
                        raise PassError(op, f"parameter '{name}' would need different values for its uses; "
                                            f"qcc can untie it only from the model's output layer (a linear "
                                            f"layer whose result no other layer reads)")
            plan.append((name, arg, original, groups, fx))
        calib = {}
        for name, arg, original, groups, fx in plan:
            if groups[0][0] is not original:
                self.session.params[name] = groups[0][0]
            for value, group_uses in groups[1:]:
                kinds = sorted({op.name.rsplit(".", 1)[-1] for op, _ in group_uses})
                new_name = f"{name}:{'+'.join(kinds)}"
                self.session.params[new_name] = value
                new_arg = self.sig.add_param(new_name, arg.type)
                for op, index in group_uses:
                    op.operands[index] = new_arg
            calib[name] = fx[0]
        return calib


_LAYERS = ("torch.aten.mm", "torch.aten.bmm", "torch.aten.matmul", "torch.aten.linear", "torch.aten.convolution")


def terminal(value) -> bool:
    """Does `value` reach only the function's results, through no further linear layer (views,
    Cohere's logit scale, Gemma 2's soft cap)?  Then no calibrated layer reads anything
    computed from it."""
    for op, _ in uses(value):
        if op.name == "func.return":
            continue
        if op.name in _LAYERS or not all(terminal(r) for r in op.results):
            return False
    return True


def _hadamard_rows(module, x, k: int, block: int):
    """x [M, k] @ (I (x) H_block / sqrt(block)): a call to the butterfly kernel (at the current
    insertion point)."""
    name = f"qcc_hadamard_{k}" if block == k else f"qcc_hadamard_{k}_b{block}"
    body = module.regions[0].blocks[0]
    if not any(op.operation.name == "func.func" and ir.StringAttr(op.attributes["sym_name"]).value == name
               for op in body.operations):
        parsed = ir.Module.parse(hadamard.kernel_mlir(name, k, block))  # must outlive the move
        parsed.body.operations[0].operation.move_after(body.operations[len(body.operations) - 1])
    shape = shape_of(x)
    xb = ir.Operation.create("torch_c.to_builtin_tensor", results=[irutil.tensor_type(shape, "f32")],
                             operands=[x]).result
    xd = ir.Operation.create("tensor.cast", results=[irutil.tensor_type([None, k], "f32")], operands=[xb]).result
    yd = ir.Operation.create("func.call", results=[irutil.tensor_type([None, k], "f32")], operands=[xd],
                             attributes={"callee": ir.FlatSymbolRefAttr.get(name)}).result
    yb = ir.Operation.create("tensor.cast", results=[irutil.tensor_type(shape, "f32")], operands=[yd]).result
    return ir.Operation.create("torch_c.from_builtin_tensor", results=[x.type], operands=[yb]).result


def _view(x, dims, result_shape):
    """aten.view(x, dims) (dims: ints or !torch.int values) of type [result_shape]."""
    size = irutil.int_list(dims)
    dtype = irutil.vtensor_shape(x.type)[1]
    return ir.Operation.create("torch.aten.view", results=[irutil.vtensor_type(result_shape, dtype)],
                               operands=[x, size]).result


def _hadamard_last(module, v, block: int):
    """v [..., n] @ (I (x) H_block / sqrt(block)) along its last dim (at the current insertion point)."""
    shape = shape_of(v)
    n = shape[-1]
    if len(shape) == 2:
        return _hadamard_rows(module, v, n, block)
    rows = None if None in shape[:-1] else int(np.prod(shape[:-1]))
    y2 = _hadamard_rows(module, _view(v, [-1, n], [rows, n]), n, block)
    dims = [d if d is not None else ir.Operation.create(
        "torch.aten.size.int", results=[ir.Type.parse("!torch.int")], operands=[v, irutil.const_int(i)]).result
        for i, d in enumerate(shape)]
    return _view(y2, dims, shape)


def hadamard_after(module, op) -> None:
    """op's result v [..., n] becomes v @ (H_n / sqrt(n)) for every user of v."""
    v = op.result
    users = uses(v)
    with ir.InsertionPoint.after(op), op.location:
        y = _hadamard_last(module, v, shape_of(v)[-1])
    for user, index in users:
        user.operands[index] = y


def insert_online_hadamard(module, op, index: int, block: int) -> None:
    """op's operand `index` x [..., k] becomes x @ (I (x) H_block / sqrt(block)): a linear's input,
    or an expert's rows before they become a column."""
    with ir.InsertionPoint(op), op.location:
        op.operands[index] = _hadamard_last(module, op.operands[index], block)


def expert_columns(gather, mlp_only: bool) -> list:
    """The _to_column ops giving each bmm(W[ids], x[..., None]) that reads `gather` its x; [] when one
    cannot take an online transform (with mlp_only: x's rows not an elementwise op's output, as a
    down projection's are)."""
    columns = []
    for user, index in uses(gather.result):
        col = irutil.defining_op(user.operands[1]) if user.name == "torch.aten.bmm" and index == 0 else None
        if col is None or not _to_column(col):
            return []
        src = irutil.defining_op(col.operands[0])
        while src is not None and (src.name in VIEW_OPS or _row_op(src)):
            src = irutil.defining_op(src.operands[0])
        if mlp_only and (src is None or src.name not in _ELEMENTWISE):
            return []
        columns.append(col)
    return columns


def sublayer_output(op):
    """The linear layer whose output op = (y * r) * g normalizes (r per token; through views and
    casts), e.g. Gemma 2's down projection before its norm; or None."""
    v = op.operands[1] if shape_of(op.operands[0]) == shape_of(op.result)[-1:] else op.operands[0]
    src = irutil.defining_op(v)
    while src is not None:
        if src.name in VIEW_OPS or is_float_cast(src):
            src = irutil.defining_op(src.operands[0])
        elif src.name == "torch.aten.mul.Tensor" and (shape_of(src.operands[1]) or [0])[-1:] == [1]:
            src = irutil.defining_op(src.operands[0])
        elif src.name == "torch.aten.mm":
            return src
        else:
            return None
    return None


def mlp_input(mm) -> bool:
    """Is mm's input (through views) the output of an elementwise op, as a down projection's is?"""
    op = irutil.defining_op(mm.operands[0])
    while op is not None and op.name in VIEW_OPS:
        op = irutil.defining_op(op.operands[0])
    return op is not None and op.name in _ELEMENTWISE


def weight_use(mm):
    """(permute op, 0): the use of a linear's weight parameter."""
    return irutil.defining_op(mm.operands[1]), 0


def weight_name(func, mm) -> str:
    return irutil.Signature(func).param_name(transposed_param(func, mm.operands[1]))


@register
class FuseRotation(QccPass):
    name = "fuse-rotation"
    summary = "QuaRot/SpinQuant: rotate the residual stream by an orthogonal Q folded into the weights"

    @dataclasses.dataclass
    class Options:
        rotation: str = "random-hadamard"  # hadamard | random-hadamard | PATH.npy | PATH.safetensors
        seed: int = 0
        online: str = "mlp"   # online Hadamard on the input of: mlp (down projections) | writers | none
        online_block: int = 0  # 0: the whole K when a Hadamard of that order exists, else the largest that divides K

    def run(self, module):
        opts = self.options
        if opts.online not in ("mlp", "writers", "none"):
            raise PassError(None, f"option online must be mlp, writers or none, got '{opts.online}'")
        for func in irutil.functions(module):
            streams = find_streams(func, self.session.remarks, self.name)
            if not streams and not any(r.startswith(self.name) for r in self.session.remarks):
                self.session.remarks.append(f"{self.name}: no residual stream with a norm found; nothing rotated")
            streams = self._shared_tables(func, [s for s in streams if self._online_possible(s)])
            # one commit for every stream: a table shared by several (T5's encoder and decoder
            # embeddings) gets each stream's edits on its own uses
            edits = WeightEdits(func, self.session)
            finish = [self._rotate(module, func, stream, edits) for stream in streams]
            calibration.view(self.session).params.update(edits.commit())
            for rest in finish:
                rest()
            if streams:
                for name in irutil.Signature(func).erase_unused_params():
                    if name in self.session.params:
                        del self.session.params[name]

    def _shared_tables(self, func, streams):
        """The streams whose embedding tables feed no embedding outside the rotated streams (a
        table shared with a stream left unrotated would need two values: the stream stays too)."""
        while True:
            rotated = {op for s in streams for op in s.embeddings}
            bad = next(((s, user) for s in streams for op in s.embeddings for user, _ in uses(op.operands[0])
                        if user.name == "torch.aten.embedding" and user not in rotated), None)
            if bad is None:
                return streams
            stream, user = bad
            streams = [s for s in streams if s is not stream]
            self.session.remarks.append(
                f"{self.name}: residual stream left unrotated: its embedding table also feeds a stream left "
                f"unrotated (at {user.location})")

    def _online_possible(self, stream) -> bool:
        """A stream with products by a norm scale written to it needs Q = D H (D: signs, folded
        into the scales; H: a butterfly after the product); else it stays unrotated, said so."""
        if not stream.online:
            return True
        why = None
        self._matrix(stream)  # a rotation file that cannot be read is an error, as always
        if self.options.rotation not in ("hadamard", "random-hadamard"):
            why = f"rotation '{self.options.rotation}' is not a Hadamard matrix"
        elif stream.fixes_ones:
            why = "the stream is also LayerNorm's, whose rotation Q R has no fast form"
        elif hadamard.block_size(stream.hidden) != stream.hidden:
            why = f"no Hadamard matrix of order {stream.hidden} is known"
        if why:
            op = next(iter(stream.online))
            self.session.remarks.append(
                f"{self.name}: residual stream left unrotated: {len(stream.online)} product(s) by a norm scale "
                f"added to it need an online Hadamard transform after them, and {why} (at {op.location})")
        return why is None

    def _matrix(self, stream) -> np.ndarray:
        try:
            return rotation_matrix(self.options.rotation, stream.hidden, self.options.seed)
        except (ValueError, hadamard.HadamardError) as e:
            anchor = stream.readers and next(iter(stream.readers)) or None
            raise PassError(anchor, f"rotation of the {stream.hidden}-channel residual stream: {e}")

    def _rotate(self, module, func, stream, edits):
        """Adds the stream's weight edits; returns what to do once they are committed."""
        opts, store = self.options, self.session.params
        n = stream.hidden
        q = self._matrix(stream)
        if stream.fixes_ones:
            q = keeps_ones(q)
            i, j = np.unravel_index(np.argmax(np.abs(q)), q.shape)
            if abs(q[i, j]) > 0.5:
                anchor = next(iter(stream.readers), None)
                raise PassError(anchor, f"rotation of the {n}-channel residual stream: it is LayerNorm's, so the "
                                        f"rotation must keep the all-ones vector; made to (Q R, R a reflection), "
                                        f"'{opts.rotation}' leaves channel {i} nearly in place (|QR[{i}, {j}]| = "
                                        f"{abs(q[i, j]):.2f}); use rotation=random-hadamard")
        sig = irutil.Signature(func)
        new_biases = []  # (reader, its weight's name, b W^T) for readers without a bias of their own
        for mm, (add, b_index) in stream.reader_biases.items():
            b = np.asarray(store[sig.param_name(irutil.block_arg_number(add.operands[b_index]))], np.float64)
            u = np.asarray(store[weight_name(func, mm)], np.float64) @ b  # (n g + b) W^T = n diag(g) W^T + b W^T
            site = output_bias(func, mm)
            if site is None:
                new_biases.append((mm, weight_name(func, mm), u))
            else:
                edits.add(site[0], site[1], ("add_vec", site[2] * u))
        for mm, scale in stream.readers.items():
            op, index = weight_use(mm)
            if scale is not None:
                g_name = sig.param_name(irutil.block_arg_number(scale.arg()))
                if g_name not in store:
                    raise PassError(mm, f"no value for parameter '{g_name}' in the parameter store")
                edits.add(op, index, ("scale_cols", np.asarray(store[g_name], np.float64) + scale.offset))
            edits.add(op, index, ("cols", q))
        for mm in stream.writers:
            op, index = weight_use(mm)
            edits.add(op, index, ("rows", q))
        for op, index in stream.vectors:
            edits.add(op, index, ("vec", q))
        for op in stream.embeddings:
            edits.add(op, 0, ("cols", q))
        for gather, scale in stream.expert_readers.items():  # W_e [N, K] -> W_e diag(g) Q, every e
            if scale is not None:
                g_name = sig.param_name(irutil.block_arg_number(scale.arg()))
                edits.add(gather, 0, ("scale_cols", np.asarray(store[g_name], np.float64) + scale.offset))
            edits.add(gather, 0, ("cols", q))
        for gather in stream.expert_writers:  # W_e -> Q^T W_e
            edits.add(gather, 0, ("rows", q))
        if stream.online:  # Q = D H / sqrt(n): D's signs from Q's rows against H's
            signs = np.einsum("ij,ij->i", q, hadamard.hadamard_matrix(n)) / np.sqrt(n)
        for scale in stream.online.values():  # (v g) Q = (v (g D)) H / sqrt(n): g + o -> (g + o) D
            edits.add(scale.op, scale.index, ("scale_vec", signs))
            if scale.offset:
                edits.add(scale.op, scale.index, ("add_vec", scale.offset * (signs - 1.0)))
        online = []
        if opts.online != "none":
            # the writers, and the sublayers' last linears whose outputs a norm scales for the stream
            last = [mm for mm in map(sublayer_output, stream.online) if mm is not None and mm not in stream.writers]
            for mm in list(stream.writers) + last:
                if mm in stream.readers or (opts.online == "mlp" and not mlp_input(mm)):
                    continue
                k, name = shape_of(mm.operands[0])[-1], weight_name(func, mm)
                block = self._online_block(mm, k, name)
                if block:
                    op, index = weight_use(mm)
                    edits.add(op, index, ("cols", hadamard.block_matrix(k, block)))
                    online.append(([mm], block, name))
            for gather in stream.expert_writers:  # the experts' down projections: W_e H, rows x H
                columns = expert_columns(gather, opts.online == "mlp")
                k, name = shape_of(gather.operands[0])[-1], sig.param_name(irutil.block_arg_number(gather.operands[0]))
                block = self._online_block(gather, k, name) if columns else None
                if block:
                    edits.add(gather, 0, ("cols", hadamard.block_matrix(k, block)))
                    online.append((columns, block, name))
        return lambda: self._rewrite(module, func, stream, new_biases, online)

    def _online_block(self, op, k: int, name: str) -> int | None:
        """The Hadamard block of an online transform on the K = k input of weight `name` (the whole
        K when an order-k matrix is known); None, said in a remark, when no order divides k."""
        try:
            block = hadamard.block_size(k, self.options.online_block)
        except hadamard.HadamardError as e:
            raise PassError(op, f"online Hadamard on the input of '{name}': {e}")
        if block == 1:
            self.session.remarks.append(f"{self.name}: no Hadamard order divides K={k} of '{name}'; "
                                        f"no online transform there")
            return None
        if block != k:
            self.session.remarks.append(f"{self.name}: online Hadamard on '{name}' is block-diagonal "
                                        f"({k // block} blocks of {block}): no Hadamard matrix of order {k} is known")
        return block

    def _rewrite(self, module, func, stream, new_biases, online):
        """The graph's side of the rotation, after the weight edits are committed."""
        opts, n, sig = self.options, stream.hidden, irutil.Signature(func)
        view = calibration.view(self.session)
        for mm, w_name, u in new_biases:
            add_output_bias(func, self.session, mm, f"{w_name}:norm_bias", u)
            view.add_output_bias(w_name, u)
        for add, b_index in stream.norm_biases:
            view.params[sig.param_name(irutil.block_arg_number(add.operands[b_index]))] = np.zeros(n, np.float32)
            add.result.replace_all_uses_with(add.operands[1 - b_index])
            add.erase()
        for (mul, index), scale in stream.norm_scales.items():
            g = sig.param_name(irutil.block_arg_number(scale.arg()))
            view.params[g] = np.full(n, 1.0 - scale.offset, np.float32)  # g + offset = 1
            mul.result.replace_all_uses_with(mul.operands[index])
            mul.erase()
            if scale.op is not mul and not list(scale.op.result.uses):  # the `g + 1` read it alone
                scale.op.erase()
        for sites, block, w_name in online:  # linears' inputs, experts' rows (operand 0 of each)
            for op in sites:
                insert_online_hadamard(module, op, 0, block)
            view.add_input_transform(w_name, lambda x, block=block: hadamard.fast_transform(x, block))
        for op, scale in stream.online.items():
            hadamard_after(module, op)
            view.add_scaled_transform(sig.param_name(irutil.block_arg_number(scale.arg())), hadamard.fast_transform)
        view.version += 1
        what = "random Hadamard" if opts.rotation == "random-hadamard" else opts.rotation
        if stream.fixes_ones:
            what += " times the reflection keeping LayerNorm's all-ones vector"
        biases = f", {len(stream.norm_biases)} norm biases moved into the readers" if stream.norm_biases else ""
        experts = (f"{len(stream.expert_readers)} reading and {len(stream.expert_writers)} writing experts' weights, "
                   if stream.expert_readers or stream.expert_writers else "")
        after = f" ({len(stream.online)} on the stream after the norms writing to it)" if stream.online else ""
        self.session.remarks.append(
            f"{self.name}: rotated a {n}-channel residual stream ({what}): {len(stream.embeddings)} embedding(s), "
            f"{len(stream.readers)} readers, {len(stream.writers)} writers, {experts}{len(stream.norm_scales)} norm scales "
            f"absorbed{biases}, {len(online) + len(stream.online)} online Hadamard transform(s){after}")
