"""`qcc demo`: compile the bundled Llama-style block, run it, compare with PyTorch.

Prints agreement (against float PyTorch, and against PyTorch running the
dequantized weights, which must match to float rounding), the weight size
reduction, and the median latency of both.
"""

import os
import tempfile
import time
from importlib import resources

import numpy as np


def _median_ms(fn, repeats: int = 20) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1e3 * float(np.median(times))


def _rel_err(a, b) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def main(quant: str = "w4a16-g128") -> int:
    import torch

    import qcc
    from qcc.reference import dequantized_weights, load_into_torch

    path = str(resources.files("qcc.examples").joinpath("llama_block.pt2"))
    ep = torch.export.load(path)
    x = torch.randn(*ep.example_inputs[0][0].shape, generator=torch.Generator().manual_seed(1))
    print(f"qcc demo: {os.path.basename(path)}, input {list(x.shape)}, recipe {quant}")
    t = time.perf_counter()
    compiled = qcc.compile(path, target="cpu", quant=quant)
    print(f"  compiled in {time.perf_counter() - t:.1f} s")
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "model.qcc")
        compiled.save(out)
        loaded = qcc.load(out)
        size = os.path.getsize(out)
    y = loaded(x).numpy()

    float_model = ep.module()
    with torch.no_grad():
        y_float = float_model(x).numpy()
        deq_model = ep.module()
        load_into_torch(deq_model, dequantized_weights(loaded))
        y_deq = deq_model(x).numpy()

    layers = loaded.manifest["layers"]
    q_bytes = sum(layer["bytes"] for layer in layers)
    f_bytes = sum(layer["float_bytes"] for layer in layers)
    print(f"  agreement: max rel error vs PyTorch float        {_rel_err(y, y_float):.2e}")
    print(f"             max rel error vs PyTorch dequantized  {_rel_err(y, y_deq):.2e}  (qcc's semantics; should be < 1e-4)")
    if layers:
        print(f"  size: {len(layers)} linear weights {f_bytes / 1e6:.2f} MB fp32 -> {q_bytes / 1e6:.2f} MB "
              f"({f_bytes / q_bytes:.1f}x smaller); artifact {size / 1e6:.2f} MB")
    xn = x.numpy()
    t_qcc = _median_ms(lambda: loaded.run(xn))
    with torch.no_grad():
        t_torch = _median_ms(lambda: float_model(x))
    print(f"  speed: qcc {t_qcc:.2f} ms, PyTorch eager fp32 {t_torch:.2f} ms (median of 20; "
          f"qcc/PyTorch time ratio {t_qcc / t_torch:.2f})")
    ok = _rel_err(y, y_deq) <= 1e-4
    print("  PASS" if ok else "  FAIL: qcc disagrees with its own reference")
    return 0 if ok else 1
