"""MLIR kernels of the integer path (dequant-after-gemm) on the block layout of int_pack.py.

One fused call replaces qcc.quantize_dynamic -> qcc.matmul_int -> qcc.scale_accumulate:

* quantize (vectorized; from QUANTIZE_PAR_MIN_M rows on all threads): per row, amax -> scale
  (as the activation format: IEEE division, round half to even), codes packed
  into i32 words (i8 quads against unsigned weight codes, i16 pairs against
  avx2 int8), and for unsigned weight codes the per-group sums of the codes
  (the zero-point correction).
* tiles of MR rows x NR column blocks (8 columns each) accumulate integer dot
  products in registers: per quad, one weight vector per block against broadcast
  activation words.  Two forms (the layout's `dot`):
    avx2, which has no i8 x i8 product:
      int8 x int8: both sign-extended to i16 (weights in registers, activations
                   stored as i16 pairs by the quantizer), vpmaddwd -> i32;
      int4 x int8: vpmaddubsw(nibble u8, x s8) (<= 2 * 15 * 127), eight of them
                   summed in i16 (< 2^15) before one vpmaddwd with ones -> i32.
    vnni: vpdpbusd(acc, u8 codes, x s8) adds four products a lane into i32,
      for int8 (code + 128) and int4 (nibble) alike.
  A group's i32 sums, minus z * (group sum of x) for unsigned codes, are scaled
  into f32 accumulators exactly as the reference lowering orders it:
  (acc * sw) * sx summed over groups, or (acc * sx) * sw for one group.
  No [M, N, groups] accumulator, no float weight.
* `gemv` (small M, memory-bound): one row at a time against NR = 4 blocks;
  `gemm`: MR x NR register tiles.  Both run over chunks of column blocks in
  parallel (scf.parallel -> OpenMP), dispatched on M at run time.

The integer instructions are calls of LLVM's x86 intrinsics by name (the AVX2
ones also valid on AVX-512 hosts); the pass selects these kernels only on hosts
with AVX2, the vnni form only on hosts with VNNI.  Bounds (per 32 multiply-adds,
per core): avx2 int8 2 vpmaddwd + 2 vpaddd + 0.5 vpmovsxbw; avx2 int4 1
vpmaddubsw + 1 vpaddw + the nibble unpack shared by MR rows; vnni int8 1
vpdpbusd; vnni int4 1 vpdpbusd + the unpack.
"""

import dataclasses

from qcc.backends.cpu import expert_rows
from qcc.backends.cpu.int_pack import COLS, QUAD, UNIT, IntLayout
from qcc.backends.cpu.mlir_text import MlirText

_V8I32 = "vector<8xi32>"
_V32I8 = "vector<32xi8>"
_V16I16 = "vector<16xi16>"
_V8F32 = "vector<8xf32>"


@dataclasses.dataclass(frozen=True)
class IntKernelConfig:
    """Tuning knobs of one linear's integer kernels (recorded in the manifest)."""

    gemm_min_m: int = 4       # M >= this runs the blocked GEMM
    gemv_nr: int = 4          # column blocks per GEMV tile (one row)
    gemm_mr: int = 4          # rows x column blocks of a GEMM register tile, int8 weights
    gemm_nr: int = 2
    int8_quads: int = 1       # int8: quads per loop iteration (divides 8)
    gemm_mr_int4: int = 3     # int4 (its i16 partial sums need registers too)
    gemm_nr_int4: int = 2
    gemm_mr_vnni: int = 6     # the vnni form (no i16 sums, no widening; AVX-512 has 32 registers): int8
    gemm_nr_vnni: int = 4
    int8_quads_vnni: int = 2
    # int4 on vnni: its unpacked nibbles take 2 registers a block and 2 vector ops per MR * 2
    # vpdpbusd, so tall tiles (12 x 2: 1 op per 12) beat square ones (4 x 4: 1 per 4) by 1-5% at
    # M >= 16 on Zen 4 (broadcasts of x are load-port work); int8 keeps 6 x 4, 4% ahead of 12 x 2
    gemm_mr_int4_vnni: int = 12
    gemm_nr_int4_vnni: int = 2
    chunk_blocks: int = 8     # column blocks per parallel task
    threads: bool = True

    def variant(self, m: int) -> str:
        return "gemv" if m < self.gemm_min_m else "gemm"

    def gemm_tile(self, lay: IntLayout) -> tuple[int, int]:
        """(MR rows, NR column blocks) of the layout's GEMM register tile."""
        vnni = lay.dot == "vnni"
        if lay.fmt.bits == 4:
            return (self.gemm_mr_int4_vnni, self.gemm_nr_int4_vnni) if vnni else (self.gemm_mr_int4, self.gemm_nr_int4)
        return (self.gemm_mr_vnni, self.gemm_nr_vnni) if vnni else (self.gemm_mr, self.gemm_nr)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def _memref_types(lay: IntLayout, experts: int = 1) -> dict:
    """role -> memref type of the packed arrays (`experts` layouts stacked along the blocks)."""
    elem = {"codes": "i8", "scale": "f32", "zero": "i8"}
    return {role: f"memref<{'x'.join(map(str, (experts * shape[0], *shape[1:])))}x{elem[role]}>"
            for role, (shape, _) in lay.shapes().items()}


def _kernel_params(lay: IntLayout, experts: int = 1) -> list[tuple[str, str]]:
    """(name, type) of the inner kernels' arguments."""
    ty = _memref_types(lay, experts)
    params = [("xq", f"memref<?x{lay.x_words}xi32>"), ("sx", "memref<?xf32>")]
    if lay.unsigned_codes:
        params.append(("xs", f"memref<?x{lay.groups}xi32>"))
    params += [(role, ty[role]) for role in ty]
    return params + [("y", f"memref<?x{lay.n}xf32>")]


# The x86 instructions, as calls of LLVM intrinsics by name (llvm.call_intrinsic has
# unknown memory effects, which buffer deallocation rejects; a call of a declared
# function of that name becomes the same intrinsic call in LLVM IR): name ->
# (argument types, result type).  vpdpbusd's bytes are i8 vectors as LLVM 21+ declares
# them (older parsers upgrade the i32-vector form, not this one; llvmlite's is 22).
INTRINSICS = {"avx2.pmadd.ub.sw": ((_V32I8, _V32I8), _V16I16),
              "avx2.pmadd.wd": ((_V16I16, _V16I16), _V8I32),
              "avx512.vpdpbusd.256": ((_V8I32, _V32I8, _V32I8), _V8I32)}


def declarations(lay: IntLayout) -> dict[str, str]:
    """symbol -> declaration text of the intrinsics the layout's kernels call (once per module)."""
    used = ["avx512.vpdpbusd.256"] if lay.dot == "vnni" else ["avx2.pmadd.ub.sw", "avx2.pmadd.wd"]
    return {f"llvm.x86.{n}": f"func.func private @llvm.x86.{n}({', '.join(INTRINSICS[n][0])}) -> {INTRINSICS[n][1]}\n"
            for n in used}


def _intrinsic(t: MlirText, name: str, *args: str) -> str:
    arg_types, result = INTRINSICS[name]
    return t.v(f"func.call @llvm.x86.{name}({', '.join(args)}) : ({', '.join(arg_types)}) -> {result}")


def _tile(t: MlirText, lay: IntLayout, cfg: "IntKernelConfig", rows: list[str], b0: str, nr: int,
          weight_b0: str | None = None, experts: int = 1) -> None:
    """y[rows, 8 b0 : 8 (b0 + nr)] (columns past N are not written); with weight_b0 the weights'
    blocks are weight_b0 + those (an expert's, of `experts` layouts stacked along the blocks)."""
    ty = _memref_types(lay, experts)
    int4 = lay.fmt.bits == 4
    vnni = lay.dot == "vnni"
    c0, c1 = t.idx(0), t.idx(1)
    zi = t.v(f"arith.constant dense<0> : {_V8I32}")
    zf = t.v(f"arith.constant dense<0.0> : {_V8F32}")
    ones = t.v(f"arith.constant dense<1> : {_V16I16}")
    mr = len(rows)
    blocks = [t.v(f"arith.addi {b0}, {t.idx(c)} : index") for c in range(nr)]
    wblocks = blocks if weight_b0 is None else [t.v(f"arith.addi {weight_b0}, {b} : index") for b in blocks]
    tiles = [(r, c) for r in range(mr) for c in range(nr)]
    # quads per loop iteration: a unit of 8 for int4 (its i16 sums), fewer for int8, whose
    # fully unrolled unit makes LLVM spill accumulators
    step_quads = UNIT // QUAD if int4 else cfg.int8_quads_vnni if vnni else cfg.int8_quads
    units_per_group = lay.group // (QUAD * step_quads)

    def xword(r: int, q: str, ty: str) -> str:
        w = t.v(f"memref.load %xq[{rows[r]}, {q}] : memref<?x{lay.x_words}xi32>")
        return t.v(f"vector.bitcast {t.v(f'vector.broadcast {w} : i32 to {_V8I32}')} : {_V8I32} to {ty}")

    def group_sums(g: str) -> list[str]:
        """i32 dot products of group g, one vector per (row, block)."""
        iters = ", ".join(f"%a{r}_{c} = {zi}" for r, c in tiles)
        res = t.vs(len(tiles), f"scf.for %u = {c0} to {t.idx(units_per_group)} step {c1} iter_args({iters}) -> "
                               f"({', '.join([_V8I32] * len(tiles))}) {{")
        t.indent += 2
        unit = t.v(f"affine.apply affine_map<(d0, d1) -> (d0 * {units_per_group} + d1)>({g}, %u)")
        acc = {rc: f"%a{rc[0]}_{rc[1]}" for rc in tiles}
        if int4:
            part = {}
            mask = t.v(f"arith.constant dense<15> : {_V32I8}")
            four = t.v(f"arith.constant dense<4> : {_V32I8}")
            for tt in range(UNIT // QUAD // 2):
                pair = t.v(f"affine.apply affine_map<(d0) -> (d0 * {UNIT // QUAD // 2} + {tt})>({unit})")
                quad = t.v(f"affine.apply affine_map<(d0) -> (d0 * {UNIT // QUAD} + {2 * tt})>({unit})")
                quad1 = t.v(f"arith.addi {quad}, {c1} : index")
                lo, hi = [], []
                for c in range(nr):
                    w = t.v(f"vector.load %codes[{wblocks[c]}, {pair}, {c0}] : {ty['codes']}, {_V32I8}")
                    lo.append(t.v(f"arith.andi {w}, {mask} : {_V32I8}"))
                    hi.append(t.v(f"arith.shrui {w}, {four} : {_V32I8}"))
                for r in range(mr):
                    xl, xh = xword(r, quad, _V32I8), xword(r, quad1, _V32I8)
                    for c in range(nr):
                        if vnni:
                            acc[r, c] = _intrinsic(t, "avx512.vpdpbusd.256", acc[r, c], lo[c], xl)
                            acc[r, c] = _intrinsic(t, "avx512.vpdpbusd.256", acc[r, c], hi[c], xh)
                            continue
                        pl = _intrinsic(t, "avx2.pmadd.ub.sw", lo[c], xl)
                        ph = _intrinsic(t, "avx2.pmadd.ub.sw", hi[c], xh)
                        s = t.v(f"arith.addi {pl}, {ph} : {_V16I16}")
                        part[r, c] = s if tt == 0 else t.v(f"arith.addi {part[r, c]}, {s} : {_V16I16}")
            for rc in part:  # avx2: the unit's i16 sums (< 2^15) widened once
                d = _intrinsic(t, "avx2.pmadd.wd", part[rc], ones)
                acc[rc] = t.v(f"arith.addi {acc[rc]}, {d} : {_V8I32}")
        elif vnni:
            for qi in range(step_quads):
                quad = t.v(f"affine.apply affine_map<(d0) -> (d0 * {step_quads} + {qi})>({unit})")
                w = [t.v(f"vector.load %codes[{wblocks[c]}, {quad}, {c0}] : {ty['codes']}, {_V32I8}")
                     for c in range(nr)]
                for r in range(mr):
                    x = xword(r, quad, _V32I8)
                    for c in range(nr):
                        acc[r, c] = _intrinsic(t, "avx512.vpdpbusd.256", acc[r, c], w[c], x)
        else:
            for qi in range(step_quads):
                quad = t.v(f"affine.apply affine_map<(d0) -> (d0 * {step_quads} + {qi})>({unit})")
                pair = t.v(f"affine.apply affine_map<(d0) -> (d0 * 2)>({quad})")
                pair1 = t.v(f"arith.addi {pair}, {c1} : index")
                halves = []
                for c in range(nr):
                    w = t.v(f"vector.load %codes[{wblocks[c]}, {quad}, {c0}] : {ty['codes']}, {_V32I8}")
                    halves.append([t.v(f"arith.extsi {t.v(f'vector.extract_strided_slice {w} {{offsets = [{16 * h}], sizes = [16], strides = [1]}} : {_V32I8} to vector<16xi8>')} : vector<16xi8> to {_V16I16}")
                                   for h in range(2)])
                for r in range(mr):
                    x0, x1 = xword(r, pair, _V16I16), xword(r, pair1, _V16I16)
                    for c in range(nr):
                        d0 = _intrinsic(t, "avx2.pmadd.wd", halves[c][0], x0)
                        d1 = _intrinsic(t, "avx2.pmadd.wd", halves[c][1], x1)
                        acc[r, c] = t.v(f"arith.addi {acc[r, c]}, {t.v(f'arith.addi {d0}, {d1} : {_V8I32}')} : {_V8I32}")
        t.op(f"scf.yield {', '.join(acc[rc] for rc in tiles)} : {', '.join([_V8I32] * len(tiles))}")
        t.close()
        sums = dict(zip(tiles, res))
        if lay.unsigned_codes:  # sum_k (u - z) x = sum_k u x - z sum_k x, exact in i32
            for c in range(nr):
                z8 = t.v(f"vector.load %zero[{wblocks[c]}, {g}, {c0}] : {ty['zero']}, vector<8xi8>")
                z = t.v(f"arith.extui {z8} : vector<8xi8> to {_V8I32}")
                for r in range(mr):
                    xsum = t.v(f"memref.load %xs[{rows[r]}, {g}] : memref<?x{lay.groups}xi32>")
                    corr = t.v(f"arith.muli {z}, {t.v(f'vector.broadcast {xsum} : i32 to {_V8I32}')} : {_V8I32}")
                    sums[r, c] = t.v(f"arith.subi {sums[r, c]}, {corr} : {_V8I32}")
        return [sums[rc] for rc in tiles]

    sxs = [t.v(f"vector.broadcast {t.v(f'memref.load %sx[{rows[r]}] : memref<?xf32>')} : f32 to {_V8F32}")
           for r in range(mr)]

    def scales(g: str) -> list[str]:
        return [t.v(f"vector.load %scale[{wblocks[c]}, {g}, {c0}] : {ty['scale']}, {_V8F32}") for c in range(nr)]

    if lay.grouped:
        iters = ", ".join(f"%f{r}_{c} = {zf}" for r, c in tiles)
        out = t.vs(len(tiles), f"scf.for %g = {c0} to {t.idx(lay.groups)} step {c1} iter_args({iters}) -> "
                               f"({', '.join([_V8F32] * len(tiles))}) {{")
        t.indent += 2
        sums = group_sums("%g")
        sw = scales("%g")
        new = []
        for (r, c), s in zip(tiles, sums):
            a = t.v(f"arith.sitofp {s} : {_V8I32} to {_V8F32}")
            u = t.v(f"arith.mulf {t.v(f'arith.mulf {a}, {sw[c]} : {_V8F32}')}, {sxs[r]} : {_V8F32}")
            new.append(t.v(f"arith.addf %f{r}_{c}, {u} : {_V8F32}"))
        t.op(f"scf.yield {', '.join(new)} : {', '.join([_V8F32] * len(tiles))}")
        t.close()
    else:
        sums = group_sums(c0)
        sw = scales(c0)
        out = []
        for (r, c), s in zip(tiles, sums):
            a = t.v(f"arith.sitofp {s} : {_V8I32} to {_V8F32}")
            out.append(t.v(f"arith.mulf {t.v(f'arith.mulf {a}, {sxs[r]} : {_V8F32}')}, {sw[c]} : {_V8F32}"))
    ymem = f"memref<?x{lay.n}xf32>"
    for (r, c), val in zip(tiles, out):
        col = t.v(f"arith.muli {blocks[c]}, {t.idx(COLS)} : index")
        t.op(f"vector.transfer_write {val}, %y[{rows[r]}, {col}] : {_V8F32}, {ymem}")


def _parallel(name: str, lay: IntLayout, cfg: IntKernelConfig, body: str) -> str:
    """@name runs @name_body(chunk, args...) for every chunk of cfg.chunk_blocks column blocks
    (scf.parallel: OpenMP threads; the body is a function because convert-scf-to-openmp wraps
    it in a memref.alloca_scope, which must stay a single block)."""
    params = _kernel_params(lay)
    plist = ", ".join(f"%{n}: {ty}" for n, ty in params)
    args = ", ".join(f"%{n}" for n, _ in params)
    tys = ", ".join(ty for _, ty in params)
    chunks = -(-lay.blocks // cfg.chunk_blocks)
    loop = "scf.parallel (%i) = (%c0) to (%cn) step (%c1)" if cfg.threads else "scf.for %i = %c0 to %cn step %c1"
    return (f"func.func private @{name}({plist}) {{\n"
            f"  %c0 = arith.constant 0 : index\n  %c1 = arith.constant 1 : index\n"
            f"  %cn = arith.constant {chunks} : index\n"
            f"  {loop} {{\n"
            f"    func.call @{name}_body(%i, {args}) {{no_inline}} : (index, {tys}) -> ()\n  }}\n  return\n}}\n"
            f"func.func private @{name}_body(%i: index, {plist}) {{\n{body}\n  return\n}}\n")


def _tiled(name: str, lay: IntLayout, cfg: IntKernelConfig, mrs: tuple, nr: int, rows_outer: bool) -> str:
    """This chunk's column blocks, NR at a time, for rows in tiles of mrs[0], the rest in
    tiles of the following sizes (each < the previous, at most one tile of each).

    rows_outer (GEMM): a tile's rows of x stay in L1 while the chunk's weights stream
    from L2.  Otherwise (GEMV) the rows run inside each group of NR blocks, whose
    weights stay in L2 for the next row even when the chunk's would not."""
    t = MlirText(indent=2)
    c0 = t.idx(0)
    M = t.v(f"memref.dim %xq, {c0} : memref<?x{lay.x_words}xi32>")
    b_start = t.v(f"arith.muli %i, {t.idx(cfg.chunk_blocks)} : index")
    b_end = t.v(f"arith.minui {t.v(f'arith.addi {b_start}, {t.idx(cfg.chunk_blocks)} : index')}, "
                f"{t.idx(lay.blocks)} : index")
    blocks_loop = f"scf.for %b = {b_start} to {b_end} step {t.idx(nr)} {{"
    if not rows_outer:
        t.open(blocks_loop)
    start = c0
    for mr in mrs:
        left = t.v(f"arith.subi {M}, {start} : index")
        end = t.v(f"arith.subi {M}, {t.v(f'arith.remui {left}, {t.idx(mr)} : index')} : index")
        t.open(f"scf.for %m{mr} = {start} to {end} step {t.idx(mr)} {{")
        if rows_outer:
            t.open(blocks_loop)
        _tile(t, lay, cfg, [t.v(f"arith.addi %m{mr}, {t.idx(r)} : index") for r in range(mr)], "%b", nr)
        if rows_outer:
            t.close()
        t.close()
        start = end
    if not rows_outer:
        t.close()
    return _parallel(name, lay, cfg, t.text())


def gemv(name: str, lay: IntLayout, cfg: IntKernelConfig) -> str:
    return _tiled(name, lay, cfg, (1,), cfg.gemv_nr, rows_outer=False)


def gemm(name: str, lay: IntLayout, cfg: IntKernelConfig) -> str:
    mr, nr = cfg.gemm_tile(lay)
    # the rows left after the MR tiles: at most one tile of each smaller size
    mrs = tuple(sorted({mr, 4, 2, 1} - set(range(mr + 1, 5)), reverse=True))
    return _tiled(name, lay, cfg, mrs, nr, rows_outer=True)


def _quantize(t: MlirText, lay: IntLayout, act_levels: tuple[int, int], M: str, x: str,
              static_scale: str | None = None, clip: float = 1.0, start: str | None = None) -> None:
    """%xq (codes, lay.x_per_word to a word), %sx (per-row scales) and, for unsigned weight codes,
    %xs (group sums of the codes) of rows [start (0), M) of x, step by step as the activation
    format's reference; with `static_scale` (an f32 value: a per-tensor format's calibrated scale)
    every row takes that scale instead of its own; `clip` < 1 scales each row's absmax first (the
    format's clip ratio)."""
    K, G = lay.k, lay.group
    qmin, qmax = act_levels
    xty = f"memref<?x{K}xf32>"
    c0, c1, c8 = t.idx(0), t.idx(1), t.idx(8)
    pad = t.v("arith.constant 0.0 : f32")
    zf = t.v(f"arith.constant dense<0.0> : {_V8F32}")
    zi = t.v(f"arith.constant dense<0> : {_V8I32}")
    lo = t.v(f"arith.constant dense<{float(qmin)!r}> : {_V8F32}")
    hi = t.v(f"arith.constant dense<{float(qmax)!r}> : {_V8F32}")
    t.open(f"scf.for %qm = {start or c0} to {M} step {c1} {{")
    if static_scale is None:
        amax = t.v(f"scf.for %k = {c0} to {t.idx(lay.k_pad)} step {c8} iter_args(%a = {zf}) -> ({_V8F32}) {{")
        t.indent += 2
        v = t.v(f"vector.transfer_read {x}[%qm, %k], {pad} : {xty}, {_V8F32}")
        a = t.v(f"math.absf {v} : {_V8F32}")
        t.op(f"scf.yield {t.v(f'arith.maximumf %a, {a} : {_V8F32}')} : {_V8F32}")
        t.close()
        h = t.v(f"vector.reduction <maximumf>, {amax} : {_V8F32} into f32")
        if clip != 1.0:
            h = t.v(f"arith.mulf {h}, {t.v(f'arith.constant {float(clip)!r} : f32')} : f32")
        s = t.v(f"arith.divf {h}, {t.v(f'arith.constant {float(qmax)!r} : f32')} : f32")
        is0 = t.v(f"arith.cmpf oeq, {s}, {t.v('arith.constant 0.0 : f32')} : f32")
        s = t.v(f"arith.select {is0}, {t.v('arith.constant 1.0 : f32')}, {s} : f32")
    else:
        s = static_scale
    t.op(f"memref.store {s}, %sx[%qm] : memref<?xf32>")
    sb = t.v(f"vector.broadcast {s} : f32 to {_V8F32}")
    t.open(f"scf.for %g = {c0} to {t.idx(lay.groups)} step {c1} {{")
    k0 = t.v(f"arith.muli %g, {t.idx(G)} : index")
    k1 = t.v(f"arith.addi {k0}, {t.idx(G)} : index")
    total = t.v(f"scf.for %k = {k0} to {k1} step {c8} iter_args(%s = {zi}) -> ({_V8I32}) {{")
    t.indent += 2
    v = t.v(f"vector.transfer_read {x}[%qm, %k], {pad} : {xty}, {_V8F32}")
    r = t.v(f"math.roundeven {t.v(f'arith.divf {v}, {sb} : {_V8F32}')} : {_V8F32}")
    r = t.v(f"arith.minimumf {t.v(f'arith.maximumf {r}, {lo} : {_V8F32}')}, {hi} : {_V8F32}")
    q = t.v(f"arith.fptosi {r} : {_V8F32} to {_V8I32}")
    per = lay.x_per_word
    code_ty = f"vector<8xi{32 // per}>"
    words = t.v(f"vector.bitcast {t.v(f'arith.trunci {q} : {_V8I32} to {code_ty}')} : {code_ty} to vector<{8 // per}xi32>")
    t.op(f"vector.store {words}, %xq[%qm, {t.v(f'arith.divui %k, {t.idx(per)} : index')}] : "
         f"memref<?x{lay.x_words}xi32>, vector<{8 // per}xi32>")
    t.op(f"scf.yield {t.v(f'arith.addi %s, {q} : {_V8I32}')} : {_V8I32}")
    t.close()
    if lay.unsigned_codes:
        t.op(f"memref.store {t.v(f'vector.reduction <add>, {total} : {_V8I32} into i32')}, %xs[%qm, %g] : "
             f"memref<?x{lay.groups}xi32>")
    t.close()
    t.close()


QUANTIZE_PAR_MIN_M = 16  # from this many rows the quantizer runs on all threads (prefill), in
QUANTIZE_ROWS = 8        # chunks of this many rows; below it one thread (a fork costs more)


def _quantize_params(lay: IntLayout, static_scale: bool) -> list[tuple[str, str]]:
    params = [("x", f"memref<?x{lay.k}xf32>"), ("xq", f"memref<?x{lay.x_words}xi32>"), ("sx", "memref<?xf32>")]
    if lay.unsigned_codes:
        params.append(("xs", f"memref<?x{lay.groups}xi32>"))
    return params + ([("scale", "f32")] if static_scale else [])


def _quantize_function(name: str, lay: IntLayout, act_levels: tuple[int, int], static_scale: bool,
                       clip: float) -> str:
    """@name(%r0, %r1, x, xq, sx[, xs][, scale]): _quantize of rows [r0, r1)."""
    t = MlirText()
    _quantize(t, lay, act_levels, "%r1", "%x", "%scale" if static_scale else None, clip, start="%r0")
    plist = ", ".join(f"%{n}: {ty}" for n, ty in _quantize_params(lay, static_scale))
    return f"func.func private @{name}(%r0: index, %r1: index, {plist}) {{\n{t.text()}\n  return\n}}\n"


def _call_quantize(t: MlirText, name: str, lay: IntLayout, cfg: "IntKernelConfig", M: str, x: str,
                   scale: str | None, static_m: int | None) -> None:
    """Quantizes x's M rows: one call on this thread for few rows, else chunks of QUANTIZE_ROWS rows
    in an scf.parallel (OpenMP); decided at run time unless M is static."""
    params = _quantize_params(lay, scale is not None)
    args = ", ".join({"x": x, "scale": scale}.get(n) or f"%{n}" for n, _ in params)
    tys = ", ".join(["index", "index"] + [ty for _, ty in params])
    c0, c1 = t.idx(0), t.idx(1)
    if not cfg.threads or (static_m is not None and static_m < QUANTIZE_PAR_MIN_M):
        t.op(f"func.call @{name}({c0}, {M}, {args}) : ({tys}) -> ()")
        return
    if static_m is None:
        few = t.v(f"arith.cmpi ult, {M}, {t.idx(QUANTIZE_PAR_MIN_M)} : index")
        t.open(f"scf.if {few} {{")
        t.op(f"func.call @{name}({c0}, {M}, {args}) : ({tys}) -> ()")
        t.close("} else {")
        t.indent += 2
    rows = t.idx(QUANTIZE_ROWS)
    chunks = t.v(f"arith.ceildivui {M}, {rows} : index")
    t.open(f"scf.parallel (%qc) = ({c0}) to ({chunks}) step ({c1}) {{")
    r0 = t.v(f"arith.muli %qc, {rows} : index")
    r1 = t.v(f"arith.minui {t.v(f'arith.addi {r0}, {rows} : index')}, {M} : index")
    # not inlined: convert-scf-to-openmp wraps the body in an alloca_scope, which must stay one block
    t.op(f"func.call @{name}({r0}, {r1}, {args}) {{no_inline}} : ({tys}) -> ()")
    t.close()
    if static_m is None:
        t.close()


def _quantized_rows(t: MlirText, name: str, lay: IntLayout, cfg: "IntKernelConfig", M: str, x: str,
                    static_scale: bool, static_m: int | None) -> None:
    """%xq, %sx (and %xs) of x's M rows by @name__quantize; with `static_scale` the scale is the
    entry's %act_scalet."""
    t.op(f"%xq = memref.alloc({M}) {{alignment = 64 : i64}} : memref<?x{lay.x_words}xi32>")
    t.op(f"%sx = memref.alloc({M}) : memref<?xf32>")
    if lay.unsigned_codes:
        t.op(f"%xs = memref.alloc({M}) : memref<?x{lay.groups}xi32>")
    scale = None
    if static_scale:
        sxs = t.v("bufferization.to_buffer %act_scalet read_only : tensor<1xf32> to memref<1xf32>")
        scale = t.v(f"memref.load {sxs}[{t.idx(0)}] : memref<1xf32>")
    _call_quantize(t, f"{name}__quantize", lay, cfg, M, x, scale, static_m)


def _entry_prologue(t: MlirText, lay: IntLayout) -> tuple[str, str]:
    """A tensor-level entry's start: %xt and the packed arrays (%<role>t) as memrefs (%<role>);
    returns (x's memref value, its row count M)."""
    ty = _memref_types(lay)
    x = t.v(f"bufferization.to_buffer %xt read_only : tensor<?x{lay.k}xf32> to memref<?x{lay.k}xf32>")
    for role in ty:
        t.op(f"%{role} = bufferization.to_buffer %{role}t read_only : {_tensor_type(ty[role])} to {ty[role]}")
    return x, t.v(f"memref.dim {x}, {t.idx(0)} : memref<?x{lay.k}xf32>")


def _entry_function(name: str, t: MlirText, lay: IntLayout, extra_args: str = "") -> str:
    """The entry `@name(%xt, %<role>t...[, extra_args]) -> y [?, N]` around body `t`, which ends with %y."""
    targs = "".join(f", %{role}t: {_tensor_type(m)}" for role, m in _memref_types(lay).items()) + extra_args
    yt = f"tensor<?x{lay.n}xf32>"
    out = t.v(f"bufferization.to_tensor %y restrict writable : memref<?x{lay.n}xf32> to {yt}")
    return (f"func.func private @{name}(%xt: tensor<?x{lay.k}xf32>{targs}) -> {yt} {{\n"
            f"{t.text()}\n  return {out} : {yt}\n}}\n")


def _tensor_type(memref_type: str) -> str:
    return memref_type.replace("memref", "tensor")


def fused(name: str, lay: IntLayout, cfg: IntKernelConfig, act_levels: tuple[int, int],
          static_m: int | None = None, static_scale: bool = False, act_clip: float = 1.0) -> str:
    """Tensor-level entry: x [?, K] f32 and the packed weight -> y [?, N] f32, with its kernels:
    both and a run-time dispatch on M, or only the one for `static_m`.  With `static_scale` the
    entry takes one more argument, the activations' calibrated per-tensor scale (tensor<1xf32>)."""
    lay.check()
    for nr in (cfg.gemv_nr, cfg.gemm_tile(lay)[1]):
        if lay.blocks_multiple % nr or cfg.chunk_blocks % nr:
            raise ValueError(f"tiles of {nr} column blocks must divide blocks_multiple={lay.blocks_multiple} "
                             f"and chunk_blocks={cfg.chunk_blocks}")
    t = MlirText()
    x, M = _entry_prologue(t, lay)
    _quantized_rows(t, name, lay, cfg, M, x, static_scale, static_m)
    t.op(f"%y = memref.alloc({M}) {{alignment = 64 : i64}} : memref<?x{lay.n}xf32>")
    params = _kernel_params(lay)
    args = ", ".join(f"%{n}" for n, _ in params)
    tys = ", ".join(ty_ for _, ty_ in params)
    variants = [cfg.variant(static_m)] if static_m is not None else ["gemv", "gemm"]
    if len(variants) == 1:
        t.op(f"func.call @{name}__{variants[0]}({args}) : ({tys}) -> ()")
    else:
        small = t.v(f"arith.cmpi ult, {M}, {t.idx(cfg.gemm_min_m)} : index")
        t.open(f"scf.if {small} {{")
        t.op(f"func.call @{name}__gemv({args}) : ({tys}) -> ()")
        t.close("} else {")
        t.indent += 2
        t.op(f"func.call @{name}__gemm({args}) : ({tys}) -> ()")
        t.close()
    entry = _entry_function(name, t, lay, ", %act_scalet: tensor<1xf32>" if static_scale else "")
    generators = {"gemv": gemv, "gemm": gemm}
    quantize = _quantize_function(f"{name}__quantize", lay, act_levels, static_scale, act_clip)
    return "".join(declarations(lay).values()) + entry + quantize + \
        "".join(generators[v](f"{name}__{v}", lay, cfg) for v in variants)


def gathered(name: str, lay: IntLayout, experts: int, cfg: IntKernelConfig, act_levels: tuple[int, int],
             static_scale: bool = False, act_clip: float = 1.0) -> str:
    """A mixture of experts' integer product (dequant-after-gemm's gather_matmul_int and
    gather_scale_accumulate with its rows' quantization): x [?, K] f32, ids [?] i64 and
    `experts` packed layouts stacked along the blocks -> y [?, N] f32, y[m] = W[ids[m]] x[m].

    The rows are quantized as the dense kernel quantizes them, then grouped by expert
    (expert_rows.sort_rows: only a permutation, x is not moved).  A work item is one chunk
    of column blocks of one chosen expert, expert-major: the GEMM's register tiles over that
    expert's rows (through the permutation, so results land in their rows directly) against
    the expert's blocks where they are stored.  Each expert's codes are read once however
    many rows chose it; nothing is decoded into memory."""
    lay.check()
    mr, nr = cfg.gemm_tile(lay)
    if lay.blocks_multiple % nr or cfg.chunk_blocks % nr:
        raise ValueError(f"tiles of {nr} column blocks must divide blocks_multiple={lay.blocks_multiple} "
                         f"and chunk_blocks={cfg.chunk_blocks}")
    E, B = experts, lay.blocks
    ty = _memref_types(lay, E)
    offty = f"memref<{E + 1}xindex>"
    t = MlirText()
    x = t.v(f"bufferization.to_buffer %xt read_only : tensor<?x{lay.k}xf32> to memref<?x{lay.k}xf32>")
    t.op("%ids = bufferization.to_buffer %idst read_only : tensor<?xi64> to memref<?xi64>")
    for role in ty:
        t.op(f"%{role} = bufferization.to_buffer %{role}t read_only : {_tensor_type(ty[role])} to {ty[role]}")
    M = t.v(f"memref.dim {x}, {t.idx(0)} : memref<?x{lay.k}xf32>")
    _quantized_rows(t, name, lay, cfg, M, x, static_scale, None)
    expert_rows.sort_rows(t, "%ids", M, E)
    t.op(f"%y = memref.alloc({M}) {{alignment = 64 : i64}} : memref<?x{lay.n}xf32>")
    params = _kernel_params(lay, E) + [("off", offty), ("active", offty), ("perm", "memref<?xindex>")]
    plist = ", ".join(f"%{n}: {ty_}" for n, ty_ in params)
    args = ", ".join(f"%{n}" for n, _ in params)
    tys = ", ".join(ty_ for _, ty_ in params)
    t.op(f"func.call @{name}__experts({args}) : ({tys}) -> ()")
    extra = "".join(f", %{role}t: {_tensor_type(m)}" for role, m in ty.items()) + \
        (", %act_scalet: tensor<1xf32>" if static_scale else "")
    yt = f"tensor<?x{lay.n}xf32>"
    out = t.v(f"bufferization.to_tensor %y restrict writable : memref<?x{lay.n}xf32> to {yt}")
    entry = (f"func.func private @{name}(%xt: tensor<?x{lay.k}xf32>, %idst: tensor<?xi64>{extra}) -> {yt} {{\n"
             f"{t.text()}\n  return {out} : {yt}\n}}\n")

    # one work item: chunk %i % chunks of the column blocks of chosen expert %active[%i / chunks]
    chunks = -(-B // cfg.chunk_blocks)
    b = MlirText(indent=2)
    cc = b.idx(chunks)
    e = b.v(f"memref.load %active[{b.v(f'arith.divui %i, {cc} : index')}] : {offty}")
    b_start = b.v(f"arith.muli {b.v(f'arith.remui %i, {cc} : index')}, {b.idx(cfg.chunk_blocks)} : index")
    b_end = b.v(f"arith.minui {b.v(f'arith.addi {b_start}, {b.idx(cfg.chunk_blocks)} : index')}, {b.idx(B)} : index")
    weight_b0 = b.v(f"arith.muli {e}, {b.idx(B)} : index")
    start = b.v(f"memref.load %off[{e}] : {offty}")
    end = b.v(f"memref.load %off[{b.v(f'arith.addi {e}, {b.idx(1)} : index')}] : {offty}")
    # the rows in tiles of MR, then at most one tile of each smaller size (as the GEMM's)
    for size in sorted({mr, 4, 2, 1} - set(range(mr + 1, 5)), reverse=True):
        left = b.v(f"arith.subi {end}, {start} : index")
        stop = b.v(f"arith.subi {end}, {b.v(f'arith.remui {left}, {b.idx(size)} : index')} : index")
        b.open(f"scf.for %j{size} = {start} to {stop} step {b.idx(size)} {{")
        rows = [b.v(f"memref.load %perm[{b.v(f'arith.addi %j{size}, {b.idx(r)} : index')}] : memref<?xindex>")
                for r in range(size)]
        b.open(f"scf.for %b = {b_start} to {b_end} step {b.idx(nr)} {{")
        _tile(b, lay, cfg, rows, "%b", nr, weight_b0=weight_b0, experts=E)
        b.close()
        b.close()
        start = stop
    loop = "scf.parallel (%i) = (%c0) to (%cn) step (%c1)" if cfg.threads else "scf.for %i = %c0 to %cn step %c1"
    kernel = (f"func.func private @{name}__experts({plist}) {{\n"
              f"  %c0 = arith.constant 0 : index\n  %c1 = arith.constant 1 : index\n"
              f"  %ce = arith.constant {E} : index\n  %cc = arith.constant {chunks} : index\n"
              f"  %na = memref.load %active[%ce] : {offty}\n  %cn = arith.muli %na, %cc : index\n"
              f"  {loop} {{\n"
              f"    func.call @{name}__experts_body(%i, {args}) {{no_inline}} : (index, {tys}) -> ()\n  }}\n"
              f"  return\n}}\n"
              f"func.func private @{name}__experts_body(%i: index, {plist}) {{\n{b.text()}\n  return\n}}\n")
    quantize = _quantize_function(f"{name}__quantize", lay, act_levels, static_scale, act_clip)
    return "".join(declarations(lay).values()) + entry + quantize + kernel


def outlier_columns(name: str, lay: IntLayout) -> str:
    """Tensor-level kernel: y [?, N] = x_out [?, K] @ dequant(W)^T for an x_out that is zero outside a few
    columns (split-outliers' dynamic float part), from the int8 blocks the integer kernel already reads.

    The columns with a nonzero entry are listed first (one pass over x_out); then per block of 8
    output columns, each listed column's 8 codes are gathered from the block's quad vectors and
    dequantized with the block's scales (as the format reference decodes them) into a small
    buffer, and each row sums its outlier entries times those vectors in registers and writes its
    8 outputs once.  Work is O(M K) for the scan plus O(columns x N x M), not a pass over the whole
    weight."""
    lay.check()
    if lay.fmt.bits != 8 or lay.grouped:
        raise ValueError(f"{lay.format_key}: the outlier-column kernel reads per-channel int8 blocks")
    t = MlirText()
    ty = _memref_types(lay)
    K, N = lay.k, lay.n
    xty, yty = f"memref<?x{K}xf32>", f"memref<?x{N}xf32>"
    x, M = _entry_prologue(t, lay)
    codes, scale = "%codes", "%scale"
    c0, c1 = t.idx(0), t.idx(1)
    zero = t.v("arith.constant 0.0 : f32")
    cols = t.v(f"memref.alloc() : memref<{K}xindex>")
    # the columns any row of x_out touches (c <= k, so the unconditional store stays in bounds)
    count = t.v(f"scf.for %k = {c0} to {t.idx(K)} step {c1} iter_args(%c = {c0}) -> (index) {{")
    t.indent += 2
    false = t.v("arith.constant false")
    anynz = t.v(f"scf.for %m = {c0} to {M} step {c1} iter_args(%a = {false}) -> (i1) {{")
    t.indent += 2
    xv = t.v(f"memref.load {x}[%m, %k] : {xty}")
    nz = t.v(f"arith.cmpf one, {xv}, {zero} : f32")
    t.op(f"scf.yield {t.v(f'arith.ori %a, {nz} : i1')} : i1")
    t.close()
    t.op(f"memref.store %k, {cols}[%c] : memref<{K}xindex>")
    next_c = t.v(f"arith.addi %c, {c1} : index")
    t.op(f"scf.yield {t.v(f'arith.select {anynz}, {next_c}, %c : index')} : index")
    t.close()
    t.op(f"%y = memref.alloc({M}) {{alignment = 64 : i64}} : {yty}")
    wbuf = t.v(f"memref.alloc() {{alignment = 64 : i64}} : memref<{K}x8xf32>")
    c2, c4, c8, c16 = t.idx(2), t.idx(4), t.idx(8), t.idx(16)
    zv = t.v(f"arith.constant dense<0.0> : {_V8F32}")
    t.open(f"scf.for %b = {c0} to {t.idx(-(-N // COLS))} step {c1} {{")
    sv = t.v(f"vector.load {scale}[%b, {c0}, {c0}] : {ty['scale']}, {_V8F32}")
    n0 = t.v(f"arith.muli %b, {c8} : index")
    # the block's dequantized weights of the listed columns, 8 output columns a vector
    t.open(f"scf.for %ci = {c0} to {count} step {c1} {{")
    k = t.v(f"memref.load {cols}[%ci] : memref<{K}xindex>")
    q = t.v(f"arith.divui {k}, {c4} : index")
    r = t.v(f"arith.remui {k}, {c4} : index")
    if lay.unsigned_codes:  # byte 4j + i of block b, quad q holds w[8b + j, 4q + i] (int_pack)
        base, stride = r, QUAD
    else:  # byte 16h + 2j + i of block b, quad q holds w[8b + j, 4q + 2h + i]
        h16 = t.v(f"arith.muli {t.v(f'arith.divui {r}, {c2} : index')}, {c16} : index")
        base, stride = t.v(f"arith.addi {h16}, {t.v(f'arith.remui {r}, {c2} : index')} : index"), 2
    bytes_ = []
    for j in range(COLS):
        at = t.v(f"arith.addi {base}, {t.idx(stride * j)} : index")
        bytes_.append(t.v(f"memref.load {codes}[%b, {q}, {at}] : {ty['codes']}"))
    w8 = t.v(f"vector.from_elements {', '.join(bytes_)} : vector<8xi8>")
    if lay.unsigned_codes:
        z8 = t.v(f"vector.load %zero[%b, {c0}, {c0}] : {ty['zero']}, vector<8xi8>")
        wi = t.v(f"arith.subi {t.v(f'arith.extui {w8} : vector<8xi8> to {_V8I32}')}, "
                 f"{t.v(f'arith.extui {z8} : vector<8xi8> to {_V8I32}')} : {_V8I32}")
    else:
        wi = t.v(f"arith.extsi {w8} : vector<8xi8> to {_V8I32}")
    w = t.v(f"arith.mulf {t.v(f'arith.sitofp {wi} : {_V8I32} to {_V8F32}')}, {sv} : {_V8F32}")
    t.op(f"vector.store {w}, {wbuf}[%ci, {c0}] : memref<{K}x8xf32>, {_V8F32}")
    t.close()
    # each row: its outlier entries times those vectors, summed in registers, written once
    t.open(f"scf.for %m = {c0} to {M} step {c1} {{")
    acc = t.v(f"scf.for %ci = {c0} to {count} step {c1} iter_args(%acc = {zv}) -> ({_V8F32}) {{")
    t.indent += 2
    xmk = t.v(f"memref.load {x}[%m, {t.v(f'memref.load {cols}[%ci] : memref<{K}xindex>')}] : {xty}")
    wv = t.v(f"vector.load {wbuf}[%ci, {c0}] : memref<{K}x8xf32>, {_V8F32}")
    xb = t.v(f"vector.broadcast {xmk} : f32 to {_V8F32}")
    t.op(f"scf.yield {t.v(f'vector.fma {xb}, {wv}, %acc : {_V8F32}')} : {_V8F32}")
    t.close()
    t.op(f"vector.transfer_write {acc}, %y[%m, {n0}] : {_V8F32}, {yty}")
    t.close()
    t.close()
    return _entry_function(name, t, lay)
