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

from . import linalg_kernels as lk
from .emit import KernelSpec, Param

MAX_VBLOCKS = 4  # virtual blocks a stage may loop over inside the fused block
MAX_BLOCK = 1024  # threads of a fused block when no stage fixes it (more loads in flight)
MAX_PER_THREAD = 16  # points per thread of an elementwise stage
MAX_WARP_REDUCTION = 4096  # reduction length per output of a warp-reduce stage (4x: block-reduce)
MAX_SERIAL = 64  # reduction length of a serial stage (one thread loops over it)
MAX_SMEM = 16 * 1024  # bytes of shared memory of a prebuilt stage
PREBUILT = ("quantize_rows",)  # prebuilt kernels that are small at decode (one block a row)


class _Stage:
    def __init__(self, spec: KernelSpec, launch: dict):
        self.spec, self.launch = spec, launch

    @property
    def vblocks(self) -> int:
        return self.spec.grid[0]


def _stage(launch, specs, descs, T):
    """The launch as a stage of a T-thread block, or None when it is not small."""
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
        return _Stage(st, launch) if st.grid[0] <= MAX_VBLOCKS else None
    if spec.config.get("kind") not in PREBUILT or spec.grid[0] > MAX_VBLOCKS:
        return None
    if spec.smem_bytes() > MAX_SMEM or (spec.smem and spec.threads != T) or spec.threads > T:
        return None
    return _Stage(spec, launch)


def _run(launches, i, specs, descs) -> tuple[list[_Stage], int]:
    """The longest run of small launches from i, and its block size: MAX_BLOCK, or the size
    of a prebuilt stage with shared memory nearby (which must run at its own size)."""
    sizes = {MAX_BLOCK}
    for L in launches[i:i + 8]:
        spec = specs[L["kernel"]]
        if spec.config.get("kind") in PREBUILT and spec.smem:
            sizes.add(spec.threads)
    best, best_T = [], MAX_BLOCK
    for T in sorted(sizes, reverse=True):  # ties: the larger block
        run = []
        for L in launches[i:]:
            st = _stage(L, specs, descs, T)
            if st is None:
                break
            run.append(st)
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


def fuse(stages: list[_Stage], T: int) -> tuple[KernelSpec, dict]:
    """One kernel running `stages` in order in one T-thread block, and its launch."""
    written = {w for s in stages for w in s.launch["writes"]}
    params, args, smem = [], [], []
    for i, s in enumerate(stages):
        for p, a in zip(s.spec.params, s.launch["args"]):
            role = p.role
            if p.is_buffer and a["buf"] in written and role != "alias":
                role = "alias"  # written in this kernel and read through another pointer
            rows = (f"s{i}_{p.rows[0]}", p.rows[1]) if p.rows else None
            params.append(Param(f"s{i}_{p.name}", p.type, role, p.doc, rows, p.range))
            args.append(a)
        smem += [(f"s{i}_{n}", t, c) for n, t, c in s.spec.smem]

    def body(E, a):
        alias = {id(a[p.name]) for p in params if p.role == "alias"}
        for i, s in enumerate(stages):
            if i:
                E.barrier()
            sa = {p.name: a[f"s{i}_{p.name}"] for p in s.spec.params}
            sa.update({n: a[f"s{i}_{n}"] for n, _, _ in s.spec.smem})

            def one(vb, s=s, sa=sa):
                SE = _StageEmitter(E, vb, alias)
                if s.spec.threads < T:
                    E.if_(E.cmp("ult", E.tid(), E.const(s.spec.threads, "index")),
                          lambda: s.spec.body(SE, sa))
                else:
                    s.spec.body(SE, sa)
            if s.vblocks == 1:
                one(E.const(0, "index"))
            else:
                def loop(vb, _, s=s, one=one):
                    one(vb)
                    if s.spec.smem:
                        E.barrier()  # the next virtual block reuses the shared memory
                    return []
                E.for_(0, s.vblocks, 1, [], loop)

    kinds = [s.spec.config.get("kind", "?") for s in stages]
    spec = KernelSpec("fused", params, (T, 1, 1), (1, 1, 1), body, smem,
                      {"kind": "fused", "stages": kinds},
                      doc=f"{len(stages)} small launches in one block: {', '.join(kinds)}")
    h = hashlib.sha1(spec.mlir_func().encode()).hexdigest()[:12]
    spec.name = f"fused{len(stages)}_{h}"
    launch = {"kernel": spec.name, "grid": [1, 1, 1], "block": [T, 1, 1], "args": args,
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
