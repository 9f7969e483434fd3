"""gpu.module (MLIR) -> NVVM -> LLVM IR -> PTX (llvmlite) -> cubin (ptxas).

The MLIR wheel's LLVM has no NVPTX target, so the path is:

1. ``convert-gpu-to-nvvm`` (bare-pointer kernel ABI: one pointer per memref) with
   scf/vector/arith/math/memref lowered to the LLVM dialect inside the gpu.module;
2. the kernels are moved into a plain module carrying
   ``llvm.target_triple = "nvptx64-nvidia-cuda"`` and translated to LLVM IR
   (``translate_module_to_llvmir``);
3. llvmlite (LLVM with the NVPTX back end) runs the O3 pipeline for the target
   machine (this is what turns kernel pointers into ``ld.global.nc``) and emits PTX;
4. ``ptxas`` assembles PTX for one architecture and reports registers and spills.

Only steps 1-2 need ``torch_mlir``; it is imported lazily.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shlex
import shutil
import subprocess
import tempfile
from typing import Iterable, Sequence

from .emit import GRID_WAIT_MARK, TRIGGER_MARK

NVPTX_TRIPLE = "nvptx64-nvidia-cuda"
NVPTX_DATALAYOUT = "e-p6:32:32-i64:64-i128:128-i256:256-v16:16-v32:32-n16:32:64"
DEFAULT_ARCH = "sm_90"
# Lowest PTX ISA version that each target needs (LLVM feature name).
# (7.5 for sm_80/86: the L1::no_allocate load qualifier needs PTX ISA 7.4.)
_PTX_FEATURE = {"sm_80": "+ptx75", "sm_86": "+ptx75", "sm_89": "+ptx78", "sm_90": "+ptx78",
                "sm_90a": "+ptx80"}

def lowering_pipeline(index_bitwidth: int = 64) -> str:
    # lower-affine: canonicalize may fold index arithmetic into affine.apply
    return ("builtin.module(gpu.module(canonicalize, cse, lower-affine, convert-scf-to-cf, convert-vector-to-llvm,"
            f"convert-gpu-to-nvvm{{use-bare-ptr-memref-call-conv=1 index-bitwidth={index_bitwidth}}},"
            " canonicalize, cse), reconcile-unrealized-casts)")


LOWERING_PIPELINE = lowering_pipeline()


class PtxError(RuntimeError):
    """Lowering or PTX emission failed."""


class PtxasError(RuntimeError):
    """ptxas rejected the PTX; ``log`` holds its output, ``repro`` a command line."""

    def __init__(self, msg: str, log: str = "", repro: str = ""):
        super().__init__(f"{msg}\n--- ptxas log ---\n{log}\n--- repro ---\n{repro}")
        self.log, self.repro = log, repro


@dataclasses.dataclass
class Resources:
    """ptxas -v figures for one kernel."""

    registers: int = 0
    spill_stores: int = 0  # bytes
    spill_loads: int = 0  # bytes
    stack: int = 0  # bytes of stack frame
    shared: int = 0  # bytes of static shared memory
    cmem0: int = 0


@dataclasses.dataclass
class Cubin:
    arch: str
    data: bytes
    resources: dict  # kernel name -> Resources
    log: str


# --------------------------------------------------------------------------- MLIR -> LLVM IR


def lower_to_llvm_ir(module_text: str, index_bitwidth: int = 64) -> str:
    """MLIR text with one or more gpu.modules -> LLVM IR text for nvptx64."""
    from torch_mlir import ir, passmanager
    from torch_mlir.dialects import llvm as llvm_d

    with ir.Context(), ir.Location.unknown():
        try:
            m = ir.Module.parse(module_text)
        except Exception as e:  # MLIRError carries the diagnostics
            raise PtxError(f"kernel IR does not parse/verify: {e}") from e
        _expand_integer_abs(m)
        pipeline = lowering_pipeline(index_bitwidth)
        pm = passmanager.PassManager.parse(pipeline)
        try:
            pm.run(m.operation)
        except Exception as e:
            raise PtxError(f"lowering to NVVM failed ({pipeline}): {e}") from e
        out = ir.Module.create()
        out.operation.attributes["llvm.target_triple"] = ir.StringAttr.get(NVPTX_TRIPLE)
        out.operation.attributes["llvm.data_layout"] = ir.StringAttr.get(NVPTX_DATALAYOUT)
        n = 0
        for top in list(m.body.operations):
            if top.operation.name != "gpu.module":
                continue
            for op in list(top.regions[0].blocks[0].operations):
                if op.operation.name.startswith("gpu.module_end"):
                    continue
                out.body.append(op)
                n += 1
        if not n:
            raise PtxError("no gpu.module with kernels in the input")
        left = [op.name for op in _walk_ops(out.operation)
                if not op.name.startswith(("llvm.", "nvvm.", "builtin.module"))]
        if left:  # translating them would fail (and can take the process down)
            raise PtxError(f"ops left after lowering to NVVM: {sorted(set(left))}")
        return _extern_dynamic_smem(_old_float_literals(llvm_d.translate_module_to_llvmir(out.operation)))


_DYN_SMEM = re.compile(r"^(@\S+ = )internal (addrspace\(3\) global \[0 x i8\]) undef", re.M)


def _extern_dynamic_smem(text: str) -> str:
    """gpu.dynamic_shared_memory lowers to an internal zero-length addrspace(3) global, which
    llvmlite's NVPTX emits as a 1-byte static .shared variable; as an external one it becomes
    PTX's ``.extern .shared .b8 name[]``, the block's dynamic shared memory."""
    return _DYN_SMEM.sub(r"\1external \2", text)


def _expand_integer_abs(module) -> None:
    """math.absi -> arith.maxsi(x, 0 - x): convert-gpu-to-nvvm lowers float math (libdevice)
    but not integer abs (T5's relative position buckets take one)."""
    from torch_mlir import ir

    for op in [o for o in _walk_ops(module.operation) if o.name == "math.absi"]:
        x = op.operands[0]
        with ir.InsertionPoint(op), op.location:
            if isinstance(x.type, ir.IntegerType):
                value = ir.IntegerAttr.get(x.type, 0)
            else:  # a vector of integers
                value = ir.DenseElementsAttr.get_splat(x.type, ir.IntegerAttr.get(ir.VectorType(x.type).element_type, 0))
            zero = ir.Operation.create("arith.constant", results=[x.type], attributes={"value": value}).result
            neg = ir.Operation.create("arith.subi", results=[x.type], operands=[zero, x]).result
            absolute = ir.Operation.create("arith.maxsi", results=[x.type], operands=[x, neg]).result
        op.result.replace_all_uses_with(absolute)
        op.erase()


def _walk_ops(op):
    for region in op.regions:
        for block in region.blocks:
            for child in block.operations:
                yield child.operation
                yield from _walk_ops(child.operation)


_FBITS = re.compile(r"\bf0x([0-9A-Fa-f]+)\b")


_DECIMAL = re.compile(r"(?<![\w.%@$\"])[-+]?\d+\.\d+(?:e[-+]?\d+)?(?![\w.])")
_FP_TYPE = re.compile(r"\b(half|bfloat|float|double)\b")


def _float_decimals_as_hex(line: str) -> str:
    """A float constant printed as the shortest decimal that rounds to it (``fmul float %x,
    4.471500e-02``) is rejected by llvmlite's older parser, which wants a decimal exactly equal
    to the float: each decimal literal whose type (the nearest type word before it on its
    line, as LLVM's syntax puts it) is float becomes the hex of the equal double."""
    import struct

    if '"' in line or line.lstrip().startswith("!"):
        return line

    def sub(m):
        types = _FP_TYPE.findall(line, 0, m.start())
        if not types or types[-1] != "float":
            return m.group(0)
        v = struct.unpack("<f", struct.pack("<f", float(m.group(0))))[0]
        if v == float(m.group(0)):  # the decimal is the float exactly: the old parser takes it
            return m.group(0)
        return "0x%016X" % struct.unpack("<Q", struct.pack("<d", v))[0]
    return _DECIMAL.sub(sub, line)


def _old_float_literals(text: str) -> str:
    """MLIR's LLVM (newer than llvmlite's) prints some float constants as raw bits,
    ``f0x3727C5AC``; llvmlite's parser wants the older forms: a float as the hex of the
    equal double, a half as ``0xH....``."""
    import struct

    def sub(m):
        h = m.group(1)
        if len(h) == 8:
            v = struct.unpack("<f", struct.pack("<I", int(h, 16)))[0]
            return "0x%016X" % struct.unpack("<Q", struct.pack("<d", v))[0]
        if len(h) == 16:
            return "0x" + h.upper()
        if len(h) == 4:
            return "0xH" + h.upper()
        return m.group(0)
    text = _FBITS.sub(sub, text)
    text = "\n".join(_float_decimals_as_hex(line) for line in text.split("\n"))
    # +-inf / nan spelled as words (newer printers): the hex of the double
    for word, bits in (("-inf", "0xFFF0000000000000"), ("+inf", "0x7FF0000000000000"),
                       ("inf", "0x7FF0000000000000"), ("nan", "0x7FF8000000000000")):
        text = re.sub(r"(?<=[\s,(\[<])" + re.escape(word) + r"(?=[\s,)\]>])", bits, text)
    return text


# --------------------------------------------------------------------------- LLVM IR -> PTX

_llvm_ready = False


def _llvm():
    global _llvm_ready
    import llvmlite.binding as lb

    if not _llvm_ready:
        try:
            lb.initialize()
        except Exception:  # newer llvmlite initialises itself and rejects the call
            pass
        lb.initialize_all_targets()
        lb.initialize_all_asmprinters()
        _llvm_ready = True
    return lb


def libdevice_path() -> str | None:
    """NVIDIA's libdevice bitcode (math functions, __nv_*): $QCC_LIBDEVICE, the CUDA toolkit
    of ptxas or $CUDA_HOME, or the nvidia-cuda-nvcc wheel."""
    import glob

    cands = [os.environ.get("QCC_LIBDEVICE")]
    roots = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    if ptxas_path():
        roots.append(os.path.dirname(os.path.dirname(os.path.realpath(ptxas_path()))))
    roots += ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for r in roots:
        if r:
            cands += sorted(glob.glob(os.path.join(r, "nvvm", "libdevice", "libdevice*.bc")))
    try:
        import nvidia.cuda_nvcc as _n  # pip wheel
        cands += glob.glob(os.path.join(os.path.dirname(_n.__file__), "nvvm", "libdevice", "*.bc"))
    except Exception:
        pass
    for c in cands:
        if c and os.path.isfile(c):
            return c
    return None


def _link_libdevice(lb, mod):
    """Links the __nv_* math functions the module calls; they become internal, so the
    optimizer inlines them and drops the rest of libdevice."""
    path = libdevice_path()
    if path is None:
        raise PtxError("the kernels call libdevice math functions (__nv_*) but no libdevice.10.bc "
                       "was found; set QCC_LIBDEVICE or CUDA_HOME")
    with open(path, "rb") as f:
        lib = lb.parse_bitcode(f.read())
    lib.triple = NVPTX_TRIPLE
    lib.data_layout = mod.data_layout
    mod.link_in(lib)
    for fn in mod.functions:
        if fn.name.startswith("__nv_") and not fn.is_declaration:
            fn.linkage = lb.Linkage.internal


def llvm_ir_to_ptx(llvm_ir: str, arch: str = DEFAULT_ARCH, opt: int = 3) -> str:
    lb = _llvm()
    if arch not in _PTX_FEATURE:
        raise PtxError(f"unsupported arch {arch!r}; known: {sorted(_PTX_FEATURE)}")
    mod = lb.parse_assembly(llvm_ir)
    mod.triple = NVPTX_TRIPLE
    if "@__nv_" in llvm_ir:
        _link_libdevice(lb, mod)
    mod.verify()
    tm = lb.Target.from_triple(NVPTX_TRIPLE).create_target_machine(
        cpu=arch, features=_PTX_FEATURE[arch], opt=opt)
    pb = lb.create_pass_builder(tm, lb.create_pipeline_tuning_options(opt))
    pb.getModulePassManager().run(mod, pb)
    return tm.emit_assembly(mod)


def compile_ptx(module_text: str, arch: str = DEFAULT_ARCH, opt: int = 3) -> str:
    """MLIR gpu.module text -> PTX text for ``arch`` (sm_80, sm_90, sm_90a, ...)."""
    return llvm_ir_to_ptx(lower_to_llvm_ir(module_text), arch, opt)


# Targets whose kernels take part in programmatic dependent launch (griddepcontrol, sm_90+).
GRID_DEPENDENCY_ARCHS = ("sm_90", "sm_90a")
_DECL = re.compile(r"\s*(\.reg|\.shared|\.local|//|$)")
_ENTRY = re.compile(r"(?:\.visible )?\.entry (\w+)\(")


def with_grid_dependency(ptx: str, early: Iterable[str] = ()) -> str:
    """Every kernel of `ptx` waits for the grid it depends on (``griddepcontrol.wait``: its
    predecessor complete, its writes visible) where its body marks it
    (Emitter.grid_dependency_wait, after the weight GEMVs' L2 prefetches), else first; the
    kernels named in `early` then let the next kernel launch at once
    (``griddepcontrol.launch_dependents``), those that mark the place (Emitter.launch_dependents)
    there, the others at their exit.

    Launched with programmatic stream serialization (model_runtime), the next kernel is set up
    while this one runs instead of after it, and after an early trigger its blocks are placed
    and wait beside this kernel's. No memory access precedes the wait (an L2 prefetch returns
    nothing), so each kernel sees all of its predecessor's writes, and as the trigger follows
    the wait, at most one grid waits at a time. Without the launch attribute both instructions
    do nothing. Which kernels trigger early (lowering.early_trigger_kernels) and why:
    docs/ARCHITECTURE.md."""
    early = set(early)
    mark, trigger = f"// {GRID_WAIT_MARK}", f"// {TRIGGER_MARK}"
    lines = ptx.split("\n")
    starts = [i for i, ln in enumerate(lines) if _ENTRY.match(ln)]
    out = lines[:starts[0]] if starts else lines
    for s, e in zip(starts, starts[1:] + [len(lines)]):
        kernel = lines[s:e]
        wait = ["\tgriddepcontrol.wait;"]
        if any(ln.strip() == trigger for ln in kernel):  # the body says where (Emitter.launch_dependents)
            kernel = ["\tgriddepcontrol.launch_dependents;" if ln.strip() == trigger else ln for ln in kernel]
        elif _ENTRY.match(kernel[0]).group(1) in early:
            wait.append("\tgriddepcontrol.launch_dependents;")
        if any(ln.strip() == mark for ln in kernel):  # at the body's marks
            out += [w for ln in kernel for w in (wait if ln.strip() == mark else [ln])]
            continue
        j = next(k for k, ln in enumerate(kernel) if ln.strip() == "{") + 1  # after the declarations
        while j < len(kernel) and _DECL.match(kernel[j]):
            j += 1
        out += kernel[:j] + wait + kernel[j:]
    return "\n".join(out)


# --------------------------------------------------------------------------- PTX -> cubin

_RES_RE = {
    "registers": re.compile(r"Used (\d+) registers"),
    "stack": re.compile(r"(\d+) bytes stack frame"),
    "spill_stores": re.compile(r"(\d+) bytes spill stores"),
    "spill_loads": re.compile(r"(\d+) bytes spill loads"),
    "shared": re.compile(r"(\d+) bytes smem"),
    "cmem0": re.compile(r"(\d+) bytes cmem\[0\]"),
}


def parse_ptxas_log(log: str) -> dict:
    """ptxas -v output -> {kernel: Resources}."""
    out: dict[str, Resources] = {}
    cur = None
    for line in log.splitlines():
        m = re.search(r"Compiling entry function '([^']+)'", line) or \
            re.search(r"Function properties for (\S+)", line)
        if m:
            cur = out.setdefault(m.group(1), Resources())
            continue
        if cur is None:
            continue
        for k, rx in _RES_RE.items():
            mm = rx.search(line)
            if mm:
                setattr(cur, k, int(mm.group(1)))
    return out


def ptxas_path() -> str | None:
    return shutil.which("ptxas")


def assemble(ptx: str, arch: str = DEFAULT_ARCH, *, opt: int = 3,
             extra_args: Sequence[str] = (), keep_dir: str | None = None) -> Cubin:
    """Assemble PTX with ``ptxas -v``; raise :class:`PtxasError` with the log on failure."""
    exe = ptxas_path()
    if exe is None:
        raise PtxasError("ptxas not found on PATH")
    d = keep_dir or tempfile.mkdtemp(prefix="qcc_ptxas_")
    os.makedirs(d, exist_ok=True)
    src = os.path.join(d, f"kernels_{arch}.ptx")
    dst = os.path.join(d, f"kernels_{arch}.cubin")
    with open(src, "w") as f:
        f.write(ptx)
    cmd = [exe, f"-arch={arch}", f"-O{opt}", "-v", *extra_args, src, "-o", dst]
    p = subprocess.run(cmd, capture_output=True, text=True)
    log = (p.stdout or "") + (p.stderr or "")
    repro = " ".join(shlex.quote(c) for c in cmd)
    if p.returncode != 0:
        raise PtxasError(f"ptxas failed for {arch} (exit {p.returncode})", log, repro)
    with open(dst, "rb") as f:
        data = f.read()
    if keep_dir is None:
        shutil.rmtree(d, ignore_errors=True)
    return Cubin(arch, data, parse_ptxas_log(log), log)


# --------------------------------------------------------------------------- bundles


def build_bundle(specs: Iterable, out_dir: str, archs: Sequence[str] = ("sm_90a",),
                 *, cubin: bool = True, module_name: str = "qcc_kernels") -> dict:
    """Emit, lower, compile and assemble kernels into ``out_dir``.

    Writes ``kernels.mlir``, ``kernels.ll``, ``kernels_<arch>.ptx``,
    ``kernels_<arch>.cubin`` (when ptxas is present) and ``manifest.json``; returns the
    manifest dict: {"kernels": {name: spec.manifest() + {"resources": {arch: ...}}},
    "images": {arch: {"ptx": file, "cubin": file}}}.
    """
    from .emit import gpu_module

    specs = list(specs)
    os.makedirs(out_dir, exist_ok=True)
    text = gpu_module(specs, module_name)
    with open(os.path.join(out_dir, "kernels.mlir"), "w") as f:
        f.write(text)
    ll = lower_to_llvm_ir(text)
    with open(os.path.join(out_dir, "kernels.ll"), "w") as f:
        f.write(ll)
    manifest = {"format": "qcc-cuda-bundle/1", "kernels": {}, "images": {}}
    for s in specs:
        manifest["kernels"][s.name] = s.manifest() | {"resources": {}}
    for arch in archs:
        ptx = llvm_ir_to_ptx(ll, arch)
        pname = f"kernels_{arch}.ptx"
        with open(os.path.join(out_dir, pname), "w") as f:
            f.write(ptx)
        img = {"ptx": pname}
        if cubin and ptxas_path():
            cb = assemble(ptx, arch)
            cname = f"kernels_{arch}.cubin"
            with open(os.path.join(out_dir, cname), "wb") as f:
                f.write(cb.data)
            img["cubin"] = cname
            for k, r in cb.resources.items():
                if k in manifest["kernels"]:
                    manifest["kernels"][k]["resources"][arch] = dataclasses.asdict(r)
        manifest["images"][arch] = img
    with open(os.path.join(out_dir, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
    return manifest
