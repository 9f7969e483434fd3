"""Quantized matrix-vector kernels (M <= 16) as MLIR ``gpu`` IR.

Each builder returns a :class:`~qcc.backends.cuda.emit.KernelSpec`: the kernel's
parameters, launch shape and body. ``spec.mlir_func()`` /
:func:`qcc.backends.cuda.emit.gpu_module` give MLIR text;
:func:`qcc.backends.cuda.simt.run` executes the same body on the CPU;
:mod:`qcc.backends.cuda.ptx` makes PTX and cubin; ``spec.manifest()`` is what the
runtime needs to launch it.

Weight-only kernels (gemv_w4a16, gemv_w8a16), y[M, N] = x[M, K] @ Wdeq^T, M <= 16:

* One warp owns ``n_tiles`` tiles of 8 output columns (8 rows of W) and one K slice;
  the ``k_warps`` warps of a block split K and add their partial sums through shared
  memory at the end. Grid: N / (8 n_tiles) blocks of 32 k_warps threads.
* Per K tile (128 columns for int4, 64 for int8) every lane issues one 128-bit load
  of W (the warp reads 512 contiguous bytes: the weights are re-laid out by
  :mod:`qcc.backends.cuda.pack`), unpacks nibbles/bytes into exact f16 integers in
  registers with and/or on 32-bit words (``0x6400 | q`` is the half 1024 + q; one f16x2
  subtraction removes 1024 + zero), and feeds ``mma.sync.m16n8k16`` (f16 x f16 -> f32):
  the tensor core does the multiply and the reduction across the warp's lanes, A is
  x (rows >= M are clamped duplicates whose results are never stored), B the weights.
  K is permuted inside each tile so that a lane's 32 (16) weights are contiguous in K
  and its x values are two (one) 16-byte loads per row.
* Group scales are applied per group to the fp32 accumulator (``scale_mode="acc"``,
  G % 128 == 0, fp32 scales exactly as given) or to the f16 weights before the mma
  (``scale_mode="weight"``, any G % 32 == 0, f16 scales). int8 per-channel scales
  multiply the final sum.
* W and the group metadata of the next ``unroll`` tiles are loaded before the current
  ones are used (software prefetch through loop-carried registers), or W streams through
  a per-warp cp.async ring in shared memory (``stages``).
* Launch configurations default to :data:`TUNED` (measured on an H100, see README.md).

Integer kernel (gemv_i8), y[M, N] i32 = x[M, K] int8 @ wq[N, K]^T int8, the core of w8a8 layers:
one warp per ``n_rows`` weight rows and all M <= 16 rows of x; lanes stride K in 16-byte
chunks of the unrepacked [N, K] codes, ``dp4a`` multiplies and adds 4 byte pairs into
i32, a ``gpu.shuffle xor`` butterfly reduces across the warp. Exact: the same i32 sums
as the reference lowering, whose scaling generic then runs unchanged.
"""
from __future__ import annotations

import math

from .emit import MAX_DYNAMIC_SMEM, MAX_STATIC_SMEM, KernelSpec, Param



class KernelConstraintError(ValueError):
    """The requested shape or configuration is not supported by a kernel."""


# Cache policy of the 128-bit weight loads (W is read once: keep it out of L1, where x lives).
W_CACHE_HINTS = {None: None, "no_allocate": "L1::no_allocate",
                 "no_allocate_256": "L1::no_allocate.L2::256B", "evict_first": "L1::evict_first"}


def _hint_suffix(w_cache):
    if w_cache not in W_CACHE_HINTS:
        raise KernelConstraintError(f"w_cache must be one of {list(W_CACHE_HINTS)}")
    return {None: "", "no_allocate": "_na", "no_allocate_256": "_na256", "evict_first": "_ef"}[w_cache]


def _shape_suffix(n_warps, depth, stages=0, x_stages=0):
    return ((f"n{n_warps}" if n_warps > 1 else "") + (f"d{depth}" if depth > 1 else "")
            + (f"s{stages}" if stages else "") + (f"x{x_stages}" if x_stages else ""))




def _x_row_chunks(k_tile: int) -> int:
    """16-byte slots a row of an x tile takes in shared memory: the k_tile / 8 chunks plus 4
    of padding (see _mma_gemv_body: conflict-free A-fragment reads)."""
    return k_tile // 8 + 4


def _smem(kw, nw, nt, unroll, stages, units, meta_types, mt=1, x_stages=0, k_tile=128):
    """Shared buffers: the K-split reduction (mt x nt accumulator tiles a warp), the
    cp.async rings of W (if stages) and of x tiles (if x_stages)."""
    out = [("red", "f32", nw * kw * mt * nt * 4 * 32)] if kw > 1 else []
    if x_stages:
        _require(x_stages >= 2, "x_stages must be 0 (x from global memory) or >= 2")
        _require(not stages, "x_stages needs the register path for W (stages=0)")
        out.append(("xs", "vector<8xf16>", x_stages * kw * 16 * mt * unroll * _x_row_chunks(k_tile)))
    if stages:
        _require(stages >= 2, "stages must be 0 (register prefetch) or >= 2")
        out.append(("wbuf", "vector<4xi32>", kw * nw * stages * unroll * nt * 32))
        for k, t in enumerate(meta_types):
            out.append((f"mbuf{k}", t, kw * nw * stages * units * nt * 32))
    from .emit import bitwidth
    total = sum(n * bitwidth(t) // 8 for _, t, n in out)
    _require(total <= MAX_STATIC_SMEM,
             f"{total} bytes of shared memory exceed the {MAX_STATIC_SMEM}-byte static limit; "
             "lower stages, n_tiles or the warps per block")
    return out


def _require(cond, msg):
    if not cond:
        raise KernelConstraintError(msg)


# --------------------------------------------------------------------------- configs


def _c(nt, kw, u, wc=None, nw=1, d=1, s=0, xs=0):
    return {"n_tiles": nt, "k_warps": kw, "unroll": u, "w_cache": wc, "n_warps": nw,
            "depth": d, "stages": s, "x_stages": xs}


# Preferred configurations, best first, from the sweeps on an H100 SXM (README.md has the
# tables). The first one that satisfies a shape's constraints is used.
TUNED = {
    ("gemv_w4a16", "m8", "smallN"): [_c(1, 8, 2), _c(1, 4, 2, "no_allocate")],
    ("gemv_w4a16", "m8"): [_c(2, 4, 2, "no_allocate"), _c(1, 8, 2), _c(1, 4, 2, "no_allocate")],
    ("gemv_w4a16", "m16", "largeN"): [_c(4, 4, 1), _c(4, 2, 2), _c(2, 4, 2, "no_allocate")],
    ("gemv_w4a16", "m16"): [_c(2, 4, 2, "no_allocate"), _c(4, 4, 1), _c(2, 2, 2, "no_allocate")],
    ("gemv_w8a16", "m8", "smallN"): [_c(1, 4, 1, s=4), _c(2, 8, 2)],
    ("gemv_w8a16", "m8"): [_c(2, 4, 2, "no_allocate_256"), _c(2, 8, 2), _c(1, 4, 1, s=4)],
    ("gemv_w8a16", "m16", "largeN"): [_c(2, 4, 2, "no_allocate_256"), _c(2, 8, 2)],
    ("gemv_w8a16", "m16"): [_c(2, 8, 2), _c(2, 4, 2, "no_allocate_256")],
    # more than 16 rows (prefill): m-tiles multiply the accumulators, so fewer n-tiles; the
    # block's warps split N and share each x tile through shared memory (x_stages)
    ("gemv_w4a16", "m64"): [_c(2, 1, 1, "no_allocate", nw=8, xs=2), _c(2, 4, 1, "no_allocate"),
                            _c(1, 4, 2, "no_allocate"), _c(1, 2, 1)],
    ("gemv_w8a16", "m64"): [_c(2, 4, 1, "no_allocate_256"), _c(1, 4, 2), _c(1, 2, 1)],  # x_stages: no gain
}
SM_COUNT = 132  # H100 / H200 SXM: the launch shapes the defaults size for
GEMM_BIG_GRID = 256  # gemm_i8: 64-row blocks from this many of them, else 32-row ones
MIN_BLOCKS = 128  # x_stages configurations need this many blocks (H200 sweep: fewer lose to K-split warps)
GEMV_M_MAX = 256  # rows of x a weight-only GEMV launch takes (blocks of up to 64 rows along grid y)
M_BLOCK = 64  # rows of x a block multiplies (16-row mma tiles, up to 4 a warp)
_FALLBACK = [_c(nt, kw, u) for nt in (2, 1) for kw in (8, 4, 2, 1) for u in (2, 1, 4, 8)]


def default_config(kind: str, K: int, N: int, m_max: int = 16, group_tiles: int = 1,
                   **given) -> dict:
    """The launch configuration for a weight-only GEMV: the measured-best preferences for
    (kind, m_max, N), then generic ones, merged with the ``given`` (non-None) keywords; the
    first combination that meets the kernel's constraints wins.

    Keys: n_tiles, k_warps, unroll, w_cache, n_warps, depth, stages, x_stages.
    """
    k_tile = 128 if kind == "gemv_w4a16" else 64
    mk = "m8" if m_max <= 8 else "m16" if m_max <= 16 else "m64"
    size = "largeN" if N >= 16384 else ("smallN" if N <= 4096 else None)
    prefs = TUNED.get((kind, mk, size), []) + TUNED.get((kind, mk), [])
    fixed = {k: v for k, v in given.items() if v is not None and v != "auto"}
    first_err = None
    for c in prefs + _FALLBACK:
        cfg = {**c, **fixed}
        if cfg["unroll"] % group_tiles:
            cfg["unroll"] = group_tiles * max(1, cfg["unroll"] // group_tiles)
            if "unroll" in fixed:
                cfg["unroll"] = fixed["unroll"]
        if m_max <= 16:
            cfg["x_stages"] = 0  # decode: one row tile, nothing to share
        elif (cfg["x_stages"] and "x_stages" not in fixed
              and N // (8 * cfg["n_tiles"] * cfg["n_warps"]) * _row_blocks(m_max) < MIN_BLOCKS):
            continue  # too few (large) blocks to fill the GPU: K-split warps instead
        try:
            _check_cfg(K, N, k_tile, cfg["n_tiles"], cfg["k_warps"], cfg["unroll"], group_tiles,
                       m_max, cfg["n_warps"], cfg["depth"])
            _smem(cfg["k_warps"], cfg["n_warps"], cfg["n_tiles"], cfg["unroll"], cfg["stages"],
                  cfg["unroll"], [], mt=_m_tiles(m_max), x_stages=cfg["x_stages"], k_tile=k_tile)
            _hint_suffix(cfg["w_cache"])
            return cfg
        except KernelConstraintError as e:
            first_err = first_err or e
    raise first_err


# --------------------------------------------------------------------------- mma gemv core


def _mma_gemv_body(E, a, *, K, N, k_tile, nt, kw, unroll, m_max, load_meta, dequant,
                   group_tiles, scale_acc, final_scale, w_hint=None, nw=1, depth=1, stages=0,
                   meta_smem=False, out_f32=False, x_stages=0):
    """Shared body of the weight-only kernels (see module docstring).

    load_meta(E, a, tn, kt) -> [(param name, element index)] for one n-tile and K tile /
        group (the per-lane metadata: scales, zero words, ...)
    dequant(E, w, meta) -> list over steps of [b0, b1] (vector<2xf16> each)
    scale_acc: None, or fn(E, meta) -> (sx, sy) f32 applied at group ends
    final_scale: None, or fn(E, a, tn, t) -> (sx, sy) applied to the reduced sum
    nw: warps of a block that split N (they read the same x, which then hits in L1);
        the block has kw * nw warps, warp w works on K slice w % kw and n-group w // kw.
    depth: (stages == 0) iterations of W/metadata loads kept in flight in registers.
    stages: if > 0, W and metadata stream through a per-warp ring of ``stages`` shared
        memory slots filled by cp.async (stages - 1 iterations in flight, no registers
        held); each lane reads back only what it copied itself, so no barrier is needed.
    meta_smem: (stages > 0) metadata also through the cp.async ring (replicated per lane);
        otherwise it is prefetched stages - 1 iterations ahead in loop-carried registers.
    x_stages: (prefill) the block's threads copy each x tile (its rows, ``unroll`` K tiles of
        every K slice) into a ring of ``x_stages`` shared-memory slots with cp.async, x_stages - 1
        iterations ahead; the nw warps of a K slice read their A fragments from there instead
        of each loading x from global memory. A lane's chunk (t, v) of a row sits at slot
        v * 4 + t of a row padded to k_tile / 8 + 4 chunks: the 8 lanes of each quarter warp
        (two rows of different parity, t = 0..3) then hit 8 different 16-byte bank groups.
    Rows: blocks along grid y take 16 * mt rows each (m_max > 64).
    """
    KT = K // k_tile
    TPW = KT // kw
    NI = TPW // unroll  # loop iterations per warp
    steps = k_tile // 16
    xv = k_tile // 32  # vector<8xf16> loads per x row per tile
    tid = E.tid()
    bid = E.bid()
    warp = tid // 32
    wk = warp % kw if nw > 1 else warp
    wn = warp // kw if nw > 1 else None
    lane = tid % 32
    g = lane // 4
    t = lane % 4
    M = E.idx(a["M"])
    mlast = M - 1
    mt = _m_tiles(m_max)  # x row tiles of 16; accumulator tile j * nt + r: rows 16j.., n-tile r
    BM = 16 * mt
    row0 = E.bid("y") * BM if _row_blocks(m_max) > 1 else E.const(0, "index")
    NA = mt * nt
    xlo = [E.minu(row0 + g + 16 * j, mlast) * (K // 8) + t * xv for j in range(mt)]
    xhi = [E.minu(row0 + g + 16 * j + 8, mlast) * (K // 8) + t * xv for j in range(mt)] if m_max > 8 else None
    tile0 = (bid * nw + wn) * nt if nw > 1 else bid * nt
    kt0 = wk * TPW
    wbase = [((tile0 + r) * KT + kt0) * 32 + lane for r in range(nt)]
    # decode: the block's weight tiles (nw * nt of KT * 512 bytes) into L2 first
    _prefetch_then_wait(E, a["wq"], bid * (nw * nt * KT * 32), nw * nt * KT * 512, 32 * kw * nw, m_max,
                        N // 8 * KT * 512)
    zero = E.const(0.0, "f32")
    meta_per_group = scale_acc is not None
    units = unroll // group_tiles if meta_per_group else unroll  # metadata sets per iteration

    def meta_srcs(i):
        """[[ (name, idx), ...] per (r, unit)] for the iteration starting at local tile i."""
        out = []
        for r in range(nt):
            for q in range(units):
                kt = kt0 + i + (q * group_tiles if meta_per_group else q)
                out.append(load_meta(E, a, tile0 + r, kt))
        return out

    # ---- the loads of one iteration: register path
    def load_stage(i):
        vals = [E.load_hint(a["wq"], wbase[r] + (i + u) * 32, w_hint)
                for r in range(nt) for u in range(unroll)]
        for srcs in meta_srcs(i):
            vals += [E.load(a[n], ix) for n, ix in srcs]
        return vals

    def split_stage(vals):
        ws = [[vals[r * unroll + u] for u in range(unroll)] for r in range(nt)]
        rest = vals[nt * unroll:]
        per = len(rest) // nt
        return ws, [rest[r * per:(r + 1) * per] for r in range(nt)]

    # ---- cp.async path
    n_meta = len(meta_srcs(E.const(0, "index"))[0])
    if stages:
        S = stages

        def wslot(slot, u, r):
            return ((warp * S + slot) * (unroll * nt) + (u * nt + r)) * 32 + lane

        def mslot(slot, up):
            return ((warp * S + slot) * (units * nt) + up) * 32 + lane

        def issue(c):
            def copies():
                i = c * unroll
                slot = c % S
                for r in range(nt):
                    for u in range(unroll):
                        E.cp_async(a["wbuf"], wslot(slot, u, r), a["wq"], wbase[r] + (i + u) * 32)
                if meta_smem:
                    for up, srcs in enumerate(meta_srcs(i)):
                        for k, (n, ix) in enumerate(srcs):
                            E.cp_async(a[f"mbuf{k}"], mslot(slot, up), a[n], ix)
            E.if_(E.cmp("ult", c, E.const(NI, "index")), copies)
            E.cp_async_commit()

        def read_slot(slot):
            ws = [[E.load(a["wbuf"], wslot(slot, u, r)) for u in range(unroll)] for r in range(nt)]
            metas = [[] for _ in range(nt)]
            for r in range(nt if meta_smem else 0):
                for q in range(units):
                    up = r * units + q
                    metas[r] += [E.load(a[f"mbuf{k}"], mslot(slot, up)) for k in range(n_meta)]
            return ws, metas

        def load_metas(i):  # register path for metadata: flat list
            return [E.load(a[n], ix) for srcs in meta_srcs(i) for n, ix in srcs]

        def split_metas(vals):
            per = len(vals) // nt
            return [vals[r * per:(r + 1) * per] for r in range(nt)]

    # ---- x tiles through shared memory (x_stages)
    if x_stages:
        CH = k_tile // 8  # 16-byte chunks of a row of one x tile
        RS = _x_row_chunks(k_tile)
        threads = 32 * kw * nw
        items = kw * unroll * BM * CH  # chunks a stage holds
        xs = a["xs"]

        def x_slot(slot, w, u, row):
            return ((slot * kw + w) * unroll + u) * BM + row

        def issue_x(c):
            """cp.async the x chunks of iteration c (K tiles c * unroll .. of every K slice)."""
            slot = c % x_stages

            def one(it):
                wu, rem = it // (BM * CH), it % (BM * CH)
                w, u = wu // unroll, wu % unroll
                row, ch = rem // CH, rem % CH
                src = E.minu(row0 + row, mlast) * (K // 8) + (w * TPW + c * unroll + u) * CH + ch
                E.cp_async(xs, x_slot(slot, w, u, row) * RS + (ch % xv) * 4 + ch // xv, a["x"], src)
            E.if_(E.cmp("ult", c, E.const(NI, "index")), lambda: _spread(E, tid, threads, items, one))
            E.cp_async_commit()

    mpu = n_meta

    def compute(i, acc, ws, metas, slot=None):
        accg = [list(x) for x in acc] if not meta_per_group else None
        for u in range(unroll):
            kt = kt0 + i + u
            xb = kt * (k_tile // 8)

            def a_frags(j, u=u):
                """The A fragments of row tile j, one per mma step."""
                if slot is not None:
                    lo = x_slot(slot, wk, u, g + 16 * j) * RS + t
                    xl = [E.load(a["xs"], lo + 4 * v) for v in range(xv)]
                    xh = [E.load(a["xs"], lo + (8 * RS + 4 * v)) for v in range(xv)]
                    return _frags(xl, xh)
                xl = [E.load(a["x"], xlo[j] + xb + v) for v in range(xv)]
                # For M <= 8 the A rows 8..15 only feed accumulator rows that are never
                # stored: reuse rows 0..7 instead of loading them.
                xh = xl if m_max <= 8 else [E.load(a["x"], xhi[j] + xb + v) for v in range(xv)]
                return _frags(xl, xh)

            def _frags(xl, xh):
                return [[E.slice2(xl[s // 2], 4 * (s % 2)), E.slice2(xh[s // 2], 4 * (s % 2)),
                         E.slice2(xl[s // 2], 4 * (s % 2) + 2), E.slice2(xh[s // 2], 4 * (s % 2) + 2)]
                        for s in range(steps)]
            if meta_per_group and u % group_tiles == 0:
                accg = [[zero] * 4 for _ in range(NA)]
            q = u // group_tiles if meta_per_group else u
            if mt == 1:  # decode: x first, then each n-tile's weights (the tuned order)
                A = a_frags(0)
                for r in range(nt):
                    B = dequant(E, ws[r][u], metas[r][q * mpu:(q + 1) * mpu])
                    for s in range(steps):
                        accg[r] = E.mma_f16(A[s], B[s], accg[r])
            else:  # prefill: the weights dequantized once, then one row tile of x at a time
                Bs = [dequant(E, ws[r][u], metas[r][q * mpu:(q + 1) * mpu]) for r in range(nt)]
                for j in range(mt):
                    A = a_frags(j)
                    for r in range(nt):
                        for s in range(steps):
                            accg[j * nt + r] = E.mma_f16(A[s], Bs[r][s], accg[j * nt + r])
            if meta_per_group and (u + 1) % group_tiles == 0:
                for r in range(nt):
                    sx, sy = scale_acc(E, metas[r][q * mpu:(q + 1) * mpu])
                    for ar in range(r, NA, nt):
                        acc[ar] = [E.fma(accg[ar][0], sx, acc[ar][0]), E.fma(accg[ar][1], sy, acc[ar][1]),
                                   E.fma(accg[ar][2], sx, acc[ar][2]), E.fma(accg[ar][3], sy, acc[ar][3])]
        return accg if not meta_per_group else acc

    if stages:
        for c in range(S - 1):
            issue(E.const(c, "index"))
        mq0 = [] if meta_smem or not n_meta else [
            v for d in range(S - 1) for v in load_metas(E.const(min(d * unroll, TPW - unroll), "index"))]
        mlen = len(mq0) // (S - 1) if mq0 else 0
        last = E.const(TPW - unroll, "index")

        def body(i, args):
            acc = [args[4 * r:4 * r + 4] for r in range(NA)]
            mq = args[4 * NA:]
            c = i // unroll
            issue(c + (S - 1))
            if mlen:
                mq = mq[mlen:] + load_metas(E.minu(i + (S - 1) * unroll, last))
            E.cp_async_wait(S - 1)
            ws, metas = read_slot(c % S)
            if mlen:
                metas = split_metas(args[4 * NA:4 * NA + mlen])
            acc = compute(i, acc, ws, metas)
            return [v for r in range(NA) for v in acc[r]] + mq

        res = E.for_(0, TPW, unroll, [zero] * (4 * NA) + mq0, body)
    else:
        stages0 = [load_stage(E.const(min(d * unroll, TPW - unroll), "index")) for d in range(depth)]
        slen = len(stages0[0])
        last = E.const(TPW - unroll, "index")

        for c in range(x_stages - 1):
            issue_x(E.const(c, "index"))

        def body(i, args):
            acc = [args[4 * r:4 * r + 4] for r in range(NA)]
            queue = args[4 * NA:]
            slot = None
            if x_stages:  # x of this iteration landed for every thread, the slot of the
                # previous one is free (all warps done with it): refill it
                c = i // unroll
                E.cp_async_wait(x_stages - 2)
                E.barrier()
                issue_x(c + (x_stages - 1))
                slot = c % x_stages
            nxt = queue[slen:] + load_stage(E.minu(i + depth * unroll, last))
            ws, metas = split_stage(queue[:slen])
            acc = compute(i, acc, ws, metas, slot)
            return [v for r in range(NA) for v in acc[r]] + nxt

        inits = [zero] * (4 * NA) + [v for st in stages0 for v in st]
        res = E.for_(0, TPW, unroll, inits, body)
    acc = [res[4 * r:4 * r + 4] for r in range(NA)]

    half_n = N // 2

    def store_out(ar, vals):
        j, r = divmod(ar, nt)
        tn = tile0 + r
        if final_scale is not None:
            sx, sy = final_scale(E, a, tn, t)
            vals = [vals[0] * sx, vals[1] * sy, vals[2] * sx, vals[3] * sy]
        col = tn * 4 + t
        if out_f32:  # fp32 result (no rounding to half)
            lo = E.from_elements(vals[0:2])
            hi = E.from_elements(vals[2:4]) if m_max > 8 else None
        else:
            lo = E.cast("truncf", E.from_elements(vals[0:2]), "vector<2xf16>")
            hi = E.cast("truncf", E.from_elements(vals[2:4]), "vector<2xf16>") if m_max > 8 else None
        row = row0 + g + 16 * j
        E.if_(E.cmp("ult", row, M), lambda: E.store(lo, a["y"], row * half_n + col))
        if m_max > 8:
            E.if_(E.cmp("ult", row + 8, M), lambda: E.store(hi, a["y"], (row + 8) * half_n + col))

    if kw == 1:
        for ar in range(NA):
            store_out(ar, acc[ar])
        return
    red = a["red"]
    for ar in range(NA):
        for e in range(4):
            E.store(acc[ar][e], red, ((warp * NA + ar) * 4 + e) * 32 + lane)
    E.barrier()
    for ar in range(NA):
        def owner(ar=ar):
            base = wn * (kw * NA * 128) if nw > 1 else E.const(0, "index")
            tot = []
            for e in range(4):
                s = None
                for w in range(kw):
                    v = E.load(red, base + E.const(((w * NA + ar) * 4 + e) * 32, "index") + lane)
                    s = v if s is None else s + v
                tot.append(s)
            store_out(ar, tot)
        E.if_(E.cmp("eq", wk, E.const(ar % kw, "index")), owner)


def _spread(E, tid, threads: int, items: int, fn):
    """fn(item) for items 0 .. items - 1 spread over a block's threads (the last round guarded
    when threads do not divide items): the block-wide cp.async copies of x tiles."""
    for p in range(-(-items // threads)):
        it = tid + p * threads
        if (p + 1) * threads <= items:
            fn(it)
        else:
            E.if_(E.cmp("ult", it, E.const(items, "index")), lambda it=it: fn(it))


def _m_tiles(m_max: int) -> int:
    """16-row mma tiles of x a warp multiplies with each dequantized weight fragment."""
    return 1 if m_max <= 16 else min(M_BLOCK, m_max + 15) // 16


def _row_blocks(m_max: int) -> int:
    """Blocks along grid y, each on 16 * _m_tiles(m_max) rows of x."""
    return -(-m_max // (16 * _m_tiles(m_max)))


def _check_cfg(K, N, k_tile, nt, kw, unroll, group_tiles, m_max, nw=1, depth=1):
    KT = K // k_tile
    _require(1 <= m_max <= GEMV_M_MAX, f"m_max must be in 1..{GEMV_M_MAX} (got {m_max})")
    _require(N % (8 * nt * nw) == 0, f"N={N} must be a multiple of 8*n_tiles*n_warps={8 * nt * nw}")
    _require(kw * nw <= 32, f"k_warps*n_warps={kw * nw} warps exceed a 1024-thread block")
    _require(depth >= 1, "depth must be >= 1")
    _require(KT % kw == 0, f"K/{k_tile}={KT} K-tiles must split evenly over k_warps={kw}")
    TPW = KT // kw
    _require(unroll >= 1 and TPW % unroll == 0,
             f"each warp's {TPW} K-tiles must be a multiple of unroll={unroll}")
    _require(unroll % group_tiles == 0,
             f"unroll={unroll} must be a multiple of the tiles per group ({group_tiles})")
    _require(TPW % group_tiles == 0, "warp K slices must hold whole groups")


ROWS_MAX = 4096  # rows a launch of the one-block-a-row kernels (quantize_rows, hadamard_rows)


def _m_param(m_max: int) -> Param:
    """The launch's row count: kernels take up to m_max rows of x a launch (host_plan splits more)."""
    return Param("M", "i32", "scalar", f"rows of x, 1..{m_max}", range=(1, m_max))


def _common_params(K, N, m_max):
    return [Param("x", f"memref<{m_max * K // 8}xvector<8xf16>>", "in",
                  f"activations f16 [M, {K}] row-major (M <= {m_max})", rows=("M", m_max))]


# --------------------------------------------------------------------------- w4a16


def gemv_w4a16(K: int, N: int, group_size: int = 128, *, zero_point: bool = True,
               scale_mode: str | None = None, m_max: int = 16, n_tiles: int | None = None,
               k_warps: int | None = None, unroll: int | None = None,
               w_cache: str | None = "auto", n_warps: int | None = None,
               depth: int | None = None, stages: int | None = None, meta_smem: bool = False,
               out_f32: bool = False, x_stages: int | None = None, name: str | None = None) -> KernelSpec:
    """y[M, N] = x[M, K] @ dequant(W4)^T for 1 <= M <= m_max (M is a launch argument).

    Constraints: K % 128 == 0, N % (8 n_tiles) == 0, group_size % 32 == 0 and divides K;
    ``scale_mode="acc"`` (default when group_size % 128 == 0) needs group_size % 128 == 0.
    Parameters (in order): x f16[M, K], wq, scales, [zeros | meta], y f16[M, N], M i32 —
    weights as produced by :func:`qcc.backends.cuda.pack.pack_w4a16` with the same
    ``scale_mode``.
    """
    G = group_size
    _require(K % 128 == 0 and N % 8 == 0, f"gemv_w4a16 needs K % 128 == 0 and N % 8 == 0 (K={K}, N={N})")
    _require(G % 32 == 0 and K % G == 0, f"group_size={G} must be a multiple of 32 dividing K={K}")
    mode = scale_mode or ("acc" if G % 128 == 0 else "weight")
    _require(mode in ("acc", "weight"), f"scale_mode must be 'acc' or 'weight' (got {mode!r})")
    _require(mode == "weight" or G % 128 == 0, "scale_mode='acc' needs group_size % 128 == 0")
    gt = G // 128 if mode == "acc" else 1
    _require(1 <= m_max <= GEMV_M_MAX, f"m_max must be in 1..{GEMV_M_MAX} (got {m_max})")
    cf = default_config("gemv_w4a16", K, N, m_max, gt, n_tiles=n_tiles, k_warps=k_warps,
                        unroll=unroll, w_cache=w_cache, n_warps=n_warps, depth=depth, stages=stages,
                        x_stages=x_stages)
    nt, kw, un = cf["n_tiles"], cf["k_warps"], cf["unroll"]
    w_cache, n_warps, depth, stages = cf["w_cache"], cf["n_warps"], cf["depth"], cf["stages"]
    x_stages = cf["x_stages"]
    GP = K // G
    NB = N // 8
    params = _common_params(K, N, m_max)
    params.append(Param("wq", f"memref<{NB * (K // 128) * 32}xvector<4xi32>>", "in",
                        "packed int4 tiles (pack_w4a16)"))
    if mode == "acc":
        params.append(Param("scales", f"memref<{NB * GP * 4}xvector<2xf32>>", "in",
                            "f32 [N/8, K/G, 8]"))
        if zero_point:
            params.append(Param("zeros", f"memref<{NB * GP * 2}xi32>", "in",
                                "u8 [N/8, K/G, 8] (read as 32-bit words)"))
    else:
        params.append(Param("meta", f"memref<{NB * GP * 8}xvector<2xf16>>", "in",
                            "f16 [N/8, K/G, 8, (1024+zero, scale)]"))
    yt = "f32" if out_f32 else "f16"
    params.append(Param("y", f"memref<{m_max * N // 2}xvector<2x{yt}>>", "out", f"{yt} [M, {N}]",
                        rows=("M", m_max)))
    params.append(_m_param(m_max))

    def load_meta(E, a, tn, kt):
        lane = E.tid() % 32
        g, t = lane // 4, lane % 4
        if mode == "acc":
            grp = kt // gt
            out = [("scales", (tn * GP + grp) * 4 + t)]
            if zero_point:
                out.append(("zeros", (tn * GP + grp) * 2 + g // 4))  # word holding row g's zero
            return out
        grp = (kt * 128 + t * 32) // G
        return [("meta", (tn * GP + grp) * 8 + g)]

    def dequant(E, w, m):
        if mode == "acc":
            return _w4_steps(E, w, _w4_zero_bias(E, m[1] if zero_point else None))
        zs = m[0]
        return _w4_steps(E, w, E.shuffle(zs, zs, [0] * 8), E.shuffle(zs, zs, [1] * 8))

    def scale_acc(E, m):
        s = m[0]
        return E.extract(s, 0), E.extract(s, 1)

    meta_types = ([("scales", "vector<2xf32>")] + ([("zeros", "i32")] if zero_point else [])
                  if mode == "acc" else [("meta", "vector<2xf16>")])
    smem = _smem(kw, n_warps, nt, un, stages, un // gt if mode == "acc" else un,
                 [t_ for _, t_ in meta_types] if meta_smem else [], mt=_m_tiles(m_max),
                 x_stages=x_stages, k_tile=128)

    def body(E, a):
        _mma_gemv_body(E, a, K=K, N=N, k_tile=128, nt=nt, kw=kw, unroll=un, m_max=m_max,
                       load_meta=load_meta, dequant=dequant, group_tiles=gt,
                       scale_acc=scale_acc if mode == "acc" else None, final_scale=None,
                       w_hint=W_CACHE_HINTS[w_cache], nw=n_warps, depth=depth, stages=stages,
                       meta_smem=meta_smem, out_f32=out_f32, x_stages=x_stages)

    nm = name or (f"gemv_w4a16_g{G}{'' if zero_point else 's'}_{mode}_k{K}_n{N}_m{m_max}"
                  f"_t{nt}w{kw}u{un}{_shape_suffix(n_warps, depth, stages, x_stages)}{'m' if meta_smem else ''}"
                  f"{_hint_suffix(w_cache)}{'_o32' if out_f32 else ''}")
    cfg = {"kind": "gemv_w4a16", "K": K, "N": N, "group_size": G, "zero_point": zero_point,
           "scale_mode": mode, "m_max": m_max, "n_tiles": nt, "k_warps": kw, "unroll": un,
           "w_cache": w_cache, "n_warps": n_warps, "depth": depth, "stages": stages,
           "meta_smem": meta_smem, "out_f32": out_f32, "x_stages": x_stages,
           "weight_bytes": N * K // 2,
           "meta_bytes": N * GP * (4 + (1 if zero_point else 0)) if mode == "acc" else N * GP * 4}
    return KernelSpec(nm, params, (32 * kw * n_warps, 1, 1), (N // (8 * nt * n_warps), _row_blocks(m_max), 1), body,
                      smem, cfg, doc=gemv_w4a16.__doc__.split("\n")[0])


def _w4_zero_bias(E, zword):
    """vector<8xf16> of 1024 + the zero point of this lane's weight row g (byte g % 4 of
    `zword`, the u8 zeros of rows 4 (g // 4).. as one word), or 1024 + 8 (symmetric: None)."""
    if zword is None:
        return E.const(1032.0, "vector<8xf16>")
    g = (E.tid() % 32) // 4
    z = (zword >> E.cast("index_cast", (g % 4) * 8, "i32")) & 0xFF
    return E.bitcast(E.broadcast((z | 0x6400) * 0x00010001, "vector<4xi32>"), "vector<8xf16>")


def _w4_steps(E, w, zb8, s8=None):
    """A lane's 16 bytes of a pack_w4a16 tile -> per k16 mma step the B pair [b0, b1]
    (vector<2xf16> each): ``0x6400 | q`` is the half 1024 + q, minus zb8 the exact integer
    q - zero (times s8, f16 scales, when given)."""
    V = []
    for c in range(4):
        x = w if c == 0 else (w >> E.const(4 * c, "vector<4xi32>"))
        h = E.bitcast((x & E.const(0x000F000F, "vector<4xi32>")) |
                      E.const(0x64006400, "vector<4xi32>"), "vector<8xf16>") - zb8
        V.append(h if s8 is None else h * s8)
    return [[E.slice2(V[2 * (s % 2)], 2 * (s // 2)), E.slice2(V[2 * (s % 2) + 1], 2 * (s // 2))]
            for s in range(8)]


def _w4_group_meta(E, a, tiles, q, GP, g, zero_point):
    """Per weight tile (index into pack_w4a16's [N/8] tiles): the f32 scale of its row g in
    group q, then (zero_point) the word holding that row's u8 zero (see _w4_zero_bias)."""
    odd = E.cmp("ne", g % 2, E.const(0, "index"))
    out = []
    for tile in tiles:
        at = tile * GP + q
        sc = E.load(a["scales"], at * 4 + g // 2)
        out.append(E.select(odd, E.extract(sc, 1), E.extract(sc, 0)))
        if zero_point:
            out.append(E.load(a["zeros"], at * 2 + g // 4))
    return out


def _w4_gemm_params(K, N, m_max, GP, zero_point, out_f32, scale_mode="acc"):
    """The parameters of the w4a16 GEMMs: gemv_w4a16's of the same ``scale_mode``."""
    params = _common_params(K, N, m_max)
    params.append(Param("wq", f"memref<{N // 8 * (K // 128) * 32}xvector<4xi32>>", "in", "packed int4 tiles (pack_w4a16)"))
    if scale_mode == "weight":
        params.append(Param("meta", f"memref<{N // 8 * GP * 8}xvector<2xf16>>", "in", "f16 [N/8, K/G, 8, (1024+zero, scale)]"))
    else:
        params.append(Param("scales", f"memref<{N // 8 * GP * 4}xvector<2xf32>>", "in", "f32 [N/8, K/G, 8]"))
        if zero_point:
            params.append(Param("zeros", f"memref<{N // 8 * GP * 2}xi32>", "in", "u8 [N/8, K/G, 8] (read as 32-bit words)"))
    yt = "f32" if out_f32 else "f16"
    params.append(Param("y", f"memref<{m_max * N}x{yt}>", "out", f"{yt} [M, {N}]", rows=("M", m_max)))
    params.append(_m_param(m_max))
    return params


def _row_blocks_body(BM, row_blocks, block):
    """A kernel body whose blocks along grid y own BM rows of x each: block(E, a, tid, lane,
    warp, g, t, M, row0), skipped by blocks wholly past M (fewer rows than m_max)."""
    def body(E, a):
        tid = E.tid()
        lane, warp = tid % 32, tid // 32
        g, t = lane // 4, lane % 4
        M = E.idx(a["M"])
        row0 = E.bid("y") * BM if row_blocks > 1 else E.const(0, "index")
        if row_blocks > 1:
            E.if_(E.cmp("ult", row0, M), lambda: block(E, a, tid, lane, warp, g, t, M, row0))
        else:
            block(E, a, tid, lane, warp, g, t, M, row0)
    return body


def _sw128(r, ch):
    """16-byte chunk ch (0..7) of row r in wgmma's 128-byte swizzled K-major layout: rows of
    128 bytes, the chunk at position ch ^ (r % 8) of its row (smem_desc(swizzle=128))."""
    return r * 8 + (ch ^ (r % 8))


def _wgmma_ring_turn(E, c, ahead, issue):
    """The wgmma GEMMs' ring step before K tile c's wgmmas: wait for the tile's cp.async group,
    publish it to the tensor cores (async proxy) and the block, then refill the slot whose
    wgmmas are done with tile c + ahead."""
    E.cp_async_wait(ahead - 1)  # tile c landed for this thread
    E.fence_proxy_async()  # ... and is visible to the tensor cores' reads
    E.barrier()  # ... for every thread; the wgmmas on the slot refilled next are done
    issue(c + ahead)


def gemm_w4a16(K: int, N: int, group_size: int = 128, *, zero_point: bool = True, m_max: int = 256,
               n_tiles: int | None = None, n_warps: int | None = None, m_tiles: int | None = None,
               x_stages: int | None = None, w_smem: bool | None = None, depth: int = 2, out_f32: bool = True,
               name: str | None = None) -> KernelSpec:
    """gemv_w4a16's product (``scale_mode="acc"``) for many rows of x (prefill): the same
    parameters, packed weights and numerics (exact integer weights in f16, fp32 group sums
    scaled by the fp32 group scales), restructured as a GEMM.

    A block owns 16 * m_tiles rows of x (blocks along grid y cover m_max) and n_warps *
    n_tiles tiles of 8 output columns (each warp n_tiles). Per 128-column K tile, the block's
    threads copy the x tile (its rows' 16 chunks of 8 halves) and every lane its own 16 bytes
    of each of its warp's weight tiles into a ring of ``x_stages`` shared-memory slots with
    cp.async, x_stages - 1 tiles ahead; each warp dequantizes a weight fragment once for all
    its rows (``w_smem=False``: each lane loads its weights straight into registers, ``depth``
    groups ahead, leaving shared memory to x). The mma roles are swapped against the GEMVs:
    two weight tiles (16 output columns) are A, 8 rows of x are B, so every operand comes
    straight from the registers it is computed or loaded into (x's B pair is two adjacent
    words of one 16-byte load; with x as A, four register moves an mma assembled the A quad).
    A lane's x chunk (t, v) of row r sits at position ((v ^ r % 2) * 4 + t) of the row: the
    two rows a quarter warp reads fall in different halves of the banks.
    Constraints: K % group_size == 0, group_size % 128 == 0, n_tiles even, N % (8 n_tiles
    n_warps) == 0.
    Defaults (H200 sweeps of bench_llama's prefill shapes at 128 and 256 rows,
    tools/cuda_device_run.py PREFILL_VARIANTS): 2 row tiles a block, 128 output columns a
    block (8 warps of 2 weight tiles, 4 where N needs it), W through the ring, 3 slots; for
    long K (>= 32 K tiles: the down projection) 4 warps of 4 tiles with W in registers and 4
    slots (down_proj 44.7 -> 40.5 us at 256 rows, 43.6 -> 35.0 at 128).
    """
    G = group_size
    long_k = K // 128 >= 32
    n_tiles = n_tiles or (4 if long_k and N % 128 == 0 else 2)
    w_smem = (not long_k) if w_smem is None else w_smem
    n_warps = n_warps or (16 // n_tiles if N % 128 == 0 else 4)  # 128 columns a block where N allows
    _require(n_tiles % 2 == 0, f"n_tiles must be even: weight tiles pair into 16-row A operands (got {n_tiles})")
    _require(G % 128 == 0 and K % G == 0, f"gemm_w4a16 needs group_size % 128 == 0 dividing K (G={G}, K={K})")
    _require(1 <= m_max <= GEMV_M_MAX, f"m_max must be in 1..{GEMV_M_MAX} (got {m_max})")
    BN = 8 * n_tiles * n_warps
    _require(N % BN == 0, f"N={N} must be a multiple of 8 * n_tiles * n_warps = {BN}")
    mt = m_tiles or min(2, -(-m_max // 16))
    BM = 16 * mt
    row_blocks = -(-m_max // BM)
    gt, KT, GP, XC = G // 128, K // 128, K // G, 16
    threads = 32 * n_warps
    x_stage, w_stage = BM * XC, n_warps * n_tiles * 32 if w_smem else 0  # 16-byte elements a slot
    fits = MAX_STATIC_SMEM // (16 * (x_stage + w_stage))
    S = x_stages or min(4, fits)
    _require(2 <= S <= fits, f"x_stages={S}: 2..{fits} slots of {16 * (x_stage + w_stage)} bytes fit")
    NA = mt * n_tiles
    RT = 2 * mt  # 8-row tiles of x a block
    params = _w4_gemm_params(K, N, m_max, GP, zero_point, out_f32)
    smem = [("xs", "vector<8xf16>", S * x_stage)] + ([("ws", "vector<4xi32>", S * w_stage)] if w_smem else [])
    WL = gt * n_tiles  # weight chunks a lane uses a group

    def block(E, a, tid, lane, warp, g, t, M, row0):
        tile0 = (E.bid("x") * n_warps + warp) * n_tiles
        xs, ws = a["xs"], a.get("ws")
        zero = E.const(0.0, "f32")
        last = E.const(GP - 1, "index")

        def load_w(q):
            """(w_smem=False) group q's weight chunks of this lane, [u][r] flat."""
            return [E.load_hint(a["wq"], ((tile0 + r) * KT + q * gt + u) * 32 + lane, "L1::no_allocate")
                    for u in range(gt) for r in range(n_tiles)]

        def w_slot(slot, r):
            return (slot * (n_warps * n_tiles) + warp * n_tiles + r) * 32 + lane

        def issue(c):
            """cp.async K tile c's x rows and weight tiles into slot c % S (nothing past the end)."""
            slot = c % S

            def one(it):
                row, ch = it // XC, it % XC
                r = row0 + row  # rows past M read rows < M (distinct addresses: no same-address pileup)
                src = E.select(E.cmp("ult", r, M), r, r % M) * (K // 8) + c * XC + ch
                E.cp_async(xs, slot * x_stage + row * XC + ((ch % 4) ^ (row % 2)) * 4 + ch // 4, a["x"], src)

            def copies():
                for r in range(n_tiles if w_smem else 0):
                    E.cp_async(ws, w_slot(slot, r), a["wq"], ((tile0 + r) * KT + c) * 32 + lane)
                _spread(E, tid, threads, x_stage, one)
            E.if_(E.cmp("ult", c, E.const(KT, "index")), copies)
            E.cp_async_commit()

        meta = lambda q: _w4_group_meta(E, a, [tile0 + r for r in range(n_tiles)], q, GP, g, zero_point)  # noqa: E731
        per = 2 if zero_point else 1
        xpos = [((g % 2) ^ v) * 4 + t for v in range(4)]  # rows g, g + 8, 16 j + g: one parity

        def group(q, args):
            acc = [args[4 * k:4 * k + 4] for k in range(NA)]
            cur, queue = args[4 * NA:4 * NA + n_meta], args[4 * NA + n_meta:]
            nxt = meta(E.minu(q + 1, last))
            if not w_smem:
                wnow, queue = queue[:WL], queue[WL:] + load_w(E.minu(q + depth, last))
            accg = [[zero] * 4 for _ in range(NA)]
            for u in range(gt):
                c = q * gt + u
                E.cp_async_wait(S - 2)  # tile c landed for every thread; the slot of c - 1 is free
                E.barrier()
                issue(c + (S - 1))
                slot = c % S
                B = [_w4_steps(E, E.load(ws, w_slot(slot, r)) if w_smem else wnow[u * n_tiles + r],
                               _w4_zero_bias(E, cur[per * r + 1] if zero_point else None))
                     for r in range(n_tiles)]
                for jj in range(RT):  # 8-row tiles of x: the B operands
                    xv = [E.load(xs, slot * x_stage + (8 * jj + g) * XC + p) for p in xpos]
                    for s_ in range(8):
                        Bx = [E.slice2(xv[s_ // 2], 4 * (s_ % 2)), E.slice2(xv[s_ // 2], 4 * (s_ % 2) + 2)]
                        for p in range(n_tiles // 2):  # weight tiles 2p, 2p + 1: rows g, g + 8 of A
                            W0, W1 = B[2 * p][s_], B[2 * p + 1][s_]
                            k = p * RT + jj
                            accg[k] = E.mma_f16([W0[0], W1[0], W0[1], W1[1]], Bx, accg[k])
            for k in range(NA):
                p = k // RT
                s0, s1 = cur[per * 2 * p], cur[per * (2 * p + 1)]
                acc[k] = [E.fma(accg[k][e], (s0, s0, s1, s1)[e], acc[k][e]) for e in range(4)]
            return [v for k in range(NA) for v in acc[k]] + nxt + queue

        for c in range(S - 1):
            issue(E.const(c, "index"))
        meta0 = meta(E.const(0, "index"))
        n_meta = len(meta0)
        queue0 = [] if w_smem else [v for d in range(depth) for v in load_w(E.const(min(d, GP - 1), "index"))]
        res = E.for_(0, GP, 1, [zero] * (4 * NA) + meta0 + queue0, group)
        for k in range(NA):  # D: columns g (tile 2p), g (tile 2p + 1) x rows 2t, 2t + 1 of the 8
            p, jj = divmod(k, RT)
            vals = res[4 * k:4 * k + 4]
            for e in range(4):
                v = vals[e] if out_f32 else E.cast("truncf", vals[e], "f16")
                row = row0 + 8 * jj + 2 * t + e % 2
                col = (tile0 + 2 * p + e // 2) * 8 + g
                E.if_(E.cmp("ult", row, M), lambda v=v, row=row, col=col: E.store(v, a["y"], row * N + col))

    nm = name or (f"gemm_w4a16_g{G}{'' if zero_point else 's'}_k{K}_n{N}_m{m_max}_t{n_tiles}n{n_warps}m{mt}x{S}{'' if w_smem else f'd{depth}'}"
                  f"{'_o32' if out_f32 else ''}")
    cfg = {"kind": "gemm_w4a16", "K": K, "N": N, "group_size": G, "zero_point": zero_point,
           "scale_mode": "acc", "m_max": m_max, "n_tiles": n_tiles, "n_warps": n_warps, "m_tiles": mt,
           "x_stages": S, "w_smem": w_smem, "depth": depth, "out_f32": out_f32, "weight_bytes": N * K // 2,
           "meta_bytes": N * GP * (4 + (1 if zero_point else 0))}
    return KernelSpec(nm, params, (threads, 1, 1), (N // BN, row_blocks, 1), _row_blocks_body(BM, row_blocks, block),
                      smem, cfg, doc=gemm_w4a16.__doc__.split("\n")[0])


def gemm_w4a16_wg(K: int, N: int, group_size: int = 128, *, zero_point: bool = True, m_max: int = 256,
                  scale_mode: str = "acc", rows: int | None = None, warpgroups: int = 1,
                  x_stages: int | None = None, overlap: int = 0, out_f32: bool = True,
                  name: str | None = None) -> KernelSpec:
    """gemm_w4a16's product (same parameters, packed weights and fp32-exact numerics) on
    Hopper's warpgroup MMA (``wgmma.mma_async``, sm_90a only).

    A block is ``warpgroups`` groups of 4 warps; each group owns 64 output columns (a warp
    the pair of weight tiles it dequantizes, exactly as in gemm_w4a16: the two tiles are the
    16 rows of the warp's share of wgmma's A, straight from registers) and all the block's
    ``rows`` rows of x (wgmma's N, B in shared memory). Per 128-column K tile, x, the weight
    tiles and their group scales and zeros reach shared memory by cp.async through a ring of
    ``x_stages`` slots; x in wgmma's 128-byte swizzled K-major layout (gemm_i8_wg's): the
    tile's 256 bytes of a row as two 128-byte halves, each in its own block of rows, 16
    threads copying a row's 256 contiguous bytes (two cache lines; the non-swizzled layout,
    with a thread pair a row, was 1.6-2x slower). One wgmma per k16 step accumulates a group's
    exact integer-weight sums in fp32 (the first step of a group starts from zero), and after
    the wait the group scale is applied in fp32: acc += scale * group sum, gemv_w4a16's
    ``scale_mode="acc"``. ``overlap = U`` > 1 (G = 128): the waits let one group stay in
    flight (two sets of group sums), so a tile's wgmmas run while the warp dequantizes the
    next, U groups a loop iteration; the ring then copies S - 2 tiles ahead, as the slot of
    the tile before may still be read. ``scale_mode="weight"`` (gemv_w4a16's: f16 (1024 +
    zero, scale) pairs, the weights scaled in f16 before the product, as torch fp16 holds them)
    accumulates all of K in one register set: no wait for a group's sums, one group in flight
    while the next is dequantized (the ring copies S - 2 tiles ahead), half the registers.
    Constraints: K % group_size == 0, group_size % 128 == 0, N % (64 warpgroups) == 0,
    rows % 8 == 0, 8 <= rows <= 256; overlap: group_size == 128, K / 128 a multiple of U,
    x_stages >= 3.
    Defaults (``rows`` None; H200 sweep of bench_llama's prefill shapes at 128 and 256 rows):
    1 warpgroup; weight mode 64 rows where that gives >= 128 blocks, else 32 (12.8, 7.4, 19.8,
    16.5 us for q/k/v, o, gate/up, down at 128 rows against cuBLAS fp16's 9.2, 6.7, 15.0,
    12.9); acc mode 64 rows and overlap 2 where that gives >= 192 blocks (q/k/v, gate/up: 24.1
    and 38.8 us at 256 rows), else 32 rows and overlap 4 (o_proj, down_proj: 9.8 and 22.4); 4
    slots.
    """
    G = group_size
    gt, KT, GP, XC = G // 128, K // 128, K // G, 16
    if rows is None:  # defaults: H200 sweep at 128 and 256 rows (tools/cuda_device_run.py PREFILL_VARIANTS)
        big = N // (64 * warpgroups) * -(-m_max // 64) >= (128 if scale_mode == "weight" else 192)
        rows = min(64 if big else 32, max(8, -(-m_max // 8) * 8))
        u = 2 if big else 4
        overlap = u if overlap == 0 and gt == 1 and GP % u == 0 else overlap
    BM = rows
    _require(G % 128 == 0 and K % G == 0, f"gemm_w4a16_wg needs group_size % 128 == 0 dividing K (G={G}, K={K})")
    _require(scale_mode in ("acc", "weight"), f"scale_mode must be 'acc' or 'weight' (got {scale_mode!r})")
    weight = scale_mode == "weight"
    _require(1 <= m_max <= GEMV_M_MAX, f"m_max must be in 1..{GEMV_M_MAX} (got {m_max})")
    _require(BM % 8 == 0 and 8 <= BM <= 256, f"rows must be a multiple of 8 in 8..256 (got {BM})")
    BN = 64 * warpgroups
    _require(N % BN == 0, f"N={N} must be a multiple of 64 * warpgroups = {BN}")
    row_blocks = -(-m_max // BM)
    threads, TB = 128 * warpgroups, 8 * warpgroups  # threads, weight tiles a block
    # 16-byte elements a slot: x rows, weight tiles; 8-byte scale pairs, zero words (acc) or
    # 4-byte (1024 + zero, scale) pairs (weight)
    x_stage, w_stage = BM * XC, TB * 32
    s_stage, z_stage = (TB * 8, 0) if weight else (TB * 4, TB * 2 if zero_point else 0)
    slot_bytes = 16 * (x_stage + w_stage) + (4 if weight else 8) * s_stage + 4 * z_stage
    fits = (MAX_DYNAMIC_SMEM - 5 * 1024) // slot_bytes  # buffers aligned to 1024 bytes, the base realigned
    S = x_stages or min(4, fits)
    _require(2 + (overlap > 1) <= S <= fits, f"x_stages={S}: {2 + (overlap > 1)}..{fits} slots of {slot_bytes} bytes fit")
    _require(overlap in (0, 1) or (gt == 1 and GP % overlap == 0),
             f"overlap={overlap} needs group_size == 128 and groups a multiple of it (G={G}, K={K})")
    _require(not weight or S >= 3, "scale_mode='weight' keeps a group in flight: x_stages >= 3")
    overlap = overlap if overlap > 1 and not weight else 0
    ahead = S - 1 - (overlap > 1 or weight)  # K tiles the ring copies ahead of the one multiplied
    UW = next(u for u in (4, 2, 1) if KT % u == 0)  # (weight) K tiles a loop iteration
    params = _w4_gemm_params(K, N, m_max, GP, zero_point, out_f32, scale_mode)
    smem = [("xs", "vector<8xf16>", S * x_stage), ("ws", "vector<4xi32>", S * w_stage),
            ("ss", "vector<2xf16>" if weight else "vector<2xf32>", S * s_stage)] + \
        ([("zs", "i32", S * z_stage)] if z_stage else [])
    H = BM // 2  # accumulator registers a thread (wgmma m64 x n BM over 128 threads)

    def block(E, a, tid, lane, warp, g, t, M, row0):
        tb0 = E.bid("x") * TB  # the block's first weight tile; the warp's are 2 warp, + 1 of the block's
        xs, ws, ss, zs = a["xs"], a["ws"], a["ss"], a.get("zs")
        zero = E.const(0.0, "f32")

        def issue(c):
            """cp.async K tile c into slot c % S (nothing past the end): x (a thread pair copies
            one row's 32 contiguous bytes), every weight tile's 512 bytes, group c // gt's
            scales and zeros of the block's tiles."""
            slot = c % S

            def x_one(it):
                r, kc = it // XC, it % XC  # 16 threads a row; chunk kc into half kc // 8, swizzled
                dst = slot * x_stage + (kc // 8) * (BM * 8) + _sw128(r, kc % 8)
                rr = row0 + r  # rows past M read rows < M (distinct addresses: no same-address pileup)
                src = E.select(E.cmp("ult", rr, M), rr, rr % M) * (K // 8) + c * XC + kc
                E.cp_async(xs, dst, a["x"], src)

            def w_one(it):
                E.cp_async(ws, slot * w_stage + it, a["wq"], ((tb0 + it // 32) * KT + c) * 32 + it % 32)

            def s_one(it):
                if weight:
                    E.cp_async(ss, slot * s_stage + it, a["meta"], ((tb0 + it // 8) * GP + c // gt) * 8 + it % 8)
                else:
                    E.cp_async(ss, slot * s_stage + it, a["scales"], ((tb0 + it // 4) * GP + c // gt) * 4 + it % 4)

            def z_one(it):
                E.cp_async(zs, slot * z_stage + it, a["zeros"], ((tb0 + it // 2) * GP + c // gt) * 2 + it % 2)

            def copies():
                _spread(E, tid, threads, x_stage, x_one)
                _spread(E, tid, threads, w_stage, w_one)
                _spread(E, tid, threads, s_stage, s_one)
                if z_stage:
                    _spread(E, tid, threads, z_stage, z_one)
            E.if_(E.cmp("ult", c, E.const(KT, "index")), copies)
            E.cp_async_commit()

        odd = E.cmp("ne", g % 2, E.const(0, "index"))

        def scales(slot):
            """The f32 scales of row g of the warp's two tiles, from the slot."""
            out = []
            for r in range(2):
                sc = E.load(ss, slot * s_stage + (warp * 2 + r) * 4 + g // 2)
                out.append(E.select(odd, E.extract(sc, 1), E.extract(sc, 0)))
            return out

        def meta(slot, r):
            """_w4_steps' (zero bias[, f16 scale]) for row g of the warp's tile r, from the slot."""
            if weight:  # the (1024 + zero, scale) pair of row g, broadcast
                zs8 = E.load(ss, slot * s_stage + (warp * 2 + r) * 8 + g)
                return E.shuffle(zs8, zs8, [0] * 8), E.shuffle(zs8, zs8, [1] * 8)
            return (_w4_zero_bias(E, E.load(zs, slot * z_stage + (warp * 2 + r) * 2 + g // 4) if zero_point else None),)

        def scaled(acc, sums, sc):
            return [E.fma(sums[k], sc[0] if k % 4 < 2 else sc[1], acc[k]) for k in range(H)]

        def tile(c, accg, fresh=False):
            """K tile c's 8 wgmmas, committed as one group, on top of accg (None or fresh: from
            zero, fresh in accg's registers)."""
            _wgmma_ring_turn(E, c, ahead, issue)
            slot = c % S
            W = [_w4_steps(E, E.load(ws, slot * w_stage + (warp * 2 + r) * 32 + lane), *meta(slot, r)) for r in range(2)]
            E.wgmma_fence()
            for s_ in range(8):
                desc = E.smem_desc(xs, slot * x_stage + (s_ // 4) * (BM * 8) + 2 * (s_ % 4), lbo=16, sbo=1024,
                                   swizzle=128)
                accg = E.wgmma_f16([W[0][s_][0], W[1][s_][0], W[0][s_][1], W[1][s_][1]], desc, accg, BM,
                                   accumulate=None if s_ or not fresh else False)
            E.wgmma_commit()
            return accg, None if weight else scales(slot)

        def group(q, args):
            accg = None
            for u in range(gt):
                accg, sc = tile(q * gt + u, accg)
                accg = E.wgmma_wait(0, accg)  # before the next tile's cp.async reuses a slot
            return scaled(args, accg, sc)

        def through(i, acc):
            """(weight) K tiles UW i .. UW i + UW - 1, their wgmmas straight into acc, the tile
            before done after each wait; the iteration's last is waited for in it: no wgmma is
            in flight across the loop's back edge (its A registers, read asynchronously, would
            be free for the next tile's weights there: wrong results on the H200)."""
            for h in range(UW):
                acc, _ = tile(i * UW + h, acc)
                acc = E.wgmma_wait(1 if h < UW - 1 else 0, acc)
            return acc

        def run(i, acc):
            """(overlap = U) groups U i .. U i + U - 1, their sums alternating between two register
            sets: a group's sums are scaled in once at most the next group is in flight, and a
            group's first wgmma writes the set scaled in last (scale-d 0, tied). The last group
            is waited for in the iteration: sums in flight never cross the loop's back edge,
            where copies of them would make ptxas serialize the wgmmas."""
            free, prev = [None, None], None
            for h in range(overlap):
                sums, sc = tile(i * overlap + h, free[h % 2], fresh=True)
                if prev is not None:
                    free[1 - h % 2] = E.wgmma_wait(1, prev[0])
                    acc = scaled(acc, free[1 - h % 2], prev[1])
                prev = (sums, sc)
            return scaled(acc, E.wgmma_wait(0, prev[0]), prev[1])

        for c in range(ahead):
            issue(E.const(c, "index"))
        if weight:
            res = E.for_(0, KT // UW, 1, [zero] * H, through)
        elif overlap:
            res = E.for_(0, GP // overlap, 1, [zero] * H, run)
        else:
            res = E.for_(0, GP, 1, [zero] * H, group)
        tile0 = tb0 + warp * 2
        for k in range(H):  # D: column g of tile 0 (k % 4 < 2) or 1 x rows 8 j + 2 t, + 1
            j, e = divmod(k, 4)
            v = res[k] if out_f32 else E.cast("truncf", res[k], "f16")
            row = row0 + 8 * j + 2 * t + e % 2
            col = (tile0 + e // 2) * 8 + g
            E.if_(E.cmp("ult", row, M), lambda v=v, row=row, col=col: E.store(v, a["y"], row * N + col))

    nm = name or (f"gemm_w4a16_wg_g{G}{'' if zero_point else 's'}{'_weight' if weight else ''}_k{K}_n{N}_m{m_max}_r{BM}w{warpgroups}x{S}"
                  f"{f'o{overlap}' if overlap > 1 else ''}"
                  f"{'_o32' if out_f32 else ''}")
    cfg = {"kind": "gemm_w4a16_wg", "K": K, "N": N, "group_size": G, "zero_point": zero_point,
           "scale_mode": scale_mode, "m_max": m_max, "rows": BM, "warpgroups": warpgroups, "x_stages": S,
           "overlap": overlap, "out_f32": out_f32, "weight_bytes": N * K // 2, "arch": "sm_90a",
           "meta_bytes": N * GP * 4 if weight else N * GP * (4 + (1 if zero_point else 0))}
    return KernelSpec(nm, params, (threads, 1, 1), (N // BN, row_blocks, 1), _row_blocks_body(BM, row_blocks, block),
                      smem, cfg, doc=gemm_w4a16_wg.__doc__.split("\n")[0], smem_dynamic=True, smem_align=1024)


# --------------------------------------------------------------------------- w8a16


def gemv_w8a16(K: int, N: int, *, m_max: int = 16, n_tiles: int | None = None,
               k_warps: int | None = None, unroll: int | None = None,
               w_cache: str | None = "auto", n_warps: int | None = None,
               depth: int | None = None, stages: int | None = None, out_f32: bool = False,
               x_stages: int | None = None, name: str | None = None) -> KernelSpec:
    """y[M, N] = x[M, K] @ (q * scale)^T, int8 per-channel weights, 1 <= M <= m_max.

    Constraints: K % 64 == 0, N % (8 n_tiles) == 0. Parameters: x f16[M, K],
    wq (pack_w8a16), scales f32[N], y f16[M, N], M i32.
    """
    _require(K % 64 == 0 and N % 8 == 0, f"gemv_w8a16 needs K % 64 == 0 and N % 8 == 0 (K={K}, N={N})")
    _require(1 <= m_max <= GEMV_M_MAX, f"m_max must be in 1..{GEMV_M_MAX} (got {m_max})")
    cf = default_config("gemv_w8a16", K, N, m_max, 1, n_tiles=n_tiles, k_warps=k_warps,
                        unroll=unroll, w_cache=w_cache, n_warps=n_warps, depth=depth, stages=stages,
                        x_stages=x_stages)
    nt, kw, un = cf["n_tiles"], cf["k_warps"], cf["unroll"]
    w_cache, n_warps, depth, stages = cf["w_cache"], cf["n_warps"], cf["depth"], cf["stages"]
    x_stages = cf["x_stages"]
    NB = N // 8
    params = _common_params(K, N, m_max)
    params.append(Param("wq", f"memref<{NB * (K // 64) * 32}xvector<4xi32>>", "in",
                        "offset-binary int8 tiles (pack_w8a16)"))
    params.append(Param("scales", f"memref<{N // 2}xvector<2xf32>>", "in", "f32 [N]"))
    yt = "f32" if out_f32 else "f16"
    params.append(Param("y", f"memref<{m_max * N // 2}xvector<2x{yt}>>", "out", f"{yt} [M, {N}]",
                        rows=("M", m_max)))
    params.append(_m_param(m_max))

    def load_meta(E, a, tn, kt):
        return []

    def dequant(E, w, m):
        mask = E.const(0x00FF00FF, "vector<4xi32>")
        bias = E.const(0x64006400, "vector<4xi32>")
        off = E.const(1152.0, "vector<8xf16>")
        lo = E.bitcast((w & mask) | bias, "vector<8xf16>") - off
        hi = E.bitcast(((w >> E.const(8, "vector<4xi32>")) & mask) | bias, "vector<8xf16>") - off
        return [[E.slice2(lo, 2 * s), E.slice2(hi, 2 * s)] for s in range(4)]

    def final_scale(E, a, tn, t):
        s = E.load(a["scales"], tn * 4 + t)
        return E.extract(s, 0), E.extract(s, 1)

    smem = _smem(kw, n_warps, nt, un, stages, un, [], mt=_m_tiles(m_max), x_stages=x_stages, k_tile=64)

    def body(E, a):
        _mma_gemv_body(E, a, K=K, N=N, k_tile=64, nt=nt, kw=kw, unroll=un, m_max=m_max,
                       load_meta=load_meta, dequant=dequant, group_tiles=1, scale_acc=None,
                       final_scale=final_scale, w_hint=W_CACHE_HINTS[w_cache], nw=n_warps,
                       depth=depth, stages=stages, out_f32=out_f32, x_stages=x_stages)

    nm = name or (f"gemv_w8a16_k{K}_n{N}_m{m_max}_t{nt}w{kw}u{un}{_shape_suffix(n_warps, depth, stages, x_stages)}"
                  f"{_hint_suffix(w_cache)}{'_o32' if out_f32 else ''}")
    cfg = {"kind": "gemv_w8a16", "K": K, "N": N, "m_max": m_max, "n_tiles": nt, "k_warps": kw,
           "unroll": un, "w_cache": w_cache, "n_warps": n_warps, "depth": depth, "stages": stages,
           "out_f32": out_f32, "x_stages": x_stages, "weight_bytes": N * K, "meta_bytes": 4 * N}
    return KernelSpec(nm, params, (32 * kw * n_warps, 1, 1), (N // (8 * nt * n_warps), _row_blocks(m_max), 1), body,
                      smem, cfg, doc=gemv_w8a16.__doc__.split("\n")[0])


# --------------------------------------------------------------------------- w8a8


def _rows_and_warps(N: int, n_rows, warps, rows_pref, warps_pref) -> tuple[int, int]:
    """Weight rows a warp and warps a block of the integer GEMVs: the given ones, or the first
    preferred value that divides N."""
    if n_rows is None:
        n_rows = next((r for r in rows_pref if N % r == 0), 1)
    if warps is None:
        warps = next((w for w in warps_pref if N % (n_rows * w) == 0), 1)
    _require(N % (n_rows * warps) == 0, f"N={N} must be a multiple of n_rows * warps = {n_rows * warps}")
    return n_rows, warps



def _members(N: int, members) -> tuple[tuple, list[str]]:
    """The stacked layers' N (one layer: (N,)) and their parameter-name suffixes."""
    members = tuple(members) if members and len(members) > 1 else (N,)
    _require(sum(members) == N, f"members {members} must sum to N={N}")
    return members, ([str(i) for i in range(len(members))] if len(members) > 1 else [""])


def _per_member(members, sfx, rows_a_block: int, member):
    """A kernel body running member(E, a, suffix, N_i, block) on each stacked layer's blocks:
    the blocks of layer i follow those of layer i - 1 (a branch on the block index, uniform in
    each block, so the layers' shuffles stay warp-converged)."""
    def body(E, a):
        if len(members) == 1:
            return member(E, a, "", members[0], E.bid("x"))
        first = 0
        for i, n in zip(sfx, members):
            b = E.bid("x")
            inside = E.and_(E.cmp("uge", b, E.const(first, "index")),
                            E.cmp("ult", b, E.const(first + n // rows_a_block, "index")))
            E.if_(inside, lambda i=i, n=n, b=b, first=first: member(E, a, i, n, b - E.const(first, "index")))
            first += n // rows_a_block
    return body


def _warp_rows(E, a, blk, warps: int, n_rows: int):
    """(lane, first weight row of this warp, M, M - 1) of an integer GEMV whose warps own
    n_rows weight rows each, `warps` warps a block, in block `blk`."""
    tid = E.tid()
    M = E.idx(a["M"])
    return tid % 32, (blk * warps + tid // 32) * n_rows, M, M - E.const(1, "index")


# Decode GEMVs ask L2 for their weight slice before they wait for their predecessor:
# programmatic dependent launch places them while the one-block kernel before them still runs,
# and their weights depend on nothing. Only launches of at most PREFETCH_MAX_BYTES of weights
# (H200 decode: w8a8 1.3%, w4a4-had 4.2% faster; with every GEMV's weights, gate/up's 23 MB at
# w8a8 included, w8a8 was 2.5% slower; weights loaded into registers before the wait instead
# gained nothing; docs/BENCHMARKS.md) and at most PREFETCH_MAX_ROWS rows of x (at m_max 16 one
# kernel spilled).
PREFETCH_WEIGHTS = True
PREFETCH_MAX_BYTES = 6 << 20
PREFETCH_MAX_ROWS = 8


def _prefetch_then_wait(E, mem, first, nbytes: int, threads: int, m_max: int, total: int, more=()):
    """L2 prefetches of bytes [16 * first, 16 * first + nbytes) of `mem` (16-byte elements; a
    thread a 128-byte line in turn), and of each (mem, first) in `more` alike, when the launch's
    weights (`total` bytes) and m_max are within the limits above; then the grid-dependency
    wait. L2 is coherent: a line fetched early is never stale."""
    if PREFETCH_WEIGHTS and m_max <= PREFETCH_MAX_ROWS and total <= PREFETCH_MAX_BYTES:
        lines = -(-nbytes // 128)
        tid = E.tid()
        for mem_i, first_i in ((mem, first), *more):
            last = first_i + E.const(nbytes // 16 - 1, "index")
            for t in range(-(-lines // threads)):
                line = tid + E.const(t * threads, "index")
                at = E.minu(first_i + line * 8, last)
                if (t + 1) * threads > lines:
                    E.if_(E.cmp("ult", line, E.const(lines, "index")), lambda m=mem_i, at=at: E.prefetch_l2(m, at))
                else:
                    E.prefetch_l2(mem_i, at)
    E.grid_dependency_wait()


def _int_members(N, members, n_rows, warps, interleave, epilogue, rows_pref, warps_pref):
    """(members, suffixes, n_rows, warps) of an integer GEMV (gemv_i8, gemv_i4g): n_rows weight
    rows of one member a warp, or (interleave) row n of every member, one size each."""
    members, sfx = _members(N, members)
    if interleave:
        _require(len(members) > 1 and len(set(members)) == 1, f"interleave needs equal members (got {members})")
        _, warps = _rows_and_warps(members[0], 1, warps, (1,), warps_pref)
        n_rows = len(members)
    else:
        n_rows, warps = _rows_and_warps(math.gcd(*members), n_rows, warps, rows_pref, warps_pref)
    if epilogue is not None:
        _require(interleave or len(members) == 1, "an epilogue needs one member or interleave=True")
    return members, sfx, n_rows, warps


def _warp_members(sfx, mi, n_rows: int, interleave: bool):
    """(member suffix, row offset from the warp's first row) of each weight row a warp owns."""
    return [(i, 0) for i in sfx] if interleave else [(mi, t) for t in range(n_rows)]


def _store_rows(E, a, live, r: int, N: int, n0, rows, vals, epilogue, interleave: bool):
    """Row r of x's results `vals` (one per warp row) stored to their members' y, or handed to
    the epilogue (see gemv_i8)."""
    for (i, t), v in zip(rows, vals):
        if epilogue is None:
            E.if_(live, lambda v=v, i=i, t=t: E.store(v, a["y" + i], E.const(r * N, "index") + n0 + t))
        elif not interleave:
            E.if_(live, lambda v=v, t=t: epilogue[1](E, a, r, n0 + t, [v]))
    if epilogue is not None and interleave:
        E.if_(live, lambda: epilogue[1](E, a, r, n0, list(vals)))


def _int_body(members, sfx, n_rows: int, warps: int, interleave: bool, member):
    """The kernel body: member(E, a, suffix, N_i, block) per stacked layer (_per_member), or
    once over all of them (interleave)."""
    if not interleave:
        return _per_member(members, sfx, n_rows * warps, member)

    def body(E, a):
        member(E, a, None, members[0], E.bid("x"))
    return body


def _expert_of(E, ids, r, experts: int):
    """ids[r] (i64) as torch indexes (-1 the last expert), clamped into [0, experts) (memory
    safety; torch raises there), as an index."""
    i = E.load(ids, r)
    i = E.select(E.cmp("slt", i, E.const(0, "i64")), i + E.const(experts, "i64"), i)
    return E.minu(E.cast("index_cast", i, "index"), E.const(experts - 1, "index"))


def _int4_bytes(E, word):
    """A 32-bit word of 8 int4 codes (two a byte, low nibble the even column, biased by +8) ->
    (4 signed bytes of the even columns, 4 of the odd ones): v ^ 8 is the two's complement
    nibble, and its bit 3 times 0x1E sets the byte's top four bits (no carry between bytes)."""
    nib, bias, sign = (E.const(v, "i32") for v in (0x0F0F0F0F, 0x08080808, 0x1E))
    out = []
    for v in (word & nib, (word >> 4) & nib):
        v = v ^ bias
        out.append(v | ((v & bias) * sign))
    return out


def _even_odd_bytes(E, lo, hi):
    """Two words of 8 consecutive int8 columns -> (their 4 even columns, their 4 odd ones)."""
    a, b = (E.bitcast(w, "vector<4xi8>") for w in (lo, hi))
    return [E.bitcast(E.shuffle(a, b, sel), "i32") for sel in ((0, 2, 4, 6), (1, 3, 5, 7))]


def _int_params(K, m_max, members, sfx, scaled, w_bits):
    """Parameters of the integer matmuls (gemv_i8, gemm_i8): x int8 codes, each member's weight
    codes [, sx, each member's sw], each member's y, M."""
    params = [Param("x", f"memref<{m_max * K // 16}xvector<4xi32>>", "in", f"int8 [M, {K}] row-major",
                    rows=("M", m_max))]
    params += [Param(f"wq{i}", f"memref<{n * K * w_bits // 128}xvector<4xi32>>", "in",
                     f"int{w_bits} [{n}, {K}] row-major") for i, n in zip(sfx, members)]
    if scaled == "row":
        params.append(Param("sx", f"memref<{m_max}xf32>", "in", "f32 [M] per-token scales", rows=("M", m_max)))
    elif scaled == "tensor":
        params.append(Param("sx", "memref<1xf32>", "in", "f32 [1] per-tensor scale"))
    if scaled:
        params += [Param(f"sw{i}", f"memref<{n}xf32>", "in", f"f32 [{n}] per-channel scales")
                   for i, n in zip(sfx, members)]
    yt = "f32" if scaled else "i32"
    params += [Param(f"y{i}", f"memref<{m_max * n}x{yt}>", "out", f"{yt} [M, {n}]", rows=("M", m_max))
               for i, n in zip(sfx, members)]
    params.append(_m_param(m_max))
    return params


def gemv_i8(K: int, N: int, *, m_max: int = 16, n_rows: int | None = None, warps: int | None = None,
            unroll: int | None = None, scaled: str | None = None, w_bits: int = 8,
            members: tuple | list | None = None, interleave: bool = False, epilogue=None,
            experts: int = 0, name: str | None = None) -> KernelSpec:
    """y[M, N] i32 = x[M, K] int8 @ wq[N, K]^T, exact, 1 <= M <= m_max (dp4a).

    scaled="row" (or "tensor"): y f32 = (f32(acc) * sx[m] (or sx[0])) * sw[n] instead, the
    scale_accumulate of dequant-after-gemm in the epilogue, in its order of rounding.
    w_bits=4: wq holds symmetric int4 codes as quantize-weights packs them (two a byte along
    K, low nibble the even column, biased by +8); they are sign-extended to bytes in
    registers and x's bytes split into even and odd columns to match.
    members=(N0, N1, ...), summing to N: the layers that read one x (q/k/v, gate/up) in one
    launch, each on its own codes as stored: parameters x, wq0, wq1, ..., [sx, sw0, sw1, ...,]
    y0, y1, ..., M; the blocks of member i follow those of member i - 1 (a branch on the block
    index, uniform in each block). interleave=True (members of one size Nm): each warp owns
    row n of every member instead (they share its x loads), so that its lane 0 holds all of
    output n's values.
    epilogue=(params, fn): instead of storing y, lane 0 calls fn(E, a, r, n, values) for row
    r < M of x and output n, values the members' results there (interleaved), or the one
    result of a one-member launch; params are appended to the kernel's.
    experts=E: a mixture of experts' product (dequant-after-gemm's gather_matmul_int and
    gather_scale_accumulate): wq holds E weights [E, N, K] as stored, sw their scales [E, N],
    and row r of x multiplies expert ids[r] (i64 parameter `ids` after x; -1 is the last, as
    torch indexes, then clamped into range): each row loads its expert's weight chunks (rows
    of one expert meet in L1), so nothing is shared between rows; scaled only, one member.

    The integer core of w8a8 / w4a4 layers (dequant-after-gemm's qcc.matmul_int): the codes
    stay in their [N, K] row-major layout (no repacked copy). Each warp owns `n_rows`
    weight rows and all M rows of x; its lanes stride K in 16-byte chunks of weights
    (coalesced 512-byte loads of a weight row), `dp4a` sums 4 byte products into i32, and
    a butterfly reduces the lanes. Constraints: K % 16 == 0 (K % 32 for int4),
    N % (n_rows * warps) == 0. Parameters: x int8 [M, K], wq [N, K * w_bits / 8] bytes,
    [sx, sw,] y [M, N], M i32 (rows of this launch).
    """
    _require(w_bits in (8, 4), f"w_bits must be 8 or 4 (got {w_bits})")
    cols = 128 // w_bits  # K columns per 16-byte weight chunk
    _require(K % cols == 0, f"gemv_i8 needs K % {cols} == 0 for int{w_bits} weights (K={K})")
    _require(1 <= m_max <= 16, f"m_max must be in 1..16 (got {m_max})")
    # defaults from the H200 sweep (tools/cuda_device_run.py, I8_VARIANTS): one weight row a
    # warp, 8 warps, 2 chunks in flight for one or two tokens; more rows of x want more
    # weight rows a warp (each x chunk loaded once for 4 rows: 1.5x faster at M = 16; with
    # up to 8 rows of x, 4 weight rows spilled in one shape)
    if experts:
        _require(experts >= 1 and scaled in ("row", "tensor") and not members and epilogue is None,
                 "experts= needs scaled='row' or 'tensor', one member and no epilogue")
    members, sfx, n_rows, warps = _int_members(N, members, n_rows, warps, interleave, epilogue,
                                               (1,) if m_max <= 2 or experts else (2, 1) if m_max <= 8 else (4, 2, 1),
                                               (8, 4, 2, 1) if m_max <= 2 else (4, 2, 1))
    if unroll is None:
        unroll = 2 if n_rows == 1 else 1
    _require(unroll >= 1, f"unroll must be >= 1 (got {unroll})")
    _require(scaled in (None, "row", "tensor"), f"scaled must be None, 'row' or 'tensor' (got {scaled!r})")
    K16 = K // 16
    CH = K // cols  # weight chunks per row
    steps = -(-CH // 32)  # chunks per lane
    params = _int_params(K, m_max, members, sfx, scaled, w_bits)
    params += list(epilogue[0]) if epilogue is not None else []
    if experts:  # ids after x; wq and sw hold every expert's
        params = [params[0], Param("ids", f"memref<{m_max}xi64>", "in", "i64 [M] each row's expert",
                                   rows=("M", m_max))] + [
            Param("wq", f"memref<{experts * N * K * w_bits // 128}xvector<4xi32>>", "in",
                  f"int{w_bits} [{experts}, {N}, {K}] row-major") if p.name == "wq" else
            Param("sw", f"memref<{experts * N}xf32>", "in", f"f32 [{experts}, {N}] per-channel scales")
            if p.name == "sw" else p for p in params[1:]]

    def member(E, a, mi, N, blk):
        """Weight rows of member mi (its wq, sw, y and N; all members when interleaved) for
        block `blk` of its blocks."""
        lane, n0, M, last = _warp_rows(E, a, blk, warps, 1 if interleave else n_rows)
        rows = _warp_members(sfx, mi, n_rows, interleave)
        own = 1 if interleave else n_rows  # rows of each member a warp
        if experts:  # the weights depend on the rows' experts: nothing to fetch before the wait
            E.grid_dependency_wait()
        else:
            slices = [(a["wq" + i], blk * (warps * own * CH)) for i in (sfx if interleave else [mi])]
            _prefetch_then_wait(E, *slices[0], warps * own * CH * 16, 32 * warps, m_max,
                                sum(members) * K * w_bits // 8, more=slices[1:])
        xrow = [E.minu(E.const(r, "index"), last) * K16 for r in range(m_max)]  # rows >= M repeat the last
        # each row's first weight row: its expert's (experts=), else the warp's for every row
        wrow = [_expert_of(E, a["ids"], E.minu(E.const(r, "index"), last), experts) * N + n0
                for r in range(m_max)] if experts else [n0] * m_max
        zero = E.const(0, "i32")

        def chunk(i, acc):
            """acc += the products of 16-byte weight chunk i (a Val or an int) of every lane."""
            k = i * 32 + lane
            kc = E.minu(k, E.const(CH - 1, "index")) if CH % 32 else k
            ok = E.cmp("ult", k, E.const(CH, "index")) if CH % 32 else None  # lanes past K add nothing
            def weights(first):
                """Each of the warp's weight rows from `first`: the chunk's words (zero past K)."""
                ws = []
                for i, t in rows:
                    w = E.load(a["wq" + i], (first + t) * CH + kc)
                    words = [E.extract(w, j) for j in range(4)]
                    if w_bits == 4:  # word j: columns 8j..8j+7 -> even columns, odd columns
                        words = [w for wj in words for w in _int4_bytes(E, wj)]
                    ws.append([E.select(ok, wj, zero) for wj in words] if ok is not None else words)
                return ws

            ws = None if experts else weights(n0)
            out = list(acc)
            for r in range(m_max):
                if experts:
                    ws = weights(wrow[r])
                if w_bits == 8:
                    x = E.load(a["x"], xrow[r] + kc)
                    xs = [E.extract(x, j) for j in range(4)]
                else:
                    xv = [E.load(a["x"], xrow[r] + 2 * kc + h) for h in range(2)]
                    xw = [E.extract(xv[q // 4], q % 4) for q in range(8)]
                    xs = [v for j in range(4) for v in _even_odd_bytes(E, xw[2 * j], xw[2 * j + 1])]
                for t in range(n_rows):
                    v = out[r * n_rows + t]
                    for xw, ww in zip(xs, ws[t]):
                        v = E.dp4a(xw, ww, v)
                    out[r * n_rows + t] = v
            return out

        def step(it, acc):
            for u in range(unroll):
                acc = chunk(it * unroll + u, acc)
            return acc

        acc = E.for_(0, steps // unroll, 1, [zero] * (m_max * n_rows), step)
        for i in range(steps - steps % unroll, steps):
            acc = chunk(E.const(i, "index"), acc)
        for off in (16, 8, 4, 2, 1):
            acc = [v + E.shfl_xor(v, off) for v in acc]
        first = E.cmp("eq", lane, E.const(0, "index"))
        sw = [E.load(a["sw" + i], n0 + t) for i, t in rows] if scaled and not experts else None
        for r in range(m_max):
            live = E.and_(first, E.cmp("ult", E.const(r, "index"), M))
            if scaled:
                sx = E.load(a["sx"], E.const(0, "index") if scaled == "tensor" else E.minu(E.const(r, "index"), last))
            if experts:
                sw = [E.load(a["sw"], wrow[r] + t) for _, t in rows]
            vals = acc[r * n_rows:(r + 1) * n_rows]
            if scaled:
                vals = [(E.cast("sitofp", v, "f32") * sx) * sw[j] for j, v in enumerate(vals)]
            _store_rows(E, a, live, r, N, n0, rows, vals, epilogue, interleave)

    nm = name or (f"gemv_i{'8' if w_bits == 8 else '4'}_k{K}_n{'_'.join(map(str, members))}_m{m_max}"
                  f"_r{n_rows}w{warps}u{unroll}{'_s' + scaled[0] if scaled else ''}{'_il' if interleave else ''}"
                  f"{f'_e{experts}' if experts else ''}")
    cfg = {"kind": "gemv_i8", "K": K, "N": N, "m_max": m_max, "n_rows": n_rows, "warps": warps,
           "unroll": unroll, "scaled": scaled, "w_bits": w_bits, "members": list(members),
           "interleave": interleave, "experts": experts, "weight_bytes": max(experts, 1) * N * K * w_bits // 8,
           "meta_bytes": 4 * N * max(experts, 1) if scaled else 0}
    return KernelSpec(nm, params, (32 * warps, 1, 1), (N // (n_rows * warps), 1, 1),
                      _int_body(members, sfx, n_rows, warps, interleave, member), [], cfg,
                      doc=gemv_i8.__doc__.split("\n")[0])


def gemm_i8(K: int, N: int, *, m_max: int = 64, n_tiles: int | None = None, n_warps: int = 4,
            k_warps: int | None = None,
            m_tiles: int | None = None, unroll: int | None = None, depth: int = 2,
            x_stages: int | None = None, w_smem: bool = True, scaled: str | None = None,
            w_bits: int = 8, members: tuple | list | None = None, name: str | None = None) -> KernelSpec:
    """gemv_i8's product on the tensor cores for many rows of x (prefill): the same parameters
    and results (exact i32 sums, or the same scaled f32 epilogue), ``mma.sync.m16n8k32`` s8.

    A block owns 16 * m_tiles rows of x (blocks along grid y cover m_max) and n_warps * n_tiles
    * 8 weight rows (each warp n_tiles tiles of 8). Per 64-byte K tile, every lane loads 16
    bytes of each of its weight rows (row g of the tile, K bytes 16t..16t+15: the [N, K]
    codes as stored, no repacked copy) and of x rows g and g + 8 of each row tile, and
    uses them as the two k32 steps' fragments: mma K slot 4t + i <-> byte 16t + 8s + i,
    16 + 4t + i <-> 16t + 8s + 4 + i (the same permutation of K for x and W leaves the dot
    products unchanged). x tiles reach shared memory through a cp.async ring of
    ``x_stages`` slots filled by all the block's threads, rows of 4 chunks unpadded: a
    quarter warp reads two rows of different parity, 8 distinct 16-byte bank groups. W
    streams through registers ``depth`` tiles ahead, or (``w_smem``) through a per-warp
    ring of the same x_stages slots in the same cp.async groups (each lane reads back what
    it copied: more tiles in flight without holding registers). ``k_warps`` > 1: that many
    warps split K for each n-group (each slice its own part of every x slot), their i32
    partial sums added through shared memory (the x ring's) before the epilogue, exactly.
    w_bits=4 (gemv_i8's symmetric int4 codes, two a byte): 128-column K tiles, a lane's 16
    bytes of a weight row are 32 codes, unpacked into their even and odd columns' bytes, and
    its 32 bytes of x split the same way (byte permutes), four k32 steps; x rows padded to 9
    chunks in shared memory (conflict-free for two chunks a lane).
    Constraints: K % 64 == 0 (int4: K % 128), every member's N a multiple of 8 * n_tiles * n_warps.

    Defaults (H200 sweep at 128 rows, tools/cuda_device_run.py PREFILL_VARIANTS): W through
    the ring; 64-row blocks, 2 K tiles an iteration, 3 slots when the grid has >= 256
    blocks of them, else 32-row blocks, 1 K tile, 4 slots (more blocks for small N), and
    2 K-split warps a column group of 1 n-tile a warp when even those are fewer than 256;
    else 2 n-tiles a warp.
    """
    _require(w_bits in (8, 4), f"w_bits must be 8 or 4 (got {w_bits})")
    KTILE = 64 if w_bits == 8 else 128  # K columns a tile: one 16-byte weight chunk a lane
    _require(K % KTILE == 0, f"gemm_i8 needs K % {KTILE} == 0 for int{w_bits} weights (K={K})")
    _require(1 <= m_max <= GEMV_M_MAX, f"m_max must be in 1..{GEMV_M_MAX} (got {m_max})")
    _require(scaled in (None, "row", "tensor"), f"scaled must be None, 'row' or 'tensor' (got {scaled!r})")
    members, sfx = _members(N, members)
    groups = N // (16 * n_warps)  # column groups of 2 n-tiles a warp
    if m_tiles is None:
        m_tiles = min(_m_tiles(max(m_max, 17)), 4 if groups * -(-m_max // M_BLOCK) >= GEMM_BIG_GRID else 2)
    unroll = unroll or (2 if m_tiles == 4 and w_bits == 8 and K % (2 * KTILE) == 0 else 1)
    if k_warps is None:
        small = groups * -(-m_max // (16 * m_tiles)) < GEMM_BIG_GRID
        k_warps = 2 if small and n_tiles in (None, 1) and (K // KTILE) % (2 * unroll) == 0 else 1
    n_tiles = n_tiles or (1 if k_warps > 1 else 2)
    BN = 8 * n_tiles * n_warps
    _require(all(n % BN == 0 for n in members),
             f"every member's N {members} must be a multiple of 8 * n_tiles * n_warps = {BN}")
    auto_stages = x_stages is None
    x_stages = x_stages or (3 if unroll == 2 else 4)
    mt = m_tiles
    _require(1 <= mt <= M_BLOCK // 16, f"m_tiles must be in 1..{M_BLOCK // 16}")
    _require(x_stages >= 2 and depth >= 1 and unroll >= 1, "x_stages >= 2, depth >= 1, unroll >= 1")
    BM = 16 * mt
    row_blocks = -(-m_max // BM)
    K16 = K // 16
    KT = K // KTILE
    XC = KTILE // 16  # 16-byte x chunks of a row of one tile
    RS = XC if w_bits == 8 else XC + 1  # slots a row takes in shared memory
    CPR = K * w_bits // 128  # 16-byte weight chunks a row
    kw = k_warps
    _require(kw >= 1 and KT % (kw * unroll) == 0,
             f"K/{KTILE}={KT} K tiles must split into k_warps={kw} slices of a multiple of unroll={unroll}")
    TPW = KT // kw  # K tiles of a slice
    NI = TPW // unroll
    threads = 32 * n_warps * kw
    items = kw * unroll * BM * XC  # 16-byte x chunks a stage holds
    xs_stage = kw * unroll * BM * RS
    NA = mt * n_tiles
    red = kw * n_warps * NA * 32 if kw > 1 else 0  # vector<4xi32> partial sums handed over

    def shared(S):
        out = [("xs", "vector<4xi32>", max(S * xs_stage, red))]
        if w_smem:
            out.append(("ws", "vector<4xi32>", S * n_warps * kw * n_tiles * unroll * 32))
        return out, sum(n * 16 for _, _, n in out)
    smem, total = shared(x_stages)
    while auto_stages and total > MAX_STATIC_SMEM and x_stages > 2:  # int4's x tiles are twice as wide
        x_stages -= 1
        smem, total = shared(x_stages)
    _require(total <= MAX_STATIC_SMEM,
             f"{total} bytes of shared memory exceed the {MAX_STATIC_SMEM}-byte static limit")

    params = _int_params(K, m_max, members, sfx, scaled, w_bits)

    def member(E, a, mi, N, blk):
        tid = E.tid()
        lane, warp = tid % 32, tid // 32
        wn, wk = (warp % n_warps, warp // n_warps) if kw > 1 else (warp, E.const(0, "index"))
        g, t = lane // 4, lane % 4
        M = E.idx(a["M"])
        mlast = M - 1
        row0 = E.bid("y") * BM if row_blocks > 1 else E.const(0, "index")
        tile0 = (blk * n_warps + wn) * n_tiles
        wrow = [((tile0 + r) * 8 + g) * CPR + wk * (TPW * 4) + t for r in range(n_tiles)]
        xs = a["xs"]
        zero = E.const(0, "i32")

        def w_slot(slot, r, u):
            return ((slot * n_warps * kw + warp) * (n_tiles * unroll) + r * unroll + u) * 32 + lane

        def issue_x(c):
            slot = c % x_stages

            def copies():
                if w_smem:
                    for r in range(n_tiles):
                        for u in range(unroll):
                            E.cp_async(a["ws"], w_slot(slot, r, u), a["wq" + mi], wrow[r] + (c * unroll + u) * 4)
                _spread(E, tid, threads, items, one)

            def one(it):
                wu, rem = it // (BM * XC), it % (BM * XC)  # wu = slice * unroll + u
                row, ch = rem // XC, rem % XC
                kt = (wu // unroll) * TPW + c * unroll + wu % unroll
                src = E.minu(row0 + row, mlast) * K16 + kt * XC + ch
                E.cp_async(xs, (slot * kw * unroll + wu) * (BM * RS) + row * RS + ch, a["x"], src)
            E.if_(E.cmp("ult", c, E.const(NI, "index")), copies)
            E.cp_async_commit()

        def load_w(i):  # the weights of iteration i: [r][u] vector<4xi32>
            return [E.load_hint(a["wq" + mi], wrow[r] + (i + u) * 4, "L1::no_allocate")
                    for r in range(n_tiles) for u in range(unroll)]

        def words(v):
            return [E.extract(v, k) for k in range(4)]

        for c in range(x_stages - 1):
            issue_x(E.const(c, "index"))
        last = E.const(TPW - unroll, "index")
        queue0 = [] if w_smem else [v for d in range(depth)
                                    for v in load_w(E.const(min(d * unroll, TPW - unroll), "index"))]
        wlen = n_tiles * unroll

        def body(i, args):
            acc = [args[4 * k:4 * k + 4] for k in range(NA)]
            queue = args[4 * NA:]
            c = i // unroll
            E.cp_async_wait(x_stages - 2)  # this iteration's x landed; the oldest slot is free
            E.barrier()
            issue_x(c + (x_stages - 1))
            slot = c % x_stages
            if w_smem:
                nxt, ws = [], [E.load(a["ws"], w_slot(slot, r, u)) for r in range(n_tiles) for u in range(unroll)]
            else:
                nxt, ws = queue[wlen:] + load_w(E.minu(i + depth * unroll, last)), queue[:wlen]
            def x_pairs(row_base):
                """Per k32 step, the pair of x words at the K positions of the B pair."""
                xw = [w for c_ in range(XC // 4) for w in words(E.load(xs, row_base + (XC // 4) * t + c_))]
                if w_bits == 8:
                    return [xw[2 * s:2 * s + 2] for s in range(2)]
                return [_even_odd_bytes(E, xw[2 * s], xw[2 * s + 1]) for s in range(4)]
            for u in range(unroll):
                # per k32 step the B pair: w8 bytes 8s..8s+7 of the lane's 16, in order; w4 the
                # even, then the odd columns of codes 8s..8s+7
                B = [[wd[2 * s:2 * s + 2] for s in range(2)] if w_bits == 8 else [_int4_bytes(E, v) for v in wd]
                     for wd in (words(ws[r * unroll + u]) for r in range(n_tiles))]
                for j in range(mt):
                    base = ((slot * kw + wk) * unroll + u) * (BM * RS) + (16 * j + g) * RS
                    xl, xh = x_pairs(base), x_pairs(base + 8 * RS)
                    for r in range(n_tiles):
                        for st in range(len(xl)):
                            acc[j * n_tiles + r] = E.mma_s8([xl[st][0], xh[st][0], xl[st][1], xh[st][1]],
                                                            B[r][st], acc[j * n_tiles + r])
            return [v for k in range(NA) for v in acc[k]] + nxt

        res = E.for_(0, TPW, unroll, [zero] * (4 * NA) + queue0, body)
        if kw > 1:  # slices 1.. hand their sums to slice 0 through the (now idle) x ring
            E.cp_async_wait(0)
            E.barrier()

            for k in range(NA):  # (slice 0's own copy is not read back: no branch here)
                E.store(E.from_elements(res[4 * k:4 * k + 4]), xs, ((wk * n_warps + wn) * NA + k) * 32 + lane)
            E.barrier()
        y = a["y" + mi]

        def epilogue(res):
            cols = [(tile0 + r) * 8 + 2 * t for r in range(n_tiles)]
            sw = [[E.load(a["sw" + mi], c + e) for e in range(2)] for c in cols] if scaled else None
            sx0 = E.load(a["sx"], E.const(0, "index")) if scaled == "tensor" else None
            for j in range(mt):
                for h in range(2):  # rows g, g + 8 of row tile j
                    row = row0 + 16 * j + 8 * h + g
                    if scaled:
                        sx = sx0 if sx0 is not None else E.load(a["sx"], E.minu(row, mlast))
                    for r in range(n_tiles):
                        k = 4 * (j * n_tiles + r) + 2 * h
                        vals = res[k:k + 2]
                        if scaled:
                            vals = [(E.cast("sitofp", v, "f32") * sx) * sw[r][e] for e, v in enumerate(vals)]

                        def st(vals=vals, row=row, col=cols[r]):
                            for e in range(2):
                                E.store(vals[e], y, row * N + col + e)
                        E.if_(E.cmp("ult", row, M), st)

        if kw == 1:
            epilogue(res)
        else:
            def slice0():
                tot = list(res)
                for sl in range(1, kw):
                    for k in range(NA):
                        v = E.load(xs, E.const((sl * n_warps * NA + k) * 32, "index") + wn * (NA * 32) + lane)
                        for e in range(4):
                            tot[4 * k + e] = tot[4 * k + e] + E.extract(v, e)
                epilogue(tot)
            E.if_(E.cmp("eq", wk, E.const(0, "index")), slice0)

    nm = name or (f"gemm_i{w_bits}_k{K}_n{'_'.join(map(str, members))}_m{m_max}_t{n_tiles}n{n_warps}"
                  f"{f'k{kw}' if kw > 1 else ''}"
                  f"m{mt}u{unroll}{'w' if w_smem else f'd{depth}'}x{x_stages}{'_s' + scaled[0] if scaled else ''}")
    cfg = {"kind": "gemm_i8", "K": K, "N": N, "m_max": m_max, "n_tiles": n_tiles, "n_warps": n_warps,
           "k_warps": kw,
           "m_tiles": mt, "unroll": unroll, "depth": depth, "x_stages": x_stages, "w_smem": w_smem,
           "scaled": scaled,
           "w_bits": w_bits, "members": list(members), "weight_bytes": N * K * w_bits // 8,
           "meta_bytes": 4 * N if scaled else 0}
    return KernelSpec(nm, params, (threads, 1, 1), (N // BN, row_blocks, 1),
                      _per_member(members, sfx, BN, member), smem, cfg, doc=gemm_i8.__doc__.split("\n")[0])


def gemm_i8_wg(K: int, N: int, *, m_max: int = 256, rows: int | None = None, warpgroups: int | None = None,
               x_stages: int | None = None, scaled: str | None = None, w_bits: int = 8,
               members: tuple | list | None = None, name: str | None = None) -> KernelSpec:
    """gemm_i8's product (same parameters, exact i32 sums or the same scaled f32 epilogue) on
    Hopper's warpgroup MMA, ``wgmma.mma_async`` m64nNk32 s8 (sm_90a only), int8 weights.

    Both operands come from shared memory: a block is ``warpgroups`` groups of 4 warps, each
    owning 64 weight rows (wgmma's A, M = 64) and all the block's ``rows`` rows of x (wgmma's
    N). Per 128-byte K tile, the block's weight rows and x rows reach shared memory by
    cp.async through a ring of ``x_stages`` slots in wgmma's 128-byte swizzled K-major layout:
    a row's 128 bytes in 8 16-byte chunks, chunk c of row r at chunk c ^ (r % 8) of its
    128-byte line, 8-row atoms of 1024 bytes (1024-byte aligned). So 8 consecutive threads
    copy one row's 128 contiguous bytes of the [N, K] codes as stored (one cache line) into
    8 different bank groups; a k32 step's descriptor starts 32 bytes further into the rows.
    The warps issue one wgmma per k32 step into one set of i32 accumulators and keep one tile
    in flight while the next is issued (the ring copies S - 2 tiles ahead: the slot of the
    tile before may still be read); a loop iteration takes up to 4 tiles and waits for its
    last, so no wgmma is in flight across the back edge.
    Constraints: w_bits 8, K % 128 == 0, every member's N a multiple of 64 * warpgroups,
    rows in 8, 16, 24 or a multiple of 16 up to 256, x_stages >= 3.
    Defaults (H200 sweep of bench_llama's prefill shapes at 128 rows, tools/cuda_device_run.py
    PREFILL_VARIANTS): 1 warpgroup (2 were never faster), 64-row blocks where they make >= 192
    blocks (q/k/v, gate/up: 7.1 and 11.5 us against gemm_i8's 13.0 and 19.7), else 32 (o_proj,
    down_proj: 5.0 and 9.3 against 7.0 and 15.1); the deepest ring, up to 8 slots, that keeps
    all the blocks resident at once.
    """
    _require(w_bits == 8, f"gemm_i8_wg takes int8 weights (w_bits={w_bits}); int4 runs on gemm_i8")
    _require(K % 128 == 0, f"gemm_i8_wg needs K % 128 == 0 (K={K})")
    _require(1 <= m_max <= GEMV_M_MAX, f"m_max must be in 1..{GEMV_M_MAX} (got {m_max})")
    _require(scaled in (None, "row", "tensor"), f"scaled must be None, 'row' or 'tensor' (got {scaled!r})")
    members, sfx = _members(N, members)
    warpgroups = warpgroups or 1
    if rows is None:  # 64-row blocks where they make >= 192 blocks, else 32 (H200 sweep)
        rows = min(64 if N // (64 * warpgroups) * -(-m_max // 64) >= 192 else 32, max(16, -(-m_max // 16) * 16))
    BM, BN = rows, 64 * warpgroups
    _require(BM in (8, 16, 24) or (BM % 16 == 0 and 16 <= BM <= 256),
             f"rows must be 8, 16, 24 or a multiple of 16 up to 256 (got {BM})")
    _require(all(n % BN == 0 for n in members), f"every member's N {members} must be a multiple of 64 * warpgroups = {BN}")
    row_blocks = -(-m_max // BM)
    threads = 128 * warpgroups
    KT, K16 = K // 128, K // 16
    x_stage, w_stage = -(-BM // 8) * 64, BN * 8  # 16-byte chunks a slot holds (whole 8-row atoms)
    slot_bytes = 16 * (x_stage + w_stage)
    fits = (MAX_DYNAMIC_SMEM - 3 * 1024) // slot_bytes  # buffers aligned to 1024 bytes, the base realigned
    # default: the deepest ring (up to 8) that keeps every block resident at once on 132 SMs
    resident = -(-(N // BN) * row_blocks // SM_COUNT)
    S = x_stages or max(3, min(8, (MAX_DYNAMIC_SMEM // resident - 3 * 1024) // slot_bytes))
    _require(3 <= S <= fits, f"x_stages={S}: 3..{fits} slots of {slot_bytes} bytes fit")
    ahead = S - 2  # K tiles the ring copies ahead of the one multiplied
    UW = next(u for u in (4, 2, 1) if KT % u == 0)  # K tiles a loop iteration
    H = BM // 2  # accumulator registers a thread (wgmma m64 x n BM over 128 threads)
    params = _int_params(K, m_max, members, sfx, scaled, w_bits)
    smem = [("xs", "vector<4xi32>", S * x_stage), ("ws", "vector<4xi32>", S * w_stage)]

    def block(mi, N, blk, E, a, tid, lane, warp, g, t, M, row0):
        n0 = blk * BN  # the block's first weight row
        xs, ws = a["xs"], a["ws"]

        def issue(c):
            """cp.async K tile c into slot c % S (nothing past the end): 8 threads a row, each
            one 16-byte chunk, to its swizzled place."""
            slot = c % S

            def x_one(it):
                r, ch = it // 8, it % 8
                rr = row0 + r  # rows past M read rows < M (distinct addresses: no same-address pileup)
                src = E.select(E.cmp("ult", rr, M), rr, rr % M) * K16 + c * 8 + ch
                E.cp_async(xs, slot * x_stage + _sw128(r, ch), a["x"], src)

            def w_one(it):
                r, ch = it // 8, it % 8
                E.cp_async(ws, slot * w_stage + _sw128(r, ch), a["wq" + mi], (n0 + r) * K16 + c * 8 + ch)

            def copies():
                _spread(E, tid, threads, BM * 8, x_one)
                _spread(E, tid, threads, w_stage, w_one)
            E.if_(E.cmp("ult", c, E.const(KT, "index")), copies)
            E.cp_async_commit()

        def tile(c, acc):
            """K tile c's 4 wgmmas (one a k32 step), committed as one group."""
            _wgmma_ring_turn(E, c, ahead, issue)
            slot = c % S
            E.wgmma_fence()
            for s_ in range(4):
                da = E.smem_desc(ws, slot * w_stage + (warp // 4) * 512 + 2 * s_, lbo=16, sbo=1024, swizzle=128)
                db = E.smem_desc(xs, slot * x_stage + 2 * s_, lbo=16, sbo=1024, swizzle=128)
                acc = E.wgmma_s8(da, db, acc, BM)
            E.wgmma_commit()
            return acc

        def through(i, acc):
            for h in range(UW):
                acc = tile(i * UW + h, acc)
                acc = E.wgmma_wait(1 if h < UW - 1 else 0, acc)
            return acc

        for c in range(ahead):
            issue(E.const(c, "index"))
        res = E.for_(0, KT // UW, 1, [E.const(0, "i32")] * H, through)
        y = a["y" + mi]
        cols = [n0 + 16 * warp + 8 * h + g for h in range(2)]  # D: weight rows g, g + 8 of the warp's 16
        sw = [E.load(a["sw" + mi], c) for c in cols] if scaled else None
        sx0 = E.load(a["sx"], E.const(0, "index")) if scaled == "tensor" else None
        for k in range(H):  # x rows 8 j + 2 t, + 1
            j, e = divmod(k, 4)
            row = row0 + 8 * j + 2 * t + e % 2
            v = res[k]
            if scaled:
                sx = sx0 if sx0 is not None else E.load(a["sx"], E.minu(row, M - 1))
                v = (E.cast("sitofp", v, "f32") * sx) * sw[e // 2]
            E.if_(E.cmp("ult", row, M), lambda v=v, row=row, col=cols[e // 2]: E.store(v, y, row * N + col))

    def member(E, a, mi, N, blk):
        _row_blocks_body(BM, row_blocks, lambda *b: block(mi, N, blk, *b))(E, a)

    nm = name or (f"gemm_i8_wg_k{K}_n{'_'.join(map(str, members))}_m{m_max}_r{BM}w{warpgroups}"
                  f"x{S}{'_s' + scaled[0] if scaled else ''}")
    cfg = {"kind": "gemm_i8_wg", "K": K, "N": N, "m_max": m_max, "rows": BM, "warpgroups": warpgroups,
           "x_stages": S, "scaled": scaled, "w_bits": w_bits, "members": list(members),
           "weight_bytes": N * K, "meta_bytes": 4 * N if scaled else 0, "arch": "sm_90a"}
    return KernelSpec(nm, params, (threads, 1, 1), (N // BN, row_blocks, 1), _per_member(members, sfx, BN, member),
                      smem, cfg, doc=gemm_i8_wg.__doc__.split("\n")[0], smem_dynamic=True, smem_align=1024)


# --------------------------------------------------------------------------- w8, column-sparse x


def gemv_w8_sparse_x(K: int, N: int, *, m_max: int = 16, n_rows: int | None = None,
                     warps: int | None = None, name: str | None = None) -> KernelSpec:
    """y[M, N] f32 = (x[M, K] f32 @ wq[N, K]^T) * scales[N], skipping K chunks where x is zero.

    The float part of llm-int8-dynamic: x holds the call's outlier columns (zero elsewhere)
    and wq are the int8 per-channel codes the integer part reads (no second copy). Each
    warp owns `n_rows` weight rows; a lane looks at its 16-column chunk of every row of x
    and loads the 16 weight bytes only when one of them is non-zero, so with a few outlier
    columns the weights are barely read (32-byte sectors of a few chunks a row); the block
    first marks its chunks with a non-zero x in shared memory, so x is scanned once a block,
    not once a warp. Exact for
    any x (a dense x reads every chunk). Constraints: K % 16 == 0, m_max <= 8,
    N % (n_rows * warps) == 0. Parameters: x f32 [M, K], wq int8 [N, K], scales f32 [N],
    y f32 [M, N], M i32.
    """
    _require(K % 16 == 0, f"gemv_w8_sparse_x needs K % 16 == 0 (K={K})")
    # the x chunks tested are reused by the products (CSE'd loads): 16 rows of them spill
    _require(1 <= m_max <= 8, f"m_max must be in 1..8 (got {m_max})")
    # more warps a block: fewer scans of x
    n_rows, warps = _rows_and_warps(N, n_rows, warps, (2, 1) if m_max <= 4 else (1,), (8, 4, 2, 1))
    K16 = K // 16
    steps = -(-K16 // 32)
    params = [
        Param("x", f"memref<{m_max * K // 4}xvector<4xf32>>", "in", f"f32 [M, {K}]", rows=("M", m_max)),
        Param("wq", f"memref<{N * K16}xvector<4xi32>>", "in", f"int8 [{N}, {K}] row-major"),
        Param("scales", f"memref<{N}xf32>", "in", f"f32 [{N}]"),
        Param("y", f"memref<{m_max * N}xf32>", "out", f"f32 [M, {N}]", rows=("M", m_max)),
        _m_param(m_max),
    ]
    acc_t = "vector<4xf32>"

    def body(E, a):
        tid = E.tid()
        lane = tid % 32
        n0 = (E.bid("x") * warps + tid // 32) * n_rows
        M = E.idx(a["M"])
        last = M - E.const(1, "index")
        xrow = [E.minu(E.const(r, "index"), last) * (K // 4) for r in range(m_max)]
        magnitude = E.const(0x7FFFFFFF, "vector<4xi32>")  # -0.0 counts as zero
        T = 32 * warps
        for i in range(-(-K16 // T)):  # the block marks its chunks with a non-zero x once
            c = tid + i * T
            cc = E.minu(c, E.const(K16 - 1, "index")) if (i + 1) * T > K16 else c
            bits = None
            for r in range(m_max):
                for j in range(4):
                    b = E.bitcast(E.load(a["x"], xrow[r] + cc * 4 + j), "vector<4xi32>")
                    bits = b if bits is None else bits | b
            bits = bits & magnitude
            word = E.extract(bits, 0) | E.extract(bits, 1) | E.extract(bits, 2) | E.extract(bits, 3)
            if (i + 1) * T > K16:
                E.if_(E.cmp("ult", c, E.const(K16, "index")), lambda cc=cc, word=word: E.store(word, a["live"], cc))
            else:
                E.store(word, a["live"], cc)
        E.barrier()

        def step(i, acc):
            k16 = i * 32 + lane
            kc = E.minu(k16, E.const(K16 - 1, "index")) if K16 % 32 else k16

            def xv(r, j):
                return E.load(a["x"], xrow[r] + kc * 4 + j)

            live = E.cmp("ne", E.load(a["live"], kc), E.const(0, "i32"))
            if K16 % 32:
                live = E.and_(live, E.cmp("ult", k16, E.const(K16, "index")))

            def use():
                out = list(acc)
                for t in range(n_rows):
                    w = E.load(a["wq"], (n0 + t) * K16 + kc)
                    wf = [E.cast("sitofp", E.bitcast(E.extract(w, j), "vector<4xi8>"), acc_t) for j in range(4)]
                    for r in range(m_max):
                        v = out[r * n_rows + t]
                        for j in range(4):
                            v = E.fma(xv(r, j), wf[j], v)
                        out[r * n_rows + t] = v
                return out

            return E.if_(live, use, lambda: list(acc), [acc_t] * len(acc))

        acc = E.for_(0, steps, 1, [E.const(0.0, acc_t)] * (m_max * n_rows), step)
        acc = [E.reduce_add(v) for v in acc]
        for off in (16, 8, 4, 2, 1):
            acc = [v + E.shfl_xor(v, off) for v in acc]
        first = E.cmp("eq", lane, E.const(0, "index"))
        for t in range(n_rows):
            s = E.load(a["scales"], n0 + t)
            for r in range(m_max):
                live = E.and_(first, E.cmp("ult", E.const(r, "index"), M))
                v = acc[r * n_rows + t] * s
                E.if_(live, lambda v=v, r=r, t=t: E.store(v, a["y"], E.const(r * N, "index") + n0 + t))

    nm = name or f"gemv_w8_sparse_x_k{K}_n{N}_m{m_max}_r{n_rows}w{warps}"
    cfg = {"kind": "gemv_w8_sparse_x", "K": K, "N": N, "m_max": m_max, "n_rows": n_rows, "warps": warps,
           "weight_bytes": N * K, "meta_bytes": 4 * N}
    return KernelSpec(nm, params, (32 * warps, 1, 1), (N // (n_rows * warps), 1, 1), body,
                      [("live", "i32", K16)], cfg, doc=gemv_w8_sparse_x.__doc__.split("\n")[0])


# --------------------------------------------------------------------------- per-token quantization


def quantize_rows(K: int, *, qmin: int, qmax: int, clip: float = 1.0, m_max: int = 16, warps: int = 8,
                  exact_warps: bool = False, name: str | None = None) -> KernelSpec:
    """codes[M, K] int8, scale[M] f32 = per-token symmetric quantization of x[M, K] f32.

    One launch for what the reference lowering does in three (the row's absmax, its scale,
    the codes), with its numerics op for op: scale = (absmax [* clip]) / qmax, 1 where that
    is 0; code = fptosi(min(max(roundeven(x / scale), qmin), qmax)). One block of `warps`
    warps per row: threads read the row in 16-byte chunks, a maximum butterfly in each warp
    and one across the warps (shared memory) give every thread the absmax, a second pass
    writes the codes. Constraints: K % 4 == 0. Parameters: x f32 [M, K], y int8 [M, K],
    scale f32 [M], M i32. Short rows get fewer warps unless `exact_warps` (a stage of a fused
    kernel of that block size: the extra threads idle; same results).
    """
    _require(K % 4 == 0, f"quantize_rows needs K % 4 == 0 (K={K})")
    _require(1 <= m_max <= ROWS_MAX, f"m_max must be in 1..{ROWS_MAX} (got {m_max})")
    K4 = K // 4
    warps = warps if exact_warps else max(1, min(warps, -(-K4 // 32)))  # no idle warps on short rows
    T = 32 * warps
    steps = -(-K4 // T)
    params = [
        Param("x", f"memref<{m_max * K4}xvector<4xf32>>", "in", f"f32 [M, {K}]", rows=("M", m_max)),
        Param("y", f"memref<{m_max * K4}xvector<4xi8>>", "out", f"int8 codes [M, {K}]", rows=("M", m_max)),
        Param("scale", f"memref<{m_max}xf32>", "out", "f32 [M] per-token scales", rows=("M", m_max)),
        _m_param(m_max),
    ]

    def op(E, name, *xs, t="f32"):
        return E.raw(name, list(xs), [t], "", None)[0]

    def body(E, a):
        tid = E.tid()
        lane = tid % 32
        M = E.idx(a["M"])
        r = E.bid("x")
        row = E.minu(r, M - E.const(1, "index")) * K4  # rows past M redo the last one, unstored

        def chunk(i):
            c = tid + i * T
            return c, (E.minu(c, E.const(K4 - 1, "index")) if (i + 1) * T > K4 else c)

        amax = E.const(0.0, "f32")
        xs = []
        for i in range(steps):  # the row stays in registers for the second pass
            c, cc = chunk(i)
            v = E.load(a["x"], row + cc)
            xs.append((c, v))
            m = amax
            for j in range(4):
                m = op(E, "arith.maximumf", m, op(E, "math.absf", E.extract(v, j)))
            amax = E.select(E.cmp("ult", c, E.const(K4, "index")), m, amax) if (i + 1) * T > K4 else m
        for off in (16, 8, 4, 2, 1):
            amax = op(E, "arith.maximumf", amax, E.shfl_xor(amax, off))
        if warps > 1:  # across the warps: lane 0 of each writes its maximum, all read them back
            E.if_(E.cmp("eq", lane, E.const(0, "index")), lambda: E.store(amax, a["wmax"], tid // 32))
            E.barrier()
            for w in range(warps):
                amax = op(E, "arith.maximumf", amax, E.load(a["wmax"], E.const(w, "index")))
        if clip != 1.0:
            amax = op(E, "arith.mulf", amax, E.const(clip, "f32"))
        q = op(E, "arith.divf", amax, E.const(float(qmax), "f32"))
        s = E.select(E.cmp("oeq", q, E.const(0.0, "f32")), E.const(1.0, "f32"), q)
        live = E.cmp("ult", r, M)
        E.if_(E.and_(live, E.cmp("eq", tid, E.const(0, "index"))), lambda: E.store(s, a["scale"], r))
        lo, hi = E.const(float(qmin), "f32"), E.const(float(qmax), "f32")
        for i, (c, v) in enumerate(xs):
            codes = []
            for j in range(4):
                d = op(E, "math.roundeven", op(E, "arith.divf", E.extract(v, j), s))
                d = op(E, "arith.minimumf", op(E, "arith.maximumf", d, lo), hi)
                codes.append(op(E, "arith.fptosi", d, t="i8"))
            ok = E.and_(live, E.cmp("ult", c, E.const(K4, "index"))) if (i + 1) * T > K4 else live
            E.if_(ok, lambda c=c, codes=codes: E.store(E.from_elements(codes), a["y"], row + c))

    nm = name or f"quantize_rows_k{K}_m{m_max}_q{qmax}{'_c' + repr(clip) if clip != 1.0 else ''}".replace(".", "p")
    cfg = {"kind": "quantize_rows", "K": K, "m_max": m_max, "qmin": qmin, "qmax": qmax, "clip": clip,
           "warps": warps}
    return KernelSpec(nm, params, (T, 1, 1), (m_max, 1, 1), body, [("wmax", "f32", warps)] if warps > 1 else [],
                      cfg, doc=quantize_rows.__doc__.split("\n")[0])


# --------------------------------------------------------------------------- online Hadamard


def hadamard_rows(n: int, m: int, k: int, *, sub_rows: int = 1, m_max: int = 16,
                  threads: int | None = None, name: str | None = None) -> KernelSpec:
    """y[M, sub_rows * n] = each n-column block of x[M, sub_rows * n] times H_n / sqrt(n).

    fuse-rotation's online Hadamard transform (compiler/hadamard.py's kernel on the CPU), with
    its numerics op for op: k constant-geometry butterfly stages over each of the m blocks of
    2^k columns (out[i] = x[2i] + x[2i+1], out[h + i] = x[2i] - x[2i+1]), then the m x m seed
    mix, out[c, b] = sum over a in order of (y[a, b] * seed[a, c]) * scale (m = 1: y * scale).
    One block per n-column block of a row: the row in shared memory, each stage read into
    registers, a barrier, written back; the seed is copied to shared memory first. Up to
    1024 threads a block: at decode a row is the whole launch, one block on one SM.
    Parameters: x f32 [M, sub_rows * n], seed f32 [m, m] (the +-1 H_m; m > 1 only),
    y f32 [M, sub_rows * n], M i32.
    """
    if threads is None:
        threads = min(1024, max(128, -(-n // 2 // 32) * 32))
    _require(n == m * (1 << k), f"n={n} is not m * 2^k = {m} * 2^{k}")
    _require((n + m * m) * 4 <= MAX_STATIC_SMEM,
             f"a {n}-column Hadamard block exceeds {MAX_STATIC_SMEM} bytes of shared memory")
    _require(1 <= m_max <= ROWS_MAX, f"m_max must be in 1..{ROWS_MAX} (got {m_max})")
    width = sub_rows * n
    half = (1 << k) // 2
    pairs = m * half  # butterflies a stage
    params = [Param("x", f"memref<{m_max * width}xf32>", "in", f"f32 [M, {width}]", rows=("M", m_max))]
    if m > 1:
        params.append(Param("seed", f"memref<{m * m}xf32>", "in", f"f32 [{m}, {m}]: H_{m}"))
    params += [
        Param("y", f"memref<{m_max * width}xf32>", "out", f"f32 [M, {width}]", rows=("M", m_max)),
        _m_param(m_max),
    ]
    scale = float(f"{1.0 / math.sqrt(n):.9e}")  # as compiler/hadamard.py writes it

    def body(E, a):
        tid = E.tid()
        M = E.idx(a["M"])
        row = E.bid("x") // sub_rows
        base = E.minu(row, M - E.const(1, "index")) * width + (E.bid("x") % sub_rows) * n  # rows >= M: unstored
        sh = a["buf"]
        per = -(-n // threads)
        for i in range(per):  # the block's columns into shared memory
            j = tid + i * threads
            if (i + 1) * threads <= n:
                E.store(E.load(a["x"], base + j), sh, j)
            else:
                E.if_(E.cmp("ult", j, E.const(n, "index")), lambda j=j: E.store(E.load(a["x"], base + j), sh, j))
        if m > 1:
            for i in range(-(-(m * m) // threads)):
                j = tid + i * threads
                E.if_(E.cmp("ult", j, E.const(m * m, "index")),
                      lambda j=j: E.store(E.load(a["seed"], j), a["hseed"], j))
        E.barrier()
        blk = 1 << k
        for _ in range(k):
            pairs_ = []
            for i in range(-(-pairs // threads)):
                p = tid + i * threads
                live = E.cmp("ult", p, E.const(pairs, "index")) if (i + 1) * threads > pairs else None
                pc = E.minu(p, E.const(pairs - 1, "index")) if live is not None else p
                g, q = pc // half, pc % half  # block g of 2^k columns, butterfly q
                src = g * blk + q * 2
                u, v = E.load(sh, src), E.load(sh, src + 1)
                pairs_.append((live, g * blk + q, u + v, u - v))
            E.barrier()
            for live, dst, s_, d_ in pairs_:
                def put(dst=dst, s_=s_, d_=d_):
                    E.store(s_, sh, dst)
                    E.store(d_, sh, dst + half)
                if live is None:
                    put()
                else:
                    E.if_(live, put)
            E.barrier()
        live_row = E.cmp("ult", row, M)
        sc = E.const(scale, "f32")
        for i in range(per):
            j = tid + i * threads
            ok = E.and_(live_row, E.cmp("ult", j, E.const(n, "index"))) if (i + 1) * threads > n else live_row
            jc = E.minu(j, E.const(n - 1, "index")) if (i + 1) * threads > n else j
            if m == 1:
                out = E.load(sh, jc) * sc
            else:
                c, b = jc // blk, jc % blk
                out = E.const(0.0, "f32")
                for a_ in range(m):
                    h = E.load(a["hseed"], E.const(a_ * m, "index") + c)
                    out = out + (E.load(sh, E.const(a_ * blk, "index") + b) * h) * sc
            E.if_(ok, lambda out=out, j=j: E.store(out, a["y"], base + j))

    nm = name or f"hadamard_rows_n{n}_s{sub_rows}_m{m_max}"
    cfg = {"kind": "hadamard_rows", "n": n, "m": m, "k": k, "sub_rows": sub_rows, "m_max": m_max,
           "threads": threads}
    smem = [("buf", "f32", n)] + ([("hseed", "f32", m * m)] if m > 1 else [])
    return KernelSpec(nm, params, (threads, 1, 1), (m_max * sub_rows, 1, 1), body, smem, cfg,
                      doc=hadamard_rows.__doc__.split("\n")[0])


# --------------------------------------------------------------------------- int4 groups x int8


def gemv_i4g(K: int, N: int, group_size: int, *, m_max: int = 16, n_rows: int | None = None,
             warps: int | None = None, scaled: str | None = None, members: tuple | list | None = None,
             interleave: bool = False, epilogue=None, experts: int = 0, name: str | None = None) -> KernelSpec:
    """y[M, N, K/G] i32 = per-group xq[M, K] int8 @ (wq - z)^T, asymmetric int4 weights, exact.

    The integer core of w4a8-g128 (QServe's W4A8 shape): dequant-after-gemm's grouped
    qcc.matmul_int, whose per-group partial sums the reference lowering's scale generic then
    scales and adds. The codes stay as quantize-weights packs them ([N, K/2] bytes, low
    nibble the even column; zero points [N, K/G] uint8). Each lane owns whole groups (G/32
    16-byte weight chunks), so a group's sum never crosses lanes: sum of x * nibble by
    `dp4a` (even and odd columns: x's bytes split with `prmt`) minus z * sum of x (`dp4a`
    with 0x01010101). Constraints: G % 32 == 0, K % G == 0, N % (n_rows * warps) == 0.
    Parameters: x int8 [M, K], wq [N, K/2] bytes, zp uint8 [N, K/G], y i32 [M, N, K/G], M i32.

    scaled="row" (or "tensor"): the scale generic in the epilogue, y f32 [M, N] = the sum over
    groups of (f32(sum_g) * s[n, g]) * sx[m] (or sx[0]), with the generated warp-reduce kernel's
    order (a lane's groups in turn, then the lanes' butterfly); parameters sx, s f32 [N, K/G]
    after zp. members=(N0, N1, ...): the layers that read one x in one launch, and (scaled)
    interleave and epilogue, as gemv_i8's. experts=E (scaled, one member): a mixture of
    experts' product, row r on expert ids[r]'s codes, zero points and scales ([E, N, ...] as
    stored; `ids` i64 after x), as gemv_i8's.
    """
    G = group_size
    _require(G % 32 == 0 and K % G == 0, f"gemv_i4g needs G % 32 == 0 dividing K (K={K}, G={G})")
    _require(1 <= m_max <= 16, f"m_max must be in 1..16 (got {m_max})")
    _require(scaled in (None, "row", "tensor"), f"scaled must be None, 'row' or 'tensor' (got {scaled!r})")
    _require(scaled or (epilogue is None and not interleave), "interleave and epilogues need scaled results")
    if experts:
        _require(experts >= 1 and scaled and not members and epilogue is None,
                 "experts= needs scaled results, one member and no epilogue")
    members, sfx, n_rows, warps = _int_members(N, members, n_rows, warps, interleave, epilogue,
                                               (2, 1) if m_max <= 8 and not experts else (1,), (4, 2, 1))
    KG, WV, XV = K // G, G // 32, G // 16  # groups a row; 16-byte weight / x vectors a group
    steps = -(-KG // 32)
    params = [Param("x", f"memref<{m_max * K // 16}xvector<4xi32>>", "in", f"int8 [M, {K}] row-major",
                    rows=("M", m_max))]
    params += [Param(f"wq{i}", f"memref<{n * K // 32}xvector<4xi32>>", "in", f"int4 [{n}, {K}] packed two a byte")
               for i, n in zip(sfx, members)]
    params += [Param(f"zp{i}", f"memref<{n * KG}xi8>", "in", f"uint8 zero points [{n}, {KG}]")
               for i, n in zip(sfx, members)]
    if scaled:
        params.append(Param("sx", f"memref<{m_max if scaled == 'row' else 1}xf32>", "in",
                            "f32 per-token scales [M]" if scaled == "row" else "f32 per-tensor scale [1]",
                            rows=("M", m_max) if scaled == "row" else None))
        params += [Param(f"s{i}", f"memref<{n * KG}xf32>", "in", f"f32 group scales [{n}, {KG}]")
                   for i, n in zip(sfx, members)]
        params += [Param(f"y{i}", f"memref<{m_max * n}xf32>", "out", f"f32 [M, {n}]", rows=("M", m_max))
                   for i, n in zip(sfx, members)]
    else:
        params += [Param(f"y{i}", f"memref<{m_max * n * KG}xi32>", "out", f"i32 [M, {n}, {KG}]", rows=("M", m_max))
                   for i, n in zip(sfx, members)]
    params.append(_m_param(m_max))
    params += list(epilogue[0]) if epilogue is not None else []
    if experts:  # ids after x; wq, zp and s hold every expert's
        sizes = {"wq": (f"{experts * N * K // 32}xvector<4xi32>", f"int4 [{experts}, {N}, {K}] packed two a byte"),
                 "zp": (f"{experts * N * KG}xi8", f"uint8 zero points [{experts}, {N}, {KG}]"),
                 "s": (f"{experts * N * KG}xf32", f"f32 group scales [{experts}, {N}, {KG}]")}
        params = [params[0], Param("ids", f"memref<{m_max}xi64>", "in", "i64 [M] each row's expert",
                                   rows=("M", m_max))] + [
            Param(p.name, f"memref<{sizes[p.name][0]}>", "in", sizes[p.name][1]) if p.name in sizes else p
            for p in params[1:]]

    def member(E, a, mi, N, blk):
        lane, n0, M, last = _warp_rows(E, a, blk, warps, 1 if interleave else n_rows)
        rows = _warp_members(sfx, mi, n_rows, interleave)
        own = 1 if interleave else n_rows  # rows of each member a warp
        if experts:  # the weights depend on the rows' experts: nothing to fetch before the wait
            E.grid_dependency_wait()
        else:
            slices = [(a["wq" + i], blk * (warps * own * (K // 32))) for i in (sfx if interleave else [mi])]
            _prefetch_then_wait(E, *slices[0], warps * own * K // 2, 32 * warps, m_max, sum(members) * K // 2,
                                more=slices[1:])
        # each row's first weight row: its expert's (experts=), else the warp's for every row
        wrow = [_expert_of(E, a["ids"], E.minu(E.const(r, "index"), last), experts) * N + n0
                for r in range(m_max)] if experts else [n0] * m_max
        nib, ones = E.const(0x0F0F0F0F, "i32"), E.const(0x01010101, "i32")
        zero = E.const(0.0, "f32")
        tot = [[zero] * n_rows for _ in range(m_max)]  # scaled: this lane's sum over its groups
        for i in range(steps):
            g = lane + i * 32
            live_g = E.cmp("ult", g, E.const(KG, "index")) if (i + 1) * 32 > KG else None
            gc = E.minu(g, E.const(KG - 1, "index")) if live_g is not None else g

            def weights(first, gc=gc):
                """(nibble words, zero point, scale) of group gc of the warp's weight rows from `first`."""
                ws, zs = [], []
                for i, t in rows:
                    words = []
                    for v in range(WV):
                        w = E.load(a["wq" + i], (first + t) * (K // 32) + gc * WV + v)
                        for j in range(4):  # word j of chunk v: columns 8j..8j+7 -> even, odd nibbles
                            wj = E.extract(w, j)
                            words += [wj & nib, (wj >> 4) & nib]
                    ws.append(words)
                    zs.append(E.cast("extui", E.load(a["zp" + i], (first + t) * KG + gc), "i32"))
                sg = [E.load(a["s" + i], (first + t) * KG + gc) for i, t in rows] if scaled else None
                return ws, zs, sg

            if not experts:
                ws, zs, sg = weights(n0)
            for r in range(m_max):
                if experts:
                    ws, zs, sg = weights(wrow[r])
                xr = E.minu(E.const(r, "index"), last) * (K // 16) + gc * XV
                xw = [E.extract(E.load(a["x"], xr + u), j) for u in range(XV) for j in range(4)]
                xs = [v for q in range(len(xw) // 2) for v in _even_odd_bytes(E, xw[2 * q], xw[2 * q + 1])]
                s1 = E.const(0, "i32")
                for w in xw:
                    s1 = E.dp4a(w, ones, s1)
                ok = E.cmp("ult", E.const(r, "index"), M)
                if live_g is not None:
                    ok = E.and_(ok, live_g)
                if scaled:
                    sx = E.load(a["sx"], E.const(0, "index") if scaled == "tensor" else E.minu(E.const(r, "index"), last))
                for t in range(n_rows):
                    acc = E.const(0, "i32")
                    for xv, wv in zip(xs, ws[t]):
                        acc = E.dp4a(xv, wv, acc)
                    acc = acc - zs[t] * s1
                    if scaled:
                        v = tot[r][t] + (E.cast("sitofp", acc, "f32") * sg[t]) * sx
                        tot[r][t] = E.select(live_g, v, tot[r][t]) if live_g is not None else v
                        continue
                    dst = (E.const(r * N, "index") + n0 + t) * KG + g
                    E.if_(ok, lambda acc=acc, dst=dst: E.store(acc, a["y" + mi], dst))
        if scaled:
            first = E.cmp("eq", lane, E.const(0, "index"))
            for r in range(m_max):
                live = E.and_(first, E.cmp("ult", E.const(r, "index"), M))
                vals = []
                for t in range(n_rows):
                    v = tot[r][t]
                    for off in (16, 8, 4, 2, 1):
                        v = v + E.shfl_xor(v, off)
                    vals.append(zero + v)  # the generic adds the folded fill's 0 last
                _store_rows(E, a, live, r, N, n0, rows, vals, epilogue, interleave)

    nm = name or (f"gemv_i4g{G}_k{K}_n{'_'.join(map(str, members))}_m{m_max}_r{n_rows}w{warps}"
                  f"{'_s' + scaled[0] if scaled else ''}{'_il' if interleave else ''}{f'_e{experts}' if experts else ''}")
    cfg = {"kind": "gemv_i4g", "K": K, "N": N, "group_size": G, "m_max": m_max, "n_rows": n_rows,
           "warps": warps, "scaled": scaled, "members": list(members), "interleave": interleave,
           "experts": experts, "weight_bytes": max(experts, 1) * N * K // 2,
           "meta_bytes": max(experts, 1) * N * KG * (5 if scaled else 1)}
    return KernelSpec(nm, params, (32 * warps, 1, 1), (N // (n_rows * warps), 1, 1),
                      _int_body(members, sfx, n_rows, warps, interleave, member), [], cfg,
                      doc=gemv_i4g.__doc__.split("\n")[0])
