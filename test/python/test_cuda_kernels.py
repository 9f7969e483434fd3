"""CUDA backend: kernel IR, PTX/ptxas, weight layouts, CPU emulation, GPU runs.

On a machine without a GPU the kernels' logic runs in the numpy SIMT emulator
(qcc.backends.cuda.simt) -- the same builder code that emits the MLIR, executed
per thread with mma.sync/shuffle semantics -- and every kernel is assembled by
ptxas for sm_90a and sm_80 and must not spill. GPU tests skip without a device.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from qcc.backends.cuda import emit, kernels, pack, simt
from qcc.backends.cuda.kernels import KernelConstraintError

CUDA_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                        "backends", "cuda")


def rel(y, ref):
    y = np.asarray(y, np.float64)
    assert np.isfinite(y).all(), "output has unwritten (NaN) or non-finite elements"
    return float(np.linalg.norm(y - ref) / np.linalg.norm(ref))


def w4_case(rng, K, N, G, zero_point=True):
    w = rng.standard_normal((N, K)).astype(np.float32)
    return pack.quantize_w4(w, G, symmetric=not zero_point)


# --------------------------------------------------------------------------- layouts


@pytest.mark.parametrize("K,N", [(128, 8), (512, 32), (1024, 24)])
def test_pack_w4_roundtrip_and_lane_map(K, N):
    rng = np.random.default_rng(0)
    packed = rng.integers(0, 256, (N, K // 2), dtype=np.uint8)
    nib = pack.unpack_int4(packed)
    assert (pack.pack_int4(nib) == packed).all()
    assert (nib[:, 0] == packed[:, 0] & 0xF).all() and (nib[:, 1] == packed[:, 0] >> 4).all()
    P = pack.pack_w4a16(packed, np.ones((N, K // 128), np.float32), None, 128)
    assert P["wq"].dtype == np.uint32 and P["wq"].shape == (N // 8, K // 128, 32, 4)
    assert (pack.unpack_w4a16_nibbles(P["wq"], K, N) == nib).all()
    # independent spelling of the documented layout, element by element
    for tn, kt, lane, wi, p in [(0, 0, 0, 0, 0), (0, 0, 5, 1, 4), (N // 8 - 1, K // 128 - 1, 31, 3, 7),
                                (N // 8 - 1, 0, 18, 2, 3)]:
        g, t = lane // 4, lane % 4
        col = kt * 128 + 32 * t + 8 * wi + 2 * (p % 4) + p // 4
        word = int(P["wq"][tn, kt, lane, wi])
        assert (word >> (4 * p)) & 0xF == nib[8 * tn + g, col]


def test_pack_w4_meta_layouts():
    rng = np.random.default_rng(1)
    K, N, G = 512, 16, 128
    packed, s, z = w4_case(rng, K, N, G)
    P = pack.pack_w4a16(packed, s, z, G)
    assert P["scales"].shape == (N // 8, K // G, 8) and P["zeros"].shape == (N // 8, K // G, 8)
    assert P["scales"][1, 2, 3] == s[8 + 3, 2] and P["zeros"][1, 2, 3] == z[8 + 3, 2]
    Pw = pack.pack_w4a16(*w4_case(rng, K, N, 64), 64)  # G < 128: f16 (1024 + zero, scale)
    assert Pw["meta"].dtype == np.float16 and Pw["meta"].shape == (N // 8, K // 64, 8, 2)
    with pytest.raises(pack.LayoutError, match="acc"):
        pack.pack_w4a16(*w4_case(rng, K, N, 64), 64, scale_mode="acc")
    with pytest.raises(pack.LayoutError, match=r"\[N, K/G\]"):
        pack.pack_w4a16(packed, s, z, 64)


def test_pack_w8_roundtrip_and_bytes():
    rng = np.random.default_rng(2)
    K, N = 256, 16
    q = rng.integers(-128, 128, (N, K), dtype=np.int8)
    P = pack.pack_w8a16(q, np.ones((N, 1), np.float32))
    assert (pack.unpack_w8a16(P["wq"], K, N) == q).all()
    wq = P["wq"].reshape(N // 8, K // 64, 32, 4, 4)
    tn, kt, lane, wi = 1, 2, 13, 3
    g, t = lane // 4, lane % 4
    for b, c in enumerate((0, 2, 1, 3)):
        assert wq[tn, kt, lane, wi, b] == (int(q[8 * tn + g, kt * 64 + 16 * t + 4 * wi + c]) + 128)


def test_dequant_reference_matches_format_contract():
    rng = np.random.default_rng(3)
    packed = rng.integers(0, 256, (8, 128), dtype=np.uint8)  # K = 256
    s = rng.random((8, 2), dtype=np.float32)
    z = rng.integers(0, 16, (8, 2), dtype=np.uint8)
    W = pack.dequant_w4(packed, s, z, 128)
    n, j = 5, 70  # column 2j low nibble, 2j+1 high nibble
    assert W[n, 2 * j] == np.float32((int(packed[n, j] & 15) - int(z[n, 1])) * s[n, 1])
    assert W[n, 2 * j + 1] == np.float32((int(packed[n, j] >> 4) - int(z[n, 1])) * s[n, 1])
    assert (pack.dequant_w4(packed, s, None, 128)[0, :2] ==
            (pack.unpack_int4(packed)[0, :2].astype(np.float32) - 8) * s[0, 0]).all()


# --------------------------------------------------------------------------- emulated kernels


W4_CASES = [
    # K, N, G, M, zero_point, scale_mode, config
    (512, 32, 128, 1, True, None, dict(n_tiles=2, k_warps=2, unroll=2, m_max=8)),
    (512, 32, 128, 16, True, None, dict(n_tiles=2, k_warps=2, unroll=2)),
    (512, 32, 128, 5, True, None, dict(n_tiles=1, k_warps=1, unroll=1)),
    (1024, 32, 256, 7, True, None, dict(n_tiles=2, k_warps=2, unroll=2, m_max=8)),
    (512, 32, 64, 3, True, None, dict(n_tiles=2, k_warps=2, unroll=2)),
    (512, 32, 128, 16, False, None, dict(n_tiles=2, k_warps=4, unroll=1)),
    (512, 32, 128, 11, True, "weight", dict(n_tiles=4, k_warps=2, unroll=1)),
    (512, 32, 32, 2, False, None, dict(n_tiles=1, k_warps=4, unroll=1, w_cache="no_allocate")),
    (768, 16, 128, 16, True, None, dict(n_tiles=2, k_warps=3, unroll=2)),
    # n_warps (warps splitting N share x through L1), deeper register prefetch
    (1024, 64, 128, 16, True, None, dict(n_tiles=2, k_warps=2, unroll=1, n_warps=2, depth=3)),
    (1024, 64, 256, 5, True, None, dict(n_tiles=2, k_warps=1, unroll=2, n_warps=4, depth=4)),
    # cp.async ring for W (metadata in registers, or also through the ring)
    (1024, 64, 128, 16, True, None, dict(n_tiles=2, k_warps=2, unroll=1, stages=3)),
    (1024, 64, 128, 1, True, None, dict(n_tiles=1, k_warps=2, unroll=1, n_warps=2, stages=4, m_max=8)),
    (2048, 64, 256, 5, True, None, dict(n_tiles=2, k_warps=2, unroll=2, stages=3, meta_smem=True)),
    (1024, 64, 64, 3, True, None, dict(n_tiles=2, k_warps=2, unroll=1, stages=4, meta_smem=True)),
    (1024, 64, 128, 16, False, None, dict(n_tiles=2, k_warps=4, unroll=1, stages=5)),
    (1024, 64, 128, 9, True, None, dict(n_tiles=1, k_warps=1, unroll=1, stages=9)),  # > iterations
    # prefill: several 16-row tiles of x a warp, each dequantized weight fragment used for all
    (512, 32, 128, 37, True, None, dict(n_tiles=2, k_warps=2, unroll=1, m_max=48)),
    (1024, 64, 128, 64, False, None, dict(m_max=64)),
    (512, 32, 64, 20, True, "weight", dict(n_tiles=1, k_warps=1, unroll=2, m_max=32, stages=3)),
    # x tiles through shared memory, shared by the warps splitting N; row blocks along grid y
    (512, 64, 128, 33, True, None, dict(n_tiles=2, k_warps=1, unroll=1, n_warps=4, x_stages=2, m_max=48)),
    (1024, 32, 256, 30, True, None, dict(n_tiles=1, k_warps=1, unroll=2, n_warps=2, x_stages=2, m_max=32)),
    (1024, 32, 128, 29, True, None, dict(n_tiles=1, k_warps=2, unroll=1, n_warps=2, x_stages=2, m_max=32)),
    (512, 32, 128, 100, True, None, dict(n_tiles=2, k_warps=1, unroll=1, n_warps=2, x_stages=2, m_max=128)),
    (512, 32, 128, 130, False, None, dict(n_tiles=2, k_warps=2, unroll=1, m_max=192)),
]


@pytest.mark.parametrize("K,N,G,M,zp,mode,cfg", W4_CASES)
def test_w4a16_emulated(K, N, G, M, zp, mode, cfg):
    rng = np.random.default_rng(K + N + G + M)
    spec = kernels.gemv_w4a16(K, N, G, zero_point=zp, scale_mode=mode, **cfg)
    packed, s, z = w4_case(rng, K, N, G, zp)
    P = pack.pack_w4a16(packed, s, z, G, scale_mode=spec.config["scale_mode"])
    x = rng.standard_normal((M, K)).astype(np.float16)  # exactly M rows: reads past them fail
    y = np.full((M, N), np.nan, np.float16)
    simt.run(spec, dict(x=x, y=y, M=M, **P))
    ref = x.astype(np.float64) @ pack.dequant_w4(packed, s, z, G).astype(np.float64).T
    assert rel(y, ref) < 2e-3


@pytest.mark.parametrize("K,N,G,M,zp,cfg", [
    (512, 64, 128, 37, True, dict(m_max=48)),  # 3 row tiles, a partial one
    (512, 32, 128, 100, True, dict(m_max=128, n_tiles=2, n_warps=2, m_tiles=2, x_stages=3)),  # 4 row blocks
    (1024, 64, 256, 70, True, dict(m_max=80, n_tiles=2, n_warps=2, m_tiles=2, x_stages=4)),  # 2 tiles a group
    (384, 128, 128, 16, False, dict(m_max=16, n_tiles=4, n_warps=4)),  # symmetric; slots > K tiles
    (256, 64, 128, 25, True, dict(m_max=32, x_stages=2, out_f32=False)),
    (256, 128, 128, 20, True, dict(m_max=128)),  # row blocks wholly past M skip
    (512, 64, 128, 50, True, dict(m_max=64, m_tiles=4, n_warps=4, w_smem=False, depth=3)),  # W in registers
    (1024, 32, 256, 33, False, dict(m_max=48, n_tiles=2, n_warps=2, w_smem=False)),
    (4096, 128, 128, 20, True, dict(m_max=32))])  # long K: the default takes W through registers
def test_gemm_w4a16_emulated(K, N, G, M, zp, cfg):
    """gemm_w4a16 (prefill) takes gemv_w4a16's packed weights and gives its results: fp32 y
    against float64 numpy on the dequantized weights, and within f32 rounding of the GEMV."""
    rng = np.random.default_rng(K + N + G + M)
    spec = kernels.gemm_w4a16(K, N, G, zero_point=zp, **cfg)
    packed, s, z = w4_case(rng, K, N, G, zp)
    P = pack.pack_w4a16(packed, s, z, G, scale_mode="acc")
    x = rng.standard_normal((M, K)).astype(np.float16)  # exactly M rows: reads past them fail
    yt = np.float32 if spec.config["out_f32"] else np.float16
    y = np.full((M, N), np.nan, yt)
    simt.run(spec, dict(x=x, y=y, M=M, **P))
    ref = x.astype(np.float64) @ pack.dequant_w4(packed, s, z, G).astype(np.float64).T
    assert rel(y, ref) < (1e-6 if yt == np.float32 else 2e-3)
    gemv = kernels.gemv_w4a16(K, N, G, zero_point=zp, m_max=cfg["m_max"], out_f32=spec.config["out_f32"])
    y2 = np.full((M, N), np.nan, yt)
    simt.run(gemv, dict(x=x, y=y2, M=M, **P))
    assert rel(y, y2) < (1e-6 if yt == np.float32 else 2e-3)


@pytest.mark.parametrize("K,N,G,M,zp,cfg", [
    (256, 64, 128, 20, True, dict(m_max=32, rows=16)),  # row tail in the block, 2-slot ring
    (512, 128, 128, 40, False, dict(m_max=64, rows=24, warpgroups=2)),  # two row blocks, symmetric
    (512, 64, 256, 9, True, dict(m_max=64, rows=8, x_stages=3, out_f32=False)),  # 2 K tiles a group, f16 y
    (256, 64, 128, 17, True, dict(m_max=128, rows=16)),  # row blocks wholly past M skip
    (256, 64, 128, 70, True, dict(m_max=128, rows=128)),  # a 128 KB ring
    (512, 128, 128, 30, False, dict(m_max=32, rows=32, warpgroups=2, x_stages=3, overlap=2)),
    (512, 64, 128, 21, True, dict(m_max=64, rows=24, overlap=4))])  # groups alternate between 2 sum registers
def test_gemm_w4a16_wg_emulated(K, N, G, M, zp, cfg):
    """gemm_w4a16_wg (wgmma, B = x through descriptors of the 128-byte swizzled K-major layout)
    gives gemm_w4a16's results on the same packed weights: vs float64 numpy on the dequantized
    weights and within f32 rounding of gemm_w4a16."""
    rng = np.random.default_rng(K + N + G + M)
    spec = kernels.gemm_w4a16_wg(K, N, G, zero_point=zp, **cfg)
    packed, s, z = w4_case(rng, K, N, G, zp)
    P = pack.pack_w4a16(packed, s, z, G, scale_mode="acc", order=pack.w4_order("gemm_w4a16_wg"))
    x = rng.standard_normal((M, K)).astype(np.float16)
    yt = np.float32 if spec.config["out_f32"] else np.float16
    y = np.full((M, N), np.nan, yt)
    simt.run(spec, dict(x=x, y=y, M=M, **P))
    ref = x.astype(np.float64) @ pack.dequant_w4(packed, s, z, G).astype(np.float64).T
    assert rel(y, ref) < (1e-6 if yt == np.float32 else 2e-3)
    mma = kernels.gemm_w4a16(K, N, G, zero_point=zp, m_max=cfg["m_max"], n_tiles=2, n_warps=4,
                             out_f32=spec.config["out_f32"])
    y2 = np.full((M, N), np.nan, yt)
    simt.run(mma, dict(x=x, y=y2, M=M, **pack.pack_w4a16(packed, s, z, G, scale_mode="acc")))
    assert rel(y, y2) < (1e-6 if yt == np.float32 else 2e-3)


@pytest.mark.parametrize("K,N,M,cfg", [(256, 32, 1, dict(n_tiles=2, k_warps=2, unroll=1)),
                                       (512, 64, 16, dict(n_tiles=1, k_warps=4, unroll=2)),
                                       (512, 64, 9, {}),
                                       (256, 16, 3, dict(m_max=8, w_cache="no_allocate_256")),
                                       (1024, 64, 16, dict(n_tiles=2, k_warps=2, unroll=2, stages=3)),
                                       (1024, 64, 7, dict(n_tiles=2, k_warps=1, unroll=1, n_warps=4,
                                                          stages=4)),
                                       (512, 64, 45, dict(m_max=48, n_tiles=1, k_warps=2, unroll=2)),
                                       # 384 x chunks a stage over 256 threads: a guarded copy round
                                       (256, 64, 47, dict(m_max=48, n_tiles=1, k_warps=1, unroll=1,
                                                          n_warps=8, x_stages=2)),
                                       (512, 64, 80, dict(m_max=80, x_stages=2))])
def test_w8a16_emulated(K, N, M, cfg):
    rng = np.random.default_rng(K + M)
    spec = kernels.gemv_w8a16(K, N, **cfg)
    q, s = pack.quantize_w8(rng.standard_normal((N, K)))
    P = pack.pack_w8a16(q, s)
    x = rng.standard_normal((M, K)).astype(np.float16)
    y = np.full((M, N), np.nan, np.float16)
    simt.run(spec, dict(x=x, y=y, M=M, **P))
    assert rel(y, x.astype(np.float64) @ pack.dequant_w8(q, s).T) < 2e-3


@pytest.mark.parametrize("M,m_max,K,N", [(5, 8, 272, 12), (16, 16, 1024, 8), (1, 1, 32, 4), (3, 16, 2048, 6)])
def test_i8_emulated_exact(M, m_max, K, N):
    """gemv_i8 gives the exact i32 sums (dp4a), rows past M untouched; K not a multiple of
    the warp's 512-byte step; extreme codes (-128 * -128 products)."""
    rng = np.random.default_rng(M * K)
    spec = kernels.gemv_i8(K, N, m_max=m_max)
    xq = rng.integers(-128, 128, (m_max, K)).astype(np.int8)
    xq[0, :8] = -128
    q = rng.integers(-127, 128, (N, K)).astype(np.int8)
    y = np.full((m_max, N), -7, np.int32)
    simt.run(spec, dict(x=xq, wq=q, y=y, M=M))
    ref = xq[:M].astype(np.int64) @ q.astype(np.int64).T
    assert np.array_equal(y[:M], ref)
    assert (y[M:] == -7).all()
    # scaled: (f32(acc) * sx) * sw in f32, the order of the reference lowering's scale generic
    sx = (rng.random((m_max, 1)) * 0.01 + 1e-3).astype(np.float32)
    sw = (rng.random((N, 1)) * 0.01 + 1e-3).astype(np.float32)
    for mode, sxs in (("row", sx), ("tensor", sx[:1])):
        spec = kernels.gemv_i8(K, N, m_max=m_max, scaled=mode)
        yf = np.full((m_max, N), np.nan, np.float32)
        simt.run(spec, dict(x=xq, wq=q, sx=sxs, sw=sw, y=yf, M=M))
        expect = (ref.astype(np.float32) * (sxs[:M] if mode == "row" else sxs[0])) * sw.reshape(1, N)
        assert np.array_equal(yf[:M], expect) and np.isnan(yf[M:]).all()


@pytest.mark.parametrize("M,m_max,K,N,cfg", [
    (37, 64, 256, 64, dict(n_tiles=2, n_warps=4)),  # one block of 64 rows, 27 of them past M
    (100, 128, 512, 128, dict(n_tiles=1, n_warps=8, unroll=2, x_stages=2)),  # 2 row blocks
    (20, 32, 192, 32, dict(n_tiles=1, n_warps=4, m_tiles=1, depth=3)),  # 16-row blocks, 3 K tiles
    (70, 80, 128, 64, dict(n_tiles=2, n_warps=2, x_stages=4)),  # more ring slots than K tiles
    (5, 32, 256, 96, dict(n_tiles=1, n_warps=3)),  # 96 threads copy 128 chunks: a guarded round
    (50, 64, 512, 64, dict(n_tiles=2, n_warps=2, w_smem=True, x_stages=4)),  # W through the ring too
    (33, 64, 384, 64, dict(n_tiles=1, n_warps=4, unroll=2, w_smem=True)),
    (40, 48, 512, 64, dict(n_tiles=2, n_warps=2, k_warps=2)),  # K split over warps, sums handed over
    (17, 32, 768, 32, dict(n_tiles=1, n_warps=2, k_warps=3, unroll=2, w_smem=True, x_stages=2))])
def test_gemm_i8_emulated_exact(M, m_max, K, N, cfg):
    """The tensor-core GEMM (mma.sync m16n8k32 s8 on a permuted K) gives gemv_i8's exact i32
    sums, and its scaled epilogue gemv_i8's f32 bits."""
    def gemv_scaled(mode, xq, q, s, sw):
        want = np.full((M, N), np.nan, np.float32)
        for r0 in range(0, M, 16):  # gemv_i8 takes 16 rows a launch
            r1 = min(M, r0 + 16)
            part = np.full((r1 - r0, N), np.nan, np.float32)
            simt.run(kernels.gemv_i8(K, N, m_max=16, scaled=mode),
                     dict(x=xq[r0:r1], wq=q, sx=s if mode == "tensor" else s[r0:r1], sw=sw, y=part, M=r1 - r0))
            want[r0:r1] = part
        return want
    _check_int_gemm(M, K, N, lambda scaled: kernels.gemm_i8(K, N, m_max=m_max, scaled=scaled, **cfg), gemv_scaled)


def _check_int_gemm(M, K, N, spec_of, scaled_ref):
    """spec_of(scaled) -> the kernel: its unscaled sums equal int64 numpy's, its scaled
    epilogue (row and tensor scales) scaled_ref(mode, xq, q, sx, sw)'s f32 bits."""
    rng = np.random.default_rng(M + K)
    xq = rng.integers(-128, 128, (M, K)).astype(np.int8)
    q = rng.integers(-127, 128, (N, K)).astype(np.int8)
    y = np.full((M, N), -7, np.int32)
    simt.run(spec_of(None), dict(x=xq, wq=q, y=y, M=M))
    assert np.array_equal(y, xq.astype(np.int64) @ q.astype(np.int64).T)
    sx = (rng.random(M) * 0.01 + 1e-3).astype(np.float32)
    sw = (rng.random(N) * 0.01 + 1e-3).astype(np.float32)
    for mode, s in (("row", sx), ("tensor", sx[:1])):
        got = np.full((M, N), np.nan, np.float32)
        simt.run(spec_of(mode), dict(x=xq, wq=q, sx=s, sw=sw, y=got, M=M))
        assert np.array_equal(got.view(np.uint32), scaled_ref(mode, xq, q, s, sw).view(np.uint32)), mode


@pytest.mark.parametrize("builder,cfg", [("gemm_i8", dict(n_tiles=1, n_warps=4)), ("gemm_i8_wg", dict(rows=16))])
def test_gemm_i8_stacked_members_emulated_exact(builder, cfg):
    """members=: q/k/v's three layers in one launch, each on its own codes, scales and y,
    equal bit for bit to gemm_i8 on each layer alone."""
    rng = np.random.default_rng(5)
    M, K, members = 40, 256, (128, 64, 64)
    xq = rng.integers(-128, 128, (M, K)).astype(np.int8)
    sx = (rng.random(M) * 0.01 + 1e-3).astype(np.float32)
    args = dict(x=xq, sx=sx, M=M)
    for i, n in enumerate(members):
        args.update({f"wq{i}": rng.integers(-127, 128, (n, K)).astype(np.int8),
                     f"sw{i}": (rng.random(n) * 0.01 + 1e-3).astype(np.float32),
                     f"y{i}": np.full((M, n), np.nan, np.float32)})
    simt.run(getattr(kernels, builder)(K, sum(members), m_max=48, scaled="row", members=members, **cfg), args)
    for i in range(len(members)):
        y = np.full_like(args[f"y{i}"], np.nan)
        simt.run(kernels.gemm_i8(K, members[i], m_max=48, n_tiles=1, n_warps=4, scaled="row"),
                 dict(x=xq, wq=args[f"wq{i}"], sx=sx, sw=args[f"sw{i}"], y=y, M=M))
        assert np.array_equal(y.view(np.uint32), args[f"y{i}"].view(np.uint32))


@pytest.mark.parametrize("M,m_max,K,N,cfg", [
    (37, 64, 256, 64, dict(rows=64, warpgroups=1, x_stages=3)),  # 27 rows past M
    (100, 128, 512, 256, dict(rows=32, warpgroups=2, x_stages=4)),  # 4 row blocks, 2 warpgroups
    (20, 32, 1536, 128, dict(rows=16, x_stages=5)),  # 12 tiles: 3 iterations of 4
    (70, 80, 640, 128, dict(rows=48, warpgroups=2, x_stages=3)),  # 5 tiles: 1-tile iterations
    (45, 48, 768, 64, dict(rows=24, x_stages=6)),  # a 24-row block: 3 atoms; 6 tiles, iterations of 2
    (5, 8, 256, 64, dict(rows=8)),
    (130, 256, 256, 128, {})])  # the defaults
def test_gemm_i8_wg_emulated_exact(M, m_max, K, N, cfg):
    """gemm_i8_wg (s8 wgmma, A and B through 128-byte swizzled shared-memory descriptors)
    gives the exact i32 sums, and its scaled epilogue gemm_i8's f32 bits."""
    def gemm_scaled(mode, xq, q, s, sw):
        want = np.full((M, N), np.nan, np.float32)
        simt.run(kernels.gemm_i8(K, N, m_max=-(-m_max // 16) * 16, n_tiles=1, n_warps=4, scaled=mode),
                 dict(x=xq, wq=q, sx=s, sw=sw, y=want, M=M))
        return want
    _check_int_gemm(M, K, N, lambda scaled: kernels.gemm_i8_wg(K, N, m_max=m_max, scaled=scaled, **cfg), gemm_scaled)


def test_gemm_i8_wg_constraints():
    with pytest.raises(KernelConstraintError, match="int8 weights"):
        kernels.gemm_i8_wg(256, 64, w_bits=4)
    with pytest.raises(KernelConstraintError, match="multiple of 64"):
        kernels.gemm_i8_wg(256, 96)
    with pytest.raises(KernelConstraintError, match="rows must be"):
        kernels.gemm_i8_wg(256, 64, rows=40)
    with pytest.raises(KernelConstraintError, match="K % 128"):
        kernels.gemm_i8_wg(320, 64)
    with pytest.raises(KernelConstraintError, match="slots"):
        kernels.gemm_i8_wg(256, 128, rows=256, warpgroups=2, x_stages=6)


@pytest.mark.parametrize("M,m_max,K,N,w_bits,mode", [(2, 2, 256, 16, 8, "row"), (5, 8, 272, 12, 8, "tensor"),
                                                     (7, 8, 512, 8, 4, "row"), (1, 1, 64, 4, 4, "tensor")])
def test_i8_experts_emulated_exact(M, m_max, K, N, w_bits, mode):
    """gemv_i8(experts=E): row r times expert ids[r]'s codes and scales ([E, N, K] as stored,
    -1 the last expert), bit for bit the dense kernel on that expert's weight alone; rows past
    M untouched."""
    E = 5
    rng = np.random.default_rng(M * K + w_bits)
    xq = rng.integers(-128, 128, (m_max, K)).astype(np.int8)
    q = rng.integers(-127, 128, (E, N, K * w_bits // 8)).astype(np.int8)
    sx = (rng.random(m_max) * 0.01 + 1e-3).astype(np.float32)[:m_max if mode == "row" else 1]
    sw = (rng.random((E, N)) * 0.01 + 1e-3).astype(np.float32)
    ids = rng.choice([0, 2, 3, -1], m_max).astype(np.int64)
    y = np.full((m_max, N), np.nan, np.float32)
    simt.run(kernels.gemv_i8(K, N, m_max=m_max, scaled=mode, w_bits=w_bits, experts=E),
             dict(x=xq, ids=ids, wq=q, sx=sx, sw=sw, y=y, M=M))
    for r in range(M):
        one = np.full((1, N), np.nan, np.float32)
        simt.run(kernels.gemv_i8(K, N, m_max=1, scaled="tensor", w_bits=w_bits),
                 dict(x=xq[r:r + 1], wq=q[ids[r]], sx=sx[r if mode == "row" else 0:][:1], sw=sw[ids[r]], y=one,
                      M=1))
        assert np.array_equal(y[r], one[0]), r
    assert np.isnan(y[M:]).all()


@pytest.mark.parametrize("M,m_max,K,N,G,mode", [(2, 2, 256, 8, 128, "row"), (5, 8, 1024, 4, 64, "tensor")])
def test_i4_groups_experts_emulated_exact(M, m_max, K, N, G, mode):
    """gemv_i4g(experts=E): row r on expert ids[r]'s nibbles, zero points and group scales
    ([E, N, ...] as stored, -1 the last expert), bit for bit the dense kernel on that expert
    alone; rows past M untouched."""
    E = 3
    rng = np.random.default_rng(M * K)
    xq = rng.integers(-128, 128, (m_max, K)).astype(np.int8)
    nib = rng.integers(0, 16, (E, N, K)).astype(np.uint8)
    packed = (nib[..., 0::2] | (nib[..., 1::2] << 4)).astype(np.uint8).view(np.int8)
    z = rng.integers(0, 16, (E, N, K // G)).astype(np.uint8).view(np.int8)
    s = (rng.random((E, N, K // G)) * 0.01 + 1e-3).astype(np.float32)
    sx = (rng.random(m_max) * 0.01 + 1e-3).astype(np.float32)[:m_max if mode == "row" else 1]
    ids = rng.choice([0, 2, -1], m_max).astype(np.int64)
    y = np.full((m_max, N), np.nan, np.float32)
    simt.run(kernels.gemv_i4g(K, N, G, m_max=m_max, scaled=mode, experts=E),
             dict(x=xq, ids=ids, wq=packed, zp=z, sx=sx, s=s, y=y, M=M))
    for r in range(M):
        one = np.full((1, N), np.nan, np.float32)
        simt.run(kernels.gemv_i4g(K, N, G, m_max=1, scaled="tensor"),
                 dict(x=xq[r:r + 1], wq=packed[ids[r]], zp=z[ids[r]], sx=sx[r if mode == "row" else 0:][:1],
                      s=s[ids[r]], y=one, M=1))
        assert np.array_equal(y[r], one[0]), r
    assert np.isnan(y[M:]).all()


def _stacked_i8_case(rng, M, m_max, K, members, w_bits):
    """Random x codes, sx and each stacked layer's codes and sw as the arguments of a stacked
    gemv_i8 (its y's NaN), and each layer's y from a launch of its own."""
    xq = rng.integers(-128, 128, (m_max, K)).astype(np.int8)
    sx = (rng.random(m_max) * 0.01 + 1e-3).astype(np.float32)
    args, want = dict(x=xq, sx=sx, M=M), []
    for i, n in enumerate(members):
        q = rng.integers(-127, 128, (n, K * w_bits // 8)).astype(np.int8)
        sw = (rng.random(n) * 0.01 + 1e-3).astype(np.float32)
        args.update({f"wq{i}": q, f"sw{i}": sw, f"y{i}": np.full((m_max, n), np.nan, np.float32)})
        y = np.full((m_max, n), np.nan, np.float32)
        simt.run(kernels.gemv_i8(K, n, m_max=m_max, scaled="row", w_bits=w_bits),
                 dict(x=xq, wq=q, sx=sx, sw=sw, y=y, M=M))
        want.append(y)
    return args, want


@pytest.mark.parametrize("M,m_max,K,members,w_bits", [(1, 1, 256, (16, 8, 8), 8), (3, 4, 512, (24, 8), 8),
                                                       (2, 2, 256, (8, 16, 8), 4)])
def test_i8_stacked_members_emulated_exact(M, m_max, K, members, w_bits):
    """gemv_i8(members=...): the layers reading one x (q/k/v, gate/up) in one launch, each on
    its own codes and scales, results equal to one launch per layer bit for bit."""
    rng = np.random.default_rng(K + len(members))
    args, want = _stacked_i8_case(rng, M, m_max, K, members, w_bits)
    spec = kernels.gemv_i8(K, sum(members), m_max=m_max, scaled="row", w_bits=w_bits, members=members)
    assert spec.grid[0] == sum(members) // (spec.config["n_rows"] * spec.config["warps"])
    simt.run(spec, args)
    for i, y in enumerate(want):
        assert np.array_equal(args[f"y{i}"][:M], y[:M]) and np.isnan(args[f"y{i}"][M:]).all()
        assert not np.isnan(y[:M]).any()


@pytest.mark.parametrize("M,m_max,w_bits", [(1, 1, 8), (3, 4, 4)])
def test_i8_interleaved_members_with_an_epilogue_emulated(M, m_max, w_bits):
    """gemv_i8(interleave=True, epilogue=...): a warp owns row n of both stacked layers, and
    lane 0 hands both results at (r, n) to the epilogue (here: their product plus an input at
    r * N + n, stored): the product of the plain kernels' results bit for bit."""
    rng = np.random.default_rng(7 + M)
    K, n = 256, 64
    args, want = _stacked_i8_case(rng, M, m_max, K, (n, n), w_bits)
    add = rng.standard_normal((m_max, n)).astype(np.float32)
    args.update(e_in=add, e_out=np.full((m_max, n), np.nan, np.float32))

    def epi(E, a, r, col, vals):
        p = E.const(r * n, "index") + col
        E.store(vals[0] * vals[1] + E.load(a["e_in"], p), a["e_out"], p)
    extra = [emit.Param("e_in", f"memref<{m_max * n}xf32>", "in"), emit.Param("e_out", f"memref<{m_max * n}xf32>", "out")]
    spec = kernels.gemv_i8(K, 2 * n, m_max=m_max, scaled="row", w_bits=w_bits, members=(n, n),
                           interleave=True, epilogue=(extra, epi))
    assert spec.grid[0] * spec.config["warps"] == n and spec.config["n_rows"] == 2
    simt.run(spec, args)
    assert np.array_equal(args["e_out"][:M], want[0][:M] * want[1][:M] + add[:M])
    assert np.isnan(args["e_out"][M:]).all() and np.isnan(args["y0"]).all()  # y is not stored
    with pytest.raises(KernelConstraintError, match="one member or interleave"):
        kernels.gemv_i8(K, 2 * n, scaled="row", members=(n, n), epilogue=(extra, epi))


def test_emulator_allows_branches_uniform_in_each_warp():
    """A branch on the warp index may hold shuffles; one that splits a warp may not."""
    def kernel(split):
        def body(E, v):
            tid = E.tid()
            cut = 16 if split else 32
            E.if_(E.cmp("ult", tid, E.const(cut, "index")),
                  lambda: E.store(E.shfl_xor(E.cast("index_cast", tid, "i32"), 1), v["o"], tid))
        return _tiny_spec(body, [emit.Param("o", "memref<64xi32>", "out")], block=64)
    o = np.zeros(64, np.int32)
    simt.run(kernel(False), dict(o=o))
    assert list(o[:4]) == [1, 0, 3, 2] and (o[32:] == 0).all()
    with pytest.raises(simt.SimtError, match="divergent"):
        simt.run(kernel(True), dict(o=o))


def int4_codes(rng, N, K):
    """Random int4 codes (every value -8..7 in row 0) and their bytes as quantize-weights packs
    them: two a byte along K, low nibble the even column, biased by +8."""
    codes = rng.integers(-8, 8, (N, K))
    codes[0, :16] = np.arange(-8, 8)
    nib = (codes + 8).astype(np.uint8)
    return codes, (nib[:, 0::2] | (nib[:, 1::2] << 4)).astype(np.uint8).view(np.int8)


@pytest.mark.parametrize("M,m_max,K,N", [(1, 1, 288, 12), (5, 8, 1024, 8), (3, 16, 2048, 6)])
def test_i4_weights_emulated_exact(M, m_max, K, N):
    """gemv_i8(w_bits=4) on int4 codes packed as quantize-weights packs them (two a byte
    along K, low nibble the even column, +8), every code -8..7 included: exact i32 sums."""
    rng = np.random.default_rng(M * K)
    xq = rng.integers(-128, 128, (m_max, K)).astype(np.int8)
    codes, packed = int4_codes(rng, N, K)
    y = np.full((m_max, N), -7, np.int32)
    simt.run(kernels.gemv_i8(K, N, m_max=m_max, w_bits=4), dict(x=xq, wq=packed, y=y, M=M))
    assert np.array_equal(y[:M], xq[:M].astype(np.int64) @ codes.T) and (y[M:] == -7).all()


@pytest.mark.parametrize("M,m_max,K,N,cfg", [(37, 64, 256, 64, {}), (20, 32, 384, 32, dict(n_tiles=1, n_warps=4)),
                                             (100, 128, 512, 128, dict(k_warps=2, n_tiles=1)),
                                             (70, 128, 1024, 256, dict(m_tiles=4, unroll=2, w_smem=False, k_warps=1,
                                                                       x_stages=2))])
def test_gemm_i4_weights_emulated_exact(M, m_max, K, N, cfg):
    """gemm_i8(w_bits=4): the same packed int4 codes, unpacked into even / odd column bytes with
    x's bytes split alike, on the s8 tensor cores: exact i32 sums, and the scaled epilogue's
    (f32(acc) * sx) * sw bit for bit."""
    rng = np.random.default_rng(M * K + N)
    xq = rng.integers(-128, 128, (M, K)).astype(np.int8)
    codes, packed = int4_codes(rng, N, K)
    y = np.full((M, N), -7, np.int32)
    spec = kernels.gemm_i8(K, N, m_max=m_max, w_bits=4, **cfg)
    simt.run(spec, dict(x=xq, wq=packed, y=y, M=M))
    assert np.array_equal(y, xq.astype(np.int64) @ codes.T), spec.name
    sx = (rng.random(M) * 0.01 + 1e-3).astype(np.float32)
    sw = (rng.random(N) * 0.01 + 1e-3).astype(np.float32)
    got = np.full((M, N), np.nan, np.float32)
    simt.run(kernels.gemm_i8(K, N, m_max=m_max, w_bits=4, scaled="row", **cfg),
             dict(x=xq, wq=packed, sx=sx, sw=sw, y=got, M=M))
    want = ((xq.astype(np.int64) @ codes.T).astype(np.float32) * sx[:, None]) * sw[None, :]
    assert np.array_equal(got.view(np.uint32), want.astype(np.float32).view(np.uint32))


@pytest.mark.parametrize("n,sub_rows,M,m_max", [(256, 1, 3, 4), (768, 1, 2, 2), (64, 3, 1, 1), (40, 2, 2, 2)])
def test_hadamard_rows_emulated(n, sub_rows, M, m_max):
    """hadamard_rows against the numpy fast transform (float64): powers of two, m * 2^k
    orders (seed mix), blocked rows; rows past M untouched."""
    from qcc import hadamard

    m, k = hadamard.factor(n)
    spec = kernels.hadamard_rows(n, m, k, sub_rows=sub_rows, m_max=m_max)
    x = np.random.default_rng(n).standard_normal((m_max, n * sub_rows)).astype(np.float32)
    y = np.full_like(x, np.nan)
    seed = {"seed": hadamard.seed_matrix(m).astype(np.float32)} if m > 1 else {}
    simt.run(spec, dict(x=x, y=y, M=M, **seed))
    assert rel(y[:M], hadamard.fast_transform(x[:M].astype(np.float64), n)) < 1e-6
    assert np.isnan(y[M:]).all()


@pytest.mark.parametrize("M,m_max,K,N,G", [(1, 1, 256, 12, 128), (5, 8, 1024, 8, 64), (3, 16, 4224, 6, 128),
                                           (2, 2, 384, 4, 32)])
def test_i4_groups_emulated_exact(M, m_max, K, N, G):
    """gemv_i4g: the per-group partial sums of dequant-after-gemm's grouped matmul_int,
    xq @ (nibbles - z)^T per group, exactly; more groups than lanes (K = 33 G)."""
    rng = np.random.default_rng(M * K)
    xq = rng.integers(-128, 128, (m_max, K)).astype(np.int8)
    nib = rng.integers(0, 16, (N, K)).astype(np.uint8)
    z = rng.integers(0, 16, (N, K // G)).astype(np.uint8)
    packed = (nib[:, 0::2] | (nib[:, 1::2] << 4)).astype(np.uint8).view(np.int8)
    y = np.full((m_max, N, K // G), -7, np.int32)
    simt.run(kernels.gemv_i4g(K, N, G, m_max=m_max), dict(x=xq, wq=packed, zp=z.view(np.int8), y=y, M=M))
    w = nib.astype(np.int64).reshape(N, K // G, G) - z[..., None]
    ref = np.einsum("mgj,ngj->mng", xq[:M].astype(np.int64).reshape(M, K // G, G), w)
    assert np.array_equal(y[:M], ref) and (y[M:] == -7).all()
    # scaled: the scale generic in the epilogue, (f32(sum_g) * s[n, g]) * sx[m] summed over the
    # groups as the generated warp reduction adds them (lane l: groups l, l + 32, ...; butterfly)
    s = (rng.random((N, K // G)) * 0.01 + 1e-3).astype(np.float32)
    sx = (rng.random(m_max) * 0.01 + 1e-3).astype(np.float32)
    terms = (ref.astype(np.float32) * s[None]) * sx[:M, None, None]
    lanes = np.zeros((M, N, 32), np.float32)
    for g in range(K // G):
        lanes[..., g % 32] = lanes[..., g % 32] + terms[..., g]
    for off in (16, 8, 4, 2, 1):
        lanes = lanes + lanes[..., np.arange(32) ^ off]
    yf = np.full((m_max, N), np.nan, np.float32)
    simt.run(kernels.gemv_i4g(K, N, G, m_max=m_max, scaled="row"),
             dict(x=xq, wq=packed, zp=z.view(np.int8), sx=sx, s=s, y=yf, M=M))
    assert np.array_equal(yf[:M], np.float32(0.0) + lanes[..., 0]) and np.isnan(yf[M:]).all()
    # two members (stacked layers reading x): the same results, each on its own codes
    half = N // 2
    y0, y1 = (np.full((m_max, n), np.nan, np.float32) for n in (half, N - half))
    simt.run(kernels.gemv_i4g(K, N, G, m_max=m_max, scaled="row", members=(half, N - half), n_rows=1, warps=1),
             dict(x=xq, wq0=packed[:half], wq1=packed[half:], zp0=z[:half].view(np.int8), zp1=z[half:].view(np.int8),
                  sx=sx, s0=s[:half], s1=s[half:], y0=y0, y1=y1, M=M))
    assert np.array_equal(np.concatenate([y0, y1], 1)[:M], yf[:M])
    if N % 2:
        return
    # interleaved with an epilogue (fuse_epilogues): a warp owns row n of both; product stored
    out = np.full((m_max, half), np.nan, np.float32)

    def epi(E, a, r, col, vals):
        E.store(vals[0] * vals[1], a["e_out"], E.const(r * half, "index") + col)
    spec = kernels.gemv_i4g(K, N, G, m_max=m_max, scaled="row", members=(half, half), interleave=True,
                            epilogue=([emit.Param("e_out", f"memref<{m_max * half}xf32>", "out")], epi))
    assert spec.config["n_rows"] == 2 and spec.grid[0] * spec.config["warps"] == half
    simt.run(spec, dict(x=xq, wq0=packed[:half], wq1=packed[half:], zp0=z[:half].view(np.int8),
                        zp1=z[half:].view(np.int8), sx=sx, s0=s[:half], s1=s[half:], y0=y0, y1=y1, M=M,
                        e_out=out))
    assert np.array_equal(out[:M], yf[:M, :half] * yf[:M, half:]) and np.isnan(out[M:]).all()


@pytest.mark.parametrize("M,m_max,K,N,dense", [(1, 1, 272, 12, False), (5, 8, 1024, 8, False),
                                                 (3, 8, 512, 6, True), (2, 2, 2048, 16, False)])
def test_sparse_x_emulated(M, m_max, K, N, dense):
    """gemv_w8_sparse_x against float64: x with a few non-zero columns (one of them -0.0 in
    a row), or dense; rows past M untouched."""
    rng = np.random.default_rng(M * K)
    spec = kernels.gemv_w8_sparse_x(K, N, m_max=m_max)
    x = rng.standard_normal((m_max, K)).astype(np.float32)
    if not dense:
        cols = rng.choice(K, 5, replace=False)
        keep = np.zeros(K, np.float32)
        keep[cols] = 1.0
        x = x * keep
        x[0, cols[0]] = -0.0
    q = rng.integers(-127, 128, (N, K)).astype(np.int8)
    scales = (rng.random(N) * 0.01 + 1e-3).astype(np.float32)
    y = np.full((m_max, N), np.nan, np.float32)
    simt.run(spec, dict(x=x, wq=q, scales=scales, y=y, M=M))
    assert rel(y[:M], x[:M].astype(np.float64) @ (q.astype(np.float64) * scales[:, None]).T) < 1e-6
    assert np.isnan(y[M:]).all()


@pytest.mark.parametrize("M,m_max,K,key", [(1, 1, 272, "int8_sym_token"), (5, 8, 1024, "int8_sym_token"),
                                            (3, 16, 516, "int4_sym_token_clip0.9"), (2, 2, 128, "int8_sym_token"),
                                            (37, 40, 64, "int8_sym_token")])
def test_quantize_rows_emulated_matches_format_reference(M, m_max, K, key):
    """quantize_rows gives the codes and scales of the format's numpy reference, bit for bit
    (an all-zero row too: scale 1); rows past M untouched; a prefill's rows in one launch."""
    from qcc.dialects.formats import activation

    fmt = activation.parse_act_format(key)
    qmin, qmax = fmt.levels()
    spec = kernels.quantize_rows(K, qmin=qmin, qmax=qmax, clip=fmt.clip, m_max=m_max)
    rng = np.random.default_rng(M * K)
    x = (rng.standard_normal((m_max, K)) * 3).astype(np.float32)
    x[min(1, M - 1)] = 0.0
    y = np.full((m_max, K), 99, np.int8)
    scale = np.full(m_max, np.nan, np.float32)
    simt.run(spec, dict(x=x, y=y, scale=scale, M=M))
    codes, s = activation.quantize_act(x[:M], fmt)
    assert np.array_equal(y[:M], codes) and np.array_equal(scale[:M], np.asarray(s, np.float32).reshape(M))
    assert (y[M:] == 99).all() and np.isnan(scale[M:]).all()


def _tiny_spec(body, params, block=32, grid=1, smem=()):
    return emit.KernelSpec("t", params, (block, 1, 1), (grid, 1, 1), body, list(smem))


@pytest.mark.parametrize("transposed", [False, True])
def test_row_fusion_needs_row_local_accesses(transposed):
    """Two elementwise launches over [32, 64]: b = 2a, then c = b + 1 reading b as is (row r
    of c needs only row r of b: one launch of 32 blocks) or through a transposed map (row r
    of c needs a column of b, written by every block: kept as two launches)."""
    from qcc.backends.cuda import fuse_launches, linalg_kernels as lk

    R, K = 32, 64
    ident, trans = [("d", 0), ("d", 1)], [("d", 1), ("d", 0)]

    def view(m=ident):
        return lk.Operand("f32", (R, K) if m is ident else (K, R), (K, 1) if m is ident else (R, 1), m)
    two = lk.BodyOp("arith.constant", [], ["f32"], "value = 2.0 : f32", {"value": 2.0})
    one = lk.BodyOp("arith.constant", [], ["f32"], "value = 1.0 : f32", {"value": 1.0})
    d1 = lk.GenericDesc([R, K], ["parallel"] * 2, [view()], [view()],
                        [two, lk.BodyOp("arith.mulf", [("arg", 0), ("op", 0, 0)], ["f32"])], [("op", 1, 0)])
    d2 = lk.GenericDesc([R, K], ["parallel"] * 2, [view(trans if transposed else ident)], [view()],
                        [one, lk.BodyOp("arith.addf", [("arg", 0), ("op", 0, 0)], ["f32"])], [("op", 1, 0)])
    specs, descs, launches = {}, {}, []
    for d, (src, dst) in zip((d1, d2), ((0, 1), (1, 2))):
        sp = lk.build_kernel(d)
        specs[sp.name], descs[sp.name] = sp, d
        launches.append({"kernel": sp.name, "grid": list(sp.grid), "block": list(sp.block),
                         "args": [{"buf": src, "offset": 0}, {"buf": dst, "offset": 0}], "writes": [dst]})
    buffers = [{"id": i, "kind": "temp", "bytes": R * K * 4} for i in range(3)]
    out = fuse_launches.fuse_row_launches(launches, specs, descs, buffers)
    if transposed:
        assert out == launches
        return
    (L,) = out
    assert L["grid"] == [R, 1, 1] and L["writes"] == [1, 2]
    a = np.random.default_rng(0).standard_normal((R, K)).astype(np.float32)
    b, c = np.full_like(a, np.nan), np.full_like(a, np.nan)
    spec = specs[L["kernel"]]
    simt.run(spec, {p.name: arr for p, arr in zip(spec.params, (a, b, b, c))})
    assert np.array_equal(c, a * 2 + 1)


def test_emulator_mma_fragment_layout():
    """mma_f16 against numpy with operands scattered per the PTX fragment tables."""
    rng = np.random.default_rng(4)
    A = rng.standard_normal((16, 16)).astype(np.float16)
    B = rng.standard_normal((16, 8)).astype(np.float16)
    lane = np.arange(32)
    g, t = lane // 4, lane % 4
    e = np.arange(2)[None, :]
    r0, r1, c0 = g[:, None], g[:, None] + 8, 2 * t[:, None] + e
    a = np.stack([A[r0, c0], A[r1, c0], A[r0, c0 + 8], A[r1, c0 + 8]], 1)  # [32, 4, 2]
    b = np.stack([B[2 * t + np.arange(2)[:, None], g].T, B[2 * t + 8 + np.arange(2)[:, None], g].T], 1)
    out = np.zeros((32, 4), np.float32)

    def body(E, v):
        ln = E.tid()
        av = [E.load(v["a"], ln * 4 + i) for i in range(4)]
        bv = [E.load(v["b"], ln * 2 + i) for i in range(2)]
        z = E.const(0.0, "f32")
        d = E.mma_f16(av, bv, [z] * 4)
        E.store(E.from_elements(d), v["d"], ln)

    spec = _tiny_spec(body, [emit.Param("a", "memref<128xvector<2xf16>>"),
                             emit.Param("b", "memref<64xvector<2xf16>>"),
                             emit.Param("d", "memref<32xvector<4xf32>>", "out")])
    simt.run(spec, dict(a=np.ascontiguousarray(a), b=np.ascontiguousarray(b), d=out))
    D = A.astype(np.float64) @ B.astype(np.float64)
    got = np.zeros((16, 8))
    got[g, 2 * t], got[g, 2 * t + 1], got[g + 8, 2 * t], got[g + 8, 2 * t + 1] = out.T
    assert np.allclose(got, D, rtol=1e-5, atol=1e-5)


def test_emulator_catches_early_read_of_cp_async(monkeypatch):
    """A pipeline that waits one group too few must be caught."""
    orig = simt.SimtEmulator.cp_async_wait
    monkeypatch.setattr(simt.SimtEmulator, "cp_async_wait", lambda self, n: orig(self, n + 1))
    rng = np.random.default_rng(6)
    spec = kernels.gemv_w4a16(1024, 32, 128, n_tiles=2, k_warps=2, unroll=1, stages=3)
    P = pack.pack_w4a16(*w4_case(rng, 1024, 32, 128), 128)
    with pytest.raises(simt.SimtError, match="cp.async"):
        simt.run(spec, dict(x=np.ones((1, 1024), np.float16), y=np.zeros((1, 32), np.float16),
                            M=1, **P))


def test_emulator_catches_missing_barrier_and_oob():
    def racy(E, v):
        tid = E.tid()
        E.store(E.const(1.0, "f32"), v["s"], tid)
        E.store(E.load(v["s"], (tid + 1) % 64), v["o"], tid)  # no barrier in between

    params = [emit.Param("o", "memref<64xf32>", "out")]
    spec = _tiny_spec(racy, params, block=64, smem=[("s", "f32", 64)])
    with pytest.raises(simt.SimtError, match="race"):
        simt.run(spec, dict(o=np.zeros(64, np.float32)))

    def oob(E, v):
        E.store(E.const(1.0, "f32"), v["o"], E.tid() + 1)

    with pytest.raises(simt.SimtError, match="out-of-bounds"):
        simt.run(_tiny_spec(oob, [emit.Param("o", "memref<32xf32>", "out")]),
                 dict(o=np.zeros(32, np.float32)))


def test_constraint_errors_are_clear():
    with pytest.raises(KernelConstraintError, match="K % 128"):
        kernels.gemv_w4a16(1000, 4096)
    with pytest.raises(KernelConstraintError, match="group_size"):
        kernels.gemv_w4a16(4096, 4096, 48)
    with pytest.raises(KernelConstraintError, match="acc"):
        kernels.gemv_w4a16(4096, 4096, 64, scale_mode="acc")
    with pytest.raises(KernelConstraintError, match="m_max"):
        kernels.gemv_w4a16(4096, 4096, m_max=257)
    with pytest.raises(KernelConstraintError, match="k_warps"):
        kernels.gemv_w4a16(4096, 4096, k_warps=5)
    with pytest.raises(KernelConstraintError, match="static limit"):  # 3 x 64 rows x 2 K slices
        kernels.gemv_w4a16(4096, 4096, m_max=64, k_warps=2, n_warps=2, x_stages=3)
    with pytest.raises(KernelConstraintError, match="K % 64"):
        kernels.gemv_w8a16(100, 64)
    with pytest.raises(KernelConstraintError, match="K % 16"):
        kernels.gemv_i8(100, 64)
    with pytest.raises(KernelConstraintError, match="n_rows"):
        kernels.gemv_i8(256, 6, n_rows=4)
    with pytest.raises(KernelConstraintError, match="K % 32"):
        kernels.gemv_i8(272, 64, w_bits=4)
    with pytest.raises(KernelConstraintError, match="m_max"):
        kernels.gemv_w8_sparse_x(256, 64, m_max=16)
    with pytest.raises(KernelConstraintError, match="shared memory"):
        kernels.gemv_w4a16(8192, 8192, n_tiles=4, k_warps=8, unroll=1, stages=8)


# --------------------------------------------------------------------------- MLIR / PTX / ptxas


def ptxas_specs():
    """Every kernel family and code path, at bench shapes and default configs."""
    out = []
    for K, N in [(4096, 4096), (8192, 28672)]:
        out += [kernels.gemv_w4a16(K, N, 128), kernels.gemv_w4a16(K, N, 128, m_max=8),
                kernels.gemv_w8a16(K, N), kernels.gemv_w8a16(K, N, m_max=8)]
    out += [kernels.gemv_w4a16(8192, 8192, 128, n_tiles=4, k_warps=4, unroll=1),
            kernels.gemv_w4a16(8192, 8192, 128, n_tiles=1, k_warps=4, unroll=2, w_cache="no_allocate"),
            kernels.gemv_w4a16(8192, 28672, 128, m_max=8, n_tiles=1, k_warps=4, unroll=1, stages=6),
            kernels.gemv_w4a16(8192, 28672, 128, n_tiles=2, k_warps=1, unroll=1, n_warps=4, stages=4),
            kernels.gemv_w4a16(8192, 8192, 128, n_tiles=1, k_warps=4, unroll=1, stages=4,
                               meta_smem=True),
            kernels.gemv_w8a16(8192, 28672, n_tiles=2, k_warps=4, unroll=1, stages=4),
            kernels.gemv_w4a16(2048, 5632, 128, m_max=64, out_f32=True),  # prefill, default config
            kernels.gemv_w8a16(2048, 5632, m_max=64, out_f32=True),
            kernels.gemv_w4a16(2048, 11264, 128, m_max=256, out_f32=True),  # 4 row blocks
            kernels.gemv_w8a16(5632, 2048, m_max=256, out_f32=True),
            kernels.gemv_w4a16(2048, 2048, 128, m_max=64, n_tiles=2, k_warps=4, unroll=1, x_stages=0),
            kernels.gemm_i8(2048, 2048, m_max=128, scaled="row"), kernels.gemm_i8(5632, 2048, m_max=256),
            kernels.gemm_i8(2048, 11264, m_max=128, scaled="row", members=(5632, 5632)),
            kernels.gemm_i8(5632, 2048, m_max=128, scaled="row", w_smem=True, x_stages=4),
            kernels.gemm_i8(2048, 11264, m_max=128, scaled="row", w_bits=4, members=(5632, 5632)),
            kernels.gemm_i8(5632, 2048, m_max=128, scaled="row", w_bits=4),
            kernels.gemv_w4a16(4096, 4096, 64, zero_point=True),  # weight-scaled path
            kernels.gemv_w4a16(4096, 4096, 256, zero_point=False),
            kernels.gemv_i8(4096, 4096, m_max=1), kernels.gemv_i8(4096, 4096, m_max=16),
            kernels.gemv_i8(11008, 4096, m_max=8), kernels.gemv_i8(1040, 512, m_max=7, scaled="row"),
            kernels.gemv_i8(4096, 4096, m_max=1, scaled="tensor"),
            kernels.gemv_i8(4096, 4096, m_max=1, w_bits=4, scaled="row"),
            kernels.gemv_i8(11008, 4096, m_max=16, w_bits=4, scaled="row"),
            kernels.quantize_rows(4096, qmin=-127, qmax=127, m_max=16),
            kernels.quantize_rows(11008, qmin=-7, qmax=7, clip=0.9, m_max=1),
            kernels.hadamard_rows(5632, 44, 7, m_max=16), kernels.hadamard_rows(8192, 1, 13, m_max=1),
            kernels.gemv_i4g(4096, 4096, 128, m_max=1), kernels.gemv_i4g(11008, 4096, 128, m_max=16),
            kernels.gemv_w8_sparse_x(4096, 4096, m_max=1), kernels.gemv_w8_sparse_x(4096, 11008, m_max=8)]
    return out


@pytest.fixture(scope="module")
def gpu_ir():
    pytest.importorskip("torch_mlir")
    pytest.importorskip("llvmlite")
    from qcc.backends.cuda import ptx

    specs = ptxas_specs()
    names = [s.name for s in specs]
    assert len(set(names)) == len(names)
    return specs, ptx.lower_to_llvm_ir(emit.gpu_module(specs))


def test_ir_uses_mma_shuffle_and_128bit_loads(gpu_ir):
    from qcc.backends.cuda import ptx

    specs, ll = gpu_ir
    text = emit.gpu_module(specs)
    assert "nvvm.mma.sync" in text and "gpu.shuffle xor" in text and "gpu.barrier" in text
    assert 'target triple = "nvptx64-nvidia-cuda"' in ll
    p = ptx.llvm_ir_to_ptx(ll, "sm_90a")
    for s in specs:
        body = p.split(f".entry {s.name}(")[1].split("\n}\n")[0]
        if s.config["kind"] == "gemv_i4g":  # 16-byte loads, dp4a on prmt-split x, no shuffles
            assert "dp4a.s32.s32" in body and "prmt.b32" in body, s.name
        elif s.config["kind"] == "gemv_i8":  # 16-byte loads, dp4a, a shuffle butterfly
            assert re.search(r"ld\.global(\.nc)?\.v4\.(b|u)32", body), s.name
            assert body.count("dp4a.s32.s32") >= 8 and "shfl.sync.bfly.b32" in body, s.name
            assert "prmt.b32" in body or s.config["w_bits"] == 8, s.name  # int4: x split in even/odd bytes
        elif s.config["kind"] == "gemm_i8":  # x through cp.async into shared memory, s8 tensor cores
            assert "cp.async.cg.shared.global" in body and "ld.shared.v4" in body, s.name
            assert "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32" in body, s.name
        elif s.config["kind"] == "hadamard_rows":  # the row in shared memory, barriers between stages
            assert "ld.shared" in body and body.count("bar.sync") >= 2 * s.config["k"], s.name
        elif s.config["kind"] == "gemv_w8_sparse_x":  # weights loaded under a branch on x
            assert re.search(r"ld\.global(\.nc)?\.v4\.(b|u)32", body) and "@%p" in body, s.name
        elif s.config["kind"].startswith("gemv"):
            if s.config.get("stages") or s.config.get("x_stages"):  # W or x through cp.async rings
                assert "cp.async.cg.shared.global" in body and "cp.async.wait_group" in body
                assert "ld.shared.v4" in body, s.name
            if not s.config.get("stages"):
                assert re.search(r"ld\.global\.nc(\.L1::\w+)?(\.L2::256B)?\.v4\.(b|u)32", body), s.name
            assert "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32" in body, s.name
        else:
            assert "shfl.sync.bfly.b32" in body


@pytest.mark.parametrize("arch", ["sm_90a", "sm_90", "sm_80"])
def test_ptxas_no_spills(gpu_ir, arch):
    from qcc.backends.cuda import ptx

    if ptx.ptxas_path() is None:
        pytest.skip("ptxas not on PATH")
    specs, ll = gpu_ir
    cb = ptx.assemble(ptx.llvm_ir_to_ptx(ll, arch), arch)
    assert cb.data[:4] == b"\x7fELF"
    for s in specs:
        r = cb.resources[s.name]
        assert r.spill_stores == 0 and r.spill_loads == 0 and r.stack == 0, (s.name, r)
        assert 0 < r.registers <= 255
        assert r.shared == s.smem_bytes()


@pytest.mark.parametrize("K,N,G,M,zp,cfg", [
    (512, 64, 128, 20, True, dict(m_max=32, rows=32, x_stages=3)),
    (512, 128, 256, 37, False, dict(m_max=48, rows=24, warpgroups=2, out_f32=False))])
def test_gemm_w4a16_wg_weight_scaled_emulated(K, N, G, M, zp, cfg):
    """gemm_w4a16_wg(scale_mode="weight"): f16-scaled weights, all of K in one register set;
    gemv_w4a16's weight-mode results (same f16 weights) to f32 rounding, and the float64
    product of the exact dequantized weights to the f16 weight rounding."""
    rng = np.random.default_rng(K + N + G + M)
    spec = kernels.gemm_w4a16_wg(K, N, G, zero_point=zp, scale_mode="weight", **cfg)
    packed, s, z = w4_case(rng, K, N, G, zp)
    P = pack.pack_w4a16(packed, s, z, G, scale_mode="weight", order="wgmma")
    x = rng.standard_normal((M, K)).astype(np.float16)
    yt = np.float32 if spec.config["out_f32"] else np.float16
    y = np.full((M, N), np.nan, yt)
    simt.run(spec, dict(x=x, y=y, M=M, **P))
    ref = x.astype(np.float64) @ pack.dequant_w4(packed, s, z, G).astype(np.float64).T
    assert rel(y, ref) < 2e-3
    gemv = kernels.gemv_w4a16(K, N, G, zero_point=zp, scale_mode="weight", m_max=cfg["m_max"], out_f32=True)
    y2 = np.full((M, N), np.nan, np.float32)
    simt.run(gemv, dict(x=x, y=y2, M=M, **pack.pack_w4a16(packed, s, z, G, scale_mode="weight")))
    assert rel(y, y2) < (1e-6 if yt == np.float32 else 1e-3)


@pytest.mark.parametrize("wait_in_loop", [True, False])
def test_emulator_rejects_wgmma_in_flight_across_back_edge(wait_in_loop):
    """A wgmma group left in flight at a loop's back edge is an emulator error (on the H200 the
    next iteration's registers took the in-flight A operand's: wrong results, no ptxas warning)."""
    from qcc.backends.cuda.emit import KernelSpec, Param

    def body(E, a):
        tid = E.tid()
        E.store(E.const(1.0, "vector<8xf16>"), a["bs"], tid)  # B: 16 x 64 halves, 128 elements
        E.barrier()
        E.fence_proxy_async()
        one = E.const(1.0, "vector<2xf16>")

        def it(i, acc):
            E.wgmma_fence()
            acc = E.wgmma_f16([one] * 4, E.smem_desc(a["bs"], E.const(0, "index"), lbo=1024, sbo=128), acc, 64)
            E.wgmma_commit()
            return E.wgmma_wait(0, acc) if wait_in_loop else acc
        acc = E.wgmma_wait(0, E.for_(0, 2, 1, [E.const(0.0, "f32")] * 32, it))
        E.store(acc[0], a["y"], tid)

    spec = KernelSpec("wg_back_edge", [Param("y", "memref<128xf32>", "out")], (128, 1, 1), (1, 1, 1), body,
                      [("bs", "vector<8xf16>", 128)])
    y = np.zeros(128, np.float32)
    if wait_in_loop:
        simt.run(spec, dict(y=y))
        assert (y == 32.0).all()  # two k16 steps of ones
    else:
        with pytest.raises(simt.SimtError, match="back edge"):
            simt.run(spec, dict(y=y))


def _assembles_without_spills_or_serialized_wgmma(p, spec):
    """ptxas (when present) assembles the sm_90a PTX without spills and without serializing
    the wgmmas (warning C7514)."""
    from qcc.backends.cuda import ptx

    if ptx.ptxas_path() is None:
        return
    cb = ptx.assemble(p, "sm_90a")
    r = cb.resources[spec.name]
    assert r.spill_stores == r.spill_loads == r.stack == 0 and r.registers <= 255, r
    assert "C7514" not in cb.log and "serialized" not in cb.log, cb.log


@pytest.mark.parametrize("cfg", [dict(rows=32, x_stages=3), dict(rows=128, warpgroups=2), dict(rows=64, overlap=4),
                                 dict(scale_mode="weight")])
def test_gemm_w4a16_wg_ptx(cfg):
    """gemm_w4a16_wg for sm_90a: wgmma with A from registers and B through 128-byte swizzled
    descriptors, the x ring filled by cp.async in dynamic shared memory (its base realigned
    to 1024 bytes); ptxas (when present) assembles it without spills and without serializing
    the wgmmas (warning C7514)."""
    from qcc.backends.cuda import ptx

    spec = kernels.gemm_w4a16_wg(2048, 6144, m_max=256, **cfg)
    p = ptx.compile_ptx(emit.gpu_module([spec]), arch="sm_90a")
    assert re.search(r"wgmma\.mma_async\.sync\.aligned\.m64n\d+k16\.f32\.f16\.f16 \{", p)
    assert "cp.async.cg.shared.global" in p and "fence.proxy.async.shared::cta" in p
    assert p.count("wgmma.commit_group") >= 1 and "wgmma.wait_group.sync.aligned" in p
    assert ".extern .shared" in p and spec.smem_dynamic and spec.smem_align == 1024
    _assembles_without_spills_or_serialized_wgmma(p, spec)


@pytest.mark.parametrize("cfg", [dict(rows=32, warpgroups=1, x_stages=3), dict(rows=64, warpgroups=2, scaled="row"),
                                 dict(rows=128, x_stages=6)])
def test_gemm_i8_wg_ptx(cfg):
    """gemm_i8_wg for sm_90a: s8 wgmma with both operands through 128-byte swizzled
    descriptors in dynamic shared memory (its base realigned to 1024 bytes); ptxas (when
    present) assembles it without spills and without serializing the wgmmas."""
    from qcc.backends.cuda import ptx

    spec = kernels.gemm_i8_wg(2048, 6144, m_max=128, **cfg)
    p = ptx.compile_ptx(emit.gpu_module([spec]), arch="sm_90a")
    assert re.search(r"wgmma\.mma_async\.sync\.aligned\.m64n\d+k32\.s32\.s8\.s8 \{", p)
    assert "cp.async.cg.shared.global" in p and "fence.proxy.async.shared::cta" in p
    assert ".extern .shared" in p and spec.smem_dynamic and spec.smem_align == 1024
    off = spec.smem_offsets()
    assert all(o % 1024 == 0 for o in off[:-1]) and off[-1] >= sum(n * 16 for _, _, n in spec.smem) + 1024
    _assembles_without_spills_or_serialized_wgmma(p, spec)


def test_ptxas_failure_has_log_and_repro():
    from qcc.backends.cuda import ptx

    if ptx.ptxas_path() is None:
        pytest.skip("ptxas not on PATH")
    with pytest.raises(ptx.PtxasError) as ei:
        ptx.assemble(".version 8.0\n.target sm_90a\n.address_size 64\n.visible .entry k() { bogus; }\n",
                     "sm_90a")
    assert "ptxas" in ei.value.repro and "-arch=sm_90a" in ei.value.repro and ei.value.log


def test_float_literals_for_llvmlite():
    """LLVM IR from MLIR's newer printer, made parseable by llvmlite's: a float constant as the
    shortest decimal that rounds to it becomes the hex of the equal double; double constants,
    names and strings stay as they are."""
    import struct

    from qcc.backends.cuda import ptx

    def hex_of_float(v):
        f = struct.unpack("<f", struct.pack("<f", v))[0]
        return "0x%016X" % struct.unpack("<Q", struct.pack("<d", f))[0]

    assert ptx._old_float_literals("  %21 = fmul float %20, 4.471500e-02") == \
        f"  %21 = fmul float %20, {hex_of_float(0.044715)}"
    assert ptx._old_float_literals("  %3 = select i1 %c, float -4.471500e-02, float %x") == \
        f"  %3 = select i1 %c, float {hex_of_float(-0.044715)}, float %x"
    for same in ("  %1 = fcmp oeq double %0, 4.471500e-02", "  %x.1.5 = fadd float %a, %b",
                 '!0 = !{!"version 1.5e+00"}'):
        assert ptx._old_float_literals(same) == same


def test_build_bundle_manifest(tmp_path):
    pytest.importorskip("torch_mlir")
    from qcc.backends.cuda import ptx

    specs = [kernels.gemv_w4a16(512, 64, 128, k_warps=2), kernels.gemv_i8(256, 64, m_max=4)]
    man = ptx.build_bundle(specs, str(tmp_path), archs=("sm_90a",), cubin=ptx.ptxas_path() is not None)
    k = man["kernels"][specs[0].name]
    assert k["grid"] == list(specs[0].grid) and k["block"] == list(specs[0].block)
    assert [p["name"] for p in k["params"]] == ["x", "wq", "scales", "zeros", "y", "M"]
    x = k["params"][0]
    assert x["rows_param"] == "M" and x["row_bytes"] == 512 * 2 and x["align"] == 16
    assert (tmp_path / "kernels_sm_90a.ptx").exists()


# --------------------------------------------------------------------------- runtime imports


def test_runtime_and_pack_import_without_mlir_or_torch():
    code = textwrap.dedent(f"""
        import importlib.util, sys
        for m in ("torch", "torch_mlir", "qcc"):
            sys.modules[m] = None  # any import of these now fails
        for name in ("runtime", "pack"):
            spec = importlib.util.spec_from_file_location(name, {CUDA_DIR!r} + "/" + name + ".py")
            mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
        print("ok", mod.__name__)
    """)
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert p.returncode == 0 and "ok" in p.stdout, p.stderr


# --------------------------------------------------------------------------- GPU


def _gpu():
    from qcc.backends.cuda import runtime  # imports without a GPU: a failure here is a bug
    ok, why = runtime.available()
    if not ok:
        pytest.skip(f"no GPU: {why}")
    return runtime


def test_gpu_w4a16_and_w8a16(tmp_path):
    runtime = _gpu()
    pytest.importorskip("torch_mlir")
    from qcc.backends.cuda import ptx

    rng = np.random.default_rng(5)
    K, N = 1024, 256
    specs = [kernels.gemv_w4a16(K, N, 128), kernels.gemv_w8a16(K, N)]
    rt = runtime.Runtime()
    ptx.build_bundle(specs, str(tmp_path), archs=(rt.arch,), cubin=ptx.ptxas_path() is not None)
    mod = runtime.load_bundle(str(tmp_path), rt)
    packed, s, z = w4_case(rng, K, N, 128)
    w4 = {k: rt.upload(v) for k, v in pack.pack_w4a16(packed, s, z, 128).items()}
    for M in (1, 7, 16):
        x = rng.standard_normal((M, K)).astype(np.float16)
        y = np.full((M, N), np.nan, np.float16)
        mod.launch(specs[0].name, x=x, y=y, M=M, **w4)  # numpy in, numpy out
        assert rel(y, x.astype(np.float64) @ pack.dequant_w4(packed, s, z, 128).T) < 5e-3
    q, s8 = pack.quantize_w8(rng.standard_normal((N, K)))
    x = rng.standard_normal((3, K)).astype(np.float16)
    y = np.full((3, N), np.nan, np.float16)
    mod.launch(specs[1].name, x=x, y=y, M=3, **pack.pack_w8a16(q, s8))
    assert rel(y, x.astype(np.float64) @ pack.dequant_w8(q, s8).T) < 5e-3
    with pytest.raises(ValueError, match="outside"):
        mod.launch(specs[1].name, x=x, y=y, M=17, **pack.pack_w8a16(q, s8))


def test_generated_reduction_lanes_follow_the_contiguous_operand():
    """A contraction whose big operand is contiguous along an output dim (attention's
    p @ v: v[j, h, d] for outputs [h, i, d]) runs lanes along that dim (split_reduce);
    one contiguous along the reduction (q @ k^T) keeps lanes on the reduction. Both match
    numpy."""
    from qcc.backends.cuda import linalg_kernels as lk

    def contraction(v_map, v_shape, v_strides):
        d = [("d", i) for i in range(4)]  # loops (h, i, n, j): out[h, i, n] = sum_j p[h, i, j] * v
        return lk.GenericDesc([2, 4, 32, 64], ["parallel"] * 3 + ["reduction"],
                              [lk.Operand("f32", (2, 4, 64), (256, 64, 1), [d[0], d[1], d[3]]),
                               lk.Operand("f32", v_shape, v_strides, v_map)],
                              [lk.Operand("f32", (2, 4, 32), (128, 32, 1), [d[0], d[1], d[2]])],
                              [lk.BodyOp("arith.mulf", [("arg", 0), ("arg", 1)], ["f32"]),
                               lk.BodyOp("arith.addf", [("arg", 2), ("op", 0, 0)], ["f32"])], [("op", 1, 0)])
    rng = np.random.default_rng(7)
    p = rng.standard_normal((2, 4, 64)).astype(np.float32)
    for desc, v, want_kind in (
            (contraction([("d", 3), ("d", 0), ("d", 2)], (64, 2, 32), (64, 32, 1)),
             rng.standard_normal((64, 2, 32)).astype(np.float32), "split_reduce"),
            (contraction([("d", 0), ("d", 2), ("d", 3)], (2, 32, 64), (2048, 64, 1)),
             rng.standard_normal((2, 32, 64)).astype(np.float32), "warp_reduce")):
        assert lk.classify(desc) == want_kind
        spec = lk.build_kernel(desc)
        y = np.zeros((2, 4, 32), np.float32)
        simt.run(spec, dict(in0=p, in1=v, out0=y))
        ref = np.einsum("hij,jhn->hin", p, v) if want_kind == "split_reduce" else np.einsum("hij,hnj->hin", p, v)
        assert rel(y, ref) < 1e-5


def _contraction(H, I, N, J, v_heads_first=True):
    """out[h, i, n] += sum_j p[h, i, j] * v (loops h, i, n, j); v[h, n, j] or v[j, h, n]."""
    from qcc.backends.cuda import linalg_kernels as lk

    d = [("d", i) for i in range(4)]
    v_map = [d[0], d[2], d[3]] if v_heads_first else [d[3], d[0], d[2]]
    v_shape = (H, N, J) if v_heads_first else (J, H, N)
    v_strides = (N * J, J, 1) if v_heads_first else (H * N, N, 1)
    return lk.GenericDesc([H, I, N, J], ["parallel"] * 3 + ["reduction"],
                          [lk.Operand("f32", (H, I, J), (I * J, J, 1), [d[0], d[1], d[3]]),
                           lk.Operand("f32", v_shape, v_strides, v_map)],
                          [lk.Operand("f32", (H, I, N), (I * N, N, 1), [d[0], d[1], d[2]])],
                          [lk.BodyOp("arith.mulf", [("arg", 0), ("arg", 1)], ["f32"]),
                           lk.BodyOp("arith.addf", [("arg", 2), ("op", 0, 0)], ["f32"])], [("op", 1, 0)])


@pytest.mark.parametrize("H,I,N,J,v_heads_first", [(2, 40, 48, 24, True), (1, 64, 64, 70, False),
                                                   (3, 33, 100, 16, True), (1, 128, 96, 300, True)])
def test_generated_tile_contract(H, I, N, J, v_heads_first):
    """A contraction with two output dims of >= 32 points that no operand reads together
    (a matmul's rows and columns; attention's query positions and keys or head dims) runs as
    tile_contract: operands staged through shared memory (the emulator checks the barriers),
    partial tiles at both edges, a reduction that is not a multiple of the chunk; matches
    numpy, with an initial output value added once. A fixed block (fuse_launches) never
    takes it."""
    from qcc.backends.cuda import linalg_kernels as lk

    desc = _contraction(H, I, N, J, v_heads_first)
    assert lk.classify(desc) == "tile_contract"
    c = lk._contract(desc)
    assert (c.a, c.b) == (1, 2) and c.k_fast == {"a": True, "b": v_heads_first}
    rng = np.random.default_rng(H + I + N + J)
    p = rng.standard_normal((H, I, J)).astype(np.float32)
    v = rng.standard_normal(desc.ins[1].shape).astype(np.float32)
    y0 = rng.standard_normal((H, I, N)).astype(np.float32)
    y = y0.copy()
    simt.run(lk.build_kernel(desc), dict(in0=p, in1=v, out0=y))
    ref = y0 + np.einsum("hij,hnj->hin" if v_heads_first else "hij,jhn->hin", p.astype(np.float64), v)
    assert rel(y, ref) < 1e-6
    assert lk.build_kernel(desc, "stage", threads=256).config["kind"] != "linalg_tile_contract"
    assert lk.classify(_contraction(H, 16, N, J)) != "tile_contract"  # too few rows for a tile



def test_tile_contract_reads_shared_memory_in_vectors():
    """Each thread's outputs are consecutive along both tiled dims, so its staged values of a
    reduction step are one vector load per side (2 x 2 outputs: ld.shared.v2), not one load a
    value; the products stay a multiply and an add (no FMA contraction: the CPU's rounding)."""
    from qcc.backends.cuda import emit, linalg_kernels as lk, ptx

    desc = _contraction(16, 128, 128, 128)
    tile = lk._tile_config(desc, lk._contract(desc))
    assert (tile.ta, tile.tb) == (2, 2)
    p = ptx.compile_ptx(emit.gpu_module([lk.build_kernel(desc)]), arch="sm_90a")
    loads = re.findall(r"ld\.shared(\.v\d)?\.[bf]32", p)
    assert loads and all(v == ".v2" for v in loads), loads
    assert "fma.rn.f32" not in p and "mul.rn.f32" in p

def test_generated_tile_contract_stages_fused_producers():
    """Elementwise producers fused into the contraction are computed once per staged value:
    a per-row division on the a side (softmax's p / sum fused into p @ v) and a rotate-half
    gather through a captured buffer on the b side (RoPE fused into q @ k^T)."""
    from qcc.backends.cuda import linalg_kernels as lk

    H, I, N, J = 2, 48, 40, 32
    d = [("d", i) for i in range(4)]
    ult = {"predicate": "ult"}
    body = [lk.BodyOp("arith.constant", [], ["index"], "value = 16 : index", {"value": J // 2}),
            lk.BodyOp("arith.cmpi", [("idx", 3), ("op", 0, 0)], ["i1"], "predicate = 6 : i64", ult),
            lk.BodyOp("arith.addi", [("idx", 3), ("op", 0, 0)], ["index"]),
            lk.BodyOp("arith.subi", [("idx", 3), ("op", 0, 0)], ["index"]),
            lk.BodyOp("arith.select", [("op", 1, 0), ("op", 2, 0), ("op", 3, 0)], ["index"]),
            lk.BodyOp("memref.load", [("cap", 0), ("idx", 0), ("idx", 2), ("op", 4, 0)], ["f32"]),
            lk.BodyOp("arith.negf", [("op", 5, 0)], ["f32"]),
            lk.BodyOp("arith.select", [("op", 1, 0), ("op", 6, 0), ("op", 5, 0)], ["f32"]),
            lk.BodyOp("arith.divf", [("arg", 0), ("arg", 1)], ["f32"]),
            lk.BodyOp("arith.mulf", [("op", 8, 0), ("op", 7, 0)], ["f32"]),
            lk.BodyOp("arith.addf", [("arg", 2), ("op", 9, 0)], ["f32"])]
    desc = lk.GenericDesc([H, I, N, J], ["parallel"] * 3 + ["reduction"],
                          [lk.Operand("f32", (H, I, J), (I * J, J, 1), [d[0], d[1], d[3]]),
                           lk.Operand("f32", (H, I), (I, 1), [d[0], d[1]])],
                          [lk.Operand("f32", (H, I, N), (I * N, N, 1), [d[0], d[1], d[2]])],
                          body, [("op", 10, 0)], captures=[lk.Capture("f32", (H, N, J), (N * J, J, 1))],
                          out_init={0: ("0.000000e+00 : f32", 0.0)})
    assert lk.classify(desc) == "tile_contract"
    c = lk._contract(desc)
    assert c.staged == {"a": [("op", 8, 0)], "b": [("op", 7, 0)]} and c.inner == [0, 9]
    rng = np.random.default_rng(11)
    p = rng.standard_normal((H, I, J)).astype(np.float32)
    s = rng.uniform(0.5, 2.0, (H, I)).astype(np.float32)
    k = rng.standard_normal((H, N, J)).astype(np.float32)
    y = np.full((H, I, N), np.nan, np.float32)  # the folded fill: the output is never read
    simt.run(lk.build_kernel(desc), dict(in0=p, in1=s, out0=y, cap0=k))
    k64 = k.astype(np.float64)
    rot = np.concatenate([-k64[..., J // 2:], k64[..., :J // 2]], axis=-1)
    ref = np.einsum("hij,hnj->hin", p / s[..., None].astype(np.float64), rot)
    assert rel(y, ref) < 1e-6


def test_generated_tile_contract_integer_two_reduction_dims():
    """An integer contraction (the fallback quantized matmul's shape: extsi(i8) * extsi(i8)
    summed in i32) over two reduction dims (72 steps: 4 chunks and a tail) on tile_contract:
    the widened values are staged, the sums exact."""
    from qcc.backends.cuda import linalg_kernels as lk

    I, N, K1, K2 = 40, 36, 3, 24
    d = [("d", i) for i in range(4)]
    desc = lk.GenericDesc([I, N, K1, K2], ["parallel", "parallel", "reduction", "reduction"],
                          [lk.Operand("i8", (I, K1, K2), (K1 * K2, K2, 1), [d[0], d[2], d[3]]),
                           lk.Operand("i8", (N, K1, K2), (K1 * K2, K2, 1), [d[1], d[2], d[3]])],
                          [lk.Operand("i32", (I, N), (N, 1), [d[0], d[1]])],
                          [lk.BodyOp("arith.extsi", [("arg", 0)], ["i32"]),
                           lk.BodyOp("arith.extsi", [("arg", 1)], ["i32"]),
                           lk.BodyOp("arith.muli", [("op", 0, 0), ("op", 1, 0)], ["i32"]),
                           lk.BodyOp("arith.addi", [("arg", 2), ("op", 2, 0)], ["i32"])], [("op", 3, 0)])
    assert lk.classify(desc) == "tile_contract"
    assert lk._contract(desc).staged == {"a": [("op", 0, 0)], "b": [("op", 1, 0)]}
    rng = np.random.default_rng(5)
    a = rng.integers(-128, 128, (I, K1, K2)).astype(np.int8)
    b = rng.integers(-128, 128, (N, K1, K2)).astype(np.int8)
    y0 = rng.integers(-1000, 1000, (I, N)).astype(np.int32)
    y = y0.copy()
    simt.run(lk.build_kernel(desc), dict(in0=a, in1=b, out0=y))
    assert np.array_equal(y, y0 + np.einsum("ikl,nkl->in", a.astype(np.int64), b.astype(np.int64)))


@pytest.mark.parametrize("kind", ["gemv_i8", "gemv_w4a16"])
def test_decode_gemv_prefetches_its_weights_before_the_grid_wait(kind):
    """At decode a GEMV of at most PREFETCH_MAX_BYTES of weights asks L2 for its block's weight
    slice, then waits for its predecessor (griddepcontrol.wait on sm_90+, where its mark is);
    no load comes before the wait. A bigger launch only waits; on sm_80 the mark stays a comment."""
    from qcc.backends.cuda import ptx
    from qcc.backends.cuda.emit import GRID_WAIT_MARK, gpu_module

    build = (lambda N: kernels.gemv_i8(2048, N, m_max=1, scaled="row")) if kind == "gemv_i8" else \
        (lambda N: kernels.gemv_w4a16(2048, N, 128, m_max=1))
    small, big = build(1024), build(8192)
    assert 2048 * 1024 <= kernels.PREFETCH_MAX_BYTES < 2048 * 8192 // (1 if kind == "gemv_i8" else 2)
    ll = ptx.lower_to_llvm_ir(gpu_module([small, big], "m"))
    text = ptx.with_grid_dependency(ptx.llvm_ir_to_ptx(ll, "sm_90a"))
    for spec, prefetches in ((small, True), (big, False)):
        body = text[text.index(f".entry {spec.name}("):]
        body = body[:body.index("\n}")]
        head, _, rest = body.partition("griddepcontrol.wait;")
        assert rest and "griddepcontrol.wait;" not in rest
        assert ("prefetch.global.L2" in head) == prefetches and "prefetch" not in rest
        assert not re.search(r"\b(ld|st)\.global", head) and re.search(r"\bld\.global", rest)
    sm80 = ptx.llvm_ir_to_ptx(ll, "sm_80")
    assert "griddepcontrol" not in sm80 and sm80.count(GRID_WAIT_MARK) >= 2
