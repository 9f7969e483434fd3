"""CPU backend: linalg on tensors -> LLVM dialect -> object file -> shared library.

Bufferization passes results back through out-parameters, so the library's
entry point is `_mlir_ciface_main(args..., outs...)` over memref descriptors:
the caller owns every buffer and the runtime needs nothing but ctypes.
"""

import os
import subprocess
import tempfile

from torch_mlir import ir

def select_kernels(features: dict, openmp: dict | None) -> list[str]:
    """The kernel-selection stage (before lower-qcc-to-linalg) for this host.

    QCC_CPU_KERNELS=reference leaves every qcc op to the reference lowering.
    """
    if os.environ.get("QCC_CPU_KERNELS") == "reference":
        return []
    threads = "true" if openmp is not None else "false"
    return [f"cpu-select-kernels{{lanes={features['lanes']} threads={threads}}}",
            f"cpu-vectorize-contractions{{lanes={features['lanes']} threads={threads}}}"]


def manifest_entry(features: dict, openmp: dict | None, session) -> dict:
    """What the artifact's CPU code assumes and chose: ISA, threads runtime, kernel per layer."""
    return {
        "isa": features["isa"], "flags": features["flags"], "lanes": features["lanes"],
        "openmp": None if openmp is None else {"soname": openmp["soname"]},
        "kernels": session.options.get("cpu_kernels", {}),
    }


BUFFERIZE = [
    "func.func(refback-generalize-tensor-pad)",
    "func.func(refback-generalize-tensor-concat)",
    # TMTensor ops (sort, scan, scatter) have no one-shot bufferization: let
    # one-shot leave them behind casts, then convert them on their own.
    "one-shot-bufferize{allow-unknown-ops bufferize-function-boundaries function-boundary-type-conversion=identity-layout-map}",
    "func.func(tm-tensor-bufferize)",
    "canonicalize",
    "refback-mlprogram-bufferize",
    "buffer-results-to-out-params{hoist-static-allocs=true modify-public-functions=true}",
    "buffer-deallocation-pipeline",
    "canonicalize",
]

TO_LLVM = [
    "func.func(tm-tensor-to-loops)",
    "func.func(refback-munge-memref-copy)",
    "func.func(convert-linalg-to-loops)",
    "func.func(lower-affine)",
    # the kernels' scf.parallel over weight panels -> omp.parallel + omp.wsloop
    "convert-scf-to-openmp",
    "cpu-omp-schedule",
    "convert-scf-to-cf",
    "func.func(refback-expand-ops-for-llvm)",
    "func.func(arith-expand)",
    "func.func(convert-math-to-llvm)",
    "convert-math-to-libm",
    "expand-strided-metadata",
    "finalize-memref-to-llvm",
    "lower-affine",
    "convert-bufferization-to-memref",
    "finalize-memref-to-llvm",
    "func.func(convert-arith-to-llvm)",
    "convert-vector-to-llvm",
    "convert-func-to-llvm",
    "convert-cf-to-llvm",
    "convert-complex-to-llvm",
    "convert-openmp-to-llvm",
    "reconcile-unrealized-casts",
]


def mark_entry(module: ir.Module, name: str = "main") -> None:
    """Asks convert-func-to-llvm for the C interface wrapper of the entry point."""
    for op in module.body.operations:
        if op.operation.name == "func.func" and ir.StringAttr(op.attributes["sym_name"]).value == name:
            op.attributes["llvm.emit_c_interface"] = ir.UnitAttr.get(module.context)


def emit_shared_library(module: ir.Module, out_path: str, opt_level: int = 2, openmp: dict | None = None) -> None:
    """LLVM-dialect module -> object (MLIR's JIT machinery) -> .so (the system linker).

    openmp: {'path', 'soname'} of the OpenMP runtime to link (DT_NEEDED) when
    the module has parallel loops.
    """
    from torch_mlir.execution_engine import ExecutionEngine

    # the JIT resolves every symbol when it writes the object: give it the runtime
    libs = [openmp["path"]] if openmp is not None else []
    engine = ExecutionEngine(module, opt_level=opt_level, shared_libs=libs)
    with tempfile.TemporaryDirectory() as tmp:
        obj = os.path.join(tmp, "module.o")
        engine.dump_to_object_file(obj)
        cmd = ["cc", "-shared", "-o", out_path, obj, "-lm"]
        if openmp is not None:
            cmd += ["-Wl,--as-needed", f"-L{os.path.dirname(openmp['path'])}",
                    f"-l:{os.path.basename(openmp['path'])}"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(f"linking the CPU library failed:\n{proc.stderr}\nRepro command: {' '.join(cmd)}")
