"""The CPU artifact at run time: dynamic batch through one library, and loading
with neither torch_mlir nor torch importable (ctypes + numpy only)."""

import copy
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import models
from oracles import rel_err
import qcc
from qcc.reference import dequantized_weights, load_into_torch


@pytest.fixture(scope="module")
def dynamic_mlp():
    model = models.MLP(in_features=192, hidden=320, out_features=24, seed=4).eval()
    compiled = qcc.compile(model, model.example_inputs(batch=5), quant="w4a16-g64",
                           dynamic_shapes={"x": {0: torch.export.Dim("tokens", min=1, max=4096)}})
    reference = copy.deepcopy(model)
    load_into_torch(reference, dequantized_weights(compiled))
    return compiled, reference.double()


def test_dynamic_batch_one_artifact(dynamic_mlp):
    compiled, reference = dynamic_mlp
    (spec,), (out,) = compiled.inputs, compiled.outputs
    assert isinstance(spec["shape"][0], str) and spec["shape"][1] == 192
    assert out["shape"] == [spec["shape"][0], 24]
    kernels = compiled.manifest["cpu"]["kernels"]
    assert len(kernels) == 3 and all(k["gemm_from_m"] >= 2 for k in kernels.values())
    threshold = next(iter(kernels.values()))["gemm_from_m"]
    for m in sorted({1, 2, threshold - 1, threshold, threshold + 1, 37, 300}):
        x = torch.randn(m, 192, generator=torch.Generator().manual_seed(m))
        y = compiled(x)
        assert y.shape == (m, 24)
        assert rel_err(y, reference(x.double()).detach()) <= 1e-5, f"M={m}"


def test_parameter_descriptors_follow_the_weights():
    """CpuLibrary keeps the parameters' memref descriptors between calls: an in-place change
    of a weight and a weight array replaced in `compiled.weights` are both seen by the next
    call (each result against the float64 oracle)."""
    model = models.MLP(in_features=64, hidden=96, out_features=16, seed=6).eval().double()
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    compiled = qcc.compile(model.float(), (x.float(),))
    model.double()

    def check():
        with torch.no_grad():
            assert rel_err(compiled(x.float()), model(x).detach()) <= 1e-5
    check()
    compiled.weights["fc2.weight"] *= 2  # in place: the same array
    with torch.no_grad():
        model.fc2.weight.mul_(2)
    check()
    compiled.weights["fc2.bias"] = np.full(96, 0.5, np.float32)  # a new array
    with torch.no_grad():
        model.fc2.bias.fill_(0.5)
    check()


def test_artifact_for_a_cpu_with_more_features_is_refused(tmp_path, monkeypatch):
    """The library is compiled for this host's CPU with all its features; on a CPU that lacks
    one of them, loading names the missing extensions instead of dying of SIGILL."""
    from qcc.backends.cpu import host
    from qcc.errors import QccError

    model = models.MLP(in_features=64, hidden=96, out_features=16, seed=6).eval()
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(1))
    path = str(tmp_path / "m.qcc")
    qcc.compile(model, (x,), quant="w8a16").save(path)
    recorded = set(qcc.load(path).manifest["cpu"]["flags"])
    assert {"sse2", "avx2"} <= recorded or not host.cpu_flags()
    assert torch.equal(qcc.load(path)(x), qcc.load(path)(x))  # this host: runs
    lesser = frozenset(f for f in host.cpu_flags() if not f.startswith("avx"))
    monkeypatch.setattr(host, "cpu_flags", lambda: lesser)
    with pytest.raises(QccError, match="instruction-set extensions this CPU lacks: avx") as e:
        qcc.load(path)(x)
    assert e.value.hint and "compile" in e.value.hint


def test_missing_openmp_runtime_is_a_clear_error(tmp_path, monkeypatch):
    """A threaded artifact on a machine without LLVM's OpenMP runtime: a QccError saying what
    to install (the CLI's one line and exit 2), not an internal error."""
    from qcc.backends.cpu import host
    from qcc.errors import QccError

    if host.openmp_runtime() is None:
        pytest.skip("no OpenMP runtime: artifacts are single-threaded here")
    model = models.MLP(in_features=64, hidden=96, out_features=16, seed=6).eval()
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(1))
    path = str(tmp_path / "m.qcc")
    qcc.compile(model, (x,), quant="w8a16").save(path)
    monkeypatch.setattr(host, "load_openmp", lambda soname: None)
    with pytest.raises(QccError, match="OpenMP runtime") as e:
        qcc.load(path)(x)
    assert "cmeel-libomp" in e.value.hint


def test_dynamic_dims_must_agree():
    class Add(torch.nn.Module):
        def forward(self, a, b):
            return a + b

    dim = torch.export.Dim("n", min=2, max=64)
    compiled = qcc.compile(Add(), (torch.ones(3, 4), torch.ones(3, 4)), dynamic_shapes=({0: dim}, {0: dim}))
    np.testing.assert_array_equal(compiled(torch.ones(7, 4), torch.ones(7, 4)).numpy(), np.full((7, 4), 2.0))
    with pytest.raises(qcc.QccError, match="dimension .* is 7 in an earlier input, 5 here"):
        compiled(torch.ones(7, 4), torch.ones(5, 4))


def test_artifact_runs_without_torch_mlir_or_torch(tmp_path, dynamic_mlp):
    compiled, _ = dynamic_mlp
    path = tmp_path / "mlp.qcc"
    compiled.save(str(path))
    x = np.random.default_rng(0).standard_normal((9, 192)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    expect = compiled.run(x)[0]
    script = textwrap.dedent(f"""
        import sys
        sys.modules["torch_mlir"] = None   # any import of them now raises ImportError
        sys.modules["torch"] = None
        import json
        import numpy as np
        import qcc
        m = qcc.load({str(path)!r})
        y = m.run(np.load({str(tmp_path / "x.npy")!r}))[0]
        np.save({str(tmp_path / "y.npy")!r}, y)
        print(json.dumps({{"blocked": [n for n in ("torch_mlir", "torch") if sys.modules.get(n) is None],
                           "loaded": sorted(n for n in sys.modules if n.startswith(("torch", "torch_mlir")))}}))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["blocked"] == ["torch_mlir", "torch"] and report["loaded"] == ["torch", "torch_mlir"]
    np.testing.assert_array_equal(np.load(tmp_path / "y.npy"), expect)


def test_without_openmp_runtime_kernels_run_single_threaded(monkeypatch):
    from qcc.backends.cpu import host

    monkeypatch.setenv("QCC_OPENMP", "off")
    host.openmp_runtime.cache_clear()
    try:
        model = torch.nn.Linear(256, 64, bias=False).eval()
        x = torch.randn(3, 256)
        compiled = qcc.compile(model, (x,), quant="w8a16")
    finally:
        host.openmp_runtime.cache_clear()
    assert compiled.manifest["cpu"]["openmp"] is None and b"__kmpc_fork_call" not in compiled.code["cpu.so"]
    assert compiled.manifest["cpu"]["kernels"]["weight"]["threads"] is False
    reference = copy.deepcopy(model)
    load_into_torch(reference, dequantized_weights(compiled))
    assert rel_err(compiled(x), reference.double()(x.double()).detach()) <= 1e-5
