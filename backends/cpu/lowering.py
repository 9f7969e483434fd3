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
from qcc.errors import QccError


ACTIVATIONS = ("fp32", "bf16")  # how the weight-only kernels read x (cpu_activations)


def check_activations(cpu_activations: str, features: dict) -> None:
    if cpu_activations not in ACTIVATIONS:
        raise QccError(f"unknown CPU activation precision '{cpu_activations}'", where="--cpu-activations",
                       hint=f"one of {', '.join(ACTIVATIONS)}")
    if cpu_activations == "bf16" and "avx512_bf16" not in features["flags"]:
        raise QccError("--cpu-activations bf16 needs a CPU with AVX512-BF16 (vdpbf16ps); this host has none",
                       where="--cpu-activations", hint="compile with the default fp32 activations")


def select_kernels(features: dict, openmp: dict | None, cpu_activations: str = "fp32") -> list[str]:
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
    bf16 = "true" if cpu_activations == "bf16" else "false"
    return stage + [f"cpu-select-kernels{{lanes={features['lanes']} threads={threads} bf16={bf16}}}",
                    f"cpu-select-expert-kernels{{lanes={features['lanes']} threads={threads}}}",
                    f"cpu-vectorize-contractions{{lanes={features['lanes']} threads={threads}}}"]


def manifest_entry(features: dict, openmp: dict | None, session) -> dict:
    """What the artifact's CPU code assumes and chose: ISA, threads runtime, kernel per layer."""
    return {
        "isa": features["isa"], "flags": features["flags"], "lanes": features["lanes"],
        "int_dot": features.get("int_dot", "avx2"),
        "openmp": None if openmp is None else {"soname": openmp["soname"]},
        "kernels": session.options.get("cpu_kernels", {}),
    }


def fuse_stage() -> list[str]:
    """The tensor-level clean-up between lower-qcc and bufferization.

    linalg-fuse-elementwise-ops merges chains of elementwise ops (and elementwise producers
    into reductions: RMSNorm's square into its sum) into one generic each, so a value makes
    one trip through memory instead of one per op, and drops results no one reads (softmax's
    max came with argmax indices, which kept that nest serial: it read linalg.index).  The
    benchmark model's prefill goes from 164 linalg.generic ops to 86.  cpu-reassociate-reductions
    then lets LLVM vectorize float sums.  QCC_CPU_FUSE_ELEMENTWISE=0 / QCC_CPU_REASSOCIATE=0 leave
    either out (for A/B runs: tools/cpu_ab.py).
    """
    stage = []
    if os.environ.get("QCC_CPU_FUSE_ELEMENTWISE", "1") != "0":
        stage.append("func.func(linalg-fuse-elementwise-ops)")
    if os.environ.get("QCC_CPU_REASSOCIATE", "1") != "0":
        stage.append("cpu-reassociate-reductions")
    return stage


BUFFERIZE = [
    "func.func(refback-generalize-tensor-pad)",
    "func.func(refback-generalize-tensor-concat)",
    # TMTensor ops (sort, scan, scatter) have no one-shot bufferization: let
    # one-shot leave them behind casts, then convert them on their own.
    "one-shot-bufferize{allow-unknown-ops bufferize-function-boundaries function-boundary-type-conversion=identity-layout-map unknown-type-conversion=identity-layout-map}",
    "func.func(tm-tensor-bufferize)",
    "canonicalize",
    "refback-mlprogram-bufferize",
    "buffer-results-to-out-params{hoist-static-allocs=true modify-public-functions=true}",
    "buffer-deallocation-pipeline",
    "canonicalize",
    # transposes and fills as linalg.generic: parallelize_nests splits generics
    "func.func(linalg-generalize-named-ops)",
    # tanh (GELU's tanh form) as exp arithmetic here, before expand_math.expand_exp: expanded
    # in TO_LLVM, its exp became a scalar libm call no loop could vectorize
    "func.func(refback-expand-ops-for-llvm)",
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
    """Asks convert-func-to-llvm for the C interface wrapper of the entry point, and gives each
    of its results a tensor of its own (`_distinct_results`)."""
    for op in module.body.operations:
        if op.operation.name == "func.func" and ir.StringAttr(op.attributes["sym_name"]).value == name:
            op.attributes["llvm.emit_c_interface"] = ir.UnitAttr.get(module.context)
            _distinct_results(op)


def states_in_place(module: ir.Module, outputs: list, name: str = "main") -> set:
    """After bufferization: a state whose input buffer is read only by one memref.copy into its
    own output's out-parameter, before anything touches that out-parameter, is updated in place:
    the copy goes and the runtime passes the state's array as both (a static KV cache was copied
    whole every step).  `outputs`: the manifest's outputs (result order).  Returns the names."""
    func = next(op for op in module.body.operations if op.operation.name == "func.func"
                and ir.StringAttr(op.attributes["sym_name"]).value == name)
    args = list(func.regions[0].blocks[0].arguments)
    n_in = len(args) - len(outputs)
    attrs = list(ir.ArrayAttr(func.attributes["arg_attrs"])) if "arg_attrs" in func.attributes else []
    state_arg = {}
    for i, a in enumerate(attrs[:n_in]):
        d = ir.DictAttr(a)
        if "qcc.state" in d:
            state_arg[ir.StringAttr(d["qcc.state"]).value] = args[i]
    body = list(func.regions[0].blocks[0].operations)
    done = set()
    for j, out in enumerate(outputs):
        state = out.get("state")
        if state not in state_arg:
            continue
        uses = list(state_arg[state].uses)
        if len(uses) != 1:
            continue
        copy = uses[0].owner.operation
        dest = args[n_in + j]
        if copy.name != "memref.copy" or uses[0].operand_number != 0 or copy.operands[1] != dest:
            continue
        first = next((op for op in body if _touches(op, dest)), None)
        if first is None or first != copy:
            continue
        copy.erase()
        done.add(state)
    return done


def _touches(op, value) -> bool:
    """Whether `op` or an op nested in it has `value` as an operand."""
    return any(v == value for o in [op, *irutil.walk(op)] for v in o.operands)


def _distinct_results(func) -> None:
    """A value the entry returns twice (`return y, y`; two buffers updated to one value) or an
    argument it returns as is becomes a copy: buffer-results-to-out-params writes each result
    into its own out-parameter and crashed (a segfault) on the repeated value."""
    block = func.regions[0].blocks[0]
    ret = block.operations[len(block.operations) - 1]
    args = list(block.arguments)
    seen = []
    for i, value in enumerate(list(ret.operands)):
        if any(value == v for v in seen) or any(value == a for a in args):
            with ir.InsertionPoint(ret), ret.location:
                copy = ir.Operation.create(
                    "bufferization.alloc_tensor", results=[value.type], operands=[value],
                    attributes={"operandSegmentSizes": ir.DenseI32ArrayAttr.get([0, 1, 0])})
            ret.operands[i] = copy.result
        seen.append(value)


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


def parallelize_nests(module: ir.Module, entry: str = "main", min_iterations: int = 1 << 16,
                      chunks: int = 16) -> int:
    """Runs the large elementwise / row-reduction nests outline_loop_nests made on all threads:
    returns how many.

    A nest (one linalg.generic) qualifies when it has at least `min_iterations` points, a body
    that reads only its operands' elements (no linalg.index, no loads of other buffers), and a
    parallel loop d that every operand either ignores or indexes by d alone in one position
    (RMSNorm's rows, softmax's heads, SwiGLU's tokens).  Its function then takes a range of
    d ([r0, r0 + size)) and runs on subviews of those operands; a wrapper runs `chunks`
    ranges in an scf.parallel (OpenMP threads), the call sites call the wrapper.  Decode's
    nests (a few thousand points) stay serial: a fork costs more than they do.
    """
    body = module.body
    funcs = {ir.StringAttr(op.attributes["sym_name"]).value: op for op in body.operations
             if op.operation.name == "func.func"}
    done = 0
    for name, fn in funcs.items():
        if not name.startswith(f"{entry}_nest"):
            continue
        ops = [op.operation for op in fn.regions[0].blocks[0].operations]
        nests = [op for op in ops if op.name not in ("arith.constant", "func.return")]
        if len(nests) != 1 or nests[0].name != "linalg.generic":
            continue
        split = _split_loop(nests[0], min_iterations)
        if split is None:
            continue
        _take_range(fn, nests[0], *split)
        extent = split[1]
        step = -(-extent // min(chunks, extent))
        arg_types = [str(a.type) for a in fn.regions[0].blocks[0].arguments][:-2]
        params = ", ".join(f"%a{i}: {t}" for i, t in enumerate(arg_types))
        args = ", ".join(f"%a{i}" for i in range(len(arg_types)))
        wrapper = (f"func.func private @{name}_par({params}) {{\n"
                   f"  %c0 = arith.constant 0 : index\n  %c1 = arith.constant 1 : index\n"
                   f"  %n = arith.constant {-(-extent // step)} : index\n"
                   f"  %step = arith.constant {step} : index\n  %extent = arith.constant {extent} : index\n"
                   f"  scf.parallel (%i) = (%c0) to (%n) step (%c1) {{\n"
                   f"    %r0 = arith.muli %i, %step : index\n"
                   f"    %left = arith.subi %extent, %r0 : index\n"
                   f"    %size = arith.minui %step, %left : index\n"
                   f"    func.call @{name}({args}{', ' if args else ''}%r0, %size) : "
                   f"({', '.join(arg_types + ['index', 'index'])}) -> ()\n"
                   f"  }}\n  return\n}}\n")
        # the nest's declaration lets the wrapper parse on its own; `defined` drops it again
        declaration = f"func.func private @{name}({', '.join(arg_types + ['index', 'index'])})\n"
        irutil.append_functions(module.operation, declaration + wrapper, {name})
        for call in irutil.walk(funcs[entry], "func.call"):
            if ir.FlatSymbolRefAttr(call.attributes["callee"]).value == name:
                call.attributes["callee"] = ir.FlatSymbolRefAttr.get(f"{name}_par")
        done += 1
    return done


# ops whose memref result views (part of) their first operand's buffer
_VIEWS = ("memref.subview", "memref.expand_shape", "memref.collapse_shape", "memref.cast",
          "memref.reinterpret_cast", "memref.transpose", "memref.view")


def _root(value):
    """The buffer a memref value views: ('alloc', op) or ('global', name) or ('arg', index of
    the entry's block argument)."""
    while _defining_name(value) in _VIEWS:
        value = value.owner.operation.operands[0]
    name = _defining_name(value)
    if name is None:
        return ("arg", ir.BlockArgument(value).arg_number)
    if name == "memref.get_global":
        return ("global", ir.FlatSymbolRefAttr(value.owner.operation.attributes["name"]).value)
    return ("op", value.owner.operation)


def noalias_nests(module: ir.Module, entry: str = "main") -> dict[str, list[int]]:
    """The outlined nests whose memref arguments view pairwise different buffers at every call
    site (allocations, globals, the entry's arguments: inputs and parameters only read,
    outputs fresh): name -> positions of those arguments' pointers once convert-func-to-llvm
    has expanded each memref into its descriptor's fields (it drops `llvm.noalias` on memref
    arguments; set_noalias puts it on the aligned pointers after it). Without it LLVM must assume a
    reduction's output may alias its input, keeps the accumulator in memory (a store-to-load
    chain an element) and vectorizes nothing: softmax's row max over 16 x 513 scores took
    ~30 us a layer at decode."""
    funcs = {ir.StringAttr(op.attributes["sym_name"]).value: op for op in module.body.operations
             if op.operation.name == "func.func"}
    sites: dict[str, list] = {}
    for call in irutil.walk(funcs[entry], "func.call"):
        callee = ir.FlatSymbolRefAttr(call.attributes["callee"]).value
        target = callee[:-4] if callee.endswith("_par") and callee[:-4] in funcs else callee
        if target.startswith(f"{entry}_nest"):
            sites.setdefault(target, []).append(call)
    out = {}
    for name, calls in sites.items():
        types = ir.FunctionType(ir.TypeAttr(funcs[name].attributes["function_type"]).value).inputs
        memrefs = [i for i, t in enumerate(types) if _memref_type(t) is not None]
        distinct = bool(memrefs)
        for call in calls:
            roots = [_root(call.operands[i]) for i in memrefs]
            keys = [(k, id(v)) if k == "op" else (k, v) for k, v in roots]
            distinct &= len(set(keys)) == len(keys)
        if not distinct:
            continue
        positions, at = [], 0
        for t in types:
            mt = _memref_type(t)
            if mt is None:
                at += 1
                continue
            positions.append(at + 1)  # the aligned pointer (the one loads and stores use)
            at += 3 + 2 * mt.rank
        out[name] = positions
    return out


def set_noalias(module: ir.Module, positions: dict[str, list[int]]) -> None:
    """`llvm.noalias` on those pointer arguments of the LLVM-dialect functions (noalias_nests)."""
    unit = ir.UnitAttr.get(module.context)
    for op in module.body.operations:
        if op.operation.name != "llvm.func":
            continue
        name = ir.StringAttr(op.attributes["sym_name"]).value
        if name not in positions:
            continue
        n = len(ir.TypeAttr(op.attributes["function_type"]).value.inputs)
        old = list(ir.ArrayAttr(op.attributes["arg_attrs"])) if "arg_attrs" in op.attributes else []
        attrs = []
        for i in range(n):
            d = {a.name: a.attr for a in ir.DictAttr(old[i])} if i < len(old) else {}
            if i in positions[name]:
                d["llvm.noalias"] = unit
            attrs.append(ir.DictAttr.get(d, context=module.context))
        op.attributes["arg_attrs"] = ir.ArrayAttr.get(attrs, context=module.context)


def _split_loop(op, min_iterations: int):
    """(loop d, its extent, per operand the position indexed by d or None) of a linalg.generic
    on static memrefs that parallelize_nests may split, else None."""
    # a body that reads loop indices (linalg.index: gathers, masks) or other buffers directly
    # would see the range's local indices, not the loop's
    if any(inner.name in ("linalg.index", "memref.load", "tensor.extract") for inner in irutil.walk(op)):
        return None
    maps = [ir.AffineMapAttr(m).value for m in ir.ArrayAttr(op.attributes["indexing_maps"])]
    iterators = [str(a) for a in ir.ArrayAttr(op.attributes["iterator_types"])]
    shapes = []
    for v in op.operands:
        t = _memref_type(v.type)
        if t is None or not t.has_static_shape:
            return None
        shapes.append(list(t.shape))
    extents = {}
    for m, shape in zip(maps, shapes):
        for e, size in zip(m.results, shape):
            if _dim_position(e) is not None:
                extents[_dim_position(e)] = size
    if len(extents) != len(iterators):
        return None
    total = 1
    for size in extents.values():
        total *= size
    if total < min_iterations:
        return None
    for d, kind in enumerate(iterators):
        if "parallel" not in kind or extents[d] < 2:
            continue
        positions = []
        for m in maps:
            uses = [i for i, e in enumerate(m.results) if re.search(rf"\bd{d}\b", str(e))]
            if not uses:
                positions.append(None)
            elif len(uses) == 1 and _dim_position(m.results[uses[0]]) == d:
                positions.append(uses[0])
            else:
                break
        else:
            n_outputs = list(ir.DenseI32ArrayAttr(op.attributes["operandSegmentSizes"]))[1]
            if all(pos is not None for pos in positions[len(positions) - n_outputs:]):  # no shared writes
                return d, extents[d], positions
    return None


def _memref_type(t):
    try:
        return ir.MemRefType(t)
    except ValueError:
        return None


def _dim_position(expr) -> int | None:
    """d of an affine expression that is exactly the loop dimension d, else None."""
    try:
        return ir.AffineDimExpr(expr).position
    except ValueError:
        return None


def _take_range(fn, op, d: int, extent: int, positions: list) -> None:
    """Gives `fn` two trailing index arguments (r0, size) and makes `op` read and write only
    [r0, r0 + size) of its loop d (subviews of the operands indexed by d)."""
    block = fn.regions[0].blocks[0]
    index = ir.IndexType.get()
    r0, size = block.add_argument(index, op.location), block.add_argument(index, op.location)
    ftype = ir.FunctionType(ir.TypeAttr(fn.attributes["function_type"]).value)
    fn.attributes["function_type"] = ir.TypeAttr.get(ir.FunctionType.get(list(ftype.inputs) + [index, index], []))
    dyn = ir.ShapedType.get_dynamic_size()
    dyn_stride = ir.ShapedType.get_dynamic_stride_or_offset()
    with ir.InsertionPoint(op), op.location:
        for i, pos in enumerate(positions):
            if pos is None:
                continue
            src = op.operands[i]
            t = ir.MemRefType(src.type)
            strides, _ = t.get_strides_and_offset()
            dims = ["?" if j == pos else str(n) for j, n in enumerate(t.shape)]
            layout = ", ".join("?" if s == dyn_stride else str(s) for s in strides)
            result = ir.Type.parse(f"memref<{'x'.join(dims)}x{t.element_type}, strided<[{layout}], offset: ?>>")
            rank = t.rank
            sub = ir.Operation.create(
                "memref.subview", results=[result], operands=[src, r0, size],
                attributes={"static_offsets": ir.DenseI64ArrayAttr.get([dyn if j == pos else 0 for j in range(rank)]),
                            "static_sizes": ir.DenseI64ArrayAttr.get([dyn if j == pos else n
                                                                      for j, n in enumerate(t.shape)]),
                            "static_strides": ir.DenseI64ArrayAttr.get([1] * rank),
                            "operandSegmentSizes": ir.DenseI32ArrayAttr.get([1, 1, 1, 0])}).result
            op.operands[i] = sub


def _defining_name(value) -> str | None:
    op = getattr(value.owner, "operation", None)  # a block argument's owner is its block
    return op.name if isinstance(op, ir.Operation) else None
