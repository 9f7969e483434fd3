"""Tests for the shared model zoo in test/models.py."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pytest
import torch

import models
from models import ZOO, LlamaBlock, LlamaModel

ZOO_NAMES = sorted(ZOO)


def _run(model, inputs):
    with torch.no_grad():
        return model(*inputs)


def test_zoo_names():
    assert set(ZOO) == {"mlp", "llama_block", "llama_model", "cnn", "gpt2_block"}


@pytest.mark.parametrize("name", ZOO_NAMES)
def test_runs_finite_nontrivial(name):
    model, inputs = ZOO[name]()
    assert isinstance(inputs, tuple)
    assert not model.training
    out = _run(model, inputs)
    assert torch.isfinite(out).all()
    assert out.float().std().item() > 1e-3


@pytest.mark.parametrize("name", ZOO_NAMES)
def test_deterministic_for_seed(name):
    rng_state = torch.get_rng_state()
    m1, in1 = ZOO[name](seed=0)
    m2, in2 = ZOO[name](seed=0)
    # Building models must not consume/perturb the global RNG.
    assert torch.equal(rng_state, torch.get_rng_state())
    for a, b in zip(in1, in2):
        assert torch.equal(a, b)
    sd1, sd2 = m1.state_dict(), m2.state_dict()
    assert sd1.keys() == sd2.keys()
    for k in sd1:
        assert torch.equal(sd1[k], sd2[k]), k
    assert torch.equal(_run(m1, in1), _run(m2, in2))
    m3, _ = ZOO[name](seed=1)
    assert not torch.equal(_run(m1, in1), _run(m3, in1))


@pytest.mark.parametrize("name", ZOO_NAMES)
def test_torch_export_and_lower(name):
    from torch_mlir import fx

    model, inputs = ZOO[name]()
    ep = torch.export.export(model, inputs)
    torch.testing.assert_close(ep.module()(*inputs), _run(model, inputs))
    mlir_module = fx.export_and_import(model, *inputs, output_type="linalg-on-tensors")
    text = str(mlir_module)
    assert "linalg." in text
    assert "torch.aten" not in text and "torch.prim" not in text


def test_llama_block_gqa_lowers():
    from torch_mlir import fx

    model = LlamaBlock(hidden=128, heads=4, kv_heads=2, ffn=256, max_seq=16).eval()
    assert model.self_attn.k_proj.out_features == 64
    inputs = model.example_inputs(batch=1, seq=8)
    out = _run(model, inputs)
    assert out.shape == (1, 8, 128) and torch.isfinite(out).all()
    text = str(fx.export_and_import(model, *inputs, output_type="linalg-on-tensors"))
    assert "torch.aten" not in text


def test_llama_block_is_causal():
    model = LlamaBlock(hidden=64, heads=2, ffn=128, max_seq=16).eval()
    (x,) = model.example_inputs(batch=1, seq=8)
    y = _run(model, (x,))
    x2 = x.clone()
    x2[:, 5:] += 1.0
    y2 = _run(model, (x2,))
    torch.testing.assert_close(y[:, :5], y2[:, :5])
    assert not torch.allclose(y[:, 5:], y2[:, 5:])


def test_llama_model_tied_embeddings():
    model = LlamaModel(vocab=64, hidden=64, layers=1, heads=2, ffn=128, max_seq=16,
                       tie_embeddings=True).eval()
    assert model.lm_head.weight is model.embed_tokens.weight
    out = _run(model, model.example_inputs(batch=1, seq=8))
    assert out.shape == (1, 8, 64)


def test_massive_activations():
    model = LlamaModel(vocab=512, hidden=256, layers=2, heads=4, ffn=688, max_seq=64,
                       massive_activations=True).eval()
    chans = list(model.outlier_channels)
    assert len(chans) == 4 and len(set(chans)) == 4
    assert LlamaModel(hidden=256, heads=4, ffn=688).outlier_channels == ()

    captured = {}

    def hook(_mod, _inp, out):
        captured["h"] = out.detach()

    handle = model.layers[0].register_forward_hook(hook)
    try:
        out = _run(model, model.example_inputs(batch=2, seq=16))
    finally:
        handle.remove()
    assert torch.isfinite(out).all()
    per_channel = captured["h"].abs().mean(dim=(0, 1))  # residual stream after block 1
    median = per_channel.median()
    ratios = per_channel[chans] / median
    assert (ratios >= 10.0).all(), ratios
