"""The qcc command line: the compile -> run path on a .pt2, and bad input.

Every bad input must give one line on stderr, exit code 2, no traceback.
"""

import copy
import os
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch

import models
from qcc.reference import dequantized_weights, load_into_torch

TEST_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# test/ on the path: a pickled module needs its class (models.MLP) importable
ENV = dict(os.environ, PYTHONWARNINGS="ignore",
           PYTHONPATH=os.pathsep.join(p for p in (TEST_DIR, os.environ.get("PYTHONPATH")) if p))


def qcc_cli(*args):
    return subprocess.run([sys.executable, "-m", "qcc.tools.qcc_main", *map(str, args)],
                          capture_output=True, text=True, env=ENV)


def assert_user_error(proc, *fragments):
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture(scope="module")
def llama_pt2(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    model = models.LlamaBlock(hidden=256, heads=4, ffn=768, seed=4).eval()
    inputs = model.example_inputs(batch=1, seq=12, seed=5)
    path = tmp / "block.pt2"
    torch.export.save(torch.export.export(model, inputs), path)
    np.savez(tmp / "in.npz", x=inputs[0].numpy())
    return tmp, model, inputs, path


def test_compile_and_run_llama_block_w4a16(llama_pt2):
    tmp, model, inputs, path = llama_pt2
    out = tmp / "block.qcc"
    proc = qcc_cli("compile", path, "--target=cpu", "--quant=w4a16-g128", "-o", out, "-q")
    assert proc.returncode == 0, proc.stderr
    proc = qcc_cli("run", out, "--inputs", tmp / "in.npz", "--output", tmp / "out.npz")
    assert proc.returncode == 0, proc.stderr
    got = np.load(tmp / "out.npz")["output0"]

    import qcc

    reference = copy.deepcopy(model)
    load_into_torch(reference, dequantized_weights(qcc.load(str(out))))
    with torch.no_grad():
        expect = reference.double()(inputs[0].double()).numpy()
    assert np.abs(got - expect).max() / np.abs(expect).max() <= 1e-4


def test_cpu_activations_flag(llama_pt2):
    """--cpu-activations bf16 reaches the compiler (the manifest records it) where the host has
    AVX512-BF16, and is a one-line error where it has not; --target cuda rejects it."""
    from qcc.backends.cpu import host

    tmp, _, _, path = llama_pt2
    out = tmp / "bf16.qcc"
    proc = qcc_cli("compile", path, "--quant=w4a16-g128", "--cpu-activations", "bf16", "-o", out, "-q")
    if "avx512_bf16" in host.features()["flags"]:
        assert proc.returncode == 0, proc.stderr
        import qcc

        assert qcc.load(str(out)).manifest["cpu"]["activations"] == "bf16"
    else:
        assert_user_error(proc, "--cpu-activations", "AVX512-BF16")
    assert_user_error(qcc_cli("compile", path, "--target=cuda", "--cpu-activations", "bf16", "-o", tmp / "y.qcc"),
                      "--cpu-activations", "target='cpu' only")


def test_unknown_recipe(llama_pt2):
    tmp, _, _, path = llama_pt2
    assert_user_error(qcc_cli("compile", path, "--quant=w3a16", "-o", tmp / "x.qcc"),
                      "--quant", "unknown quantization recipe 'w3a16'", "w4a16-g128")
    assert not (tmp / "x.qcc").exists()


def test_malformed_pt2(tmp_path):
    bad = tmp_path / "bad.pt2"
    with zipfile.ZipFile(bad, "w") as z:
        z.writestr("bad/serialized_exported_program.json", "{not json")
    assert_user_error(qcc_cli("compile", bad, "-o", tmp_path / "x.qcc"), "bad.pt2", "malformed .pt2")
    (tmp_path / "text.pt2").write_text("hello")
    assert_user_error(qcc_cli("compile", tmp_path / "text.pt2", "-o", tmp_path / "x.qcc"), "not a zip")
    assert_user_error(qcc_cli("compile", tmp_path / "missing.pt2", "-o", tmp_path / "x.qcc"), "no such model file")


def test_pickle_needs_allow_pickle(tmp_path):
    model = models.MLP(seed=0).eval()
    torch.save(model, tmp_path / "model.pt")
    np.savez(tmp_path / "ex.npz", x=model.example_inputs()[0].numpy())
    assert_user_error(qcc_cli("compile", tmp_path / "model.pt", "-o", tmp_path / "m.qcc"),
                      "pickled", "--allow-pickle")
    proc = qcc_cli("compile", tmp_path / "model.pt", "--allow-pickle", "--example-inputs", tmp_path / "ex.npz",
                   "-o", tmp_path / "m.qcc", "-q")
    assert proc.returncode == 0, proc.stderr


def test_unsupported_op_is_named(tmp_path):
    class QR(torch.nn.Module):
        def forward(self, x):
            return torch.linalg.qr(x)[0] * 2

    torch.export.save(torch.export.export(QR(), (torch.randn(4, 4),)), tmp_path / "qr.pt2")
    assert_user_error(qcc_cli("compile", tmp_path / "qr.pt2", "-o", tmp_path / "qr.qcc"),
                      "unsupported op 'torch.aten.linalg_qr'", "test_cli.py:")


def test_run_time_input_errors(llama_pt2, tmp_path):
    tmp, _, inputs, path = llama_pt2
    out = tmp / "f.qcc"
    assert qcc_cli("compile", path, "-o", out, "-q").returncode == 0
    np.savez(tmp_path / "shape.npz", x=np.random.default_rng(0).standard_normal((1, 7, 256), np.float32))
    assert_user_error(qcc_cli("run", out, "--inputs", tmp_path / "shape.npz"),
                      "input 0 'x'", "expected shape [1, 12, 256], got [1, 7, 256]")
    np.savez(tmp_path / "dtype.npz", x=inputs[0].numpy().astype(np.float64))
    assert_user_error(qcc_cli("run", out, "--inputs", tmp_path / "dtype.npz"), "expected dtype float32")
    np.savez(tmp_path / "name.npz", y=inputs[0].numpy())
    assert_user_error(qcc_cli("run", out, "--inputs", tmp_path / "name.npz"), "missing input 'x'")


def test_corrupted_artifact(llama_pt2, tmp_path):
    tmp, _, _, path = llama_pt2
    out = tmp_path / "m.qcc"
    assert qcc_cli("compile", path, "-o", out, "-q").returncode == 0
    with zipfile.ZipFile(out) as z:
        info = z.getinfo("weights.safetensors")
    data = bytearray(out.read_bytes())
    data[info.header_offset + 30 + len(info.filename) + len(info.extra) + 1000] ^= 0xFF  # inside the weights
    (tmp_path / "bad.qcc").write_bytes(bytes(data))
    assert_user_error(qcc_cli("run", tmp_path / "bad.qcc", "--inputs", tmp / "in.npz"), "corrupted")
    (tmp_path / "junk.qcc").write_bytes(b"not an artifact")
    assert_user_error(qcc_cli("run", tmp_path / "junk.qcc", "--inputs", tmp / "in.npz"), "not a qcc artifact")


def test_bench_cuda_without_gpu_is_a_clear_error():
    from qcc.backends.cuda import runtime

    if runtime.available()[0]:
        pytest.skip("a GPU is present: the CUDA benchmark would run")
    assert_user_error(qcc_cli("bench", "linear", "--target", "cuda"), "no usable GPU for --target cuda")


def test_compile_prints_remarks(tmp_path):
    """What a recipe left undone (here: a GPT-2 block's residual stream, its input, is not
    rotated) reaches the user as a remark on stderr."""
    model = models.GPT2Block(hidden=128, heads=4, seed=1).eval()
    inputs = model.example_inputs(batch=1, seq=6, seed=2)
    path = tmp_path / "gpt2.pt2"
    torch.export.save(torch.export.export(model, inputs), path)
    np.savez(tmp_path / "calib.npz", x=torch.cat([model.example_inputs(1, 6, seed=s)[0] for s in range(3)])[:, None])
    proc = qcc_cli("compile", path, "--quant=w8a8-had", "--calib", tmp_path / "calib.npz", "-o", tmp_path / "g.qcc")
    assert proc.returncode == 0, proc.stderr
    assert "wrote" in proc.stdout and "4 quantized layer(s)" in proc.stdout
    assert "qcc: remark: fuse-rotation: residual stream left unrotated: the residual stream is a function argument" \
        in proc.stderr


def test_pt2_with_custom_ops(tmp_path):
    """A .pt2 calling custom ops: transformers' MoE `grouped_mm_fallback` is registered by
    importing its module, so `qcc compile` takes a Hugging Face MoE export as it is; ops of
    a namespace no known package provides are a clear error naming it."""
    pytest.importorskip("transformers", reason="transformers comes with the dev extra")
    script = f"""
import torch, transformers as T
cfg = T.MixtralConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2)
torch.manual_seed(0)
lm = T.AutoModelForCausalLM.from_config(cfg).eval()
class Logits(torch.nn.Module):
    def __init__(self): super().__init__(); self.lm = lm
    def forward(self, ids): return self.lm(input_ids=ids, use_cache=False).logits
torch.export.save(torch.export.export(Logits().eval(), (torch.randint(0, 64, (1, 8)),)), r"{tmp_path / 'moe.pt2'}")
@torch.library.custom_op("qcctest::twice", mutates_args=())
def twice(x: torch.Tensor) -> torch.Tensor:
    return x * 2
@twice.register_fake
def _(x): return torch.empty_like(x)
class Custom(torch.nn.Module):
    def forward(self, x): return torch.ops.qcctest.twice(x) + 1
torch.export.save(torch.export.export(Custom(), (torch.randn(3),)), r"{tmp_path / 'custom.pt2'}")
"""
    subprocess.run([sys.executable, "-c", script], check=True, env=ENV, capture_output=True)
    proc = qcc_cli("compile", tmp_path / "moe.pt2", "--target=cpu", "--quant=w8a16", "-o", tmp_path / "moe.qcc",
                   "-q")
    assert proc.returncode == 0, proc.stderr
    assert_user_error(qcc_cli("compile", tmp_path / "custom.pt2", "--target=cpu", "-o", tmp_path / "c.qcc"),
                      "custom.pt2: error: the program calls custom ops of qcctest")
