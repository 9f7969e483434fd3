"""Execute a CUDA launch plan on the CPU: every launch through the numpy SIMT emulator.

Checks the whole backend without a GPU: buffer sizes, view offsets, arena sharing,
argument binding, launch order, and each kernel's thread mapping and arithmetic. The
arena starts poisoned (0xFF bytes: NaN as f16/f32), so a read of something no launch
wrote shows up as NaN in the outputs. Needs the KernelSpecs (``compiled.cuda_specs``,
kept in memory by the compiler) and numpy; slow, meant for test-sized models.
"""
from __future__ import annotations

import numpy as np

from . import simt


def _bytes(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a).reshape(-1).view(np.uint8).copy()


def run_plan(plan: dict, specs: dict, weights: dict, inputs, trace=None) -> list[np.ndarray]:
    """Runs `plan` (manifest["cuda"]["plan"]) on numpy `inputs`; returns the outputs.

    trace(i, launch) is called before each launch (progress, debugging).
    """
    arena = np.full(max(plan["arena_bytes"], 1), 0xFF, np.uint8)
    bufs = {}
    for r in plan["buffers"]:
        if r["kind"] == "param":
            bufs[r["id"]] = _bytes(weights[r["name"]])
        elif r["kind"] == "input":
            a = np.ascontiguousarray(inputs[r["index"]])
            if a.nbytes != r["bytes"]:
                raise ValueError(f"input {r['index']}: {a.nbytes} bytes, the plan expects {r['bytes']}")
            bufs[r["id"]] = _bytes(a)
        else:
            bufs[r["id"]] = arena[r["offset"]:r["offset"] + r["bytes"]]
    for i, L in enumerate(plan["launches"]):
        if trace:
            trace(i, L)
        spec = specs[L["kernel"]]
        args = {}
        for p, a in zip(spec.params, L["args"]):
            args[p.name] = a["scalar"] if "scalar" in a else bufs[a["buf"]][a["offset"]:]
        simt.run(spec, args)
    outs = []
    for o in plan["outputs"]:
        dt = np.dtype(o["dtype"])
        n = int(np.prod(o["shape"])) * dt.itemsize
        outs.append(bufs[o["buf"]][o["offset"]:o["offset"] + n].view(dt).reshape(o["shape"]).copy())
    return outs


def run_compiled(compiled, *inputs) -> list[np.ndarray]:
    """Emulates a freshly compiled CUDA model (it must still hold ``cuda_specs``)."""
    specs = getattr(compiled, "cuda_specs", None)
    if specs is None:
        raise ValueError("no kernel specs: emulate a model compiled in this process")
    arrays = [x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x) for x in inputs]
    return run_plan(compiled.manifest["cuda"]["plan"], specs, compiled.weights, arrays)


# --------------------------------------------------------------------------- a fake driver


class FakeDriver:
    """The subset of ``cuda.bindings.driver`` that runtime.py and model_runtime.py use, on
    host memory, with cuLaunchKernel executed by the SIMT emulator. Lets CI run the real
    GPU runtime code (buffer allocation, argument marshalling through ctypes, graph
    capture and replay) without a GPU. `specs`: kernel name -> KernelSpec."""

    class CUresult:
        CUDA_SUCCESS = 0

    class CUdevice_attribute:
        CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR = "major"
        CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR = "minor"
        CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT = "sms"

    class CUfunction_attribute:
        CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES = "max_dynamic_smem"

    class CUstreamCaptureMode:
        CU_STREAM_CAPTURE_MODE_THREAD_LOCAL = 1
        CU_STREAM_CAPTURE_MODE_GLOBAL = 0

    class CUlaunchAttributeID:
        CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION = "programmatic"

    class CUlaunchAttribute:
        def __init__(self):
            self.id = None
            self.value = type("CUlaunchAttributeValue", (), {})()

    class CUlaunchConfig:
        attrs, numAttrs = (), 0

    class CUstream:
        def __init__(self, h=0):
            self.h = int(h)

        def __int__(self):
            return self.h

    def __init__(self, specs: dict, cc=(9, 0)):
        import ctypes

        self.ctypes = ctypes
        self.specs = specs
        self.cc = cc
        self.mem = {}  # address -> numpy buffer (kept alive)
        self.launches = 0
        self.programmatic_launches = 0  # cuLaunchKernelEx with programmatic stream serialization
        self.driver_version = 13000
        self.dynamic_smem = {}  # kernel -> opted-in bytes (cuFuncSetAttribute)
        self.capturing = None
        self.graphs = []
        self.graphs_destroyed = 0
        self.n_streams = 0

    # -- device, context
    def cuInit(self, flags):
        return (0,)

    def cuDeviceGet(self, i):
        return (0, 0)

    def cuDevicePrimaryCtxRetain(self, dev):
        return (0, "ctx")

    def cuCtxSetCurrent(self, ctx):
        return (0,)

    def cuDeviceGetAttribute(self, a, dev):
        return (0, {"major": self.cc[0], "minor": self.cc[1], "sms": 132}[a])

    def cuDriverGetVersion(self):
        return (0, self.driver_version)

    def cuDeviceGetName(self, n, dev):
        return (0, b"FakeDriver (SIMT emulator)\0")

    def cuGetErrorName(self, err):
        return (0, b"FAKE_ERROR")

    def cuGetErrorString(self, err):
        return (0, b"fake driver error")

    # -- memory
    def cuMemAlloc(self, n):
        buf = np.full(int(n) + 256, 0xFF, np.uint8)  # poisoned, 256-byte aligned start
        addr = buf.ctypes.data
        addr += (-addr) % 256
        self.mem[addr] = buf
        return (0, addr)

    def cuMemFree(self, ptr):
        self.mem.pop(int(ptr), None)
        return (0,)

    def _copy(self, dst, src, n):
        self.ctypes.memmove(int(dst), int(src), int(n))
        return (0,)

    def cuMemcpyHtoD(self, dst, src, n):
        return self._copy(dst, src, n)

    def cuMemcpyDtoH(self, dst, src, n):
        return self._copy(dst, src, n)

    def cuMemcpyHtoDAsync(self, dst, src, n, st):
        return self._copy(dst, src, n)

    def cuMemcpyDtoHAsync(self, dst, src, n, st):
        return self._copy(dst, src, n)

    def cuMemcpyDtoDAsync(self, dst, src, n, st):
        return self._copy(dst, src, n)

    def cuMemsetD8(self, ptr, v, n):
        self.ctypes.memset(int(ptr), v, int(n))
        return (0,)

    # -- modules and launches
    def cuModuleLoadData(self, image):
        return (0, "module")

    def cuModuleGetFunction(self, mod, name):
        name = name.decode() if isinstance(name, bytes) else name
        if name not in self.specs:
            return (1, None)
        return (0, name)

    def cuFuncSetAttribute(self, fn, attr, value):
        """The opt-in to more than 48 KB of dynamic shared memory (at most sm_90's 227 KB)."""
        if attr != "max_dynamic_smem" or not 0 <= value <= 227 * 1024:
            return (1,)
        self.dynamic_smem[fn] = value
        return (0,)

    def cuLaunchKernel(self, fn, gx, gy, gz, bx, by, bz, smem, stream, params, extra):
        if smem > 48 * 1024 and self.dynamic_smem.get(fn, 0) < smem:
            return (1,)  # CUDA_ERROR_INVALID_VALUE: not opted in to that much dynamic shared memory
        if self.capturing is not None:
            self.capturing.append((fn, params))
            return (0,)
        self._run(fn, params)
        return (0,)

    def cuLaunchKernelEx(self, cfg, fn, params, extra):
        """Launches run in order here, so programmatic serialization changes nothing but the count."""
        attrs = list(cfg.attrs)[:cfg.numAttrs]
        if any(a.id != "programmatic" or a.value.programmaticStreamSerializationAllowed != 1 for a in attrs):
            return (1,)
        self.programmatic_launches += bool(attrs)
        return self.cuLaunchKernel(fn, cfg.gridDimX, cfg.gridDimY, cfg.gridDimZ, cfg.blockDimX, cfg.blockDimY,
                                   cfg.blockDimZ, cfg.sharedMemBytes, cfg.hStream, params, extra)

    def _run(self, fn, params):
        c = self.ctypes
        spec = self.specs[fn]
        slots = (c.c_void_p * len(spec.params)).from_address(int(params))
        args, scal = {}, {}
        for p, slot in zip(spec.params, slots):
            if not p.is_buffer:
                ty = c.c_int32 if p.type == "i32" else c.c_int64
                scal[p.name] = args[p.name] = ty.from_address(slot).value
        for p, slot in zip(spec.params, slots):
            if p.is_buffer:
                m = p.manifest()
                n = m["bytes"] if not p.rows else m["row_bytes"] * scal[p.rows[0]]
                ptr = c.c_void_p.from_address(slot).value
                args[p.name] = np.ctypeslib.as_array((c.c_uint8 * n).from_address(ptr))
        simt.run(spec, args)
        self.launches += 1

    # -- streams, graphs, events
    def cuStreamCreate(self, flags):
        self.n_streams += 1
        return (0, self.CUstream(self.n_streams))

    def cuStreamSynchronize(self, st):
        return (0,)

    def cuCtxSynchronize(self):
        return (0,)

    def cuStreamBeginCapture(self, st, mode):
        self.capturing = []
        return (0,)

    def cuStreamEndCapture(self, st):
        g, self.capturing = self.capturing, None
        self.graphs.append(g)
        return (0, len(self.graphs) - 1)

    def cuGraphInstantiateWithFlags(self, g, flags):
        return (0, g)

    def cuGraphExecDestroy(self, ex):
        self.graphs_destroyed += 1
        return (0,)

    def cuGraphDestroy(self, g):
        return (0,)

    def cuGraphLaunch(self, ex, st):
        for fn, params in self.graphs[ex]:
            self._run(fn, params)
        return (0,)

    def cuEventCreate(self, flags):
        return (0, "event")

    def cuEventRecord(self, e, st):
        return (0,)

    def cuEventSynchronize(self, e):
        return (0,)

    def cuEventElapsedTime(self, a, b):
        return (0, 0.0)
