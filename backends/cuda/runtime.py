"""A small CUDA driver runtime for qcc kernel bundles.

Needs numpy and ``cuda-bindings`` (``from cuda.bindings import driver``) only: no
MLIR, and torch is optional (torch CUDA tensors are accepted as arguments, and
kernels then launch on torch's current stream).

    rt = Runtime()                                 # primary context of device 0
    mod = load_bundle(".cuda_build/w4", rt)        # manifest.json + cubin (or PTX)
    w = {k: rt.upload(v) for k, v in packed.items()}   # upload weights once
    mod.launch("gemv_w4a16_...", x=x_dev, y=y_dev, M=1, **w)
    fn = mod.bind("gemv_w4a16_...", x=..., y=..., M=1, **w)  # pre-marshalled: fn()

Arguments are given by parameter name (or positionally, in manifest order): a
:class:`DeviceBuffer`, a torch CUDA tensor (``data_ptr()``), any object with
``__cuda_array_interface__``, a raw device pointer (int), or a numpy array (copied
to the device; for output parameters the result is copied back after the launch).
Sizes and 16-byte alignment are checked against the manifest before the launch.
Driver errors raise :class:`CudaError` naming the call and the kernel.
"""
from __future__ import annotations

import ctypes
import json
import os
from typing import Any

import numpy as np


def _driver():
    try:
        from cuda.bindings import driver  # cuda-bindings >= 12.6
    except ImportError:  # pragma: no cover - older cuda-python
        from cuda import cuda as driver
    return driver


def available() -> tuple[bool, str]:
    """(True, device name) when cuda-bindings imports and a device exists, else (False, why)."""
    try:
        drv = _driver()
    except Exception as e:  # ImportError, or a broken install
        return False, f"cuda-bindings not importable: {e}"
    try:
        err, = drv.cuInit(0)
        if err != drv.CUresult.CUDA_SUCCESS:
            return False, f"cuInit failed: {_err_name(drv, err)}"
        err, n = drv.cuDeviceGetCount()
        if err != drv.CUresult.CUDA_SUCCESS or n == 0:
            return False, "no CUDA device"
        err, dev = drv.cuDeviceGet(0)
        err, name = drv.cuDeviceGetName(128, dev)
        return True, name.split(b"\0")[0].decode()
    except Exception as e:
        return False, f"CUDA driver unusable: {e}"


def _err_name(drv, err) -> str:
    try:
        e2, s = drv.cuGetErrorName(err)
        e3, d = drv.cuGetErrorString(err)
        return f"{s.decode()}: {d.decode()}"
    except Exception:
        return str(err)


class CudaError(RuntimeError):
    def __init__(self, call: str, err, drv=None, kernel: str | None = None):
        self.call, self.code, self.kernel = call, err, kernel
        name = _err_name(drv or _driver(), err)
        where = f" (kernel {kernel})" if kernel else ""
        super().__init__(f"{call} failed{where}: {name}")


def _check(res, call: str, kernel: str | None = None):
    drv = _driver()
    err = res[0] if isinstance(res, tuple) else res
    if err != drv.CUresult.CUDA_SUCCESS:
        raise CudaError(call, err, drv, kernel)
    if isinstance(res, tuple):
        rest = res[1:]
        return None if not rest else (rest[0] if len(rest) == 1 else rest)
    return None


class DeviceBuffer:
    """Device memory owned by the runtime (freed with :meth:`free` or at exit)."""

    def __init__(self, rt: "Runtime", ptr: int, nbytes: int, shape=None, dtype=None):
        self.rt, self.ptr, self.nbytes = rt, int(ptr), int(nbytes)
        self.shape, self.dtype = shape, (np.dtype(dtype) if dtype is not None else None)

    def __int__(self):
        return self.ptr

    def to_numpy(self, out: np.ndarray | None = None) -> np.ndarray:
        if out is None:
            out = np.empty(self.shape if self.shape is not None else self.nbytes,
                           self.dtype if self.dtype is not None else np.uint8)
        n = min(out.nbytes, self.nbytes)
        self.rt.synchronize()
        _check(self.rt.drv.cuMemcpyDtoH(out.ctypes.data, self.ptr, n), "cuMemcpyDtoH")
        return out

    def copy_from(self, arr: np.ndarray):
        a = np.ascontiguousarray(arr)
        if a.nbytes > self.nbytes:
            raise ValueError(f"{a.nbytes} bytes do not fit a {self.nbytes}-byte buffer")
        _check(self.rt.drv.cuMemcpyHtoD(self.ptr, a.ctypes.data, a.nbytes), "cuMemcpyHtoD")

    def fill_bytes(self, value: int):
        _check(self.rt.drv.cuMemsetD8(self.ptr, value & 0xFF, self.nbytes), "cuMemsetD8")

    def free(self):
        if self.ptr:
            _check(self.rt.drv.cuMemFree(self.ptr), "cuMemFree")
            self.ptr = 0

    @property
    def __cuda_array_interface__(self):
        shape = self.shape if self.shape is not None else (self.nbytes,)
        dt = self.dtype if self.dtype is not None else np.dtype(np.uint8)
        return {"shape": tuple(shape), "typestr": dt.str, "data": (self.ptr, False),
                "version": 3}


class Runtime:
    """The primary context of one device (shared with torch when torch uses the GPU)."""

    def __init__(self, device: int = 0):
        drv = self.drv = _driver()
        _check(drv.cuInit(0), "cuInit")
        self.dev = _check(drv.cuDeviceGet(device), "cuDeviceGet")
        self.ctx = _check(drv.cuDevicePrimaryCtxRetain(self.dev), "cuDevicePrimaryCtxRetain")
        _check(drv.cuCtxSetCurrent(self.ctx), "cuCtxSetCurrent")
        A = drv.CUdevice_attribute
        self.cc = (self._attr(A.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR),
                   self._attr(A.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR))
        self.sm_count = self._attr(A.CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
        name = _check(drv.cuDeviceGetName(128, self.dev), "cuDeviceGetName")
        self.name = name.split(b"\0")[0].decode()

    def _attr(self, a) -> int:
        return int(_check(self.drv.cuDeviceGetAttribute(a, self.dev), "cuDeviceGetAttribute"))

    @property
    def arch(self) -> str:
        return f"sm_{self.cc[0]}{self.cc[1]}"

    def alloc(self, nbytes: int, shape=None, dtype=None) -> DeviceBuffer:
        ptr = _check(self.drv.cuMemAlloc(max(int(nbytes), 1)), "cuMemAlloc")
        return DeviceBuffer(self, int(ptr), nbytes, shape, dtype)

    def upload(self, arr: np.ndarray) -> DeviceBuffer:
        a = np.ascontiguousarray(arr)
        b = self.alloc(a.nbytes, a.shape, a.dtype)
        b.copy_from(a)
        return b

    def synchronize(self):
        _check(self.drv.cuCtxSynchronize(), "cuCtxSynchronize")


# --------------------------------------------------------------------------- modules


def _arg_pointer(obj) -> tuple[int, int | None, bool]:
    """(device pointer, nbytes or None, is_torch)."""
    if isinstance(obj, DeviceBuffer):
        return obj.ptr, obj.nbytes, False
    if hasattr(obj, "data_ptr") and hasattr(obj, "is_cuda"):  # torch.Tensor
        if not obj.is_cuda:
            raise ValueError("torch tensor argument is not on a CUDA device")
        if not obj.is_contiguous():
            raise ValueError("torch tensor argument must be contiguous")
        return int(obj.data_ptr()), int(obj.numel() * obj.element_size()), True
    cai = getattr(obj, "__cuda_array_interface__", None)
    if cai is not None:
        shape = cai["shape"]
        n = int(np.prod(shape)) * np.dtype(cai["typestr"]).itemsize
        return int(cai["data"][0]), n, False
    if isinstance(obj, (int, np.integer)):
        return int(obj), None, False
    raise TypeError(f"cannot pass {type(obj).__name__} as a device buffer")


_SCALARS = {"i32": ctypes.c_int32, "i64": ctypes.c_int64}


class BoundLaunch:
    """A kernel launch with its parameter block built once; call it to launch."""

    def __init__(self, module: "Module", name: str, holders, ptrs, grid, block, smem, stream,
                 copy_back, args=None):
        self.module, self.name = module, name
        self._args = args  # keep the argument objects (e.g. torch tensors) alive
        self._holders, self._ptrs = holders, ptrs
        self.grid, self.block, self.smem, self.stream = grid, block, smem, stream
        self._copy_back = copy_back

    def __call__(self, sync: bool = False, stream: Any = None):
        """Launch; ``stream`` (a CUstream or int handle) overrides the bound one."""
        drv = self.module.rt.drv
        g, b = self.grid, self.block
        st = self.stream if stream is None else (
            stream if isinstance(stream, drv.CUstream) else drv.CUstream(int(stream)))
        _check(drv.cuLaunchKernel(self.module.functions[self.name], g[0], g[1], g[2], b[0], b[1],
                                  b[2], self.smem, st, ctypes.addressof(self._ptrs), 0),
               "cuLaunchKernel", self.name)
        if sync or self._copy_back:
            _check(drv.cuStreamSynchronize(st), "cuStreamSynchronize", self.name)
        for buf, arr in self._copy_back:
            buf.to_numpy(arr)


class Module:
    """Kernels of one PTX/cubin image plus their manifest entries."""

    def __init__(self, rt: Runtime, image: bytes | str, kernels: dict):
        self.rt = rt
        if isinstance(image, str):
            image = image.encode()
        if not image.startswith(b"\x7fELF") and not image.endswith(b"\0"):
            image = image + b"\0"  # PTX text must be NUL-terminated
        self._image = image
        self.handle = _check(rt.drv.cuModuleLoadData(image), "cuModuleLoadData")
        self.kernels = kernels
        self.functions = {}
        for name in kernels:
            self.functions[name] = _check(
                rt.drv.cuModuleGetFunction(self.handle, name.encode()), "cuModuleGetFunction", name)
            dyn = int(kernels[name].get("dynamic_smem", 0))
            if dyn:  # past the default 48 KB a block gets dynamic shared memory only when opted in
                _check(rt.drv.cuFuncSetAttribute(
                    self.functions[name],
                    rt.drv.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, dyn),
                    "cuFuncSetAttribute", name)

    def function_attributes(self, name: str) -> dict:
        A = self.rt.drv.CUfunction_attribute
        out = {}
        for key, a in (("registers", A.CU_FUNC_ATTRIBUTE_NUM_REGS),
                       ("local_bytes", A.CU_FUNC_ATTRIBUTE_LOCAL_SIZE_BYTES),
                       ("shared_bytes", A.CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES),
                       ("max_threads", A.CU_FUNC_ATTRIBUTE_MAX_THREADS_PER_BLOCK)):
            out[key] = int(_check(self.rt.drv.cuFuncGetAttribute(a, self.functions[name]),
                                  "cuFuncGetAttribute", name))
        return out

    def occupancy(self, name: str) -> int:
        """Resident blocks per SM for the manifest block size."""
        k = self.kernels[name]
        bs = int(np.prod(k["block"]))
        return int(_check(self.rt.drv.cuOccupancyMaxActiveBlocksPerMultiprocessor(
            self.functions[name], bs, int(k.get("dynamic_smem", 0))),
            "cuOccupancyMaxActiveBlocksPerMultiprocessor", name))

    def bind(self, name: str, *args, stream: Any = None, grid=None, block=None, **kwargs) -> BoundLaunch:
        if name not in self.kernels:
            raise KeyError(f"no kernel {name!r} in this module; have {sorted(self.kernels)}")
        k = self.kernels[name]
        params = k["params"]
        if len(args) > len(params):
            raise TypeError(f"{name}: {len(params)} parameters, {len(args)} given")
        vals = dict(zip((p["name"] for p in params), args))
        for key, v in kwargs.items():
            if key in vals:
                raise TypeError(f"{name}: parameter {key!r} given twice")
            vals[key] = v
        missing = [p["name"] for p in params if p["name"] not in vals]
        extra = [key for key in vals if key not in {p["name"] for p in params}]
        if missing or extra:
            raise TypeError(f"{name}: missing parameters {missing}, unknown {extra}")
        scalars = {p["name"]: int(vals[p["name"]]) for p in params if p["kind"] == "scalar"}
        holders, keep, copy_back = [], [], []
        any_torch = False
        for p in params:
            v = vals[p["name"]]
            if p["kind"] == "scalar":
                lo, hi = p.get("min"), p.get("max")
                x = int(v)
                if (lo is not None and x < lo) or (hi is not None and x > hi):
                    raise ValueError(f"{name}: {p['name']}={x} outside [{lo}, {hi}]")
                holders.append(_SCALARS[p["type"]](x))
                continue
            if isinstance(v, np.ndarray):
                buf = self.rt.upload(v)
                keep.append(buf)
                if p.get("role", "in") != "in":
                    copy_back.append((buf, v))
                ptr, nbytes, is_t = buf.ptr, buf.nbytes, False
            else:
                ptr, nbytes, is_t = _arg_pointer(v)
            any_torch |= is_t
            need = p["bytes"]
            if p.get("rows_param"):
                need = p["row_bytes"] * scalars[p["rows_param"]]
            if nbytes is not None and nbytes < need:
                raise ValueError(f"{name}: buffer {p['name']} has {nbytes} bytes, needs {need}")
            if ptr % max(int(p.get("align", 1)), 1):
                raise ValueError(f"{name}: buffer {p['name']} at 0x{ptr:x} is not "
                                 f"{p['align']}-byte aligned")
            holders.append(ctypes.c_void_p(ptr))
        ptrs = (ctypes.c_void_p * len(holders))(*[ctypes.addressof(h) for h in holders])
        holders = holders + keep
        if stream is None and any_torch:
            import torch  # torch tensors were given, so torch is present
            stream = torch.cuda.current_stream().cuda_stream
        st = self.rt.drv.CUstream(int(stream or 0))
        return BoundLaunch(self, name, holders, ptrs, tuple(grid or k["grid"]),
                           tuple(block or k["block"]), int(k.get("dynamic_smem", 0)), st, copy_back,
                           args=vals)

    def launch(self, name: str, *args, stream: Any = None, sync: bool = False, **kwargs):
        self.bind(name, *args, stream=stream, **kwargs)(sync=sync)


def load_bundle(path: str, rt: Runtime | None = None, *, arch: str | None = None,
                prefer: str = "cubin") -> Module:
    """Load ``manifest.json`` and the image for this device (cubin, else PTX)."""
    rt = rt or Runtime()
    with open(os.path.join(path, "manifest.json")) as f:
        man = json.load(f)
    images = man["images"]
    want = arch or rt.arch
    cands = [a for a in (want, want + "a", want.rstrip("a")) if a in images]
    if not cands:  # PTX of a lower arch is JIT-compiled by the driver
        cands = [a for a in images if "ptx" in images[a]]
    if not cands:
        raise FileNotFoundError(f"bundle {path} has no image for {want}: {sorted(images)}")
    img = images[cands[0]]
    order = ("cubin", "ptx") if prefer == "cubin" else ("ptx", "cubin")
    for kind in order:
        if kind in img and (kind == "ptx" or cands[0].rstrip("a") == want.rstrip("a")):
            with open(os.path.join(path, img[kind]), "rb") as f:
                data = f.read()
            mod = Module(rt, data, man["kernels"])
            mod.image_kind, mod.image_arch = kind, cands[0]
            return mod
    raise FileNotFoundError(f"bundle {path}: no loadable image in {img}")
