"""linalg ops as CUDA kernels, written against the emit.py DSL (MLIR text or SIMT emulation).

The host walker (host_plan.py) turns every bufferized ``linalg.generic`` (and
``memref.copy``) into a :class:`GenericDesc`: static loop extents and iterator kinds,
each operand as a strided view (element type, shape, strides, affine indexing map), and
the op's body as a list of :class:`BodyOp` records. :func:`build_kernel` makes one
:class:`~qcc.backends.cuda.emit.KernelSpec` from it. Every buffer is a flat 1-D memref
(bare pointer) that starts at the view's first element; the kernel computes flat indices
from the loop indices itself, so views with any static strides and offsets need no
descriptor, and the same kernel serves every call site with the same shapes.

Thread mappings:

* ``elementwise`` (no reduction dims): one thread per point of the iteration space,
  linearised with the last loop dim fastest (coalesced for row-major outputs), 256
  threads a block.
* ``warp_reduce`` (reductions whose body is ``out = combine(out, f(ins))`` with an
  associative ``combine``: sums, max/min, products, matmul-like contractions): one warp
  per output point; lanes stride over the reduction space with the accumulator in a
  register (starting at combine's identity), then a ``gpu.shuffle xor`` butterfly; lane 0
  combines with the initial output value (or the folded ``linalg.fill`` constant).
* ``block_reduce`` (the same, few outputs and a long reduction, e.g. RMSNorm at decode):
  256 threads per output point, warp butterflies, then the 8 warp partials through
  shared memory.
* ``tile_contract`` (the same combining reductions when two output dims a, b of at least
  TILE_MIN points split the operands: no read depends on both, e.g. a matmul's rows and
  columns, attention's query and key positions): a block of 16 x 16 threads owns a tile of
  (a, b), each thread 2-4 x 2-4 consecutive outputs (read from shared memory as vectors).
  Per chunk of reduction steps the block computes
  the body's a-side and b-side values (loads and elementwise producers, e.g. RoPE fused
  into q @ k^T) once each into shared memory (double-buffered, the next chunk's loads in
  flight during the products), then every thread combines its outputs from there, in the
  sequential order of the reduction.
* ``serial`` (any other reduction, e.g. argmax's two coupled outputs): one thread per
  output point, the reduction loop inside the thread with the outputs in registers.

Floating-point reductions are reassociated (lane partials, then the butterfly); results
differ from a sequential loop by rounding only.

This module imports nothing beyond the standard library and emit.py.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field

from .emit import MAX_STATIC_SMEM, KernelSpec, Param, bitwidth, parse_type

BLOCK = 256
WARPS = 8
REDUCE_UNROLL = 4  # reduction steps whose loads a thread issues together
TILE_MIN = 32  # tile_contract: least extent of both tiled output dims
TILE_MIN_BLOCKS = 256  # tile_contract takes the largest tile that leaves this many blocks (H200 sweep)
TILE_CHUNK = 16  # tile_contract: reduction steps staged a chunk ...
TILE_CHUNK_LONG = (256, 32)  # ... and (from this many steps) a longer chunk, if it fits


class UnsupportedOp(ValueError):
    """A linalg op (or body op) this generator cannot turn into a kernel."""


# --------------------------------------------------------------------------- description


@dataclass
class Operand:
    """A strided view bound to one kernel parameter (or a scalar constant)."""

    elem: str  # MLIR element type: f32, f16, i8, i32, i64, i1, ...
    shape: tuple[int, ...]
    strides: tuple[int, ...]  # in elements
    map: list  # affine AST per result dim over the loop dims (see _eval)
    const: tuple | None = None  # scalar operand: (attr text, python value)
    alias: bool = False  # shares memory with another operand of the same op

    @property
    def span(self) -> int:
        """Elements from the view's first element to its last (the param memref size)."""
        if self.const is not None:
            return 0
        return 1 + sum((n - 1) * s for n, s in zip(self.shape, self.strides)) if all(self.shape) else 0


@dataclass
class Capture:
    """A buffer read inside the body (``memref.load``, e.g. an embedding table)."""

    elem: str
    shape: tuple[int, ...]
    strides: tuple[int, ...]
    alias: bool = False

    @property
    def span(self) -> int:
        return 1 + sum((n - 1) * s for n, s in zip(self.shape, self.strides))


@dataclass
class BodyOp:
    """One scalar op of a linalg body. Operand refs: ("arg", i) block argument,
    ("op", j, k) result k of body op j, ("idx", d) linalg.index d, ("cap", c) capture c."""

    name: str
    operands: list
    types: list[str]
    attrs: str = ""
    info: dict = field(default_factory=dict)


@dataclass
class GenericDesc:
    loops: list[int]
    iters: list[str]  # "parallel" | "reduction"
    ins: list[Operand]
    outs: list[Operand]
    body: list[BodyOp]
    yields: list  # refs, one per output
    captures: list[Capture] = field(default_factory=list)
    out_init: dict = field(default_factory=dict)  # out index -> (attr text, value): folded fill
    tag: str = "generic"

    @property
    def n_in(self) -> int:
        return len(self.ins)


def copy_desc(elem: str, shape, src_strides, dst_strides) -> GenericDesc:
    """dst[i...] = src[i...] (memref.copy between two views of one shape)."""
    ident = [("d", i) for i in range(len(shape))]
    return GenericDesc(list(shape), ["parallel"] * len(shape),
                       [Operand(elem, tuple(shape), tuple(src_strides), list(ident))],
                       [Operand(elem, tuple(shape), tuple(dst_strides), list(ident))],
                       [], [("arg", 0)], tag="copy")


# --------------------------------------------------------------------------- index arithmetic


def _ix(E, v):
    return v if not isinstance(v, int) else E.const(v, "index")


def _add(E, a, b):
    if isinstance(a, int) and isinstance(b, int):
        return a + b
    if isinstance(a, int) and a == 0:
        return b
    if isinstance(b, int) and b == 0:
        return a
    return _ix(E, a) + _ix(E, b)


def _mul(E, a, b):
    if isinstance(a, int) and isinstance(b, int):
        return a * b
    if isinstance(a, int):
        a, b = b, a
    if b == 0:
        return 0
    if b == 1:
        return a
    return a * _ix(E, b)


def _div(E, a, b):
    if isinstance(a, int) and isinstance(b, int):
        return a // b
    if isinstance(b, int) and b == 1:
        return a
    return _ix(E, a) // _ix(E, b)


def _mod(E, a, b):
    if isinstance(a, int) and isinstance(b, int):
        return a % b
    if isinstance(b, int) and b == 1:
        return 0
    return _ix(E, a) % _ix(E, b)


def _eval(E, expr, dims):
    """Affine AST -> index value (or int). ("d", i) | ("c", v) | (op, a, b), op in + * fd cd mod.
    Loop indices are non-negative, so floordiv/mod by positive constants are unsigned ops."""
    k = expr[0]
    if k == "d":
        return dims[expr[1]]
    if k == "c":
        return expr[1]
    a, b = _eval(E, expr[1], dims), _eval(E, expr[2], dims)
    if k == "+":
        return _add(E, a, b)
    if k == "*":
        return _mul(E, a, b)
    if k == "fd":
        return _div(E, a, b)
    if k == "cd":
        return _div(E, _add(E, a, _add(E, b, -1) if isinstance(b, int) else b - 1), b)
    if k == "mod":
        return _mod(E, a, b)
    raise UnsupportedOp(f"affine expression {expr}")


class Points:
    """The index arithmetic below (_flat, _decompose, _eval) over numpy arrays in place of an
    emitter: every loop point at once, for the plan passes' access checks."""

    @staticmethod
    def const(value, t):
        return value


def _flat(E, op: Operand, dims):
    idx = 0
    for expr, stride in zip(op.map, op.strides):
        idx = _add(E, idx, _mul(E, _eval(E, expr, dims), stride))
    return idx


def flat_at_points(op: Operand, loops) -> "np.ndarray":
    """The element `op` reads or writes at each linear loop point 0 .. prod(loops) - 1 (row-major
    loops; every point, so maps with floordiv / mod are checked as they are)."""
    import numpy as np

    p = np.arange(math.prod(loops))
    dims = list(np.unravel_index(p, loops)) if loops else []
    return np.broadcast_to(_flat(Points, op, dims), p.shape)


def _decompose(E, lin, extents):
    """Linear index -> one index per extent (last fastest); unit extents give 0."""
    out = [0] * len(extents)
    rest = lin
    nz = [i for i, n in enumerate(extents) if n != 1]
    for pos, i in enumerate(reversed(nz)):
        n = extents[i]
        if pos == len(nz) - 1:
            out[i] = rest
        else:
            out[i] = _mod(E, rest, n)
            rest = _div(E, rest, n)
    return out


# --------------------------------------------------------------------------- body replay

_COMBINERS = ("arith.addf", "arith.mulf", "arith.maximumf", "arith.minimumf", "arith.maxnumf",
              "arith.minnumf", "arith.addi", "arith.muli", "arith.andi", "arith.ori", "arith.xori",
              "arith.maxsi", "arith.minsi", "arith.maxui", "arith.minui")


def _identity(name: str, t: str):
    e = parse_type(t)[1]
    if name in ("arith.addf", "arith.addi", "arith.ori", "arith.xori", "arith.maxui"):
        return 0.0 if name == "arith.addf" else 0
    if name in ("arith.mulf", "arith.muli"):
        return 1.0 if name == "arith.mulf" else 1
    if name in ("arith.maximumf", "arith.maxnumf"):
        return -math.inf
    if name in ("arith.minimumf", "arith.minnumf"):
        return math.inf
    w = {"i1": 1, "i8": 8, "i16": 16, "i32": 32, "i64": 64, "index": 64}[e]
    if name == "arith.andi" or name == "arith.minui":
        return (1 << w) - 1
    if name == "arith.maxsi":
        return 1 << (w - 1)  # INT_MIN, two's complement bits
    if name == "arith.minsi":
        return (1 << (w - 1)) - 1
    raise UnsupportedOp(name)


def _combiner(desc: GenericDesc):
    """(body index of the combining op, ref of the combined value) when the single output's
    update is out' = combine(out, v) with v independent of out; else None."""
    if len(desc.outs) != 1 or not desc.yields or desc.yields[0][0] != "op":
        return None
    j = desc.yields[0][1]
    op = desc.body[j]
    out_arg = ("arg", desc.n_in)
    if op.name not in _COMBINERS or len(op.operands) != 2 or out_arg not in op.operands:
        return None
    other = op.operands[1] if op.operands[0] == out_arg else op.operands[0]
    if other == out_arg:
        return None
    uses = sum(r == out_arg for b in desc.body for r in b.operands)
    if uses != 1:
        return None
    return j, other


class _Replay:
    def __init__(self, E, desc, a):
        self.E, self.desc, self.a = E, desc, a

    def run(self, args, dims, skip=(), upto=None, ops=None, vals=None):
        """Replays body ops [0, upto) (all when None) except `skip` -- or exactly the ops in
        `ops` -- into `vals` ((op, result) -> value, values of ops replayed before); returns a
        ref resolver."""
        E, desc = self.E, self.desc
        vals = {} if vals is None else vals

        def get(ref):
            k = ref[0]
            if k == "arg":
                v = args[ref[1]]
                if v is None:
                    raise UnsupportedOp("body reads an operand that was not loaded")
                return v
            if k == "idx":
                return _ix(E, dims[ref[1]])
            if k == "op":
                return vals[(ref[1], ref[2])]
            raise UnsupportedOp(f"bad ref {ref}")

        if ops is None:
            ops = [j for j in range(len(desc.body) if upto is None else upto) if j not in skip]
        for j in ops:
            for k, v in enumerate(self.op(desc.body[j], get)):
                vals[(j, k)] = v
        return get

    def op(self, op, get):
        """The results of one body op, its operands resolved by get(ref)."""
        E = self.E
        if op.name == "memref.load":
            c = op.operands[0][1]
            cap = self.desc.captures[c]
            flat = 0
            for r, s in zip(op.operands[1:], cap.strides):
                flat = _add(E, flat, _mul(E, get(r), s))
            return [E.load(self.a[f"cap{c}"], _ix(E, flat))]
        if op.name == "affine.apply":
            return [_ix(E, _eval(E, op.info["expr"], [get(r) for r in op.operands]))]
        if op.name == "qcc.powi":  # math.fpowi by a small constant: repeated products
            x = get(op.operands[0])
            n_ = op.info["n"]
            r = None
            for _ in range(abs(n_)):
                r = x if r is None else E.raw("arith.mulf", [r, x], [x.type], "")[0]
            one = E.const(1.0, x.type)
            if r is None:
                r = one
            if n_ < 0:
                r = E.raw("arith.divf", [one, r], [x.type], "")[0]
            return [r]
        return E.raw(op.name, [get(r) for r in op.operands], op.types, op.attrs, op.info)


def _used_args(desc: GenericDesc) -> set[int]:
    used = {r[1] for b in desc.body for r in b.operands if r[0] == "arg"}
    used |= {r[1] for r in desc.yields if r[0] == "arg"}
    return used


# --------------------------------------------------------------------------- kernels


def _params(desc: GenericDesc) -> list[Param]:
    ps = []
    for i, op in enumerate(desc.ins):
        if op.const is None:
            ps.append(Param(f"in{i}", f"memref<{max(op.span, 1)}x{op.elem}>",
                            "alias" if op.alias else "in"))
    for i, op in enumerate(desc.outs):
        ps.append(Param(f"out{i}", f"memref<{max(op.span, 1)}x{op.elem}>",
                        "alias" if op.alias else "out"))
    for c, cap in enumerate(desc.captures):
        ps.append(Param(f"cap{c}", f"memref<{cap.span}x{cap.elem}>", "alias" if cap.alias else "in"))
    return ps


def _load_in(E, a, desc, i, dims):
    """Input i of desc at loop point `dims` (a scalar constant as a constant)."""
    op = desc.ins[i]
    if op.const is not None:
        return E.raw("arith.constant", [], [op.elem], f"value = {op.const[0]}", {"value": op.const[1]})[0]
    return E.load(a[f"in{i}"], _ix(E, _flat(E, op, dims)))


def _load_ins(E, a, desc, dims, used):
    return [_load_in(E, a, desc, i, dims) if i in used else None for i in range(desc.n_in)]


def _init_out(E, a, desc, k, dims):
    if k in desc.out_init:
        text, value = desc.out_init[k]
        return E.raw("arith.constant", [], [desc.outs[k].elem], f"value = {text}", {"value": value})[0]
    return E.load(a[f"out{k}"], _ix(E, _flat(E, desc.outs[k], dims)))


_INDEX_OPS = ("arith.maxsi", "arith.minsi", "arith.maxui", "arith.minui", "arith.addi", "arith.subi",
              "arith.muli", "arith.select", "arith.cmpi", "arith.index_cast", "arith.remsi", "arith.divsi",
              "affine.apply")


def _loop_dims(desc: GenericDesc, ref) -> set:
    """The loop dims an index value of the body is computed from (None: something else, e.g.
    a loaded value)."""
    if ref[0] == "idx":
        return {ref[1]}
    if ref[0] != "op":
        return {None}
    op = desc.body[ref[1]]
    if op.name == "arith.constant":
        return set()
    if op.name not in _INDEX_OPS:
        return {None}
    out = set()
    for r in op.operands:
        out |= _loop_dims(desc, r)
    return out


def _access(desc: GenericDesc, k: int, ins=None, body=None) -> list[tuple[int, int]]:
    """(elements, kind) of every buffer the op reads (of inputs `ins` and body ops `body`
    only, when given), for lanes along loop dim k: kind 0 = the address does not depend on k
    (one load serves the warp), 1 = consecutive k are consecutive elements (coalesced), 2 =
    anything else (a transaction per lane)."""
    out = []
    for i, op in enumerate(desc.ins):
        if op.const is not None or not op.map or (ins is not None and i not in ins):
            continue
        uses = [i for i, e in enumerate(op.map) if k in _expr_dims(e)]
        kind = 0 if not uses else 1 if (uses == [len(op.map) - 1] and op.map[-1] == ("d", k)
                                        and op.strides[-1] == 1) else 2
        out.append((op.span, kind))
    for j, b in enumerate(desc.body):
        if b.name == "memref.load" and (body is None or j in body):
            cap = desc.captures[b.operands[0][1]]
            dims = [_loop_dims(desc, r) for r in b.operands[1:]]
            uses = [i for i, d in enumerate(dims) if k in d or None in d]
            kind = 0 if not uses else 1 if (uses == [len(dims) - 1] and dims[-1] == {k}
                                            and cap.strides[-1] == 1) else 2
            out.append((math.prod(cap.shape), kind))
    return out


def _expr_dims(e) -> set:
    if e[0] == "d":
        return {e[1]}
    if e[0] == "c":
        return set()
    return _expr_dims(e[1]) | _expr_dims(e[2])


def _lane_dim(desc: GenericDesc):
    """The parallel loop dim lanes should run along (split_reduce), or None for lanes along
    the reduction: the one that leaves the fewest elements read a transaction per lane."""
    red = [i for i, t in enumerate(desc.iters) if t == "reduction"]

    def cost(k):
        return sum(n for n, kind in _access(desc, k) if kind == 2)
    best, best_cost = None, cost(red[-1])
    for p in (i for i, t in enumerate(desc.iters) if t == "parallel" and desc.loops[i] >= 32):
        c = cost(p)
        if c < best_cost:
            best, best_cost = p, c
    return best


_STAGEABLE = ("f16", "f32", "f64", "i8", "i16", "i32", "i64")


@dataclass
class _Contract:
    """How a combining reduction runs as tile_contract (see the module doc)."""

    a: int  # loop dim of the tile's rows (threads' slow dim)
    b: int  # loop dim of the tile's columns (consecutive threads: the output's contiguous dim)
    j_comb: int
    v_ref: tuple
    inner: list  # body ops evaluated per output point and step (their value needs both a and b)
    staged: dict  # "a"/"b" -> refs whose values the block stages in shared memory
    producers: dict  # "a"/"b" -> body ops replayed to compute that side's staged values
    args: dict  # "a"/"b" -> input operands that side loads
    k_fast: dict  # "a"/"b" -> stage consecutive reduction steps on consecutive threads

    def elem(self, desc, ref) -> str:
        return desc.ins[ref[1]].elem if ref[0] == "arg" else desc.body[ref[1]].types[ref[2]]


def _reads(desc: GenericDesc):
    """The loop dims each read depends on: input operands, then captured-buffer loads (None
    when an address is computed from loaded data)."""
    ins = [set().union(*(_expr_dims(e) for e in op.map)) if op.const is None and op.map else set()
           for op in desc.ins]
    caps = []
    for b in desc.body:
        if b.name == "memref.load":
            dims = set().union(*(_loop_dims(desc, r) for r in b.operands[1:]))
            caps.append(None if None in dims else dims)
    return ins, caps


def _contract(desc: GenericDesc):
    """A _Contract for `desc`, or None when tile_contract does not apply."""
    comb = _combiner(desc)
    red = [i for i, t in enumerate(desc.iters) if t == "reduction"]
    if comb is None or math.prod(desc.loops[i] for i in red) < 16:
        return None
    j_comb, v_ref = comb
    ins, caps = _reads(desc)
    if any(c is None for c in caps):
        return None
    reads = [r for r, op in zip(ins, desc.ins) if op.const is None and op.map] + caps
    par = [i for i, t in enumerate(desc.iters) if t == "parallel" and desc.loops[i] >= TILE_MIN]
    out = desc.outs[0]
    best = None
    for x in par:
        for y in par:
            if x >= y or any(x in r and y in r for r in reads):
                continue
            if not any(x in r for r in reads) or not any(y in r for r in reads):
                continue
            stride = {d: sum(s for e, s in zip(out.map, out.strides) if d in _expr_dims(e)) for d in (x, y)}
            a, b = (x, y) if stride[y] <= stride[x] else (y, x)
            key = desc.loops[x] * desc.loops[y]
            if best is None or key > best[0]:
                best = (key, a, b)
    if best is None:
        return None
    _, a, b = best

    def side(dims):
        return frozenset(n for n, d in (("a", a), ("b", b)) if d in dims)

    deps = []  # per body op before the combine: which of a, b its value varies with
    for op in desc.body[:j_comb]:
        dep = frozenset()
        for r in op.operands:
            if r[0] == "arg":
                dep |= side(ins[r[1]]) if r[1] < desc.n_in else frozenset("ab")
            elif r[0] == "idx":
                dep |= side({r[1]})
            elif r[0] == "op":
                dep |= deps[r[1]]
        deps.append(dep)

    def dep_of(ref):
        return side(ins[ref[1]]) if ref[0] == "arg" else deps[ref[1]]
    if v_ref[0] not in ("arg", "op") or dep_of(v_ref) != frozenset("ab"):
        return None
    inner = [j for j in range(j_comb) if deps[j] == frozenset("ab") or
             (desc.body[j].name == "arith.constant")]
    staged = {"a": [], "b": []}
    for j in inner:
        for r in desc.body[j].operands:
            if r[0] == "idx" and deps[j]:
                return None  # an inner op reading a loop index: not worth a tile
            if r[0] in ("arg", "op") and (r[0] == "arg" or r[1] not in inner):
                s = "b" if dep_of(r) == frozenset("b") else "a"
                if r not in staged[s]:
                    staged[s].append(r)
    producers, args = {}, {}
    for s in "ab":
        need, todo = set(), [r for r in staged[s] if r[0] == "op"]
        used = {r[1] for r in staged[s] if r[0] == "arg"}
        while todo:
            j = todo.pop()[1]
            if j in need:
                continue
            need.add(j)
            for r in desc.body[j].operands:
                if r[0] == "op":
                    todo.append(r)
                elif r[0] == "arg":
                    used.add(r[1])
        producers[s], args[s] = need, used
    c = _Contract(a, b, j_comb, v_ref, inner, staged, producers, args, {})
    if any(c.elem(desc, r) not in _STAGEABLE for s in "ab" for r in staged[s]):
        return None
    k = red[-1]
    for s, d in (("a", a), ("b", b)):  # stage along k where that side's reads are contiguous
        cost = {dd: sum(n for n, kind in _access(desc, dd, args[s], producers[s]) if kind == 2)
                for dd in (k, d)}
        c.k_fast[s] = cost[k] <= cost[d]
    return c


@dataclass(frozen=True)
class _Tile:
    """A tile_contract block: na x nb threads, each ta x tb outputs (contiguous along a and b:
    the shared-memory reads of a thread's values are vector loads), bk reduction steps a chunk."""

    na: int
    nb: int
    ta: int
    tb: int
    bk: int

    def span(self, s: str) -> int:
        return self.na * self.ta if s == "a" else self.nb * self.tb

    def pitch(self, s: str) -> int:
        """Shared row pitch of side s: padded by a 16-byte multiple (vector loads stay aligned;
        the staging stores of consecutive reduction steps spread over the banks)."""
        return self.span(s) + TILE_PAD


TILE_PAD = 4
# (threads along a, along b, outputs a thread along a, along b), largest tile first
TILE_SHAPES = ((16, 16, 4, 4), (16, 16, 2, 4), (16, 16, 4, 2), (16, 16, 2, 2))


def _tile_config(desc: GenericDesc, c: _Contract) -> _Tile | None:
    """The largest tile whose grid keeps TILE_MIN_BLOCKS blocks (else the smallest), and longer
    chunks for long reductions when shared memory allows; None when nothing fits."""
    others = math.prod(n for i, (n, t) in enumerate(zip(desc.loops, desc.iters))
                       if t == "parallel" and i not in (c.a, c.b))
    R = math.prod(n for n, t in zip(desc.loops, desc.iters) if t == "reduction")
    La, Lb = desc.loops[c.a], desc.loops[c.b]
    grids = [others * -(-La // (na * ta)) * -(-Lb // (nb * tb)) for na, nb, ta, tb in TILE_SHAPES]
    order = [t for t, g in zip(TILE_SHAPES, grids) if g >= TILE_MIN_BLOCKS] + [TILE_SHAPES[-1]]
    for shape in order:
        for bk in ((TILE_CHUNK_LONG[1], TILE_CHUNK) if R >= TILE_CHUNK_LONG[0] else (TILE_CHUNK,)):
            tile = _Tile(*shape, bk)
            if _tile_smem(desc, c, tile) <= MAX_STATIC_SMEM:
                return tile
    return None


def _tile_smem(desc, c, tile: _Tile) -> int:
    return sum(2 * tile.bk * tile.pitch(s) * bitwidth(c.elem(desc, r)) // 8 for s in "ab" for r in c.staged[s])


def classify(desc: GenericDesc, tile: bool = True) -> str:
    red = [i for i, t in enumerate(desc.iters) if t == "reduction"]
    if not red:
        return "elementwise"
    R = math.prod(desc.loops[i] for i in red)
    O = math.prod(n for n, t in zip(desc.loops, desc.iters) if t == "parallel")
    if R <= 1:
        return "serial"
    if _combiner(desc) is not None:
        if tile and (c := _contract(desc)) is not None and _tile_config(desc, c):
            return "tile_contract"
        if R >= 64 and _lane_dim(desc) is not None:
            return "split_reduce"  # lanes along an output dim read less memory uncoalesced
        return "block_reduce" if (R >= 1024 and O < 512) else "warp_reduce"
    return "serial"


def build_kernel(desc: GenericDesc, name: str | None = None, *, threads: int | None = None,
                 per_thread: int = 1) -> KernelSpec:
    """One KernelSpec for `desc`; named by a hash of its MLIR text unless `name` is given.

    `threads` fixes the block size (a multiple of 32; the warp and block reductions then use
    threads / 32 warps) and `per_thread` gives each thread of an elementwise kernel that many
    points, all loaded before any is computed (so their loads are in flight together): the
    form fuse_launches.py runs a small op in, inside one block.
    """
    kind = classify(desc, tile=threads is None)  # a fixed block (fuse_launches): no tiles
    assert threads is None or threads % 32 == 0, threads
    par = [i for i, t in enumerate(desc.iters) if t == "parallel"]
    red = [i for i, t in enumerate(desc.iters) if t == "reduction"]
    Pext = [desc.loops[i] for i in par]
    Rext = [desc.loops[i] for i in red]
    O = math.prod(Pext)
    R = math.prod(Rext)
    used = _used_args(desc)
    n_in = desc.n_in
    smem = []

    def dims_of(pvals, rvals):
        d = [0] * len(desc.loops)
        for i, v in zip(par, pvals):
            d[i] = v
        for i, v in zip(red, rvals):
            d[i] = v
        return d

    if kind == "elementwise":
        threads = threads or (BLOCK if O >= BLOCK or per_thread > 1 else max(32, -(-O // 32) * 32))
        span = threads * per_thread
        grid = -(-O // span)
        whole = O % span == 0

        def body(E, a):
            base = E.bid() * span + E.tid()
            pts = []
            for j in range(per_thread):  # every point's loads first (in flight together)
                lin = base + j * threads
                dims = _decompose(E, lin if whole else E.minu(lin, E.const(O - 1, "index")), desc.loops)
                args = _load_ins(E, a, desc, dims, used)
                for k in range(len(desc.outs)):
                    args.append(_init_out(E, a, desc, k, dims) if (n_in + k) in used else None)
                pts.append((lin, dims, args))
            for lin, dims, args in pts:  # then compute and store
                get = _Replay(E, desc, a).run(args, dims)
                vals = [get(y) for y in desc.yields]

                def store(dims=dims, vals=vals):
                    for k, v in enumerate(vals):
                        E.store(v, a[f"out{k}"], _ix(E, _flat(E, desc.outs[k], dims)))
                if whole:
                    store()
                else:
                    E.if_(E.cmp("ult", lin, E.const(O, "index")), store)

    elif kind in ("warp_reduce", "block_reduce", "split_reduce"):
        j_comb, v_ref = _combiner(desc)
        comb = desc.body[j_comb]
        et = desc.outs[0].elem
        ident = _identity(comb.name, et)
        block = kind == "block_reduce"
        split = kind == "split_reduce"
        if split:  # lanes along output dim p (32 outputs a block), warps split the reduction
            p = _lane_dim(desc)
            P = desc.loops[p]
            G = -(-P // 32)
            others = [desc.loops[i] for i in par if i != p]
            W = threads // 32 if threads else min(32, max(1, R // 16))
            grid = math.prod(others) * G
            step = W
            smem = [("red", et, 32 * W)]
        else:
            W = threads // 32 if threads else (WARPS if block else min(WARPS, O))
            grid = O if block else -(-O // W)
            step = 32 * W if block else 32
            if block:
                smem = [("red", et, W)]
        threads = 32 * W
        n_iter = -(-R // step)

        def body(E, a):
            tid = E.tid()
            lane = tid % 32
            if split:
                g = E.bid() % G
                pv = g * 32 + lane
                pc = E.minu(pv, E.const(P - 1, "index")) if P % 32 else pv
                rest = iter(_decompose(E, E.bid() // G, others))
                pvals = [pc if i == p else next(rest) for i in par]
                r0 = tid // 32
            elif block:
                o = E.bid()
                oc = o
                r0 = tid
            else:
                o = E.bid() * W + tid // 32
                oc = E.minu(o, E.const(O - 1, "index")) if O % W else o
                r0 = lane
            if not split:
                pvals = _decompose(E, oc, Pext)
            acc0 = E.const(ident, et)
            rp = _Replay(E, desc, a)

            def steps(js, acc):
                """Reduction steps js in order, every step's loads issued first (in flight
                together); the combining order is the sequential one."""
                pts = []
                for j in js:
                    r = r0 + j * step
                    rc = E.minu(r, E.const(R - 1, "index")) if R % step else r
                    dims = dims_of(pvals, _decompose(E, rc, Rext))
                    pts.append((r, dims, _load_ins(E, a, desc, dims, used)))
                for r, dims, ins in pts:
                    get = rp.run(ins + [None] * len(desc.outs), dims, skip=(j_comb,), upto=j_comb)
                    new = E.raw(comb.name, [acc, get(v_ref)], [et], comb.attrs, comb.info)[0]
                    if R % step:
                        new = E.select(E.cmp("ult", r, E.const(R, "index")), new, acc)
                    acc = new
                return acc
            U = min(REDUCE_UNROLL, n_iter)
            acc = acc0
            if n_iter // U:
                acc = E.for_(0, n_iter // U, 1, [acc],
                             lambda j, args_: [steps([j * U + u for u in range(U)], args_[0])])[0]
            if n_iter % U:
                acc = steps([n_iter // U * U + u for u in range(n_iter % U)], acc)
            if not split:
                for off in (16, 8, 4, 2, 1):
                    acc = E.raw(comb.name, [acc, E.shfl_xor(acc, off)], [et], comb.attrs, comb.info)[0]
            odims = dims_of(pvals, [0] * len(red))

            def finish(total):
                init = _init_out(E, a, desc, 0, odims)
                res = E.raw(comb.name, [init, total], [et], comb.attrs, comb.info)[0]
                E.store(res, a["out0"], _ix(E, _flat(E, desc.outs[0], odims)))
            if split:  # the warps' partial sums, combined in warp order by warp 0
                E.store(acc, a["red"], tid)
                E.barrier()

                def combine():
                    tot = E.load(a["red"], lane)
                    for w in range(1, W):
                        tot = E.raw(comb.name, [tot, E.load(a["red"], lane + w * 32)], [et], comb.attrs,
                                    comb.info)[0]
                    finish(tot)
                ok = E.cmp("ult", tid, E.const(32, "index"))
                E.if_(E.and_(ok, E.cmp("ult", pv, E.const(P, "index"))) if P % 32 else ok, combine)
            elif block:
                warp = tid // 32
                E.if_(E.cmp("eq", lane, E.const(0, "index")), lambda: E.store(acc, a["red"], warp))
                E.barrier()

                def first():
                    tot = None
                    for w in range(W):
                        v = E.load(a["red"], E.const(w, "index"))
                        tot = v if tot is None else E.raw(comb.name, [tot, v], [et], comb.attrs,
                                                          comb.info)[0]
                    finish(tot)
                E.if_(E.cmp("eq", tid, E.const(0, "index")), first)
            else:
                ok = E.cmp("eq", lane, E.const(0, "index"))
                if O % W:
                    ok = E.and_(ok, E.cmp("ult", o, E.const(O, "index")))
                E.if_(ok, lambda: finish(acc))

    elif kind == "tile_contract":
        c = _contract(desc)
        tile = _tile_config(desc, c)
        TA, TB, BK = tile.ta, tile.tb, tile.bk
        comb = desc.body[c.j_comb]
        et = desc.outs[0].elem
        ident = _identity(comb.name, et)
        threads = tile.na * tile.nb
        ext = {"a": desc.loops[c.a], "b": desc.loops[c.b]}
        span = {s: tile.span(s) for s in "ab"}  # points of a and of b a block covers
        ld = {s: tile.pitch(s) for s in "ab"}
        per = {"a": TA, "b": TB}  # a thread's outputs along a and b (consecutive points)
        G = {s: -(-ext[s] // span[s]) for s in "ab"}
        others = [desc.loops[i] for i in par if i not in (c.a, c.b)]
        grid = math.prod(others) * G["a"] * G["b"]
        names = {s: [f"s{s}{n}" for n in range(len(c.staged[s]))] for s in "ab"}
        smem = [(nm, c.elem(desc, r), 2 * BK * ld[s]) for s in "ab" for nm, r in zip(names[s], c.staged[s])]
        n_chunks, tail = divmod(R, BK)
        skip = {s: set(range(c.j_comb)) - c.producers[s] for s in "ab"}

        def body(E, a):
            tid = E.tid()
            tpos = {"a": tid // tile.nb, "b": tid % tile.nb}
            blk = E.bid()
            gb, rest = blk % G["b"], blk // G["b"]
            ga = rest % G["a"]
            ovals = iter(_decompose(E, rest // G["a"], others))
            base = {i: next(ovals) for i in par if i not in (c.a, c.b)}
            first = {"a": ga * span["a"], "b": gb * span["b"]}
            rp = _Replay(E, desc, a)

            def point_dims(pos, rvals):
                d = dict(base)
                d[c.a], d[c.b] = pos.get("a", 0), pos.get("b", 0)
                return dims_of([d[i] for i in par], rvals)

            def loads(s, chunk):
                """Side s's inputs for its points of reduction chunk `chunk` (loads only)."""
                pts = []
                for q in range(span[s] * BK // threads):
                    p_ = tid + q * threads
                    kk, r = (p_ % BK, p_ // BK) if c.k_fast[s] else (p_ // span[s], p_ % span[s])
                    row = first[s] + r
                    if ext[s] % span[s]:
                        row = E.minu(row, E.const(ext[s] - 1, "index"))
                    k = E.minu(_ix(E, _add(E, _mul(E, chunk, BK), kk)), E.const(R - 1, "index"))
                    dims = point_dims({s: row}, _decompose(E, k, Rext))
                    pts.append((kk, r, dims, _load_ins(E, a, desc, dims, c.args[s])))
                return pts

            def store(s, pts, buf):
                """Side s's staged values of the loaded points into shared buffer `buf`."""
                for kk, r, dims, vals in pts:
                    get = rp.run(vals + [None] * len(desc.outs), dims, skip=skip[s], upto=c.j_comb)
                    at = _add(E, _add(E, _mul(E, buf, BK * ld[s]), _mul(E, kk, ld[s])), r)
                    for nm, ref in zip(names[s], c.staged[s]):
                        E.store(get(ref), a[nm], _ix(E, at))

            def products(buf, steps, accs):
                """Combine `steps` staged reduction steps into the thread's TA x TB outputs."""
                accs = list(accs)
                for kk in range(steps):
                    row = {}
                    for s, tn in (("a", TA), ("b", TB)):
                        off = _add(E, _mul(E, buf, BK * ld[s]), kk * ld[s])
                        at = _add(E, off, tpos[s] * per[s])
                        for nm, ref in zip(names[s], c.staged[s]):
                            row[ref] = [E.load(a[nm], _ix(E, _add(E, at, i))) for i in range(tn)]
                    for i in range(TA):
                        for j in range(TB):
                            vals = {}

                            def get(ref, i=i, j=j, vals=vals):
                                if ref in row:
                                    return row[ref][j if ref in c.staged["b"] else i]
                                return vals[(ref[1], ref[2])]
                            for jo in c.inner:
                                for k, v in enumerate(rp.op(desc.body[jo], get)):
                                    vals[(jo, k)] = v
                            accs[i * TB + j] = E.raw(comb.name, [accs[i * TB + j], get(c.v_ref)], [et],
                                                     comb.attrs, comb.info)[0]
                return accs

            for s in "ab":
                store(s, loads(s, 0), 0)
            E.barrier()
            accs = [E.const(ident, et)] * (TA * TB)
            if n_chunks:
                def chunk(ci, accs):
                    nxt = {s: loads(s, ci + 1) for s in "ab"}  # in flight during the products
                    accs = products(ci % 2, BK, accs)
                    for s in "ab":
                        store(s, nxt[s], (ci + 1) % 2)
                    E.barrier()
                    return accs
                accs = E.for_(0, n_chunks, 1, accs, chunk)
            if tail:
                accs = products(n_chunks % 2, tail, accs)
            for i in range(TA):
                for j in range(TB):
                    pos = {"a": first["a"] + tpos["a"] * TA + i, "b": first["b"] + tpos["b"] * TB + j}

                    def finish(i=i, j=j, pos=pos):
                        odims = point_dims(pos, [0] * len(red))
                        init = _init_out(E, a, desc, 0, odims)
                        res = E.raw(comb.name, [init, accs[i * TB + j]], [et], comb.attrs, comb.info)[0]
                        E.store(res, a["out0"], _ix(E, _flat(E, desc.outs[0], odims)))
                    conds = [E.cmp("ult", pos[s], E.const(ext[s], "index")) for s in "ab" if ext[s] % span[s]]
                    if conds:
                        E.if_(conds[0] if len(conds) == 1 else E.and_(*conds), finish)
                    else:
                        finish()

    else:  # serial
        threads = threads or (BLOCK if O >= BLOCK else max(32, -(-O // 32) * 32))
        grid = -(-O // threads)

        def body(E, a):
            lin = E.bid() * threads + E.tid()

            def point():
                pvals = _decompose(E, lin, Pext)
                odims = dims_of(pvals, [0] * len(red))
                inits = [_init_out(E, a, desc, k, odims) for k in range(len(desc.outs))]
                rp = _Replay(E, desc, a)

                def step_fn(r, outs):
                    dims = dims_of(pvals, _decompose(E, r, Rext))
                    ins = _load_ins(E, a, desc, dims, used)
                    get = rp.run(ins + list(outs), dims)
                    return [get(y) for y in desc.yields]
                res = E.for_(0, R, 1, inits, step_fn) if R > 1 else \
                    step_fn(E.const(0, "index"), inits)
                for k, v in enumerate(res):
                    E.store(v, a[f"out{k}"], _ix(E, _flat(E, desc.outs[k], odims)))
            if O % threads == 0:
                point()
            else:
                E.if_(E.cmp("ult", lin, E.const(O, "index")), point)

    spec = KernelSpec(name or "qk", _params(desc), (threads, 1, 1), (grid, 1, 1), body, smem,
                      {"kind": f"linalg_{kind}", "loops": list(desc.loops), "tag": desc.tag},
                      doc=f"{desc.tag}: {kind} over loops {desc.loops} ({desc.iters})")
    if name is None:
        text = spec.mlir_func()
        h = hashlib.sha1(text.encode()).hexdigest()[:12]
        spec.name = f"qk_{desc.tag}_{kind}_{h}".replace("-", "_").replace(".", "_")
    return spec
