"""CPU backend: linalg on tensors -> LLVM dialect -> object file -> shared library.

Bufferization passes results back through out-parameters, so the library's
entry point is `_mlir_ciface_main(args..., outs...)` over memref descriptors:
the caller owns every buffer and the runtime needs nothing but ctypes.
"""

import os
import re
import subprocess
import tempfile

from torch_mlir import ir

from qcc import irutil


def select_kernels(features: dict, openmp: dict | None) -> list[str]:
    """The kernel-selection stage (before lower-qcc-to-linalg) for this host.

    QCC_CPU_KERNELS=reference leaves every qcc op to the reference lowering.
    """
    if os.environ.get("QCC_CPU_KERNELS") == "reference":
        return []
    threads = "true" if openmp is not None else "false"
    stage = []
    # the integer kernels first: they also take split-outliers' dynamic float parts (on the int8
    # blocks of their integer parts); cpu-select-kernels takes the float parts left (non-AVX2 hosts)
    if features["isa"] in ("avx2", "avx512"):  # the integer kernels are AVX2 code (valid on AVX-512) or VNNI
        stage.append(f"cpu-select-int-kernels{{threads={threads} dot={features.get('int_dot', 'avx2')}}}")
    return stage + [f"cpu-select-kernels{{lanes={features['lanes']} threads={threads}}}",
                    f"cpu-vectorize-contractions{{lanes={features['lanes']} threads={threads}}}"]


def manifest_entry(features: dict, openmp: dict | None, session) -> dict:
    """What the artifact's CPU code assumes and chose: ISA, threads runtime, kernel per layer."""
    return {
        "isa": features["isa"], "flags": features["flags"], "lanes": features["lanes"],
        "int_dot": features.get("int_dot", "avx2"),
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
    """LLVM-dialect module -> LLVM IR -> object (llvmlite's LLVM) -> .so (the system linker).

    openmp: {'path', 'soname'} of the OpenMP runtime to link (DT_NEEDED) when
    the module has parallel loops.
    """
    from torch_mlir.dialects import llvm as llvm_d

    with tempfile.TemporaryDirectory() as tmp:
        obj = os.path.join(tmp, "module.o")
        try:
            code = _object_code(llvm_d.translate_module_to_llvmir(module.operation), opt_level)
        except _UnreadableIR:
            _engine_object(module, obj, opt_level, openmp)
        else:
            with open(obj, "wb") as f:
                f.write(code)
        cmd = ["cc", "-shared", "-o", out_path, obj, "-lm"]
        if openmp is not None:
            cmd += ["-Wl,--as-needed", f"-L{os.path.dirname(openmp['path'])}",
                    f"-l:{os.path.basename(openmp['path'])}"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(f"linking the CPU library failed:\n{proc.stderr}\nRepro command: {' '.join(cmd)}")


class _UnreadableIR(Exception):
    """llvmlite's LLVM (older than MLIR's) cannot parse the module's LLVM IR."""


def _object_code(llvm_ir: str, opt_level: int) -> bytes:
    """LLVM IR -> host object code: host CPU and features, the O<n> pipeline with
    loop and SLP vectorization, unrolling and interleaving (as MLIR's
    ExecutionEngine sets it up), position-independent small code model.  Several
    times quicker than the ExecutionEngine's JIT on the same IR."""
    import llvmlite.binding as lb

    lb.initialize_native_target()
    lb.initialize_native_asmprinter()
    try:
        mod = lb.parse_assembly(older_llvm_literals(llvm_ir))
    except RuntimeError as e:
        raise _UnreadableIR(str(e)) from e
    tm = lb.Target.from_default_triple().create_target_machine(
        cpu=lb.get_host_cpu_name(), features=lb.get_host_cpu_features().flatten(), opt=opt_level,
        reloc="pic", codemodel="default")
    mod.triple = tm.triple
    mod.data_layout = str(tm.target_data)
    pto = lb.create_pipeline_tuning_options(opt_level)
    pto.loop_vectorization = pto.slp_vectorization = pto.loop_unrolling = pto.loop_interleaving = opt_level > 0
    pb = lb.create_pass_builder(tm, pto)
    pb.getModulePassManager().run(mod, pb)
    return tm.emit_object(mod)


def _engine_object(module: ir.Module, obj: str, opt_level: int, openmp: dict | None) -> None:
    """The fallback when llvmlite cannot read the IR: MLIR's JIT writes the object."""
    from torch_mlir.execution_engine import ExecutionEngine

    # the JIT resolves every symbol when it writes the object: give it the runtime
    libs = [openmp["path"]] if openmp is not None else []
    ExecutionEngine(module, opt_level=opt_level, shared_libs=libs).dump_to_object_file(obj)


_DECIMAL = re.compile(r"(?<![\w.%@$-])[-+]?\d+\.\d+e[-+]\d+\b")
_FP_TYPE = re.compile(r"\b(half|bfloat|float|double|fp128|x86_fp80)\b")


def older_llvm_literals(text: str) -> str:
    """MLIR's LLVM prints float constants in forms an older LLVM parser rejects:
    raw bits (`f0x3727C5AC`, rewritten by the CUDA backend's helper) and decimals
    that are not exact (`float 8.000000e-01`): those become the hex of the equal
    double, the only form for an inexact float the older parser takes.  A
    constant's type is the nearest type named before it on its line."""
    import struct

    from qcc.backends.cuda.ptx import _old_float_literals

    def sub(m):
        line = text[text.rfind("\n", 0, m.start()) + 1:m.start()]
        types = _FP_TYPE.findall(line)
        v = float(m.group())
        if not types or types[-1] != "float":
            return m.group()
        f = struct.unpack("<f", struct.pack("<f", v))[0]
        return m.group() if f == v else "0x%016X" % struct.unpack("<Q", struct.pack("<d", f))[0]

    text = _DECIMAL.sub(sub, text)
    return _old_float_literals(text)


def outline_loop_nests(module: ir.Module, entry: str = "main") -> int:
    """Moves each linalg op (and memref.copy) of the bufferized entry into a private
    no-inline function of its own, one function per distinct op: returns how many.

    The entry is one long run of loop nests (every op no kernel took, repeated per
    layer).  LLVM's loop passes grow faster than linearly with a function's size,
    so -O2 over one huge entry dominates the compile; small functions compile
    several times faster, and each distinct nest compiles once.  Constants the
    op reads are copied in (they stay constants); other values become arguments.
    """
    body = module.body
    func = next(op for op in body.operations if op.operation.name == "func.func"
                and ir.StringAttr(op.attributes["sym_name"]).value == entry)
    outlined = {}  # function text without its name -> name
    for op in list(func.regions[0].blocks[0].operations):
        op = op.operation
        if not (op.name.startswith("linalg.") or op.name == "memref.copy") or len(op.results):
            continue
        inner = [op, *irutil.walk(op)]
        defined = {v for o in inner for v in o.results}
        defined |= {a for o in inner for r in o.regions for b in r.blocks for a in b.arguments}
        captured = list(dict.fromkeys(v for o in inner for v in o.operands if v not in defined))
        consts = [v for v in captured if _defining_name(v) == "arith.constant"]
        args = [v for v in captured if v not in consts]
        name = f"{entry}_nest{len(outlined)}"
        with op.location:
            fn = ir.Operation.create(
                "func.func", regions=1, ip=ir.InsertionPoint(func),
                attributes={"sym_name": ir.StringAttr.get(name), "sym_visibility": ir.StringAttr.get("private"),
                            "function_type": ir.TypeAttr.get(ir.FunctionType.get([v.type for v in args], [])),
                            # convert-func-to-llvm passes `llvm.`-prefixed attributes on
                            "llvm.no_inline": ir.UnitAttr.get()})
            block = fn.regions[0].blocks.append(*[v.type for v in args], arg_locs=[op.location] * len(args))
            call = ir.Operation.create("func.call", operands=args, ip=ir.InsertionPoint(op),
                                       attributes={"callee": ir.FlatSymbolRefAttr.get(name)})
            ret = ir.Operation.create("func.return", ip=ir.InsertionPoint(block))
            new = dict(zip(args, block.arguments))
            for v in consts:
                new[v] = v.owner.operation.clone(ip=ir.InsertionPoint(ret)).result
            op.move_before(ret)
            for o in inner:
                for v in set(o.operands) & new.keys():
                    o.replace_uses_of_with(v, new[v])
        key = fn.get_asm(use_local_scope=True, assume_verified=True).replace(f"@{name}(", "@(", 1)
        if key in outlined:
            call.attributes["callee"] = ir.FlatSymbolRefAttr.get(outlined[key])
            fn.erase()
        else:
            outlined[key] = name
    return len(outlined)


def _defining_name(value) -> str | None:
    op = getattr(value.owner, "operation", None)  # a block argument's owner is its block
    return op.name if isinstance(op, ir.Operation) else None
