"""Run a CUDA artifact (``qcc compile --target=cuda``) on a GPU: numpy + cuda-bindings only.

    from qcc.backends.cuda.model_runtime import CudaModel, load_artifact
    m = CudaModel(*load_artifact("model.qcc"))   # uploads weights once, builds every launch
    y, = m(x)                                    # numpy in -> numpy out
    y, = m(x_cuda)                               # torch CUDA tensors in -> torch CUDA tensors out

The artifact's manifest["cuda"]["plan"] is a static launch plan (host_plan.py): buffers
(parameters by name, user inputs, temporaries at offsets in one arena) and an ordered list
of kernel launches with their arguments (buffer + byte offset, or an i32). At load time
this runtime allocates the arena and the input buffers, uploads the parameters, loads
the cubin (or the PTX, which the driver compiles for other GPUs), validates every
argument against the kernel's parameter sizes, and marshals each launch's parameter
block once. A call copies the inputs in, replays the launches -- as one CUDA graph
(captured at the first call) unless ``graph=False`` -- and copies the outputs out. With
torch CUDA tensors everything is stream-ordered on torch's current stream (no host
synchronisation). Driver errors name the kernel; ``debug=True`` synchronises after each
launch so that a faulting kernel is named too.

The plan's buffers are reused by every call: one CudaModel runs one call at a time.
"""
from __future__ import annotations

import ctypes
import io
import json
import struct
import zipfile

import numpy as np

try:  # inside the qcc package
    from . import runtime as _rt
except ImportError:  # pragma: no cover - loaded by path next to runtime.py
    import runtime as _rt

_ST_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32,
              "I16": np.int16, "I8": np.int8, "U64": np.uint64, "U32": np.uint32, "U16": np.uint16,
              "U8": np.uint8, "BOOL": np.bool_}


def read_safetensors(data: bytes) -> dict:
    """safetensors bytes -> {name: array} (numpy only)."""
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    base = 8 + n
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        lo, hi = info["data_offsets"]
        dt = np.dtype(_ST_DTYPES[info["dtype"]])
        out[name] = np.frombuffer(data[base + lo:base + hi], dt).reshape(info["shape"]).copy()
    return out


def load_artifact(path: str):
    """(manifest, weights, code) of a .qcc file, without qcc, MLIR or torch; members are
    checked against the manifest's sha256."""
    with open(path, "rb") as f:
        return _read_zip(f.read(), path)


def _read_zip(data: bytes, where: str):
    import hashlib

    with zipfile.ZipFile(io.BytesIO(data)) as z:
        manifest = json.loads(z.read("manifest.json"))
        blobs = {}
        for name, digest in manifest.get("files", {}).items():
            b = z.read(name)
            if hashlib.sha256(b).hexdigest() != digest:
                raise ValueError(f"{where}: hash mismatch for {name}: the artifact is corrupted")
            blobs[name] = b
    weights = read_safetensors(blobs.pop("weights.safetensors"))
    code = {n[len("code/"):]: b for n, b in blobs.items() if n.startswith("code/")}
    return manifest, weights, code


def _is_torch(x) -> bool:
    return type(x).__module__.startswith("torch")


class PlanError(ValueError):
    """The plan does not fit its kernels (a compiler bug, reported before any launch)."""


class ArchError(ValueError):
    """The artifact's code cannot run on this GPU."""


def _check_arch(artifact: str, device: str) -> None:
    """ArchError unless code compiled for `artifact` runs on a `device` GPU: sm_XYa (arch-
    specific instructions such as wgmma) only on sm_XY itself, sm_XY on sm_XY and newer (the
    driver JIT-compiles the PTX)."""
    cc = lambda a: int(a[3:].rstrip("a"))  # noqa: E731
    if artifact.endswith("a") and cc(artifact) != cc(device):
        raise ArchError(f"the artifact was compiled for {artifact}, whose instructions (wgmma) run only on "
                        f"{artifact[:-1]} GPUs, and this GPU is {device}: recompile with --gpu-arch "
                        f"{artifact[:-1]} (portable to newer GPUs) or for this GPU")
    if cc(device) < cc(artifact):
        fix = (f"recompile with --gpu-arch {'sm_90' if cc(device) >= 90 else 'sm_80'}" if cc(device) >= 80 else
               "qcc's CUDA kernels need sm_80 (Ampere) or newer")
        raise ArchError(f"the artifact was compiled for {artifact} and this GPU is {device}, an older "
                        f"architecture: {fix}")


PROGRAMMATIC_DRIVER = 12030  # CUDA 12.3: programmatic launches inside captured CUDA graphs


class CudaModel:
    def __init__(self, manifest: dict, weights: dict, code: dict, *, rt=None, device: int = 0,
                 graph: bool = True, debug: bool = False, prefer: str = "cubin", programmatic: bool = True):
        if manifest.get("target") != "cuda" or "cuda" not in manifest:
            raise ValueError("not a CUDA artifact (compile with --target=cuda)")
        self.manifest = manifest
        cuda = manifest["cuda"]
        self.plan = cuda["plan"]
        self.kernels = cuda["kernels"]
        self.rt = rt or _rt.Runtime(device)
        self.drv = self.rt.drv
        self.debug, self.use_graph = debug, graph and not debug
        # -- code: the cubin when built for this GPU, else the PTX (JIT by the driver)
        arch = cuda["arch"]
        img = cuda["images"][arch]
        _check_arch(arch, str(self.rt.arch))
        same = arch.rstrip("a") == str(self.rt.arch).rstrip("a")
        kind = "cubin" if (prefer == "cubin" and "cubin" in img and same) else "ptx"
        self.module = _rt.Module(self.rt, code[img[kind]], self.kernels)
        self.image = f"{kind} for {arch} on {self.rt.arch}"
        # kernels that wait for their predecessor themselves (ptx.with_grid_dependency) launch
        # with programmatic stream serialization: each is set up while its predecessor runs
        # and starts as soon as that completes, without a launch gap
        self._programmatic_ok = (cuda.get("launch") == "programmatic" and hasattr(self.drv, "cuLaunchKernelEx")
                                 and self._check(self.drv.cuDriverGetVersion(), "cuDriverGetVersion")
                                 >= PROGRAMMATIC_DRIVER)
        self.programmatic = programmatic and self._programmatic_ok
        # -- memory
        self._owned = []
        self.base, self.size = {}, {}
        arena = self.rt.alloc(max(self.plan["arena_bytes"], 1))
        self._owned.append(arena)
        self.weight_bytes = 0
        for r in self.plan["buffers"]:
            rid = r["id"]
            if r["kind"] == "param":
                w = weights.get(r["name"])
                if w is None:
                    raise PlanError(f"the artifact has no weight '{r['name']}'")
                w = np.ascontiguousarray(w)
                if w.nbytes != r["bytes"]:
                    raise PlanError(f"weight '{r['name']}' has {w.nbytes} bytes, the plan expects {r['bytes']}")
                b = self.rt.upload(w)
                self._owned.append(b)
                self.base[rid], self.size[rid] = b.ptr, b.nbytes
                self.weight_bytes += w.nbytes
            elif r["kind"] == "input":
                b = self.rt.alloc(r["bytes"])
                self._owned.append(b)
                self.base[rid], self.size[rid] = b.ptr, r["bytes"]
            else:
                self.base[rid], self.size[rid] = arena.ptr + r["offset"], r["bytes"]
        self.inputs = sorted(self.plan["inputs"], key=lambda i: i["index"])
        self.outputs = sorted(self.plan["outputs"], key=lambda o: o["index"])
        self._launches = [self._marshal(i, L) for i, L in enumerate(self.plan["launches"])]
        self._stream = self._check(self.drv.cuStreamCreate(0), "cuStreamCreate")
        self._graph = self._exec = None

    # ------------------------------------------------------------------ setup
    def _check(self, res, call, kernel=None):
        return _rt._check(res, call, kernel)

    def _marshal(self, i, L):
        name = L["kernel"]
        k = self.kernels.get(name)
        if k is None:
            raise PlanError(f"launch {i}: no kernel {name} in the artifact")
        params = k["params"]
        if len(params) != len(L["args"]):
            raise PlanError(f"launch {i} ({name}): {len(L['args'])} arguments for {len(params)} parameters")
        scalars = {p["name"]: a["scalar"] for p, a in zip(params, L["args"]) if "scalar" in a}
        holders = []
        for p, a in zip(params, L["args"]):
            if p["kind"] == "scalar":
                if "scalar" not in a:
                    raise PlanError(f"launch {i} ({name}): parameter {p['name']} needs a scalar")
                holders.append(_rt._SCALARS[p["type"]](int(a["scalar"])))
                continue
            rid, off = a["buf"], a["offset"]
            need = p["bytes"] if not p.get("rows_param") else p["row_bytes"] * scalars[p["rows_param"]]
            if off + need > self.size[rid]:
                raise PlanError(f"launch {i} ({name}): {p['name']} needs {need} bytes at offset {off} of "
                                f"buffer {rid} ({self.size[rid]} bytes)")
            ptr = self.base[rid] + off
            if ptr % max(int(p.get("align", 1)), 1):
                raise PlanError(f"launch {i} ({name}): {p['name']} at 0x{ptr:x} is not {p['align']}-byte aligned")
            holders.append(ctypes.c_void_p(ptr))
        ptrs = (ctypes.c_void_p * len(holders))(*[ctypes.addressof(h) for h in holders])
        fn = self.module.functions[name]
        return (name, fn, tuple(L["grid"]), tuple(L["block"]), int(k.get("dynamic_smem", 0)), holders, ptrs)

    # ------------------------------------------------------------------ execution
    def _launch(self, launch, stream, programmatic: bool):
        drv = self.drv
        name, fn, g, b, smem, _, ptrs = launch
        if not programmatic:
            return self._check(drv.cuLaunchKernel(fn, g[0], g[1], g[2], b[0], b[1], b[2], smem, stream,
                                                  ctypes.addressof(ptrs), 0), "cuLaunchKernel", name)
        cfg = drv.CUlaunchConfig()
        cfg.gridDimX, cfg.gridDimY, cfg.gridDimZ = g
        cfg.blockDimX, cfg.blockDimY, cfg.blockDimZ = b
        cfg.sharedMemBytes, cfg.hStream = smem, stream
        attr = drv.CUlaunchAttribute()
        attr.id = drv.CUlaunchAttributeID.CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION
        attr.value.programmaticStreamSerializationAllowed = 1
        cfg.attrs, cfg.numAttrs = [attr], 1
        self._check(drv.cuLaunchKernelEx(cfg, fn, ctypes.addressof(ptrs), 0), "cuLaunchKernelEx", name)

    def _launch_all(self, stream):
        for i, launch in enumerate(self._launches):
            # the first kernel follows the input copies: an ordinary stream dependency
            self._launch(launch, stream, self.programmatic and i > 0 and not self.debug)
            if self.debug:
                self._check(self.drv.cuStreamSynchronize(stream), "cuStreamSynchronize (debug)", launch[0])

    def _capture(self):
        drv = self.drv
        mode = drv.CUstreamCaptureMode.CU_STREAM_CAPTURE_MODE_THREAD_LOCAL
        self._check(drv.cuStreamBeginCapture(self._stream, mode), "cuStreamBeginCapture")
        try:
            self._launch_all(self._stream)
        finally:
            graph = self._check(drv.cuStreamEndCapture(self._stream), "cuStreamEndCapture")
        try:
            ex = self._check(drv.cuGraphInstantiateWithFlags(graph, 0), "cuGraphInstantiateWithFlags")
        except (AttributeError, TypeError):
            ex = self._check(drv.cuGraphInstantiate(graph, 0), "cuGraphInstantiate")
        self._graph, self._exec = graph, ex

    def replay(self, stream=None):
        """Enqueues every launch of the plan on `stream` (default: the model's own stream);
        inputs are whatever the input buffers hold. As one graph launch when graphs are on."""
        st = self._stream if stream is None else self._as_stream(stream)
        if self.use_graph:
            if self._exec is None:
                try:
                    self._capture()
                except Exception as e:  # fall back to launches, say so once
                    self.use_graph = False
                    self.graph_error = f"{type(e).__name__}: {e}"
                    return self._launch_all(st)
            self._check(self.drv.cuGraphLaunch(self._exec, st), "cuGraphLaunch (model plan)")
        else:
            self._launch_all(st)

    def _as_stream(self, stream):
        return stream if isinstance(stream, self.drv.CUstream) else self.drv.CUstream(int(stream))

    def synchronize(self, stream=None):
        st = self._stream if stream is None else self._as_stream(stream)
        self._check(self.drv.cuStreamSynchronize(st), "cuStreamSynchronize (model plan)")

    def _check_inputs(self, xs):
        if len(xs) != len(self.inputs):
            raise ValueError(f"model takes {len(self.inputs)} input(s), got {len(xs)}")
        for x, spec in zip(xs, self.inputs):
            shape = tuple(x.shape)
            if shape != tuple(spec["shape"]):
                raise ValueError(f"input {spec['index']}: expected shape {spec['shape']}, got {list(shape)}")
            dt = str(x.dtype).replace("torch.", "")
            if dt != spec["dtype"]:
                raise ValueError(f"input {spec['index']}: expected dtype {spec['dtype']}, got {dt}")

    def run(self, *inputs: np.ndarray) -> list[np.ndarray]:
        """numpy in, numpy out (synchronous)."""
        self._check_inputs(inputs)
        drv = self.drv
        self.synchronize()  # the previous call may still read the input buffers
        for x, spec in zip(inputs, self.inputs):
            a = np.ascontiguousarray(x)
            self._check(drv.cuMemcpyHtoD(self.base[spec["buf"]], a.ctypes.data, a.nbytes), "cuMemcpyHtoD (input)")
        self.replay()
        outs = []
        for o in self.outputs:
            arr = np.empty(o["shape"], np.dtype(o["dtype"]))
            self._check(drv.cuMemcpyDtoHAsync(arr.ctypes.data, self.base[o["buf"]] + o["offset"], arr.nbytes,
                                              self._stream), "cuMemcpyDtoHAsync (output)")
            outs.append(arr)
        self.synchronize()
        return outs

    def run_torch(self, *inputs):
        """torch CUDA tensors in and out, ordered on torch's current stream (no host sync)."""
        import torch

        self._check_inputs(inputs)
        drv = self.drv
        st = drv.CUstream(int(torch.cuda.current_stream().cuda_stream))
        for x, spec in zip(inputs, self.inputs):
            if not x.is_cuda:
                raise ValueError(f"input {spec['index']} is not a CUDA tensor")
            x = x.contiguous()
            self._check(drv.cuMemcpyDtoDAsync(self.base[spec["buf"]], x.data_ptr(), x.numel() * x.element_size(),
                                              st), "cuMemcpyDtoDAsync (input)")
        self.replay(st)
        outs = []
        for o in self.outputs:
            t = torch.empty(o["shape"], dtype=getattr(torch, o["dtype"]), device="cuda")
            self._check(drv.cuMemcpyDtoDAsync(t.data_ptr(), self.base[o["buf"]] + o["offset"],
                                              t.numel() * t.element_size(), st), "cuMemcpyDtoDAsync (output)")
            outs.append(t)
        return outs

    def __call__(self, *inputs):
        outs = self.run_torch(*inputs) if inputs and _is_torch(inputs[0]) else self.run(*inputs)
        return outs[0] if len(outs) == 1 else tuple(outs)

    def call(self, args, outs, fixed=frozenset()):
        """qcc.model.CompiledModel's runner protocol: entry-order arguments (parameters are
        already on the GPU and skipped; `fixed`, their indices, is not needed), output arrays
        filled in place."""
        user = [a for a, e in zip(args, self.manifest["entry"]["args"]) if "input" in e]
        for o, r in zip(outs, self.run(*user)):
            o[...] = r

    def time_replays(self, n: int = 100, warmup: int = 10) -> float:
        """Mean seconds per replay of the whole plan: driver events around `n` back-to-back
        replays on the model's stream (inputs as they are)."""
        drv = self.drv
        for _ in range(warmup):
            self.replay()
        e0 = self._check(drv.cuEventCreate(0), "cuEventCreate")
        e1 = self._check(drv.cuEventCreate(0), "cuEventCreate")
        self._check(drv.cuEventRecord(e0, self._stream), "cuEventRecord")
        for _ in range(n):
            self.replay()
        self._check(drv.cuEventRecord(e1, self._stream), "cuEventRecord")
        self._check(drv.cuEventSynchronize(e1), "cuEventSynchronize (model plan)")
        ms = self._check(drv.cuEventElapsedTime(e0, e1), "cuEventElapsedTime")
        return float(ms) / 1e3 / n

    def profile(self, reps: int = 5, graph: bool = True) -> list[dict]:
        """Per-launch GPU time (driver events between the launches, median of `reps` passes),
        summed per kernel, largest first: where a call's time goes. graph=True captures the
        launches and the event records into one CUDA graph, as replay runs them (eager
        launches from Python are paced by the host: small kernels then show the launch
        overhead, not their own time); falls back to eager launches when capture fails."""
        import statistics

        drv, st = self.drv, self._stream
        n = len(self._launches)
        ev = [self._check(drv.cuEventCreate(0), "cuEventCreate") for _ in range(n + 1)]

        def enqueue():
            self._check(drv.cuEventRecord(ev[0], st), "cuEventRecord")
            for i, launch in enumerate(self._launches):  # serial launches: each one's own time
                self._launch(launch, st, False)
                self._check(drv.cuEventRecord(ev[i + 1], st), "cuEventRecord")
        run = enqueue
        if graph:
            try:
                mode = drv.CUstreamCaptureMode.CU_STREAM_CAPTURE_MODE_THREAD_LOCAL
                self._check(drv.cuStreamBeginCapture(st, mode), "cuStreamBeginCapture")
                try:
                    enqueue()
                finally:
                    g_ = self._check(drv.cuStreamEndCapture(st), "cuStreamEndCapture")
                ex = self._check(drv.cuGraphInstantiateWithFlags(g_, 0), "cuGraphInstantiateWithFlags")
                run = lambda: self._check(drv.cuGraphLaunch(ex, st), "cuGraphLaunch (profile)")  # noqa: E731
                run()  # warm-up
            except Exception:
                run = enqueue
        times = [[] for _ in range(n)]
        for _ in range(reps):
            run()
            self._check(drv.cuEventSynchronize(ev[n]), "cuEventSynchronize (profile)")
            for i in range(n):
                times[i].append(float(self._check(drv.cuEventElapsedTime(ev[i], ev[i + 1]),
                                                  "cuEventElapsedTime")) * 1e3)
        per = {}
        for (name, *_), t in zip(self._launches, times):
            d = per.setdefault(name, {"kernel": name, "launches": 0, "us": 0.0})
            d["launches"] += 1
            d["us"] += statistics.median(t)
        return sorted(per.values(), key=lambda d: -d["us"])

    def set_programmatic(self, on: bool) -> bool:
        """Launch with programmatic stream serialization (where the artifact and the driver
        allow it) or serially; the next call captures the plan again. Returns the setting in
        effect (an A/B of the launch modes: tools/cuda_device_run.py)."""
        self.programmatic = on and self._programmatic_ok
        self._drop_graph()
        return self.programmatic

    def _drop_graph(self):
        if self._exec is not None:
            self._check(self.drv.cuGraphExecDestroy(self._exec), "cuGraphExecDestroy")
            self._check(self.drv.cuGraphDestroy(self._graph), "cuGraphDestroy")
        self._graph = self._exec = None

    def close(self):
        self._drop_graph()
        for b in self._owned:
            try:
                b.free()
            except Exception:
                pass
        self._owned = []


def from_bytes(data: bytes, **kw) -> CudaModel:
    """A CudaModel from the bytes of a .qcc file."""
    return CudaModel(*_read_zip(data, "artifact"), **kw)
