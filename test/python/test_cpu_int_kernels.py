"""The integer path's fused CPU kernels (cpu-select-int-kernels) against the dequant-after-gemm reference.

The oracle is the numpy form of dequant-after-gemm: activations quantized per
token by the activation format's reference, the integer matmul in int64 per
group (weight codes minus zero point), then f32 scaling as the reference
lowering orders it.  Weights are the format reference's codes of the float
weight.  Sizes are off the tiles (N not a multiple of 8 columns, K not a multiple
of the 32-k unit for per-channel), M covers the GEMV, the GEMM's row tiles and
their remainders, with one artifact (symbolic M) serving them all.  Both
dot-product forms run: avx2 everywhere (QCC_CPU_INT_DOT=avx2 forces it in the
compiler), vnni (vpdpbusd) where the host has VNNI, skipped elsewhere.
"""

import os
import re
import shutil
import subprocess

import numpy as np
import pytest
import torch

import qcc
from qcc.backends.cpu import host, int_pack
from qcc.dialects import formats
from qcc.dialects.formats import activation
from qcc.reference import dequantized_weights
from models import GatheredExperts
from oracles import assert_packed_roundtrip

TOKENS = ({0: torch.export.Dim("tokens", min=1, max=4096)},)
RECIPES = {"w8a8": ("int8_sym_channel", "int8_sym_token"), "w4a8-g128": ("int4_asym_g128", "int8_sym_token")}
HOST_DOT = host.features()["int_dot"]
DOTS = [pytest.param("avx2"), pytest.param("vnni", marks=pytest.mark.skipif(HOST_DOT != "vnni", reason="no VNNI"))]


@pytest.fixture(params=DOTS)
def dot(request, monkeypatch):
    """The integer kernels' dot-product form the compiler selects in this test."""
    if request.param != HOST_DOT:
        monkeypatch.setenv("QCC_CPU_INT_DOT", request.param)
    return request.param


def _linear(k, n, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Linear(k, n, bias=False).eval()


def oracle(x: np.ndarray, w: np.ndarray, wkey: str, akey: str) -> np.ndarray:
    """y of dequant-after-gemm for float x [M, K] and float weight w [N, K], in float64."""
    qt = formats.parse_weight_format(wkey).quantize(w)
    xq, sx = activation.quantize_act(x, activation.parse_act_format(akey))
    n, k = w.shape
    group = qt.format.group_size if qt.format.granularity == "group" else k
    codes = qt.codes.astype(np.int64)
    zero = qt.zero.astype(np.int64) if qt.zero is not None else np.zeros((n, k // group), np.int64)
    scale = np.broadcast_to(qt.scale, (n, k // group)).astype(np.float64)
    y = np.zeros((x.shape[0], n))
    for g in range(k // group):
        cols = slice(g * group, (g + 1) * group)
        acc = xq[:, cols].astype(np.int64) @ (codes[:, cols] - zero[:, g:g + 1]).T
        y += acc * scale[:, g] * sx.astype(np.float64)
    return y


def _selected(compiled) -> dict:
    kernels = compiled.manifest["cpu"]["kernels"]
    assert len(kernels) == 1
    return next(iter(kernels.values()))


@pytest.mark.parametrize("recipe,k,n", [("w8a8", 320, 100), ("w8a8", 100, 37), ("w4a8-g128", 384, 100),
                                        ("w4a8-g128", 128, 5)])
def test_fused_kernel_matches_dequant_after_gemm(recipe, k, n, dot):
    lin = _linear(k, n)
    compiled = qcc.compile(lin, (torch.randn(2, k),), quant=recipe, dynamic_shapes=TOKENS)
    kernel = _selected(compiled)
    assert kernel["layout"] == "int-blocks" and kernel["variant"] == "dispatch" and kernel["dot"] == dot
    assert kernel["kernel"].startswith("qcc_cpu_int_")
    wkey, akey = RECIPES[recipe]
    w = lin.weight.detach().numpy()
    rng = np.random.default_rng(k * n)
    for m in (1, 3, 16, 37, 130):
        x = (rng.standard_normal((m, k)) * rng.uniform(0.1, 4.0, (m, 1))).astype(np.float32)
        got = compiled(torch.from_numpy(x)).numpy()
        ref = oracle(x, w, wkey, akey)
        err = np.abs(got - ref).max() / np.abs(ref).max()
        assert err < 1e-5, f"{recipe} K={k} N={n} M={m}: relative error {err}"


@pytest.mark.parametrize("recipe", ["w8a8", "w4a8-g128",
                                    {"weight_format": "int4_sym_channel", "act_format": "int4_sym_token_clip0.9"}],
                         ids=["w8a8", "w4a8-g128", "w4a4-actclip0.9"])
def test_same_bits_as_reference_lowering(recipe, dot, monkeypatch):
    """Integer sums are exact and the f32 scaling follows the reference lowering's order."""
    k, n = 256, 24
    lin = _linear(k, n, seed=1)
    fast = qcc.compile(lin, (torch.randn(2, k),), quant=recipe, dynamic_shapes=TOKENS)
    assert _selected(fast)["dot"] == dot
    monkeypatch.setenv("QCC_CPU_KERNELS", "reference")
    slow = qcc.compile(lin, (torch.randn(2, k),), quant=recipe, dynamic_shapes=TOKENS)
    assert _selected(fast) and not slow.manifest["cpu"]["kernels"]
    x = torch.randn(9, k)
    x[3] = 0  # an all-zero row: scale 1, codes 0
    np.testing.assert_array_equal(fast(x).numpy(), slow(x).numpy())


@pytest.mark.parametrize("wkey", ["int8_sym_channel", "int4_asym_g128"])
def test_static_scale_same_bits_as_reference_lowering(wkey, dot, monkeypatch):
    """A calibrated per-tensor scale (int8_sym_tensor) takes the fused kernel too: every row
    quantized with that scale, values beyond the calibrated range clipped, same bits as the
    reference lowering."""
    k, n = 256, 40
    lin = _linear(k, n, seed=2)
    recipe = {"weight_format": wkey, "act_format": "int8_sym_tensor"}
    calib = [(torch.randn(32, k),), (torch.randn(32, k) * 0.5,)]
    fast = qcc.compile(lin, (torch.randn(2, k),), quant=recipe, calibration=calib, dynamic_shapes=TOKENS)
    kernel = _selected(fast)
    assert kernel["act_format"] == "int8_sym_tensor" and "act_scale" in kernel["params"]
    absmax = max(float(c[0].abs().max()) for c in calib)
    scale = activation.static_scale(absmax, activation.ACT_FORMATS["int8_sym_tensor"])
    assert fast.weights[kernel["params"]["act_scale"]][0] == scale[0, 0]
    monkeypatch.setenv("QCC_CPU_KERNELS", "reference")
    slow = qcc.compile(lin, (torch.randn(2, k),), quant=recipe, calibration=calib, dynamic_shapes=TOKENS)
    assert not slow.manifest["cpu"]["kernels"]
    for m in (1, 5, 37):
        x = torch.randn(m, k) * 2.0  # partly beyond the calibrated range: clipped codes
        assert float(x.abs().max()) > absmax
        np.testing.assert_array_equal(fast(x).numpy(), slow(x).numpy())


EXPERT_TOKENS = ({0: torch.export.Dim("rows", min=1, max=4096)}, {0: torch.export.Dim("rows", min=1, max=4096)})


@pytest.mark.parametrize("recipe,k,n", [("w8a8", 320, 100), ("w4a8-g128", 256, 37),
                                        ({"weight_format": "int4_sym_channel", "act_format": "int4_sym_token"}, 96, 24)],
                         ids=["w8a8", "w4a8-g128", "w4a4"])
def test_gathered_experts_kernel_matches_dequant_after_gemm(recipe, k, n, dot, monkeypatch):
    """The experts' integer kernel: each row times its expert's codes (N off the 8-column
    blocks, K off the 32-k unit), rows per expert from none to many (the GEMM's row tiles and
    their remainders), a negative id counting from the end; against dequant-after-gemm's numpy
    form of each row's expert, and bit for bit against the reference lowering."""
    experts = 5
    model = GatheredExperts(experts, n, k, seed=k + n).eval()
    x0, ids0 = torch.randn(3, k), torch.tensor([0, 1, 2])
    compiled = qcc.compile(model, (x0, ids0), quant=recipe, dynamic_shapes=EXPERT_TOKENS)
    kernel = _selected(compiled)
    assert kernel["variant"] == "gathered int" and kernel["experts"] == experts and kernel["dot"] == dot
    wkey, akey = RECIPES[recipe] if isinstance(recipe, str) else (recipe["weight_format"], recipe["act_format"])
    w = model.w.detach().numpy()
    rng = np.random.default_rng(k * n)
    for m in (1, 2, 9, 40, 131):
        x = (rng.standard_normal((m, k)) * rng.uniform(0.1, 4.0, (m, 1))).astype(np.float32)
        ids = rng.choice([0, 1, 3, -1], m, p=[0.1, 0.5, 0.3, 0.1])  # expert 2 never chosen; -1 is expert 4
        got = compiled(torch.from_numpy(x), torch.from_numpy(ids)).numpy()
        ref = np.concatenate([oracle(x[r:r + 1], w[ids[r]], wkey, akey) for r in range(m)])
        err = np.abs(got - ref).max() / np.abs(ref).max()
        assert err < 1e-5, f"K={k} N={n} M={m}: relative error {err}"
    decoded = dequantized_weights(compiled)["w"]
    expect = np.stack([formats.dequantize(formats.parse_weight_format(wkey).quantize(we)) for we in w])
    np.testing.assert_array_equal(decoded, expect)
    monkeypatch.setenv("QCC_CPU_KERNELS", "reference")
    slow = qcc.compile(model, (x0, ids0), quant=recipe, dynamic_shapes=EXPERT_TOKENS)
    assert not slow.manifest["cpu"]["kernels"]
    xs, ids = torch.from_numpy(x), torch.from_numpy(ids)
    np.testing.assert_array_equal(compiled(xs, ids).numpy(), slow(xs, ids).numpy())


def build_kernel(tmp_path, lay, cfg, act_levels):
    """The fused kernel alone (x f32 and the packed arrays in, y out) as a shared library."""
    from torch_mlir import ir

    from qcc.backends.cpu import host, int_kernels, lowering
    from qcc.backends.cpu.runtime import CpuLibrary
    from qcc.context import make_context
    from qcc.params import ParamStore
    from qcc.pipeline import Session, run_pipeline

    elem = {"int8": "i8", "uint8": "i8", "float32": "f32"}
    tt = {r: f"tensor<{'x'.join(map(str, s))}x{elem[np.dtype(d).name]}>" for r, (s, d) in lay.shapes().items()}
    main = (f"func.func @main(%x: tensor<?x{lay.k}xf32>, {', '.join(f'%{r}: {t}' for r, t in tt.items())}) "
            f"-> tensor<?x{lay.n}xf32> {{\n  %y = func.call @fused(%x, {', '.join('%' + r for r in tt)}) : "
            f"(tensor<?x{lay.k}xf32>, {', '.join(tt.values())}) -> tensor<?x{lay.n}xf32>\n"
            f"  return %y : tensor<?x{lay.n}xf32>\n}}\n")
    openmp = host.openmp_runtime() if cfg.threads else None
    with make_context(), ir.Location.unknown():
        module = ir.Module.parse(main + int_kernels.fused("fused", lay, cfg, act_levels))
        lowering.mark_entry(module)
        run_pipeline(module, ["inline", "canonicalize", "cse"] + lowering.BUFFERIZE + lowering.TO_LLVM,
                     Session(ParamStore()), "int-kernel-test")
        so = str(tmp_path / "fused.so")
        lowering.emit_shared_library(module, so, openmp=openmp)
    return CpuLibrary(so)


KERNEL_CASES = [
    # weight format, activation format, N, K, config
    ("int4_asym_g128", "int4_sym_token", 21, 256, {}),
    ("int4_sym_g32", "int8_sym_token", 30, 96, {"gemm_min_m": 2, "gemm_mr_int4": 4, "gemm_nr_int4": 1,
                                               "gemm_mr_int4_vnni": 3, "gemm_nr_int4_vnni": 2}),
    ("int4_sym_channel", "int8_sym_token", 9, 200, {"threads": False}),
    ("int8_sym_tensor", "int8_sym_token", 44, 72, {"int8_quads": 8, "gemm_mr": 3, "gemm_mr_vnni": 3,
                                                   "chunk_blocks": 4}),
    ("int8_sym_channel", "int4_sym_token", 17, 64, {"gemv_nr": 2, "gemm_nr": 4, "gemm_mr": 1, "gemm_nr_vnni": 4,
                                                    "gemm_mr_vnni": 1}),
    ("int8_sym_channel", "int8_sym_token", 70, 160, {"gemm_mr_vnni": 6, "gemm_nr_vnni": 4, "int8_quads": 2}),
    # rows of quantized x a multiple of 1 KB: padded by a cache line (IntLayout.x_words)
    ("int4_asym_g128", "int8_sym_token", 24, 1024, {}),
    ("int8_sym_channel", "int8_sym_token", 16, 1024, {}),
]
# only the vnni form has kernels for these (unsigned int8 codes saturate vpmaddubsw's i16 pairs)
VNNI_ONLY_CASES = [
    ("int8_asym_channel", "int8_sym_token", 19, 100, {}),
    ("int8_sym_g32", "int8_sym_token", 24, 96, {"gemm_mr_vnni": 2}),
    ("int8_asym_g64", "int4_sym_token", 33, 128, {"int8_quads": 4}),
]


@pytest.mark.parametrize("dot_form", DOTS)
@pytest.mark.parametrize("wkey,akey,n,k,cfg", KERNEL_CASES + VNNI_ONLY_CASES,
                         ids=[f"{c[0]}-{c[1]}-{c[2]}x{c[3]}" for c in KERNEL_CASES + VNNI_ONLY_CASES])
def test_kernel_formats_and_tilings(tmp_path, wkey, akey, n, k, cfg, dot_form):
    """Formats and activation formats no preset uses, and other tilings of the generator."""
    from qcc.backends.cpu.int_kernels import IntKernelConfig

    rng = np.random.default_rng(n + k)
    w = rng.standard_normal((n, k)).astype(np.float32)
    qt = formats.parse_weight_format(wkey).quantize(w)
    lay = int_pack.IntLayout(wkey, n, k, dot=dot_form)
    if (wkey, akey, n, k, cfg) in VNNI_ONLY_CASES and dot_form == "avx2":
        with pytest.raises(int_pack.IntLayoutError):
            lay.check()
        return
    arrays = int_pack.pack(lay, formats.pack(qt), qt.scale, qt.zero)
    config = IntKernelConfig(**cfg)
    lib = build_kernel(tmp_path, lay, config, activation.parse_act_format(akey).levels())
    for m in (1, 2, 5, 8, 13):
        x = rng.standard_normal((m, k)).astype(np.float32)
        y = np.full((m, n), np.nan, np.float32)
        lib.call([x] + [arrays[r] for r in lay.shapes()], [y])
        ref = oracle(x, w, wkey, akey)
        err = np.abs(y - ref).max() / np.abs(ref).max()
        assert err < 1e-5, f"M={m} ({config.variant(m)}): relative error {err}"


@pytest.mark.parametrize("m,variant", [(1, "gemv"), (6, "gemm")])
def test_static_m_builds_one_kernel(m, variant):
    k, n = 128, 16
    lin = _linear(k, n, seed=2)
    x = torch.randn(m, k)
    compiled = qcc.compile(lin, (x,), quant="w4a8-g128")
    assert _selected(compiled)["variant"] == variant
    ref = oracle(x.numpy(), lin.weight.detach().numpy(), *RECIPES["w4a8-g128"])
    assert np.abs(compiled(x).numpy() - ref).max() / np.abs(ref).max() < 1e-5


def test_host_without_avx2_uses_the_reference(monkeypatch):
    monkeypatch.setenv("QCC_CPU_ISA", "generic")
    k, n = 64, 8
    lin = _linear(k, n, seed=3)
    compiled = qcc.compile(lin, (torch.randn(3, k),), quant="w8a8")
    assert not compiled.manifest["cpu"]["kernels"]
    x = torch.randn(3, k)
    ref = oracle(x.numpy(), lin.weight.detach().numpy(), *RECIPES["w8a8"])
    assert np.abs(compiled(x).numpy() - ref).max() / np.abs(ref).max() < 1e-5


@pytest.mark.parametrize("key,dot_form", [(key, "avx2") for key in (
    "int8_sym_channel", "int8_sym_tensor", "int4_asym_g128", "int4_sym_g32", "int4_asym_channel")] + [
    (key, "vnni") for key in ("int8_sym_channel", "int8_asym_channel", "int8_sym_g128", "int4_asym_g128")])
def test_pack_roundtrip_is_exact(key, dot_form):
    rng = np.random.default_rng(5)
    fmt = formats.parse_weight_format(key)
    n, k = 13, 256 if fmt.granularity == "group" else 100
    qt = fmt.quantize(rng.standard_normal((n, k)).astype(np.float32))
    lay = int_pack.IntLayout(key, n, k, dot=dot_form)
    arrays = int_pack.pack(lay, formats.pack(qt), qt.scale, qt.zero)
    assert_packed_roundtrip(lay, arrays, int_pack.unpack, qt)


def test_block_layout_by_hand():
    """int8: byte 16h + 2j + i of block b, quad q is w[8b + j, 4q + 2h + i];
    int4: byte 4j + i of pair t holds k = 8t + i (low nibble) and 8t + 4 + i (high)."""
    n, k = 16, 64
    w8 = (np.arange(n * k).reshape(n, k) % 251 - 125).astype(np.int8)
    lay = int_pack.IntLayout("int8_sym_channel", n, k)
    qt = formats.QuantizedTensor(codes=w8, scale=np.ones((n, 1), np.float32), zero=None,
                                 format=lay.fmt, shape=(n, k))
    codes = int_pack.pack(lay, formats.pack(qt), qt.scale)["codes"]
    for b, q, h, j, i in [(0, 0, 0, 0, 0), (1, 3, 1, 5, 1), (0, 15, 1, 7, 0)]:
        assert codes[b, q, 16 * h + 2 * j + i] == w8[8 * b + j, 4 * q + 2 * h + i]
    w4 = (np.arange(n * k).reshape(n, k) * 7 % 16).astype(np.uint8)
    lay = int_pack.IntLayout("int4_asym_channel", n, k)
    qt = formats.QuantizedTensor(codes=w4, scale=np.ones((n, 1), np.float32), zero=np.zeros((n, 1), np.uint8),
                                 format=lay.fmt, shape=(n, k))
    codes = int_pack.pack(lay, formats.pack(qt), qt.scale, qt.zero)["codes"]
    for b, t, j, i in [(0, 0, 0, 0), (1, 5, 3, 2), (1, 7, 7, 3)]:
        byte = codes[b, t, 4 * j + i]
        assert byte & 15 == w4[8 * b + j, 8 * t + i] and byte >> 4 == w4[8 * b + j, 8 * t + 4 + i]
    # vnni int8: byte 4j + i of block b, quad q is w[8b + j, 4q + i] + 128 (unsigned), zero point 128
    lay = int_pack.IntLayout("int8_sym_channel", n, k, dot="vnni")
    qt = formats.QuantizedTensor(codes=w8, scale=np.ones((n, 1), np.float32), zero=None,
                                 format=lay.fmt, shape=(n, k))
    arrays = int_pack.pack(lay, formats.pack(qt), qt.scale)
    assert arrays["codes"].dtype == np.uint8 and (arrays["zero"] == 128).all()
    for b, q, j, i in [(0, 0, 0, 0), (1, 3, 5, 1), (0, 15, 7, 3)]:
        assert int(arrays["codes"][b, q, 4 * j + i]) == int(w8[8 * b + j, 4 * q + i]) + 128


def test_no_float_copy_of_a_weight_and_integer_instructions(tmp_path, dot):
    """No f32 buffer as large as a weight in any backend stage; the library's kernels use
    vpdpbusd (vnni), else vpmaddwd (int8) / vpmaddubsw (int4) or, on a host with VNNI, the
    instructions LLVM fuses them into with the add after them (vpdpwssd / vpdpbusd)."""
    model = torch.nn.Sequential(torch.nn.Linear(320, 448), torch.nn.ReLU(), torch.nn.Linear(448, 192)).eval()
    dump = tmp_path / "ir"
    compiled = qcc.compile(model, (torch.randn(3, 320),), quant="w8a8", dump_dir=str(dump), dynamic_shapes=TOKENS)
    assert len(compiled.manifest["cpu"]["kernels"]) == 2
    smallest_weight = min(320 * 448, 448 * 192)
    shaped = re.compile(r"(?:memref|tensor)<((?:\d+x)+)f32")
    stages = sorted(p for p in os.listdir(dump) if re.search(r"select-kernels|lower-qcc|bufferize|to-llvm", p))
    assert len(stages) == 4
    for stage in stages:
        for m in shaped.finditer((dump / stage).read_text()):
            numel = int(np.prod([int(d) for d in m.group(1).rstrip("x").split("x")]))
            assert numel < smallest_weight, f"{stage}: float buffer {m.group(0)}> as large as a weight"
    if shutil.which("objdump") is None:
        pytest.skip("no objdump")
    lib = tmp_path / "cpu.so"
    lib.write_bytes(compiled.code["cpu.so"])
    text = subprocess.run(["objdump", "-d", str(lib)], capture_output=True, text=True, check=True).stdout
    gemm = text[text.index("__gemm_body>:"):]
    assert re.search(r"\bvpdpbusd\b" if dot == "vnni" else r"\bvp(maddwd|dpwssd)\b", gemm[:gemm.index("\n\n")])
    int4 = qcc.compile(torch.nn.Linear(128, 16, bias=False).eval(), (torch.randn(2, 128),), quant="w4a8-g128",
                       dynamic_shapes=TOKENS)
    lib.write_bytes(int4.code["cpu.so"])
    text = subprocess.run(["objdump", "-d", str(lib)], capture_output=True, text=True, check=True).stdout
    gemm = text[text.index("__gemm_body>:"):]
    assert re.search(r"\bvp(maddubsw|dpbusd)\b", gemm[:gemm.index("\n\n")])


def test_sums_that_could_overflow_i32_have_no_kernel():
    """255 * 128 * K must stay below 2^31 for vnni's unsigned int8 codes (K < 65794); avx2's
    signed codes allow twice that, int4 nibbles far more."""
    with pytest.raises(int_pack.IntLayoutError, match="overflow"):
        int_pack.IntLayout("int8_sym_channel", 8, 65824, dot="vnni").check()
    int_pack.IntLayout("int8_sym_channel", 8, 65824, dot="avx2").check()
    int_pack.IntLayout("int4_asym_channel", 8, 65824, dot="vnni").check()
