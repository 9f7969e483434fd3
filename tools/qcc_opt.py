"""qcc-opt: run qcc and upstream passes on an .mlir file, like mlir-opt.

    qcc-opt in.mlir -p quantize-weights{format=int8_sym_channel},canonicalize

Parameters named by `{qcc.param = ...}` come from --params (safetensors) or,
for tests, from --random-params=SEED (seeded normal values of the argument's
shape).
"""

import argparse
import os
import sys

from qcc.tools.qcc_main import run_cli


def _random_params(module, seed: int):
    import numpy as np

    from qcc import irutil
    from qcc.params import ParamStore

    rng = np.random.default_rng(seed)
    store = ParamStore()
    for func in irutil.functions(module.operation):
        sig = irutil.Signature(func)
        for i, arg in enumerate(sig.block.arguments):
            name = sig.param_name(i)
            if name is None or name in store:
                continue
            t = str(arg.type)
            if t.startswith("!torch.vtensor"):
                shape, dtype = irutil.vtensor_shape(arg.type)
            else:
                from torch_mlir import ir

                rt = ir.RankedTensorType(arg.type)
                shape, dtype = list(rt.shape), str(rt.element_type)
            if dtype != "f32":
                raise SystemExit(f"qcc-opt: --random-params only makes f32 parameters, '{name}' is {dtype}")
            store[name] = rng.standard_normal(shape).astype(np.float32)
    return store


def opt(args) -> int:
    from torch_mlir import ir

    from qcc.context import make_context
    from qcc.errors import QccError
    from qcc.params import ParamStore
    from qcc.pipeline import Session, run_pipeline

    if args.list_passes:
        from qcc.passes import all_passes

        for name, cls in all_passes().items():
            print(f"  {name:28s} {cls.summary}")
        return 0
    if not args.input:
        raise QccError("no input file", hint="qcc-opt FILE.mlir -p PASSES")
    ctx = make_context()
    text = sys.stdin.read() if args.input == "-" else open(args.input).read()
    with ctx:
        try:
            module = ir.Module.parseFile(args.input) if args.input != "-" else ir.Module.parse(text)
        except ir.MLIRError as e:
            raise QccError(f"cannot parse: {e}", where=args.input)
    if args.params:
        params = ParamStore.load(args.params)
    elif args.random_params is not None:
        params = _random_params(module, args.random_params)
    else:
        params = ParamStore()
    session = Session(params)
    if args.pipeline:
        run_pipeline(module, args.pipeline, session, "qcc-opt", args.print_ir_after_all)
    for remark in session.remarks:  # what a pass chose not to do, as `qcc compile` says it
        print(f"qcc-opt: remark: {remark}", file=sys.stderr)
    out = module.operation.get_asm(large_elements_limit=16)
    if args.output:
        with open(args.output, "w") as f:
            f.write(out)
    else:
        sys.stdout.write(out)
    if args.output_params:
        session.params.save(args.output_params)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="qcc-opt", description="Run qcc passes on an MLIR file.")
    p.add_argument("input", nargs="?", help="input .mlir file, or - for stdin")
    p.add_argument("-p", "--pass-pipeline", dest="pipeline", action="append",
                   help="comma-separated passes (qcc and upstream); may repeat")
    p.add_argument("-o", "--output")
    p.add_argument("--params", help="parameter store (.safetensors) for passes that read weights")
    p.add_argument("--random-params", type=int, metavar="SEED", help="fill f32 parameters with seeded noise")
    p.add_argument("--output-params", help="write the parameter store after the passes")
    p.add_argument("--print-ir-after-all", action="store_true")
    p.add_argument("--list-passes", action="store_true")
    args = p.parse_args(argv)
    return run_cli(opt, args)


if __name__ == "__main__":
    sys.exit(main())
