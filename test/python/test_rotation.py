"""fuse-rotation and the Walsh-Hadamard reference: orthogonality, the fast transform,
float equivalence of rotated models compiled by qcc, and quantized numerics against
a PyTorch oracle of the rotated model."""

import copy

import numpy as np
import pytest
import torch

import models
from oracles import float64_out, rel_err
import qcc
from qcc import hadamard
from qcc.context import make_context
from qcc.frontend import export_module, import_program
from qcc.pipeline import Session, run_pipeline
from qcc import pipelines
from qcc.reference import dequantized_weights


@pytest.mark.parametrize("n", [1, 2, 8, 12, 20, 28, 48, 64, 96, 160, 224])
def test_hadamard_orthogonal_and_fast(n):
    h = hadamard.hadamard_matrix(n)
    assert set(np.unique(h)) <= {-1.0, 1.0}
    np.testing.assert_array_equal(h @ h.T, n * np.eye(n))
    x = np.random.default_rng(n).standard_normal((3, n))
    np.testing.assert_allclose(hadamard.fast_transform(x), x @ h / np.sqrt(n), atol=1e-12)
    q = hadamard.orthogonal(n, seed=1)
    np.testing.assert_allclose(q @ q.T, np.eye(n), atol=1e-12)


def test_hadamard_1536_is_full():
    """The outlier model's ffn: 1536 = 12 * 2^7, Paley I (q = 11) seed times Sylvester."""
    assert hadamard.factor(1536) == (12, 7) and hadamard.block_size(1536) == 1536
    h = hadamard.hadamard_matrix(1536)
    assert set(np.unique(h)) <= {-1.0, 1.0}
    np.testing.assert_array_equal(h @ h.T, 1536 * np.eye(1536))
    x = np.random.default_rng(3).standard_normal((2, 1536))
    np.testing.assert_allclose(hadamard.fast_transform(x), x @ h / np.sqrt(1536), atol=1e-10)


def test_hadamard_errors_and_blocks():
    with pytest.raises(hadamard.HadamardError, match=r"n=1376 = 43 \* 2\^5"):
        hadamard.hadamard_matrix(1376)
    assert hadamard.block_size(1376) == 32 and hadamard.block_size(96) == 96
    x = np.random.default_rng(0).standard_normal((2, 96))
    np.testing.assert_allclose(hadamard.fast_transform(x, 32), x @ hadamard.block_matrix(96, 32), atol=1e-12)


class BiasedResidual(torch.nn.Module):
    """Embedding, one pre-norm GELU MLP residual block with biases everywhere, norm, head."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(5)
        self.emb = torch.nn.Embedding(64, 64)
        self.norm1, self.norm2 = models.RMSNorm(64), models.RMSNorm(64)
        self.fc1, self.fc2, self.head = torch.nn.Linear(64, 96), torch.nn.Linear(96, 64), torch.nn.Linear(64, 40)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * (0.3 if p.dim() > 1 else 0.5) + (p.dim() == 1) * 0.5)

    def forward(self, ids):
        x = self.emb(ids)
        x = x + self.fc2(torch.nn.functional.gelu(self.fc1(self.norm1(x))))
        return self.head(self.norm2(x))


def test_float_equivalence_tied_gqa():
    model = models.LlamaModel(vocab=64, hidden=64, layers=2, heads=4, kv_heads=2, ffn=96, max_seq=16,
                              tie_embeddings=True, seed=4).eval()
    inputs = model.example_inputs(batch=1, seq=8)
    # online Hadamard on every writer's input in blocks of head_dim: per attention head on o_proj
    compiled = qcc.compile(model, inputs, quant={"passes": ["fuse-rotation{seed=7 online=writers online-block=16}"]})
    assert rel_err(compiled(*inputs).numpy(), float64_out(model, inputs)) <= 1e-4
    params = [a["param"] for a in compiled.manifest["entry"]["args"] if "param" in a]
    # the tied table is rotated for the embedding and, with the final norm's scale, for the head
    assert "lm_head.weight" in params and "lm_head.weight:embedding" in params
    assert not any(p.endswith("layernorm.weight") or p == "norm.weight" for p in params)


def test_float_equivalence_biases_file_rotation_online_writers(tmp_path):
    model = BiasedResidual().eval()
    inputs = (torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(1)),)
    q, _ = np.linalg.qr(np.random.default_rng(3).standard_normal((64, 64)))
    np.save(tmp_path / "q.npy", q)
    recipe = {"passes": [f"fuse-rotation{{rotation={tmp_path / 'q.npy'} online=writers}}"]}
    compiled = qcc.compile(model, inputs, quant=recipe)
    assert rel_err(compiled(*inputs).numpy(), float64_out(model, inputs)) <= 1e-4
    np.save(tmp_path / "bad.npy", q + 0.01)
    with pytest.raises(qcc.QccError, match=r"is not orthogonal: max \|Q Q\^T - I\| = "):
        qcc.compile(model, inputs, quant={"passes": [f"fuse-rotation{{rotation={tmp_path / 'bad.npy'}}}"]})
    from safetensors.numpy import save_file

    save_file({"a": q.astype(np.float32), "b": q.astype(np.float32)}, str(tmp_path / "two.safetensors"))
    with pytest.raises(qcc.QccError, match=r"holds 2 tensors \(a, b\); expected exactly one"):
        qcc.compile(model, inputs, quant={"passes": [f"fuse-rotation{{rotation={tmp_path / 'two.safetensors'}}}"]})
    np.save(tmp_path / "small.npy", np.eye(32))
    with pytest.raises(qcc.QccError, match=r"has shape \[32, 32\], the residual stream needs \[64, 64\]"):
        qcc.compile(model, inputs, quant={"passes": [f"fuse-rotation{{rotation={tmp_path / 'small.npy'}}}"]})


def test_block_input_stream_left_unrotated_with_remark():
    block = models.LlamaBlock(hidden=64, heads=4, ffn=96, max_seq=16).eval()
    prog = import_program(export_module(block, block.example_inputs(batch=1, seq=4)), make_context())
    session = Session(prog.params)
    run_pipeline(prog.module, pipelines.IMPORT, session, "test")
    before = str(prog.module)
    run_pipeline(prog.module, ["fuse-rotation"], session, "test")
    assert str(prog.module) == before
    assert any("left unrotated: the residual stream is a function argument" in r for r in session.remarks)


def test_quantized_matches_rotated_oracle():
    """qcc's rotated int8 model equals PyTorch running the rotated model with the weights the format
    reference decodes from the artifact: norm scales 1, online Hadamard before each down_proj."""
    model = models.LlamaModel(vocab=64, hidden=64, layers=1, heads=4, ffn=128, max_seq=16, seed=2).eval()
    inputs = model.example_inputs(batch=1, seq=8)
    compiled = qcc.compile(model, inputs, quant={"weight_format": "int8_sym_channel",
                                                 "passes": ["fuse-rotation{rotation=hadamard}"]})
    oracle = copy.deepcopy(model)
    weights = dequantized_weights(compiled)
    weights["embed_tokens.weight"] = compiled.weights["embed_tokens.weight"]
    state = dict(oracle.named_parameters())
    with torch.no_grad():
        for name, p in state.items():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.copy_(torch.from_numpy(weights[name]))
    h = torch.from_numpy(hadamard.hadamard_matrix(128) / np.sqrt(128))
    for layer in oracle.layers:
        layer.mlp.down_proj.register_forward_pre_hook(lambda m, args: (args[0] @ h.to(args[0].dtype),))
    expect = float64_out(oracle, inputs)
    assert rel_err(compiled(*inputs).numpy(), expect) <= 1e-4
    assert rel_err(float64_out(model, inputs), expect) > 1e-4  # it was quantized


def test_float_equivalence_layernorm_tied_head():
    """A LayerNorm stream (mean subtracted, scale and bias) is rotated by Q R, which keeps the
    all-ones vector: the LayerNorms stay, their g and b move into the readers (b W^T as a new
    bias of each reader: these linears have none), the tied head is untied, the float function kept;
    reorder-channels permutes the LayerNorm biases with the stream."""
    model = models.LlamaModel(vocab=64, hidden=64, layers=2, heads=4, kv_heads=2, ffn=96, max_seq=16,
                              tie_embeddings=True, seed=4, norm="layer").eval()
    inputs = model.example_inputs(batch=1, seq=8)
    compiled = qcc.compile(model, inputs, quant={"passes": ["fuse-rotation"]})
    assert rel_err(compiled(*inputs).numpy(), float64_out(model, inputs)) <= 1e-4
    assert any("reflection keeping LayerNorm's all-ones vector" in r and "5 norm biases moved into the readers" in r
               for r in compiled.remarks), compiled.remarks
    params = [a["param"] for a in compiled.manifest["entry"]["args"] if "param" in a]
    assert not any("layernorm" in p or p.startswith("norm.") for p in params)
    assert "lm_head.weight:norm_bias" in params and "lm_head.weight:embedding" in params
    calibration = [model.example_inputs(batch=1, seq=8, seed=s) for s in (1, 2)]
    compiled = qcc.compile(model, inputs, quant={"passes": ["fuse-rotation", "reorder-channels{outliers=8}"]},
                           calibration=calibration)
    assert rel_err(compiled(*inputs).numpy(), float64_out(model, inputs)) <= 1e-4
    assert any(r.startswith("reorder-channels: permuted a 64-channel residual stream") for r in compiled.remarks)


def test_quantized_layernorm_matches_rotated_oracle():
    """qcc's rotated int8 LayerNorm model equals PyTorch running it with the decoded weights, the
    LayerNorms' g = 1 and b = 0, each reader adding its norm_bias, a Hadamard before down_proj."""
    model = models.LlamaModel(vocab=64, hidden=64, layers=1, heads=4, ffn=128, max_seq=16, seed=2, norm="layer").eval()
    inputs = model.example_inputs(batch=1, seq=8)
    compiled = qcc.compile(model, inputs, quant={"weight_format": "int8_sym_channel", "passes": ["fuse-rotation"]})
    oracle = copy.deepcopy(model)
    weights = dequantized_weights(compiled)
    weights["embed_tokens.weight"] = compiled.weights["embed_tokens.weight"]
    with torch.no_grad():
        for name, p in oracle.named_parameters():
            if "norm" in name:
                p.fill_(1.0 if name.endswith("weight") else 0.0)
            else:
                p.copy_(torch.from_numpy(weights[name]))
    for name, module in oracle.named_modules():
        bias = compiled.weights.get(f"{name}.weight:norm_bias")
        if bias is not None:
            module.register_forward_hook(lambda m, args, y, b=torch.from_numpy(bias): y + b.to(y.dtype))
    h = torch.from_numpy(hadamard.orthogonal(128))
    for layer in oracle.layers:
        layer.mlp.down_proj.register_forward_pre_hook(lambda m, args: (args[0] @ h.to(args[0].dtype),))
    expect = float64_out(oracle, inputs)
    assert rel_err(compiled(*inputs).numpy(), expect) <= 1e-4
    assert rel_err(float64_out(model, inputs), expect) > 1e-4  # it was quantized


@pytest.mark.parametrize("norm,post_norms", [("layer", False), ("rms", True)])
@pytest.mark.parametrize("plain,rotated", [("w8a8", "w8a8-had"), ("w4a4", "w4a4-had")])
def test_rotation_lowers_the_error_of_outliers(plain, rotated, norm, post_norms):
    """On models with massive activations in the residual stream, LayerNorms (rotated by Q R) or
    norms after each sublayer (a Hadamard after each), rotating roughly halves the end-to-end
    error of quantized activations (measured, LayerNorm: 0.0181 -> 0.0097 for w8a8, 0.290 ->
    0.130 for w4a4; norms after sublayers: 0.0323 -> 0.0136, 0.487 -> 0.227)."""
    model = models.LlamaModel(vocab=256, hidden=256, layers=2, heads=4, ffn=768, max_seq=64,
                              massive_activations=True, norm=norm, post_norms=post_norms).eval()
    calibration = [model.example_inputs(batch=1, seq=32, seed=s) for s in range(4)]
    inputs = model.example_inputs(batch=1, seq=32, seed=99)
    expect = float64_out(model, inputs)
    errors = [rel_err(qcc.compile(model, inputs, quant=q, calibration=calibration)(*inputs).numpy(), expect)
              for q in (plain, rotated)]
    assert errors[1] <= 0.6 * errors[0], errors
