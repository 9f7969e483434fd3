"""PyTorch oracles for CUDA artifacts (tests here, and the device script on the GPU).

The semantics of a CUDA artifact: the float model, with each quantized weight replaced
by its dequantized value (as the kernels decode it), and for every layer that runs on a
tensor-core GEMV ("a16": manifest["cuda"]["layers"]) the matmul input rounded to f16 and
the matmul result rounded to f16 (accumulation in fp32) -- unless the layer was compiled
with split_x (the default: x as f16 hi + lo rows, fp32 output), which is fp32-accurate. ``a16_reference`` builds that
model from a float one; run it in float64 (or float32 on the GPU) as the oracle.

Needs torch and numpy only.
"""
from __future__ import annotations

import copy


def linear_modules(model) -> dict:
    import torch

    return {f"{n}.weight": m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def a16_reference(model, manifest: dict, dequantized: dict | None = None):
    """A copy of `model` with `dequantized` weights ({weight name: float [N, K] array}) loaded
    and the f16 rounding of the GEMV layers of `manifest` applied through forward hooks."""
    import torch

    ref = copy.deepcopy(model)
    state = dict(ref.named_parameters())
    with torch.no_grad():
        for name, value in (dequantized or {}).items():
            state[name].copy_(torch.as_tensor(value).to(state[name].dtype))
    gemv = manifest.get("cuda", {}).get("layers", {})
    for wname, mod in linear_modules(ref).items():
        if wname not in gemv or gemv[wname].get("split_x"):  # split x: fp32-accurate, no rounding
            continue

        def hook(m, args, out):
            x = args[0]
            y = (x.half().to(x.dtype) @ m.weight.t()).half().to(x.dtype)
            return y + m.bias if m.bias is not None else y
        mod.register_forward_hook(hook)
    return ref
