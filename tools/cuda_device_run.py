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
def _v(nt, kw, u, nw=1, s=0, wc=None, d=1, ms=False):
    return dict(n_tiles=nt, k_warps=kw, unroll=u, n_warps=nw, stages=s, w_cache=wc, depth=d,
                **({"meta_smem": True} if ms else {}))


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
EMU_SHAPES = [(512, 64), (1024, 128)]
EMU_VARIANTS = {8: [_v(1, 2, 2), _v(2, 2, 1, wc="no_allocate"), _v(1, 2, 1, s=3)],
                16: [_v(2, 1, 2), _v(2, 1, 1, nw=2, s=3), _v(1, 2, 1, s=2, ms=True)]}
L2_DEFEAT_BYTES = 200 << 20  # rotate weight copies totalling at least this much


def _load(name):
    """Import backends/cuda/<name>.py by path (no qcc install needed on the device)."""
    spec = importlib.util.spec_from_file_location(f"qcc_cuda_{name}", os.path.join(CUDA_DIR, f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


# --------------------------------------------------------------------------- build (here)


def kernel_specs(shapes, variants4, variants8, w8a8=True):
    from qcc.backends.cuda import kernels

    specs = []
    for K, N in shapes:
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
    if w8a8:
        K, N = shapes[0]
        specs.append(kernels.gemm_w8a8(16, K, N))
    return specs


def cmd_build(args):
    from qcc.backends.cuda import ptx

    specs = kernel_specs(SHAPES, W4_VARIANTS, W8_VARIANTS)
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


# --------------------------------------------------------------------------- data


def _cfg_str(c):
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
        mod = runtime.load_bundle(args.bundle, rt)
        sm_count = rt.sm_count
        timer = GpuTimer(torch)
        log(f"device: {rt.name} ({rt.arch}, {rt.sm_count} SMs); torch {torch.__version__}; "
            f"image {mod.image_kind} {mod.image_arch}; {len(mod.kernels)} kernels")
        bw, tcopy = copy_bandwidth(torch)
        log(f"device-to-device copy (1 GiB, read+write): {bw:.0f} GB/s ({tcopy * 1e3:.3f} ms)")
        shapes = SHAPES

    rng = np.random.default_rng(args.seed)
    torch.manual_seed(args.seed)
    results = {"bandwidth_GBps": bw, "rows": [], "checks": []}
    by_kind = {}
    for name, k in mod.kernels.items():
        c = k["config"]
        by_kind.setdefault((c["kind"], c.get("K"), c.get("N")), []).append(name)

    def dev_t(a):
        return torch.from_numpy(np.ascontiguousarray(a)).to(dev)

    for K, N in shapes:
        t_shape = time.time()
        # ---- weights: w4 (acc layout), w8; dequantized references; fp16 copies
        packed, s4, z4 = w4_data(rng, K, N)
        P4 = pack.pack_w4a16(packed, s4, z4, GROUP)
        q8, s8 = w8_data(rng, K, N)
        P8 = pack.pack_w8a16(q8, s8)
        W4 = torch_dequant_w4(torch, packed, s4, z4, dev)
        W8 = dev_t(q8).float() * dev_t(s8)
        bytes4 = packed.nbytes + s4.nbytes + z4.nbytes
        bytes8 = q8.nbytes + s8.nbytes
        bytes16 = N * K * 2
        ncopy = lambda b: 1 if emulate else max(2, math.ceil(L2_DEFEAT_BYTES / b))  # noqa: E731
        dev4 = [{k: dev_t(v) for k, v in P4.items()} for _ in range(ncopy(bytes4))]
        dev8 = [{k: dev_t(v) for k, v in P8.items()} for _ in range(ncopy(bytes8))]
        log(f"\n== K={K} N={N}: w4 {bytes4 / 1e6:.1f} MB x{len(dev4)}, w8 {bytes8 / 1e6:.1f} MB "
            f"x{len(dev8)}, fp16 {bytes16 / 1e6:.1f} MB (data {time.time() - t_shape:.1f}s)")
        for kind, Wd, devs, wbytes in (("gemv_w4a16", W4, dev4, bytes4),
                                       ("gemv_w8a16", W8, dev8, bytes8)):
            Wh = [Wd.half().contiguous() for _ in range(ncopy(bytes16))]
            names = by_kind.get((kind, K, N), [])
            def bench_one(name, k, c, M, x, ref):
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

            for M in MS:
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
                    if c["m_max"] < M or (M <= 8) != (c["m_max"] <= 8):
                        continue
                    try:
                        bench_one(name, k, c, M, x, ref)
                    except Exception as e:  # keep going: report the failure, time the rest
                        log(f"  !! {name} M={M}: {type(e).__name__}: {e}")
                        results["checks"].append({"name": name, "M": M, "err": float("inf")})
            del Wh
        del dev4, dev8, W4, W8
        if not emulate:
            torch.cuda.empty_cache()

    # ---- w8a8 GEMM: correctness (and a time, for the record)
    for key, names in by_kind.items():
        if key[0] != "gemm_w8a8":
            continue
        for name in names:
            c = mod.kernels[name]["config"]
            M, K, N = c["M"], c["K"], c["N"]
            xq = rng.integers(-127, 128, (M, K), dtype=np.int8)
            sx = (rng.random(M, dtype=np.float32) * 0.01 + 1e-3)
            q, sw = w8_data(rng, K, N)
            y = torch.full((M, N), float("nan"), dtype=torch.float16, device=dev)
            keep = dict(xq=dev_t(xq), sx=dev_t(sx), wq=dev_t(q), sw=dev_t(sw.reshape(-1)), y=y)
            b = mod.bind(name, **keep)
            b() if emulate else b(sync=True)
            ref = (torch.from_numpy(xq).double() @ torch.from_numpy(q).double().t()) * \
                torch.from_numpy(sx).double()[:, None] * torch.from_numpy(sw).double().reshape(1, -1)
            err = rel_err(torch, y.cpu().float(), ref)
            t = float("nan")
            if not emulate:
                t, _, _ = timer.time([lambda h: b(stream=h)])
            results["checks"].append({"name": name, "M": M, "err": err})
            log(f"\n{name}: rel err {err:.1e}, {t:.1f} us")

    # ---- summary
    log("\nSummary (best variant per format/shape/M; bytes = weights + scales/zeros + x + y;"
        f" measured copy bandwidth {bw:.0f} GB/s):")
    log(f"{'format':10s} {'K x N':>12s} {'M':>3s} {'kernel us':>10s} {'GB/s':>7s} {'of BW':>6s} "
        f"{'fp16 us':>9s} {'fp16 GB/s':>9s} {'vs fp16':>8s}  config")
    summary = []
    for kind in ("gemv_w4a16", "gemv_w8a16"):
        for K, N in shapes:
            for M in MS:
                rows = [r for r in results["rows"] if r["kind"] == kind and r["K"] == K
                        and r["N"] == N and r["M"] == M and "cfg" in r and r["err"] < 5e-3]
                base = [r for r in results["rows"] if r["kind"] == kind and r["K"] == K
                        and r["N"] == N and r["M"] == M and "cfg" not in r]
                if not rows or not base:
                    continue
                best = min(rows, key=lambda r: r["us"])
                b16 = base[0]
                gbs = best["bytes"] / best["us"] / 1e3
                line = (f"{kind[5:]:10s} {f'{K}x{N}':>12s} {M:3d} {best['us']:10.2f} {gbs:7.0f} "
                        f"{gbs / bw:6.1%} {b16['us']:9.2f} {b16['bytes'] / b16['us'] / 1e3:9.0f} "
                        f"{b16['us'] / best['us']:7.2f}x  {best['cfg']}")
                log(line)
                summary.append(best | {"fp16_us": b16["us"], "frac_bw": gbs / bw})
    bad = [c for c in results["checks"] if not c["err"] < 5e-3]
    log(f"\nnumerics: {len(results['checks'])} checks, {len(bad)} over 5e-3"
        + (f": {bad[:5]}" if bad else ""))
    results["summary"] = summary
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=1, default=float)
    with open(os.path.join(out_dir, "log.txt"), "w") as f:
        f.write("\n".join(log_lines) + "\n")
    if not emulate and args.sass:
        dump_sass(args.bundle, mod, summary, out_dir, log)
    return 1 if bad else 0


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
    r = sub.add_parser("run")
    r.add_argument("--bundle", default=os.path.join(ROOT, ".cuda_build"))
    r.add_argument("--out", default=None)
    r.add_argument("--emulate", action="store_true")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--no-sass", dest="sass", action="store_false")
    a = ap.parse_args(argv)
    if a.cmd == "build":
        a.arch = a.arch or ["sm_90a"]
        return cmd_build(a)
    return cmd_run(a)


if __name__ == "__main__":
    sys.exit(main())
