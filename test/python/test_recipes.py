"""Recipes: names and recipe files -> pass lists, their errors, and end to end
w8a8 / w4a8-g128 / llm-int8 / per-layer overrides against a PyTorch fake-quant
reference of the same semantics.

The reference is the float model with each nn.Linear's weight replaced by the
format reference's fake-quantized weight and a forward pre-hook fake-quantizing
its input with the activation reference (formats/activation.py); for
llm-int8 a forward hook computes the split (int8 part over the masked input,
float part over the outlier columns, chosen from the same calibration data).
Compiled output must match it within 1e-4 relative error.
"""

import copy
import json

import numpy as np
import pytest
import torch

import models
from oracles import rel_err
import qcc
from qcc import passes, recipes
from qcc.dialects import formats
from qcc.dialects.formats import activation
from qcc.recipes import get_recipe


# ---------------------------------------------------------------------------
# Names -> passes
# ---------------------------------------------------------------------------

def test_named_recipes():
    r = get_recipe("w8a8")
    assert (r.weight_format, r.act_format) == ("int8_sym_channel", "int8_sym_token")
    assert r.passes == ("quantize-weights{format=int8_sym_channel}", "quantize-activations{format=int8_sym_token}",
                        "dequant-after-gemm")
    assert get_recipe("w4a8-g128").passes[0] == "quantize-weights{format=int4_asym_g128}"
    assert get_recipe("w4a4").passes[:2] == ("quantize-weights{format=int4_sym_channel clip-search=20}",
                                             "quantize-activations{format=int4_sym_token}")
    assert get_recipe("llm-int8").passes[0] == "split-outliers{threshold=6.0}"
    assert get_recipe("w8a8-static").act_format == "int8_sym_tensor"
    assert get_recipe("w8a8").to_json()["act_format"] == "int8_sym_token"
    # weight-only family unchanged
    assert get_recipe("w4a16-g64-sym").passes == ("quantize-weights{format=int4_sym_g64}",)
    assert get_recipe("w8a16").act_format is None and get_recipe("float").passes == ()


def test_reorder_preset_keeps_outliers_int8():
    r = get_recipe("w4a4-had-reorder")
    assert r.passes[:2] == ("fuse-rotation", "reorder-channels")
    assert "quantize-weights{format=int8_sym_channel exclude=^(?!.*(?::outliers$)) clip-search=20}" in r.passes
    assert "quantize-activations{format=int8_sym_token exclude=^(?!.*(?::outliers$))}" in r.passes
    assert "quantize-weights{format=int4_sym_channel exclude=(?::outliers$) clip-search=20}" in r.passes
    # the same split and formats without the rotation, whose int4 activations are not clipped
    assert get_recipe("w4a4-reorder").passes[1:] == tuple(p.replace("int4_sym_token_clip0.9", "int4_sym_token")
                                                          for p in r.passes[2:])
    assert "quantize-activations{format=int4_sym_token_clip0.9 exclude=(?::outliers$)}" in r.passes


@pytest.mark.parametrize("name", ["w8a16", "w4a16-g128", "w4a16-g64-sym", "w8a8", "w4a8-g128", "w4a4", "llm-int8",
                                  "w8a8-had", "w4a4-had", "w4a4-reorder", "w4a4-had-reorder", "w8a8-smooth",
                                  "w4a16-g128-awq"])
def test_gptq_suffix(name):
    """<preset>-gptq: the same passes with every quantize-weights instance (overrides too) replaced by gptq."""
    rtn, gptq = get_recipe(name), get_recipe(f"{name}-gptq")
    assert (gptq.name, gptq.weight_format, gptq.act_format) == (f"{name}-gptq", rtn.weight_format, rtn.act_format)
    assert gptq.passes == tuple(p.replace("quantize-weights{", "gptq{") for p in rtn.passes)
    assert any(p.startswith("gptq{") for p in gptq.passes)


@pytest.mark.parametrize("name,match", [
    ("float-gptq", r"recipe 'float-gptq': GPTQ rounds integer weights and 'float' has none"),
    ("w8a9-gptq", r"unknown quantization recipe 'w8a9-gptq'.*<preset>-gptq"),
    ("w8a8-gptq-gptq", r"unknown quantization recipe 'w8a8-gptq-gptq'"),
])
def test_gptq_suffix_errors(name, match):
    with pytest.raises(qcc.QccError, match=match):
        get_recipe(name)


@pytest.mark.parametrize("name", sorted(recipes.EXTENSIONS))
def test_extension_recipes_name_their_missing_pass(name):
    spec = recipes.EXTENSIONS[name]
    needed = [p.partition("{")[0] for p in spec.before] + [spec.weight_pass]
    missing = [p for p in needed if passes.lookup(p) is None]
    if not missing:
        assert get_recipe(name).weight_format == spec.weight_format
        return
    with pytest.raises(qcc.QccError, match=rf"recipe '{name}' needs pass '{missing[0]}', which is not registered"):
        get_recipe(name)


def test_unknown_recipe_lists_presets():
    with pytest.raises(qcc.QccError, match=r"unknown quantization recipe 'w8a9'.*w8a8, .*llm-int8.*\.json recipe file"):
        get_recipe("w8a9")


# ---------------------------------------------------------------------------
# Recipe files
# ---------------------------------------------------------------------------

def write(tmp_path, obj, name="r.json"):
    path = tmp_path / name
    path.write_text(json.dumps(obj) if name.endswith(".json") else obj)
    return str(path)


def test_file_with_overrides(tmp_path):
    path = write(tmp_path, {"weight_format": "int4_asym_g128", "act_format": "int8_sym_token",
                            "passes": ["split-outliers{threshold=4.0}"],
                            "overrides": [{"pattern": "lm_head", "weight_format": "int8_sym_channel", "act_format": "none"},
                                          {"pattern": "mlp\\.", "act_format": "int4_sym_token"}]})
    r = get_recipe(path)
    assert r.name == "r.json" and (r.weight_format, r.act_format) == ("int4_asym_g128", "int8_sym_token")
    assert r.passes == (
        "split-outliers{threshold=4.0}",
        "quantize-weights{format=int4_asym_g128 exclude=(?:lm_head)|(?:mlp\\.)}",
        "quantize-weights{format=int8_sym_channel exclude=^(?!.*(?:lm_head))}",
        "quantize-weights{format=int4_asym_g128 exclude=^(?!.*(?:mlp\\.))|(?:lm_head)}",
        "quantize-activations{format=int8_sym_token exclude=(?:lm_head)|(?:mlp\\.)}",
        "quantize-activations{format=int4_sym_token exclude=^(?!.*(?:mlp\\.))|(?:lm_head)}",
        "dequant-after-gemm")
    # split-outliers{decide=dynamic} does not split the experts' products: their rows stay float
    assert get_recipe("llm-int8-dynamic").passes[-2].endswith(" experts=false}")
    if passes.lookup("gptq") is not None:
        r = get_recipe(write(tmp_path, {"weight_format": "int4_asym_g128", "weight_pass": "gptq"}))
        assert r.passes == ("gptq{format=int4_asym_g128}",)
    r = get_recipe(write(tmp_path, {"weight_format": "int4_sym_channel", "weight_options": "clip-search=5",
                                    "overrides": [{"pattern": "lm_head", "weight_format": "int8_sym_channel"}]}))
    assert r.passes == ("quantize-weights{format=int4_sym_channel exclude=(?:lm_head) clip-search=5}",
                        "quantize-weights{format=int8_sym_channel exclude=^(?!.*(?:lm_head)) clip-search=5}")
    toml = write(tmp_path, 'weight_format = "int8_sym_channel"\nact_format = "int8_sym_token"\n', "r.toml")
    assert get_recipe(toml).passes == get_recipe("w8a8").passes


@pytest.mark.parametrize("obj,match", [
    ({"weight_format": "int8_sym_channel", "act_fmt": "int8_sym_token"},
     r"unknown field 'act_fmt' in recipe.*allowed: name, weight_format, act_format, weight_pass, weight_options, passes, "
     r"overrides"),
    ({"weight_format": "int8_sym_channel", "weight_options": "clip=3"},
     r"unknown option 'clip=3' for pass quantize-weights.*options: format, exclude, clip-search"),
    ({"weight_format": "int8_sym_channel", "weight_options": 3}, r"field 'weight_options' must be a string"),
    ({"weight_format": "int3_sym_channel"}, r"field 'weight_format': unknown weight format 'int3_sym_channel'.*allowed: none, int\{4,8\}"),
    ({"weight_format": "int8_sym_channel", "act_format": "int8_asym_token"},
     r"field 'act_format': unknown activation format.*allowed: none, int4_sym_tensor, int4_sym_token, int8_sym_tensor, int8_sym_token"),
    ({"act_format": "int8_sym_token"}, r"'act_format' is 'int8_sym_token' but 'weight_format' is none"),
    ({"weight_format": "int8_sym_channel", "passes": ["fuse-rotaton"]}, r"passes\[0\] needs pass 'fuse-rotaton', which is not registered"),
    ({"weight_format": "int8_sym_channel", "passes": ["split-outliers{thresh=3}"]}, r"unknown option 'thresh=3' for pass split-outliers"),
    ({"weight_format": "int8_sym_channel", "passes": "split-outliers"}, r"field 'passes' must be a list"),
    ({"weight_format": "int8_sym_channel", "weight_pass": "split-outliers"},
     r"field 'weight_pass': 'split-outliers' is not a weight quantizer.*allowed: .*quantize-weights"),
    ({"weight_format": "int8_sym_channel", "overrides": [{"weight_format": "none"}]}, r"field 'overrides\[0\].pattern' is missing"),
    ({"weight_format": "int8_sym_channel", "overrides": [{"pattern": "fc", "bits": 4}]}, r"unknown field 'bits' in overrides\[0\]"),
    ({"weight_format": "int8_sym_channel", "overrides": [{"pattern": "fc(", "weight_format": "none"}]}, r"overrides\[0\].pattern': bad regex"),
    ({"weight_format": "int8_sym_channel", "overrides": [{"pattern": "a b"}]}, r"cannot contain spaces"),
    ({"weight_format": "int8_sym_channel", "act_format": "int8_sym_token",
      "overrides": [{"pattern": "fc1", "weight_format": "none"}]}, r"'overrides\[0\].act_format' is 'int8_sym_token' but 'overrides\[0\].weight_format' is none"),
])
def test_file_errors_name_the_field(tmp_path, obj, match):
    with pytest.raises(qcc.QccError, match=match):
        get_recipe(write(tmp_path, obj))


def test_file_read_errors(tmp_path):
    with pytest.raises(qcc.QccError, match="recipe file not found"):
        get_recipe(str(tmp_path / "missing.json"))
    bad = tmp_path / "bad.json"
    bad.write_text("{weight_format: 1")
    with pytest.raises(qcc.QccError, match="cannot read recipe file"):
        get_recipe(str(bad))
    with pytest.raises(qcc.QccError, match="a recipe file holds an object"):
        get_recipe(write(tmp_path, ["w8a8"]))


# ---------------------------------------------------------------------------
# End to end against the fake-quant reference
# ---------------------------------------------------------------------------

def with_outlier_columns(x, columns, factor=20.0):
    x = x.clone()
    x[..., columns] *= factor
    return x


def mlp():
    model = models.MLP(in_features=128, seed=2).eval()
    inputs = (with_outlier_columns(model.example_inputs(batch=5, seed=3)[0], [3, 50]),)
    calib = [(with_outlier_columns(model.example_inputs(batch=8, seed=s)[0], [3, 50]),) for s in (4, 5)]
    return model, inputs, calib


def llama_block():
    model = models.LlamaBlock(hidden=256, heads=4, ffn=768, seed=2).eval()
    inputs = (with_outlier_columns(model.example_inputs(batch=2, seq=8, seed=3)[0], [7, 200]),)
    calib = [(with_outlier_columns(model.example_inputs(batch=2, seq=8, seed=s)[0], [7, 200]),) for s in (4, 5)]
    return model, inputs, calib


MODELS = {"mlp": mlp, "llama_block": llama_block}


def linear_input_absmax(model, calib) -> dict[str, np.ndarray]:
    """{weight name: per-column max |x|} of each nn.Linear's input over `calib`, from forward pre-hooks."""
    seen, hooks = {}, []
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear):
            def hook(m, args, name=f"{name}.weight"):
                a = args[0].detach().reshape(-1, args[0].shape[-1]).abs().amax(0).numpy()
                seen[name] = np.maximum(seen[name], a) if name in seen else a
            hooks.append(mod.register_forward_pre_hook(hook))
    with torch.no_grad():
        for batch in calib:
            model(*batch)
    for h in hooks:
        h.remove()
    return seen


def fake_quant_model(model, layer_formats, outliers=None):
    """A copy of `model` computing the fake-quant semantics in float32.

    layer_formats: {weight name: (weight format key, activation format key or None)};
    outliers: {weight name: outlier input columns} for LLM.int8() layers.
    """
    ref = copy.deepcopy(model)
    for name, mod in ref.named_modules():
        if not isinstance(mod, torch.nn.Linear):
            continue
        wname = f"{name}.weight"
        wfmt, afmt = layer_formats[wname]
        afmt = None if afmt is None else activation.ACT_FORMATS[afmt]
        w = mod.weight.detach().numpy()
        cols = outliers.get(wname, np.zeros(0, np.int64)) if outliers else np.zeros(0, np.int64)

        def quantized_input(x, afmt=afmt, mask=None):
            x2 = x.detach().reshape(-1, x.shape[-1]).numpy()
            if mask is not None:
                x2 = x2 * mask
            return torch.from_numpy(activation.fake_quant_act(x2, afmt)).reshape(x.shape)

        if cols.size == 0:
            with torch.no_grad():
                mod.weight.copy_(torch.from_numpy(formats.fake_quant(w, formats.get_format(wfmt))))
            mod.register_forward_pre_hook(lambda m, args, q=quantized_input: (q(args[0]),))
            continue
        mask = np.ones(w.shape[1], np.float32)
        mask[cols] = 0.0
        w_in = torch.from_numpy(formats.fake_quant(w * mask, formats.get_format(wfmt)))
        w_out = torch.from_numpy(w[:, cols])

        def split_forward(m, args, out, q=quantized_input, mask=mask, w_in=w_in, w_out=w_out, cols=cols):
            x = args[0]
            y = q(x, mask=mask) @ w_in.T + x[..., torch.from_numpy(cols)] @ w_out.T
            return y + m.bias if m.bias is not None else y

        mod.register_forward_hook(split_forward)
    return ref


RECIPE_FORMATS = {"w8a8": ("int8_sym_channel", "int8_sym_token"), "w4a8-g128": ("int4_asym_g128", "int8_sym_token"),
                  "llm-int8": ("int8_sym_channel", "int8_sym_token")}


@pytest.mark.parametrize("recipe", sorted(RECIPE_FORMATS))
@pytest.mark.parametrize("name", sorted(MODELS))
def test_recipe_matches_fake_quant_reference(name, recipe):
    model, inputs, calib = MODELS[name]()
    compiled = qcc.compile(model, inputs, quant=recipe, calibration=calib)
    linears = [f"{n}.weight" for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    outliers = None
    if recipe == "llm-int8":
        absmax = linear_input_absmax(model, calib)
        outliers = {w: np.flatnonzero(absmax[w] > 6.0) for w in linears}
        assert any(c.size for c in outliers.values())  # the test data has outliers
        for w, cols in outliers.items():
            mask = compiled.weights.get(f"{w}:inlier_mask")
            assert (mask is None) == (cols.size == 0)
            if cols.size:
                np.testing.assert_array_equal(np.flatnonzero(mask == 0), cols)
    reference = fake_quant_model(model, {w: RECIPE_FORMATS[recipe] for w in linears}, outliers)
    with torch.no_grad():
        expect = reference(*inputs).numpy()
        float_out = model(*inputs).numpy()
    got = compiled(*inputs).numpy()
    assert rel_err(got, expect) <= 1e-4
    assert rel_err(float_out, expect) > 1e-4  # the reference is not just the float model


def test_overrides_end_to_end(tmp_path):
    model, inputs, calib = mlp()
    path = write(tmp_path, {"weight_format": "int4_asym_g128", "act_format": "int8_sym_token",
                            "overrides": [{"pattern": "^fc3", "weight_format": "int8_sym_channel", "act_format": "none"},
                                          {"pattern": "fc1", "act_format": "int4_sym_token"}]})
    compiled = qcc.compile(model, inputs, quant=path)
    assert {layer["weight"]: layer["format"] for layer in compiled.manifest["layers"]} == {
        "fc1.weight": "int4_asym_g128", "fc2.weight": "int4_asym_g128", "fc3.weight": "int8_sym_channel"}
    reference = fake_quant_model(model, {"fc1.weight": ("int4_asym_g128", "int4_sym_token"),
                                         "fc2.weight": ("int4_asym_g128", "int8_sym_token"),
                                         "fc3.weight": ("int8_sym_channel", None)})
    with torch.no_grad():
        expect = reference(*inputs).numpy()
    assert rel_err(compiled(*inputs).numpy(), expect) <= 1e-4


def test_named_reorder_end_to_end():
    """w4a4-had-reorder: outlier parts int8 weights and activations, the rest int4, as the recipe says."""
    model = models.LlamaModel(vocab=64, hidden=64, layers=1, heads=4, ffn=128, max_seq=16, seed=1,
                              massive_activations=True).eval()
    inputs = model.example_inputs(batch=1, seq=8)
    calib = [model.example_inputs(batch=1, seq=8, seed=s) for s in range(3)]
    compiled = qcc.compile(model, inputs, calibration=calib, quant="w4a4-had-reorder")
    formats_of = {layer["weight"]: layer["format"] for layer in compiled.manifest["layers"]}
    outliers = {w: f for w, f in formats_of.items() if w.endswith(":outliers")}
    assert len(outliers) == 8 and set(outliers.values()) == {"int8_sym_channel"}  # 7 + lm_head
    assert {f for w, f in formats_of.items() if w.endswith(":main")} == {"int4_sym_channel"}
    assert rel_err(compiled(*inputs).numpy(), model(*inputs).detach().numpy()) < 0.5


def dynamic_split_model(model, wfmt="int8_sym_channel", afmt="int8_sym_token", threshold=6.0):
    """A copy of `model` computing llm-int8-dynamic's semantics: per call, the input columns whose
    absmax over the call's rows exceeds `threshold` stay float; both parts use the quantized weight."""
    ref = copy.deepcopy(model)
    act = activation.ACT_FORMATS[afmt]
    for mod in ref.modules():
        if not isinstance(mod, torch.nn.Linear):
            continue
        wq = formats.fake_quant(mod.weight.detach().numpy(), formats.get_format(wfmt)).astype(np.float64)

        def split_forward(m, args, out, wq=wq):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).numpy()
            outlier = (np.abs(x).max(0) > np.float32(threshold)).astype(np.float32)
            x_in = activation.fake_quant_act(x - x * outlier, act).astype(np.float64)
            y = (x_in + x * outlier) @ wq.T
            y = torch.from_numpy(y.astype(np.float32)).reshape(*out.shape)
            return y + m.bias if m.bias is not None else y

        mod.register_forward_hook(split_forward)
    return ref


@pytest.mark.parametrize("name", sorted(MODELS))
def test_llm_int8_dynamic_matches_reference(name):
    """The outlier columns are chosen per call (no calibration): two calls with outliers in
    different columns, and one token (the decode kernels), each match the reference."""
    from qcc.backends.cpu import host

    model, inputs, _ = MODELS[name]()
    compiled = qcc.compile(model, inputs, quant="llm-int8-dynamic")
    if host.features()["isa"] in ("avx2", "avx512"):  # the float parts on the integer parts' int8 blocks
        assert all(k.get("outlier_kernel") for k in compiled.manifest["cpu"]["kernels"].values())
        assert not any(":panels" in name for name in compiled.weights)  # one packed copy of each weight
    reference = dynamic_split_model(model)
    x = inputs[0]
    other = with_outlier_columns(x.clamp(-3.0, 3.0), [11, 90])  # other outlier columns than x's
    for xs in (x, other):
        with torch.no_grad():
            expect = reference(xs).numpy()
            float_out = model(xs).numpy()
        assert rel_err(compiled(xs).numpy(), expect) <= 1e-4
        assert rel_err(float_out, expect) > 1e-4
    one = qcc.compile(model, (x[..., :1, :] if x.dim() == 3 else x[:1],), quant="llm-int8-dynamic")
    x1 = x[..., :1, :] if x.dim() == 3 else x[:1]
    with torch.no_grad():
        assert rel_err(one(x1).numpy(), reference(x1).numpy()) <= 1e-4


def test_llm_int8_dynamic_keeps_float_function():
    """Before quantization the split is exact: x_in @ W^T + x_out @ W^T = x @ W^T."""
    model, inputs, _ = llama_block()
    compiled = qcc.compile(model, inputs, quant={"weight_format": None,
                                                 "passes": ["split-outliers{decide=dynamic threshold=1.0}"]})
    with torch.no_grad():
        expect = model.double()(inputs[0].double()).numpy()
    assert rel_err(compiled(*inputs).numpy(), expect) <= 1e-4
