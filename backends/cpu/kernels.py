"""MLIR micro-kernels of quantized linear layers on the panel layout (pack.py).

Each generator returns MLIR text (func, scf, vector, arith, memref) that the
normal CPU pipeline lowers: vector<Vxf32> ops become AVX2 (V=8) or AVX-512
(V=16) instructions, `scf.parallel` over weight panels becomes OpenMP threads.

* `gemv`: M below `gemm_min_m` (64; 32 with bf16 x).  Per panel of R rows and
  tile of a few rows of x, a 32-bit word vector of codes is loaded once; nibble
  i is `(w >> 4i) & 15` in registers, converted to f32 and FMA'd with V
  contiguous activations of each row of the tile.  Scales apply once per group:
  y = sum_g s_g * (sum_k x_k q_k) - sum_g s_g z_g X_g, with X_g the group sums
  of x (precomputed per row), so the inner loop has no zero-point work.
* `gemm_bcast` (f32 x) and `gemm_bf16` (bf16 x): larger M.  Per chunk of output
  columns and block of K, the codes are dequantized into a small transposed
  tile that 6-row register tiles of broadcast x reuse across all rows of x.
* `qlinear`: the tensor-level entry that `cpu-select-kernels` calls: pads x to
  K_pad, computes group sums, and dispatches on M between the GEMV and the GEMM.
"""

import dataclasses
import struct

from qcc.backends.cpu import expert_rows
from qcc.backends.cpu.mlir_text import MlirText
from qcc.backends.cpu.pack import PanelLayout


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """Tuning knobs of one linear's kernels (recorded in the manifest)."""

    # M >= this runs the blocked GEMM (broadcast tiles, or vdpbf16ps with bf16 x); below it the
    # GEMV's row tiles, which decode each code vector once for their rows and win up to ~64
    # rows on Zen 4 (32 against the bf16 GEMM; BENCHMARKS 2026-12-05)
    gemm_min_m: int = 64
    gemm_min_m_bf16: int = 32
    gemv_mr: int = 0         # rows of x per GEMV tile; 0: by layout (gemv_rows)
    threads: bool = True     # scf.parallel (OpenMP) or scf.for
    # x rounded to bf16 ("a16" as torch bf16 runs it); vdpbf16ps in the int4 GEMV and the GEMM
    bf16_activations: bool = False

    def gemm_from(self, lay: "PanelLayout") -> int:
        """The M from which the GEMM runs instead of the GEMV."""
        return self.gemm_min_m_bf16 if self.bf16_gemm(lay) else self.gemm_min_m

    def variant(self, m: int, lay: "PanelLayout") -> str:
        """The kernel that runs M rows (the cost model: see ARCHITECTURE.md)."""
        if m < self.gemm_from(lay):
            return "gemv"
        return "gemm_bf16" if self.bf16_gemm(lay) else "gemm_bcast"

    def gemv_rows(self, lay: "PanelLayout") -> int:
        """Rows per GEMV tile: R x rows accumulators and as many partial sums must stay in
        registers (AVX2 has 16, AVX-512 32).  On Zen 4, 4 rows beat 3 by 14% at M = 4 and
        lose up to 5% from M = 24 (int4 on f32 x; int8 and bf16 x: 4 rows throughout)."""
        return self.gemv_mr or (2 if lay.lanes < 16 else 4)

    def bf16_gemm(self, lay: "PanelLayout") -> bool:
        """The bf16 GEMM scales each block's sums once: every block must lie in one group."""
        return self.bf16_activations and lay.group % lay.kb == 0

    def bf16_gemv(self, lay: "PanelLayout") -> bool:
        """The GEMV runs vdpbf16ps on int4 codes (pairs of chunks j, j + 4: one group each)."""
        return self.bf16_gemm(lay) and lay.fmt.bits == 4

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def _types(lay: PanelLayout) -> dict:
    fmt = lay.fmt
    shapes = lay.shapes()
    elem = {"codes": "i32" if fmt.bits == 4 else "i8", "scale": "f32", "zero": "i8"}
    return {role: f"memref<{'x'.join(str(d) for d in shape)}x{elem[role]}>" for role, (shape, _) in shapes.items()}


def _vec(lay, elem="f32") -> str:
    return f"vector<{lay.lanes}x{elem}>"


def _decode(t: MlirText, lay: PanelLayout, codes: str, p: str, kb: str, r: str, i: int, word: str | None,
            in_place: bool = False) -> str:
    """vector<Vxf32> of raw codes (nibbles, or bytes) of chunk i of block kb, row r.

    in_place (int4): nibble i is masked where it sits, giving code * 16^i for
    i < 7 (exact in f32); the caller's activations are pre-scaled by 16^-i,
    which saves the shift (3 vector ops per 8 weights instead of 4).
    """
    fmt, vi = lay.fmt, _vec(lay, "i32")
    if fmt.bits == 4 and in_place and i < 7:
        mask = t.v(f"arith.constant dense<{15 << (4 * i)}> : {vi}")
        return t.v(f"arith.sitofp {t.v(f'arith.andi {word}, {mask} : {vi}')} : {vi} to {_vec(lay)}")
    if fmt.bits == 4:
        x = word
        if i:
            sh = t.v(f"arith.constant dense<{4 * i}> : {vi}")
            x = t.v(f"arith.shrui {x}, {sh} : {vi}")
        if i < 7:
            mask = t.v(f"arith.constant dense<15> : {vi}")
            x = t.v(f"arith.andi {x}, {mask} : {vi}")
        return t.v(f"arith.sitofp {x} : {vi} to {_vec(lay)}")
    off = t.idx(i * lay.lanes)
    ty = _types(lay)["codes"]
    c = t.v(f"vector.load {codes}[{p}, {kb}, {r}, {off}] : {ty}, {_vec(lay, 'i8')}")
    conv = "arith.sitofp" if fmt.symmetric else "arith.uitofp"
    return t.v(f"{conv} {c} : {_vec(lay, 'i8')} to {_vec(lay)}")


def _zero_value(t: MlirText, lay: PanelLayout, zero: str, p: str, g: str, r: str) -> str:
    if lay.fmt.symmetric:
        return t.v("arith.constant 8.0 : f32")
    z8 = t.v(f"memref.load {zero}[{p}, {g}, {r}] : {_types(lay)['zero']}")
    return t.v(f"arith.uitofp {z8} : i8 to f32")


class _Dequant:
    """Dequantized rows of one block: `(q - z) * s` of chunk i of row r, exactly as the
    format reference, with each row's scale (and zero) loaded once per group."""

    def __init__(self, t: MlirText, lay: PanelLayout, p: str, kb: str):
        self.t, self.lay, self.p, self.kb = t, lay, p, kb
        self.words = [t.v(f"vector.load %codes[{p}, {kb}, {t.idx(r)}, {t.idx(0)}] : {_types(lay)['codes']}, "
                          f"{_vec(lay, 'i32')}") if lay.fmt.bits == 4 else None for r in range(lay.rows)]
        self.scale_of = {}

    def row_chunk(self, r: int, i: int, scaled: bool = True) -> str:
        """Chunk i of row r: (q - z) * s, or with scaled=False the integer q - z (exact in f32)."""
        t, lay, p, kb = self.t, self.lay, self.p, self.kb
        vf, rr = _vec(lay), t.idx(r)
        f = _decode(t, lay, "%codes", p, kb, rr, i, self.words[r])
        if i == 0 or (i * lay.lanes) % lay.group == 0:
            g = t.v(f"affine.apply affine_map<(d0) -> ((d0 * {lay.kb} + {i * lay.lanes}) floordiv {lay.group})>({kb})")
            s = t.v(f"memref.load %scale[{p}, {g}, {rr}] : {_types(lay)['scale']}")
            zb = None
            if lay.needs_zero:
                zb = t.v(f"vector.broadcast {_zero_value(t, lay, '%zero', p, g, rr)} : f32 to {vf}")
            self.scale_of[r] = (t.v(f"vector.broadcast {s} : f32 to {vf}"), zb)
        sb, zb = self.scale_of[r]
        if zb is not None:
            f = t.v(f"arith.subf {f}, {zb} : {vf}")
        return t.v(f"arith.mulf {f}, {sb} : {vf}") if scaled else f


def _open_chunk_blocks(t: MlirText, lay: PanelLayout, panels_per_chunk: int, kc_blocks: int):
    """Prologue of a GEMM body: chunk %pc of `panels_per_chunk` panels, then opens the loop
    over its blocks of `kc_blocks` column blocks.  Returns (p0, npb, first, b0, nb): the
    chunk's first panel and panel count, whether this is the first block, its first
    column block and block count."""
    c0, c1 = t.idx(0), t.idx(1)
    t.op("%pc = arith.addi %i, %c0_body : index")
    p0 = t.v(f"arith.muli %pc, {t.idx(panels_per_chunk)} : index")
    prem = t.v(f"arith.subi {t.idx(lay.panels)}, {p0} : index")
    npb = t.v(f"arith.minui {prem}, {t.idx(panels_per_chunk)} : index")
    t.open(f"scf.for %kc = {c0} to {t.idx(-(-lay.blocks // kc_blocks))} step {c1} {{")
    first = t.v(f"arith.cmpi eq, %kc, {c0} : index")
    b0 = t.v(f"arith.muli %kc, {t.idx(kc_blocks)} : index")
    brem = t.v(f"arith.subi {t.idx(lay.blocks)}, {b0} : index")
    nb = t.v(f"arith.minui {brem}, {t.idx(kc_blocks)} : index")
    return p0, npb, first, b0, nb


def _signature(lay: PanelLayout, bf16_pairs: bool = False) -> tuple[str, str]:
    """(kernel parameter list, argument names) shared by gemv and gemm; with bf16_pairs x
    arrives as bf16 pairs along k packed in i32 (gemm_bf16)."""
    ty = _types(lay)
    zero = f", %zero: {ty['zero']}" if "zero" in ty else ""
    x = f"%xb: memref<?x{lay.k_pad // 2}xi32>" if bf16_pairs else f"%x: memref<?x{lay.k_pad}xf32>"
    params = (f"{x}, %xs: memref<?x{lay.groups}xf32>, %codes: {ty['codes']}, "
              f"%scale: {ty['scale']}{zero}, %y: memref<?x{lay.n}xf32>")
    args = ("%xb" if bf16_pairs else "%xp") + ", %xs, %codes, %scale" + (", %zero" if zero else "") + ", %y"
    return params, args


def _parallel(name: str, lay: PanelLayout, cfg: KernelConfig, count: int, body: str,
              bf16_pairs: bool = False) -> str:
    """`@name` runs `@name_body(i, args...)` for i in [0, count): scf.parallel (OpenMP
    threads) when cfg.threads.  The body is a function because convert-scf-to-openmp
    wraps it in a memref.alloca_scope, which must stay a single block."""
    params, _ = _signature(lay, bf16_pairs)
    args = ", ".join("%" + p.split(":", 1)[0].lstrip("%") for p in params.split(", "))
    arg_types = ", ".join(p.split(": ", 1)[1] for p in params.split(", %"))
    loop = "scf.parallel (%i) = (%c0) to (%cn) step (%c1)" if cfg.threads else "scf.for %i = %c0 to %cn step %c1"
    return (f"func.func private @{name}({params}) {{\n"
            f"  %c0 = arith.constant 0 : index\n  %c1 = arith.constant 1 : index\n"
            f"  %cn = arith.constant {count} : index\n"
            f"  {loop} {{\n"
            f"    func.call @{name}_body(%i, {args}) {{no_inline}} : (index, {arg_types}) -> ()\n  }}\n  return\n}}\n"
            f"func.func private @{name}_body(%i: index, {params}) {{\n{body}\n  return\n}}\n")


def _store_row_sums(t, lay, sums: list[str], m: str, p: str):
    """y[m, p*R + r] = sums[r], skipping padded rows."""
    R = lay.rows
    rr = t.idx(R)
    base = t.v(f"arith.muli {p}, {rr} : index")
    ymem = f"memref<?x{lay.n}xf32>"
    for r, s in enumerate(sums):
        n = t.v(f"arith.addi {base}, {t.idx(r)} : index")
        guarded = lay.n % R != 0 and r > 0
        if guarded:
            inb = t.v(f"arith.cmpi ult, {n}, {t.idx(lay.n)} : index")
            t.open(f"scf.if {inb} {{")
        t.op(f"memref.store {s}, %y[{m}, {n}] : {ymem}")
        if guarded:
            t.close()


def gemv(name: str, lay: PanelLayout, cfg: KernelConfig) -> str:
    """Tiles of cfg.gemv_rows(lay) rows of x against the R rows of a panel, the dot products
    along k in vector lanes: each code vector is decoded once for the tile's rows.

    f32 x: per V weights a mask in place and a convert, then one FMA a row.  With bf16
    activations (4-bit codes, groups of whole blocks; x packed by the entry as bf16 pairs of
    chunks j and j + 4 of a block, one i32 each), nibbles j and j + 4 of a code word are
    shifted to the top of the mantissas of their lane's two bf16 and OR-ed with 1.0: each is
    1 + q / 16 (exact), and one vdpbf16ps a row adds both products: a shift and a mask-and-or
    per 2V weights, where f32 spends 4 ops.  A group's sum is then scaled by 16 s and
    corrected by s (16 + z) times the group's sum of x (the 1 in 1 + q / 16 is 16 / 16:
    a small offset, so the correction cancels little).
    """
    lay.check()
    t = MlirText()
    bf16 = cfg.bf16_gemv(lay)
    c0 = t.idx(0)
    t.op("%c0_body = arith.constant 0 : index")
    M = t.v(f"memref.dim {'%xb' if bf16 else '%x'}, {c0} : {_x_type(lay, bf16)}")
    t.op("%p = arith.addi %i, %c0_body : index")
    _row_tiles(t, M, cfg.gemv_rows(lay), _gemv_tile(t, lay, bf16, "%p", "%p"))
    return _parallel(name, lay, cfg, lay.panels, t.text(), bf16_pairs=bf16)


def _x_type(lay: PanelLayout, bf16: bool) -> str:
    return f"memref<?x{lay.k_pad // 2}xi32>" if bf16 else f"memref<?x{lay.k_pad}xf32>"


def _gemv_tile(t: MlirText, lay: PanelLayout, bf16: bool, wp: str, yp: str):
    """tile_rows(m0, mr): the GEMV's rows [m0, m0 + mr) against weight panel `wp`, stored in
    y's panel `yp` (the same panel, but for a gathered expert's)."""
    R, V, KB, G = lay.rows, lay.lanes, lay.kb, lay.group
    GB = max(G, KB)
    bpg, gpb, cpg = GB // KB, GB // G, G // V
    steps = 4 if bf16 else 8  # vector steps per block
    if bf16:
        cpg = 4 * G // KB     # steps per group: 4 (groups of whole blocks)
    vb, vi = f"vector<{2 * V}xbf16>", _vec(lay, "i32")
    dot = f"llvm.x86.avx512bf16.dpbf16ps.{32 * V}"
    ty = _types(lay)
    vf = _vec(lay)
    xty = _x_type(lay, bf16)
    c0, c1 = t.idx(0), t.idx(1)
    zv = t.v(f"arith.constant dense<0.0> : {vf}")
    zf = t.v("arith.constant 0.0 : f32")

    def load_words(kb):
        if lay.fmt.bits != 4:
            return None
        return [t.v(f"vector.load %codes[{wp}, {kb}, {t.idx(r)}, {c0}] : {ty['codes']}, {vi}") for r in range(R)]

    def tile_rows(m0: str, mr: int) -> None:
        rows = [t.v(f"arith.addi {m0}, {t.idx(j)} : index") for j in range(mr)]
        n = R * mr  # accumulators, q = r * mr + j for panel row r and tile row j
        iters = ", ".join([f"%acc{q} = {zv}" for q in range(n)] + [f"%corr{q} = {zf}" for q in range(n)])
        res_types = ", ".join([vf] * n + ["f32"] * n)
        res = t.vs(2 * n, f"scf.for %gb = {c0} to {t.idx(lay.k_pad // GB)} step {c1} iter_args({iters}) -> "
                          f"({res_types}) {{")
        t.indent += 2

        def chunk(kb, parts, i, words):
            out = list(parts)
            if bf16:
                xo = t.v(f"affine.apply affine_map<(d0) -> (d0 * {KB // 2} + {i * V})>({kb})")
                xv = [t.v(f"vector.bitcast {t.v(f'vector.load %xb[{m}, {xo}] : {xty}, {vi}')} : {vi} to {vb}")
                      for m in rows]
                mask = t.v(f"arith.constant dense<{0x00780078}> : {vi}")
                one = t.v(f"arith.constant dense<{0x3F803F80}> : {vi}")
                shift = t.v(f"arith.constant dense<{abs(3 - 4 * i)}> : {vi}")
                for r in range(R):
                    w = t.v(f"arith.{'shli' if i == 0 else 'shrui'} {words[r]}, {shift} : {vi}")
                    w = t.v(f"arith.ori {t.v(f'arith.andi {w}, {mask} : {vi}')}, {one} : {vi}")
                    wb = t.v(f"vector.bitcast {w} : {vi} to {vb}")
                    for j in range(mr):
                        q = r * mr + j
                        out[q] = t.v(f"func.call @{dot}({parts[q]}, {wb}, {xv[j]}) : ({vf}, {vb}, {vb}) -> {vf}")
                return out
            xo = t.v(f"affine.apply affine_map<(d0) -> (d0 * {KB} + {i * V})>({kb})")
            xv = [t.v(f"vector.load %x[{m}, {xo}] : {xty}, {vf}") for m in rows]
            for r in range(R):
                f = _decode(t, lay, "%codes", wp, kb, t.idx(r), i, words[r] if words else None, in_place=True)
                for j in range(mr):
                    q = r * mr + j
                    out[q] = t.v(f"vector.fma {xv[j]}, {f}, {parts[q]} : {vf}")
            return out

        def flush(g, parts, acc, corr):
            new_acc, new_corr = list(acc), list(corr)
            for r in range(R):
                rr = t.idx(r)
                s = t.v(f"memref.load %scale[{wp}, {g}, {rr}] : {ty['scale']}")
                s16 = t.v(f"arith.mulf {s}, {t.v('arith.constant 16.0 : f32')} : f32") if bf16 else s
                sb = t.v(f"vector.broadcast {s16} : f32 to {vf}")
                sz = None
                if lay.needs_zero:
                    z = _zero_value(t, lay, "%zero", wp, g, rr)
                    if bf16:  # codes decoded as 1 + q / 16: scale 16 s, zero 16 + z
                        z = t.v(f"arith.addf {z}, {t.v('arith.constant 16.0 : f32')} : f32")
                    sz = t.v(f"arith.mulf {s}, {z} : f32")
                for j in range(mr):
                    q = r * mr + j
                    new_acc[q] = t.v(f"vector.fma {parts[q]}, {sb}, {acc[q]} : {vf}")
                    if sz is not None:
                        xsum = t.v(f"memref.load %xs[{rows[j]}, {g}] : memref<?x{lay.groups}xf32>")
                        new_corr[q] = t.v(f"math.fma {sz}, {xsum}, {corr[q]} : f32")
            return new_acc, new_corr

        acc = [f"%acc{q}" for q in range(n)]
        corr = [f"%corr{q}" for q in range(n)]
        if bpg > 1:
            piters = ", ".join(f"%part{q} = {zv}" for q in range(n))
            parts = t.vs(n, f"scf.for %b = {c0} to {t.idx(bpg)} step {c1} iter_args({piters}) -> "
                            f"({', '.join([vf] * n)}) {{")
            t.indent += 2
            kb = t.v(f"affine.apply affine_map<(d0, d1) -> (d0 * {bpg} + d1)>(%gb, %b)")
            words = load_words(kb)
            p_ = [f"%part{q}" for q in range(n)]
            for i in range(steps):
                p_ = chunk(kb, p_, i, words)
            t.op(f"scf.yield {', '.join(p_)} : {', '.join([vf] * n)}")
            t.close()
            acc, corr = flush("%gb", parts, acc, corr)
        else:
            kb = "%gb"
            words = load_words(kb)
            p_ = [zv] * n
            for i in range(steps):
                p_ = chunk(kb, p_, i, words)
                if (i + 1) % cpg == 0:
                    g = t.v(f"affine.apply affine_map<(d0) -> (d0 * {gpb} + {(i + 1) // cpg - 1})>(%gb)")
                    acc, corr = flush(g, p_, acc, corr)
                    p_ = [zv] * n
        t.op(f"scf.yield {', '.join(acc + corr)} : {res_types}")
        t.close()
        for j in range(mr):
            sums = []
            for r in range(R):
                q = r * mr + j
                h = t.v(f"vector.reduction <add>, {res[q]} : {vf} into f32")
                sums.append(t.v(f"arith.subf {h}, {res[n + q]} : f32") if lay.needs_zero else h)
            _store_row_sums(t, lay, sums, rows[j], yp)

    return tile_rows


def _open_tile_build(t: MlirText, lay: PanelLayout, nc: int, kc_blocks: int):
    """The broadcast GEMMs' start: chunk %i of `nc` output columns, its loop over blocks of
    `kc_blocks` column blocks (left open), and inside it the loops over the chunk's panels and
    the block's column blocks (%b) that build the weight tile (both left open).  Returns
    (n0, first, b0, nb, p, col0): the chunk's first column, whether this is the first block,
    its first column block and count, the panel and its first column in the tile."""
    c0, c1 = t.idx(0), t.idx(1)
    n0 = t.v(f"arith.muli %i, {t.idx(nc)} : index")
    p0, npb, first, b0, nb = _open_chunk_blocks(t, lay, nc // lay.rows, kc_blocks)
    t.open(f"scf.for %pb = {c0} to {npb} step {c1} {{")
    p = t.v(f"arith.addi {p0}, %pb : index")
    col0 = t.v(f"arith.muli %pb, {t.idx(lay.rows)} : index")
    t.open(f"scf.for %b = {c0} to {nb} step {c1} {{")
    return n0, first, b0, nb, p, col0


def _store_transposed(t: MlirText, rows: list[str], elem: str, width: int, tile: str, tile_ty: str,
                      first_row: str, col0: str) -> None:
    """Writes R vectors of `width` elements (one per weight row = output column) into a
    k-major tile: tile[first_row + j, col0 : col0 + R] = (rows[0][j], ..., rows[R-1][j])."""
    R = len(rows)
    zero = "0.0" if elem.startswith("f") else "0"
    stacked = t.v(f"arith.constant dense<{zero}> : vector<{R}x{width}x{elem}>")
    for r, v in enumerate(rows):
        stacked = t.v(f"vector.insert {v}, {stacked} [{r}] : vector<{width}x{elem}> into vector<{R}x{width}x{elem}>")
    tr = t.v(f"vector.transpose {stacked}, [1, 0] : vector<{R}x{width}x{elem}> to vector<{width}x{R}x{elem}>")
    for j in range(width):
        row = t.v(f"arith.addi {first_row}, {t.idx(j)} : index")
        v = t.v(f"vector.extract {tr}[{j}] : vector<{R}x{elem}> from vector<{width}x{R}x{elem}>")
        t.op(f"vector.store {v}, {tile}[{row}, {col0}] : {tile_ty}, vector<{R}x{elem}>")


def _row_tiles(t: MlirText, M: str, mr: int, tile_rows, start: str | None = None) -> None:
    """tile_rows(m0, rows) over rows [start (0), M): MR-row tiles, then the remainder (< MR rows)
    in tiles of 4, 2 and 1 rows (those below MR), at most one of each, so no row runs on the
    1-row tile's poorer ratio of loads to FMAs."""
    start = start or t.idx(0)
    for n_rows in sorted({mr, 4, 2, 1} - set(range(mr + 1, 5)), reverse=True):
        left = t.v(f"arith.subi {M}, {start} : index")
        end = t.v(f"arith.subi {M}, {t.v(f'arith.remui {left}, {t.idx(n_rows)} : index')} : index")
        t.open(f"scf.for %m{n_rows} = {start} to {end} step {t.idx(n_rows)} {{")
        tile_rows(f"%m{n_rows}", n_rows)
        t.close()
        start = end


def _add_to_y(t: MlirText, lay: PanelLayout, first: str, row: str, col: str, value: str) -> None:
    """y[row, col : col + V] = value on the first block of K (`first`), += after it."""
    vf, yty = _vec(lay), f"memref<?x{lay.n}xf32>"
    old = t.v(f"vector.transfer_read %y[{row}, {col}], {t.v('arith.constant 0.0 : f32')} : {yty}, {vf}")
    add = t.v(f"arith.addf {old}, {value} : {vf}")
    t.op(f"vector.transfer_write {t.v(f'arith.select {first}, {value}, {add} : {vf}')}, %y[{row}, {col}] : "
         f"{vf}, {yty}")


def gemm_bcast(name: str, lay: PanelLayout, cfg: KernelConfig) -> str:
    """Blocked GEMM for large M: per chunk of NC = 2V output columns and block of KC
    columns of K, the codes are dequantized (`(q - z) * s`, as the reference) and
    transposed into a k-major tile Bt[KC, NC] (16 KB, in L1); 6 x NC register tiles
    then take one broadcast x[m, k] and two vector loads of Bt per 12 FMAs."""
    lay.check()
    t = MlirText()
    R, V, KB = lay.rows, lay.lanes, lay.kb
    NC = 2 * V
    PB = NC // R
    MR = 6
    KCB = min(4, lay.blocks)
    KC = KCB * KB
    vf = _vec(lay)
    xty = f"memref<?x{lay.k_pad}xf32>"
    bty = f"memref<{KC}x{NC}xf32>"
    t.op("%c0_body = arith.constant 0 : index")
    c0, c1 = t.idx(0), t.idx(1)
    M = t.v(f"memref.dim %x, {c0} : {xty}")
    zv = t.v(f"arith.constant dense<0.0> : {vf}")
    nchunks = -(-lay.panels // PB)
    t.op(f"%bt = memref.alloca() {{alignment = 64 : i64}} : {bty}")
    n0, first, b0, nb, p, col0 = _open_tile_build(t, lay, NC, KCB)
    dq = _Dequant(t, lay, p, t.v(f"arith.addi {b0}, %b : index"))
    for i in range(8):
        krow = t.v(f"affine.apply affine_map<(d0) -> (d0 * {KB} + {i * V})>(%b)")
        _store_transposed(t, [dq.row_chunk(r, i) for r in range(R)], "f32", V, "%bt", bty, krow, col0)
    t.close()
    t.close()
    nk = t.v(f"arith.muli {nb}, {t.idx(KB)} : index")
    kx0 = t.v(f"arith.muli {b0}, {t.idx(KB)} : index")

    def tile_rows(m0: str, mr: int):
        iters = ", ".join(f"%a{i}_{h} = {zv}" for i in range(mr) for h in range(2))
        tys = ", ".join([vf] * (2 * mr))
        res = t.vs(2 * mr, f"scf.for %k = {c0} to {nk} step {c1} iter_args({iters}) -> ({tys}) {{")
        t.indent += 2
        bv = [t.v(f"vector.load %bt[%k, {t.idx(h * V)}] : {bty}, {vf}") for h in range(2)]
        kx = t.v(f"arith.addi {kx0}, %k : index")
        out = []
        for i in range(mr):
            mi = t.v(f"arith.addi {m0}, {t.idx(i)} : index")
            a = t.v(f"vector.broadcast {t.v(f'memref.load %x[{mi}, {kx}] : {xty}')} : f32 to {vf}")
            out += [t.v(f"vector.fma {a}, {bv[h]}, %a{i}_{h} : {vf}") for h in range(2)]
        t.op(f"scf.yield {', '.join(out)} : {tys}")
        t.close()
        for i in range(mr):
            mi = t.v(f"arith.addi {m0}, {t.idx(i)} : index")
            for h in range(2):
                _add_to_y(t, lay, first, mi, t.v(f"arith.addi {n0}, {t.idx(h * V)} : index"), res[2 * i + h])

    _row_tiles(t, M, MR, tile_rows)
    t.close()
    return _parallel(name, lay, cfg, nchunks, t.text())


def gemm_bf16(name: str, lay: PanelLayout, cfg: KernelConfig) -> str:
    """Blocked GEMM on bf16 activations (AVX512-BF16): per chunk of NC = 2V output columns and
    KCB blocks of KB columns of K (each block within one group), the codes are decoded to
    q - z (an integer of at most 8 bits: exact in bf16), paired along k and transposed into a
    tile Wt[KCB * KB / 2, NC] of bf16 pairs (i32); 6 x 2 register tiles of vdpbf16ps take a
    broadcast pair of x (bf16, packed by the entry) and two tile loads per 12 instructions
    (two products each), and each block's f32 sums are scaled by its group's scales into the
    tile's totals: y = sum over groups of s * sum (q - z) x, x rounded to bf16."""
    lay.check()
    if not cfg.bf16_gemm(lay):
        raise ValueError(f"{lay.format_key}: groups of {lay.group} split blocks of {lay.kb}")
    t = MlirText()
    R, V, KB = lay.rows, lay.lanes, lay.kb
    NC, PB, MR, KCB, HALF = 2 * V, 2 * V // R, 6, min(2, lay.blocks), KB // 2
    vf, vi, vb = _vec(lay), _vec(lay, "i32"), f"vector<{2 * V}xbf16>"
    xbty = f"memref<?x{lay.k_pad // 2}xi32>"
    wty, sty = f"memref<{KCB * HALF}x{NC}xi32>", f"memref<{KCB}x{NC}xf32>"
    dot = f"llvm.x86.avx512bf16.dpbf16ps.{32 * V}"
    t.op("%c0_body = arith.constant 0 : index")
    c0, c1 = t.idx(0), t.idx(1)
    M = t.v(f"memref.dim %xb, {c0} : {xbty}")
    zv = t.v(f"arith.constant dense<0.0> : {vf}")
    nchunks = -(-lay.panels // PB)
    t.op(f"%wt = memref.alloca() {{alignment = 64 : i64}} : {wty}")
    t.op(f"%st = memref.alloca() {{alignment = 64 : i64}} : {sty}")
    n0, first, b0, nb, p, col0 = _open_tile_build(t, lay, NC, KCB)
    kb = t.v(f"arith.addi {b0}, %b : index")
    g = t.v(f"affine.apply affine_map<(d0) -> ((d0 * {KB}) floordiv {lay.group})>({kb})")
    for r in range(R):
        sc = t.v(f"memref.load %scale[{p}, {g}, {t.idx(r)}] : {_types(lay)['scale']}")
        t.op(f"memref.store {sc}, %st[%b, {t.v(f'arith.addi {col0}, {t.idx(r)} : index')}] : {sty}")
    dq = _Dequant(t, lay, p, kb)
    for i in range(8):
        pairs = []
        for r in range(R):
            bf = t.v(f"arith.truncf {dq.row_chunk(r, i, scaled=False)} : {vf} to vector<{V}xbf16>")
            pairs.append(t.v(f"vector.bitcast {bf} : vector<{V}xbf16> to vector<{V // 2}xi32>"))
        prow = t.v(f"affine.apply affine_map<(d0) -> (d0 * {HALF} + {i * V // 2})>(%b)")
        _store_transposed(t, pairs, "i32", V // 2, "%wt", wty, prow, col0)
    t.close()
    t.close()
    px0 = t.v(f"arith.muli {b0}, {t.idx(HALF)} : index")

    def tile_rows(m0: str, mr: int):
        rows = [t.v(f"arith.addi {m0}, {t.idx(i)} : index") for i in range(mr)]
        iters = ", ".join(f"%tot{i}_{h} = {zv}" for i in range(mr) for h in range(2))
        tys = ", ".join([vf] * (2 * mr))
        totals = t.vs(2 * mr, f"scf.for %bl = {c0} to {nb} step {c1} iter_args({iters}) -> ({tys}) {{")
        t.indent += 2
        iters = ", ".join(f"%a{i}_{h} = {zv}" for i in range(mr) for h in range(2))
        sums = t.vs(2 * mr, f"scf.for %pp = {c0} to {t.idx(HALF)} step {c1} iter_args({iters}) -> ({tys}) {{")
        t.indent += 2
        prow = t.v(f"affine.apply affine_map<(d0, d1) -> (d0 * {HALF} + d1)>(%bl, %pp)")
        w = [t.v(f"vector.bitcast {t.v(f'vector.load %wt[{prow}, {t.idx(h * V)}] : {wty}, {vi}')} : {vi} to {vb}")
             for h in range(2)]
        px = t.v(f"arith.addi {px0}, {prow} : index")
        out = []
        for i in range(mr):
            xw = t.v(f"memref.load %xb[{rows[i]}, {px}] : {xbty}")
            xv = t.v(f"vector.bitcast {t.v(f'vector.broadcast {xw} : i32 to {vi}')} : {vi} to {vb}")
            out += [t.v(f"func.call @{dot}(%a{i}_{h}, {w[h]}, {xv}) : ({vf}, {vb}, {vb}) -> {vf}") for h in range(2)]
        t.op(f"scf.yield {', '.join(out)} : {tys}")
        t.close()
        sv = [t.v(f"vector.load %st[%bl, {t.idx(h * V)}] : {sty}, {vf}") for h in range(2)]
        new = [t.v(f"vector.fma {sums[2 * i + h]}, {sv[h]}, %tot{i}_{h} : {vf}") for i in range(mr) for h in range(2)]
        t.op(f"scf.yield {', '.join(new)} : {tys}")
        t.close()
        for i in range(mr):
            for h in range(2):
                _add_to_y(t, lay, first, rows[i], t.v(f"arith.addi {n0}, {t.idx(h * V)} : index"), totals[2 * i + h])

    _row_tiles(t, M, MR, tile_rows)
    t.close()
    return _parallel(name, lay, cfg, nchunks, t.text(), bf16_pairs=True)


def bf16_declarations(lay: PanelLayout) -> str:
    """The vdpbf16ps intrinsic of the layout's vector width, as a declared function."""
    v = lay.lanes
    return (f"func.func private @llvm.x86.avx512bf16.dpbf16ps.{32 * v}(vector<{v}xf32>, vector<{2 * v}xbf16>, "
            f"vector<{2 * v}xbf16>) -> vector<{v}xf32>\n")


def _x_bf16_pairs(t: MlirText, lay: PanelLayout, M: str, buf: str, chunk_pairs: bool) -> tuple[str, str]:
    """`buf` [M, K_pad / 2] i32: the padded x (%xp) as bf16 pairs, each pair one i32 (low half
    first): x[2i], x[2i + 1] along k, or with chunk_pairs x[c], x[c + 4V] for column c of
    chunk j < 4 of each block (the nibbles the bf16 GEMV pairs).  Returns (buf, its type)."""
    V, KP, KB = lay.lanes, lay.k_pad, lay.kb
    vf, vb, vi = _vec(lay), f"vector<{V}xbf16>", _vec(lay, "i32")
    xty, bty = f"memref<?x{KP}xf32>", f"memref<?x{KP // 2}xi32>"
    c0, c1 = t.idx(0), t.idx(1)
    t.op(f"{buf} = memref.alloc({M}) {{alignment = 64 : i64}} : {bty}")
    t.open(f"scf.for %m = {c0} to {M} step {c1} {{")
    if chunk_pairs:
        t.open(f"scf.for %b = {c0} to {t.idx(lay.blocks)} step {c1} {{")
        for j in range(4):
            halves = []
            for i in (j, j + 4):
                col = t.v(f"affine.apply affine_map<(d0) -> (d0 * {KB} + {i * V})>(%b)")
                halves.append(t.v(f"arith.truncf {t.v(f'vector.load %xp[%m, {col}] : {xty}, {vf}')} : {vf} to {vb}"))
            pair = t.v(f"vector.interleave {halves[0]}, {halves[1]} : {vb} -> vector<{2 * V}xbf16>")
            words = t.v(f"vector.bitcast {pair} : vector<{2 * V}xbf16> to {vi}")
            col = t.v(f"affine.apply affine_map<(d0) -> (d0 * {KB // 2} + {j * V})>(%b)")
            t.op(f"vector.store {words}, {buf}[%m, {col}] : {bty}, {vi}")
    else:
        t.open(f"scf.for %k = {c0} to {t.idx(KP)} step {t.idx(V)} {{")
        bf = t.v(f"arith.truncf {t.v(f'vector.load %xp[%m, %k] : {xty}, {vf}')} : {vf} to {vb}")
        words = t.v(f"vector.bitcast {bf} : {vb} to vector<{V // 2}xi32>")
        t.op(f"vector.store {words}, {buf}[%m, {t.v(f'arith.divui %k, {t.idx(2)} : index')}] : {bty}, "
             f"vector<{V // 2}xi32>")
    t.close()
    t.close()
    return buf, bty


def _x_prescaled(t: MlirText, lay: PanelLayout, M: str, buf: str) -> str:
    """`buf` [M, K_pad] f32: the padded x with chunk i of each block scaled by 16^-i (exact),
    the f32 int4 GEMV's activations (see _decode)."""
    V, KP = lay.lanes, lay.k_pad
    vf, xty = _vec(lay), f"memref<?x{KP}xf32>"
    c0, c1 = t.idx(0), t.idx(1)
    t.op(f"{buf} = memref.alloc({M}) {{alignment = 64 : i64}} : {xty}")
    t.open(f"scf.for %m = {c0} to {M} step {c1} {{")
    t.open(f"scf.for %b = {c0} to {t.idx(lay.blocks)} step {c1} {{")
    for i in range(8):
        col = t.v(f"affine.apply affine_map<(d0) -> (d0 * {lay.kb} + {i * V})>(%b)")
        xv = t.v(f"vector.load %xp[%m, {col}] : {xty}, {vf}")
        if i < 7:
            xv = t.v(f"arith.mulf {xv}, {t.v(f'arith.constant dense<{2.0 ** (-4 * i)!r}> : {vf}')} : {vf}")
        t.op(f"vector.store {xv}, {buf}[%m, {col}] : {xty}, {vf}")
    t.close()
    t.close()
    return buf


def _padded_x_and_group_sums(t: MlirText, lay: PanelLayout, xm: str, M: str, bf16: bool) -> None:
    """Defines %xp [M, K_pad] (x padded with zeros; rounded to bf16 with `bf16`) and %xs
    [M, groups] (x's sum over each group of K: the zero points' correction)."""
    K, KP, V = lay.k, lay.k_pad, lay.lanes
    vf = _vec(lay)
    c0, c1 = t.idx(0), t.idx(1)
    if KP != K or bf16:
        # x padded to K_pad; with bf16 activations rounded to bf16 (what every variant reads)
        t.op(f"%xp = memref.alloc({M}) {{alignment = 64 : i64}} : memref<?x{KP}xf32>")
        pad = t.v("arith.constant 0.0 : f32")
        t.open(f"scf.for %m = {c0} to {M} step {c1} {{")
        t.open(f"scf.for %k = {c0} to {t.idx(KP)} step {t.idx(V)} {{")
        v = t.v(f"vector.transfer_read {xm}[%m, %k], {pad} {{in_bounds = [false]}} : memref<?x{K}xf32>, {vf}")
        if bf16:
            v = t.v(f"arith.extf {t.v(f'arith.truncf {v} : {vf} to vector<{V}xbf16>')} : vector<{V}xbf16> to {vf}")
        t.op(f"vector.store {v}, %xp[%m, %k] : memref<?x{KP}xf32>, {vf}")
        t.close()
        t.close()
    else:
        t.op(f"%xp = memref.cast {xm} : memref<?x{K}xf32> to memref<?x{KP}xf32>")
    t.op(f"%xs = memref.alloc({M}) : memref<?x{lay.groups}xf32>")
    if lay.needs_zero:
        zv = t.v(f"arith.constant dense<0.0> : {vf}")
        t.open(f"scf.for %m = {c0} to {M} step {c1} {{")
        t.open(f"scf.for %g = {c0} to {t.idx(lay.groups)} step {c1} {{")
        k0 = t.v(f"arith.muli %g, {t.idx(lay.group)} : index")
        k1 = t.v(f"arith.addi {k0}, {t.idx(lay.group)} : index")
        s = t.v(f"scf.for %k = {k0} to {k1} step {t.idx(V)} iter_args(%s = {zv}) -> ({vf}) {{")
        t.indent += 2
        xv = t.v(f"vector.load %xp[%m, %k] : memref<?x{KP}xf32>, {vf}")
        t.op(f"scf.yield {t.v(f'arith.addf %s, {xv} : {vf}')} : {vf}")
        t.close()
        h = t.v(f"vector.reduction <add>, {s} : {vf} into f32")
        t.op(f"memref.store {h}, %xs[%m, %g] : memref<?x{lay.groups}xf32>")
        t.close()
        t.close()


def qlinear(name: str, lay: PanelLayout, cfg: KernelConfig, static_m: int | None = None) -> str:
    """Tensor-level entry: x [?, K] and the panel arrays -> y [?, N], with the kernels it calls:
    all three and a run-time dispatch on M, or only the one for `static_m`."""
    t = MlirText()
    ty = _types(lay)
    tt = {role: m.replace("memref", "tensor") for role, m in ty.items()}
    has_zero = "zero" in ty
    K, KP, V = lay.k, lay.k_pad, lay.lanes
    vf = _vec(lay)
    c0, c1 = t.idx(0), t.idx(1)
    xm = t.v(f"bufferization.to_buffer %xt read_only : tensor<?x{K}xf32> to memref<?x{K}xf32>")
    t.op(f"%codes = bufferization.to_buffer %codest read_only : {tt['codes']} to {ty['codes']}")
    t.op(f"%scale = bufferization.to_buffer %scalet read_only : {tt['scale']} to {ty['scale']}")
    if has_zero:
        t.op(f"%zero = bufferization.to_buffer %zerot read_only : {tt['zero']} to {ty['zero']}")
    M = t.v(f"memref.dim {xm}, {c0} : memref<?x{K}xf32>")
    bf16 = cfg.bf16_activations
    gemv_bf16 = cfg.bf16_gemv(lay)
    _padded_x_and_group_sums(t, lay, xm, M, bf16)
    t.op(f"%y = memref.alloc({M}) {{alignment = 64 : i64}} : memref<?x{lay.n}xf32>")
    params, args = _signature(lay)
    arg_types = ", ".join(p.split(": ", 1)[1] for p in params.split(", %"))

    def call(variant: str) -> None:
        """The variant's call, after the form of x it reads (the padded x itself, or a copy)."""
        xp_type = f"memref<?x{KP}xf32>"
        x, x_type = "%xp", xp_type
        if variant == "gemm_bf16":    # bf16 pairs along k: the broadcast operand of vdpbf16ps
            x, x_type = _x_bf16_pairs(t, lay, M, "%xb", chunk_pairs=False)
        elif variant == "gemv" and gemv_bf16:  # bf16 pairs of chunks j and j + 4 (what gemv decodes)
            x, x_type = _x_bf16_pairs(t, lay, M, "%xg", chunk_pairs=True)
        elif variant == "gemv" and lay.fmt.bits == 4:  # chunk i of each block scaled by 16^-i (_decode)
            x = _x_prescaled(t, lay, M, "%xq")
        vargs = args.replace("%xp,", f"{x},", 1)
        t.op(f"func.call @{name}__{variant}({vargs}) : ({arg_types.replace(xp_type, x_type, 1)}) -> ()")

    big = "gemm_bf16" if cfg.bf16_gemm(lay) else "gemm_bcast"
    variants = [cfg.variant(static_m, lay)] if static_m is not None else ["gemv", big]
    if len(variants) == 1:
        call(variants[0])
    else:
        small = t.v(f"arith.cmpi ult, {M}, {t.idx(cfg.gemm_from(lay))} : index")
        t.open(f"scf.if {small} {{")
        call("gemv")
        t.close("} else {")
        t.indent += 2
        call(big)
        t.close()
    out = t.v(f"bufferization.to_tensor %y restrict writable : memref<?x{lay.n}xf32> to tensor<?x{lay.n}xf32>")
    zero_param = f", %zerot: {tt['zero']}" if has_zero else ""
    entry = (f"func.func private @{name}(%xt: tensor<?x{K}xf32>, %codest: {tt['codes']}, %scalet: {tt['scale']}"
             f"{zero_param}) -> tensor<?x{lay.n}xf32> {{\n{t.text()}\n  return {out} : tensor<?x{lay.n}xf32>\n}}\n")
    generators = {"gemv": gemv, "gemm_bcast": gemm_bcast, "gemm_bf16": gemm_bf16}
    uses_bf16 = "gemm_bf16" in variants or (gemv_bf16 and "gemv" in variants)
    declarations = bf16_declarations(lay) if uses_bf16 else ""
    return declarations + entry + "".join(generators[v](f"{name}__{v}", lay, cfg) for v in variants)


def gathered_qlinear(name: str, lay: PanelLayout, cfg: KernelConfig) -> str:
    """A mixture of experts' product, y[m] = W[ids[m]] x[m] (lay.experts weights, each a
    panel layout, stacked), in the batched matmul's shapes: x [?, K, 1], ids [?] (i64) and
    the panel arrays -> y [?, N, 1].

    The entry sorts the rows by expert (expert_rows.sort_rows; each expert's rows contiguous in a
    copy of x, `%off` their bounds) and lists the experts some row chose (`%active`).  A work
    item is one panel of one chosen expert, expert-major (OpenMP's contiguous shares then
    stream one expert's codes a thread): the GEMV's row tiles over that expert's rows against
    its panel where it is stored.  An expert's weights are read once however many rows chose
    it, nothing is decoded into memory, and an expert no row chose costs nothing.  The rows'
    results go back to their places.  A negative id counts from the end, as torch indexes;
    ids still out of range are clamped (memory safety; torch raises there)."""
    lay.check()
    t = MlirText()
    ty = _types(lay)
    tt = {role: m.replace("memref", "tensor") for role, m in ty.items()}
    has_zero = "zero" in ty
    K, KP, P, E, N, V = lay.k, lay.k_pad, lay.panels, lay.experts, lay.n, lay.lanes
    vf, offty = _vec(lay), f"memref<{E + 1}xindex>"
    c0, c1 = t.idx(0), t.idx(1)
    x3 = t.v(f"bufferization.to_buffer %xt read_only : tensor<?x{K}x1xf32> to memref<?x{K}x1xf32>")
    xm = t.v(f"memref.collapse_shape {x3} [[0], [1, 2]] : memref<?x{K}x1xf32> into memref<?x{K}xf32>")
    t.op("%ids = bufferization.to_buffer %idst read_only : tensor<?xi64> to memref<?xi64>")
    for role in ty:
        t.op(f"%{role} = bufferization.to_buffer %{role}t read_only : {tt[role]} to {ty[role]}")
    M = t.v(f"memref.dim {xm}, {c0} : memref<?x{K}xf32>")

    expert_rows.sort_rows(t, "%ids", M, E)
    # the rows in expert order, each expert's contiguous
    t.op(f"%xsorted = memref.alloc({M}) {{alignment = 64 : i64}} : memref<?x{K}xf32>")
    pad = t.v("arith.constant 0.0 : f32")
    t.open(f"scf.for %j = {c0} to {M} step {c1} {{")
    m = t.v("memref.load %perm[%j] : memref<?xindex>")
    t.open(f"scf.for %k = {c0} to {t.idx(K)} step {t.idx(V)} {{")
    row = t.v(f"vector.transfer_read {xm}[{m}, %k], {pad} {{in_bounds = [false]}} : memref<?x{K}xf32>, {vf}")
    t.op(f"vector.transfer_write {row}, %xsorted[%j, %k] {{in_bounds = [false]}} : {vf}, memref<?x{K}xf32>")
    t.close()
    t.close()
    _padded_x_and_group_sums(t, lay, "%xsorted", M, bf16=False)
    x = _x_prescaled(t, lay, M, "%xq") if lay.fmt.bits == 4 else "%xp"
    t.op(f"%y = memref.alloc({M}) {{alignment = 64 : i64}} : memref<?x{N}xf32>")
    zero = f", %zero: {ty['zero']}" if has_zero else ""
    params = (f"%x: memref<?x{KP}xf32>, %xs: memref<?x{lay.groups}xf32>, %off: {offty}, "
              f"%active: memref<{E + 1}xindex>, "
              f"%codes: {ty['codes']}, %scale: {ty['scale']}{zero}, %y: memref<?x{N}xf32>")
    names = ", ".join(p.split(":", 1)[0] for p in params.split(", "))
    types = ", ".join(p.split(": ", 1)[1] for p in params.split(", %"))
    t.op(f"func.call @{name}__gemv({names.replace('%x,', f'{x},', 1)}) : ({types}) -> ()")
    # the sorted rows' results to their rows
    t.op(f"%yout = memref.alloc({M}) {{alignment = 64 : i64}} : memref<?x{N}x1xf32>")
    yrows = t.v(f"memref.collapse_shape %yout [[0], [1, 2]] : memref<?x{N}x1xf32> into memref<?x{N}xf32>")
    t.open(f"scf.for %j = {c0} to {M} step {c1} {{")
    m = t.v("memref.load %perm[%j] : memref<?xindex>")
    t.open(f"scf.for %n = {c0} to {t.idx(N)} step {t.idx(V)} {{")
    row = t.v(f"vector.transfer_read %y[%j, %n], {pad} {{in_bounds = [false]}} : memref<?x{N}xf32>, {vf}")
    t.op(f"vector.transfer_write {row}, {yrows}[{m}, %n] {{in_bounds = [false]}} : {vf}, memref<?x{N}xf32>")
    t.close()
    t.close()
    out = t.v(f"bufferization.to_tensor %yout restrict writable : memref<?x{N}x1xf32> to tensor<?x{N}x1xf32>")
    zero_param = f", %zerot: {tt['zero']}" if has_zero else ""
    entry = (f"func.func private @{name}(%xt: tensor<?x{K}x1xf32>, %idst: tensor<?xi64>, %codest: {tt['codes']}, "
             f"%scalet: {tt['scale']}{zero_param}) -> tensor<?x{N}x1xf32> {{\n{t.text()}\n"
             f"  return {out} : tensor<?x{N}x1xf32>\n}}\n")

    b = MlirText()
    cp = b.idx(P)
    b.op(f"%p = arith.remui %i, {cp} : index")
    b.op(f"%e = memref.load %active[{b.v(f'arith.divui %i, {cp} : index')}] : memref<{E + 1}xindex>")
    start = b.v(f"memref.load %off[%e] : {offty}")
    end = b.v(f"memref.load %off[{b.v(f'arith.addi %e, {b.idx(1)} : index')}] : {offty}")
    wp = b.v(f"arith.addi {b.v(f'arith.muli %e, {cp} : index')}, %p : index")
    _row_tiles(b, end, cfg.gemv_rows(lay), _gemv_tile(b, lay, False, wp, "%p"), start=start)
    loop = "scf.parallel (%i) = (%c0) to (%cn) step (%c1)" if cfg.threads else "scf.for %i = %c0 to %cn step %c1"
    kernel = (f"func.func private @{name}__gemv({params}) {{\n"
              f"  %c0 = arith.constant 0 : index\n  %c1 = arith.constant 1 : index\n"
              f"  %ce = arith.constant {E} : index\n  %cp = arith.constant {P} : index\n"
              f"  %na = memref.load %active[%ce] : memref<{E + 1}xindex>\n"
              f"  %cn = arith.muli %na, %cp : index\n"
              f"  {loop} {{\n"
              f"    func.call @{name}__gemv_body(%i, {names}) {{no_inline}} : (index, {types}) -> ()\n  }}\n"
              f"  return\n}}\n"
              f"func.func private @{name}__gemv_body(%i: index, {params}) {{\n{b.text()}\n  return\n}}\n")
    return entry + kernel


def gathered_matvec_f32(name: str, experts: int, n: int, k: int, lanes: int, threads: bool) -> str:
    """The float form of `gathered_qlinear`: y[m] = W[ids[m]] x[m] with W [E, N, K] f32 read
    where it is stored (not gathered into a [rows, N, K] copy first): x [?, K, 1], ids [?] and
    W -> y [?, N, 1].  A work item is a row and R output columns (R f32 accumulators along K
    share each vector of x).  K must be a multiple of `lanes`.  Ids as torch indexes them
    (negative from the end), still out of range clamped."""
    assert k % lanes == 0, (k, lanes)
    R = next(r for r in (4, 2, 1) if n % r == 0)
    V, E, NB = lanes, experts, n // R
    vf, wty, xty = f"vector<{V}xf32>", f"memref<{E}x{n}x{k}xf32>", f"memref<?x{k}xf32>"
    t = MlirText()
    c0 = t.idx(0)
    x3 = t.v(f"bufferization.to_buffer %xt read_only : tensor<?x{k}x1xf32> to memref<?x{k}x1xf32>")
    xm = t.v(f"memref.collapse_shape {x3} [[0], [1, 2]] : memref<?x{k}x1xf32> into {xty}")
    ids = t.v("bufferization.to_buffer %idst read_only : tensor<?xi64> to memref<?xi64>")
    w = t.v(f"bufferization.to_buffer %wt read_only : tensor<{E}x{n}x{k}xf32> to {wty}")
    M = t.v(f"memref.dim {xm}, {c0} : {xty}")
    t.op(f"%yout = memref.alloc({M}) {{alignment = 64 : i64}} : memref<?x{n}x1xf32>")
    y = t.v(f"memref.collapse_shape %yout [[0], [1, 2]] : memref<?x{n}x1xf32> into memref<?x{n}xf32>")
    params = f"%x: {xty}, %ids: memref<?xi64>, %w: {wty}, %y: memref<?x{n}xf32>"
    types = f"{xty}, memref<?xi64>, {wty}, memref<?x{n}xf32>"
    t.op(f"func.call @{name}__gemv({xm}, {ids}, {w}, {y}) : ({types}) -> ()")
    out = t.v(f"bufferization.to_tensor %yout restrict writable : memref<?x{n}x1xf32> to tensor<?x{n}x1xf32>")
    entry = (f"func.func private @{name}(%xt: tensor<?x{k}x1xf32>, %idst: tensor<?xi64>, "
             f"%wt: tensor<{E}x{n}x{k}xf32>) -> tensor<?x{n}x1xf32> {{\n{t.text()}\n"
             f"  return {out} : tensor<?x{n}x1xf32>\n}}\n")

    b = MlirText()
    cb = b.idx(NB)
    m = b.v(f"arith.divui %i, {cb} : index")
    n0 = b.v(f"arith.muli {b.v(f'arith.remui %i, {cb} : index')}, {b.idx(R)} : index")
    e = expert_rows.expert_of(b, "%ids", m, E)
    cols = [b.v(f"arith.addi {n0}, {b.idx(r)} : index") for r in range(R)]
    zv = b.v(f"arith.constant dense<0.0> : {vf}")
    iters = ", ".join(f"%acc{r} = {zv}" for r in range(R))
    acc = b.vs(R, f"scf.for %kk = {b.idx(0)} to {b.idx(k)} step {b.idx(V)} iter_args({iters}) -> "
                  f"({', '.join([vf] * R)}) {{")
    b.indent += 2
    xv = b.v(f"vector.load %x[{m}, %kk] : {xty}, {vf}")
    nxt = [b.v(f"vector.fma {xv}, {b.v(f'vector.load %w[{e}, {cols[r]}, %kk] : {wty}, {vf}')}, %acc{r} : {vf}")
           for r in range(R)]
    b.op(f"scf.yield {', '.join(nxt)} : {', '.join([vf] * R)}")
    b.close()
    for r in range(R):
        b.op(f"memref.store {b.v(f'vector.reduction <add>, {acc[r]} : {vf} into f32')}, %y[{m}, {cols[r]}] : "
             f"memref<?x{n}xf32>")
    loop = "scf.parallel (%i) = (%c0) to (%cn) step (%c1)" if threads else "scf.for %i = %c0 to %cn step %c1"
    kernel = (f"func.func private @{name}__gemv({params}) {{\n"
              f"  %c0 = arith.constant 0 : index\n  %c1 = arith.constant 1 : index\n"
              f"  %cnb = arith.constant {NB} : index\n"
              f"  %rows = memref.dim %x, %c0 : {xty}\n"
              f"  %cn = arith.muli %rows, %cnb : index\n"
              f"  {loop} {{\n"
              f"    func.call @{name}__gemv_body(%i, %x, %ids, %w, %y) {{no_inline}} : (index, {types}) -> ()\n  }}\n"
              f"  return\n}}\n"
              f"func.func private @{name}__gemv_body(%i: index, {params}) {{\n{b.text()}\n  return\n}}\n")
    return entry + kernel


def batch_matmul(name: str, b: int, m: int, n: int, k: int, lanes: int, transposed_b: bool, threads: bool,
                 parts: tuple[int, ...] | None = None, part_elems: tuple[str, ...] | None = None,
                 rep: int = 1, b_scale: float | None = None) -> str:
    """f32 C[b, i, j] = sum_k A[b, i, k] * B[b, k, j] as vector code (attention's matmuls).

    transposed_b: B is given as Bt[b, j, k] (the source of a transpose the caller
    folded away), so both operands stream along k: a dot product per (i, j).
    Otherwise rows of C accumulate a[b, i, k] * B[b, k, :] (vector axpy along j).
    Threads over the b * m rows of C.

    parts: B arrives as separate tensors stacked along its rows (j for Bt, k for
    B) of these sizes, as a concatenation would have stacked them (a KV cache and the
    step's new key / value): each is read where it lies, so the concatenation is never
    built, and the arithmetic is the same, in the same order, as on the stacked B.
    B's memrefs take any strides but a unit innermost one (a slice of a larger cache
    needs no copy).  part_elems: each part's element type, f32 or f16 (a cache kept in 16
    bits), loaded as such and widened in registers (exact: the same products).  rep: B's parts
    have b / rep batches, batch i of C reading batch i / rep of them (grouped-query attention:
    rep query heads share a KV head, and batch-major b * heads maps onto b * kv_heads so).
    A part's row count may be None (a cache of run-time length: memref.dim).  b_scale: B is
    the stacked parts times this f32 constant (scaled_dot_product_attention scales k^T): each
    loaded vector is multiplied by it before its FMA, as the elementwise op would have, so the
    scaled copy of the cache is never built either.
    """
    rows_total = n if transposed_b else k
    parts = tuple(parts) if parts else (rows_total,)
    if None not in parts + (rows_total,) and sum(parts) != rows_total:
        raise ValueError(f"parts {parts} do not add up to {rows_total} rows of B")
    if (k if transposed_b else n) is None:
        raise ValueError("only B's stacked rows (n with transposed_b, else k) may be dynamic")
    elems = tuple(part_elems) if part_elems else ("f32",) * len(parts)
    if b % rep:
        raise ValueError(f"batch {b} is not a multiple of rep {rep}")
    t = MlirText()
    vf = f"vector<{lanes}xf32>"
    bb = b // rep
    dim = lambda d: "?" if d is None else str(d)  # noqa: E731
    bshape = [f"{bb}x{dim(p)}x{k}x{e}" if transposed_b else f"{bb}x{dim(p)}x{n}x{e}" for p, e in zip(parts, elems)]
    aty, cty = f"memref<{b}x{m}x{dim(k)}xf32>", f"memref<{b}x{m}x{dim(n)}xf32>"
    btys = [f"memref<{s}, strided<[?, ?, 1], offset: ?>>" for s in bshape]

    def read_b(p: int, bty: str, row: str, col: str) -> str:
        """A vector of part p of B at [its batch, row, col], widened to f32 (and scaled)."""
        if elems[p] == "f32":
            v = t.v(f"vector.transfer_read %b{p}[{bk}, {row}, {col}], %pad : {bty}, {vf}")
        else:
            narrow = f"vector<{lanes}x{elems[p]}>"
            pad = t.v(f"arith.constant 0.0 : {elems[p]}")
            v = t.v(f"vector.transfer_read %b{p}[{bk}, {row}, {col}], {pad} : {bty}, {narrow}")
            v = t.v(f"arith.extf {v} : {narrow} to {vf}")
        return v if b_scale is None else t.v(f"arith.mulf {v}, %scale : {vf}")
    t.op("%c0 = arith.constant 0 : index")
    t.op("%c1 = arith.constant 1 : index")
    t.op(f"%cm = arith.constant {m} : index")
    t.op("%pad = arith.constant 0.0 : f32")
    t.op(f"%zv = arith.constant dense<0.0> : {vf}")
    if b_scale is not None:  # the f32 constant by its bits: exactly the elementwise op's
        bits = struct.unpack("<I", struct.pack("<f", b_scale))[0]
        t.op(f"%scale = arith.constant dense<{bits:#010x}> : {vf}")
    t.op("%bi = arith.divui %r, %cm : index")
    t.op("%i = arith.remui %r, %cm : index")
    bk = t.v(f"arith.divui %bi, {t.idx(rep)} : index") if rep > 1 else "%bi"  # B's batch
    kv = t.idx(lanes)
    if not transposed_b:
        t.open(f"scf.for %j = %c0 to {t.idx(n)} step {kv} {{")
        t.op(f"vector.transfer_write %zv, %c[%bi, %i, %j] : {vf}, {cty}")
        t.close()
    start = "%c0"  # B's row where part p starts (a value: parts may have run-time sizes)
    for p, (rows, bty) in enumerate(zip(parts, btys)):
        rows = t.idx(rows) if rows is not None else t.v(f"memref.dim %b{p}, %c1 : {bty}")
        if transposed_b:
            t.open(f"scf.for %j{p} = %c0 to {rows} step %c1 {{")
            acc = t.v(f"scf.for %kk = %c0 to {t.idx(k)} step {kv} iter_args(%acc = %zv) -> ({vf}) {{")
            t.indent += 2
            av = t.v(f"vector.transfer_read %a[%bi, %i, %kk], %pad : {aty}, {vf}")
            bv = read_b(p, bty, f"%j{p}", "%kk")
            t.op(f"scf.yield {t.v(f'vector.fma {av}, {bv}, %acc : {vf}')} : {vf}")
            t.close()
            s = t.v(f"vector.reduction <add>, {acc} : {vf} into f32")
            j = t.v(f"arith.addi %j{p}, {start} : index")
            t.op(f"memref.store {s}, %c[%bi, %i, {j}] : {cty}")
            t.close()
        else:
            t.open(f"scf.for %kk{p} = %c0 to {rows} step %c1 {{")
            kk = t.v(f"arith.addi %kk{p}, {start} : index")
            a = t.v(f"memref.load %a[%bi, %i, {kk}] : {aty}")
            ab = t.v(f"vector.broadcast {a} : f32 to {vf}")
            t.open(f"scf.for %j = %c0 to {t.idx(n)} step {kv} {{")
            bv = read_b(p, bty, f"%kk{p}", "%j")
            cv = t.v(f"vector.transfer_read %c[%bi, %i, %j], %pad : {cty}, {vf}")
            t.op(f"vector.transfer_write {t.v(f'vector.fma {ab}, {bv}, {cv} : {vf}')}, %c[%bi, %i, %j] : {vf}, {cty}")
            t.close()
            t.close()
        start = t.v(f"arith.addi {start}, {rows} : index")
    bparams = ", ".join(f"%b{p}: {ty}" for p, ty in enumerate(btys))
    bargs = ", ".join(f"%b{p}" for p in range(len(parts)))
    params = f"%a: {aty}, {bparams}, %c: {cty}"
    tys = ", ".join([aty] + btys + [cty])
    entry_params = ", ".join(f"%bt{p}: tensor<{s}>" for p, s in enumerate(bshape))
    to_buffers = "".join(f"  %b{p} = bufferization.to_buffer %bt{p} read_only : tensor<{s}> to {ty}\n"
                         for p, (s, ty) in enumerate(zip(bshape, btys)))
    c_alloc = "  %c = memref.alloc() "
    if n is None:  # C's columns: the parts' rows, added up at run time
        lines, total = [], None
        for p, ty in enumerate(btys):
            lines.append(f"  %n{p} = memref.dim %b{p}, %one : {ty}" if parts[p] is None else
                         f"  %n{p} = arith.constant {parts[p]} : index")
            if total is not None:
                lines.append(f"  %s{p} = arith.addi {total}, %n{p} : index")
            total = f"%n{p}" if total is None else f"%s{p}"
        c_alloc = "\n".join(lines) + f"\n  %c = memref.alloc({total}) "
    ta, tc = f"tensor<{b}x{m}x{dim(k)}xf32>", f"tensor<{b}x{m}x{dim(n)}xf32>"
    loop = "scf.parallel (%r) = (%z) to (%rows) step (%one)" if threads else "scf.for %r = %z to %rows step %one"
    return f"""func.func private @{name}(%at: {ta}, {entry_params}) -> {tc} {{
  %z = arith.constant 0 : index
  %one = arith.constant 1 : index
  %rows = arith.constant {b * m} : index
  %a = bufferization.to_buffer %at read_only : {ta} to {aty}
{to_buffers}{c_alloc}{{alignment = 64 : i64}} : {cty}
  {loop} {{
    func.call @{name}_row(%r, %a, {bargs}, %c) {{no_inline}} : (index, {tys}) -> ()
  }}
  %ct = bufferization.to_tensor %c restrict writable : {cty} to {tc}
  return %ct : {tc}
}}
func.func private @{name}_row(%r: index, {params}) {{
{t.text()}
  return
}}
"""


BMM_MR = 6        # rows of A per register tile of batch_matmul_tiled
BMM_NR = 4        # vectors of C columns per tile (6 x 4 accumulators + 4 B vectors: 29 of 32 zmm)
BMM_ROW_CHUNK = 48  # rows of C per parallel task (a multiple of BMM_MR)
BMM_COL_CHUNK = 256  # columns of C per parallel task (whole blocks of BMM_NR vectors of 8 or 16)


def batch_matmul_tiled(name: str, b: int, m: int | None, n: int | None, k: int | None, lanes: int,
                       transposed_b: bool, threads: bool) -> str:
    """f32 C[b, i, j] = sum_k A[b, i, k] * B[b, k, j] in register tiles (prefill's attention);
    m, n, k may be None (dynamic: a sequence length only known at run time).

    Tiles of MR rows x NR vectors of columns keep their MR * NR accumulators in registers
    over the whole k loop: per k, NR vector loads of B and MR broadcasts of A feed MR * NR
    FMAs (batch_matmul's rows read and write C once per k, or reduce a dot product per
    element).  Each output is summed over k in order, one FMA at a time, from 0: the same
    arithmetic as batch_matmul's axpy form.  With transposed_b (B given as Bt[b, j, k]),
    Bt is first copied k-major, each batch in its own parallel task, into a buffer whose
    rows are padded to whole vectors (zeros); otherwise B's rows are read in place.  Columns
    past the last whole block of NR vectors go one vector at a time, the last one masked
    when n is not a multiple of the lanes.  Threads over batches x chunks of BMM_ROW_CHUNK rows x
    chunks of BMM_COL_CHUNK columns (attention's few key columns make one; a single wide matrix,
    matmul_kn, many).
    """
    vf = f"vector<{lanes}xf32>"
    md, nd, kd = ("?" if d is None else str(d) for d in (m, n, k))
    aty, cty = f"memref<{b}x{md}x{kd}xf32>", f"memref<{b}x{md}x{nd}xf32>"
    bty = f"memref<{b}x{nd}x{kd}xf32, strided<[?, ?, 1], offset: ?>>" if transposed_b else \
        f"memref<{b}x{kd}x{nd}xf32, strided<[?, ?, 1], offset: ?>>"
    static_p = n is not None and k is not None  # the packed copy's shape known: constant strides
    pty = f"memref<{b}x{k}x{-(-n // lanes) * lanes}xf32>" if static_p else f"memref<{b}x?x?xf32>"
    # the B the tiles read: the packed copy (padded: every read in bounds), or B itself
    src, sty = ("%p", pty) if transposed_b else ("%b", bty)
    block = BMM_NR * lanes

    t = MlirText()
    c0, c1 = t.idx(0), t.idx(1)
    pad = t.v("arith.constant 0.0 : f32")
    zv = t.v(f"arith.constant dense<0.0> : {vf}")
    M = t.v(f"memref.dim %c, {c1} : {cty}")
    N = t.v(f"memref.dim %c, {t.idx(2)} : {cty}")
    K = t.v(f"memref.dim %a, {t.idx(2)} : {aty}")
    # task = (batch, chunk of rows, chunk of columns), columns last
    chunks = t.v(f"arith.ceildivui {M}, {t.idx(BMM_ROW_CHUNK)} : index")
    col_chunks = t.v(f"arith.ceildivui {N}, {t.idx(BMM_COL_CHUNK)} : index")
    per_batch = t.v(f"arith.muli {chunks}, {col_chunks} : index")
    h = t.v(f"arith.divui %task, {per_batch} : index")
    rest = t.v(f"arith.remui %task, {per_batch} : index")
    r_start = t.v(f"arith.muli {t.v(f'arith.divui {rest}, {col_chunks} : index')}, {t.idx(BMM_ROW_CHUNK)} : index")
    r_end = t.v(f"arith.minui {t.v(f'arith.addi {r_start}, {t.idx(BMM_ROW_CHUNK)} : index')}, {M} : index")
    c_start = t.v(f"arith.muli {t.v(f'arith.remui {rest}, {col_chunks} : index')}, {t.idx(BMM_COL_CHUNK)} : index")
    c_end = t.v(f"arith.minui {t.v(f'arith.addi {c_start}, {t.idx(BMM_COL_CHUNK)} : index')}, {N} : index")
    width = t.v(f"arith.subi {c_end}, {c_start} : index")
    n_blocks = t.v(f"arith.subi {c_end}, {t.v(f'arith.remui {width}, {t.idx(block)} : index')} : index")
    last = t.v(f"arith.cmpi eq, {c_end}, {N} : index")

    def tile(i0: str, mr: int, j0: str, whole: list[bool]) -> None:
        """A tile of len(whole) vectors of columns; whole[c]: vector c lies below n (else its
        reads and writes past n are masked)."""
        nr = len(whole)
        rows = [t.v(f"arith.addi {i0}, {t.idx(r)} : index") for r in range(mr)]
        cols = [t.v(f"arith.addi {j0}, {t.idx(c * lanes)} : index") for c in range(nr)]
        tiles = [(r, c) for r in range(mr) for c in range(nr)]
        inb = [" {in_bounds = [true]}" if w else "" for w in whole]
        binb = [" {in_bounds = [true]}" if w or transposed_b else "" for w in whole]
        iters = ", ".join(f"%acc{r}_{c} = {zv}" for r, c in tiles)
        res = t.vs(len(tiles), f"scf.for %kk = {c0} to {K} step {c1} iter_args({iters}) -> "
                               f"({', '.join([vf] * len(tiles))}) {{")
        t.indent += 2
        bv = [t.v(f"vector.transfer_read {src}[{h}, %kk, {col}], {pad}{binb[c]} : {sty}, {vf}")
              for c, col in enumerate(cols)]
        new = {}
        for r in range(mr):
            a = t.v(f"vector.broadcast {t.v(f'memref.load %a[{h}, {rows[r]}, %kk] : {aty}')} : f32 to {vf}")
            for c in range(nr):
                new[r, c] = t.v(f"vector.fma {a}, {bv[c]}, %acc{r}_{c} : {vf}")
        t.op(f"scf.yield {', '.join(new[rc] for rc in tiles)} : {', '.join([vf] * len(tiles))}")
        t.close()
        for (r, c), acc in zip(tiles, res):
            t.op(f"vector.transfer_write {acc}, %c[{h}, {rows[r]}, {cols[c]}]{inb[c]} : {vf}, {cty}")

    def tile_rows(i0: str, mr: int) -> None:
        """Rows i0 .. i0 + mr - 1: the whole blocks of NR vectors, then the columns left."""
        t.open(f"scf.for %j{mr} = {c_start} to {n_blocks} step {t.idx(block)} {{")
        tile(i0, mr, f"%j{mr}", [True] * BMM_NR)
        t.close()
        if n is None:  # the columns left, a vector at a time
            t.open(f"scf.for %jr{mr} = {n_blocks} to {c_end} step {t.idx(lanes)} {{")
            tile(i0, mr, f"%jr{mr}", [False])
            t.close()
        elif n % block:  # in the last column chunk, one tile of the vectors left (the last masked
            left_vectors = -(-(n % block) // lanes)  # if n ends inside it)
            t.open(f"scf.if {last} {{")
            tile(i0, mr, n_blocks, [(c + 1) * lanes <= n % block for c in range(left_vectors)])
            t.close()

    _row_tiles(t, r_end, BMM_MR, tile_rows, start=r_start)
    body = t.text()

    loop = "scf.parallel ({0}) = (%z) to ({1}) step (%one)" if threads else "scf.for {0} = %z to {1} step %one"
    btensor = f"tensor<{b}x{nd}x{kd}xf32>" if transposed_b else f"tensor<{b}x{kd}x{nd}xf32>"
    pack, pack_fn = "", ""
    if transposed_b:  # the loops in a function: convert-scf-to-openmp wants a one-block body
        pack = (f"  %nblk = arith.ceildivui %n, %lanes : index\n"
                f"  %npad = arith.muli %nblk, %lanes : index\n"
                f"  %p = memref.alloc({'' if static_p else '%kk, %npad'}) {{alignment = 64 : i64}} : {pty}\n"
                f"  {loop.format('%ph', '%nb')} {{\n"
                f"    func.call @{name}_pack(%ph, %b, %p) {{no_inline}} : (index, {bty}, {pty}) -> ()\n  }}\n")
        # Bt[h, j, kk] -> P[h, kk, j], the padding columns zero
        pack_fn = (f"func.func private @{name}_pack(%h: index, %b: {bty}, %p: {pty}) {{\n"
                   f"  %z = arith.constant 0 : index\n  %one = arith.constant 1 : index\n"
                   f"  %c1 = arith.constant 1 : index\n  %c2 = arith.constant 2 : index\n"
                   f"  %n = memref.dim %b, %c1 : {bty}\n  %k = memref.dim %b, %c2 : {bty}\n"
                   f"  %npad = memref.dim %p, %c2 : {pty}\n  %zero = arith.constant 0.0 : f32\n"
                   f"  scf.for %kk = %z to %k step %one {{\n"
                   f"    scf.for %j = %n to %npad step %one {{\n"
                   f"      memref.store %zero, %p[%h, %kk, %j] : {pty}\n    }}\n  }}\n"
                   f"  scf.for %j = %z to %n step %one {{\n"
                   f"    scf.for %kk = %z to %k step %one {{\n"
                   f"      %v = memref.load %b[%h, %j, %kk] : {bty}\n"
                   f"      memref.store %v, %p[%h, %kk, %j] : {pty}\n    }}\n  }}\n  return\n}}\n")
    tile_args, tile_tys = ("%a, %p, %c", f"{aty}, {pty}, {cty}") if transposed_b else ("%a, %b, %c", f"{aty}, {bty}, {cty}")
    c_sizes = ", ".join(v for v, d in (("%m", m), ("%n", n)) if d is None)
    return f"""func.func private @{name}(%at: tensor<{b}x{md}x{kd}xf32>, %bt: {btensor}) -> tensor<{b}x{md}x{nd}xf32> {{
  %z = arith.constant 0 : index
  %one = arith.constant 1 : index
  %c1 = arith.constant 1 : index
  %c2 = arith.constant 2 : index
  %nb = arith.constant {b} : index
  %rchunk = arith.constant {BMM_ROW_CHUNK} : index
  %lanes = arith.constant {lanes} : index
  %a = bufferization.to_buffer %at read_only : tensor<{b}x{md}x{kd}xf32> to {aty}
  %b = bufferization.to_buffer %bt read_only : {btensor} to {bty}
  %m = memref.dim %a, %c1 : {aty}
  %kk = memref.dim %a, %c2 : {aty}
  %n = memref.dim %b, {"%c1" if transposed_b else "%c2"} : {bty}
  %c = memref.alloc({c_sizes}) {{alignment = 64 : i64}} : {cty}
  %chunks = arith.ceildivui %m, %rchunk : index
  %cchunk = arith.constant {BMM_COL_CHUNK} : index
  %col_chunks = arith.ceildivui %n, %cchunk : index
  %per_batch = arith.muli %chunks, %col_chunks : index
  %tasks = arith.muli %nb, %per_batch : index
{pack}  {loop.format('%task', '%tasks')} {{
    func.call @{name}_tiles(%task, {tile_args}) {{no_inline}} : (index, {tile_tys}) -> ()
  }}
  %ct = bufferization.to_tensor %c restrict writable : {cty} to tensor<{b}x{md}x{nd}xf32>
  return %ct : tensor<{b}x{md}x{nd}xf32>
}}
func.func private @{name}_tiles(%task: index, %a: {aty}, {src}: {sty}, %c: {cty}) {{
{body}
  return
}}
{pack_fn}"""


MM_MR = 4          # rows of A per register tile of matmul_bt
MM_NR = 4          # columns of C per tile (4 x 4 vector accumulators of partial dot products)
MM_CHUNK_COLS = 16  # columns of C per parallel task (their rows of Bt stay in L2 across row tiles)


def matmul_bt(name: str, m: int | None, n: int, k: int, lanes: int, threads: bool) -> str:
    """f32 C[i, j] = sum_k A[i, k] * Bt[j, k]: a float linear layer (x @ W^T), M static or not (None).

    The transpose that feeds linalg.matmul is folded away: both operands stream along k.
    Tiles of MR rows x NR columns keep MR * NR vectors of partial sums (lanes along k) in
    registers, MR + NR vector loads feeding MR * NR FMAs a step; each is reduced across
    its lanes once, at the end (k not a multiple of the lanes: a last masked step).  Threads
    over chunks of MM_CHUNK_COLS columns, each running all rows, so its rows of Bt are read
    from memory once and from cache for every further row tile.
    """
    vf = f"vector<{lanes}xf32>"
    md = "?" if m is None else str(m)
    aty, cty = f"memref<{md}x{k}xf32>", f"memref<{md}x{n}xf32>"
    bty = f"memref<{n}x{k}xf32>"
    chunks = -(-n // MM_CHUNK_COLS)
    t = MlirText()
    c0 = t.idx(0)
    pad = t.v("arith.constant 0.0 : f32")
    zv = t.v(f"arith.constant dense<0.0> : {vf}")
    M = t.v(f"memref.dim %a, {c0} : {aty}")
    col0 = t.v(f"arith.muli %task, {t.idx(MM_CHUNK_COLS)} : index")
    full = k - k % lanes

    def tile(i0: str, mr: int, j0: str, nr: int) -> None:
        rows = [t.v(f"arith.addi {i0}, {t.idx(r)} : index") for r in range(mr)]
        cols = [t.v(f"arith.addi {j0}, {t.idx(c)} : index") for c in range(nr)]
        tiles = [(r, c) for r in range(mr) for c in range(nr)]

        def step(kk: str, acc: dict, inb: str) -> dict:
            av = [t.v(f"vector.transfer_read %a[{row}, {kk}], {pad}{inb} : {aty}, {vf}") for row in rows]
            bv = [t.v(f"vector.transfer_read %b[{col}, {kk}], {pad}{inb} : {bty}, {vf}") for col in cols]
            return {(r, c): t.v(f"vector.fma {av[r]}, {bv[c]}, {acc[r, c]} : {vf}") for r, c in tiles}

        acc = {rc: zv for rc in tiles}
        if full:
            iters = ", ".join(f"%acc{r}_{c} = {zv}" for r, c in tiles)
            res = t.vs(len(tiles), f"scf.for %kk = {c0} to {t.idx(full)} step {t.idx(lanes)} iter_args({iters}) -> "
                                   f"({', '.join([vf] * len(tiles))}) {{")
            t.indent += 2
            new = step("%kk", {(r, c): f"%acc{r}_{c}" for r, c in tiles}, " {in_bounds = [true]}")
            t.op(f"scf.yield {', '.join(new[rc] for rc in tiles)} : {', '.join([vf] * len(tiles))}")
            t.close()
            acc = dict(zip(tiles, res))
        if k % lanes:  # the last lanes of k: reads past k are masked to 0
            acc = step(t.idx(full), acc, "")
        for (r, c) in tiles:
            s = t.v(f"vector.reduction <add>, {acc[r, c]} : {vf} into f32")
            t.op(f"memref.store {s}, %c[{rows[r]}, {cols[c]}] : {cty}")

    # this chunk's columns in tiles of NR (a last, narrower one where n ends inside the chunk)
    col_end = t.v(f"arith.minui {t.v(f'arith.addi {col0}, {t.idx(MM_CHUNK_COLS)} : index')}, {t.idx(n)} : index")
    width = t.v(f"arith.subi {col_end}, {col0} : index")
    whole = t.v(f"arith.subi {col_end}, {t.v(f'arith.remui {width}, {t.idx(MM_NR)} : index')} : index")
    def tile_rows(i0: str, mr: int) -> None:
        t.open(f"scf.for %j{mr} = {col0} to {whole} step {t.idx(MM_NR)} {{")
        tile(i0, mr, f"%j{mr}", MM_NR)
        t.close()
        if n % MM_NR:  # only the last chunk can end with fewer than NR columns
            t.open(f"scf.for %jr{mr} = {whole} to {col_end} step {t.idx(1)} {{")
            tile(i0, mr, f"%jr{mr}", 1)
            t.close()

    _row_tiles(t, M, MM_MR, tile_rows)
    body = t.text()
    loop = "scf.parallel (%task) = (%z) to (%tasks) step (%one)" if threads else \
        "scf.for %task = %z to %tasks step %one"
    alloc = "memref.alloc(%m)" if m is None else "memref.alloc()"
    return f"""func.func private @{name}(%at: tensor<{md}x{k}xf32>, %bt: tensor<{n}x{k}xf32>) -> tensor<{md}x{n}xf32> {{
  %z = arith.constant 0 : index
  %one = arith.constant 1 : index
  %tasks = arith.constant {chunks} : index
  %a = bufferization.to_buffer %at read_only : tensor<{md}x{k}xf32> to {aty}
  %b = bufferization.to_buffer %bt read_only : tensor<{n}x{k}xf32> to {bty}
  %m = memref.dim %a, %z : {aty}
  %c = {alloc} {{alignment = 64 : i64}} : {cty}
  {loop} {{
    func.call @{name}_tiles(%task, %a, %b, %c) {{no_inline}} : (index, {aty}, {bty}, {cty}) -> ()
  }}
  %ct = bufferization.to_tensor %c restrict writable : {cty} to tensor<{md}x{n}xf32>
  return %ct : tensor<{md}x{n}xf32>
}}
func.func private @{name}_tiles(%task: index, %a: {aty}, %b: {bty}, %c: {cty}) {{
{body}
  return
}}
"""


def matmul_kn(name: str, m: int | None, n: int, k: int, lanes: int, threads: bool) -> str:
    """f32 C[i, j] = sum_k A[i, k] * B[k, j] with B stored k-major (x @ W, W [K, N]), M static or
    not: batch_matmul_tiled's outer-product tiles on a batch of one, through a 3-D view of
    each operand (no copies)."""
    md = "?" if m is None else str(m)
    inner = f"{name}_b1"
    rows = "%m" if m is None else str(m)
    expand_a = (f"  %z = arith.constant 0 : index\n  %m = tensor.dim %x, %z : tensor<{md}x{k}xf32>\n"
                f"  %a3 = tensor.expand_shape %x [[0, 1], [2]] output_shape [1, {rows}, {k}] : "
                f"tensor<{md}x{k}xf32> into tensor<1x{md}x{k}xf32>\n")
    return (f"func.func private @{name}(%x: tensor<{md}x{k}xf32>, %w: tensor<{k}x{n}xf32>) -> tensor<{md}x{n}xf32> {{\n"
            + expand_a +
            f"  %b3 = tensor.expand_shape %w [[0, 1], [2]] output_shape [1, {k}, {n}] : "
            f"tensor<{k}x{n}xf32> into tensor<1x{k}x{n}xf32>\n"
            f"  %c3 = func.call @{inner}(%a3, %b3) : (tensor<1x{md}x{k}xf32>, tensor<1x{k}x{n}xf32>) -> tensor<1x{md}x{n}xf32>\n"
            f"  %c = tensor.collapse_shape %c3 [[0, 1], [2]] : tensor<1x{md}x{n}xf32> into tensor<{md}x{n}xf32>\n"
            f"  return %c : tensor<{md}x{n}xf32>\n}}\n"
            + batch_matmul_tiled(inner, 1, m, n, k, lanes, False, threads))
