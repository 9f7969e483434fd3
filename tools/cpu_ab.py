#!/usr/bin/env python3
"""A/B of CPU compiler or runtime settings on the benchmark model, both sides in one process.

    python tools/cpu_ab.py --case decode --recipe w4a8-g128 \\
        --variant off:QCC_CPU_NOALIAS_NESTS=0 --variant on:QCC_CPU_NOALIAS_NESTS=1

Compiles test/bench_models.bench_llama (4 layers, hidden 2048) as `qcc bench model` does (a
decode step over a 512-token KV cache, or a 128-token prefill) once per variant, with the
variant's environment variables set during its `qcc.compile`, checks the variants' outputs
for bit equality, then times them in interleaved rounds and prints medians and the ratio to
the first. A variant's setting `fresh-descriptors` runs it without the runtime's kept
parameter descriptors (every memref descriptor built on every call, as before cb29f29); a
setting whose name has a dot sets a module attribute of qcc during that variant's compile
(`passes.cpu_contractions.TILED_MIN_M=1000000000`: the value a Python literal);
`cpu-activations=bf16` is qcc.compile's option (its outputs then differ from fp32 variants').
"""
from __future__ import annotations

import argparse
import ast
import importlib
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _variant(spec: str):
    name, _, rest = spec.partition(":")
    env, attrs, fresh, options = {}, {}, False, {}
    for item in filter(None, rest.split(",")):
        if item == "fresh-descriptors":
            fresh = True
            continue
        k, _, v = item.partition("=")
        if k == "cpu-activations":
            options["cpu_activations"] = v
        elif "." in k:
            attrs[k] = ast.literal_eval(v)
        else:
            env[k] = v
    return name, env, attrs, fresh, options


def _set_attrs(attrs: dict) -> list:
    """Sets qcc.<module>.<NAME> = value for each item; returns what to restore."""
    saved = []
    for key, value in attrs.items():
        module, attr = key.rsplit(".", 1)
        mod = importlib.import_module(f"qcc.{module}")
        saved.append((mod, attr, getattr(mod, attr)))
        setattr(mod, attr, value)
    return saved


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", choices=("decode", "prefill"), default="decode")
    ap.add_argument("--recipe", default="w4a8-g128")
    ap.add_argument("--batch", type=int, default=1, help="decode: sequences per step")
    ap.add_argument("--variant", action="append", required=True,
                    help="name:VAR=value[,module.ATTR=literal,...][,cpu-activations=bf16][,fresh-descriptors]")
    ap.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 40 decode, 10 prefill)")
    args = ap.parse_args(argv)
    import numpy as np

    import qcc

    sys.path.insert(0, os.path.join(ROOT, "test"))
    from bench_models import DecodeStep, bench_llama

    variants = [_variant(v) for v in args.variant]
    built = {}
    for name, env, attrs, fresh, options in variants:
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        saved_attrs = _set_attrs(attrs)
        try:
            model = DecodeStep(bench_llama(), 512, batch=args.batch).eval() if args.case == "decode" else bench_llama()
            inputs = model.example_inputs() if args.case == "decode" else model.example_inputs(batch=1, seq=128)
            compiled = qcc.compile(model, inputs, quant=args.recipe, **options)
        finally:
            for k, v in saved.items():
                os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
            for mod, attr, value in saved_attrs:
                setattr(mod, attr, value)
        arrays = [x.numpy() for x in inputs]
        if fresh:
            runner = compiled._get_runner()
            entry = compiled.manifest["entry"]["args"]

            def run(c=compiled, r=runner, e=entry, a=arrays):
                user = iter(a)
                outs = [np.empty(o["shape"], np.dtype(o["dtype"])) for o in c.outputs]
                r.call([c.weights[x["param"]] if "param" in x else next(user) for x in e], outs)
                return outs
        else:
            def run(c=compiled, a=arrays):
                return c.run(*a)
        built[name] = run
    outs = {name: run() for name, run in built.items()}
    first = next(iter(outs.values()))
    same = all(all(np.array_equal(x, y) for x, y in zip(first, o)) for o in outs.values())
    print(f"{args.case} {args.recipe}: outputs bit for bit equal across variants: {same}")
    rounds = args.rounds or (40 if args.case == "decode" else 10)
    calls = 5 if args.case == "decode" else 2
    times = {name: [] for name in built}
    for _ in range(rounds):
        for name, run in built.items():
            for _ in range(calls):
                t = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - t)
    base = float(np.median(next(iter(times.values()))))
    for name, ts in times.items():
        med = float(np.median(ts))
        print(f"  {name:24s} median {med * 1e3:9.3f} ms   x{base / med:.3f} vs {variants[0][0]}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
