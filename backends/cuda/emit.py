"""A tiny kernel-building DSL with two back ends.

Kernels in :mod:`qcc.backends.cuda.kernels` are written once, as Python functions
that call the operations of an *emitter* ``E``:

* :class:`MlirEmitter` turns the calls into MLIR text (``gpu``, ``arith``,
  ``vector``, ``memref``, ``scf``, ``math`` and ``nvvm`` ops inside a
  ``gpu.func``). That text is what :mod:`qcc.backends.cuda.ptx` lowers to PTX.
* :class:`qcc.backends.cuda.simt.SimtEmulator` executes the very same calls with
  numpy over every thread of a (small) grid, including warp-level ``mma.sync`` and
  shuffles, so the thread mapping, the packed layouts and the arithmetic of a
  kernel are tested on a machine without a GPU.

Types are MLIR type strings: ``index``, ``i1``, ``i8``, ``i32``, ``f16``,
``f32`` and 1-D vectors of those (``vector<4xi32>``). Memory is 1-D memrefs
(``memref<4096xvector<4xi32>>``); kernel pointers use the bare-pointer calling
convention, so every buffer is one pointer parameter of the PTX entry.

This module imports nothing beyond the standard library.
"""
from __future__ import annotations

import re
import struct
from dataclasses import dataclass, field
from typing import Callable, Sequence

# --------------------------------------------------------------------------- types

_VEC_RE = re.compile(r"^vector<(\d+)x(\w+)>$")
_MEMREF_RE = re.compile(r"^memref<(\d+)x(.+?)(?:, #gpu\.address_space<(\w+)>)?>$")
MAX_STATIC_SMEM = 48 * 1024  # static shared memory a block may declare (more needs the dynamic kind)
SWIZZLE_MODES = {0: 0, 128: 1}  # wgmma descriptor layout types (bits 62-63): none, 128-byte swizzle
MAX_DYNAMIC_SMEM = 227 * 1024  # dynamic shared memory a block may take on sm_90 (opted in at load)
GRID_WAIT_MARK = "qcc.grid_dependency_wait"  # PTX comment that Emitter.grid_dependency_wait leaves
TRIGGER_MARK = "qcc.launch_dependents"  # PTX comment that Emitter.launch_dependents leaves
INT_TYPES = {"i1": 1, "i8": 8, "i16": 16, "i32": 32, "i64": 64, "index": 64}
FLOAT_TYPES = {"f16": 16, "f32": 32, "f64": 64}


def parse_type(t: str) -> tuple[tuple[int, ...], str]:
    """``vector<4xi32>`` -> ((4,), 'i32');  ``f32`` -> ((), 'f32')."""
    m = _VEC_RE.match(t)
    if m:
        return (int(m.group(1)),), m.group(2)
    if t in INT_TYPES or t in FLOAT_TYPES:
        return (), t
    raise ValueError(f"unsupported type {t!r}")


def elem_of(t: str) -> str:
    return parse_type(t)[1]


def lanes_of(t: str) -> int:
    s, _ = parse_type(t)
    return s[0] if s else 1


def vec(n: int, e: str) -> str:
    return f"vector<{n}x{e}>"


def is_float(t: str) -> bool:
    return elem_of(t) in FLOAT_TYPES


def bitwidth(t: str) -> int:
    s, e = parse_type(t)
    w = INT_TYPES.get(e) or FLOAT_TYPES[e]
    return w * (s[0] if s else 1)


def storage_bytes(t: str) -> int:
    """Bytes an element of type t takes in memory: an i1 takes a byte (LLVM stores it so)."""
    s, e = parse_type(t)
    return max(INT_TYPES.get(e) or FLOAT_TYPES[e], 8) // 8 * (s[0] if s else 1)


def parse_memref(t: str) -> tuple[int, str, str]:
    """``memref<64xvector<4xi32>>`` -> (64, 'vector<4xi32>', 'global')."""
    m = _MEMREF_RE.match(t)
    if not m:
        raise ValueError(f"unsupported memref type {t!r}")
    return int(m.group(1)), m.group(2), m.group(3) or "global"


# --------------------------------------------------------------------------- values


class Val:
    """An SSA value of some emitter. Arithmetic operators build ops."""

    __slots__ = ("e", "v", "type")

    def __init__(self, e: "Emitter", v, type: str):
        self.e, self.v, self.type = e, v, type

    def _o(self, other):
        return other if isinstance(other, Val) else self.e.const(other, self.type)

    def __add__(self, o):
        return self.e.add(self, self._o(o))

    def __radd__(self, o):
        return self.e.add(self._o(o), self)

    def __sub__(self, o):
        return self.e.sub(self, self._o(o))

    def __rsub__(self, o):
        return self.e.sub(self._o(o), self)

    def __mul__(self, o):
        return self.e.mul(self, self._o(o))

    def __rmul__(self, o):
        return self.e.mul(self._o(o), self)

    def __floordiv__(self, o):
        return self.e.divu(self, self._o(o))

    def __mod__(self, o):
        return self.e.remu(self, self._o(o))

    def __and__(self, o):
        return self.e.and_(self, self._o(o))

    def __or__(self, o):
        return self.e.or_(self, self._o(o))

    def __xor__(self, o):
        return self.e.xor(self, self._o(o))

    def __rshift__(self, o):
        return self.e.shru(self, self._o(o))

    def __lshift__(self, o):
        return self.e.shl(self, self._o(o))

    def __repr__(self):
        return f"Val({self.v!r}: {self.type})"


# --------------------------------------------------------------------------- kernel specs


@dataclass
class Param:
    """A kernel parameter: a buffer (one pointer) or an integer scalar."""

    name: str
    type: str  # memref<...> for buffers, i32/i64 for scalars
    role: str = "in"  # in | out | inout | alias (buffers) ; scalar
    doc: str = ""
    rows: tuple[str, int] | None = None  # buffer: (scalar param, max rows): size scales with it
    range: tuple[int, int] | None = None  # scalar: allowed [min, max]

    @property
    def is_buffer(self) -> bool:
        return self.type.startswith("memref<")

    def manifest(self) -> dict:
        if not self.is_buffer:
            d = {"name": self.name, "kind": "scalar", "type": self.type, "doc": self.doc}
            if self.range:
                d["min"], d["max"] = self.range
            return d
        n, et, _ = parse_memref(self.type)
        shape, e = parse_type(et)
        nbytes = n * storage_bytes(et)
        d = {"name": self.name, "kind": "buffer", "role": self.role, "elem": e,
             "count": n * (shape[0] if shape else 1), "bytes": nbytes,
             "align": storage_bytes(et), "doc": self.doc}
        if self.rows:
            d["rows_param"], d["row_bytes"] = self.rows[0], nbytes // self.rows[1]
        return d


@dataclass
class KernelSpec:
    """Everything needed to emit, emulate, build and launch one kernel."""

    name: str
    params: list[Param]
    block: tuple[int, int, int]
    grid: tuple[int, int, int]
    body: Callable[["Emitter", dict], None]
    smem: list[tuple[str, str, int]] = field(default_factory=list)  # (name, elem, count)
    config: dict = field(default_factory=dict)
    doc: str = ""
    # the smem buffers as views of dynamic shared memory (beyond MAX_STATIC_SMEM; the runtime
    # raises the kernel's dynamic limit at load), each at a 128-byte aligned offset
    smem_dynamic: bool = False
    # > 128 (dynamic only): the buffers' alignment, e.g. 1024 for wgmma's 128-byte swizzled
    # operands (the XOR pattern is taken from address bits); the kernel realigns the dynamic
    # window's base at run time, inside smem_align more bytes
    smem_align: int = 128

    @property
    def threads(self) -> int:
        return self.block[0] * self.block[1] * self.block[2]

    def smem_bytes(self) -> int:
        if self.smem_dynamic:
            return self.smem_offsets()[-1]
        return sum(n * bitwidth(t) // 8 for _, t, n in self.smem)

    def smem_offsets(self) -> list[int]:
        """Byte offsets of the smem buffers in dynamic shared memory, then the total."""
        out, at, al = [], 0, self.smem_align
        for _, t, n in self.smem:
            out.append(at)
            at += -(-n * bitwidth(t) // 8 // al) * al
        return out + [at + (al if al > 128 else 0)]

    def mlir_func(self) -> str:
        return MlirEmitter().function(self)

    def manifest(self) -> dict:
        return {"name": self.name, "grid": list(self.grid), "block": list(self.block),
                "dynamic_smem": self.smem_bytes() if self.smem_dynamic else 0,
                "static_smem": 0 if self.smem_dynamic else self.smem_bytes(),
                "params": [p.manifest() for p in self.params],
                "config": dict(self.config), "doc": self.doc}


def gpu_module(specs: Sequence[KernelSpec], name: str = "qcc_kernels") -> str:
    """MLIR text of a module holding one ``gpu.module`` with every kernel."""
    funcs = "\n".join(s.mlir_func() for s in specs)
    return (f"module attributes {{gpu.container_module}} {{\n  gpu.module @{name} {{\n"
            f"{funcs}\n  }}\n}}\n")


# --------------------------------------------------------------------------- emitter API


class Emitter:
    """Common interface; helpers shared by both back ends live here."""

    # subclasses implement: const, _bin, cmp, select, cast, bitcast, shuffle, extract,
    # broadcast, from_elements, reduce_add, load, store, tid, bid, barrier, shfl_xor,
    # mma_f16, for_, if_, fma

    def add(self, a, b):
        return self._bin("addf" if is_float(a.type) else "addi", a, b)

    def sub(self, a, b):
        return self._bin("subf" if is_float(a.type) else "subi", a, b)

    def mul(self, a, b):
        return self._bin("mulf" if is_float(a.type) else "muli", a, b)

    def divu(self, a, b):
        return self._bin("divui", a, b)

    def remu(self, a, b):
        return self._bin("remui", a, b)

    def minu(self, a, b):
        return self._bin("minui", a, b)

    def and_(self, a, b):
        return self._bin("andi", a, b)

    def or_(self, a, b):
        return self._bin("ori", a, b)

    def xor(self, a, b):
        return self._bin("xori", a, b)

    def shru(self, a, b):
        return self._bin("shrui", a, b)

    def shl(self, a, b):
        return self._bin("shli", a, b)

    def idx(self, v) -> Val:
        """Python int or i32 value -> index value."""
        if isinstance(v, Val):
            return v if v.type == "index" else self.cast("index_cast", v, "index")
        return self.const(int(v), "index")

    def slice2(self, v: Val, start: int) -> Val:
        """Elements [start, start+1] of a vector, as a 2-vector."""
        return self.shuffle(v, v, [start, start + 1])

    def splat(self, value, t: str) -> Val:
        return self.const(value, t)


def _fbits(value: float, e: str) -> int:
    if e == "f16":
        return struct.unpack("<H", struct.pack("<e", value))[0]
    if e == "f32":
        return struct.unpack("<I", struct.pack("<f", value))[0]
    return struct.unpack("<Q", struct.pack("<d", value))[0]


def _lit(value, e: str) -> str:
    if e in FLOAT_TYPES:
        return f"0x{_fbits(float(value), e):X}"
    if e == "i1":
        return "true" if value else "false"
    v = int(value)
    w = INT_TYPES[e]
    if e != "index" and v >= 1 << (w - 1):  # print two's complement as signed
        v -= 1 << w
    return str(v)


class MlirEmitter(Emitter):
    """Emits MLIR text for one ``gpu.func`` at a time."""

    def __init__(self):
        self.lines: list[str] = []
        self.depth = 2
        self.n = 0

    # -- plumbing
    def _name(self) -> str:
        self.n += 1
        return f"%v{self.n}"

    def _emit(self, s: str):
        self.lines.append("  " * self.depth + s)

    def _op(self, text: str, type: str) -> Val:
        nm = self._name()
        self._emit(f"{nm} = {text}")
        return Val(self, nm, type)

    # -- function
    def function(self, spec: KernelSpec) -> str:
        args = []
        vals = {}
        for p in spec.params:
            attrs = ""
            if p.is_buffer and p.role != "alias":  # alias: shares memory with another param
                attrs = " {llvm.noalias, llvm.readonly}" if p.role == "in" else " {llvm.noalias}"
            args.append(f"%{p.name}: {p.type}{attrs}")
            vals[p.name] = Val(self, f"%{p.name}", p.type)
        wg = []
        for name, et, n in spec.smem:
            t = f"memref<{n}x{et}, #gpu.address_space<workgroup>>"
            wg.append(f"%{name}: {t}")
            vals[name] = Val(self, f"%{name}", t)
        header = f"    gpu.func @{spec.name}({', '.join(args)})"
        if wg and not spec.smem_dynamic:
            header += f" workgroup({', '.join(wg)})"
        b = spec.block
        header += f" kernel attributes {{known_block_size = array<i32: {b[0]}, {b[1]}, {b[2]}>}} {{"
        self.lines = [header]
        self.depth = 3
        assert spec.smem_align == 128 or spec.smem_dynamic, "smem_align needs dynamic shared memory"
        if spec.smem_dynamic and spec.smem:
            raw = "memref<?xi8, #gpu.address_space<workgroup>>"
            self._emit(f"%qcc_dyn_smem = gpu.dynamic_shared_memory : {raw}")
            shift = self.const(0, "index")
            if spec.smem_align > 128:  # to the next multiple of smem_align
                base = self._op(f"memref.extract_aligned_pointer_as_index %qcc_dyn_smem : {raw} -> index", "index")
                shift = (self.const(spec.smem_align, "index") - base % spec.smem_align) % spec.smem_align
            for (name, et, n), off in zip(spec.smem, spec.smem_offsets()):
                o = shift + self.const(off, "index")
                self._emit(f"%{name} = memref.view %qcc_dyn_smem[{o.v}][] : {raw} to {vals[name].type}")
        spec.body(self, vals)
        self._emit("gpu.return")
        self.lines.append("    }")
        return "\n".join(self.lines)

    # -- values
    def const(self, value, t: str) -> Val:
        s, e = parse_type(t)
        if s:
            return self._op(f"arith.constant dense<{_lit(value, e)}> : {t}", t)
        if e == "i1":  # `true : i1` does not parse; a bool literal is typed i1 already
            return self._op(f"arith.constant {_lit(value, e)}", t)
        return self._op(f"arith.constant {_lit(value, e)} : {t}", t)

    def _bin(self, op: str, a: Val, b: Val) -> Val:
        assert a.type == b.type, (op, a, b)
        return self._op(f"arith.{op} {a.v}, {b.v} : {a.type}", a.type)

    def maxf(self, a, b):
        return self._bin("maximumf", a, b)

    def fma(self, a: Val, b: Val, c: Val) -> Val:
        assert a.type == b.type == c.type
        # llvm.intr.fma, not math.fma: convert-gpu-to-nvvm maps math.fma to libdevice's
        # __nv_fmaf, which we do not link.
        t = a.type
        return self._op(f"llvm.intr.fma({a.v}, {b.v}, {c.v}) : ({t}, {t}, {t}) -> {t}", t)

    def cmp(self, pred: str, a: Val, b: Val) -> Val:
        assert a.type == b.type
        kind = "cmpf" if is_float(a.type) else "cmpi"
        return self._op(f"arith.{kind} {pred}, {a.v}, {b.v} : {a.type}", "i1")

    def select(self, c: Val, a: Val, b: Val) -> Val:
        assert a.type == b.type
        return self._op(f"arith.select {c.v}, {a.v}, {b.v} : {a.type}", a.type)

    def cast(self, op: str, v: Val, t: str) -> Val:
        """op: index_cast, extui, extsi, trunci, sitofp, uitofp, truncf, extf."""
        return self._op(f"arith.{op} {v.v} : {v.type} to {t}", t)

    def bitcast(self, v: Val, t: str) -> Val:
        assert bitwidth(v.type) == bitwidth(t), (v.type, t)
        sv, ev = parse_type(v.type)
        st, et = parse_type(t)
        if sv and st:
            return self._op(f"vector.bitcast {v.v} : {v.type} to {t}", t)
        if not sv and not st:
            return self._op(f"arith.bitcast {v.v} : {v.type} to {t}", t)
        if not sv:  # scalar -> vector
            one = vec(1, ev)
            w = self._op(f"vector.broadcast {v.v} : {ev} to {one}", one)
            return self._op(f"vector.bitcast {w.v} : {one} to {t}", t)
        one = vec(1, et)  # vector -> scalar
        w = self._op(f"vector.bitcast {v.v} : {v.type} to {one}", one)
        return self._op(f"vector.extract {w.v}[0] : {et} from {one}", t)

    def shuffle(self, a: Val, b: Val, mask: Sequence[int]) -> Val:
        assert a.type == b.type
        t = vec(len(mask), elem_of(a.type))
        m = ", ".join(str(int(i)) for i in mask)
        return self._op(f"vector.shuffle {a.v}, {b.v} [{m}] : {a.type}, {b.type}", t)

    def extract(self, v: Val, i: int) -> Val:
        e = elem_of(v.type)
        return self._op(f"vector.extract {v.v}[{int(i)}] : {e} from {v.type}", e)

    def broadcast(self, s: Val, t: str) -> Val:
        return self._op(f"vector.broadcast {s.v} : {s.type} to {t}", t)

    def from_elements(self, xs: Sequence[Val]) -> Val:
        t = vec(len(xs), xs[0].type)
        return self._op(f"vector.from_elements {', '.join(x.v for x in xs)} : {t}", t)

    def reduce_add(self, v: Val) -> Val:
        e = elem_of(v.type)
        return self._op(f"vector.reduction <add>, {v.v} : {v.type} into {e}", e)

    def raw(self, name: str, operands: Sequence[Val], result_types: Sequence[str],
            attrs: str = "", info: dict | None = None) -> list[Val]:
        """Any scalar op in MLIR's generic form, e.g. ``raw("arith.addf", [a, b], ["f32"],
        "fastmath = #arith.fastmath<none>")``: the ops of a linalg body replayed in a kernel.
        ``info`` carries decoded attributes for the emulator (ignored here)."""
        ops = ", ".join(o.v for o in operands)
        tin = ", ".join(o.type for o in operands)
        tout = ", ".join(result_types)
        a = f" {{{attrs}}}" if attrs else ""
        text = f'"{name}"({ops}){a} : ({tin}) -> ({tout})'
        if len(result_types) == 1:
            return [self._op(text, result_types[0])]
        nm = self._name()
        self._emit(f"{nm}{':' + str(len(result_types)) if len(result_types) > 1 else ''} = {text}"
                   if result_types else text)
        return self._results(nm, list(result_types)) if result_types else []

    # -- memory
    def load(self, mem: Val, i: Val) -> Val:
        _, et, _ = parse_memref(mem.type)
        return self._op(f"memref.load {mem.v}[{self.idx(i).v}] : {mem.type}", et)

    def load_hint(self, mem: Val, i: Val, hint: str | None) -> Val:
        """A 16-byte global load with a PTX cache hint, e.g. ``L1::no_allocate`` (inline asm).

        ``hint=None`` is a plain ``memref.load``. The address is the memref's aligned
        pointer plus 16 * i (the element must be a 16-byte vector of i32).
        """
        if not hint:
            return self.load(mem, i)
        _, et, _ = parse_memref(mem.type)
        assert et == "vector<4xi32>", "load_hint supports vector<4xi32> elements"
        addr = self._address(mem, i)
        st = "!llvm.struct<(i32, i32, i32, i32)>"
        nm = self._name()
        self._emit(f'{nm} = llvm.inline_asm "ld.global.nc.{hint}.v4.u32 {{$0, $1, $2, $3}}, [$4];", '
                   f'"=r,=r,=r,=r,l" {addr.v} : (i64) -> {st}')
        parts = [self._op(f"llvm.extractvalue {nm}[{k}] : {st}", "i32") for k in range(4)]
        return self.from_elements(parts)

    def prefetch_l2(self, mem: Val, i: Val):
        """Asks L2 for the 128-byte line holding element i of global `mem` (``prefetch.global.L2``):
        nothing comes back and nothing waits for it, so it may precede grid_dependency_wait
        (L2 is coherent: a line fetched early is never stale)."""
        addr = self._address(mem, i)
        self._emit(f'llvm.inline_asm has_side_effects "prefetch.global.L2 [$0];", "l" {addr.v} : (i64) -> ()')

    def grid_dependency_wait(self):
        """Where the kernel waits for the grid it depends on: ptx.with_grid_dependency makes the
        mark ``griddepcontrol.wait`` on sm_90+ (elsewhere it stays a PTX comment); without a mark
        the wait goes first in the kernel. A memory clobber, so no access moves above it."""
        self._emit(f'llvm.inline_asm has_side_effects "// {GRID_WAIT_MARK}", "~{{memory}}"  : () -> ()')

    def launch_dependents(self):
        """Where the kernel lets the next one launch (a block that never gets here counts when
        it exits): ptx.with_grid_dependency makes the mark ``griddepcontrol.launch_dependents``
        on sm_90+, in place of the trigger it would put after the wait."""
        self._emit(f'llvm.inline_asm has_side_effects "// {TRIGGER_MARK}", ""  : () -> ()')

    def _address(self, mem: Val, i: Val) -> Val:
        """The i64 address of element i of `mem`."""
        _, et, _ = parse_memref(mem.type)
        base = self._op(f"memref.extract_aligned_pointer_as_index {mem.v} : {mem.type} -> index",
                        "index")
        return self.cast("index_cast", base + self.idx(i) * (bitwidth(et) // 8), "i64")

    def _addr(self, mem: Val, i: Val, space: int) -> str:
        a64 = self._address(mem, i)
        return self._op(f"llvm.inttoptr {a64.v} : i64 to !llvm.ptr<{space}>", f"ptr{space}").v

    def cp_async(self, dst: Val, di: Val, src: Val, si: Val):
        """cp.async of one 4/8/16-byte element global -> shared (``.cg`` for 16 bytes:
        L2 only, the weights do not pass through L1; ``.ca`` otherwise)."""
        _, et, sp = parse_memref(dst.type)
        _, es, _ = parse_memref(src.type)
        assert sp == "workgroup" and et == es, (dst.type, src.type)
        nb = bitwidth(et) // 8
        assert nb in (4, 8, 16), et
        d, s_ = self._addr(dst, di, 3), self._addr(src, si, 1)
        cache = "cg" if nb == 16 else "ca"
        self._emit(f"nvvm.cp.async.shared.global {d}, {s_}, {nb}, cache = {cache} "
                   f": !llvm.ptr<3>, !llvm.ptr<1>")

    def cp_async_commit(self):
        self._emit("nvvm.cp.async.commit.group")

    def cp_async_wait(self, n: int):
        self._emit(f"nvvm.cp.async.wait.group {int(n)}")

    def store(self, val: Val, mem: Val, i: Val):
        _, et, _ = parse_memref(mem.type)
        assert val.type == et, (val.type, et)
        self._emit(f"memref.store {val.v}, {mem.v}[{self.idx(i).v}] : {mem.type}")

    # -- gpu
    def tid(self) -> Val:
        return self._op("gpu.thread_id x", "index")

    def bid(self, dim: str = "x") -> Val:
        return self._op(f"gpu.block_id {dim}", "index")

    def barrier(self):
        self._emit("gpu.barrier")

    def shfl_xor(self, v: Val, offset: int) -> Val:
        if v.type in ("i1", "i8", "i16"):  # shfl.sync moves 32-bit registers: widen, move, narrow
            wide = self._op(f"arith.extui {v.v} : {v.type} to i32", "i32")
            return self._op(f"arith.trunci {self.shfl_xor(wide, offset).v} : i32 to {v.type}", v.type)
        off = self.const(offset, "i32")
        w = self.const(32, "i32")
        nm = self._name()
        self._emit(f"{nm}, {nm}_ok = gpu.shuffle xor {v.v}, {off.v}, {w.v} : {v.type}")
        return Val(self, nm, v.type)

    def dp4a(self, a: Val, b: Val, c: Val) -> Val:
        """c + the dot product of the 4 signed bytes of a and b (i32 or vector<4xi8>), PTX
        dp4a.s32.s32."""
        assert c.type == "i32" and {a.type, b.type} <= {"i32", "vector<4xi8>"}, (a.type, b.type, c.type)
        av, bv = (v if v.type != "i32" else self.bitcast(v, "vector<4xi8>") for v in (a, b))
        return self._op(f"nvvm.dot.accumulate.4way {av.v} <signed>, {bv.v} <signed>, {c.v} "
                        f": vector<4xi8>, vector<4xi8>", "i32")

    def _mma(self, a, b, c, attrs: str, ab_type: str, acc: str) -> list[Val]:
        """nvvm.mma.sync row.col: 4 A, 2 B and 4 C registers a lane -> 4 D registers."""
        assert len(a) == 4 and len(b) == 2 and len(c) == 4
        st = f"!llvm.struct<({acc}, {acc}, {acc}, {acc})>"
        nm = self._name()
        self._emit(
            f"{nm} = nvvm.mma.sync A[{', '.join(x.v for x in a)}] B[{', '.join(x.v for x in b)}] "
            f"C[{', '.join(x.v for x in c)}] {{layoutA = #nvvm.mma_layout<row>, "
            f"layoutB = #nvvm.mma_layout<col>, {attrs}}} : ({ab_type}, {ab_type}, {acc}) -> {st}")
        return [self._op(f"llvm.extractvalue {nm}[{i}] : {st}", acc) for i in range(4)]

    def mma_f16(self, a: Sequence[Val], b: Sequence[Val], c: Sequence[Val]) -> list[Val]:
        """nvvm.mma.sync m16n8k16 row.col, f16 x f16 + f32 -> f32 (4 regs/lane)."""
        return self._mma(a, b, c, "shape = #nvvm.shape<m = 16, n = 8, k = 16>", "vector<2xf16>", "f32")

    def mma_s8(self, a: Sequence[Val], b: Sequence[Val], c: Sequence[Val]) -> list[Val]:
        """nvvm.mma.sync m16n8k32 row.col, s8 x s8 + s32 -> s32 (wrapping), 4 bytes a register."""
        return self._mma(a, b, c, "intOverflowBehavior = #nvvm.mma_int_overflow<wrapped>, "
                         "multiplicandAPtxType = #nvvm.mma_type<s8>, multiplicandBPtxType = #nvvm.mma_type<s8>, "
                         "shape = #nvvm.shape<m = 16, n = 8, k = 32>", "i32", "i32")

    # -- warpgroup MMA (sm_90a): wgmma.mma_async, B (and for s8 A) in shared memory
    def smem_desc(self, mem: Val, i: Val, lbo: int, sbo: int, swizzle: int = 0) -> Val:
        """The 64-bit wgmma matrix descriptor of a K-major operand that starts at element ``i``
        of the workgroup memref ``mem`` (PTX ISA, "Matrix Descriptor Format"). swizzle 0: its 8
        x 16-byte core matrices are ``lbo`` bytes apart along K and ``sbo`` bytes apart along
        M/N. swizzle 128: rows of 128 bytes of K, 8-row atoms ``sbo`` (1024) bytes apart, the
        16-byte chunk c of row r stored at chunk c ^ (r % 8) (atoms 1024-byte aligned; lbo
        unused); a K step within the row adds its byte offset to the start."""
        _, et, sp = parse_memref(mem.type)
        assert sp == "workgroup" and lbo % 16 == 0 and sbo % 16 == 0 and max(lbo, sbo) < 1 << 18
        assert swizzle in SWIZZLE_MODES
        a = self._address(mem, i)
        return ((a & 0x3FFFF) >> 4) | ((lbo >> 4) << 16 | (sbo >> 4) << 32 | SWIZZLE_MODES[swizzle] << 62)

    def _asm(self, text: str, constraints: str, operands: Sequence[Val], results: Sequence[str]):
        """A side-effecting llvm.inline_asm (kept in place against the other wgmma steps)."""
        ops = ", ".join(o.v for o in operands)
        tin = ", ".join(o.type for o in operands)
        if not results:
            self._emit(f'llvm.inline_asm has_side_effects "{text}", "{constraints}" {ops} : ({tin}) -> ()')
            return []
        st = f"!llvm.struct<({', '.join(results)})>"
        nm = self._name()
        self._emit(f'{nm} = llvm.inline_asm has_side_effects "{text}", "{constraints}" {ops} : ({tin}) -> {st}')
        return [self._op(f"llvm.extractvalue {nm}[{k}] : {st}", t) for k, t in enumerate(results)]

    def wgmma_f16(self, a: Sequence[Val], desc: Val, acc: Sequence[Val] | None, n: int,
                  accumulate: bool | None = None) -> list[Val]:
        """wgmma.mma_async m64n{n}k16 f32 += f16 x f16 for the warpgroup: A (64 x 16) from the 4
        registers a lane holds (warp w: rows 16 w.. in mma.m16n8k16's A layout), B (16 x n,
        K-major) from shared memory through ``desc``. D = A B + acc; ``acc`` None, or
        ``accumulate=False``: D = A B (scale-d 0), in acc's registers when given (results in
        the registers they replace: no copy of an accumulator can sit between wgmmas)."""
        assert len(a) == 4 and n % 8 == 0 and 8 <= n <= 256 and (acc is None or len(acc) == n // 2)
        accumulate = acc is not None if accumulate is None else accumulate
        h = n // 2
        regs = [self.bitcast(x, "i32") if x.type != "i32" else x for x in a]
        d = ", ".join(f"${k}" for k in range(h))
        av = ", ".join(f"${h + k}" for k in range(4))
        text = (f"wgmma.mma_async.sync.aligned.m64n{n}k16.f32.f16.f16 {{{d}}}, {{{av}}}, ${h + 4}, "
                f"{int(accumulate)}, 1, 1, 0;")
        cons = ",".join(["=f"] * h + ["r"] * 4 + ["l"] + ([str(k) for k in range(h)] if acc is not None else []))
        return self._asm(text, cons, regs + [desc] + list(acc or []), ["f32"] * h)

    def wgmma_s8(self, a_desc: Val, b_desc: Val, acc: Sequence[Val] | None, n: int,
                 accumulate: bool | None = None) -> list[Val]:
        """wgmma.mma_async m64n{n}k32 s32 += s8 x s8 for the warpgroup (wrapping): A (64 x 32)
        and B (32 x n), both K-major in shared memory, through their descriptors; D in the
        accumulator layout of wgmma_f16 (``acc``/``accumulate`` as there)."""
        assert n in (8, 16, 24) or (n % 16 == 0 and 16 <= n <= 256)
        assert acc is None or len(acc) == n // 2
        accumulate = acc is not None if accumulate is None else accumulate
        h = n // 2
        d = ", ".join(f"${k}" for k in range(h))
        text = f"wgmma.mma_async.sync.aligned.m64n{n}k32.s32.s8.s8 {{{d}}}, ${h}, ${h + 1}, {int(accumulate)};"
        cons = ",".join(["=r"] * h + ["l", "l"] + ([str(k) for k in range(h)] if acc is not None else []))
        return self._asm(text, cons, [a_desc, b_desc] + list(acc or []), ["i32"] * h)

    def wgmma_fence(self):
        self._asm("wgmma.fence.sync.aligned;", "", [], [])

    def wgmma_commit(self):
        self._asm("wgmma.commit_group.sync.aligned;", "", [], [])

    def wgmma_wait(self, pending: int, regs: Sequence[Val]) -> list[Val]:
        """wgmma.wait_group: at most ``pending`` groups still in flight. ``regs`` (the
        accumulators of the groups waited for) come back as new values, so nothing that reads
        them can be scheduled above the wait."""
        h = len(regs)
        cons = ",".join([{"f32": "=f", "i32": "=r"}[r.type] for r in regs] + [str(k) for k in range(h)])
        return self._asm(f"wgmma.wait_group.sync.aligned {int(pending)};", cons, list(regs), [r.type for r in regs])

    def fence_proxy_async(self):
        """Make this thread's generic-proxy shared-memory writes (cp.async included) visible
        to the async proxy (wgmma operands); a barrier after it publishes them to the block."""
        self._asm("fence.proxy.async.shared::cta;", "", [], [])

    # -- control flow
    def for_(self, lo, hi, step, inits: Sequence[Val],
             body: Callable[[Val, list[Val]], Sequence[Val]]) -> list[Val]:
        lo, hi, step = self.idx(lo), self.idx(hi), self.idx(step)
        iv = self._name()
        args = [Val(self, f"{iv}_a{i}", x.type) for i, x in enumerate(inits)]
        nm = self._name()
        k = len(inits)
        types = ", ".join(x.type for x in inits)
        head = f"scf.for {iv} = {lo.v} to {hi.v} step {step.v}"
        if k:
            ia = ", ".join(f"{a.v} = {x.v}" for a, x in zip(args, inits))
            head += f" iter_args({ia}) -> ({types})"
            self._emit(f"{nm}{':' + str(k) if k > 1 else ''} = {head} {{")
        else:
            self._emit(f"{head} {{")
        self.depth += 1
        outs = list(body(Val(self, iv, "index"), args) or [])
        assert [o.type for o in outs] == [x.type for x in inits], "loop yields must match inits"
        if k:
            self._emit(f"scf.yield {', '.join(o.v for o in outs)} : {types}")
        self.depth -= 1
        self._emit("}")
        return self._results(nm, [x.type for x in inits])

    def _results(self, nm: str, types: list[str]) -> list[Val]:
        if len(types) == 1:
            return [Val(self, nm, types[0])]
        return [Val(self, f"{nm}#{i}", t) for i, t in enumerate(types)]

    def if_(self, cond: Val, then: Callable[[], Sequence[Val]],
            else_: Callable[[], Sequence[Val]] | None = None,
            types: Sequence[str] = ()) -> list[Val]:
        nm = self._name()
        k = len(types)
        if k:
            self._emit(f"{nm}{':' + str(k) if k > 1 else ''} = scf.if {cond.v} -> "
                       f"({', '.join(types)}) {{")
        else:
            self._emit(f"scf.if {cond.v} {{")
        for i, fn in enumerate((then, else_)):
            if fn is None:
                assert not k, "an scf.if with results needs an else branch"
                break
            if i == 1:
                self._emit("} else {")
            self.depth += 1
            outs = list(fn() or [])
            assert [o.type for o in outs] == list(types)
            if k:
                self._emit(f"scf.yield {', '.join(o.v for o in outs)} : {', '.join(types)}")
            self.depth -= 1
        self._emit("}")
        return self._results(nm, list(types)) if k else []
