"""CPU kernels against the format reference: the panel repack, GEMV and GEMM numerics.

Random weights are quantized by the format reference, repacked into panels
(backends/cpu/pack.py), and the generated MLIR kernels (backends/cpu/kernels.py)
run through the normal CPU lowering into a shared library.  Sizes are chosen
off the tiles: N not a multiple of the panel rows, K not a multiple of 64
where the format allows, M covering the GEMV, the GEMM and its row remainder.
"""

import os
import re

import numpy as np
import pytest

from qcc.backends.cpu import host, kernels, lowering
from qcc.backends.cpu import pack as P
from qcc.backends.cpu.runtime import CpuLibrary
from qcc.dialects import formats
from oracles import assert_packed_roundtrip

_ELEM = {"int32": "i32", "int8": "i8", "uint8": "i8", "float32": "f32"}


def build(tmp_path, lay: P.PanelLayout, cfg: kernels.KernelConfig) -> CpuLibrary:
    from torch_mlir import ir

    from qcc.context import make_context
    from qcc.params import ParamStore
    from qcc.pipeline import Session, run_pipeline

    shapes = lay.shapes()
    tt = {r: f"tensor<{'x'.join(map(str, s))}x{_ELEM[np.dtype(d).name]}>" for r, (s, d) in shapes.items()}
    params = ", ".join(f"%{r}: {t}" for r, t in tt.items())
    main = (f"func.func @main(%x: tensor<?x{lay.k}xf32>, {params}) -> tensor<?x{lay.n}xf32> {{\n"
            f"  %y = func.call @qk(%x, {', '.join('%' + r for r in tt)}) : (tensor<?x{lay.k}xf32>, "
            f"{', '.join(tt.values())}) -> tensor<?x{lay.n}xf32>\n  return %y : tensor<?x{lay.n}xf32>\n}}\n")
    openmp = host.openmp_runtime() if cfg.threads else None
    with make_context() as ctx, ir.Location.unknown():
        module = ir.Module.parse(main + kernels.qlinear("qk", lay, dataclass_replace(cfg, threads=openmp is not None)))
        lowering.mark_entry(module)
        pipeline = ["inline", "canonicalize", "cse"] + lowering.BUFFERIZE + lowering.TO_LLVM
        run_pipeline(module, pipeline, Session(ParamStore()), "kernel-test")
        so = str(tmp_path / "kernel.so")
        lowering.emit_shared_library(module, so, openmp=openmp)
        del ctx
    return CpuLibrary(so)


def dataclass_replace(cfg, **kw):
    import dataclasses

    return dataclasses.replace(cfg, **kw)


CASES = [
    # format, N, K, lanes, config: GEMV tiles of 2 (8 lanes), 4 (16 lanes) and 3 rows
    # with their remainders, the GEMM from gemm_min_m
    ("int4_asym_g128", 37, 384, 8, {}),
    ("int4_sym_g32", 13, 96, 8, {"gemm_min_m": 8}),
    ("int8_sym_channel", 21, 100, 8, {}),
    ("int8_asym_g64", 10, 192, 16, {"gemm_min_m": 16}),
    ("int4_asym_channel", 9, 70, 16, {"threads": False, "gemv_mr": 3}),
    ("int4_sym_g64", 40, 640, 8, {"gemv_mr": 4, "gemm_min_m": 12}),
    ("int8_sym_tensor", 6, 64, 8, {"gemm_min_m": 2}),
]


@pytest.mark.parametrize("key,n,k,lanes,cfg", CASES, ids=[f"{c[0]}-{c[1]}x{c[2]}-v{c[3]}" for c in CASES])
def test_kernel_matches_format_reference(tmp_path, key, n, k, lanes, cfg):
    rng = np.random.default_rng(n * k)
    fmt = formats.parse_weight_format(key)
    qt = fmt.quantize(rng.standard_normal((n, k)).astype(np.float32))
    lay = P.PanelLayout(key, n, k, rows=4, lanes=lanes)
    arrays = P.pack(lay, formats.pack(qt), qt.scale, qt.zero)
    np.testing.assert_array_equal(P.dequantize(lay, arrays), formats.dequantize(qt))
    config = kernels.KernelConfig(**cfg)
    lib = build(tmp_path, lay, config)
    w = formats.dequantize(qt).astype(np.float64)
    for m in (1, 2, 3, 4, 7, 11, 17, 40, 45, 70):  # tile remainders (GEMV 2, 1; broadcast 4, 2, 1)
        x = rng.standard_normal((m, k)).astype(np.float32)
        y = np.full((m, n), np.nan, np.float32)
        lib.call([x] + [arrays[r] for r in lay.shapes()], [y])
        ref = x.astype(np.float64) @ w.T
        err = np.abs(y - ref).max() / np.abs(ref).max()
        assert err < 2e-6, f"M={m} ({config.variant(m, lay)}): relative error {err}"


HAS_BF16 = "avx512_bf16" in host.features()["flags"]
BF16_CASES = [
    # format, N, K, lanes, config: blocks within one group (the vdpbf16ps GEMM) and groups that
    # split blocks (the f32 GEMMs on bf16-rounded x); M covers 6-, 4-, 2- and 1-row tiles
    ("int4_asym_g128", 37, 384, 16, {}),
    ("int8_sym_channel", 21, 300, 16, {}),
    ("int8_asym_g128", 40, 256, 8, {"threads": False}),
    ("int4_sym_g64", 13, 192, 16, {}),
    # the vdpbf16ps GEMV (M < 4): zero point 8 over groups of several blocks and K padded,
    # and the 8-lane form
    ("int4_sym_channel", 19, 520, 16, {}),
    ("int4_asym_g128", 24, 256, 8, {"threads": False}),
]


@pytest.mark.skipif(not HAS_BF16, reason="no AVX512-BF16")
@pytest.mark.parametrize("key,n,k,lanes,cfg", BF16_CASES, ids=[f"{c[0]}-{c[1]}x{c[2]}-v{c[3]}" for c in BF16_CASES])
def test_bf16_activations_match_the_bf16_oracle(tmp_path, key, n, k, lanes, cfg):
    """cpu_activations=bf16: every variant computes with x rounded to bf16 (round to nearest
    even, as torch's .to(bfloat16)); the oracle is that x times the format reference's
    weights in float64, so the kernels' only freedom is f32 summation order."""
    import torch

    rng = np.random.default_rng(n * k + 1)
    fmt = formats.parse_weight_format(key)
    qt = fmt.quantize(rng.standard_normal((n, k)).astype(np.float32))
    lay = P.PanelLayout(key, n, k, rows=4, lanes=lanes)
    arrays = P.pack(lay, formats.pack(qt), qt.scale, qt.zero)
    config = kernels.KernelConfig(bf16_activations=True, **cfg)
    assert config.bf16_gemm(lay) == (lay.group % lay.kb == 0)
    lib = build(tmp_path, lay, config)
    w = formats.dequantize(qt).astype(np.float64)
    for m in (1, 3, 5, 32, 39, 45, 70):
        x = (rng.standard_normal((m, k)) * 3).astype(np.float32)
        y = np.full((m, n), np.nan, np.float32)
        lib.call([x] + [arrays[r] for r in lay.shapes()], [y])
        xb = torch.from_numpy(x).to(torch.bfloat16).double().numpy()
        ref = xb @ w.T
        err = np.abs(y - ref).max() / np.abs(ref).max()
        # the vdpbf16ps GEMV sums (16 + q - z) x and removes 16 x afterwards: its f32 rounding
        # is that of sums a few times larger than the result's
        bound = 6e-6 if config.variant(m, lay) == "gemv" and lay.fmt.bits == 4 and config.bf16_gemm(lay) else 2e-6
        assert err < bound, f"M={m} ({config.variant(m, lay)}): relative error {err}"
        assert np.abs(y - x.astype(np.float64) @ w.T).max() / np.abs(ref).max() > 1e-4  # x was rounded


def test_bf16_activations_are_checked():
    from qcc.backends.cpu.lowering import check_activations
    from qcc.errors import QccError

    with pytest.raises(QccError, match="AVX512-BF16"):
        check_activations("bf16", {"flags": ["avx2", "avx512f"]})
    with pytest.raises(QccError, match="unknown CPU activation precision 'f16'"):
        check_activations("f16", {"flags": ["avx512_bf16"]})
    import torch

    import qcc

    with pytest.raises(QccError, match="applies to target='cpu' only"):
        qcc.compile(torch.nn.Linear(8, 8), (torch.randn(1, 8),), target="cuda", cpu_activations="bf16")


@pytest.mark.parametrize("key", ["int4_asym_g128", "int4_sym_g32", "int4_sym_channel", "int8_sym_channel",
                                 "int8_asym_g64", "int8_asym_tensor", "int4_asym_g64"])
@pytest.mark.parametrize("lanes", [8, 16])
def test_pack_roundtrip_is_exact(key, lanes):
    rng = np.random.default_rng(7)
    fmt = formats.parse_weight_format(key)
    k = 384 if fmt.granularity == "group" else 200
    qt = fmt.quantize(rng.standard_normal((11, k)).astype(np.float32) * 3)
    lay = P.PanelLayout(key, 11, k, rows=4, lanes=lanes)
    arrays = P.pack(lay, formats.pack(qt), qt.scale, qt.zero)
    assert_packed_roundtrip(lay, arrays, P.unpack, qt)
    np.testing.assert_array_equal(P.dequantize(lay, arrays), formats.dequantize(qt))


def test_int4_word_layout_by_hand():
    # one row, K=64, codes 0..15 repeating: word j nibble i holds column i*8 + j
    codes = np.arange(64, dtype=np.uint8) % 16
    fmt = formats.parse_weight_format("int4_asym_channel")
    qt = formats.QuantizedTensor(codes=codes[None], scale=np.ones((1, 1), np.float32),
                                 zero=np.zeros((1, 1), np.uint8), format=fmt, shape=(1, 64))
    lay = P.PanelLayout(fmt.key(), 1, 64, rows=4, lanes=8)
    words = P.pack(lay, formats.pack(qt), qt.scale, qt.zero)["codes"].view(np.uint32)[0, 0, 0]
    for j in range(8):
        for i in range(8):
            assert (words[j] >> (4 * i)) & 15 == codes[i * 8 + j]


def test_unsupported_group_is_rejected():
    with pytest.raises(P.LayoutError):
        P.PanelLayout("int4_asym_g96", 8, 192).check()


def test_no_float_copy_of_a_weight(tmp_path):
    """Walks the IR after each backend stage: no f32 buffer/tensor as large as a weight."""
    import torch

    import qcc

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(320, 448), torch.nn.ReLU(), torch.nn.Linear(448, 192)).eval()
    x = torch.randn(3, 320)
    dump = tmp_path / "ir"
    compiled = qcc.compile(model, (x,), quant="w4a16-g64", dump_dir=str(dump),
                           dynamic_shapes=({0: torch.export.Dim("tokens", min=1, max=4096)},))
    kernels = compiled.manifest["cpu"]["kernels"]
    assert kernels and all(k["variant"] == "dispatch" for k in kernels.values()), "not all three kernels present"
    smallest_weight = min(320 * 448, 448 * 192)
    stages = sorted(p for p in os.listdir(dump) if re.search(r"select-kernels|lower-qcc|bufferize|to-llvm", p))
    assert len(stages) == 4
    shaped = re.compile(r"(?:memref|tensor)<((?:\d+x)+)f32")
    for stage in stages:
        text = (dump / stage).read_text()
        for m in shaped.finditer(text):
            numel = int(np.prod([int(d) for d in m.group(1).rstrip("x").split("x")]))
            assert numel < smallest_weight, f"{stage}: float buffer {m.group(0)}> as large as a weight"
    for m in (1, 5, 40):  # GEMV, GEMM, broadcast GEMM
        xm = torch.randn(m, 320)
        assert np.allclose(compiled(xm).numpy(), compiled(xm).numpy())


@pytest.mark.parametrize("recipe", ["w4a16-g128", "w8a16", "w4a16-sym"])
def test_many_rows_few_columns_decode_the_weight_once(recipe):
    """From 512 static rows and up to 128 output columns the weight is decoded to f32 once a
    call and multiplied by the f32 GEMM (a convolution over its patches); equal to float64 on
    the decoded weights.  A wide layer of the same M keeps the panel GEMM."""
    import copy

    import torch

    import qcc
    from qcc.reference import dequantized_weights, load_into_torch

    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(256, 128), torch.nn.ReLU(), torch.nn.Linear(128, 384)).eval()
    x = torch.randn(600, 256)
    compiled = qcc.compile(model, (x,), quant=recipe)
    variants = {w: k["variant"] for w, k in compiled.manifest["cpu"]["kernels"].items()}
    assert variants == {"0.weight": "dequantized gemm", "2.weight": "gemm_bcast"}
    reference = copy.deepcopy(model).double()
    load_into_torch(reference, dequantized_weights(compiled))
    with torch.no_grad():
        expect = reference(x.double()).numpy()
    got = compiled(x).numpy()
    assert np.abs(got - expect).max() <= 1e-4 * np.abs(expect).max()


def _compile_with_ir(model, args, tmp_path, **kwargs):
    """qcc.compile with the IR dumped: (compiled model, text of the select-kernels stage)."""
    import qcc

    dump = tmp_path / "ir"
    compiled = qcc.compile(model, args, dump_dir=str(dump), **kwargs)
    return compiled, (dump / next(p for p in sorted(os.listdir(dump)) if "select-kernels" in p)).read_text()


@pytest.mark.parametrize("rows,seq,dim", [(2, 9, 20), (2, 16, 64), (2, 1, 7), (61, 37, 20), (16, 70, 64)])
def test_attention_matmuls_match_torch(tmp_path, rows, seq, dim):
    """q @ k^T and p @ v, odd sizes.  Two query rows: the row kernels (transpose folded into
    dot products; row axpy).  From kernels' TILED_MIN_M rows: the register-tiled kernels,
    here with remainder row tiles, more than one chunk of rows (61 > BMM_ROW_CHUNK), column
    blocks short of BMM_NR vectors and a partial last vector."""
    import torch

    from qcc.passes.cpu_contractions import TILED_MIN_M

    class Attention(torch.nn.Module):
        def forward(self, q, k, v):
            p = torch.softmax(torch.matmul(q, k.transpose(-2, -1)), dim=-1)
            return torch.matmul(p, v)

    g = torch.Generator().manual_seed(seq)
    q, k, v = (torch.randn(1, 3, s, dim, generator=g) for s in (rows, seq, seq))
    compiled, selected = _compile_with_ir(Attention(), (q, k, v), tmp_path)
    expect = Attention()(q.double(), k.double(), v.double()).numpy()
    got = compiled(q, k, v).numpy()
    assert np.abs(got - expect).max() / np.abs(expect).max() < 1e-5
    tiled = rows >= TILED_MIN_M
    assert (f"@qcc_cpu_bmm_tiled_t_3x{rows}x{seq}x{dim}(" in selected) == tiled
    assert (f"@qcc_cpu_bmm_tiled_3x{rows}x{dim}x{seq}(" in selected) == tiled


def test_attention_with_a_dynamic_sequence_length(tmp_path):
    """Prefill compiled for any sequence length (torch.export Dim): the attention matmuls take
    the tiled kernels with run-time sizes (they fell back to scalar loops: dynamic-length
    prefill of the benchmark model ran 251 ms against 86 for a static 128), here at lengths
    around the row tiles and the vector lanes, against torch in float64."""
    import torch

    class Attention(torch.nn.Module):
        def forward(self, q, k, v):
            p = torch.softmax(torch.matmul(q, k.transpose(-2, -1)) * 0.125, dim=-1)
            return torch.matmul(p, v)

    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 3, 9, 40, generator=g) for _ in range(3))
    seq = torch.export.Dim("seq", min=1, max=256)
    compiled, selected = _compile_with_ir(Attention(), (q, k, v), tmp_path, dynamic_shapes=({2: seq},) * 3)
    kernels_ = set(re.findall(r"@(qcc_cpu_bmm_\w+?)\(", selected))
    assert {"qcc_cpu_bmm_tiled_3xdxdx40", "qcc_cpu_bmm_tiled_3xdx40xd"} <= {k.replace("_t_", "_") for k in kernels_}
    assert "linalg.batch_matmul" not in selected
    for s in (1, 6, 17, 49, 70):
        q, k, v = (torch.randn(1, 3, s, 40, generator=g) for _ in range(3))
        expect = Attention()(q.double(), k.double(), v.double()).numpy()
        got = compiled(q, k, v).numpy()
        assert np.abs(got - expect).max() / np.abs(expect).max() < 1e-5, f"seq={s}"


@pytest.mark.parametrize("k,n", [(100, 37), (48, 16), (7, 5)])
def test_float_linear_matches_torch(tmp_path, k, n):
    """A layer kept float (x @ W^T + b, dynamic token count) runs kernels.matmul_bt: no transposed
    copy of W is built, and it matches torch in float64 for row counts around the 4-row tiles,
    k short of (or not a multiple of) the vector lanes and columns ending inside a 4-column tile
    and a 16-column chunk."""
    import torch

    torch.manual_seed(k + n)
    lin = torch.nn.Linear(k, n).eval()
    tokens = ({0: torch.export.Dim("tokens", min=1, max=512)},)
    compiled, selected = _compile_with_ir(lin, (torch.randn(4, k),), tmp_path, quant="float", dynamic_shapes=tokens)
    assert f"call @qcc_cpu_matmul_bt_dx{n}x{k}(" in selected and "linalg.transpose" not in selected
    with torch.no_grad():
        for m in (1, 2, 3, 5, 7, 33):
            x = torch.randn(m, k)
            expect = lin.double()(x.double()).numpy()
            lin.float()
            got = compiled(x).numpy()
            assert np.abs(got - expect).max() / np.abs(expect).max() < 1e-5, f"M={m}"


@pytest.mark.parametrize("k,n", [(100, 37), (64, 300)])
@pytest.mark.parametrize("w_is_param", [True, False])
def test_float_matmul_with_a_k_major_weight(tmp_path, k, n, w_is_param):
    """A float x @ W + b with W [K, N] (GPT-2's Conv1D: torch.addmm) matches torch in float64 for
    row counts around the row tiles.  A parameter W is stored transposed by the frontend and
    runs kernels.matmul_bt, as nn.Linear's weight does; a W passed in runs kernels.matmul_kn
    (the tiled outer-product kernel on a batch of one; 300 columns: two column chunks, a masked
    last vector)."""
    import torch

    g = torch.Generator().manual_seed(k + n)
    w = torch.randn(k, n, generator=g) / k ** 0.5

    class Conv1D(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(w.clone())
            self.b = torch.nn.Parameter(torch.randn(n, generator=g))

        def forward(self, x):
            return torch.addmm(self.b, x, self.w)

    class Conv1DWeightIn(Conv1D):
        def forward(self, x, w_in):
            return torch.addmm(self.b, x, w_in)

    mod = (Conv1D if w_is_param else Conv1DWeightIn)().eval()
    extra = () if w_is_param else (w,)
    tokens = ({0: torch.export.Dim("tokens", min=1, max=512)},) + (None,) * len(extra)
    compiled, selected = _compile_with_ir(mod, (torch.randn(4, k), *extra), tmp_path, quant="float",
                                          dynamic_shapes=tokens)
    kernel = f"qcc_cpu_matmul_bt_dx{n}x{k}" if w_is_param else f"qcc_cpu_matmul_kn_dx{n}x{k}"
    assert f"call @{kernel}(" in selected and "linalg.matmul" not in selected
    with torch.no_grad():
        for m in (1, 5, 13, 61):
            x = torch.randn(m, k)
            expect = mod.double()(x.double(), *(t.double() for t in extra)).numpy()
            mod.float()
            got = compiled(x, *extra).numpy()
            assert np.abs(got - expect).max() / np.abs(expect).max() < 1e-5, f"M={m}"


@pytest.mark.parametrize("layer,cache,dim,dtype,rep,dynamic,sdpa", [
    (1, 33, 20, "float32", 1, False, False), (0, 16, 64, "float32", 1, False, False),
    (1, 33, 64, "float16", 1, False, False), (0, 17, 32, "float16", 1, False, False),
    (1, 20, 32, "float32", 2, False, False), (0, 24, 16, "float16", 3, False, False),
    (1, 33, 20, "float32", 1, True, False), (0, 24, 16, "float16", 3, True, False),
    (1, 33, 20, "float32", 1, False, True), (0, 24, 16, "float16", 3, True, True),
    (1, 20, 32, "float32", 4, False, "gqa")])
def test_attention_over_a_concatenated_kv_cache(tmp_path, layer, cache, dim, dtype, rep, dynamic, sdpa):
    """Decode attention over torch.cat([cache[layer], new], dim=2): the kernels read the cache
    slice and the new key / value where they lie (no concatenation is built: no float buffer
    of the concatenated size in any backend stage) and match torch in float64.  A cache kept
    in f16 (`.float()` before the concatenation) is read in 16 bits: no f32 copy of it
    either.  rep > 1: grouped-query attention, each KV head repeated for rep query heads
    (repeat_kv's expand + reshape after the concatenation), read per KV head in place.
    dynamic: compiled for any cache length (run at two), the same kernels on run-time sizes.
    sdpa: written with F.scaled_dot_product_attention, whose decomposition scales k^T by
    sqrt(scale): the kernel scales each loaded vector instead (no scaled copy either);
    "gqa": SDPA's own grouped-query form (enable_gqa=True, no repeat_kv in the model)."""
    import torch
    from torch.export import Dim

    import qcc

    def repeat_kv(x):
        b, kvh, s, d = x.shape
        return x if rep == 1 else x[:, :, None, :, :].expand(b, kvh, rep, s, d).reshape(b, kvh * rep, s, d)

    class CachedAttention(torch.nn.Module):
        def forward(self, q, k_cache, v_cache, k, v):
            if sdpa == "gqa":
                keys, values = (torch.cat([c[layer].float(), x], dim=2) for c, x in ((k_cache, k), (v_cache, v)))
                return torch.nn.functional.scaled_dot_product_attention(q, keys, values, enable_gqa=True)
            keys = repeat_kv(torch.cat([k_cache[layer].float(), k], dim=2))
            values = repeat_kv(torch.cat([v_cache[layer].float(), v], dim=2))
            if sdpa:
                return torch.nn.functional.scaled_dot_product_attention(q, keys, values)
            p = torch.softmax(torch.matmul(q, keys.transpose(-2, -1)) * dim ** -0.5, dim=-1)
            return torch.matmul(p, values)

    g = torch.Generator().manual_seed(cache + dim)
    kv_heads = 3
    heads = kv_heads * rep
    q = torch.randn(1, heads, 1, dim, generator=g)
    k, v = (torch.randn(1, kv_heads, 1, dim, generator=g) for _ in range(2))
    k_cache, v_cache = (torch.randn(2, 1, kv_heads, cache, dim, generator=g).to(getattr(torch, dtype))
                        for _ in range(2))
    args = (q, k_cache, v_cache, k, v)
    dump = tmp_path / "ir"
    shapes = (None, {3: Dim.DYNAMIC}, {3: Dim.DYNAMIC}, None, None) if dynamic else None
    compiled = qcc.compile(CachedAttention(), args, dump_dir=str(dump), dynamic_shapes=shapes)
    for length in (cache, cache + 7) if dynamic else (cache,):
        caches = [torch.randn(2, 1, kv_heads, length, dim, generator=g).to(getattr(torch, dtype)) for _ in range(2)]
        run = (q, *caches, k, v) if dynamic else args
        expect = CachedAttention()(*(a.double() for a in run)).numpy()
        got = compiled(*run).numpy()
        assert np.abs(got - expect).max() / np.abs(expect).max() < 1e-5, length
    selected = (dump / next(p for p in sorted(os.listdir(dump)) if "select-kernels" in p)).read_text()
    elem = {"float32": "", "float16": "f16"}[dtype]
    suffix = f"_parts{'d' if dynamic else cache}{elem}_1{f'_rep{rep}' if rep > 1 else ''}"
    for form in ("dot", "axpy"):  # q @ k^T and p @ v both read the cache in place
        scaled = "_scaled[0-9a-f]{8}" if sdpa and form == "dot" else ""
        assert re.search(rf"call @qcc_cpu_bmm_{form}_[0-9xd]+{re.escape(suffix)}{scaled}\(", selected), form
    # static: the concatenation's type anywhere; dynamic: any allocation of an f32 cache-sized
    # buffer (the concatenation, or a widened copy) -- the cache argument has the type too
    concatenated = f"{heads}x{cache + 1}x{dim}xf32" if not dynamic else "no such type"
    widened = rf"alloc\([^\n]*memref<(1x)?{heads}x{'[?]' if dynamic else cache}x{dim}xf32>"
    for stage in sorted(os.listdir(dump)):
        if re.search(r"bufferize|to-llvm", stage):
            text = (dump / stage).read_text()
            assert concatenated not in text, f"{stage} builds the concatenation"
            assert not re.search(widened, text), f"{stage} builds an f32 copy of the cache"


def test_expanded_exp_is_within_one_ulp(tmp_path):
    """expand_exp's inline expf (what SiLU and softmax run) against numpy's exp in float64:
    within 1 ulp over the whole f32 range, inf above ln(FLT_MAX), 0 below the smallest
    denormal's log, NaN kept; and no libm call left in the library."""
    import shutil
    import subprocess

    from torch_mlir import ir

    from qcc.backends.cpu import expand_math
    from qcc.context import make_context
    from qcc.pipeline import Session, run_pipeline

    n = 1 << 16
    text = f"""func.func @main(%x: memref<{n}xf32>, %y: memref<{n}xf32>) {{
      linalg.generic {{indexing_maps = [affine_map<(d0) -> (d0)>, affine_map<(d0) -> (d0)>],
                       iterator_types = ["parallel"]}} ins(%x : memref<{n}xf32>) outs(%y : memref<{n}xf32>) {{
      ^bb0(%a: f32, %b: f32):
        %e = math.exp %a : f32
        linalg.yield %e : f32
      }}
      return
    }}"""
    ctx = make_context()
    with ctx:
        module = ir.Module.parse(text)
        assert expand_math.expand_exp(module) == 1
        lowering.mark_entry(module)
    run_pipeline(module, lowering.TO_LLVM, Session(None), "to-llvm")
    so = str(tmp_path / "exp.so")
    with ctx:
        lowering.emit_shared_library(module, so)
    edge = np.array([0, -0.0, 1, -1, 1e-8, -1e-8, 88.72, 88.7229, 89, -87.3, -103.9, -104, -200,
                     np.inf, -np.inf, np.nan], np.float32)
    rng = np.random.default_rng(7)
    x = np.concatenate([rng.uniform(-110, 90, n - 2 * len(edge)).astype(np.float32),
                        rng.uniform(-1, 1, len(edge)).astype(np.float32), edge])
    y = np.full(n, -1.0, np.float32)
    CpuLibrary(so).call([x, y], [])
    with np.errstate(over="ignore"):
        ref = np.exp(x.astype(np.float64))
        ref32 = ref.astype(np.float32)
    finite = np.isfinite(ref32) & (ref32 > 0)
    ulps = np.abs(y[finite] - ref[finite]) / np.spacing(ref32[finite])
    assert ulps.max() <= 1.0, f"max error {ulps.max():.2f} ulp"
    np.testing.assert_array_equal(y[~finite & ~np.isnan(x)], ref32[~finite & ~np.isnan(x)])  # inf and 0
    assert np.isnan(y[np.isnan(x)]).all()
    if shutil.which("objdump"):
        text = subprocess.run(["objdump", "-d", so], capture_output=True, text=True, check=True).stdout
        assert "<expf@plt>" not in text


@pytest.mark.skipif(not HAS_BF16, reason="no AVX512-BF16")
def test_compile_with_bf16_activations():
    """qcc.compile(..., cpu_activations="bf16"): the manifest says so, each weight-only kernel
    is the bf16 one, and the model matches bf16-rounded x on the artifact's own weights."""
    import torch

    import qcc
    from qcc.reference import dequantized_weights

    class TwoHeads(torch.nn.Module):  # both layers read x itself: one bf16 rounding each
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(256, 384), torch.nn.Linear(256, 128)

        def forward(self, x):
            return self.a(x), self.b(x)

    torch.manual_seed(3)
    model = TwoHeads().eval()
    tokens = ({0: torch.export.Dim("tokens", min=1, max=512)},)
    compiled = qcc.compile(model, (torch.randn(2, 256),), quant="w4a16-g128", dynamic_shapes=tokens,
                           cpu_activations="bf16")
    assert compiled.manifest["cpu"]["activations"] == "bf16"
    kernels_ = compiled.manifest["cpu"]["kernels"].values()
    assert len(kernels_) == 2 and all(k["kernel"].endswith("_bf16") and k["bf16_activations"] for k in kernels_)
    w = {name: torch.from_numpy(v.astype(np.float64)) for name, v in dequantized_weights(compiled).items()}
    for m in (3, 40):
        x = torch.randn(m, 256)
        xb = x.to(torch.bfloat16).double()
        for name, got in zip("ab", compiled(x)):
            ref = xb @ w[f"{name}.weight"].T + getattr(model, name).bias.double()
            assert float((got.double() - ref).abs().max() / ref.abs().max()) < 1e-5
