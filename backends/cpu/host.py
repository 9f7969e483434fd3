"""The compiling host: CPU features (vector width of the kernels) and the OpenMP runtime.

Code is compiled for the host CPU (the JIT machinery targets it), so the
features seen here are those the artifact needs; they are recorded in the
manifest and checked again on load (check_can_run: a clear error instead of an
illegal instruction).

Threads come from `scf.parallel` -> OpenMP, which calls LLVM's runtime
(`__kmpc_*`).  torch's bundled libgomp lacks those entry points; qcc uses
LLVM's libomp from the `cmeel-libomp` wheel (pip), else a system libomp
(Debian `libomp5-14`), else `$QCC_OPENMP_LIB`.  Without any (or with
QCC_OPENMP=off), kernels run on one thread.
"""

import ctypes
import functools
import glob
import os
import site
import subprocess
import sysconfig

from qcc.errors import QccError


@functools.lru_cache(maxsize=None)
def cpu_flags() -> frozenset:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def features() -> dict:
    """What the kernels use: {'isa': 'avx512'|'avx2'|'generic', 'lanes': f32 lanes per vector,
    'int_dot': 'vnni'|'avx2' (the integer kernels' dot products; QCC_CPU_INT_DOT forces one), 'flags'}."""
    flags = cpu_flags()
    if os.environ.get("QCC_CPU_ISA"):  # tests force a width the host may not have natively
        isa = os.environ["QCC_CPU_ISA"]
    elif {"avx512f", "avx512bw"} <= flags:
        isa = "avx512"
    elif {"avx2", "fma"} <= flags:
        isa = "avx2"
    else:
        isa = "generic"
    # the integer kernels' dot products: vpdpbusd on 256-bit vectors needs AVX512-VNNI + VL or AVX-VNNI
    vnni = "avx_vnni" in flags or {"avx512_vnni", "avx512vl"} <= flags
    int_dot = "vnni" if vnni and isa != "generic" else "avx2"
    forced = os.environ.get("QCC_CPU_INT_DOT")  # tests run the avx2 kernels on VNNI hosts
    if forced and forced != int_dot:
        if forced != "avx2":
            raise QccError(f"QCC_CPU_INT_DOT={forced}: this host's integer kernels can use avx2"
                           + (" or vnni" if int_dot == "vnni" else ""), hint="unset QCC_CPU_INT_DOT or set it to avx2")
        int_dot = forced
    return {"isa": isa, "lanes": 16 if isa == "avx512" else 8, "int_dot": int_dot,
            "flags": sorted(f for f in flags if f.startswith(ISA_FLAG_PREFIXES))}


# /proc/cpuinfo flags of the instruction-set extensions LLVM may select on its own: the library
# is compiled for the host CPU with all its features (lowering._object_code). Those reached
# only through intrinsics qcc never calls (AES, SHA, GFNI, RDRAND, AMX, ...) are left out, so
# that a CPU without them is not refused for nothing.
ISA_FLAG_PREFIXES = ("sse", "ssse3", "avx", "fma", "f16c", "bmi", "abm", "lzcnt", "popcnt", "movbe", "adx")


def missing_features(recorded: dict) -> list[str]:
    """Flags an artifact was compiled for that this host lacks ([] when this host's flags are
    unknown: no /proc/cpuinfo)."""
    have = cpu_flags()
    return sorted(set(recorded.get("flags", [])) - have) if have else []


def check_can_run(recorded: dict) -> None:
    """QccError when this CPU lacks an instruction-set extension the artifact's code was
    compiled for (running it would die of an illegal instruction)."""
    missing = missing_features(recorded)
    if missing:
        raise QccError(f"this artifact's CPU code was compiled for instruction-set extensions this CPU lacks: "
                       f"{', '.join(missing)}", where="loading the CPU code",
                       hint="compile the model with qcc on this machine (or one with the same CPU features)")


def _candidates():
    env = os.environ.get("QCC_OPENMP_LIB")
    if env:
        yield env
    roots = [sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]
    try:
        roots += site.getsitepackages() + [site.getusersitepackages()]
    except AttributeError:  # virtualenvs without site.getsitepackages
        pass
    for root in dict.fromkeys(roots):
        yield os.path.join(root, "cmeel.prefix", "lib", "libomp.so")
    for pattern in ("/usr/lib/llvm-*/lib/libomp.so*", "/usr/lib/x86_64-linux-gnu/libomp.so*",
                    "/usr/lib/libomp.so*"):
        yield from sorted(glob.glob(pattern), reverse=True)


def _soname(path: str) -> str | None:
    try:
        out = subprocess.run(["readelf", "-d", path], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return os.path.basename(path)
    for line in out.splitlines():
        if "(SONAME)" in line:
            return line.split("[", 1)[1].rstrip("]")
    return os.path.basename(path)


@functools.lru_cache(maxsize=None)
def openmp_runtime() -> dict | None:
    """{'path', 'soname'} of an LLVM OpenMP runtime exporting __kmpc_fork_call, or None
    (also when QCC_OPENMP=off: single-threaded kernels)."""
    if os.environ.get("QCC_OPENMP", "").lower() in ("0", "off", "false", "no"):
        return None
    for path in _candidates():
        if not os.path.isfile(path):
            continue
        try:
            lib = ctypes.CDLL(path, mode=os.RTLD_LAZY | os.RTLD_LOCAL)
            getattr(lib, "__kmpc_fork_call")
        except (OSError, AttributeError):
            continue
        return {"path": os.path.realpath(path), "soname": _soname(path)}
    return None


def load_openmp(soname: str):
    """Loads the runtime (RTLD_LOCAL: torch's libgomp keeps its own symbols) so that a
    library whose DT_NEEDED names `soname` binds to it; returns the ctypes handle."""
    rt = openmp_runtime()
    if rt is None or rt["soname"] != soname:
        for path in _candidates():
            if os.path.isfile(path) and _soname(path) == soname:
                rt = {"path": path, "soname": soname}
                break
        else:
            return None
    return ctypes.CDLL(rt["path"], mode=os.RTLD_NOW | os.RTLD_LOCAL)
