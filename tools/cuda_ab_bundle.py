#!/usr/bin/env python3
"""A small device bundle for an A/B of compiler settings, both sides timed in one run.

    python tools/cuda_ab_bundle.py --out .cuda_ab --recipes w8a8,float \\
        --variant unfused:lowering.FUSE_ATTENTION=False --variant c16:fuse_attention.CHUNK=16
    # on the GPU machine (the bundle carried)
    python3 tools/cuda_device_run.py run --bundle .cuda_ab --out "$OUT" --sections models,decode --no-sass

Builds what ``cuda_device_run.py build`` does for the listed recipes only (the decode
benchmark, and with --prefill the 128-token prefill; --small: the whole-model checks), then
the same artifacts again under each variant's settings, named ``recipe~tag``, so the run
prints them beside the defaults. A setting is ``module.NAME=value`` for a module of
qcc.backends.cuda (value a Python literal), set while that variant compiles.  --kv-f16 adds
the decode step compiled for KV caches kept in f16 (``recipe~kvf16``, fed the same caches
rounded to f16). --cases adds the test suite's CUDA cases (the run's ``cases`` section).
--kv-heads N builds every decode step with N KV heads (grouped-query
attention; the decode section's model follows the artifacts' ctor).
"""
from __future__ import annotations

import argparse
import ast
import importlib
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))

import cuda_device_run as cdr  # noqa: E402


def _settings(spec: str):
    tag, _, rest = spec.partition(":")
    out = []
    for item in filter(None, rest.split(",")):
        name, _, value = item.partition("=")
        mod, _, attr = name.rpartition(".")
        module = importlib.import_module(f"qcc.backends.cuda.{mod}")
        if not hasattr(module, attr):
            raise SystemExit(f"--variant {spec}: qcc.backends.cuda.{mod} has no {attr}")
        out.append((module, attr, ast.literal_eval(value)))
    return tag, out


def _save(c, path):
    from qcc.model import CompiledModel

    keep = {n: w for n, w in c.weights.items() if w.nbytes <= cdr.KEEP_BYTES or n.startswith("__cuda_const")}
    CompiledModel(c.manifest, keep, c.code).save(path)
    return keep


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--recipes", default="w8a8,float")
    ap.add_argument("--variant", action="append", default=[], help="tag:module.NAME=value[,...]")
    ap.add_argument("--kv-f16", action="store_true",
                    help="the decode artifacts again for KV caches kept in f16 (recipe~kvf16)")
    ap.add_argument("--kv-heads", type=int, default=None,
                    help="grouped-query attention: every decode step with this many KV heads")
    ap.add_argument("--prefill", action="store_true", help="the prefill artifacts too")
    ap.add_argument("--small", action="store_true", help="the whole-model checks too")
    ap.add_argument("--cases", action="store_true",
                    help="the test suite's CUDA cases too (checked on the device against their oracles)")
    args = ap.parse_args(argv)
    import qcc
    from qcc.backends.cuda import ptx

    recipes = tuple(args.recipes.split(","))
    variants = [(*_settings(v), {}) for v in args.variant]
    if args.kv_f16:
        variants.append(("kvf16", [], {"cache_dtype": "f16"}))
    if not args.small:
        cdr.SMALL_MODELS = {}
    if args.kv_heads:
        cdr.BENCH = dict(cdr.BENCH, kv_heads=args.kv_heads)
    cdr.BENCH_RECIPES = recipes
    cdr.PREFILL_RECIPES = recipes if args.prefill else ()
    cdr.PREFILL_OPTIONS = {}
    # build_models needs a kernel bundle beside the models; one variant is enough
    ptx.build_bundle(cdr.prefill_specs({k: [{}] for k in list(cdr.PREFILL_VARIANTS)[:1]}), args.out,
                     archs=("sm_90a",))
    for f in ("kernels.ll", "kernels.mlir"):  # intermediates, not needed on the device
        if os.path.exists(os.path.join(args.out, f)):
            os.remove(os.path.join(args.out, f))
    cdr.build_models(args.out)
    if args.cases:
        cdr.build_cases(args.out)
    mdir = os.path.join(args.out, "models")
    with open(os.path.join(mdir, "models.json")) as f:
        meta = json.load(f)
    for tag, settings, ctor_extra in variants:
        saved = [(m, a, getattr(m, a)) for m, a, _ in settings]
        try:
            for m, a, v in settings:
                setattr(m, a, v)
            for recipe in recipes:
                key = f"{recipe}~{tag}"
                ctor = dict(cdr.BENCH) | ctor_extra
                model, inputs = cdr.make_model("DecodeStep", ctor, {"seed": 0})
                c = qcc.compile(model, inputs, target="cuda", quant=recipe)
                keep = _save(c, os.path.join(mdir, f"bench-{key}.qcc"))
                meta["bench"][key] = {"ctor": ctor, "launches": len(c.manifest["cuda"]["plan"]["launches"]),
                                      "weight_bytes": int(sum(w.nbytes for w in c.weights.values())),
                                      "stripped": sorted(set(c.weights) - set(keep))}
                print(f"  bench-{key}: {meta['bench'][key]['launches']} launches", flush=True)
                if args.prefill and not ctor_extra:
                    model, inputs = cdr.make_model("LlamaModel", dict(cdr.PREFILL),
                                                   {"batch": 1, "seq": cdr.PREFILL_TOKENS, "seed": 3})
                    c = qcc.compile(model, inputs, target="cuda", quant=recipe)
                    _save(c, os.path.join(mdir, f"prefill-{key}.qcc"))
                    meta["prefill"][key] = {"ctor": dict(cdr.PREFILL), "launches": len(c.manifest["cuda"]["plan"]["launches"])}
                    print(f"  prefill-{key}: {meta['prefill'][key]['launches']} launches", flush=True)
        finally:
            for m, a, v in saved:
                setattr(m, a, v)
    with open(os.path.join(mdir, "models.json"), "w") as f:
        json.dump(meta, f, indent=1)


if __name__ == "__main__":
    main()
