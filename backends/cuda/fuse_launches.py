"""Runs of small launches -> one launch of one thread block (plan level, after host_plan).

At decode every op of a layer outside the GEMVs and attention is tiny (an RMSNorm of one
2048-wide row, a residual add, a per-token quantization, a SwiGLU product), and each costs
a launch: ~2.5 us of a CUDA-graph replay on the H200 for well under a microsecond of work.
A run of consecutive small launches becomes one kernel of one block that executes the
launches' work in order with a block barrier between them (``bar.sync`` orders the block's
global and shared memory accesses), so the run pays one launch and a few L2 round trips.

* The stages are the launches' own kernels. A generated one (linalg_kernels.py) is rebuilt
  for the fused block size (elementwise: several points per thread, loads first); a
  prebuilt one (quantize_rows) runs as is. A stage's grid becomes a loop over virtual block
  ids (the blocks of a launch are independent, so running them in turn is valid), its
  ``E.bid()`` the loop index.
* A stage that uses shared memory (so barriers) must have the fused block size; one with
  fewer threads and no shared memory runs under ``tid < its threads``.
* Buffers that a stage of the run writes lose ``noalias``/``readonly`` on every parameter
  (and the ``ld.global.nc`` cache hint): a later stage reads them after the barrier.
* "Small": at most MAX_VBLOCKS virtual blocks per stage, short reductions. The GEMVs, the
  attention matmuls and anything else with real parallelism stay separate launches.

Numerics are the stages' own (the same kernels, the same reduction order per output).
"""
from __future__ import annotations

import hashlib
import math

from . import kernels
from . import linalg_kernels as lk
from .emit import KernelSpec, Param

MAX_VBLOCKS = 4  # virtual blocks a stage may loop over inside the fused block
MAX_BLOCK = 1024  # threads of a fused block when no stage fixes it (more loads in flight)
MAX_PER_THREAD = 16  # points per thread of an elementwise stage
MAX_WARP_REDUCTION = 4096  # reduction length per output of a warp-reduce stage (4x: block-reduce)
MAX_SERIAL = 64  # reduction length of a serial stage (one thread loops over it)
MAX_SMEM = 16 * 1024  # bytes of shared memory of a prebuilt stage
PREBUILT = ("quantize_rows",)  # prebuilt kernels that are small at decode (one block a row)


class Stage:
    def __init__(self, spec: KernelSpec, launch: dict):
        self.spec, self.launch = spec, launch

    @property
    def vblocks(self) -> int:
        return self.spec.grid[0]


def _resized(spec: KernelSpec, T: int) -> KernelSpec | None:
    """A prebuilt kernel rebuilt for a T-thread block (the same results), or None."""
    c = spec.config
    if c.get("kind") != "quantize_rows" or T % 32:
        return None
    return kernels.quantize_rows(c["K"], qmin=c["qmin"], qmax=c["qmax"], clip=c["clip"], m_max=c["m_max"],
                                 warps=T // 32, exact_warps=True)


def _stage(launch, specs, descs, T, resize: bool = False):
    """The launch as a stage of a T-thread block, or None when it is not small. `resize`: a
    prebuilt kernel with shared memory of another block size is rebuilt for T."""
    spec = specs[launch["kernel"]]
    if spec.grid[1] != 1 or spec.grid[2] != 1 or spec.block[1] != 1 or spec.block[2] != 1:
        return None
    desc = descs.get(launch["kernel"])
    if desc is not None:
        kind = lk.classify(desc)
        O = math.prod(n for n, t in zip(desc.loops, desc.iters) if t == "parallel")
        R = math.prod(n for n, t in zip(desc.loops, desc.iters) if t == "reduction")
        if kind == "elementwise":
            per = max(1, min(MAX_PER_THREAD, -(-O // T)))
            st = lk.build_kernel(desc, "stage", threads=T, per_thread=per)
        elif kind == "warp_reduce" and R <= MAX_WARP_REDUCTION:
            st = lk.build_kernel(desc, "stage", threads=T)
        elif (kind == "block_reduce" and R <= 4 * MAX_WARP_REDUCTION) or (kind == "serial" and R <= MAX_SERIAL):
            st = lk.build_kernel(desc, "stage", threads=T)
        else:
            return None
        return Stage(st, launch) if st.grid[0] <= MAX_VBLOCKS else None
    if spec.config.get("kind") not in PREBUILT or spec.grid[0] > MAX_VBLOCKS:
        return None
    if resize and spec.smem and spec.threads != T:
        spec = _resized(spec, T) or spec
    if spec.smem_bytes() > MAX_SMEM or (spec.smem and spec.threads != T) or spec.threads > T:
        return None
    return Stage(spec, launch)


def small_run(launches, i, specs, descs, T: int, resize: bool = False) -> list[Stage]:
    """The stages of the consecutive small launches from i at block size T (_stage)."""
    run = []
    for L in launches[i:]:
        st = _stage(L, specs, descs, T, resize)
        if st is None:
            break
        run.append(st)
    return run


def _run(launches, i, specs, descs) -> tuple[list[Stage], int]:
    """The longest run of small launches from i, and its block size: MAX_BLOCK, or the size
    of a prebuilt stage with shared memory nearby (which must run at its own size)."""
    sizes = {MAX_BLOCK}
    for L in launches[i:i + 8]:
        spec = specs[L["kernel"]]
        if spec.config.get("kind") in PREBUILT and spec.smem:
            sizes.add(spec.threads)
    best, best_T = [], MAX_BLOCK
    for T in sorted(sizes, reverse=True):  # ties: the larger block
        run = small_run(launches, i, specs, descs, T)
        if len(run) > len(best):
            best, best_T = run, T
    return best, best_T


class _StageEmitter:
    """The real emitter, except that ``bid`` is the virtual block and cache-hinted loads of
    buffers written inside the fused kernel are plain loads."""

    def __init__(self, E, vblock, written: set):
        self._E, self._vblock, self._written = E, vblock, written

    def __getattr__(self, name):
        return getattr(self._E, name)

    def bid(self, dim: str = "x"):
        return self._vblock if dim == "x" else self._E.const(0, "index")

    def load_hint(self, mem, i, hint):
        return self._E.load_hint(mem, i, None if id(mem) in self._written else hint)


def bind_stages(stages: list[Stage], written: set) -> tuple[list[Param], list[dict], list]:
    """The parameters (stage i's as ``s{i}_<name>``), launch arguments and shared memory of
    one kernel running `stages`. A buffer that some stage writes (`written`) is bound as
    ``alias`` by every stage: a later stage reads it through another pointer."""
    params, args, smem = [], [], []
    for i, s in enumerate(stages):
        for p, a in zip(s.spec.params, s.launch["args"]):
            role = p.role
            if p.is_buffer and a["buf"] in written and role != "alias":
                role = "alias"
            prow = (f"s{i}_{p.rows[0]}", p.rows[1]) if p.rows else None
            params.append(Param(f"s{i}_{p.name}", p.type, role, p.doc, prow, p.range))
            args.append(a)
        smem += [(f"s{i}_{n}", t, c) for n, t, c in s.spec.smem]
    return params, args, smem


def run_stage(E, a: dict, i: int, s: Stage, T: int, alias: set, first, per: int):
    """Stage i's virtual blocks first .. first + per - 1, in turn, in E's T-thread block.
    `a`: the fused kernel's values by name; `alias`: ids of the buffers written in it (read
    without cache hints)."""
    sa = {p.name: a[f"s{i}_{p.name}"] for p in s.spec.params}
    sa.update({n: a[f"s{i}_{n}"] for n, _, _ in s.spec.smem})

    def one(vb):
        SE = _StageEmitter(E, vb, alias)
        if s.spec.threads < T:
            E.if_(E.cmp("ult", E.tid(), E.const(s.spec.threads, "index")), lambda: s.spec.body(SE, sa))
        else:
            s.spec.body(SE, sa)
    if per == 1:
        one(first)
        return

    def loop(j, _):
        one(first + j)
        if s.spec.smem:
            E.barrier()  # the next virtual block reuses the shared memory
        return []
    E.for_(0, per, 1, [], loop)


def fuse(stages: list[Stage], T: int, rows: int = 0) -> tuple[KernelSpec, dict]:
    """One kernel running `stages` in order in one T-thread block, and its launch; rows > 0:
    in `rows` blocks, block b running each stage's virtual blocks of row b (fuse_row_launches)."""
    written = {w for s in stages for w in s.launch["writes"]}
    params, args, smem = bind_stages(stages, written)

    def body(E, a):
        alias = {id(a[p.name]) for p in params if p.role == "alias"}
        for i, s in enumerate(stages):
            if i:
                E.barrier()
            per = s.vblocks // rows if rows else s.vblocks  # virtual blocks a fused block runs
            first = E.bid() * per if rows else E.const(0, "index")
            run_stage(E, a, i, s, T, alias, first, per)

    kinds = [s.spec.config.get("kind", "?") for s in stages]
    what = f"row-local launches, a block a row of {rows}" if rows else "small launches in one block"
    spec = KernelSpec("fused", params, (T, 1, 1), (max(rows, 1), 1, 1), body, smem,
                      {"kind": "fused", "stages": kinds, "rows": rows},
                      doc=f"{len(stages)} {what}: {', '.join(kinds)}")
    h = hashlib.sha1(spec.mlir_func().encode()).hexdigest()[:12]
    spec.name = f"{'rowfused' if rows else 'fused'}{len(stages)}_{h}"
    launch = {"kernel": spec.name, "grid": [max(rows, 1), 1, 1], "block": [T, 1, 1], "args": args,
              "writes": sorted(written), "fused": [s.launch["kernel"] for s in stages]}
    return spec, launch


def fuse_small_launches(launches: list[dict], specs: dict, descs: dict) -> list[dict]:
    """Replaces each run of >= 2 consecutive small launches by one fused launch; adds the
    fused kernels to `specs`. Returns the new launch list."""
    out, i = [], 0
    while i < len(launches):
        run, T = _run(launches, i, specs, descs)
        if len(run) < 2:
            out.append(launches[i])
            i += 1
            continue
        spec, launch = fuse(run, T)
        specs.setdefault(spec.name, spec)
        out.append(launch)
        i += len(run)
    return out


# --------------------------------------------------------------------------- row-local runs
#
# At prefill the same ops run over M token rows (an RMSNorm: residual add, sum of squares,
# normalize; then per-token quantization; softmax's four launches over heads x queries
# rows): too big for one block, but each row's work depends only on that row. A run of such
# launches over the same R rows becomes one launch of R blocks, block r running every
# stage's virtual blocks of row r in order with a block barrier between stages. Valid when
# every access of a buffer written in the run stays inside the buffer's row r (its bytes
# split evenly into R rows): checked on the generic ops' index maps and strides, and on the
# row parameters of the prebuilt kernels. The stages keep their reduction orders (warp
# reductions at any block size, block reductions only at their own), so results are bit
# for bit those of the separate launches.

ROW_THREADS = (256, 128, 64, 32)  # fused block sizes tried, largest first
MIN_ROWS = 16  # fewer rows (blocks) leave the GPU idle: such runs stay separate launches
MAX_ROW_PARAM_BYTES = 64 << 10  # a reduction over a bigger parameter (a weight) keeps its launch
MAX_ROW_PER_THREAD = 32  # points a thread of an elementwise stage
ROW_PREBUILT = ("quantize_rows",)  # prebuilt kernels whose block b touches row b of each row parameter


def _row_prefixes(desc) -> dict:
    """Row counts R -> j for which the first j loops are parallel with extent product R."""
    out, R = {}, 1
    for j, (n, it) in enumerate(zip(desc.loops, desc.iters)):
        if it != "parallel":
            break
        R *= n
        out[R] = j + 1
    return out


def _row_local(op, j: int, R: int, buf_bytes: int, offset: int) -> bool:
    """Operand `op` (the view a generic reads or writes at byte `offset` of a buffer) touches
    for loop-row r only bytes of the buffer's row r: its first j index results are the row
    loops d0..d(j-1), row-major with a row stride of the buffer's row, and the other results
    stay inside one row."""
    from .host_plan import ESIZE

    if op.const is not None:
        return True
    es = ESIZE.get(op.elem)
    if es is None or buf_bytes % R or len(op.map) < j:
        return False
    row = buf_bytes // R  # bytes
    if any(op.map[i] != ("d", i) for i in range(j)) or any(
            lk._expr_dims(e) & set(range(j)) for e in op.map[j:]):
        return False
    stride = row // es if row % es == 0 else None
    for i in reversed(range(j)):  # the row dims: row-major over the row loops
        if stride is None or op.strides[i] != stride:
            return False
        stride *= op.shape[i]
    rest = sum((n - 1) * st for n, st in zip(op.shape[j:], op.strides[j:]))
    return offset >= 0 and offset + (rest + 1) * es <= row and all(st >= 0 for st in op.strides[j:])


def _row_stage(launch, specs, descs, buffers, written, T: int, R: int):
    """The launch as a stage of a row-fused kernel (T threads, R rows), or None."""
    from .emit import bitwidth, parse_memref

    spec = specs[launch["kernel"]]
    if spec.grid[1] != 1 or spec.grid[2] != 1 or spec.block[1] != 1 or spec.block[2] != 1:
        return None
    bytes_of = lambda a: buffers[a["buf"]]["bytes"]  # noqa: E731
    desc = descs.get(launch["kernel"])
    if desc is not None:
        prefixes = _row_prefixes(desc)
        if R not in prefixes:
            return None
        j = prefixes[R]
        kind = lk.classify(desc)
        if kind != lk.classify(desc, tile=False):  # a contraction tiled through shared memory
            return None
        if kind != "elementwise" and any(buffers[a["buf"]]["kind"] == "param" and bytes_of(a) > MAX_ROW_PARAM_BYTES
                                         for a in launch["args"] if "buf" in a):
            return None  # a matmul over weights (float GEMVs at decode): its own launch shape is faster
        per_row = math.prod(n for n, t in zip(desc.loops, desc.iters) if t == "parallel") // R
        if kind == "elementwise":
            per = next((p for p in range(MAX_ROW_PER_THREAD, 0, -1) if per_row % (T * p) == 0), None)
            if per is None:
                return None
            st = lk.build_kernel(desc, "stage", threads=T, per_thread=per)
        elif kind == "warp_reduce":  # W warps (outputs) a virtual block, dividing the row's outputs
            W = max(w for w in range(1, T // 32 + 1) if per_row % w == 0)
            st = lk.build_kernel(desc, "stage", threads=32 * W)  # (fewer threads: the rest idle)
        elif kind == "block_reduce" and T // 32 == lk.WARPS:
            st = lk.build_kernel(desc, "stage", threads=T)
        else:
            return None
        if st.grid[0] % R:
            return None
        views = [o for o in desc.ins if o.const is None] + list(desc.outs)
        args = launch["args"]
        if any(a["buf"] in written for a in args[len(views):]):  # captures: arbitrary reads
            return None
        for o, a in zip(views, args):
            if a["buf"] in written and not _row_local(o, j, R, bytes_of(a), a["offset"]):
                return None
        return Stage(st, launch)
    if spec.config.get("kind") not in ROW_PREBUILT or spec.grid[0] != R or spec.threads != T:
        return None
    for p, a in zip(spec.params, launch["args"]):
        if p.is_buffer and a["buf"] in written:
            n, et, _ = parse_memref(p.type)
            if not p.rows or p.rows[1] != R or a["offset"] or bytes_of(a) != n * bitwidth(et) // 8:
                return None
    return Stage(spec, launch)


def _row_run(launches, i, specs, descs, buffers) -> tuple[list[Stage], int, int]:
    """The longest run of row-local launches from i: (stages, T, R)."""
    first = descs.get(launches[i]["kernel"])
    if first is not None:
        rows = sorted(_row_prefixes(first), reverse=True)
    else:
        spec = specs[launches[i]["kernel"]]
        rows = [spec.grid[0]] if spec.config.get("kind") in ROW_PREBUILT else []
    sizes = set(ROW_THREADS) | {specs[L["kernel"]].threads for L in launches[i:i + 8]  # a prebuilt stage's own
                                  if specs[L["kernel"]].config.get("kind") in ROW_PREBUILT}
    best = ([], 0, 0)
    for R in rows:
        if R < MIN_ROWS:
            continue
        for T in sorted(sizes, reverse=True):
            n = len(launches) - i
            while n >= 2:  # grow under the writes of the run so far; then check them all
                written, k = set(), 0
                for L in launches[i:i + n]:
                    written |= set(L["writes"])
                    if _row_stage(L, specs, descs, buffers, written, T, R) is None:
                        break
                    k += 1
                if k < 2:
                    break
                written = {b for L in launches[i:i + k] for b in L["writes"]}
                run = [_row_stage(L, specs, descs, buffers, written, T, R) for L in launches[i:i + k]]
                if all(run):
                    if k > len(best[0]):
                        best = (run, T, R)
                    break
                n = next(m for m, st in enumerate(run) if st is None)  # cut before the failing stage
    return best


def fuse_row_launches(launches: list[dict], specs: dict, descs: dict, buffers: list[dict]) -> list[dict]:
    """Replaces each run of >= 2 consecutive row-local launches over the same rows by one
    launch of a block a row; adds the fused kernels to `specs`. Returns the new launch list."""
    out, i = [], 0
    while i < len(launches):
        run, T, R = _row_run(launches, i, specs, descs, buffers)
        if len(run) < 2:
            out.append(launches[i])
            i += 1
            continue
        spec, launch = fuse(run, T, rows=R)
        specs.setdefault(spec.name, spec)
        out.append(launch)
        i += len(run)
    return out
