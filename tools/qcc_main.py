"""The `qcc` command line: compile, run, inspect, demo.

User errors print one line and exit with code 2; QCC_TRACEBACK=1 shows the
Python traceback of any failure.
"""

import argparse
import json
import os
import sys


def _load_npz(path: str, what: str) -> dict:
    import numpy as np

    from qcc.errors import QccError

    if not os.path.isfile(path):
        raise QccError(f"no such {what} file", where=path)
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except (ValueError, OSError) as e:
        raise QccError(f"cannot read {what} as .npz: {e}", where=path, hint="write it with numpy.savez")


def _ordered_inputs(arrays: dict, specs: list, path: str) -> list:
    """npz entries by input name, else positionally as arr_0, arr_1, ..."""
    from qcc.errors import QccError

    out = []
    for i, spec in enumerate(specs):
        for key in (spec["name"], f"arr_{i}"):
            if key in arrays:
                out.append(arrays[key])
                break
        else:
            have = ", ".join(sorted(arrays)) or "nothing"
            raise QccError(f"missing input '{spec['name']}' (or arr_{i})", where=path, hint=f"the file holds {have}")
    return out


def cmd_compile(args) -> int:
    import qcc
    from qcc.errors import QccError

    example = None
    if args.example_inputs:
        import torch

        example = tuple(torch.from_numpy(a) for a in _load_npz(args.example_inputs, "example inputs").values())
    calibration = None
    if args.calib:
        import torch

        arrays = list(_load_npz(args.calib, "calibration").values())
        if len({a.shape[0] for a in arrays}) != 1:
            raise QccError("calibration arrays must share their leading (sample) dimension", where=args.calib)
        calibration = [tuple(torch.from_numpy(a[j]) for a in arrays) for j in range(arrays[0].shape[0])]
    m = qcc.compile(args.model, example, target=args.target, quant=args.quant, calibration=calibration,
                    gpu_arch=args.gpu_arch, gpu_activations=args.gpu_activations,
                    cpu_activations=args.cpu_activations,
                    allow_pickle=args.allow_pickle,
                    print_ir_after_all=args.print_ir_after_all, dump_dir=args.dump_dir, progress=not args.quiet and sys.stderr.isatty())
    m.save(args.output)
    if not args.quiet:
        _print_summary(m, args.output)
        for remark in m.remarks:
            print(f"qcc: remark: {remark}", file=sys.stderr)
    if args.timing:
        for stage, secs in m.compile_seconds.items():
            print(f"  {stage:16s} {secs:8.3f} s", file=sys.stderr)
    return 0


def _print_summary(m, path):
    layers = m.manifest["layers"]
    q = sum(layer["bytes"] for layer in layers)
    f = sum(layer["float_bytes"] for layer in layers)
    print(f"wrote {path}: {m.manifest['target']}, recipe {m.manifest['recipe']['name']}, "
          f"{len(layers)} quantized layer(s)" + (f", {f / 1e6:.2f} MB -> {q / 1e6:.2f} MB" if layers else ""))


def cmd_run(args) -> int:
    import numpy as np

    import qcc

    m = qcc.load(args.artifact)
    arrays = _ordered_inputs(_load_npz(args.inputs, "inputs"), m.inputs, args.inputs)
    outs = m.run(*arrays)
    if args.output:
        np.savez(args.output, **{spec["name"]: o for spec, o in zip(m.outputs, outs)})
        print(f"wrote {args.output}")
    else:
        for spec, o in zip(m.outputs, outs):
            print(f"{spec['name']}: shape {list(o.shape)} {o.dtype} mean {o.mean():.6g} std {o.std():.6g}")
    return 0


def cmd_info(args) -> int:
    import qcc

    m = qcc.load(args.artifact)
    print(json.dumps({k: v for k, v in m.manifest.items() if k != "files"}, indent=1))
    return 0


def cmd_demo(args) -> int:
    from qcc.tools.demo import main as demo

    return demo(args.quant)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qcc", description="Compile quantized PyTorch models to native code.")
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("compile", help="compile a .pt2 ExportedProgram into a .qcc artifact")
    c.add_argument("model", help="model file: a .pt2 written by torch.export.save")
    c.add_argument("--target", default="cpu", help="cpu (default) or cuda")
    c.add_argument("--gpu-arch", default="sm_90", help="cuda target: sm_90 (default, H100/H200), sm_90a (H100/H200 only: prefill on wgmma) or sm_80 (A100)")
    c.add_argument("--gpu-activations", default="fp32", choices=("fp32", "f16"),
                   help="cuda target, weight-only layers: fp32 (default; x enters the tensor cores as f16 "
                        "hi + lo halves, results as accurate as an fp32 matmul) or f16 (x and y rounded to "
                        "f16 as in torch fp16: half the tensor work at prefill)")
    c.add_argument("--cpu-activations", default="fp32", choices=("fp32", "bf16"),
                   help="cpu target, weight-only layers: fp32 (default; x as given) or bf16 (x rounded to "
                        "bf16 as in torch bf16: vdpbf16ps GEMMs from 32 tokens, needs AVX512-BF16)")
    c.add_argument("--quant", default="float",
                   help="recipe name (float, w8a16, w4a16-g128, w8a8, w8a8-static, w4a8-g128, w4a4, llm-int8, llm-int8-dynamic, "
                        "w8a8-had, w4a4-had, w4a4-reorder, w4a4-had-reorder, w8a8-smooth, w4a16-g128-awq; "
                        "<preset>-gptq rounds any integer-weight preset with GPTQ, e.g. w8a8-had-gptq) "
                        "or a recipe file (.json/.toml) with per-layer overrides")
    c.add_argument("-o", "--output", required=True, help="artifact path, e.g. model.qcc")
    c.add_argument("--allow-pickle", action="store_true",
                   help="accept a torch.save()d module (unpickling runs code from the file)")
    c.add_argument("--example-inputs", help=".npz of example inputs (needed for pickled modules)")
    c.add_argument("--calib", help=".npz of calibration inputs: one array per model input, in input order, "
                                   "each with a leading sample dimension")
    c.add_argument("--print-ir-after-all", action="store_true")
    c.add_argument("--dump-dir", help="write the IR after each stage into this folder")
    c.add_argument("--timing", action="store_true", help="print the time of each stage")
    c.add_argument("-q", "--quiet", action="store_true")
    c.set_defaults(func=cmd_compile)
    r = sub.add_parser("run", help="run a .qcc artifact on inputs from an .npz file")
    r.add_argument("artifact")
    r.add_argument("--inputs", required=True, help=".npz with one array per model input (by name or arr_i)")
    r.add_argument("--output", help="write outputs to this .npz")
    r.set_defaults(func=cmd_run)
    i = sub.add_parser("info", help="print an artifact's manifest")
    i.add_argument("artifact")
    i.set_defaults(func=cmd_info)
    d = sub.add_parser("demo", help="compile the bundled example model and compare with PyTorch")
    d.add_argument("--quant", default="w4a16-g128")
    d.set_defaults(func=cmd_demo)
    from qcc.tools.bench import add_arguments as add_bench_arguments  # noqa: E402 (light: no torch at import)
    add_bench_arguments(sub.add_parser("bench", help="benchmark CPU kernels and models against PyTorch"))
    return p


def run_cli(func, args) -> int:
    """Runs a command: user errors become one line on stderr and exit code 2."""
    from qcc.errors import QccError

    try:
        return func(args)
    except QccError as e:
        if os.environ.get("QCC_TRACEBACK"):
            raise
        print(f"qcc: {e.one_line()}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("qcc: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a bug in qcc, not in the input
        if os.environ.get("QCC_TRACEBACK"):
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        print(f"qcc: internal error: {type(e).__name__}: {msg} (rerun with QCC_TRACEBACK=1 and report it)",
              file=sys.stderr)
        return 3


def main(argv=None) -> int:
    import warnings

    # torch.export.load warns about its own internals; users cannot act on it
    warnings.filterwarnings("ignore", category=FutureWarning)
    args = build_parser().parse_args(argv)
    return run_cli(args.func, args)


if __name__ == "__main__":
    sys.exit(main())
