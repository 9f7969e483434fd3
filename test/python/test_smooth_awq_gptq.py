"""smooth-channels, awq and gptq: float equivalence of the scaling passes, quantized
numerics against the format reference, and accuracy against round-to-nearest."""

import copy

import numpy as np
import pytest
import torch

import models
from oracles import float64_out, rel_err
import qcc
from qcc.dialects import formats
from qcc.dialects.formats import activation
from qcc.passes.awq import search_scales
from qcc.passes.gptq import gptq_quantize
from qcc.passes.quantize_weights import clipped_scales, round_with_scales, search_clip
from qcc.reference import dequantized_weights


def oracle(model, compiled):
    """`model` with every parameter as the artifact holds it: decoded quantized weights,
    float parameters (e.g. rescaled norm weights) by name."""
    out = copy.deepcopy(model)
    decoded = dequantized_weights(compiled)
    with torch.no_grad():
        for name, p in out.named_parameters():
            value = decoded.get(name, compiled.weights.get(name))
            if value is not None:
                p.copy_(torch.from_numpy(np.asarray(value)))
    return out


def linear_inputs(model, batches):
    seen = {}
    hooks = [m.register_forward_pre_hook(
        lambda m, a, name=name: seen.setdefault(f"{name}.weight", []).append(a[0].reshape(-1, a[0].shape[-1])))
        for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    with torch.no_grad():
        for b in batches:
            model(*b)
    for h in hooks:
        h.remove()
    return {k: torch.cat(v).double().numpy() for k, v in seen.items()}


@pytest.fixture(scope="module")
def outlier_model():
    model = models.LlamaModel(vocab=64, hidden=128, layers=1, heads=4, kv_heads=2, ffn=256, max_seq=16,
                              seed=3, massive_activations=True).eval()
    calib = [model.example_inputs(batch=1, seq=16, seed=s) for s in range(4)]
    return model, calib[0], calib


def test_gptq_beats_rtn_on_correlated_inputs():
    rng = np.random.default_rng(0)
    k, n, rows = 256, 48, 1024
    x = rng.standard_normal((rows, 24)) @ rng.standard_normal((24, k)) + 0.3 * rng.standard_normal((rows, k))
    x *= np.exp(0.5 * rng.standard_normal(k))[None, :]
    w = rng.standard_normal((n, k)).astype(np.float32)
    for key in ("int4_asym_g128", "int4_sym_channel", "int8_sym_channel"):
        fmt = formats.parse_weight_format(key)
        qt = gptq_quantize(w, x.T @ x / rows, fmt)
        rtn = formats.quantize(w, fmt)
        np.testing.assert_array_equal(qt.scale, rtn.scale)  # same format, same layout: only codes differ
        mse_gptq = np.mean((x @ (formats.dequantize(qt) - w).T) ** 2)
        mse_rtn = np.mean((x @ (formats.dequantize(rtn) - w).T) ** 2)
        assert mse_gptq < 0.7 * mse_rtn, key


@pytest.mark.parametrize("key", ["int4_sym_channel", "int4_asym_g32", "int8_sym_channel", "int4_sym_tensor"])
def test_clip_search_never_worse_than_rtn(key):
    fmt = formats.parse_weight_format(key)
    w = np.random.default_rng(2).standard_normal((48, 256)).astype(np.float32)
    rtn = formats.quantize(w, fmt)
    # ratio 1 is the format's own rounding
    one = round_with_scales(w, fmt, *clipped_scales(w, fmt, 1.0))
    np.testing.assert_array_equal(one.codes, rtn.codes)
    np.testing.assert_array_equal(one.scale, rtn.scale)
    qt = search_clip(w, fmt, 10)
    assert qt.scale.shape == rtn.scale.shape and qt.codes.dtype == rtn.codes.dtype
    err = lambda q: ((formats.dequantize(q) - w) ** 2).reshape(*fmt.scale_shape(w.shape), -1).sum(-1)  # noqa: E731
    assert np.all(err(qt) <= err(rtn))
    if fmt.bits == 4:  # Gaussian weights: the tails of a long row are worth clipping
        assert err(qt).sum() < (0.9 if fmt.granularity == "channel" else 1.0) * err(rtn).sum()


def test_awq_search_never_worse_than_rtn():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((256, 128)) * np.where(np.arange(128) % 17 == 0, 20.0, 1.0)
    w = rng.standard_normal((64, 128)).astype(np.float32)
    s, loss, base = search_scales(x, [w], formats.parse_weight_format("int4_asym_g128"), grid=20)
    assert loss < 0.8 * base and s.shape == (128,)


def test_smooth_and_awq_keep_the_float_function(outlier_model):
    model, inputs, calib = outlier_model
    compiled = qcc.compile(model, inputs, calibration=calib,
                           quant={"passes": ["smooth-channels{alpha=0.5}", "awq{format=int4_asym_g32 grid=4}"]})
    assert rel_err(compiled(*inputs).numpy(), float64_out(model, inputs)) <= 1e-4
    args = [a["param"] for a in compiled.manifest["entry"]["args"] if "param" in a]
    norm = compiled.weights["layers.0.input_layernorm.weight"]
    assert "layers.0.input_layernorm.weight" in args
    assert not np.allclose(norm, model.layers[0].input_layernorm.weight.detach().numpy())  # 1/s folded in


def test_smooth_folds_into_layernorm_scale_and_shift():
    """GPT-2's LayerNorm (g * n + b) absorbs 1/s in g and b; its x @ W projections (stored
    transposed) take s in their input columns; the float function is unchanged, and the
    quantized artifact matches the float64 model holding its parameters."""
    model = models.GPT2Block(hidden=128, heads=4, seed=4).eval()
    g = torch.Generator().manual_seed(7)
    calib = [(torch.randn(1, 12, 128, generator=g) * (1 + 9 * (torch.arange(128) % 37 == 0)),) for _ in range(4)]
    inputs = calib[0]
    compiled = qcc.compile(model, inputs, calibration=calib, quant={"passes": ["smooth-channels{alpha=0.5}"]})
    assert rel_err(compiled(*inputs).numpy(), float64_out(model, inputs)) <= 1e-4
    for name in ("ln_1.weight", "ln_1.bias", "ln_2.weight", "ln_2.bias"):
        before = dict(model.named_parameters())[name].detach().numpy()
        assert not np.allclose(compiled.weights[name], before), name  # 1/s folded in
    assert compiled.remarks == ["smooth-channels: left 2 linear layer(s) unsmoothed (no producer to fold 1/s "
                                "into): c_proj.weight, mlp_proj.weight"]
    quantized = qcc.compile(model, inputs, calibration=calib, quant="w8a8-smooth")
    ref = oracle(model, quantized)  # decoded int8 weights, smoothed LayerNorms
    per_token = activation.ACT_FORMATS["int8_sym_token"]
    for mod in ref.modules():
        if isinstance(mod, models.Conv1D):
            mod.register_forward_pre_hook(lambda m, args: (torch.from_numpy(activation.fake_quant_act(
                args[0].detach().reshape(-1, args[0].shape[-1]).numpy(), per_token)).reshape(args[0].shape),))
    with torch.no_grad():
        expect = ref(*inputs).numpy()
    assert rel_err(quantized(*inputs).numpy(), expect) <= 1e-4
    assert rel_err(float64_out(model, inputs), expect) > 1e-4


QUANT = {"smooth-int8": {"weight_format": "int8_sym_channel", "passes": ["smooth-channels"]},
         "w4-clip": {"weight_format": "int4_sym_channel", "weight_options": "clip-search=10"},
         "w4-gptq-clip": {"weight_format": "int4_sym_channel", "weight_pass": "gptq", "weight_options": "clip-search=10"}}


@pytest.mark.parametrize("recipe", ["smooth-int8", "w4a16-g128-awq", "w4a16-g128-gptq", "w4-clip", "w4-gptq-clip"])
def test_quantized_matches_reference(outlier_model, recipe):
    model, inputs, calib = outlier_model
    quant = QUANT.get(recipe, recipe)
    compiled = qcc.compile(model, inputs, calibration=calib, quant=quant)
    assert len(compiled.manifest["layers"]) == 8
    expect = float64_out(oracle(model, compiled), inputs)
    assert rel_err(compiled(*inputs).numpy(), expect) <= 1e-4
    assert rel_err(float64_out(model, inputs), expect) > 1e-4
    if recipe == "w4a16-g128-gptq":
        # per layer, on the calibration inputs: GPTQ's output error is below round-to-nearest's
        xs = linear_inputs(model, calib)
        fmt = formats.parse_weight_format("int4_asym_g128")
        decoded = dequantized_weights(compiled)
        for name, x in xs.items():
            w = dict(model.named_parameters())[name].detach().numpy()
            gptq = np.mean((x @ (decoded[name] - w).T) ** 2)
            rtn = np.mean((x @ (formats.fake_quant(w, fmt) - w).T) ** 2)
            assert gptq < rtn, name


def test_llm_int8_gptq_rounds_for_the_masked_input(outlier_model):
    """llm-int8-gptq: GPTQ on each int8 part sees that part's input (outlier columns masked)."""
    model, inputs, calib = outlier_model
    compiled = qcc.compile(model, inputs, calibration=calib, quant="llm-int8-gptq")
    decoded = dequantized_weights(compiled)
    fmt = formats.parse_weight_format("int8_sym_channel")
    params = dict(model.named_parameters())
    split = 0
    for name, x in linear_inputs(model, calib).items():
        mask = compiled.weights.get(f"{name}:inlier_mask")
        if mask is None:
            continue
        split += 1
        w = params[name].detach().numpy() * mask
        deq = decoded[f"{name}:inliers"]
        assert not np.any(deq[:, mask == 0])
        xm = x * mask
        assert np.mean((xm @ (deq - w).T) ** 2) < np.mean((xm @ (formats.fake_quant(w, fmt) - w).T) ** 2), name
    assert split
