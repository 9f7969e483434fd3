"""`qcc bench --quick`: the benchmark harness runs end to end and reports every field."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def bench(*args) -> list[dict]:
    proc = subprocess.run([sys.executable, "-m", "qcc.tools.bench", *args, "--quick", "--json"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def test_bench_linear_quick():
    recs = bench("linear")
    assert recs[0]["case"] == "read-bandwidth" and recs[0]["gbps"] > 0
    cases = [r for r in recs[1:] if "qcc_ms" in r]
    assert [(r["recipe"], r["M"]) for r in cases] == [("w4a16-g128", 1), ("w4a16-g128", 16)]
    for r in cases:
        assert r["kernel"] == "gemv"  # M = 1 and 16: the GEMV's row tiles
        assert r["qcc_ms"] > 0 and 0 < r["bw_fraction"] and r["floor_ms"] > 0
        assert set(r["baselines_ms"]) == {"torch fp32", "torch bf16", "aten int4pack"}
        assert set(r["speedup"]) == set(r["baselines_ms"])
    assert "thread_scaling" in cases[-1] or not cases[-1].get("qcc_1thread_ms")


@pytest.mark.parametrize("suite", ["model"])
def test_bench_model_quick(suite):
    recs = bench(suite)
    cases = {r["case"]: r for r in recs if "qcc_ms" in r}
    assert set(cases) == {"decode", "prefill"}
    assert cases["decode"]["tokens"] == 1 and cases["prefill"]["tokens"] == 16
    for r in cases.values():
        assert r["tokens_per_s"] > 0 and r["compile_s"] > 0 and "torch eager fp32" in r["baselines_ms"]


def test_bench_model_decode_any_length():
    """--any-length: the decode step compiled for every cache length (dynamic_shapes), timed
    beside its baselines; prefill as before."""
    recs = [r for r in bench("model", "--any-length", "--no-torch-compile") if "qcc_ms" in r]
    cases = {r["case"]: r for r in recs}
    assert cases["decode"]["any_length"] and not cases["prefill"]["any_length"]
    assert cases["decode"]["qcc_ms"] > 0 and cases["decode"]["kv_cache"] == 64
