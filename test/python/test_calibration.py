"""calibration.linear_input_stats against forward hooks on the model's nn.Linear modules."""

import numpy as np
import pytest
import torch

import models
from qcc import calibration
from qcc.errors import QccError
from qcc.pipeline import Session


def hooked_inputs(model, batches):
    """{weight name: [rows, K] float64} of every nn.Linear's input, from forward hooks."""
    seen = {}
    hooks = []
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear):
            def hook(m, args, name=name):
                seen.setdefault(f"{name}.weight", []).append(args[0].reshape(-1, args[0].shape[-1]).double())
            hooks.append(mod.register_forward_pre_hook(hook))
    with torch.no_grad():
        for b in batches:
            model(*b)
    for h in hooks:
        h.remove()
    return {k: torch.cat(v).numpy() for k, v in seen.items()}


@pytest.fixture(scope="module")
def block():
    model = models.LlamaBlock(hidden=64, heads=4, kv_heads=2, ffn=96, max_seq=16, seed=3).eval()
    batches = [model.example_inputs(batch=2, seq=8, seed=s) for s in range(3)]
    return model, torch.export.export(model, batches[0]), batches


def test_stats_match_hooks(block):
    model, ep, batches = block
    stats = calibration.linear_input_stats(ep, batches, want=calibration.KINDS, sample_rows=10)
    ref = hooked_inputs(model, batches)
    assert sorted(stats) == sorted(ref)
    for name, x in ref.items():
        st = stats[name]
        assert st.rows == x.shape[0] == 48
        np.testing.assert_allclose(st.absmax, np.abs(x).max(0), rtol=1e-5)
        assert st.tensor_absmax == pytest.approx(np.abs(x).max(), rel=1e-5)
        np.testing.assert_allclose(st.mean_abs, np.abs(x).mean(0), rtol=1e-5)
        np.testing.assert_allclose(st.hessian, x.T @ x / len(x), rtol=1e-4, atol=1e-6)
        assert st.samples.shape == (10, x.shape[1])
        # samples are rows of x
        d = np.abs(st.samples[:, None, :] - x[None, :, :].astype(np.float32)).max(-1)
        assert d.min(1).max() < 1e-5


def test_param_override_and_input_transform(block):
    model, ep, batches = block
    up = "mlp.up_proj.weight"
    new_up = model.mlp.up_proj.weight.detach().numpy() * 2.0
    # the IR would reverse o_proj's input channels and its weight columns: same function
    flip = lambda x: x[:, ::-1]  # noqa: E731
    o_flipped = model.self_attn.o_proj.weight.detach().numpy()[:, ::-1]
    stats = calibration.linear_input_stats(ep, batches, want=("absmax",),
                                           params={up: new_up, "self_attn.o_proj.weight": o_flipped},
                                           input_transforms={"self_attn.o_proj.weight": [flip]})
    twin = models.LlamaBlock(hidden=64, heads=4, kv_heads=2, ffn=96, max_seq=16, seed=3).eval()
    with torch.no_grad():
        twin.mlp.up_proj.weight.mul_(2.0)
    ref = hooked_inputs(twin, batches)
    np.testing.assert_allclose(stats["mlp.down_proj.weight"].absmax, np.abs(ref["mlp.down_proj.weight"]).max(0),
                               rtol=1e-5)
    np.testing.assert_allclose(stats["self_attn.o_proj.weight"].absmax,
                               np.abs(ref["self_attn.o_proj.weight"]).max(0)[::-1], rtol=1e-5)


def test_session_cache_view_and_errors(block):
    model, ep, batches = block
    session = Session(params=None, options={"exported_program": ep, "calibration": batches})
    a = calibration.session_stats(session, want=("absmax",))
    assert calibration.session_stats(session, want=("absmax",)) is a
    cols = np.array([5, 1, 2])
    calibration.view(session).add_derived("q_part", "self_attn.q_proj.weight", cols)
    b = calibration.session_stats(session, want=("absmax",))
    assert b is not a
    np.testing.assert_array_equal(b["q_part"].absmax, a["self_attn.q_proj.weight"].absmax[cols])
    with pytest.raises(QccError, match="needs calibration data"):
        calibration.session_stats(Session(params=None, options={"exported_program": ep}))


def test_calibration_shapes_must_match_the_program(block):
    """A sample of another shape than the program was exported for is a clear error (it was a
    traceback from inside the model's view); a dim exported as dynamic may vary."""
    model, ep, batches = block
    other = model.example_inputs(batch=2, seq=6, seed=9)
    with pytest.raises(QccError, match=r"calibration sample 1, input 0 has shape \[2, 6, 64\]; the model was "
                                       r"exported for \[2, 8, 64\]"):
        calibration.linear_input_stats(ep, [batches[0], other], want=("absmax",))
    seq = torch.export.Dim("seq", min=2, max=15)
    dynamic = torch.export.export(model, batches[0], dynamic_shapes=({1: seq},))
    assert calibration.linear_input_stats(dynamic, [batches[0], other], want=("absmax",))


def test_stats_file_roundtrip(block, tmp_path):
    model, ep, batches = block
    stats = calibration.linear_input_stats(ep, batches, want=("absmax", "hessian"))
    path = str(tmp_path / "stats.safetensors")
    calibration.save_stats(stats, path)
    session = Session(params=None, options={})
    loaded = calibration.session_stats(session, want=("absmax", "hessian"), stats_file=path)
    for name, st in stats.items():
        np.testing.assert_allclose(loaded[name].absmax, st.absmax, rtol=1e-6)
        np.testing.assert_allclose(loaded[name].hessian, st.hessian)
        assert loaded[name].rows == st.rows and loaded[name].tensor_absmax == pytest.approx(st.tensor_absmax)
    with pytest.raises(QccError, match="lack 'samples'"):
        calibration.load_stats(path, want=("samples",))


def test_derived_masked_input(block):
    model, ep, batches = block
    session = Session(params=None, options={"exported_program": ep, "calibration": batches})
    cols = np.array([0, 3, 7])
    calibration.view(session).add_derived("fc_masked", "mlp.down_proj.weight", cols, width=96)
    stats = calibration.session_stats(session, want=("absmax", "hessian"))
    parent, masked = stats["mlp.down_proj.weight"], stats["fc_masked"]
    keep = np.zeros(96, bool)
    keep[cols] = True
    assert masked.hessian.shape == (96, 96) and not masked.hessian[~keep].any()
    np.testing.assert_array_equal(masked.absmax[keep], parent.absmax[cols])
