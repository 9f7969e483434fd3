"""reorder-channels: float equivalence (alone and after fuse-rotation), and the split
low-bit/int8 layers against the format reference."""

import copy

import numpy as np
import torch

import models
from oracles import float64_out, rel_err
import qcc
from qcc import calibration
from qcc.passes.reorder_channels import outlier_permutation
from qcc.reference import dequantized_weights


def test_outlier_permutation():
    perm = outlier_permutation([1.0, 9.0, 2.0, 8.0, 0.5], 2)
    assert perm.tolist() == [0, 2, 4, 1, 3]


def llama():
    model = models.LlamaModel(vocab=64, hidden=64, layers=1, heads=4, kv_heads=2, ffn=128, max_seq=16, seed=6,
                              massive_activations=True).eval()
    return model, model.example_inputs(batch=1, seq=8), [model.example_inputs(batch=1, seq=8, seed=s)
                                                        for s in range(3)]


def test_float_equivalence_folded():
    model, inputs, calib = llama()
    compiled = qcc.compile(model, inputs, calibration=calib, quant={"passes": ["reorder-channels{outliers=8}"]})
    assert rel_err(compiled(*inputs).numpy(), float64_out(model, inputs)) <= 1e-4
    # the planted outlier channels of the residual stream moved last in the embedding
    emb = compiled.weights["embed_tokens.weight"]
    last = np.argsort(-np.abs(emb).mean(0))[:4]
    assert set(last.tolist()) <= set(range(56, 64))


def test_float_equivalence_after_rotation():
    model, inputs, calib = llama()
    compiled = qcc.compile(model, inputs, calibration=calib,
                           quant={"passes": ["fuse-rotation", "reorder-channels{outliers=8}"]})
    assert rel_err(compiled(*inputs).numpy(), float64_out(model, inputs)) <= 1e-4


def test_split_layers_match_format_reference():
    """MLP: fc1 reads the input (explicit gather), fc2/fc3 fold their permutation into the rows of
    the previous layer.  Main parts int4, outlier parts int8 (recipe override by name)."""
    model = models.MLP(in_features=64, hidden=128, out_features=16, seed=1).eval()
    g = torch.Generator().manual_seed(2)
    scale = torch.ones(64)
    scale[[3, 40]] = 25.0
    calib = [(torch.randn(8, 64, generator=g) * scale,) for _ in range(3)]
    inputs = calib[0]
    k = 4
    recipe = {"weight_format": "int4_sym_channel", "passes": [f"reorder-channels{{outliers={k}}}"],
              "overrides": [{"pattern": ":outliers$", "weight_format": "int8_sym_channel"}]}
    compiled = qcc.compile(model, inputs, calibration=calib, quant=recipe)
    fmts = {layer["weight"]: layer["format"] for layer in compiled.manifest["layers"]}
    assert fmts["fc1.weight:main"] == "int4_sym_channel" and fmts["fc1.weight:outliers"] == "int8_sym_channel"
    stats = calibration.linear_input_stats(torch.export.export(model, inputs), calib, want=("absmax",))
    perms = {n: outlier_permutation(stats[f"{n}.weight"].absmax, k) for n in ("fc1", "fc2", "fc3")}
    assert {3, 40} <= set(perms["fc1"][-k:].tolist())
    rows = {"fc1": perms["fc2"], "fc2": perms["fc3"], "fc3": np.arange(16)}
    decoded = dequantized_weights(compiled)
    oracle = copy.deepcopy(model)
    with torch.no_grad():
        for n in ("fc1", "fc2", "fc3"):
            w = np.concatenate([decoded[f"{n}.weight:main"], decoded[f"{n}.weight:outliers"]], axis=1)
            w_orig = np.empty_like(w)
            w_orig[np.ix_(rows[n], perms[n])] = w  # back to the model's channel order
            getattr(oracle, n).weight.copy_(torch.from_numpy(w_orig))
    expect = float64_out(oracle, inputs)
    assert rel_err(compiled(*inputs).numpy(), expect) <= 1e-4
    assert rel_err(float64_out(model, inputs), expect) > 1e-4
