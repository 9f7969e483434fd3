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
