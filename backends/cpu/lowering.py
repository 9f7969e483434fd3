"""CPU backend: linalg on tensors -> LLVM dialect -> object file -> shared library.

Bufferization passes results back through out-parameters, so the library's
entry point is `_mlir_ciface_main(args..., outs...)` over memref descriptors:
the caller owns every buffer and the runtime needs nothing but ctypes.
"""

import os
import subprocess
import tempfile

from torch_mlir import ir

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
    "reconcile-unrealized-casts",
]


def mark_entry(module: ir.Module, name: str = "main") -> None:
    """Asks convert-func-to-llvm for the C interface wrapper of the entry point."""
    for op in module.body.operations:
        if op.operation.name == "func.func" and ir.StringAttr(op.attributes["sym_name"]).value == name:
            op.attributes["llvm.emit_c_interface"] = ir.UnitAttr.get(module.context)


def emit_shared_library(module: ir.Module, out_path: str, opt_level: int = 3) -> None:
    """LLVM-dialect module -> object (MLIR's JIT machinery) -> .so (the system linker)."""
    from torch_mlir.execution_engine import ExecutionEngine

    engine = ExecutionEngine(module, opt_level=opt_level)
    with tempfile.TemporaryDirectory() as tmp:
        obj = os.path.join(tmp, "module.o")
        engine.dump_to_object_file(obj)
        cmd = ["cc", "-shared", "-o", out_path, obj, "-lm"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(f"linking the CPU library failed:\n{proc.stderr}\nRepro command: {' '.join(cmd)}")
