"""qcc.compile: model in, CompiledModel out.  The stages are listed in pipelines.py."""

import os
import tempfile
import time

import numpy as np

from qcc import pipelines
from qcc.errors import QccError
from qcc.model import CompiledModel
from qcc.recipes import get_recipe

TARGETS = ("cpu", "cuda")


def _to_exported_program(model, example_inputs, allow_pickle, dynamic_shapes=None, remarks=None):
    import torch

    from qcc import frontend

    if isinstance(model, (str, os.PathLike)):
        return frontend.load_program(os.fspath(model), allow_pickle=allow_pickle, example_inputs=example_inputs)
    if isinstance(model, torch.export.ExportedProgram):
        return model
    if isinstance(model, torch.nn.Module):
        if example_inputs is None:
            raise QccError("compiling an nn.Module needs example_inputs", hint="qcc.compile(model, (x,), ...)")
        model, example_inputs = _float32_copy(model.eval(), example_inputs, remarks)
        return frontend.export_module(model, example_inputs, dynamic_shapes=dynamic_shapes)
    raise QccError(f"cannot compile a {type(model).__name__}",
                   hint="pass an nn.Module with example inputs, an ExportedProgram, or a .pt2 path")


def _float32_copy(model, example_inputs, remarks):
    """(model, example_inputs) with bf16 / f16 parameters, buffers and inputs as float32 (a copy;
    the user's model is left as it is), and a remark; unchanged when there are none.  Models
    ship in bf16; qcc's passes and kernels take f32, and bf16 -> f32 is exact, so the weights
    quantize to the same codes, and activations run in float32."""
    import copy
    import itertools

    import torch

    low = (torch.bfloat16, torch.float16)
    kinds = sorted({str(t.dtype).replace("torch.", "")
                    for t in itertools.chain(model.parameters(), model.buffers()) if t.dtype in low})
    if not kinds:
        return model, example_inputs
    if remarks is not None:
        remarks.append(f"the model's {' and '.join(kinds)} parameters and buffers (and such inputs) are "
                       "compiled as float32: exact for the weights, activations run in float32")
    inputs = tuple(x.float() if isinstance(x, torch.Tensor) and x.dtype in low else x for x in example_inputs)
    return copy.deepcopy(model).float(), inputs


def _entry_args(module, params):
    """The entry's arguments in order: a parameter name, a state name, or a user input."""
    from qcc.irutil import Signature, functions

    main = next(f for f in functions(module.operation) if f.attributes["sym_name"].value == "main")
    sig = Signature(main)
    args = []
    for i in range(len(sig.block.arguments)):
        name, state = sig.param_name(i), sig.state_name(i)
        if name is not None:
            args.append({"param": name})
        elif state is not None:
            args.append({"state": state})
        else:
            args.append({"input": len([a for a in args if "input" in a])})
    return args


class _Progress:
    """Stage timings, and a progress bar on stderr when `enabled`."""

    STAGES = 10  # export .. done; a rough total for the bar

    def __init__(self, enabled: bool):
        self.t0 = time.perf_counter()
        self.timings = []
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=self.STAGES, desc="qcc", unit="stage", leave=False,
                            bar_format="{desc}: {n_fmt}/{total_fmt} {postfix} [{elapsed}]")

    def stage(self, name: str):
        """Starts stage `name` (ending the previous one)."""
        self.timings.append((name, time.perf_counter()))
        if self.bar is not None:
            self.bar.set_postfix_str(name)
            self.bar.update(1)
            if name == "done":
                self.bar.close()


def compile(model, example_inputs=None, *, target: str = "cpu", quant: str | None = None,
            calibration=None, allow_pickle: bool = False, print_ir_after_all: bool = False,
            dump_dir: str | None = None, progress: bool = False, dynamic_shapes=None,
            gpu_arch: str = "sm_90", gpu_activations: str = "fp32", cpu_activations: str = "fp32") -> CompiledModel:
    """Compiles `model` (nn.Module + example_inputs, ExportedProgram, or .pt2 path).

    dynamic_shapes: torch.export's argument for an nn.Module, e.g.
    `{"x": {0: torch.export.Dim("tokens", max=4096)}}`: those dimensions stay
    symbolic, so one artifact serves every size in their range.

    calibration: an iterable of input tuples (like example_inputs) that passes
    needing activation statistics run the float model on.

    gpu_activations (target="cuda"): how the weight-only layers' tensor cores see x:
    "fp32" (default) as f16 hi + lo halves, fp32 results (as accurate as an fp32 matmul);
    "f16" rounded to f16 with f16 results, as torch fp16 runs them (half the work at prefill).

    cpu_activations (target="cpu"): how the weight-only layers' kernels see x: "fp32"
    (default) as given; "bf16" rounded to bf16 as torch bf16 runs them, with vdpbf16ps GEMMs
    from 32 rows (twice the f32 FMA rate; needs AVX512-BF16).
    """
    from qcc.context import make_context
    from qcc.frontend import import_program
    from qcc.pipeline import Session, run_pipeline

    if target not in TARGETS:
        raise QccError(f"unknown target '{target}'", where="--target", hint=f"choose one of {', '.join(TARGETS)}")
    if target == "cuda":  # the GPU options, checked before the (slow) export
        from qcc.backends.cuda.lowering import check_options

        check_options(gpu_arch, gpu_activations)
    elif gpu_activations != "fp32":
        raise QccError(f"gpu_activations='{gpu_activations}' applies to target='cuda' only", where="--gpu-activations",
                       hint="drop it, or compile with --target cuda")
    if target == "cpu":
        from qcc.backends.cpu import host, lowering as cpu_lowering

        cpu_lowering.check_activations(cpu_activations, host.features())
    elif cpu_activations != "fp32":
        raise QccError(f"cpu_activations='{cpu_activations}' applies to target='cpu' only", where="--cpu-activations",
                       hint="drop it, or compile with --target cpu")
    recipe = get_recipe(quant)
    prog = _Progress(progress)
    prog.stage("export")
    early_remarks = []
    ep = _to_exported_program(model, example_inputs, allow_pickle, dynamic_shapes, early_remarks)
    ctx = make_context()
    prog.stage("import")
    imported = import_program(ep, ctx, target)
    session = Session(imported.params, {"recipe": recipe.name, "exported_program": ep,
                                        "qcc.calibration.decomposed": imported.program,
                                        "conv_weights": imported.convs,
                                        "calibration": _calibration_list(calibration), "progress": progress})
    session.remarks.extend(early_remarks)
    module = imported.module

    def run(stage, elements):
        prog.stage(stage)
        run_pipeline(module, elements, session, stage, print_ir_after_all)
        if dump_dir:
            os.makedirs(dump_dir, exist_ok=True)
            with open(os.path.join(dump_dir, f"{len(prog.timings):02d}-{stage}.mlir"), "w") as f:
                f.write(module.operation.get_asm(large_elements_limit=16))

    run("torch-backend", pipelines.IMPORT)
    run("quantize", pipelines.recipe_stage(recipe))
    if recipe.weight_format is not None:
        from qcc.passes.quantize_weights import float_weight_uses

        with ctx:
            left = float_weight_uses(module.operation)
        if left:
            session.remarks.append(f"{recipe.name}: weights left float (qcc quantizes linear layers, "
                                   "convolutions whose rows the format's groups tile, and gathered experts): "
                                   + ", ".join(left))
    run("torch-to-linalg", pipelines.TORCH_TO_LINALG)
    if target == "cuda":  # gpu_arch: sm_90 (default), sm_90a (Hopper only: wgmma) or sm_80
        from qcc.backends.cuda.lowering import compile_cuda

        return compile_cuda(module=module, ctx=ctx, session=session, run=run, prog=prog, imported=imported,
                            recipe=recipe, gpu_arch=gpu_arch, gpu_activations=gpu_activations)
    from qcc.backends.cpu import expand_math, host, lowering

    cpu_features, openmp = host.features(), host.openmp_runtime()
    run("select-kernels", lowering.select_kernels(cpu_features, openmp, cpu_activations))
    run("lower-qcc", pipelines.LOWER_QCC)
    run("fuse", lowering.fuse_stage())
    entry_args = _entry_args(module, session.params)

    with ctx:
        lowering.mark_entry(module)
    run("bufferize", lowering.BUFFERIZE)
    outputs = [s.to_json() for s in imported.outputs]
    with ctx:
        in_place = lowering.states_in_place(module, outputs)
        for out in outputs:  # the runtime passes these states' arrays as their out-parameters
            if out.get("state") in in_place:
                out["in_place"] = True
        lowering.outline_loop_nests(module)
        if openmp is not None and os.environ.get("QCC_CPU_PARALLEL_NESTS", "1") != "0":
            lowering.parallelize_nests(module)
        noalias = lowering.noalias_nests(module) if os.environ.get("QCC_CPU_NOALIAS_NESTS", "1") != "0" else {}
        expand_math.expand_exp(module)
    run("to-llvm", lowering.TO_LLVM)
    with ctx:
        lowering.set_noalias(module, noalias)
    prog.stage("codegen")
    with tempfile.TemporaryDirectory() as tmp:
        so = os.path.join(tmp, "cpu.so")
        with ctx:
            lowering.emit_shared_library(module, so, openmp=openmp)
        with open(so, "rb") as f:
            code = {"cpu.so": f.read()}
    prog.stage("done")
    del ctx

    used = [a["param"] for a in entry_args if "param" in a]
    weights = {n: np.require(session.params[n], requirements="C") for n in used}
    weights.update(imported.state_values)  # the states' initial values
    manifest = {
        "target": target,
        "recipe": recipe.to_json(),
        "entry": {"name": "main", "args": entry_args},
        "inputs": [s.to_json() for s in imported.inputs],
        "outputs": outputs,
        "states": [s.to_json() for s in imported.states],
        "dims": imported.dims,
        "layers": _layer_report(weights, session.layers, imported.transposed, imported.convs),
        "remarks": list(session.remarks),
        "versions": _versions(),
        "cpu": {**lowering.manifest_entry(cpu_features, openmp, session), "activations": cpu_activations},
    }
    compiled = CompiledModel(manifest, weights, code)
    compiled.compile_seconds = {name: round(t1 - t0, 3) for (name, t0), (_, t1)
                                in zip(prog.timings, prog.timings[1:])}
    return compiled


def _calibration_list(calibration):
    if calibration is None:
        return None
    import torch

    batches = []
    for i, sample in enumerate(calibration):
        sample = tuple(sample) if isinstance(sample, (tuple, list)) else (sample,)
        batches.append(tuple(torch.as_tensor(x) for x in sample))
    if not batches:
        raise QccError("calibration data is empty", hint="give at least one input tuple")
    return batches


def _layer_report(weights, layers, transposed=frozenset(), convs=None) -> list[dict]:
    """Per quantized weight: format, logical shape [N, K], stored bytes (codes, scales, zeros);
    `transposed` when the model's own tensor is [K, N] (an `x @ W` weight), `experts` E when it
    is a mixture of experts' [E, N / E, K], `conv_shape` a convolution's [O, I / groups, k...]
    (`conv_layout` "ohwi": a 2-D convolution made a linear layer, rows in (kh, kw, C) order;
    else rows in the weight's own (C, k...) order)."""
    report = []
    for base in sorted(layers):
        fmt = layers[base]["format"]
        stored = sum(int(v.nbytes) for n, v in weights.items() if n.startswith(f"{base}:{fmt}:"))
        entry = {"weight": base, "format": fmt, "shape": layers[base]["shape"], "bytes": stored,
                 "float_bytes": 4 * layers[base]["shape"][0] * layers[base]["shape"][1]}
        if base in transposed:
            entry["transposed"] = True
        if base in (convs or {}):  # a convolution made a linear layer over its patches
            entry["conv_shape"], entry["conv_layout"] = convs[base], "ohwi"
        for key in ("experts", "conv_shape"):
            if key in layers[base]:
                entry[key] = layers[base][key]
        report.append(entry)
    return report


def _versions() -> dict:
    from importlib import metadata

    out = {}
    for pkg in ("qcc", "torch", "torch-mlir"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "unknown"
    return out
