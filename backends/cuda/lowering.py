"""CUDA backend: linalg on tensors -> a static launch plan + one PTX/cubin image.

`qcc.compile(..., target="cuda")` runs the common stages (IMPORT, the recipe's passes,
TORCH_TO_LINALG) and then `compile_cuda`:

    select-kernels  cuda-select-kernels: weight-only qcc.qlinear -> calls of qcc's
                    tensor-core GEMV kernels (kernels.py) on weights repacked at compile time
    lower-qcc       the remaining qcc ops -> linalg (dequantization fused into the reduction)
    fuse            tensor.concat -> gather generics (concat.py), generalize named ops, fuse
                    elementwise producers into consumers; a gather collapsed into its
                    consumer's shape (GQA's repeat_kv) is rebuilt on that shape
                    (collapse_gathers.py) and fused again
    bufferize       one-shot, function boundaries included, static identity layouts; every
                    argument read-only (bufferization.writable = false), so no kernel writes a
                    parameter or an input in place
    plan            host_plan.py: allocations, views, linalg.generic, memref.copy and the
                    kernel calls become buffers + an ordered list of launches; each linalg op
                    becomes a kernel (linalg_kernels.py); fuse_launches.py then runs each run
                    of small launches (norms, adds, per-token quantization) as one block
    codegen         all kernels in one gpu.module -> NVVM -> LLVM IR (+ libdevice) -> PTX for
                    --gpu-arch, and a cubin when ptxas is on PATH

Why not convert-linalg-to-parallel-loops / gpu-map-parallel-loops / convert-parallel-
loops-to-gpu / gpu-kernel-outlining: those map loop dim 0 to x (uncoalesced for row-major
tensors), at most 3 dims, one thread per block unless the loops are tiled first, and keep
a reduction's accumulator in memory (a load and a store per step). Generating each
kernel from the linalg op gives a linearised, coalesced mapping of any rank, warp- and
block-cooperative reductions with register accumulators, and a host side that is
already a launch list, so no host lowering (and no gpu.launch_func walking) is needed.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from qcc import pipelines
from qcc.errors import QccError

from .ptx import GRID_DEPENDENCY_ARCHS


ARCHS = ("sm_90", "sm_90a", "sm_80")
FUSE_SMALL_LAUNCHES = True  # fuse_launches.py; tests turn it off to compare plans
FUSE_ROW_LAUNCHES = True  # fuse_launches.fuse_row_launches (prefill's per-row ops); likewise
FUSE_ATTENTION = True  # fuse_attention.py (decode attention: split over keys + combine); likewise
FUSE_GEMV_EPILOGUES = True  # fuse_epilogues.py (decode: the elementwise op after a GEMV in it); likewise
COLLAPSE_GATHERS = True  # collapse_gathers.py (GQA's repeated KV heads read in place); A/B switch


FUSE = [
    "cuda-concat-to-generic",
    "inline",
    "func.func(linalg-generalize-named-ops)",
    "cuda-fold-unit-transposes",
    "inline",
    "func.func(linalg-fuse-elementwise-ops)",
    "canonicalize",
    "cse",
]
# GQA: the fused cache gather, collapsed into the heads, fuses into attention on a second round
COLLAPSE = ["cuda-collapse-gathers", "func.func(linalg-fuse-elementwise-ops)", "canonicalize", "cse"]

BUFFERIZE = [
    "func.func(refback-generalize-tensor-pad)",
    "func.func(refback-generalize-tensor-concat)",
    # TMTensor ops (sort, scan) have no one-shot interface: bufferized on their own, so that
    # the host walker can name them (it has no kernels for them)
    "one-shot-bufferize{allow-unknown-ops bufferize-function-boundaries function-boundary-type-conversion=identity-layout-map}",
    "func.func(tm-tensor-bufferize)",
    "canonicalize",
    "func.func(linalg-generalize-named-ops)",
    "cse",
]


def mark_readonly_args(module, name: str = "main") -> None:
    """bufferization.writable = false on every argument of @name (parameters and inputs)."""
    from torch_mlir import ir

    for op in module.body.operations:
        if op.operation.name == "func.func" and ir.StringAttr(op.attributes["sym_name"]).value == name:
            f = op.operation
            n = len(f.regions[0].blocks[0].arguments)
            old = list(ir.ArrayAttr(f.attributes["arg_attrs"])) if "arg_attrs" in f.attributes else []
            old += [ir.DictAttr.get({})] * (n - len(old))
            new = []
            for d in old:
                d = ir.DictAttr(d)
                entries = {d[i].name: d[i].attr for i in range(len(d))}
                entries["bufferization.writable"] = ir.BoolAttr.get(False)
                new.append(ir.DictAttr.get(entries))
            f.attributes["arg_attrs"] = ir.ArrayAttr.get(new)


@dataclasses.dataclass
class Images:
    ptx: dict  # arch -> text
    cubin: dict  # arch -> bytes
    resources: dict  # arch -> {kernel: Resources as dict}
    llvm_ir: str


def build_images(specs, archs=("sm_90",), cubin: bool = True, early_trigger=()) -> Images:
    """All kernels in one gpu.module -> PTX (and cubin + ptxas resources) per arch; on sm_90+
    every kernel waits for its predecessor in-kernel, those in `early_trigger` let their
    successor launch at their start (ptx.with_grid_dependency)."""
    from . import ptx
    from .emit import gpu_module

    text = gpu_module(list(specs), "qcc_model")
    ll = ptx.lower_to_llvm_ir(text)
    out = Images({}, {}, {}, ll)
    for arch in archs:
        p = ptx.llvm_ir_to_ptx(ll, arch)
        if arch in GRID_DEPENDENCY_ARCHS:
            p = ptx.with_grid_dependency(p, early_trigger)
        out.ptx[arch] = p
        if cubin and ptx.ptxas_path():
            cb = ptx.assemble(p, arch)
            out.cubin[arch] = cb.data
            out.resources[arch] = {k: dataclasses.asdict(r) for k, r in cb.resources.items()}
    return out


EARLY_TRIGGER_BLOCKS = 16  # kernels of at most this many blocks let their successor launch at their start
EARLY_TRIGGER_GEMV_ROWS = 16  # ... and the weight GEMVs of at most this many rows (decode)


def early_trigger_kernels(plan: dict, specs: dict) -> set:
    """The kernels that let the next kernel launch at their start (ptx.with_grid_dependency):
    those whose every launch has at most EARLY_TRIGGER_BLOCKS blocks (decode's one-block
    norms, softmax and quantization) and the decode GEMVs over quantized weights (a few
    microseconds of weight streaming each). Other grids that did so made long kernels slower
    (H200: float decode's generated GEMVs 9%, prefill up to 1.9x; docs/ARCHITECTURE.md), so
    they let it launch at their exit."""
    most = {}
    for L in plan["launches"]:
        n = L["grid"][0] * L["grid"][1] * L["grid"][2]
        most[L["kernel"]] = max(most.get(L["kernel"], 0), n)
    gemv = {k for k in most if specs[k].config.get("kind", "").startswith("gemv")
            and specs[k].config.get("m_max", EARLY_TRIGGER_GEMV_ROWS + 1) <= EARLY_TRIGGER_GEMV_ROWS}
    return {k for k, n in most.items() if n <= EARLY_TRIGGER_BLOCKS} | gemv


ACTIVATIONS = {"fp32": "true", "f16": "false"}  # --gpu-activations -> cuda-select-kernels' split_x


def check_options(gpu_arch: str, gpu_activations: str) -> None:
    """QccError for a --gpu-arch or --gpu-activations value the backend does not know."""
    if gpu_arch not in ARCHS:
        raise QccError(f"unknown GPU architecture '{gpu_arch}'", where="--gpu-arch",
                       hint=f"choose one of {', '.join(ARCHS)}")
    if gpu_activations not in ACTIVATIONS:
        raise QccError(f"unknown GPU activation precision '{gpu_activations}'", where="--gpu-activations",
                       hint=f"choose one of {', '.join(ACTIVATIONS)}")


def compile_cuda(*, module, ctx, session, run, prog, imported, recipe, gpu_arch: str = "sm_90",
                 gpu_activations: str = "fp32"):
    """The CUDA part of qcc.compile (after TORCH_TO_LINALG); returns a CompiledModel."""
    from qcc import driver
    from qcc.model import CompiledModel

    from .fuse_attention import fuse_attention
    from .fuse_epilogues import fuse_gemv_epilogues
    from .fuse_launches import fuse_row_launches, fuse_small_launches
    from .host_plan import HostOpError, PlanBuilder

    if imported.states:
        raise QccError(f"the model updates its buffers in forward() ({', '.join(s.name for s in imported.states[:3])}"
                       f"{', ...' if len(imported.states) > 3 else ''}); the CUDA backend compiles pure functions only",
                       where="--target cuda",
                       hint="compile for --target cpu (which keeps such state between calls), or pass the state "
                            "as an input and return its new value (a KV cache as in test/bench_models.py DecodeStep)")
    dynamic = [f"{spec.name} {spec.shape}" for spec in imported.inputs if any(isinstance(d, str) for d in spec.shape)]
    if dynamic:
        raise QccError(f"the CUDA backend plans every launch for fixed shapes, but input {dynamic[0]} has a "
                       f"run-time size", where="--target cuda",
                       hint="export without dynamic_shapes (one artifact per shape), or compile for --target cpu")
    run("select-kernels", [f"cuda-select-kernels{{split-x={ACTIVATIONS[gpu_activations]} arch={gpu_arch}}}"])
    run("lower-qcc", pipelines.LOWER_QCC)
    entry_args = driver._entry_args(module, session.params)
    with ctx:
        mark_readonly_args(module)
    run("fuse", FUSE + (COLLAPSE if COLLAPSE_GATHERS else []))
    run("bufferize", BUFFERIZE)
    prog.stage("plan")
    used = [a["param"] for a in entry_args if "param" in a]
    weights = {n: np.require(session.params[n], requirements="C") for n in used}
    try:
        with ctx:
            pb = PlanBuilder(module, weights).build(entry_args=entry_args)
    except HostOpError as e:
        raise QccError(f"cuda backend: {e}")
    if FUSE_ATTENTION:
        pb.launches = fuse_attention(pb.launches, pb.specs, pb.descs, pb.roots)
    if FUSE_GEMV_EPILOGUES:
        pb.launches = fuse_gemv_epilogues(pb.launches, pb.specs, pb.descs, pb.roots)
    if FUSE_SMALL_LAUNCHES:
        pb.launches = fuse_small_launches(pb.launches, pb.specs, pb.descs)
    if FUSE_ROW_LAUNCHES:
        pb.launches = fuse_row_launches(pb.launches, pb.specs, pb.descs, pb.roots)
    plan = pb.to_json()
    launched = {L["kernel"] for L in plan["launches"]}
    specs = {n: s for n, s in pb.specs.items() if n in launched}
    prog.stage("codegen")
    img = build_images(specs.values(), (gpu_arch,), early_trigger=early_trigger_kernels(plan, specs))
    code = {f"cuda_{gpu_arch}.ptx": img.ptx[gpu_arch].encode()}
    if gpu_arch in img.cubin:
        code[f"cuda_{gpu_arch}.cubin"] = img.cubin[gpu_arch]
    prog.stage("done")
    kernels = {}
    for n, s in sorted(specs.items()):
        k = s.manifest()
        res = img.resources.get(gpu_arch, {}).get(n)
        if res is not None:
            k["resources"] = {gpu_arch: res}
        kernels[n] = k
    cuda = {
        "arch": gpu_arch,
        "images": {gpu_arch: {"ptx": f"cuda_{gpu_arch}.ptx",
                              **({"cubin": f"cuda_{gpu_arch}.cubin"} if gpu_arch in img.cubin else {})}},
        "kernels": kernels,
        "plan": plan,
        # kernels wait for their predecessor in-kernel (griddepcontrol): launch them with
        # programmatic stream serialization (model_runtime)
        "launch": "programmatic" if gpu_arch in GRID_DEPENDENCY_ARCHS else "serial",
        "layers": session.options.get("cuda_kernels", {}),
        "int_layers": session.options.get("cuda_int_layers", {}),
        "fallback": session.options.get("cuda_fallback", {}),
        "activations": gpu_activations,
        "numerics": ("GEMV/GEMM layers (cuda.layers): x as f16 hi + lo halves, fp32 accumulation and output"
                     if gpu_activations == "fp32" else
                     "GEMV/GEMM layers (cuda.layers): x rounded to f16, fp32 accumulation, f16 output")
                    + "; everything else fp32",
    }
    layers = driver._layer_report(weights, session.layers, imported.transposed, imported.convs)
    for layer in layers:  # a stacked GEMV's bytes, shared out by each layer's columns
        info = cuda["layers"].get(layer["weight"])
        if info and "cols" in info:
            total = sum(int(weights[n].nbytes) for n in info["params"].values())
            layer["bytes"] = total * (info["cols"][1] - info["cols"][0]) // info["args"]["N"]
    manifest = {
        "target": "cuda",
        "recipe": recipe.to_json(),
        "entry": {"name": "main", "args": entry_args},
        "inputs": [s.to_json() for s in imported.inputs],
        "outputs": [s.to_json() for s in imported.outputs],
        "layers": layers,
        "remarks": list(session.remarks),
        "versions": driver._versions(),
        "cuda": cuda,
    }
    compiled = CompiledModel(manifest, weights, code)
    compiled.compile_seconds = {name: round(t1 - t0, 3) for (name, t0), (_, t1)
                                in zip(prog.timings, prog.timings[1:])}
    compiled.cuda_specs = specs  # kept in memory for tests (CPU emulation, other archs)
    compiled.cuda_images = img
    return compiled
