"""cpu-vectorize-contractions: f32 `linalg.batch_matmul` and float linear layers -> vector kernels.

The reference lowering turns a batch_matmul into a scalar loop nest whose
innermost loop is the reduction, read with a stride when B is a transpose
(attention's q @ k^T reads keys transposed by a 4 MB copy first).  This pass
calls `kernels.batch_matmul` instead: a transpose feeding B is folded away
(dot products along k over both operands), otherwise rows of C accumulate
along j; both vectorized, threaded over the rows of C.  Only zero-initialized,
f32 ops with a static batch size are rewritten; others keep the reference lowering.

A B that is a concatenation along its rows (attention over a KV cache plus the
step's new key or value: `torch.cat([cache, k], dim=2)`) is passed as its parts,
which the kernel reads in place: the concatenation, a copy of the whole cache per
layer and step, is never built; a part that is the f32 copy of an f16 tensor (a
cache kept in 16 bits, `cache.float()`) is read in 16 bits and widened in registers, and a
concatenation whose heads are repeated (grouped-query attention's repeat_kv) is read per KV
head (the rep query heads of a group read the same cache rows).
From TILED_MIN_M rows (prefill) without parts, or with
any size dynamic (a sequence length known at run time), `kernels.batch_matmul_tiled` runs
register tiles instead of rows.

A float linear layer (a layer the recipe keeps float, or a float model) arrives as
`linalg.matmul(x, transpose(W))`: it calls `kernels.matmul_bt`, which reads W in its
own layout (no transposed copy per call) in register tiles of dot products; M may
be dynamic (the token count).  Without it the layer ran as scalar loops at 0.7
GFLOP/s (128 x 2048 x 2048: 1563 ms against torch's 24.5).  `x @ W` with W [K, N] a
run-time tensor calls `kernels.matmul_kn`, the tiled outer-product kernel (a parameter W,
GPT-2's Conv1D, arrives as a linear layer: the frontend stores it transposed).
"""

import dataclasses
import struct

from torch_mlir import ir

from qcc import irutil
from qcc.passes import QccPass, register


# from this many rows of A (prefill), register tiles; fewer (decode: one query row against a
# KV cache, read in place as its parts) stay on batch_matmul's row kernels
TILED_MIN_M = 8
_MATMUL_MAPS = ("[affine_map<(d0, d1, d2) -> (d0, d2)>, affine_map<(d0, d1, d2) -> (d2, d1)>, "
                "affine_map<(d0, d1, d2) -> (d0, d1)>]")
_BATCH_MATMUL_MAPS = ("[affine_map<(d0, d1, d2, d3) -> (d0, d1, d3)>, affine_map<(d0, d1, d2, d3) -> (d0, d3, d2)>, "
                      "affine_map<(d0, d1, d2, d3) -> (d0, d1, d2)>]")


def _has_custom_maps(op, default: str) -> bool:
    """The op's indexing maps (printed) differ from its named op's plain ones (a transposed or
    broadcast operand)."""
    return "indexing_maps" in op.attributes and str(op.attributes["indexing_maps"]) != default


def _dims(value):
    """The f32 tensor's shape with None for dynamic sizes, or None for another element type."""
    return irutil.tensor_shape(value) if str(ir.RankedTensorType(value.type).element_type) == "f32" else None


def _shape(value):
    """The f32 tensor's static shape, or None."""
    dims = _dims(value)
    return None if dims is None or None in dims else dims


def _call_instead(op, callee: str, operands) -> None:
    """op -> func.call @callee(operands), then the producers only op read (a transpose, a fill)."""
    old_operands = list(op.operands)
    irutil.replace_with_call(op, callee, operands)
    for v in old_operands:
        irutil.erase_dead_producers(v)


def _perm(op) -> list:
    return list(ir.DenseI64ArrayAttr(op.attributes["permutation"]))


_COLLAPSE_BATCH = "[[0, 1], [2], [3]]"  # [1, heads, rows, cols] -> [heads, rows, cols]


def _transposed_source(b_value):
    """(value Bt with B = Bt^T over the last two dims, ops to build it) or None."""
    op = irutil.defining_op(b_value)
    if op is None:
        return None
    if op.name == "linalg.transpose" and _perm(op) == [0, 2, 1]:
        return op.operands[0], None
    if op.name == "tensor.collapse_shape":
        src = irutil.defining_op(op.operands[0])
        if src is not None and src.name == "linalg.transpose" and _perm(src) == [0, 1, 3, 2] \
                and str(op.attributes["reassociation"]) == _COLLAPSE_BATCH:
            return src.operands[0], op.attributes["reassociation"]
    return None


def _repeat_source(value):
    """(source, rep) when `value` [b, kv_heads, rep, rows, k] repeats each head of `source`
    [b, kv_heads, rows, k] rep times (grouped-query attention's repeat_kv: a broadcast
    generic, which a collapse of dims 1-2 makes [b, heads, rows, k]), else None."""
    g = irutil.defining_op(value)
    if g is None or g.name != "linalg.generic" or len(g.operands) != 2 \
            or [str(m) for m in ir.ArrayAttr(g.attributes["indexing_maps"])] != _REPEAT_MAPS \
            or [o.name for o in g.regions[0].blocks[0].operations] != ["linalg.yield"]:
        return None
    return g.operands[0], irutil.tensor_shape(g.results[0])[2]


def _collapse_of(value):
    """(reassociation as printed, source) when `value` is a tensor.collapse_shape, else (None, None)."""
    op = irutil.defining_op(value)
    if op is None or op.name != "tensor.collapse_shape":
        return None, None
    return str(op.attributes["reassociation"]), op.operands[0]


_REPEAT_MAPS = ["affine_map<(d0, d1, d2, d3, d4) -> (d0, d1, d3, d4)>",
                "affine_map<(d0, d1, d2, d3, d4) -> (d0, d1, d2, d3, d4)>"]
_COLLAPSE_REPEAT = "[[0], [1, 2], [3], [4]]"        # -> [b, heads, rows, k]
_COLLAPSE_REPEAT_BATCH = "[[0, 1, 2], [3], [4]]"    # -> [b * heads, rows, k]


def _concat_parts(value, reassociation, whole: bool = False):
    """(parts, their shapes, reassociation, rep) when `value` (B or Bt as the kernel reads it,
    or its 4-D source that `reassociation` collapses) is a tensor.concat along its rows, or
    rep copies of each head of one (repeat_kv); the parts are 4-D exactly when the returned
    reassociation is set.  With `whole`, a value that is no concatenation is one part (a
    static cache read whole).  Else None."""
    rep = 1
    kind, src = _collapse_of(value)
    if reassociation is None and kind == _COLLAPSE_BATCH:  # B itself: [b, heads, rows, k] collapsed
        reassociation, value = irutil.defining_op(value).attributes["reassociation"], src
        kind, src = _collapse_of(value)
    elif reassociation is None and kind == _COLLAPSE_REPEAT_BATCH:  # repeated heads and batch in one
        reassociation, kind = ir.Attribute.parse(_COLLAPSE_BATCH), _COLLAPSE_REPEAT
    repeated = _repeat_source(src) if reassociation is not None and kind == _COLLAPSE_REPEAT else None
    if repeated:
        value, rep = repeated
    op = irutil.defining_op(value)
    rank = ir.RankedTensorType(value.type).rank
    if rank != (4 if reassociation is not None else 3):
        return None
    if op is not None and op.name == "tensor.concat":
        if ir.IntegerAttr(op.attributes["dim"]).value != rank - 2:
            return None
        operands = list(op.operands)
    elif whole:
        operands = [value]
    else:
        return None
    parts = [_widened_source(v) or v for v in operands]
    shapes = [irutil.tensor_shape(v) for v in parts]
    if any(None in shape[:-2] + shape[-1:] for shape in shapes):  # only the stacked rows may be dynamic
        return None
    return parts, shapes, reassociation, rep


def _widened_source(value):
    """The f16 tensor that `value` is the f32 copy of (a KV cache kept in 16 bits:
    `cache.float()` is an elementwise linalg.generic of one arith.extf), or None.  The kernel
    reads the 16-bit source and widens it in registers, so the f32 copy is never built."""
    op = irutil.defining_op(value)
    if op is None or op.name != "linalg.generic" or len(op.operands) != 2:
        return None
    src = op.operands[0]
    maps = [str(m) for m in ir.ArrayAttr(op.attributes["indexing_maps"])]
    if _elem(src) not in _NARROW or maps[0] != maps[1] or "reduction" in str(op.attributes["iterator_types"]):
        return None
    body = [o.name for o in op.regions[0].blocks[0].operations]
    return src if body == ["arith.extf", "linalg.yield"] else None


_NARROW = ("f16",)  # bf16 would work alike; no bf16 tensor reaches here (model inputs are numpy dtypes)


def _elem(value) -> str:
    return str(ir.RankedTensorType(value.type).element_type)


def _b_operand(b, m, n, k, parts_path: bool, whole: bool = False):
    """(transposed source or None, B or that source, its batch collapse, the parts or None);
    `whole`: B read whole is one part (see _concat_parts)."""
    src = _transposed_source(b)
    operand_b, reassociation = src if src is not None else (b, None)
    stacked_only = (k if src is not None else n) is not None  # only B's stacked rows may be dynamic
    split = _concat_parts(operand_b, reassociation, whole) if parts_path and stacked_only else None
    return src, operand_b, reassociation, split


def _scale_constant(g):
    """c when the elementwise linalg.generic `g` (one input) yields input * c for an f32
    constant c (an arith.constant, or the truncf of an f64 one, in or outside the body)."""
    if g is None or g.name != "linalg.generic" or len(g.operands) != 2 \
            or "reduction" in str(g.attributes["iterator_types"]):
        return None
    maps = [str(m) for m in ir.ArrayAttr(g.attributes["indexing_maps"])]
    block = g.regions[0].blocks[0]
    body = [o.operation for o in block.operations]
    if maps[0] != maps[1] or [o.name for o in body][-2:] != ["arith.mulf", "linalg.yield"]:
        return None
    mul, x = body[-2], block.arguments[0]
    if body[-1].operands[0] != mul.result or x not in list(mul.operands):
        return None
    chain = [mul.operands[1] if mul.operands[0] == x else mul.operands[0]]  # c, then what it is made of
    cop = irutil.defining_op(chain[0])
    if cop is not None and cop.name == "arith.truncf":
        chain.append(cop.operands[0])
        cop = irutil.defining_op(chain[1])
    if cop is None or cop.name != "arith.constant":
        return None
    # nothing else in the body: the ops before the mulf are the constant's own chain
    if any(o.result not in chain for o in body[:-2]):
        return None
    return float(ir.FloatAttr(cop.attributes["value"]).value)


def _unscaled(b, op):
    """(the value B scales, c, the op built for it or None) when B is an elementwise
    multiplication by an f32 constant c, or the batch collapse of one (then the same collapse
    of the unscaled value is built before `op`); else None."""
    kind, src = _collapse_of(b)
    g = irutil.defining_op(src if kind == _COLLAPSE_BATCH else b)
    c = _scale_constant(g)
    if c is None or ir.RankedTensorType(g.operands[0].type).element_type != ir.F32Type.get():
        return None
    if kind != _COLLAPSE_BATCH:
        return g.operands[0], c, None
    with ir.InsertionPoint(op), op.location:
        collapse = ir.Operation.create("tensor.collapse_shape", results=[b.type], operands=[g.operands[0]],
                                       attributes={"reassociation": irutil.defining_op(b).attributes["reassociation"]})
    return collapse.result, c, collapse


def _collapsed(value, shape, reassociation):
    if reassociation is None:
        return value
    return ir.Operation.create("tensor.collapse_shape", results=[irutil.tensor_type(
        [shape[0] * shape[1]] + shape[2:], _elem(value))], operands=[value],
        attributes={"reassociation": reassociation}).result


@register
class CpuVectorizeContractions(QccPass):
    name = "cpu-vectorize-contractions"
    summary = "Replace f32 linalg.batch_matmul by vectorized, threaded CPU kernels"

    @dataclasses.dataclass
    class Options:
        lanes: int = 8
        threads: bool = True

    def run(self, module):
        from qcc.backends.cpu import kernels

        defined = set()
        for func in irutil.functions(module):
            for op in irutil.walk(func, "linalg.matmul"):
                self._float_linear(op, module, defined, kernels)
            for op in irutil.walk(func, "linalg.batch_matmul"):
                a, b, c = op.operands[0], op.operands[1], op.operands[2]
                sa, sb, sc = _dims(a), _dims(b), _dims(c)
                if None in (sa, sb, sc) or sa[0] is None or not irutil.zero_filled(c) or _has_custom_maps(op, _BATCH_MATMUL_MAPS):
                    continue
                static = None not in sa + sb + sc
                nb, m, k = sa
                n = sc[2]
                # the parts path: one or a few query rows (decode) against stacked rows of B that
                # may have a run-time count (a KV cache of any length); the other sizes static
                parts_path = m is not None and (static or m < TILED_MIN_M)
                src, operand_b, reassociation, split = _b_operand(b, m, n, k, parts_path)
                b_scale, built = None, None
                if split is None and parts_path:  # B = parts * c (scaled_dot_product_attention's k^T)
                    unscaled = _unscaled(b, op)
                    if unscaled is not None:  # a cache read whole (a static cache) is one part:
                        b_unscaled, c_value, built = unscaled  # its scaled copy is never built
                        found = _b_operand(b_unscaled, m, n, k, parts_path, whole=True)
                        if found[3] is not None:
                            (src, operand_b, reassociation, split), b_scale = found, c_value
                rep = 1
                if split is not None:
                    operands_b, shapes, reassociation, rep = split
                    parts = tuple(shape[-2] for shape in shapes)
                    elems = tuple(_elem(v) for v in operands_b)
                else:
                    operands_b, shapes, parts, elems = [operand_b], [_dims(operand_b)], None, None
                # a dynamic size (a sequence length known at run time) takes the tiled kernel too
                tiled = parts is None and (not static or m >= TILED_MIN_M)
                form = "tiled" if tiled else "dot" if src else "axpy"
                sizes = "x".join("d" if d is None else str(d) for d in (nb, m, n, k))
                kname = f"qcc_cpu_bmm_{form}{'_t' if tiled and src else ''}_{sizes}" + \
                    (f"_parts{'_'.join(('d' if r is None else str(r)) + (e if e != 'f32' else '') for r, e in zip(parts, elems))}"
                     if parts else "") + (f"_rep{rep}" if rep > 1 else "") + \
                    (f"_scaled{struct.unpack('<I', struct.pack('<f', b_scale))[0]:08x}" if b_scale is not None else "")
                if kname not in defined:
                    text = kernels.batch_matmul_tiled(kname, nb, m, n, k, self.options.lanes, src is not None,
                                                      self.options.threads) if tiled else \
                        kernels.batch_matmul(kname, nb, m, n, k, self.options.lanes, src is not None,
                                             self.options.threads, parts, elems, rep, b_scale)
                    irutil.append_functions(module, text, defined)
                with ir.InsertionPoint(op), op.location:
                    operands_b = [_collapsed(v, shape, reassociation) for v, shape in zip(operands_b, shapes)]
                _call_instead(op, kname, [a, *operands_b])  # the transpose, the concatenation go
                if built is not None:  # the collapse built to look through the scaling
                    irutil.erase_dead_producers(built.result)

    def _float_linear(self, op, module, defined, kernels) -> None:
        """A float linalg.matmul (a float linear layer, M static or not): x @ transpose(W) -> matmul_bt,
        x @ W -> matmul_kn."""
        a, b, c = op.operands[0], op.operands[1], op.operands[2]
        ta, tc = ir.RankedTensorType(a.type), ir.RankedTensorType(c.type)
        if _has_custom_maps(op, _MATMUL_MAPS) or str(ta.element_type) != "f32" or not irutil.zero_filled(c):
            return
        if ta.is_dynamic_dim(1) or tc.is_dynamic_dim(1):
            return
        m = None if ta.is_dynamic_dim(0) else ta.shape[0]
        t = irutil.defining_op(b)
        if t is not None and t.name == "linalg.transpose" and _perm(t) == [1, 0] and _shape(t.operands[0]):
            operand = t.operands[0]  # x @ W^T: W [N, K] read as it lies
            n, k = _shape(operand)
            kname = f"qcc_cpu_matmul_bt_{'d' if m is None else m}x{n}x{k}"
            text = lambda: kernels.matmul_bt(kname, m, n, k, self.options.lanes, self.options.threads)  # noqa: E731
        elif _shape(b):  # x @ W with W [K, N] (a Conv1D-style layer): outer-product tiles
            operand = b
            k, n = _shape(b)
            kname = f"qcc_cpu_matmul_kn_{'d' if m is None else m}x{n}x{k}"
            text = lambda: kernels.matmul_kn(kname, m, n, k, self.options.lanes, self.options.threads)  # noqa: E731
        else:
            return
        if kname not in defined:
            irutil.append_functions(module, text(), defined)
        _call_instead(op, kname, [a, operand])  # the transposed copy of W, the zero fill go
