"""qcc bench: qcc's CPU code against PyTorch on the same machine, in the same process.

    qcc bench linear [--json] [--quick] [--shapes KxN,...] [--m 1,16,128] [--recipes ...]
    qcc bench model  [--json] [--quick] [--recipes ...]   (default w4a16-g128; int8-activation
                     recipes add torch's quantize_dynamic of the same model as a baseline)
    python -m qcc.tools.bench linear ...

Every case runs qcc and its baselines in turn (interleaved repetitions, so a
noisy neighbour hits all of them alike) and reports medians.  Weights cycle
through copies totalling more than 4x the L3 cache, so no case runs from
cache.  The read bandwidth is measured in the same run (the faster of numpy and torch sums over 512 MB)
and each memory-bound figure is given as a fraction of it; the floor of a case
is its weight bytes / that bandwidth.
"""

import argparse
import copy
import json
import os
import statistics
import sys
import time

L3_BYTES = 32 << 20
LINEAR_SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096)]
LINEAR_M = [1, 16, 128]
RECIPES = ["w8a16", "w4a16-g128", "w8a8", "w4a8-g128"]


def l3_bytes() -> int:
    try:
        with open("/sys/devices/system/cpu/cpu0/cache/index3/size") as f:
            text = f.read().strip()
        return int(text[:-1]) << (20 if text.endswith("M") else 10)
    except (OSError, ValueError):
        return L3_BYTES


def read_bandwidth(nbytes: int = 512 << 20, reps: int = 5) -> float:
    """GB/s of the faster of numpy's sum (one thread) and torch's sum (all of
    torch's threads) over `nbytes` of float32, median of `reps` each.  numpy's
    single-thread sum undershoots what two cores can stream (11-12 GB/s against
    17-27 GB/s here), which would flatter every kernel measured against it."""
    import numpy as np
    import torch

    a = np.ones(nbytes // 4, np.float32)
    best = 0.0
    for total in (a.sum, torch.from_numpy(a).sum):
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            total()
            times.append(time.perf_counter() - t0)
        best = max(best, a.nbytes / statistics.median(times) / 1e9)
    return best


def copies_for(nbytes: int, min_total: int) -> int:
    return max(1, -(-min_total // max(nbytes, 1)))


def interleaved(fns: dict, budget_s: float, min_reps: int = 3, max_reps: int = 50, rounds: int = 3) -> dict:
    """{name: median seconds of fn(i)}: `rounds` rotations over the implementations,
    each a warm-up call then a block of timed calls, so that a noisy neighbour
    hits all alike and one OpenMP runtime's spinning workers (torch's libgomp,
    qcc's libomp) have gone idle before the other's block is timed."""
    times = {n: [] for n in fns}
    per_block = max(budget_s / rounds / max(len(fns), 1), 0.0)
    for r in range(rounds):
        for name, fn in fns.items():
            time.sleep(0.05)  # > KMP_BLOCKTIME (20 ms): the other runtime's workers sleep
            fn(0)
            t_block = time.perf_counter()
            i = 0
            while i < max_reps // rounds + 1 and (i < -(-min_reps // rounds) or time.perf_counter() - t_block < per_block):
                t0 = time.perf_counter()
                fn(r * 1000 + i + 1)
                times[name].append(time.perf_counter() - t0)
                i += 1
    return {n: statistics.median(t) for n, t in times.items()}


# -- linear ---------------------------------------------------------------------

class _Qcc:
    """A compiled nn.Linear(K, N) with a symbolic token dimension, called on weight copies."""

    def __init__(self, recipe: str, k: int, n: int, min_total: int, cpu_activations: str = "fp32"):
        import numpy as np
        import torch

        import qcc

        torch.manual_seed(0)
        lin = torch.nn.Linear(k, n, bias=False).eval()
        t0 = time.perf_counter()
        self.compiled = qcc.compile(lin, (torch.randn(2, k),), quant=recipe,
                                    dynamic_shapes=({0: torch.export.Dim("tokens", min=1, max=4096)},),
                                    calibration=[(torch.randn(64, k),)],  # for static scales
                                    cpu_activations=cpu_activations)
        self.compile_s = time.perf_counter() - t0
        self.runner = self.compiled._get_runner()
        args = self.compiled.manifest["entry"]["args"]
        self.params = [a.get("param") for a in args]
        self.nbytes = sum(int(self.compiled.weights[p].nbytes) for p in self.params if p)
        self.copies = [[np.copy(self.compiled.weights[p]) if p else None for p in self.params]
                       for _ in range(copies_for(self.nbytes, min_total))]
        self.n = n
        self.kernel = next(iter(self.compiled.manifest["cpu"]["kernels"].values()), {})

    def fn(self, x):
        import numpy as np

        y = np.empty((x.shape[0], self.n), np.float32)

        def call(i):
            ws = self.copies[i % len(self.copies)]
            self.runner.call([x if w is None else w for w in ws], [y])
        return call

    def set_threads(self, n: int) -> bool:
        return self.runner.set_threads(n)


def _torch_baselines(recipe: str, k: int, n: int, min_total: int) -> dict:
    """name -> (bytes read per call, factory(x_torch) -> fn(i)) for `recipe`'s PyTorch baselines."""
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(1)
    w = torch.randn(n, k, generator=g) * 0.02
    out = {}
    if recipe == "float":
        ws = [w.clone() for _ in range(copies_for(w.nbytes, min_total))]
        out["torch fp32"] = (w.nbytes, lambda x: lambda i: F.linear(x, ws[i % len(ws)]))
        wb = w.to(torch.bfloat16)
        bs = [wb.clone() for _ in range(copies_for(wb.nbytes, min_total))]
        out["torch bf16"] = (wb.nbytes, lambda x: (lambda xb: lambda i: F.linear(xb, bs[i % len(bs)]))(
            x.to(torch.bfloat16)))
    elif recipe == "w8a16":
        scale = w.abs().amax(1) / 127
        q = torch.clamp(torch.round(w / scale[:, None]), -127, 127).to(torch.int8)
        qs = [(q.clone(), scale.clone()) for _ in range(copies_for(q.nbytes, min_total))]
        out["aten int8pack"] = (q.nbytes + scale.nbytes, lambda x: lambda i: torch.ops.aten._weight_int8pack_mm(
            x, qs[i % len(qs)][0], qs[i % len(qs)][1]))
    elif recipe == "w4a16-g128":
        gs = 128
        wg = w.reshape(n, k // gs, gs)
        lo, hi = wg.amin(-1), wg.amax(-1)
        scale = ((hi - lo) / 15).clamp(min=1e-8)
        zero = torch.round(-lo / scale)
        q = torch.clamp(torch.round(wg / scale[..., None]) + zero[..., None], 0, 15).to(torch.int32).reshape(n, k)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
        # torch's int4 CPU kernels take (scale, zero) with w = (q - 8) * s + z
        sz = torch.stack([scale, (8 - zero) * scale], -1).transpose(0, 1).contiguous()
        nb = packed.nbytes + sz.nbytes
        ps = [(packed.clone(), sz.clone()) for _ in range(copies_for(nb, min_total))]
        out["aten int4pack"] = (nb, lambda x: lambda i: torch.ops.aten._weight_int4pack_mm_for_cpu(
            x, ps[i % len(ps)][0], gs, ps[i % len(ps)][1]))
    elif recipe in ("w8a8", "w4a8-g128"):  # the integer path: torch's int8 x int8 dynamic linear
        lin = torch.nn.Linear(k, n, bias=False)
        lin.weight.data.copy_(w)
        qlins = [torch.ao.quantization.quantize_dynamic(torch.nn.Sequential(lin), {torch.nn.Linear}, torch.qint8)
                 for _ in range(copies_for(n * k, min_total))]
        out["torch qdynamic int8"] = (n * k, lambda x: lambda i: qlins[i % len(qlins)](x))
    return out


def _recipe_available(recipe: str) -> bool:
    from qcc.errors import QccError
    from qcc.recipes import get_recipe

    try:
        get_recipe(recipe)
        return True
    except QccError:
        return False


def bench_linear(args, emit) -> None:
    import torch

    bw = read_bandwidth(args.bw_bytes)
    min_total = (8 << 20) if args.quick else 4 * l3_bytes()  # --quick: a smoke run, cached
    emit({"suite": "linear", "case": "read-bandwidth", "gbps": round(bw, 2), "method": "max(numpy sum, torch sum) float32",
          "bytes": args.bw_bytes, "threads": torch.get_num_threads()})
    for k, n in args.shapes:
        floats = _torch_baselines("float", k, n, min_total)
        for recipe in args.recipes:
            if not _recipe_available(recipe):
                emit({"suite": "linear", "recipe": recipe, "K": k, "N": n, "status": "n/a (recipe not available)"})
                continue
            try:
                q = _Qcc(recipe, k, n, min_total, args.cpu_activations)
            except Exception as e:  # a recipe whose CPU lowering does not exist yet
                emit({"suite": "linear", "recipe": recipe, "K": k, "N": n,
                      "status": f"n/a ({type(e).__name__}: {str(e).splitlines()[0][:120]})"})
                continue
            base = {**floats, **_torch_baselines(recipe, k, n, min_total)}
            for m in args.m:
                if not q.kernel and m > 1:  # the scalar reference lowering: minutes per case
                    emit({"suite": "linear", "recipe": recipe, "K": k, "N": n, "M": m,
                          "status": "n/a (no fast CPU kernel for this recipe yet: reference lowering)"})
                    continue
                x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
                xn = x.numpy()
                fns = {"qcc": q.fn(xn), **{name: make(x) for name, (_, make) in base.items()}}
                med = interleaved(fns, args.budget)
                threads1 = None
                if m == max(args.m) and q.set_threads(1):
                    threads1 = interleaved({"qcc": q.fn(xn)}, args.budget / 2)["qcc"]
                    q.set_threads(os.cpu_count() or 1)
                rec = {"suite": "linear", "recipe": _label(recipe, args), "K": k, "N": n, "M": m,
                       "qcc_ms": round(med["qcc"] * 1e3, 4), "weight_bytes": q.nbytes,
                       "gbps": round(q.nbytes / med["qcc"] / 1e9, 2),
                       "bw_fraction": round(q.nbytes / med["qcc"] / 1e9 / bw, 3),
                       "floor_ms": round(q.nbytes / bw / 1e6, 4),
                       "gflops": round(2 * m * n * k / med["qcc"] / 1e9, 1),
                       "kernel": ("reference" if not q.kernel else
                                  "gemv" if m < q.kernel.get("gemm_from_m", 1) else "gemm"),
                       "compile_s": round(q.compile_s, 2),
                       "baselines_ms": {name: round(t * 1e3, 4) for name, t in med.items() if name != "qcc"}}
                rec["speedup"] = {name: round(t / med["qcc"], 2) for name, t in med.items() if name != "qcc"}
                if threads1 is not None:
                    rec["qcc_1thread_ms"] = round(threads1 * 1e3, 4)
                    rec["thread_scaling"] = round(threads1 / med["qcc"], 2)
                emit(rec)
            del q


# -- model ----------------------------------------------------------------------

def _test_dir() -> str:
    here = os.path.dirname(os.path.abspath(__file__))
    for cand in (os.path.join(os.path.dirname(here), "test"), os.path.join(os.getcwd(), "test")):
        if os.path.isfile(os.path.join(cand, "bench_models.py")):
            return cand
    raise SystemExit("qcc bench model: needs the repository's test/ folder (models.py, bench_models.py)")


def bench_model(args, emit) -> None:
    import torch

    import qcc

    sys.path.insert(0, _test_dir())
    from bench_models import DecodeStep, bench_llama

    bw = read_bandwidth(args.bw_bytes)
    emit({"suite": "model", "case": "read-bandwidth", "gbps": round(bw, 2)})
    cfg = dict(layers=1, hidden=256, ffn=768, heads=4, max_seq=160) if args.quick else {}
    cache, prompt = (64, 16) if args.quick else (512, 128)
    model = bench_llama(**cfg)
    cache_dtype = torch.float16 if args.kv_cache == "f16" else torch.float32
    step = DecodeStep(model, cache, cache_dtype=cache_dtype).eval()
    cases = {"decode": (step, step.example_inputs(), 1)}
    if args.decode_batch > 1:
        batched = DecodeStep(model, cache, batch=args.decode_batch, cache_dtype=cache_dtype).eval()
        cases[f"decode-b{args.decode_batch}"] = (batched, batched.example_inputs(), args.decode_batch)
    cases["prefill"] = (model, model.example_inputs(batch=1, seq=prompt), prompt)
    programs = {}  # case -> the ExportedProgram qcc compiles (else the module)
    extra_baselines = {}  # case -> {name: fn(i)} timed beside the usual ones
    experts_read = {}  # case -> the fraction of a mixture of experts' weights its tokens read
    no_eager = set()  # cases whose module is too costly to time in eager torch
    if args.hf_static:
        cases["decode-hf-static"], programs["decode-hf-static"] = _hf_static_decode(cfg, cache)
    if args.moe:
        for tokens in (1, 16, 128):
            case = f"moe-{tokens}"
            cases[case], extra_baselines[case], experts_read[case] = _hf_moe_block(cfg, tokens)
            if tokens > 16:  # batched_mm copies out 2 experts' f32 weights a token: 35 GB at 128
                no_eager.add(case)
    if args.cases:
        unknown = set(args.cases.split(",")) - set(cases)
        if unknown:
            raise SystemExit(f"--cases: no case {', '.join(sorted(unknown))} (this run has {', '.join(cases)})")
        cases = {c: v for c, v in cases.items() if c in args.cases.split(",")}
    for case, (module, inputs, tokens) in cases.items():
        for recipe in args.model_recipes:
            t0 = time.perf_counter()
            shapes = module.dynamic_shapes() if args.any_length and case in ("decode", f"decode-b{args.decode_batch}") \
                else None
            compiled = qcc.compile(programs.get(case, module), None if case in programs else inputs, quant=recipe,
                                   cpu_activations=args.cpu_activations, dynamic_shapes=shapes)
            compile_s = time.perf_counter() - t0
            arrays = [x.numpy() for x in inputs]
            fns = {"qcc": lambda i: compiled.run(*arrays)}
            with torch.no_grad():
                if case not in no_eager:
                    fns["torch eager fp32"] = lambda i: module(*inputs)
                fns.update(extra_baselines.get(case, {}))
                tc_compile_s = None
                if not args.no_torch_compile:
                    compiled_torch = torch.compile(module)
                    t0 = time.perf_counter()
                    compiled_torch(*inputs)
                    tc_compile_s = time.perf_counter() - t0
                    fns["torch.compile fp32"] = lambda i: compiled_torch(*inputs)
                if args.cpu_activations == "bf16":  # the same rounding of x: torch in bf16
                    module_bf16 = copy.deepcopy(module).to(torch.bfloat16)
                    inputs_bf16 = [x.to(torch.bfloat16) if x.is_floating_point() else x for x in inputs]
                    fns["torch eager bf16"] = lambda i: module_bf16(*inputs_bf16)
                # the integer path: torch's int8 x int8 dynamic linears (not for the experts, whose
                # batched_mm it leaves f32: it would time the f32 block again)
                if recipe in ("w8a8", "w4a8-g128") and case not in experts_read:
                    qdyn = torch.ao.quantization.quantize_dynamic(copy.deepcopy(module), {torch.nn.Linear},
                                                                  torch.qint8)
                    fns["torch qdynamic int8"] = lambda i: qdyn(*inputs)
                med = interleaved(fns, args.budget * (2 if case == "prefill" else 1), min_reps=3, max_reps=30)
            nbytes = compiled.weight_bytes()
            if case in experts_read:  # the floor: only the experts the tokens chose are read
                expert_bytes = sum(layer["bytes"] for layer in compiled.manifest["layers"] if "experts" in layer) \
                    or sum(w.nbytes for w in compiled.weights.values() if w.ndim == 3)  # float: [E, N, K]
                nbytes -= round(expert_bytes * (1 - experts_read[case]))
            rec = {"suite": "model", "case": case, "recipe": _label(recipe, args), "tokens": tokens,
                   "config": cfg or "4 layers, hidden 2048, ffn 5632, 16 heads, vocab 512",
                   "kv_cache": cache if case.startswith("decode") else None, "kv_cache_dtype": args.kv_cache,
                   "any_length": bool(shapes),
                   "qcc_ms": round(med["qcc"] * 1e3, 3), "tokens_per_s": round(tokens / med["qcc"], 2),
                   "weight_bytes": nbytes, "floor_ms": round(nbytes / bw / 1e6, 3),
                   "compile_s": round(compile_s, 2), "compile_stages_s": compiled.compile_seconds,
                   "baselines_ms": {n: round(t * 1e3, 3) for n, t in med.items() if n != "qcc"},
                   "baselines_tokens_per_s": {n: round(tokens / t, 2) for n, t in med.items() if n != "qcc"},
                   "speedup": {n: round(t / med["qcc"], 2) for n, t in med.items() if n != "qcc"}}
            if tc_compile_s is not None:
                rec["torch_compile_s"] = round(tc_compile_s, 2)
            emit(rec)


def _label(recipe: str, args) -> str:
    """The recipe as the tables name it: `w4a16-g128~bf16` with --cpu-activations bf16."""
    return recipe if args.cpu_activations == "fp32" else f"{recipe}~{args.cpu_activations}"


# -- output ---------------------------------------------------------------------

def _fmt_row(rec: dict) -> str | None:
    if "status" in rec:
        m = f"M={rec['M']:<4d} " if "M" in rec else ""
        return f"{rec['recipe']:11s} K={rec['K']:<6d} N={rec['N']:<6d} {m}{rec['status']}"
    if rec.get("case") == "read-bandwidth":
        return f"read bandwidth (max of numpy and torch sums, 512 MB): {rec['gbps']:.2f} GB/s"
    base = "  ".join(f"{n} {t:.3f} ms (x{rec['speedup'][n]:.2f})" for n, t in rec["baselines_ms"].items())
    if rec["suite"] == "linear":
        thr = f"  1 thread {rec['qcc_1thread_ms']:.3f} ms (x{rec['thread_scaling']:.2f})" if "thread_scaling" in rec else ""
        return (f"{rec['recipe']:11s} K={rec['K']:<6d} N={rec['N']:<6d} M={rec['M']:<4d} qcc {rec['qcc_ms']:8.3f} ms "
                f"[{rec['kernel']}] {rec['gbps']:6.1f} GB/s = {100 * rec['bw_fraction']:5.1f}% of read bw "
                f"(floor {rec['floor_ms']:.3f} ms) {rec['gflops']:6.1f} GFLOP/s{thr} | {base}")
    return (f"{rec['case']:8s} {rec['recipe']:11s} qcc {rec['qcc_ms']:9.3f} ms = {rec['tokens_per_s']:8.1f} tok/s "
            f"(floor {rec['floor_ms']:.3f} ms, compile {rec['compile_s']:.1f} s) | {base}")


def _hf_static_decode(cfg: dict, cache: int):
    """((module, inputs, 1), ExportedProgram): transformers' LlamaForCausalLM of the benchmark's
    shape with a static KV cache of `cache` positions, as its ExecuTorch export writes it (the
    caches are buffers the step updates; qcc keeps them as state).  The module is the exported
    wrapper itself, run eagerly by the torch baselines; each call writes the last position."""
    import torch
    import transformers
    from transformers.integrations.executorch import TorchExportableModuleForDecoderOnlyLM

    cfg = {"layers": 4, "hidden": 2048, "ffn": 5632, "heads": 16, **cfg}
    config = transformers.LlamaConfig(vocab_size=512, hidden_size=cfg["hidden"], intermediate_size=cfg["ffn"],
                                      num_hidden_layers=cfg["layers"], num_attention_heads=cfg["heads"],
                                      num_key_value_heads=cfg["heads"], max_position_embeddings=cache + 8)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    model.generation_config.cache_implementation = "static"
    model.generation_config.cache_config = {"batch_size": 1, "max_cache_len": cache}
    wrapper = TorchExportableModuleForDecoderOnlyLM(model, batch_size=1, max_cache_len=cache)
    inputs = (torch.tensor([[5]]), torch.tensor([cache - 1]))
    program = wrapper.export(input_ids=inputs[0], cache_position=inputs[1])

    class Step(torch.nn.Module):  # positional inputs for the baselines
        def __init__(self):
            super().__init__()
            self.inner = wrapper.model

        def forward(self, ids, position):
            return self.inner(input_ids=ids, cache_position=position)

    return (Step().eval(), inputs, 1), program


def _hf_moe_block(cfg: dict, tokens: int):
    """((module, inputs, tokens), baselines, fraction of the experts chosen): transformers'
    MixtralSparseMoeBlock of the benchmark's width (8 experts, top 2) with its batched_mm
    experts (each token's expert weights gathered, then a batched matmul: the form qcc
    quantizes), over `tokens` tokens.  The module is the torch eager baseline (it copies out
    the gathered weights); the same weights under transformers' default eager experts (a loop
    over the experts hit, F.linear on each one's slice, nothing copied) are the other."""
    import torch
    import transformers
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    cfg = {"hidden": 2048, "ffn": 5632, **cfg}
    config = transformers.MixtralConfig(hidden_size=cfg["hidden"], intermediate_size=cfg["ffn"],
                                        num_local_experts=8, num_experts_per_tok=2)
    config._experts_implementation = "batched_mm"
    torch.manual_seed(0)
    block = MixtralSparseMoeBlock(config).eval()
    with torch.no_grad():
        for p in block.parameters():  # the experts are allocated uninitialized
            p.normal_(0.0, 0.02)
    loop = copy.deepcopy(block)  # its experts' own copy of the config
    loop.experts.config._experts_implementation = "eager"
    assert block.experts.config._experts_implementation == "batched_mm"
    x = (torch.randn(1, tokens, cfg["hidden"]),)
    with torch.no_grad():
        chosen = block.gate(x[0].view(-1, cfg["hidden"]))[2].unique().numel()
    return (block, x, tokens), {"torch eager fp32, experts loop": lambda i: loop(*x)}, chosen / 8


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("suite", choices=["linear", "model", "report"],
                   help="report: markdown tables from the JSON lines of earlier runs (files)")
    p.add_argument("files", nargs="*", help="report: .jsonl files written by --json runs")
    p.add_argument("--json", action="store_true", help="one JSON record per case on stdout")
    p.add_argument("--quick", action="store_true", help="a smoke run: small shapes, few repetitions")
    p.add_argument("--shapes", help="comma-separated KxN (default: 4096x4096,4096x11008,11008x4096)")
    p.add_argument("--m", help="comma-separated token counts M (default: 1,16,128)")
    p.add_argument("--recipes", help=f"comma-separated recipes (default: linear {','.join(RECIPES)}; "
                                     "model w4a16-g128)")
    p.add_argument("--budget", type=float, default=None, help="seconds of repetitions per case")
    p.add_argument("--no-torch-compile", action="store_true", help="model: skip the torch.compile baseline")
    p.add_argument("--kv-cache", choices=("f32", "f16"), default="f32",
                   help="model: the decode step's KV caches in this precision (f16: widened to read)")
    p.add_argument("--any-length", action="store_true",
                   help="model: compile the decode steps for any KV cache length (dynamic_shapes), "
                        "timed at the usual one")
    p.add_argument("--hf-static", action="store_true",
                   help="model: also transformers' Llama with a static KV cache in its buffers, as its ExecuTorch "
                        "export writes it (case decode-hf-static; needs transformers)")
    p.add_argument("--moe", action="store_true",
                   help="model: also transformers' Mixtral mixture-of-experts block (8 experts, top 2, batched_mm) "
                        "over 1, 16 and 128 tokens (cases moe-1, moe-16, moe-128; needs transformers)")
    p.add_argument("--cases", help="model: comma-separated cases to run (default: all the flags give)")
    p.add_argument("--decode-batch", type=int, default=1,
                   help="model: also a decode step of this many sequences at once (case decode-b<N>)")
    p.add_argument("--cpu-activations", default="fp32", choices=("fp32", "bf16"),
                   help="qcc.compile's cpu_activations (bf16: the model suite adds torch eager in bf16)")
    p.add_argument("--target", choices=["cpu", "cuda"], default="cpu",
                   help="cuda: build the GEMV kernels here, then run tools/cuda_device_run.py's linear table "
                        "(needs a GPU and cuda-bindings)")
    p.set_defaults(func=run_target)


def run_target(args) -> int:
    if args.target == "cpu":
        return run(args)
    if args.suite != "linear":
        from qcc.errors import QccError

        raise QccError(f"bench {args.suite} --target cuda is not wired here",
                       hint="run `python tools/cuda_device_run.py run` for whole models on the GPU")
    import tempfile

    from qcc.backends.cuda import runtime
    from qcc.errors import QccError
    from qcc.tools import cuda_device_run

    ok, why = runtime.available()
    if not ok:
        raise QccError(f"no usable GPU for --target cuda: {why}")

    with tempfile.TemporaryDirectory() as bundle:
        cuda_device_run.main(["build", "--out", bundle, "--no-models"])
        return cuda_device_run.main(["run", "--bundle", bundle, "--sections", "linear"]) or 0


def markdown(records: list) -> str:
    """Markdown tables (linear, model) of --json records."""
    out = []
    bw = [r for r in records if r.get("case") == "read-bandwidth"]
    if bw:
        out.append("Read bandwidth measured in the run (max of numpy and torch sums, 512 MB): "
                   + ", ".join(f"{r['gbps']:.2f} GB/s ({r['suite']})" for r in bw) + "\n")
    lin = [r for r in records if r.get("suite") == "linear" and "case" not in r]
    if lin:
        out.append("| recipe | K | N | M | qcc ms | kernel | GB/s | % read bw | floor ms | x floor "
                   "| torch fp32 ms | torch bf16 ms | torch quantized ms | vs fp32 | vs bf16 | vs torch quantized "
                   "| 1 thread / 2 threads |")
        out.append("|" + "---|" * 17)
        for r in lin:
            if "status" in r:
                out.append(f"| {r['recipe']} | {r['K']} | {r['N']} | {r.get('M', 'all')} | {r['status']} "
                           + "| " * 12 + "|")
                continue
            b, sp = r["baselines_ms"], r["speedup"]
            qn = next((n for n in b if n not in ("torch fp32", "torch bf16")), None)
            out.append(
                f"| {r['recipe']} | {r['K']} | {r['N']} | {r['M']} | {r['qcc_ms']:.3f} | {r['kernel']} "
                f"| {r['gbps']:.1f} | {100 * r['bw_fraction']:.0f}% | {r['floor_ms']:.3f} "
                f"| {r['qcc_ms'] / r['floor_ms']:.2f} | {b.get('torch fp32', 0):.3f} | {b.get('torch bf16', 0):.3f} "
                f"| {f'{b[qn]:.3f} ({qn})' if qn else 'n/a'} | {sp.get('torch fp32', 0):.2f}x "
                f"| {sp.get('torch bf16', 0):.2f}x | {f'{sp[qn]:.2f}x' if qn else 'n/a'} "
                f"| {r['thread_scaling'] if 'thread_scaling' in r else ''} |")
    mod = [r for r in records if r.get("suite") == "model" and "case" in r and "qcc_ms" in r]
    if mod:
        names = [n for n in ("torch eager fp32", "torch.compile fp32", "torch eager bf16", "torch qdynamic int8")
                 if any(n in r["baselines_ms"] for r in mod)]
        out.append("\n| case | recipe | tokens | qcc ms | qcc tok/s | "
                   + " | ".join(f"{n} tok/s" for n in names) + " | "
                   + " | ".join(f"vs {n}" for n in names) + " | floor ms | qcc compile s | torch.compile s |")
        out.append("|" + "---|" * (8 + 2 * len(names)))
        for r in mod:
            bt, sp = r["baselines_tokens_per_s"], r["speedup"]
            out.append(f"| {r['case']} | {r['recipe']} | {r['tokens']} | {r['qcc_ms']:.2f} | {r['tokens_per_s']:.1f} | "
                       + " | ".join(f"{bt[n]:.1f}" if n in bt else "" for n in names) + " | "
                       + " | ".join(f"{sp[n]:.2f}x" if n in sp else "" for n in names)
                       + f" | {r['floor_ms']:.2f} | {r['compile_s']:.1f} | {r.get('torch_compile_s', '')} |")
    return "\n".join(out) + "\n"


def run(args) -> int:
    if args.suite == "report":
        records = []
        for path in args.files:
            with open(path) as f:
                records += [json.loads(line) for line in f if line.startswith("{")]
        print(markdown(records), end="")
        return 0
    args.shapes = ([tuple(int(v) for v in s.lower().split("x")) for s in args.shapes.split(",")] if args.shapes
                   else [(256, 512)] if args.quick else LINEAR_SHAPES)
    args.m = [int(v) for v in args.m.split(",")] if args.m else ([1, 16] if args.quick else LINEAR_M)
    args.model_recipes = args.recipes.split(",") if args.recipes else ["w4a16-g128"]
    args.recipes = args.recipes.split(",") if args.recipes else (["w4a16-g128"] if args.quick else RECIPES)
    args.budget = args.budget if args.budget is not None else (0.05 if args.quick else 1.0)
    args.bw_bytes = (64 << 20) if args.quick else (512 << 20)
    if args.quick:
        args.no_torch_compile = True

    def emit(rec):
        if args.json:
            print(json.dumps(rec), flush=True)
        else:
            line = _fmt_row(rec)
            if line:
                print(line, flush=True)

    if not args.json:
        print(f"# qcc bench {args.suite}: {_machine()}", flush=True)
    (bench_linear if args.suite == "linear" else bench_model)(args, emit)
    return 0


def _machine() -> str:
    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{model}, {os.cpu_count()} cores, L3 {l3_bytes() >> 20} MB"


def main(argv=None) -> int:
    import warnings

    warnings.filterwarnings("ignore")
    p = argparse.ArgumentParser(prog="qcc bench", description=__doc__.splitlines()[0])
    add_arguments(p)
    args = p.parse_args(argv)
    from qcc.tools.qcc_main import run_cli

    return run_cli(args.func, args)


if __name__ == "__main__":
    sys.exit(main())
