"""Runs a qcc CPU library through ctypes: no MLIR, no torch at run time.

The entry point takes one memref descriptor per argument (parameters and user
inputs in signature order) followed by one per output, which it fills.
"""

import ctypes
import os
import re

import numpy as np

from qcc.backends.cpu import host
from qcc.errors import QccError

_DESCRIPTORS: dict[int, type] = {}


def descriptor_type(rank: int) -> type:
    """The C layout of MLIR's ranked memref descriptor of `rank`."""
    if rank not in _DESCRIPTORS:
        fields = [("allocated", ctypes.c_void_p), ("aligned", ctypes.c_void_p), ("offset", ctypes.c_int64)]
        if rank:
            fields += [("sizes", ctypes.c_int64 * rank), ("strides", ctypes.c_int64 * rank)]
        _DESCRIPTORS[rank] = type(f"MemRef{rank}D", (ctypes.Structure,), {"_fields_": fields})
    return _DESCRIPTORS[rank]


def describe(array: np.ndarray):
    """A descriptor viewing `array` (C-contiguous; the caller keeps it alive)."""
    assert array.flags["C_CONTIGUOUS"]
    desc = descriptor_type(array.ndim)()
    ptr = array.ctypes.data
    desc.allocated = desc.aligned = ptr
    desc.offset = 0
    for i, (size, stride) in enumerate(zip(array.shape, array.strides)):
        desc.sizes[i] = size
        desc.strides[i] = stride // array.itemsize
    return desc


def _open(path: str):
    """(library, OpenMP runtime handle or None).  A library with parallel kernels
    names the OpenMP runtime it was linked against (DT_NEEDED); that runtime is
    loaded first (RTLD_LOCAL), from this host's candidates, so the library binds
    to it and not to another process-wide OpenMP (torch's libgomp)."""
    with open(path, "rb") as f:
        image = f.read()
    omp = None
    if b"__kmpc_fork_call" in image:
        m = re.search(rb"\x00(lib[\w+-]*omp[\w.]*\.so[\w.]*)\x00", image)
        soname = m.group(1).decode() if m else "libomp.so"
        # idle workers spin 20 ms (libomp's default: 200) before sleeping: long enough
        # between the kernels of one model call, short enough not to steal a core
        # from the caller's other threaded code (torch's libgomp) afterwards
        os.environ.setdefault("KMP_BLOCKTIME", "20")
        omp = host.load_openmp(soname)
        if omp is None:  # a setup the user can fix, not a qcc bug: a QccError (the CLI's exit 2)
            raise QccError(f"this artifact runs its kernels on OpenMP threads and needs LLVM's OpenMP runtime "
                           f"({soname}), which is not installed", where="loading the CPU code",
                           hint="pip install cmeel-libomp, or set QCC_OPENMP_LIB to a libomp.so")
    return ctypes.CDLL(path), omp


class CpuLibrary:
    def __init__(self, path: str, entry: str = "main"):
        self._lib, self._omp = _open(path)
        self._fn = getattr(self._lib, f"_mlir_ciface_{entry}")
        self._fn.restype = None
        self._fixed: dict[int, tuple] = {}  # arg index -> (array, descriptor ref)

    def call(self, args: list[np.ndarray], outs: list[np.ndarray], fixed: frozenset = frozenset()) -> None:
        """Runs the entry point. `fixed`: indices of `args` that are the same arrays from call
        to call (the parameters): their descriptors are made once and reused while the
        argument is that array object (a decode step passes ~100 weights: 0.06-0.3 ms of
        descriptors a call otherwise; the check does not touch the array, whose memory a
        decode step has long evicted from the caches, and a cached array's buffer cannot be
        resized away while this cache holds a reference to it)."""
        refs = []
        for i, a in enumerate(args):
            if i in fixed:
                c = self._fixed.get(i)
                if c is None or c[0] is not a:
                    c = self._fixed[i] = (a, ctypes.byref(describe(a)))
                refs.append(c[1])
            else:
                refs.append(ctypes.byref(describe(a)))
        refs += [ctypes.byref(describe(o)) for o in outs]
        self._fn(*refs)

    def set_threads(self, n: int) -> bool:
        """Threads of the parallel kernels (OpenMP); False if the library is single-threaded."""
        if self._omp is None:
            return False
        self._omp.omp_set_num_threads(ctypes.c_int(n))
        return True
