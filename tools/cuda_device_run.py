#!/usr/bin/env python3
"""Build qcc's CUDA GEMV kernels here; check and benchmark them on the GPU machine.

    # here (needs torch_mlir, llvmlite, ptxas): PTX + cubin + manifest into a folder
    python tools/cuda_device_run.py build --out .cuda_build
    # on the GPU machine (numpy, torch with CUDA, cuda-bindings; no MLIR, no qcc install)
    python tools/cuda_device_run.py run --bundle .cuda_build --out "$OUT"
    # dry run here: tiny shapes, kernels executed by the numpy SIMT emulator, torch on CPU
    python tools/cuda_device_run.py run --emulate

``run`` measures the device-to-device copy bandwidth (torch ``copy_`` of 1 GiB, bytes
read + written), then for (K, N) in SHAPES: checks every kernel variant in the bundle
against a float32 reference computed by torch from the dequantized weights (relative
Frobenius error), and times it (CUDA graph of launches rotating through enough weight
copies to defeat the 50 MB L2; CUDA events; median) next to torch fp16 ``F.linear``
(cuBLAS) on the dequantized weights. It prints every variant, then a summary table of
the best variant per (format, shape, M), and writes results.json (and SASS of the best
kernels, when cuobjdump is present) under --out.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import statistics
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUDA_DIR = os.path.join(ROOT, "backends", "cuda")

SHAPES = [(4096, 4096), (8192, 8192), (8192, 28672)]
MS = (1, 16)
GROUP = 128
# Variants to sweep, per (format, m_max): dicts of builder keywords. The register-prefetch
# ones are the best of the first sweep (2026-11, H100); the rest stream W with cp.async.
def _v(nt, kw, u, nw=1, s=0, wc=None, d=1, ms=False, xs=0):
    return dict(n_tiles=nt, k_warps=kw, unroll=u, n_warps=nw, stages=s, w_cache=wc, depth=d,
                x_stages=xs, **({"meta_smem": True} if ms else {}))


W4_VARIANTS = {
    8: [_v(2, 4, 2, wc="no_allocate"), _v(1, 4, 2, wc="no_allocate"), _v(1, 8, 2),
        _v(1, 4, 1, s=4), _v(1, 4, 1, s=6), _v(1, 8, 1, s=4), _v(2, 4, 1, s=4), _v(2, 2, 1, s=6),
        _v(1, 2, 1, s=8), _v(2, 4, 1, s=3), _v(1, 4, 2, s=3), _v(2, 2, 1, nw=2, s=4),
        _v(1, 4, 1, nw=2, s=4), _v(1, 2, 1, nw=4, s=4), _v(1, 4, 1, s=4, ms=True),
        _v(1, 4, 1, s=6, ms=True), _v(2, 4, 1, s=4, ms=True), _v(1, 8, 1, s=6)],
    16: [_v(4, 4, 1), _v(4, 2, 2), _v(2, 4, 2, wc="no_allocate"),
         _v(2, 1, 1, nw=4, s=4), _v(2, 1, 1, nw=4, s=6), _v(2, 1, 1, nw=8, s=3),
         _v(2, 2, 1, nw=4, s=3), _v(2, 2, 1, nw=2, s=4), _v(4, 2, 1, s=4), _v(4, 1, 1, nw=2, s=4),
         _v(2, 4, 1, s=4), _v(1, 2, 1, nw=4, s=4), _v(1, 1, 1, nw=8, s=4), _v(4, 2, 1, nw=2, s=3),
         _v(2, 2, 1, nw=4, s=2), _v(1, 4, 1, s=4), _v(4, 4, 1, s=3), _v(2, 2, 1, nw=2, s=6)],
}
W8_VARIANTS = {
    8: [_v(1, 4, 4), _v(2, 4, 2, wc="no_allocate_256"), _v(2, 8, 2),
        _v(1, 4, 1, s=4), _v(2, 4, 1, s=4), _v(1, 4, 2, s=4), _v(2, 2, 1, nw=2, s=4),
        _v(1, 8, 1, s=4), _v(1, 4, 1, s=6)],
    16: [_v(2, 2, 2), _v(2, 4, 2, wc="no_allocate_256"), _v(2, 8, 2),
         _v(2, 4, 1, s=4), _v(2, 2, 1, nw=4, s=3), _v(2, 1, 1, nw=4, s=4), _v(4, 2, 1, s=4),
         _v(2, 2, 1, nw=2, s=4), _v(1, 4, 1, s=4)],
}
# Prefill: bench_llama's linears (q/k/v stacked, gate/up stacked, o, down) over 128 tokens,
# i.e. 256 rows of x as models run them (f16 hi + lo rows, fp32 out); swept by build
# --prefill-sweep, timed at M = 256 next to torch fp16 F.linear at M = 128 and 256.
PREFILL_SHAPES = [(2048, 6144), (2048, 2048), (2048, 11264), (5632, 2048)]
PREFILL_MS = (128, 256)
PREFILL_M_MAX = 256
PREFILL_VARIANTS = {
    "gemv_w4a16": [{}, _v(2, 4, 1, wc="no_allocate"), _v(1, 4, 2, wc="no_allocate"),
                   _v(2, 1, 1, nw=8, xs=2, wc="no_allocate"), _v(1, 1, 1, nw=8, xs=2, wc="no_allocate"),
                   _v(1, 1, 1, nw=4, xs=2, wc="no_allocate"), _v(2, 1, 1, nw=4, xs=2, wc="no_allocate"),
                   _v(1, 1, 1, nw=16, xs=2, wc="no_allocate"), _v(2, 1, 1, nw=8, xs=2)],
    "gemv_w8a16": [{}, _v(2, 4, 1, wc="no_allocate_256"), _v(2, 1, 1, nw=4, xs=2, wc="no_allocate_256"),
                   _v(2, 1, 1, nw=8, xs=2, wc="no_allocate_256"), _v(1, 1, 1, nw=8, xs=3),
                   _v(2, 1, 2, nw=4, xs=2), _v(2, 2, 1, nw=4, xs=2), _v(1, 2, 1, nw=8, xs=2)],
    # w8a8's integer core at prefill: 128 rows of int8 codes (the gemv_i8 baseline at 16 a launch)
    "gemm_i8": [{}, dict(n_tiles=2, n_warps=4, unroll=2), dict(n_tiles=1, n_warps=8),
                dict(n_tiles=1, n_warps=8, unroll=2), dict(n_tiles=2, n_warps=4, w_smem=True, x_stages=4),
                dict(n_tiles=2, n_warps=4, unroll=2, w_smem=True), dict(n_tiles=1, n_warps=8, w_smem=True, x_stages=4),
                dict(n_tiles=2, n_warps=4, m_tiles=2, w_smem=True, x_stages=4),
                dict(n_tiles=1, n_warps=4, m_tiles=2, unroll=2, w_smem=True),
                dict(n_tiles=2, n_warps=2, w_smem=True, x_stages=6), dict(n_tiles=2, n_warps=4, k_warps=2, w_smem=True),
                dict(n_tiles=2, n_warps=2, k_warps=4, w_smem=True, x_stages=2),
                dict(n_tiles=1, n_warps=4, k_warps=2, w_smem=True, x_stages=4)],
    "gemv_i8": [{}],
    # the same on Hopper's wgmma (sm_90a): both operands from shared memory, 64 weight rows a
    # warpgroup, `rows` of x a block
    "gemm_i8_wg": [dict(rows=r, warpgroups=w, x_stages=xs)
                   for r, w, xs in ((64, 1, 4), (64, 2, 4), (32, 1, 4), (32, 2, 4), (128, 1, 4), (128, 2, 4),
                                    (64, 1, 6), (64, 2, 6), (32, 1, 8), (128, 1, 6), (16, 1, 8), (64, 1, 3),
                                    (128, 2, 3))],
    # w4a16's GEMM at prefill (f16 out here: the sweep times f16 y next to fp16 F.linear)
    "gemm_w4a16": [dict(out_f32=False), dict(n_tiles=4, n_warps=4, m_tiles=2, out_f32=False),
                   dict(m_tiles=4, w_smem=False, out_f32=False),
                   dict(m_tiles=2, w_smem=False, x_stages=4, out_f32=False),
                   dict(n_tiles=4, n_warps=4, m_tiles=2, w_smem=False, x_stages=4, out_f32=False),
                   dict(n_warps=4, m_tiles=2, out_f32=False),
                   dict(n_warps=4, m_tiles=2, w_smem=False, x_stages=4, out_f32=False)],
    # the same on Hopper's wgmma (sm_90a): 64 columns a warpgroup, `rows` of x a block
    "gemm_w4a16_wg": [dict(rows=r, warpgroups=w, overlap=o, x_stages=xs, out_f32=False)
                      for r, w, o, xs in ((64, 1, 2, None), (32, 1, 4, None), (64, 1, 0, None), (128, 1, 0, None),
                                          (128, 2, 0, None), (64, 2, 2, None), (32, 2, 4, None), (64, 1, 2, 6),
                                          (32, 1, 4, 6), (64, 1, 4, None))] +
                     [dict(rows=r, warpgroups=w, x_stages=xs, scale_mode="weight", out_f32=False)
                      for r, w, xs in ((64, 1, None), (32, 1, None), (64, 2, None), (128, 1, None), (64, 1, 6),
                                       (128, 1, 3), (32, 1, 6))],
}
PREFILL_I8_ROWS = 128
W4_KINDS = ("gemv_w4a16", "gemm_w4a16", "gemm_w4a16_wg")  # = pack.W4_BUILDERS (pack loads lazily here)
EMU_SHAPES = [(512, 64), (1024, 128)]


def _ms(K, N):
    """Rows of x the linear benchmark times a shape at."""
    return PREFILL_MS if (K, N) in PREFILL_SHAPES else MS
EMU_VARIANTS = {8: [_v(1, 2, 2), _v(2, 2, 1, wc="no_allocate"), _v(1, 2, 1, s=3)],
                16: [_v(2, 1, 2), _v(2, 1, 1, nw=2, s=3), _v(1, 2, 1, s=2, ms=True)]}
L2_DEFEAT_BYTES = 200 << 20  # rotate weight copies totalling at least this much


def _load(name):
    """Import backends/cuda/<name>.py as qcc_cuda.<name> by path (no qcc install needed on the
    device; relative imports between the backend's modules work)."""
    if "qcc_cuda" not in sys.modules:
        spec = importlib.util.spec_from_file_location("qcc_cuda", os.path.join(CUDA_DIR, "__init__.py"),
                                                      submodule_search_locations=[CUDA_DIR])
        pkg = importlib.util.module_from_spec(spec)
        sys.modules["qcc_cuda"] = pkg
        spec.loader.exec_module(pkg)
    import importlib as _il
    return _il.import_module(f"qcc_cuda.{name}")


# gemv_i8 launch shapes to compare (the builder's default is the first)
I8_VARIANTS = [{}, dict(n_rows=2, warps=4, unroll=2), dict(n_rows=4, warps=4, unroll=2),
               dict(n_rows=4, warps=8, unroll=1), dict(n_rows=2, warps=8, unroll=1)]

# The measured-best configurations (kernels.TUNED): the default of each builder.
FINAL_VARIANTS = {8: [{}], 16: [{}]}


# --------------------------------------------------------------------------- build (here)


def kernel_specs(shapes, variants4, variants8, w8a8=True, split=True):
    """split: also the kernels the compiler uses for models at decode -- x as f16 hi + lo
    rows (2 rows per token), fp32 output (out_f32), m_max 8."""
    from qcc.backends.cuda import kernels

    specs = []
    for K, N in shapes:
        if split:
            specs.append(kernels.gemv_w4a16(K, N, GROUP, m_max=8, out_f32=True))
            specs.append(kernels.gemv_w8a16(K, N, m_max=8, out_f32=True))
        for m_max in (8, 16):
            for v in variants4[m_max]:
                try:
                    specs.append(kernels.gemv_w4a16(K, N, GROUP, m_max=m_max, **v))
                except kernels.KernelConstraintError:
                    pass
            for v in variants8[m_max]:
                v = {k: x for k, x in v.items() if k != "meta_smem"}
                try:
                    specs.append(kernels.gemv_w8a16(K, N, m_max=m_max, **v))
                except kernels.KernelConstraintError:
                    pass
    if w8a8:  # the integer core of w8a8 layers, at the row counts models launch it with
        for K, N in shapes:
            for m in MS:
                for v in I8_VARIANTS:
                    try:
                        specs.append(kernels.gemv_i8(K, N, m_max=m, **v))
                    except kernels.KernelConstraintError:
                        pass
                specs.append(kernels.gemv_w8_sparse_x(K, N, m_max=min(m, 8)))  # llm-int8-dynamic's float part
    return specs


def prefill_specs(variants):
    from qcc.backends.cuda import kernels

    specs = []
    for K, N in PREFILL_SHAPES:
        for kind, vs in variants.items():
            for v in vs:
                m_max = {"gemm_i8": PREFILL_I8_ROWS, "gemm_i8_wg": PREFILL_I8_ROWS, "gemv_i8": 16}.get(kind, PREFILL_M_MAX)
                try:
                    specs.append(getattr(kernels, kind)(K, N, **({"group_size": GROUP} if kind in W4_KINDS else {}),
                                                        m_max=m_max, **v))
                except kernels.KernelConstraintError:
                    pass
    return list({s.name: s for s in specs}.values())


def cmd_build(args):
    from qcc.backends.cuda import ptx

    specs = kernel_specs(SHAPES, W4_VARIANTS, W8_VARIANTS) if args.sweep else \
        kernel_specs(SHAPES, FINAL_VARIANTS, FINAL_VARIANTS)
    specs += prefill_specs(PREFILL_VARIANTS if args.prefill_sweep else
                           {k: [{}] for k in PREFILL_VARIANTS})
    t0 = time.time()
    for attempt in range(2):
        man = ptx.build_bundle(specs, args.out, archs=tuple(args.arch))
        spilling = {name for name, k in man["kernels"].items()
                    for r in k["resources"].values()
                    if r["spill_stores"] or r["spill_loads"] or r["stack"]}
        if not spilling:
            break
        print(f"dropping {len(spilling)} variants that spill: {sorted(spilling)}")
        specs = [s for s in specs if s.name not in spilling]
    else:
        raise SystemExit(f"kernels still spill: {sorted(spilling)}")
    worst = {}
    for name, k in man["kernels"].items():
        for arch, r in k["resources"].items():
            worst[arch] = max(worst.get(arch, 0), r["registers"])
    print(f"built {len(specs)} kernels for {args.arch} into {args.out} in {time.time() - t0:.1f}s; "
          f"max registers {worst}; no spills")
    if args.models:
        t0 = time.time()
        print("compiling whole models (CUDA artifacts) ...", flush=True)
        build_models(args.out, quick=args.quick, tile_sweep=args.tile_sweep)
        build_cases(args.out)
        print(f"models in {time.time() - t0:.0f}s")


# --------------------------------------------------------------------------- data


def _cfg_str(c):
    if c["kind"] == "gemv_i8":
        return f"rows{c['n_rows']} w{c['warps']} u{c['unroll']}"
    if c["kind"] == "gemm_w4a16":
        return f"nt{c['n_tiles']} nw{c['n_warps']} mt{c['m_tiles']} x-ring {c['x_stages']} m<={c['m_max']}"
    if c["kind"] == "gemm_w4a16_wg":
        return (f"wgmma rows{c['rows']} wg{c['warpgroups']} x-ring {c['x_stages']} overlap{c['overlap']} "
                f"{c['scale_mode']} m<={c['m_max']}")
    if c["kind"] == "gemm_i8_wg":
        return f"wgmma s8 rows{c['rows']} wg{c['warpgroups']} ring {c['x_stages']} m<={c['m_max']}"
    if c["kind"] == "gemm_i8":
        return (f"nt{c['n_tiles']} nw{c['n_warps']} mt{c['m_tiles']} u{c['unroll']} d{c['depth']} "
                f"x-ring {c['x_stages']} m<={c['m_max']}")
    s = f"nt{c['n_tiles']} kw{c['k_warps']} u{c['unroll']}"
    if c.get("n_warps", 1) > 1:
        s += f" nw{c['n_warps']}"
    if c.get("stages"):
        s += f" cp.async x{c['stages']}" + (" meta-smem" if c.get("meta_smem") else "")
    elif c.get("depth", 1) > 1:
        s += f" d{c['depth']}"
    if c.get("w_cache"):
        s += f" {c['w_cache']}"
    return s + f" m<={c['m_max']}"


def w4_data(rng, K, N):
    packed = rng.integers(0, 256, (N, K // 2), dtype=np.uint8)
    scale = (rng.random((N, K // GROUP), dtype=np.float32) * 0.02 + 0.002).astype(np.float32)
    zero = rng.integers(0, 16, (N, K // GROUP), dtype=np.uint8)
    return packed, scale, zero


def w8_data(rng, K, N):
    q = rng.integers(-127, 128, (N, K), dtype=np.int8)
    scale = (rng.random((N, 1), dtype=np.float32) * 0.002 + 0.0005).astype(np.float32)
    return q, scale


def torch_dequant_w4(torch, packed, scale, zero, dev):
    p = torch.from_numpy(packed).to(dev)
    nib = torch.stack([p & 0xF, p >> 4], dim=-1).reshape(p.shape[0], -1).float()
    N, K = nib.shape
    s = torch.from_numpy(scale).to(dev)
    z = torch.from_numpy(zero).to(dev).float()
    return ((nib.reshape(N, K // GROUP, GROUP) - z[..., None]) * s[..., None]).reshape(N, K)


def rel_err(torch, y, ref):
    y = y.double()
    if not torch.isfinite(y).all():
        return float("inf")
    return float(torch.linalg.norm(y - ref.double()) / torch.linalg.norm(ref.double()))


# --------------------------------------------------------------------------- timing


class GpuTimer:
    def __init__(self, torch):
        self.torch = torch

    def time(self, launches, reps=15):
        """Median microseconds per launch; launches: callables(stream_handle) cycled."""
        torch = self.torch
        n = len(launches)
        for f in launches * 2:  # warm-up (module load, caches, clocks)
            f(torch.cuda.current_stream().cuda_stream)
        torch.cuda.synchronize()
        per = max(n, 32)
        try:
            g = torch.cuda.CUDAGraph()
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                with torch.cuda.graph(g, stream=s):
                    h = torch.cuda.current_stream().cuda_stream
                    for i in range(per):
                        launches[i % n](h)
            torch.cuda.current_stream().wait_stream(s)
            run, how = g.replay, "graph"
        except Exception as e:  # fall back to eager launches
            print(f"  (graph capture failed: {e}; timing eager launches)")

            def run():
                h = torch.cuda.current_stream().cuda_stream
                for i in range(per):
                    launches[i % n](h)
            how = "eager"
        run()
        torch.cuda.synchronize()
        ts = []
        for _ in range(reps):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            run()
            b.record()
            b.synchronize()
            ts.append(a.elapsed_time(b) * 1000.0 / per)
        return statistics.median(ts), how, (max(ts) - min(ts)) / statistics.median(ts)


class CpuTimer:
    def time(self, launches, reps=1):
        t0 = time.perf_counter()
        for f in launches:
            f(None)
        return (time.perf_counter() - t0) * 1e6 / len(launches), "emulated", 0.0


def copy_bandwidth(torch, nbytes=1 << 30):
    a = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    a.random_(0, 255)
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    torch.cuda.synchronize()
    ts = []
    for _ in range(20):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        b.copy_(a)
        e1.record()
        e1.synchronize()
        ts.append(e0.elapsed_time(e1) / 1000.0)
    t = statistics.median(ts)
    del a, b
    torch.cuda.empty_cache()
    return 2 * nbytes / t / 1e9, t


# --------------------------------------------------------------------------- emulated module


class EmuModule:
    """Stands in for runtime.Module on a machine without a GPU: runs the simt emulator."""

    def __init__(self, specs):
        from qcc.backends.cuda import simt

        self.simt = simt
        self.specs = {s.name: s for s in specs}
        self.kernels = {s.name: s.manifest() for s in specs}

    def occupancy(self, name):
        return 0

    def bind(self, name, stream=None, **kw):
        spec = self.specs[name]

        def launch(stream=None, sync=False):
            args = {k: (v.numpy() if hasattr(v, "numpy") else v) for k, v in kw.items()}
            self.simt.run(spec, args)
        return launch


# --------------------------------------------------------------------------- run


def cmd_run(args):
    import torch

    pack = _load("pack")
    emulate = args.emulate
    out_dir = args.out or os.environ.get("OUT") or "."
    os.makedirs(out_dir, exist_ok=True)
    log_lines = []

    def log(s=""):
        print(s, flush=True)
        log_lines.append(s)

    if emulate:
        sys.path.insert(0, ROOT)
        specs = kernel_specs(EMU_SHAPES, EMU_VARIANTS, EMU_VARIANTS, w8a8=True)
        mod = EmuModule(specs)
        shapes, dev, timer, bw = EMU_SHAPES, "cpu", CpuTimer(), float("nan")
        sm_count = 132
        log(f"EMULATED run: {len(specs)} kernels, shapes {shapes}")
    else:
        runtime = _load("runtime")
        dev = "cuda"
        torch.zeros(1, device=dev)  # torch creates/uses the primary context first
        rt = runtime.Runtime(0)
        # A bundle from `build_cases` alone has no kernel manifest: only the cases section can run.
        has_kernels = os.path.exists(os.path.join(args.bundle, "manifest.json"))
        mod = runtime.load_bundle(args.bundle, rt) if has_kernels else _NoKernels()
        sm_count = rt.sm_count
        timer = GpuTimer(torch)
        log(f"device: {rt.name} ({rt.arch}, {rt.sm_count} SMs); torch {torch.__version__}; "
            + (f"image {mod.image_kind} {mod.image_arch}; {len(mod.kernels)} kernels" if has_kernels
               else "no kernel bundle (cases only)"))
        bw, tcopy = copy_bandwidth(torch)
        log(f"device-to-device copy (1 GiB, read+write): {bw:.0f} GB/s ({tcopy * 1e3:.3f} ms)")
        shapes = SHAPES + [(K, N) for K, N in PREFILL_SHAPES if any(
            k["config"].get("K") == K and k["config"].get("N") == N for k in mod.kernels.values())]
    sections = set(args.sections.split(","))
    if "linear" not in sections:
        shapes = []
    emu = _Emu() if emulate else None
    t_start = time.time()

    rng = np.random.default_rng(args.seed)
    torch.manual_seed(args.seed)
    results = {"bandwidth_GBps": bw, "rows": [], "checks": []}
    by_kind = {}
    for name, k in mod.kernels.items():
        c = k["config"]
        by_kind.setdefault((c["kind"], c.get("K"), c.get("N")), []).append(name)

    def dev_t(a):
        return torch.from_numpy(np.ascontiguousarray(a)).to(dev)

    def split_check(kind, K, N, Wd, devs, wbytes, names):
        """The GEMV as models use it at decode: one token as f16 hi + lo rows (M=2), fp32 out."""
        for name in names:
            c = mod.kernels[name]["config"]
            if not c.get("out_f32"):
                continue
            try:
                for T in (1, 3):  # tokens
                    x = torch.randn(T, K, dtype=torch.float32, device=dev)
                    hi = x.half()
                    lo = (x - hi.float()).half()
                    x2 = torch.cat([hi, lo]).contiguous()
                    y2 = torch.full((2 * T, N), float("nan"), dtype=torch.float32, device=dev)
                    b = mod.bind(name, x=x2, y=y2, M=2 * T, **devs[0])
                    b() if emulate else b(sync=True)
                    y = y2[:T] + y2[T:]
                    err = rel_err(torch, y.double(), x.double() @ Wd.double().t())
                    results["checks"].append({"name": name, "M": 2 * T, "err": err, "split": True})
                    if not err < 1e-4:
                        log(f"  !! {name} split T={T}: rel err {err:.3e}")
                x = torch.randn(1, K, dtype=torch.float32, device=dev)
                x2 = torch.cat([x.half(), (x - x.half().float()).half()]).contiguous()
                y2 = torch.empty((2, N), dtype=torch.float32, device=dev)
                binds = [mod.bind(name, x=x2, y=y2, M=2, **d) for d in devs]
                launches = [lambda h, b=b: b(stream=h) for b in binds] if not emulate else \
                    [lambda h, b=b: b() for b in binds]
                t, how, spread = timer.time(launches)
                tot = wbytes + 2 * K * 2 + 2 * N * 4
                results["rows"].append({"kind": kind, "K": K, "N": N, "M": 1, "name": name, "us": t,
                                        "bytes": tot, "err": err, "split": True, "cfg": _cfg_str(c) + " split-x"})
                log(f"    {name:48s} {t:8.2f} us {tot / t / 1e3:6.0f} GB/s  split x (fp32-exact), "
                    f"err {err:.1e}")
            except Exception as e:
                log(f"  !! {name} split: {type(e).__name__}: {e}")
                results["checks"].append({"name": name, "M": 2, "err": float("inf")})

    for K, N in shapes:
        t_shape = time.time()
        # ---- weights: w4 (acc layout), w8; dequantized references; fp16 copies
        packed, s4, z4 = w4_data(rng, K, N)
        P4 = pack.pack_w4a16(packed, s4, z4, GROUP)
        P4wg = pack.pack_w4a16(packed, s4, z4, GROUP, order="wgmma")
        q8, s8 = w8_data(rng, K, N)
        P8 = pack.pack_w8a16(q8, s8)
        W4 = torch_dequant_w4(torch, packed, s4, z4, dev)
        W8 = dev_t(q8).float() * dev_t(s8)
        bytes4 = packed.nbytes + s4.nbytes + z4.nbytes
        bytes8 = q8.nbytes + s8.nbytes
        bytes16 = N * K * 2
        ncopy = lambda b: 1 if emulate else max(2, math.ceil(L2_DEFEAT_BYTES / b))  # noqa: E731
        dev4 = [{k: dev_t(v) for k, v in P4.items()} for _ in range(ncopy(bytes4))]
        dev4wg = [{k: dev_t(v) for k, v in P4wg.items()} for _ in range(ncopy(bytes4))] \
            if by_kind.get(("gemm_w4a16_wg", K, N)) else []
        P4wgw = pack.pack_w4a16(packed, s4, z4, GROUP, scale_mode="weight", order="wgmma")
        dev4wgw = [{k: dev_t(v) for k, v in P4wgw.items()} for _ in range(ncopy(bytes4))] \
            if by_kind.get(("gemm_w4a16_wg", K, N)) else []
        dev8 = [{k: dev_t(v) for k, v in P8.items()} for _ in range(ncopy(bytes8))]
        log(f"\n== K={K} N={N}: w4 {bytes4 / 1e6:.1f} MB x{len(dev4)}, w8 {bytes8 / 1e6:.1f} MB "
            f"x{len(dev8)}, fp16 {bytes16 / 1e6:.1f} MB (data {time.time() - t_shape:.1f}s)")
        for kind, Wd, devs, wbytes in (("gemv_w4a16", W4, dev4, bytes4), ("gemm_w4a16", W4, dev4, bytes4),
                                       ("gemm_w4a16_wg", W4, dev4wg, bytes4), ("gemv_w8a16", W8, dev8, bytes8)):
            if kind in ("gemm_w4a16", "gemm_w4a16_wg") and not by_kind.get((kind, K, N)):
                continue
            Wh = [Wd.half().contiguous() for _ in range(ncopy(bytes16))]
            names = by_kind.get((kind, K, N), [])
            def bench_one(name, k, c, M, x, ref, devs=devs):
                devs = dev4wgw if c.get("scale_mode") == "weight" and c["kind"] == "gemm_w4a16_wg" else devs
                for Mc in sorted({1, M, min(c["m_max"], 5)}):  # numerics, incl. odd M
                    xc = x[:Mc].contiguous() if Mc <= M else torch.randn(Mc, K, dtype=torch.float16, device=dev)
                    refc = ref[:Mc] if Mc <= M else xc.float() @ Wd.t()
                    y = torch.full((Mc, N), float("nan"), dtype=torch.float16, device=dev)
                    mod.bind(name, x=xc, y=y, M=Mc, **devs[0])(sync=True) if not emulate else \
                        mod.bind(name, x=xc, y=y, M=Mc, **devs[0])()
                    if not emulate:
                        torch.cuda.synchronize()
                    err = rel_err(torch, y.float(), refc)
                    results["checks"].append({"name": name, "M": Mc, "err": err})
                    if not err < 5e-3:
                        log(f"  !! {name} M={Mc}: rel err {err:.3e}")
                y = torch.empty((M, N), dtype=torch.float16, device=dev)
                binds = [mod.bind(name, x=x, y=y, M=M, **d) for d in devs]
                launches = [lambda h, b=b: b(stream=h) for b in binds] if not emulate else \
                    [lambda h, b=b: b() for b in binds]
                t, how, spread = timer.time(launches)
                occ = mod.occupancy(name)
                nblk = int(np.prod(k["grid"]))
                waves = nblk / (occ * sm_count) if occ else float("nan")
                tot = wbytes + io
                row = {"kind": kind, "K": K, "N": N, "M": M, "name": name, "us": t,
                       "bytes": tot, "err": err, "occupancy": occ, "waves": waves,
                       "regs": (k.get("resources", {}).get("sm_90a") or {}).get("registers"),
                       "spread": spread, "fp16_us": t16,
                       "cfg": _cfg_str(c)}
                results["rows"].append(row)
                log(f"    {name:48s} {t:8.2f} us {tot / t / 1e3:6.0f} GB/s "
                    f"{tot / t / 1e3 / bw:5.1%} x{t16 / t:4.2f} err {err:.1e} "
                    f"occ {occ} waves {waves:.2f} regs {row['regs']}")

            for M in _ms(K, N):
                x = torch.randn(M, K, dtype=torch.float16, device=dev)
                ref = x.float() @ Wd.t()
                # fp16 F.linear baseline on the dequantized weights (cuBLAS)
                yb = torch.nn.functional.linear(x, Wh[0])
                e16 = rel_err(torch, yb.float(), ref)
                if emulate:
                    t16, how16 = float("nan"), "-"
                else:
                    fl = [lambda h, w=w: torch.nn.functional.linear(x, w) for w in Wh]
                    t16, how16, _ = timer.time(fl)
                io = M * K * 2 + M * N * 2
                row16 = {"kind": kind, "K": K, "N": N, "M": M, "name": "torch fp16 F.linear",
                         "us": t16, "bytes": bytes16 + io, "err": e16}
                results["rows"].append(row16)
                log(f"  {kind} M={M:2d}  fp16 F.linear: {t16:8.2f} us  "
                    f"{(bytes16 + io) / t16 / 1e3:7.0f} GB/s  err {e16:.1e}")
                for name in names:
                    k = mod.kernels[name]
                    c = k["config"]
                    if c.get("out_f32") or c["m_max"] < M or (M <= 8) != (c["m_max"] <= 8):
                        continue
                    try:
                        bench_one(name, k, c, M, x, ref)
                    except Exception as e:  # keep going: report the failure, time the rest
                        log(f"  !! {name} M={M}: {type(e).__name__}: {e}")
                        results["checks"].append({"name": name, "M": M, "err": float("inf")})
            split_check(kind, K, N, Wd, devs, wbytes, names)
            del Wh
        del dev4, dev4wg, dev4wgw, dev8, W4, W8
        if not emulate:
            torch.cuda.empty_cache()

    # ---- gemv_i8 (w8a8's integer core): exact i32 sums; time against fp16 F.linear and w8a16
    for (kind, K, N), names in by_kind.items():
        if kind not in ("gemv_i8", "gemm_i8", "gemm_i8_wg") or "linear" not in sections:
            continue
        q = rng.integers(-127, 128, (N, K), dtype=np.int8)
        devs = [dev_t(q) for _ in range(1 if emulate else max(2, math.ceil(L2_DEFEAT_BYTES / q.nbytes)))]
        wref = torch.from_numpy(q).to(dev).double()
        for name in names:
            c = mod.kernels[name]["config"]
            M = c["m_max"]
            xq = dev_t(rng.integers(-128, 128, (M, K), dtype=np.int8))
            y = torch.full((M, N), -1, dtype=torch.int32, device=dev)
            b = mod.bind(name, x=xq, wq=devs[0], y=y, M=M)
            b() if emulate else b(sync=True)
            exact = bool(torch.equal(y.cpu().double(), (xq.double() @ wref.t()).cpu()))
            results["checks"].append({"name": name, "M": M, "err": 0.0 if exact else float("inf")})
            t = float("nan")
            if not emulate:
                binds = [mod.bind(name, x=xq, wq=d, y=y, M=M) for d in devs]
                t, _, spread = timer.time([lambda h, b=b: b(stream=h) for b in binds])
            tot = q.nbytes + M * K + M * N * 4
            t16 = next((r["us"] for r in results["rows"] if r["name"] == "torch fp16 F.linear"
                        and (r["K"], r["N"], r["M"]) == (K, N, M)), float("nan"))
            results["rows"].append({"kind": kind, "K": K, "N": N, "M": M, "name": name, "us": t,
                                    "bytes": tot, "err": 0.0 if exact else float("inf"), "fp16_us": t16,
                                    "cfg": _cfg_str(c)})
            log(f"    {name:48s} {t:8.2f} us {tot / t / 1e3:6.0f} GB/s {tot / t / 1e3 / bw:5.1%} "
                f"x{t16 / t:4.2f} vs fp16  {'exact' if exact else '!! WRONG'}")
        del devs

    # ---- gemv_w8_sparse_x (llm-int8-dynamic's float part): x with 4 non-zero columns, and dense x
    for (kind, K, N), names in by_kind.items():
        if kind != "gemv_w8_sparse_x" or "linear" not in sections:
            continue
        q = rng.integers(-127, 128, (N, K), dtype=np.int8)
        sc = (rng.random(N, dtype=np.float32) * 0.002 + 0.0005).astype(np.float32)
        devs = [dev_t(q) for _ in range(1 if emulate else max(2, math.ceil(L2_DEFEAT_BYTES / q.nbytes)))]
        wd = torch.from_numpy(q).to(dev).double() * torch.from_numpy(sc).to(dev).double()[:, None]
        for name in names:
            M = mod.kernels[name]["config"]["m_max"]
            for what in ("4 columns", "dense"):
                x = torch.randn(M, K, dtype=torch.float32, device=dev)
                if what != "dense":
                    keep = torch.zeros(K, device=dev)
                    keep[torch.randperm(K)[:4]] = 1.0
                    x = (x * keep * 30.0).contiguous()
                y = torch.full((M, N), float("nan"), dtype=torch.float32, device=dev)
                b = mod.bind(name, x=x, wq=devs[0], scales=dev_t(sc), y=y, M=M)
                b() if emulate else b(sync=True)
                err = rel_err(torch, y.double(), x.double() @ wd.t())
                results["checks"].append({"name": name, "M": M, "err": err})
                t = float("nan")
                if not emulate:
                    binds = [mod.bind(name, x=x, wq=d, scales=dev_t(sc), y=y, M=M) for d in devs]
                    t, _, _ = timer.time([lambda h, b=b: b(stream=h) for b in binds])
                ti8 = min((r["us"] for r in results["rows"] if r["kind"] == "gemv_i8"
                           and (r["K"], r["N"], r["M"]) == (K, N, 1 if M == 1 else 16)), default=float("nan"))
                results["rows"].append({"kind": kind, "K": K, "N": N, "M": M, "name": name, "us": t, "x": what,
                                        "err": err})
                log(f"    {name:48s} {t:8.2f} us  x: {what:9s} err {err:.1e}  (best gemv_i8: {ti8:.2f} us)")
        del devs

    log(f"\n(kernel checks and linear benchmark: {time.time() - t_start:.0f}s)")
    model_rows, decode_rows = [], []
    for sec, fn in (("cases", cases_section), ("models", models_section), ("decode", decode_section),
                    ("prefill", prefill_section)):
        if sec in sections:
            t0 = time.time()
            try:
                rows = fn(args, log, results, dev, emu)
                {"models": model_rows, "decode": decode_rows}.get(sec, []).extend(rows)
            except Exception as e:
                import traceback
                log(f"!! section {sec}: {type(e).__name__}: {e}\n{traceback.format_exc()[-2000:]}")
            log(f"({sec}: {time.time() - t0:.0f}s)")

    # ---- summary
    log("\nSummary (best variant per format/shape/M; bytes = weights + scales/zeros + x + y;"
        f" measured copy bandwidth {bw:.0f} GB/s):")
    log(f"{'format':10s} {'K x N':>12s} {'M':>3s} {'kernel us':>10s} {'GB/s':>7s} {'of BW':>6s} "
        f"{'fp16 us':>9s} {'fp16 GB/s':>9s} {'vs fp16':>8s}  config")
    summary = []
    for kind in ("gemv_w4a16", "gemm_w4a16", "gemm_w4a16_wg", "gemv_w8a16", "gemv_i8", "gemm_i8"):
        base_kind = "gemv_w8a16" if kind in ("gemv_i8", "gemm_i8") else kind  # its fp16 baseline rows
        for K, N in shapes:
            for M in _ms(K, N):
                rows = [r for r in results["rows"] if r["kind"] == kind and r["K"] == K
                        and r["N"] == N and r["M"] == M and "cfg" in r and r["err"] < 5e-3
                        and not r.get("split")]
                splits = [r for r in results["rows"] if r["kind"] == kind and r["K"] == K
                          and r["N"] == N and r["M"] == M and r.get("split")]
                base = [r for r in results["rows"] if r["kind"] == base_kind and r["K"] == K
                        and r["N"] == N and r["M"] == M and "cfg" not in r]
                if not rows or not base:
                    continue
                best = min(rows, key=lambda r: r["us"])
                b16 = base[0]
                gbs = best["bytes"] / best["us"] / 1e3
                sp = f"  split-x {splits[0]['us']:.2f} us" if splits else ""
                line = (f"{kind[5:]:10s} {f'{K}x{N}':>12s} {M:3d} {best['us']:10.2f} {gbs:7.0f} "
                        f"{gbs / bw:6.1%} {b16['us']:9.2f} {b16['bytes'] / b16['us'] / 1e3:9.0f} "
                        f"{b16['us'] / best['us']:7.2f}x  {best['cfg']}{sp}")
                log(line)
                summary.append(best | {"fp16_us": b16["us"], "frac_bw": gbs / bw,
                                       "split_us": splits[0]["us"] if splits else None})
    bad = [c for c in results["checks"] if not c["err"] < (1e-4 if c.get("split") else 5e-3)]
    log(f"\nnumerics: {len(results['checks'])} kernel checks, {len(bad)} over 5e-3 (split-x: 1e-4)"
        + (f": {bad[:5]}" if bad else ""))
    if model_rows:
        log("\nWhole models on the GPU vs PyTorch (max |qcc - ref| / max |ref|; bound 1e-4):")
        log(f"{'model':20s} {'recipe':11s} {'rel err':>9s} {'launches':>8s} {'GEMV layers':>11s}  reference")
        for r in model_rows:
            log(f"{r['model']:20s} {r['recipe']:11s} {r['err']:9.2e} {r.get('launches', 0):8d} "
                f"{r.get('gemv_layers', 0):11d}  {r.get('ref', r.get('error', ''))} {'ok' if r['ok'] else 'FAIL'}")
    if decode_rows:
        d = results.get("decode", {})
        log(f"\nDecode, one token (DecodeStep over bench_llama {d.get('config')}), "
            "tokens/s = 1 / step time:")
        for k, v in d.get("baselines_us", {}).items():
            log(f"  {k:26s} {v:9.1f} us  {1e6 / v:8.1f} tok/s")
        for r in decode_rows:
            if "us_graph" in r:
                log(f"  qcc {r['recipe']:22s} {r['us_graph']:9.1f} us  {r['tok_s']:8.1f} tok/s  "
                    f"x{r['vs_eager_fp16']:.2f} vs eager fp16 (x{r['vs_graph_fp16']:.2f} vs fp16 graph); "
                    f"with input copies {r['us_call']:.1f} us (x{r['vs_eager_fp16_call']:.2f}); "
                    f"logits err {r['err_logits']:.1e} [{'ok' if r['ok'] else 'FAIL'}]")
            else:
                log(f"  qcc {r['recipe']:22s} {r.get('error', 'emulated')} err {r.get('err_logits', float('nan')):.1e}"
                    f" [{'ok' if r.get('ok') else 'FAIL'}]")
    bad_models = [r for r in model_rows + decode_rows if not r.get("ok")]
    log(f"\ntotal {time.time() - t_start:.0f}s")
    results["summary"] = summary
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=1, default=float)
    with open(os.path.join(out_dir, "log.txt"), "w") as f:
        f.write("\n".join(log_lines) + "\n")
    if not emulate and args.sass:
        dump_sass(args.bundle, mod, summary, out_dir, log)
    return 1 if bad or bad_models else 0


# --------------------------------------------------------------------------- whole models

# Small models: artifacts carried with their weights; correctness on the GPU against
# PyTorch (float64 on the same GPU) with the artifact's own (dequantized) weights.
SMALL_MODELS = {
    "block-float": ("LlamaBlock", dict(hidden=256, heads=4, kv_heads=2, ffn=768, seed=2),
                    dict(batch=1, seq=8, seed=3), "float"),
    "block-w4a16-g128": ("LlamaBlock", dict(hidden=256, heads=4, kv_heads=2, ffn=768, seed=2),
                         dict(batch=1, seq=8, seed=3), "w4a16-g128"),
    "block-w8a8": ("LlamaBlock", dict(hidden=256, heads=4, kv_heads=2, ffn=768, seed=2),
                   dict(batch=1, seq=8, seed=3), "w8a8"),
    "model-float": ("LlamaModel", dict(vocab=512, hidden=256, layers=2, heads=4, kv_heads=2, ffn=768,
                                       max_seq=64, seed=2), dict(batch=1, seq=16, seed=3), "float"),
    "model-w4a16-g128": ("LlamaModel", dict(vocab=512, hidden=256, layers=2, heads=4, kv_heads=2, ffn=768,
                                            max_seq=64, seed=2), dict(batch=1, seq=16, seed=3), "w4a16-g128"),
    "model-w8a16": ("LlamaModel", dict(vocab=512, hidden=256, layers=2, heads=4, kv_heads=2, ffn=768,
                                       max_seq=64, seed=2), dict(batch=1, seq=16, seed=3), "w8a16"),
    "decode-w4a16-g128": ("DecodeStep", dict(layers=1, hidden=256, ffn=768, heads=4, max_seq=160, cache=64),
                          dict(seed=0), "w4a16-g128"),
    # outlier columns chosen per call on the device (residual-stream channels ~20x the rest)
    "model-llm-int8-dynamic": ("LlamaModel", dict(vocab=512, hidden=256, layers=2, heads=4, kv_heads=2, ffn=768,
                                                  max_seq=64, seed=2, massive_activations=True),
                               dict(batch=1, seq=16, seed=3), "llm-int8-dynamic"),
}
# recipes whose oracle is test_recipes' numpy semantics, computed at build time (not the model on the
# device with the artifact's dequantized weights)
_BUILD_TIME_ORACLE = ("w8a8", "llm-int8-dynamic")
# The benchmark: DecodeStep over test/bench_models.bench_llama (4 layers, hidden 2048, SwiGLU
# 5632, 16 heads, vocab 512) with a 512-token KV cache. Its weights (0.2 B parameters) do not
# travel: the artifact is stored without them and the device fills them from the same
# PyTorch model (quantizing with pack.py for the GEMV layers).
BENCH = dict(layers=4, hidden=2048, ffn=5632, heads=16, max_seq=640, cache=512)
BENCH_QUICK = dict(layers=1, hidden=256, ffn=768, heads=4, max_seq=160, cache=64)
BENCH_RECIPES = ("w4a16-g128", "w8a16", "float", "w8a8", "llm-int8-dynamic", "w8a8-had", "w4a4-had", "w4a8-g128")
BENCH_EXACT = ("w4a16-g128", "w8a16", "float")  # the others quantize activations (or rotate)
KEEP_BYTES = 64 << 10  # bench artifacts keep parameters up to this size (constants, norms)
# Prefill: the same model (LlamaModel, no cache) over 128 tokens, weights filled on the device too.
PREFILL = dict(vocab=512, hidden=2048, layers=4, heads=16, ffn=5632, max_seq=640, seed=0)
PREFILL_QUICK = dict(vocab=512, hidden=256, layers=1, heads=4, ffn=768, max_seq=160, seed=0)
PREFILL_TOKENS = 128
PREFILL_RECIPES = ("w4a16-g128", "w8a8", "w4a4-had", "float")
# prefill artifacts compiled with other qcc.compile options: name -> (recipe, options)
PREFILL_OPTIONS = {"w4a16-g128~f16": ("w4a16-g128", {"gpu_activations": "f16"}),
                   "w4a16-g128~sm90a": ("w4a16-g128", {"gpu_arch": "sm_90a"}),
                   "w4a16-g128~f16~sm90a": ("w4a16-g128", {"gpu_activations": "f16", "gpu_arch": "sm_90a"}),
                   "w8a8~sm90a": ("w8a8", {"gpu_arch": "sm_90a"})}
# build --tile-sweep: the prefill artifacts of these recipes again under other tile_contract
# settings (linalg_kernels: TILE_MIN_BLOCKS, TILE_CHUNK_LONG), run as recipes named recipe~tag
TILE_SWEEP_RECIPES = ("w8a8", "float")
TILE_VARIANTS = {"b256": {"TILE_MIN_BLOCKS": 256}, "b512": {"TILE_MIN_BLOCKS": 512},
                 "k32": {"TILE_CHUNK_LONG": (64, 32)}, "b256k32": {"TILE_MIN_BLOCKS": 256, "TILE_CHUNK_LONG": (64, 32)},
                 "k64": {"TILE_CHUNK_LONG": (64, 64)}}


def _test_path():
    p = os.path.join(ROOT, "test")
    if p not in sys.path:
        sys.path.insert(0, p)


def make_model(cls, ctor, inp):
    """(module, example inputs) from a SMALL_MODELS / BENCH description (torch only)."""
    _test_path()
    import models
    if cls == "DecodeStep":
        import torch
        from bench_models import DecodeStep, bench_llama
        c = dict(ctor)
        cache = c.pop("cache")
        cache_dtype = {"f32": torch.float32, "f16": torch.float16}[c.pop("cache_dtype", "f32")]
        m = DecodeStep(bench_llama(**c), cache, cache_dtype=cache_dtype).eval()
        return m, m.example_inputs(**inp)
    m = getattr(models, cls)(**ctor).eval()
    return m, m.example_inputs(**inp)


def _cpu_reference(model, inputs, recipe, compiled):
    """float64 CPU outputs of the artifact's semantics (the test suite's oracles)."""
    import torch
    from qcc.backends.cuda import torch_ref
    from qcc.reference import dequantized_weights

    if recipe == "w8a8":
        _test_path()
        sys.path.insert(0, os.path.join(ROOT, "test", "python"))
        from test_recipes import RECIPE_FORMATS, fake_quant_model
        linears = [f"{n}.weight" for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
        ref = fake_quant_model(model, {w: RECIPE_FORMATS["w8a8"] for w in linears})
    elif recipe == "llm-int8-dynamic":
        _test_path()
        sys.path.insert(0, os.path.join(ROOT, "test", "python"))
        from test_recipes import dynamic_split_model
        ref = dynamic_split_model(model)
    elif recipe == "float":
        ref = model
    else:
        ref = torch_ref.a16_reference(model, compiled.manifest, dequantized_weights(compiled))
    xs = [x.double() if x.is_floating_point() else x for x in inputs]
    with torch.no_grad():
        out = ref.double()(*xs) if recipe not in _BUILD_TIME_ORACLE else ref(*inputs)
    return [o.double().numpy() for o in (out if isinstance(out, tuple) else (out,))]


def build_models(out_dir, quick=False, arch="sm_90", tile_sweep=False):
    import numpy as np
    import qcc
    from qcc.model import CompiledModel

    mdir = os.path.join(out_dir, "models")
    os.makedirs(mdir, exist_ok=True)
    meta = {"small": {}, "bench": {}}
    for name, (cls, ctor, inp, recipe) in SMALL_MODELS.items():
        t0 = time.time()
        model, inputs = make_model(cls, ctor, inp)
        c = qcc.compile(model, inputs, target="cuda", quant=recipe, gpu_arch=arch)
        c.save(os.path.join(mdir, f"{name}.qcc"))
        expect = _cpu_reference(model, inputs, recipe, c)
        floats = _cpu_reference(model, inputs, "float", c) if recipe in _BUILD_TIME_ORACLE else []
        np.savez(os.path.join(mdir, f"{name}.npz"),
                 **{f"in{i}": x.numpy() for i, x in enumerate(inputs)},
                 **{f"expect{i}": e for i, e in enumerate(expect)},
                 **{f"float{i}": e for i, e in enumerate(floats)})
        meta["small"][name] = {"cls": cls, "ctor": ctor, "inputs": inp, "recipe": recipe,
                               "launches": len(c.manifest["cuda"]["plan"]["launches"]),
                               "gemv_layers": len(c.manifest["cuda"]["layers"])}
        print(f"  {name}: {meta['small'][name]['launches']} launches, {time.time() - t0:.1f}s", flush=True)
    bench = BENCH_QUICK if quick else BENCH
    for recipe in BENCH_RECIPES:
        t0 = time.time()
        ctor = dict(bench)
        model, inputs = make_model("DecodeStep", ctor, {"seed": 0})
        c = qcc.compile(model, inputs, target="cuda", quant=recipe, gpu_arch=arch)
        if c.manifest["cuda"]["fallback"]:
            raise SystemExit(f"bench {recipe}: layers off the GEMV path: {c.manifest['cuda']['fallback']}")
        keep = {n: w for n, w in c.weights.items() if w.nbytes <= KEEP_BYTES or n.startswith("__cuda_const")}
        CompiledModel(c.manifest, keep, c.code).save(os.path.join(mdir, f"bench-{recipe}.qcc"))
        meta["bench"][recipe] = {"ctor": ctor, "launches": len(c.manifest["cuda"]["plan"]["launches"]),
                                 "weight_bytes": int(sum(w.nbytes for w in c.weights.values())),
                                 "stripped": sorted(set(c.weights) - set(keep))}
        print(f"  bench-{recipe}: {meta['bench'][recipe]['launches']} launches, "
              f"{meta['bench'][recipe]['weight_bytes'] / 1e6:.1f} MB of weights (filled on the device), "
              f"{time.time() - t0:.1f}s", flush=True)
    meta["prefill"] = {}
    from qcc.backends.cuda import linalg_kernels
    runs = [(r, r, {}, {}) for r in PREFILL_RECIPES] + [(k, r, {}, o) for k, (r, o) in PREFILL_OPTIONS.items()]
    runs += [(f"{r}~{tag}", r, v, {}) for tag, v in TILE_VARIANTS.items() for r in TILE_SWEEP_RECIPES] if tile_sweep else []
    for key, recipe, settings, options in runs:
        t0 = time.time()
        ctor = dict(PREFILL_QUICK if quick else PREFILL)
        model, inputs = make_model("LlamaModel", ctor, {"batch": 1, "seq": PREFILL_TOKENS, "seed": 3})
        saved = {k: getattr(linalg_kernels, k) for k in settings}
        try:
            for k, v in settings.items():
                setattr(linalg_kernels, k, v)
            c = qcc.compile(model, inputs, target="cuda", quant=recipe, **({"gpu_arch": arch} | options))
        finally:
            for k, v in saved.items():
                setattr(linalg_kernels, k, v)
        recipe = key
        keep = {n: w for n, w in c.weights.items() if w.nbytes <= KEEP_BYTES or n.startswith("__cuda_const")}
        CompiledModel(c.manifest, keep, c.code).save(os.path.join(mdir, f"prefill-{recipe}.qcc"))
        meta["prefill"][recipe] = {"ctor": ctor, "launches": len(c.manifest["cuda"]["plan"]["launches"])}
        print(f"  prefill-{recipe}: {meta['prefill'][recipe]['launches']} launches, {time.time() - t0:.1f}s", flush=True)
    with open(os.path.join(mdir, "models.json"), "w") as f:
        json.dump(meta, f, indent=1)


def build_cases(out_dir):
    """Every CUDA case of the test suite (test/python/test_cuda_model.py CASES) compiled here
    with its inputs and its float64 oracle (and, for recipes that quantize activations, the float
    model's outputs), so the run checks on the hardware what CI checks on the emulator."""
    import qcc

    _test_path()
    sys.path.insert(0, os.path.join(ROOT, "test", "python"))
    import test_cuda_model as tcm

    cdir = os.path.join(out_dir, "cases")
    os.makedirs(cdir, exist_ok=True)
    meta = {}
    for name, (make, recipe) in tcm.CASES.items():
        t0 = time.time()
        model, inputs = make()
        c = qcc.compile(model, inputs, target="cuda", quant=recipe)  # as the tests compile it
        c.save(os.path.join(cdir, f"{name}.qcc"))
        expect = tcm.reference(model, inputs, recipe, c)
        floats = tcm.f64(model, inputs) if recipe in _BUILD_TIME_ORACLE else []
        np.savez(os.path.join(cdir, f"{name}.npz"),
                 **{f"in{i}": x.numpy() for i, x in enumerate(inputs)},
                 **{f"expect{i}": np.asarray(e) for i, e in enumerate(expect)},
                 **{f"float{i}": np.asarray(e) for i, e in enumerate(floats)})
        meta[name] = {"recipe": os.path.basename(recipe), "launches": len(c.manifest["cuda"]["plan"]["launches"])}
        print(f"  case {name}: {meta[name]['launches']} launches, {time.time() - t0:.1f}s", flush=True)
    with open(os.path.join(cdir, "cases.json"), "w") as f:
        json.dump(meta, f, indent=1)


def _code_flips(got, expect, floats):
    """(ok, note) for quantized activations: where the GPU's float rounding (RMSNorm, softmax)
    differs from the CPU's by an ulp at a rounding boundary, an integer code flips and moves its
    outputs by one quantization step; the GPU's distance from the oracle must then stay a small
    fraction (1/4) of the recipe's own quantization error (oracle vs float model)."""
    dist = max(_frob(g, e) for g, e in zip(got, expect))
    quant = max(_frob(e, f) for e, f in zip(expect, floats))
    return dist <= 0.25 * quant, f"; code flips: ||gpu - oracle|| {dist:.2e} vs quantization error {quant:.2e}"


def _within_bounds(got, expect, floats):
    """(ok, error, note): max-relative error <= 1e-4, or within `_code_flips` where the recipe
    quantizes activations (`floats`: the float model's outputs)."""
    err = max(_rel(g, e) for g, e in zip(got, expect))
    if err <= 1e-4 or not floats:
        return err <= 1e-4, err, ""
    ok, note = _code_flips(got, expect, floats)
    return ok, err, note


class _NoKernels:
    """Stands for the kernel bundle when a directory holds the test cases only."""
    kernels = {}


def cases_section(args, log, results, dev, emu):
    """The test suite's CUDA cases on the device against their float64 oracles (built here)."""
    import torch
    mr = _load("model_runtime")
    cdir = os.path.join(args.bundle, "cases")
    if not os.path.exists(os.path.join(cdir, "cases.json")):
        log("\n(no cases in this bundle)")
        return []
    with open(os.path.join(cdir, "cases.json")) as f:
        meta = json.load(f)
    log("\n== the test suite's CUDA cases on the device vs their float64 oracles")
    rows = []
    for name, m in meta.items():
        try:
            if emu:
                emu.add_specs_for_case(name)
                emu.driver()
            manifest, weights, code = mr.load_artifact(os.path.join(cdir, f"{name}.qcc"))
            cm = mr.CudaModel(manifest, weights, code)
            data = np.load(os.path.join(cdir, f"{name}.npz"))
            xs = [data[f"in{i}"] for i in range(len(manifest["inputs"]))]
            expect = [data[k] for k in sorted(data.files) if k.startswith("expect")]
            floats = [data[k] for k in sorted(data.files) if k.startswith("float")]
            got = cm(*xs) if emu else cm(*[torch.from_numpy(x).to(dev) for x in xs])
            got = [g.float().cpu().numpy() if hasattr(g, "cpu") else np.asarray(g)
                   for g in (got if isinstance(got, tuple) else (got,))]
            ok, err, note = _within_bounds(got, expect, floats)
            ok = ok and len(got) == len(expect) and all(g.shape == e.shape for g, e in zip(got, expect))
            rows.append({"case": name, "recipe": m["recipe"], "err": err, "ok": ok, "launches": m["launches"]})
            log(f"  {name:34s} {m['recipe']:16s} rel err {err:.2e} {m['launches']:4d} launches{note} "
                f"[{'ok' if ok else 'FAIL'}]")
            cm.close()
        except Exception as e:
            import traceback
            log(f"  !! {name}: {type(e).__name__}: {e}\n{traceback.format_exc()[-1500:]}")
            rows.append({"case": name, "recipe": m["recipe"], "err": float("inf"), "ok": False,
                         "error": f"{type(e).__name__}: {e}"})
    bad = [r["case"] for r in rows if not r["ok"]]
    log(f"cases: {len(rows) - len(bad)} of {len(rows)} within bounds" + (f"; FAILED: {bad}" if bad else ""))
    results["cases"] = rows
    return rows


class _Emu:
    """Emulation of the device side: FakeDriver + kernel specs recompiled here."""

    def __init__(self):
        self.specs = {}

    def add_specs_for(self, cls, ctor, inp, recipe):
        import qcc
        model, inputs = make_model(cls, ctor, inp)
        c = qcc.compile(model, inputs, target="cuda", quant=recipe)
        self.specs.update(c.cuda_specs)

    def add_specs_for_case(self, name):
        _test_path()
        sys.path.insert(0, os.path.join(ROOT, "test", "python"))
        import test_cuda_model
        self.specs.update(test_cuda_model.compiled_case(name)[3].cuda_specs)

    def driver(self):
        emulate = _load("emulate")
        runtime = _load("runtime")
        drv = emulate.FakeDriver(self.specs)
        runtime._driver = lambda: drv
        return drv


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if not np.isfinite(a).all():
        return float("inf")
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def _frob(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)) if np.isfinite(a).all() else float("inf")


def _state_dict_from_artifact(manifest, weights, pack):
    """{state-dict name: float array}: the artifact's float parameters, and each quantized
    weight dequantized as the kernels decode it."""
    sd = {n: w for n, w in weights.items() if ":" not in n and not n.startswith("__")}
    for base, info in manifest["cuda"]["layers"].items():
        sd[base] = pack.dequantize_layer(info, weights)
    return sd


def models_section(args, log, results, dev, emu):
    """Correctness of small whole models on the GPU against PyTorch on the same GPU."""
    import torch
    mr, pack = _load("model_runtime"), _load("pack")
    mdir = os.path.join(args.bundle, "models")
    with open(os.path.join(mdir, "models.json")) as f:
        meta = json.load(f)
    log("\n== whole models: qcc CUDA artifacts vs PyTorch float64 on the same device")
    rows = []
    for name, m in meta["small"].items():
        try:
            t0 = time.time()
            if emu:
                emu.add_specs_for(m["cls"], m["ctor"], m["inputs"], m["recipe"])
                emu.driver()
            manifest, weights, code = mr.load_artifact(os.path.join(mdir, f"{name}.qcc"))
            cm = mr.CudaModel(manifest, weights, code)
            data = np.load(os.path.join(mdir, f"{name}.npz"))
            xs = [torch.from_numpy(data[f"in{i}"]) for i in range(len(manifest["inputs"]))]
            expect_cpu = [data[k] for k in sorted(data.files) if k.startswith("expect")]
            float_cpu = [data[k] for k in sorted(data.files) if k.startswith("float")]
            got = cm(*[x.to(dev) for x in xs]) if not emu else cm(*[x.numpy() for x in xs])
            got = [g.float().cpu().numpy() if hasattr(g, "cpu") else g for g in
                   (got if isinstance(got, tuple) else (got,))]
            # PyTorch on the device: the model with the artifact's weights, float64 and float32
            model, _ = make_model(m["cls"], m["ctor"], m["inputs"])
            if m["recipe"] not in _BUILD_TIME_ORACLE:
                sd = _state_dict_from_artifact(manifest, weights, pack)
                # parameters the traced graph does not use (e.g. a decode step's causal mask) are
                # not in the artifact; the model keeps its own values for them
                model.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sd.items()
                                       if k in model.state_dict()}, strict=False)
                with torch.no_grad():
                    r64 = model.double().to(dev)(*[x.double().to(dev) if x.is_floating_point() else x.to(dev)
                                                   for x in xs])
                    r64 = [r.cpu().numpy() for r in (r64 if isinstance(r64, tuple) else (r64,))]
                    r32 = model.float()(*[x.float().to(dev) if x.is_floating_point() else x.to(dev) for x in xs])
                    r32 = [r.cpu().numpy() for r in (r32 if isinstance(r32, tuple) else (r32,))]
                err = max(_rel(g, r) for g, r in zip(got, r64))
                err32 = max(_rel(a, b) for a, b in zip(r32, r64))
                ref_kind = "torch f64 on device"
            else:  # the fake-quant oracle of test_recipes, computed at build time (float64, CPU)
                err, err32 = max(_rel(g, e) for g, e in zip(got, expect_cpu)), float("nan")
                ref_kind = "fake-quant f64 (CPU, build time)"
            err_cpu = max(_rel(g, e) for g, e in zip(got, expect_cpu))
            ok = err <= 1e-4
            flips = ""
            if not ok and float_cpu:
                ok, flips = _code_flips(got, expect_cpu, float_cpu)
            row = {"model": name, "recipe": m["recipe"], "err": err, "err_vs_build_ref": err_cpu,
                   "torch_f32_err": err32, "launches": len(manifest["cuda"]["plan"]["launches"]),
                   "gemv_layers": len(manifest["cuda"]["layers"]), "ok": ok, "ref": ref_kind,
                   "image": cm.image, "graph": cm.use_graph}
            rows.append(row)
            log(f"  {name:20s} {m['recipe']:11s} rel err {err:.2e} ({ref_kind}; build-time oracle "
                f"{err_cpu:.2e}; torch f32 itself {err32:.1e}) {row['launches']} launches, "
                f"{row['gemv_layers']} GEMV layers, {cm.image}, graph {cm.use_graph}{flips} "
                f"[{'ok' if ok else 'FAIL'}] {time.time() - t0:.1f}s")
            cm.close()
        except Exception as e:
            import traceback
            log(f"  !! {name}: {type(e).__name__}: {e}")
            log(traceback.format_exc()[-1500:])
            rows.append({"model": name, "recipe": m["recipe"], "err": float("inf"), "ok": False,
                         "error": f"{type(e).__name__}: {e}"})
    results["models"] = rows
    return rows


def _fill_bench_weights(manifest, weights, model, pack):
    """Weights for a stripped bench artifact from `model` (float): float parameters by name,
    GEMV layers quantized (min/max, as pack.quantize_w4/_w8) and repacked; returns
    (weights, {weight name: dequantized float32}) for the reference."""
    sd = {k: v.detach().float().cpu().numpy() for k, v in model.state_dict().items()}
    w = dict(weights)
    deq = {}
    gemvs = {}  # one GEMV (its parameter names) -> its layers; stacked layers share one
    for base, info in manifest["cuda"]["layers"].items():
        gemvs.setdefault(tuple(sorted(info["params"].values())), []).append((info.get("cols", [0]), base, info))
    for members in gemvs.values():
        members.sort(key=lambda m: m[0][0])
        info = members[0][2]
        W = np.concatenate([sd[base] for _, base, _ in members], axis=0)
        if info["builder"] in W4_KINDS:
            G = info["args"]["group_size"]
            packed, s, z = pack.quantize_w4(W, G, symmetric=not info["args"]["zero_point"])
            arrays = pack.pack_w4a16(packed, s, z, G, scale_mode=info["args"].get("scale_mode"),
                                     order=pack.w4_order(info["builder"]))
        else:
            q, s = pack.quantize_w8(W)
            arrays = pack.pack_w8a16(q, s)
        for role, name in info["params"].items():
            w[name] = arrays[role]
        for _, base, inf in members:
            deq[base] = pack.dequantize_layer(inf, w)
    for r in manifest["cuda"]["plan"]["buffers"]:
        if r["kind"] == "param" and r["name"] not in w:
            name = r["name"]
            base, _, role = name.rpartition(":")
            base, _, fmt = base.rpartition(":")
            if name in sd:
                w[name] = sd[name]
            elif fmt == "int8_sym_channel" and base in sd:  # qcc's own layout (gemv_i8 layers)
                q, sc = pack.quantize_w8(sd[base])
                w[f"{base}:{fmt}:codes"], w[f"{base}:{fmt}:scale"] = q, sc
                deq[base] = pack.dequant_w8(q, sc)
            elif fmt == "int4_sym_channel" and base in sd:  # (gemv_i8 w_bits=4 layers)
                N, K = sd[base].shape
                packed, sc, _ = pack.quantize_w4(sd[base], K, symmetric=True)
                w[f"{base}:{fmt}:codes"], w[f"{base}:{fmt}:scale"] = packed.view(np.int8), sc.reshape(N, 1)
                deq[base] = (pack.unpack_int4(packed).astype(np.float32) - 8.0) * sc.reshape(N, 1)
            elif fmt.startswith("int4_asym_g") and base in sd:  # (gemv_i4g layers)
                G = int(fmt[len("int4_asym_g"):])
                packed, sc, z = pack.quantize_w4(sd[base], G, symmetric=False)
                w[f"{base}:{fmt}:codes"], w[f"{base}:{fmt}:scale"] = packed.view(np.int8), sc
                w[f"{base}:{fmt}:zero"] = z.view(np.int8)
                N, K = sd[base].shape
                deq[base] = ((pack.unpack_int4(packed).astype(np.float32).reshape(N, K // G, G) - z[..., None])
                             * sc[..., None]).reshape(N, K)
            else:
                raise RuntimeError(f"cannot fill parameter {name}")
    return w, deq


def _time_torch(torch, fn, iters, warmup=5):
    """Mean seconds per call of fn() by CUDA events around `iters` calls (CPU launch overhead
    included: the GPU waits for eager launches)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    best = []
    for _ in range(3):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        for _ in range(iters):
            fn()
        e1.record()
        e1.synchronize()
        best.append(e0.elapsed_time(e1) / 1e3 / iters)
    return statistics.median(best)


def _time_torch_graph(torch, fn, iters, base, log):
    """base["torch fp16 + CUDA graph"] = seconds per replay of fn() captured in a CUDA graph
    (after three warm-up calls on a side stream); logs why when capture fails."""
    try:
        g = torch.cuda.CUDAGraph()
        st = torch.cuda.Stream()
        st.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(st):
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(st)
        with torch.cuda.graph(g):
            fn()
        base["torch fp16 + CUDA graph"] = _time_torch(torch, g.replay, iters)
    except Exception as e:
        log(f"  (torch CUDA graph baseline failed: {type(e).__name__}: {e})")


def decode_section(args, log, results, dev, emu):
    """Decode speed of the benchmark model (one token, 512-token KV cache) vs PyTorch eager."""
    import copy
    import torch
    mr, pack = _load("model_runtime"), _load("pack")
    mdir = os.path.join(args.bundle, "models")
    with open(os.path.join(mdir, "models.json")) as f:
        meta = json.load(f)
    rows = []
    bench = next(iter(meta["bench"].values()))["ctor"] if meta["bench"] else None
    if bench is None:
        return rows
    log(f"\n== decode: DecodeStep(bench_llama) {bench} (one token attending to the KV cache)")
    torch.manual_seed(0)
    model, inputs = make_model("DecodeStep", bench, {"seed": 0})
    ids, kc, vc = inputs
    ins = (ids.to(dev), kc.to(dev), vc.to(dev))
    base = {}
    if not emu:  # PyTorch baselines on the same GPU
        with torch.no_grad():
            m16 = copy.deepcopy(model).half().to(dev)
            ins16 = (ins[0], ins[1].half(), ins[2].half())
            m32 = copy.deepcopy(model).to(dev)
            # interleaved, twice each (warm-up and clock effects show as a difference; the best counts)
            t16 = [_time_torch(torch, lambda: m16(*ins16), args.decode_iters, warmup=10)]
            t32 = [_time_torch(torch, lambda: m32(*ins), args.decode_iters, warmup=10)]
            t16.append(_time_torch(torch, lambda: m16(*ins16), args.decode_iters))
            t32.append(_time_torch(torch, lambda: m32(*ins), args.decode_iters))
            log(f"  (eager passes: fp16 {[round(t * 1e6) for t in t16]} us, fp32 {[round(t * 1e6) for t in t32]} us)")
            base["torch eager fp16"] = min(t16)
            base["torch eager fp32"] = min(t32)
            _time_torch_graph(torch, lambda: m16(*ins16), args.decode_iters, base, log)
            del m16, m32
            torch.cuda.empty_cache()
        for k, t in base.items():
            log(f"  {k:26s} {t * 1e6:9.1f} us/token  {1 / t:8.1f} tok/s")
    for recipe, info in meta["bench"].items():
        try:
            t0 = time.time()
            if emu:
                emu.add_specs_for("DecodeStep", info["ctor"], {"seed": 0}, recipe)
                emu.driver()
            manifest, weights, code = mr.load_artifact(os.path.join(mdir, f"bench-{recipe}.qcc"))
            weights, deq = _fill_bench_weights(manifest, weights, model, pack)
            cm = mr.CudaModel(manifest, weights, code)
            tload = time.time() - t0
            # an artifact built for f16 caches takes the same caches rounded to f16 (the model
            # widens them with .float(), so the PyTorch reference below reads the same values)
            f16 = info["ctor"].get("cache_dtype") == "f16"
            ins = (ids.to(dev), kc.to(dev), vc.to(dev))
            if f16:
                ins = (ins[0], ins[1].half(), ins[2].half())
            outs = cm(*ins) if not emu else cm(*[x.cpu().numpy() for x in ins])
            outs = [o.float().cpu().numpy() if hasattr(o, "cpu") else o for o in outs]
            ref = copy.deepcopy(model)
            sd = ref.state_dict()
            with torch.no_grad():
                for k, v in deq.items():
                    sd[k].copy_(torch.from_numpy(v))
                r = ref.to(dev)(*ins)
            errs = [_rel(o, x.float().cpu().numpy()) for o, x in zip(outs, r)]
            # w8a8, llm-int8-dynamic and w4a4-had also quantize activations (per token), w4a4-had
            # rotates: their reference here is only the weight-dequantized float model, for
            # information (block-w8a8 and model-llm-int8-dynamic check exact semantics)
            ok = max(errs) <= 1e-4 if recipe in BENCH_EXACT else bool(np.isfinite(errs).all())
            row = {"recipe": recipe, "err_logits": errs[0], "err_kv": max(errs[1:]), "ok": ok,
                   "launches": len(manifest["cuda"]["plan"]["launches"]), "weight_bytes": cm.weight_bytes,
                   "load_s": round(tload, 2), "image": cm.image}
            if not emu:
                t_graph = cm.time_replays(args.decode_iters)
                row["us_serial"] = _serial_launch_us(cm, args.decode_iters)
                t_call = _time_torch(torch, lambda: cm.run_torch(*ins), args.decode_iters)
                row.update({"us_graph": t_graph * 1e6, "us_call": t_call * 1e6,
                            "tok_s": 1 / t_graph, "tok_s_call": 1 / t_call,
                            "vs_eager_fp16": base.get("torch eager fp16", float("nan")) / t_graph,
                            "vs_eager_fp16_call": base.get("torch eager fp16", float("nan")) / t_call,
                            "vs_graph_fp16": base.get("torch fp16 + CUDA graph", float("nan")) / t_graph,
                            "gbps": cm.weight_bytes / t_graph / 1e9})
                log(f"  qcc {recipe:11s} {t_graph * 1e6:8.1f} us/token (graph replay) = {1 / t_graph:8.1f} tok/s, "
                    f"x{row['vs_eager_fp16']:.2f} vs eager fp16; per call incl. input copies "
                    f"{t_call * 1e6:8.1f} us (x{row['vs_eager_fp16_call']:.2f}); "
                    f"{row['gbps']:.0f} GB/s of weights; logits err {errs[0]:.1e} kv err {max(errs[1:]):.1e}; "
                    f"{row['launches']} launches{_serial_note(row)}")
                try:
                    prof = cm.profile(reps=5)  # inside a CUDA graph, event nodes between launches
                    row["profile"] = prof
                    cats = {}
                    for d in prof:
                        k = d["kernel"].split("_")
                        cat = {"qk": "generated " + "_".join(k[-3:-1]), "fused2": "fused",
                               "fused3": "fused", "fused4": "fused", "fused5": "fused"}.get(k[0], k[0])
                        c = cats.setdefault(cat, [0, 0.0])
                        c[0] += d["launches"]
                        c[1] += d["us"]
                    tot = sum(d["us"] for d in prof)
                    log(f"    per-launch GPU time in a CUDA graph {tot:.1f} us over {row['launches']} launches: " +
                        ", ".join(f"{k} {v[1]:.1f} us/{v[0]}" for k, v in sorted(cats.items(), key=lambda x: -x[1][1])))
                    for d in prof[:12]:
                        log(f"      {d['us']:8.1f} us {d['launches']:3d}x {d['kernel']}")
                except Exception as e:
                    log(f"    (profile failed: {type(e).__name__}: {e})")
            else:
                log(f"  qcc {recipe:11s} emulated: logits err {errs[0]:.1e} kv err {max(errs[1:]):.1e}, "
                    f"{row['launches']} launches")
            rows.append(row)
            cm.close()
            del weights
        except Exception as e:
            import traceback
            log(f"  !! bench {recipe}: {type(e).__name__}: {e}")
            log(traceback.format_exc()[-1500:])
            rows.append({"recipe": recipe, "ok": False, "error": f"{type(e).__name__}: {e}"})
    results["decode"] = {"baselines_us": {k: v * 1e6 for k, v in base.items()}, "rows": rows, "config": bench}
    return rows


def _serial_launch_us(cm, iters):
    """The same plan's replay time with every kernel launched without programmatic stream
    serialization (each waits for the previous one to finish before it launches), for the
    A/B of programmatic dependent launch; None when the model does not launch that way."""
    if not cm.programmatic:
        return None
    cm.set_programmatic(False)
    try:
        return cm.time_replays(iters) * 1e6
    finally:
        cm.set_programmatic(True)


def _serial_note(row):
    t = row.get("us_serial")
    return "" if t is None else f"; serial launches {t:.1f} us (x{t / row['us_graph']:.2f})"


def prefill_section(args, log, results, dev, emu):
    """Prefill speed: LlamaModel over PREFILL_TOKENS tokens (no cache) vs PyTorch fp16 on the GPU."""
    import copy
    import torch
    mr, pack = _load("model_runtime"), _load("pack")
    mdir = os.path.join(args.bundle, "models")
    with open(os.path.join(mdir, "models.json")) as f:
        meta = json.load(f).get("prefill", {})
    if not meta or emu:
        return []
    ctor = next(iter(meta.values()))["ctor"]
    log(f"\n== prefill: LlamaModel {ctor}, {PREFILL_TOKENS} tokens, batch 1")
    model, inputs = make_model("LlamaModel", ctor, {"batch": 1, "seq": PREFILL_TOKENS, "seed": 3})
    ids = inputs[0].to(dev)
    base = {}
    with torch.no_grad():
        m16 = copy.deepcopy(model).half().to(dev)
        base["torch eager fp16"] = _time_torch(torch, lambda: m16(ids), args.decode_iters, warmup=10)
        _time_torch_graph(torch, lambda: m16(ids), args.decode_iters, base, log)
        del m16
        torch.cuda.empty_cache()
    for k, t in base.items():
        log(f"  {k:26s} {t * 1e6:9.1f} us  {PREFILL_TOKENS / t:9.0f} tok/s")
    rows = []
    for recipe in meta:
        try:
            manifest, weights, code = mr.load_artifact(os.path.join(mdir, f"prefill-{recipe}.qcc"))
            weights, deq = _fill_bench_weights(manifest, weights, model, pack)
            cm = mr.CudaModel(manifest, weights, code)
            out = cm(ids)[0].float().cpu().numpy()
            ref = copy.deepcopy(model)
            sd = ref.state_dict()
            with torch.no_grad():
                for k, v in deq.items():
                    sd[k].copy_(torch.from_numpy(v))
                r = ref.to(dev)(ids).float().cpu().numpy()
            err = _rel(out, r)
            t = cm.time_replays(args.decode_iters)
            row = {"recipe": recipe, "us_graph": t * 1e6, "tok_s": PREFILL_TOKENS / t, "err_logits": err,
                   "us_serial": _serial_launch_us(cm, args.decode_iters),
                   "launches": len(manifest["cuda"]["plan"]["launches"]),
                   "vs_graph_fp16": base.get("torch fp16 + CUDA graph", float("nan")) / t,
                   "vs_eager_fp16": base.get("torch eager fp16", float("nan")) / t}
            log(f"  qcc {recipe:11s} {t * 1e6:9.1f} us (graph replay) {row['tok_s']:9.0f} tok/s, "
                f"x{row['vs_graph_fp16']:.2f} vs fp16 + CUDA graph, x{row['vs_eager_fp16']:.2f} vs eager fp16; "
                f"logits err {err:.1e} (vs the weight-dequantized float model); {row['launches']} launches"
                f"{_serial_note(row)}")
            prof = cm.profile(reps=3)
            for d in prof[:6]:
                log(f"      {d['us']:8.1f} us {d['launches']:3d}x {d['kernel']}")
            rows.append(row)
            cm.close()
        except Exception as e:
            import traceback
            log(f"  !! prefill {recipe}: {type(e).__name__}: {e}\n{traceback.format_exc()[-1500:]}")
            rows.append({"recipe": recipe, "error": f"{type(e).__name__}: {e}"})
    results["prefill"] = {"baselines_us": {k: v * 1e6 for k, v in base.items()}, "rows": rows, "config": ctor}
    return rows


def dump_sass(bundle, mod, summary, out_dir, log):
    cub = os.path.join(bundle, f"kernels_{mod.image_arch}.cubin")
    exe = "cuobjdump"
    names = sorted({r["name"] for r in summary if r["N"] == 28672})
    try:
        with open(os.path.join(out_dir, "sass.txt"), "w") as f:
            for n in names:
                p = subprocess.run([exe, "-sass", "-fun", n, cub], capture_output=True, text=True)
                f.write(f"// ===== {n}\n{p.stdout}{p.stderr}\n")
        log(f"SASS of {len(names)} kernels in sass.txt")
    except Exception as e:
        log(f"(no SASS: {e})")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build")
    b.add_argument("--out", default=os.path.join(ROOT, ".cuda_build"))
    b.add_argument("--arch", action="append", default=None)
    b.add_argument("--sweep", action="store_true", help="every kernel variant (the tuning sweep)")
    b.add_argument("--prefill-sweep", action="store_true", help="every prefill GEMM variant")
    b.add_argument("--tile-sweep", action="store_true", help="prefill artifacts under TILE_VARIANTS")
    b.add_argument("--quick", action="store_true", help="a tiny benchmark model (for run --emulate)")
    b.add_argument("--no-models", dest="models", action="store_false")
    r = sub.add_parser("run")
    r.add_argument("--bundle", default=os.path.join(ROOT, ".cuda_build"))
    r.add_argument("--out", default=None)
    r.add_argument("--emulate", action="store_true")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--no-sass", dest="sass", action="store_false")
    r.add_argument("--sections", default="linear,cases,models,decode,prefill")
    r.add_argument("--decode-iters", type=int, default=100)
    a = ap.parse_args(argv)
    if a.cmd == "build":
        a.arch = a.arch or ["sm_90a"]
        return cmd_build(a)
    return cmd_run(a)


if __name__ == "__main__":
    sys.exit(main())
