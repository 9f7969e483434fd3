"""Activation quantization: the numpy reference (formats/activation.py), and qcc's
integer GEMM (quantize-activations + dequant-after-gemm + lower-qcc-to-linalg)
against it.

Compiled results must equal the fake-quant reference -- activations and weights
decoded by the numpy references, then a float64 matmul -- to 1e-5 relative
error: that checks the integer path's semantics (codes, i32 accumulation,
zero-point correction, group scaling), not "close to float".
"""

import numpy as np
import pytest
import torch

import qcc
from qcc.dialects.formats import FormatError, activation
from qcc.reference import dequantized_weights
from models import GatheredExperts
from oracles import rel_err

K, N = 256, 48


# ---------------------------------------------------------------------------
# The reference numerics, against hand-worked values
# ---------------------------------------------------------------------------

def test_int8_token_hand_worked():
    x = np.array([[1.0, -2.0, 0.5, 0.0], [0.0, 0.0, 0.0, 0.0], [-3.0, 1.5, 0.25, 2.0]], np.float32)
    codes, scale = activation.quantize_act(x, activation.ACT_FORMATS["int8_sym_token"])
    np.testing.assert_array_equal(scale[:, 0], np.float32([2 / 127, 1.0, 3 / 127]))
    # 0.5 / (2/127) = 31.75 -> 32; 1.5 / (3/127) = 63.5 -> 64 (half to even); 0.25 / (3/127) = 10.58 -> 11
    np.testing.assert_array_equal(codes, [[64, -127, 32, 0], [0, 0, 0, 0], [-127, 64, 11, 85]])
    assert codes.dtype == np.int8 and scale.dtype == np.float32 and scale.shape == (3, 1)


def test_int4_token_and_tensor_hand_worked():
    x = np.array([[7.0, -3.5, 2.5, -7.0]], np.float32)
    codes, scale = activation.quantize_act(x, activation.ACT_FORMATS["int4_sym_token"])
    assert scale[0, 0] == np.float32(1.0)
    np.testing.assert_array_equal(codes, [[7, -4, 2, -7]])  # -3.5 -> -4, 2.5 -> 2 (half to even)
    fmt = activation.ACT_FORMATS["int4_sym_tensor"]
    s = activation.static_scale(3.5, fmt)  # calibrated absmax 3.5: scale 0.5, larger values clip
    assert s.shape == (1, 1) and s[0, 0] == np.float32(0.5)
    codes, scale = activation.quantize_act(x, fmt, s)
    np.testing.assert_array_equal(codes, [[7, -7, 5, -8]])  # 14 -> 7, -7, 5, -14 -> -8
    np.testing.assert_array_equal(activation.fake_quant_act(x, fmt, s), [[3.5, -3.5, 2.5, -4.0]])
    assert activation.static_scale(0.0, fmt)[0, 0] == 1.0


@pytest.mark.parametrize("key", activation.list_act_formats())
def test_codes_within_levels_and_error_bound(key):
    fmt = activation.ACT_FORMATS[key]
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((16, 64)) * 10.0 ** rng.uniform(-3, 3, (16, 1))).astype(np.float32)
    scale = None if fmt.dynamic else activation.static_scale(np.abs(x).max(), fmt)
    codes, s = activation.quantize_act(x, fmt, scale)
    lo, hi = fmt.levels()
    assert codes.min() >= lo and codes.max() <= hi
    err = np.abs(activation.dequantize_act(codes, s) - x)
    assert np.all(err <= s / 2 * (1 + 1e-6))  # round to nearest, nothing clipped (absmax fits)


def test_clip_hand_worked():
    """int4_sym_token_clip0.9: scale = (absmax * 0.9) / 7; the row's largest entries saturate."""
    fmt = activation.parse_act_format("int4_sym_token_clip0.9")
    assert (fmt.bits, fmt.granularity, fmt.clip, fmt.key()) == (4, "token", 0.9, "int4_sym_token_clip0.9")
    x = np.array([[7.0, -3.5, 2.5, -7.0]], np.float32)
    codes, scale = activation.quantize_act(x, fmt)
    assert scale[0, 0] == np.float32(np.float32(7.0) * np.float32(0.9)) / np.float32(7.0)
    # 7 / 0.9 = 7.78 -> 8 -> 7 (saturates); -3.5 / 0.9 = -3.89 -> -4; 2.5 / 0.9 = 2.78 -> 3; -7.78 -> -8
    np.testing.assert_array_equal(codes, [[7, -4, 3, -8]])
    with pytest.raises(FormatError, match="a clip ratio applies to per-token scales"):
        activation.parse_act_format("int8_sym_tensor_clip0.9")
    for bad in ("int4_sym_token_clip1.5", "int4_sym_token_clip1.0", "int4_sym_token_clip0"):
        with pytest.raises(FormatError, match="unknown activation format"):
            activation.parse_act_format(bad)


def test_parse_errors():
    assert activation.parse_act_format("none") is None
    assert activation.parse_act_format(" INT8_sym_token ").key() == "int8_sym_token"
    with pytest.raises(FormatError, match=r"unknown activation format 'int8_asym_token'.*int8_sym_token"):
        activation.parse_act_format("int8_asym_token")
    with pytest.raises(FormatError, match="is static: pass the calibrated scale"):
        activation.quantize_act(np.ones((1, 2)), activation.ACT_FORMATS["int8_sym_tensor"])
    with pytest.raises(FormatError, match="is dynamic"):
        activation.static_scale(1.0, activation.ACT_FORMATS["int8_sym_token"])


# ---------------------------------------------------------------------------
# Compiled integer GEMM against the fake-quant reference
# ---------------------------------------------------------------------------

def make_inputs(seed, m=6):
    """Rows over 4 decades of magnitude, a few outliers, one all-zero row (scale 1 path)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, K, generator=g) * torch.logspace(-2, 2, m)[:, None]
    x[1, 7] *= 30.0
    x[2] = 0.0
    return x


@pytest.fixture(scope="module")
def linear():
    g = torch.Generator().manual_seed(5)
    lin = torch.nn.Linear(K, N, bias=False).eval()
    with torch.no_grad():
        lin.weight.copy_(torch.randn(N, K, generator=g) / 16 + 0.02)  # shifted: asym zero points != 8 / 128
    x = make_inputs(1)
    return lin, torch.export.export(lin, (x,)), x


def fake_quant_reference(compiled, x, afmt, act_scale=None):
    w = dequantized_weights(compiled)["weight"]
    xd = activation.fake_quant_act(x.numpy(), afmt, act_scale)
    return xd.astype(np.float64) @ w.astype(np.float64).T


CASES = [
    ("int8_sym_channel", "int8_sym_token"),   # w8a8
    ("int4_asym_g128", "int8_sym_token"),     # w4a8-g128: grouped i32 partial sums, row-sum zero correction
    ("int4_sym_channel", "int4_sym_token"),   # w4a4
    ("int8_asym_channel", "int8_sym_token"),  # unsigned int8 codes, one zero point a row
    ("int4_sym_g64", "int4_sym_token"),
    ("int8_sym_tensor", "int8_sym_token"),
    ("int4_sym_channel", "int4_sym_token_clip0.9"),  # QuaRot's activation clipping: rows' largest entries saturate
    ("int8_sym_channel", "int8_sym_token_clip0.95"),
]


@pytest.mark.parametrize("wfmt,afmt", CASES)
def test_dynamic_matches_fake_quant_reference(linear, wfmt, afmt):
    lin, ep, x = linear
    compiled = qcc.compile(ep, quant={"weight_format": wfmt, "act_format": afmt})
    got = compiled(x).numpy()
    expect = fake_quant_reference(compiled, x, activation.parse_act_format(afmt))
    assert rel_err(got, expect) <= 1e-5
    # activations really were quantized: weight-only fake quant differs
    weight_only = x.numpy().astype(np.float64) @ dequantized_weights(compiled)["weight"].astype(np.float64).T
    assert rel_err(weight_only, expect) > 1e-4


@pytest.mark.parametrize("wfmt,afmt", [("int8_sym_channel", "int8_sym_tensor"), ("int4_asym_g128", "int4_sym_tensor")])
def test_static_matches_fake_quant_reference(linear, wfmt, afmt):
    lin, ep, x = linear
    calib = [(make_inputs(s) * 0.05,) for s in (2, 3)]  # smaller than x: x's large values clip
    compiled = qcc.compile(ep, quant={"weight_format": wfmt, "act_format": afmt}, calibration=calib)
    fmt = activation.ACT_FORMATS[afmt]
    scale = activation.static_scale(max(float(c[0].abs().max()) for c in calib), fmt)
    expect = fake_quant_reference(compiled, x, fmt, scale)
    assert rel_err(compiled(x).numpy(), expect) <= 1e-5
    assert np.abs(x.numpy() / scale).max() > fmt.qmax  # clipping was exercised


def test_static_needs_calibration(linear):
    lin, ep, x = linear
    with pytest.raises(qcc.QccError, match="static activation scales need calibration: this pass needs calibration"):
        qcc.compile(ep, quant="w8a8-static")


def test_int8_accumulation_is_exact_at_extremes(linear):
    """All codes at +-127 over K = 256: |acc| = 127 * 127 * 256 stays exact in i32."""
    lin, ep, x = linear
    compiled = qcc.compile(ep, quant="w8a8")
    xs = torch.where(torch.arange(K) % 3 == 0, -1.0, 1.0).repeat(6, 1) * torch.arange(1, 7)[:, None]
    expect = fake_quant_reference(compiled, xs, activation.ACT_FORMATS["int8_sym_token"])
    assert rel_err(compiled(xs).numpy(), expect) <= 1e-5


# ---------------------------------------------------------------------------
# split-outliers (LLM.int8())
# ---------------------------------------------------------------------------

def test_split_outliers_matches_reference(linear):
    lin, ep, x = linear
    calib = [(make_inputs(s) * 0.01,) for s in (4, 5)]
    calib[0][0][:, [9, 100]] *= 500.0  # columns 9 and 100 exceed the threshold in calibration
    compiled = qcc.compile(ep, quant="llm-int8", calibration=calib)
    absmax = np.max([c[0].abs().amax(0).numpy() for c in calib], axis=0)
    outliers = np.flatnonzero(absmax > 6.0)
    assert outliers.tolist() == [9, 100]
    mask = compiled.weights["weight:inlier_mask"]
    np.testing.assert_array_equal(np.flatnonzero(mask == 0), outliers)
    w = lin.weight.detach().numpy().astype(np.float64)
    w_in = dequantized_weights(compiled)["weight:inliers"].astype(np.float64)
    assert not np.any(w_in[:, outliers])
    xn = x.numpy()
    x_in = activation.fake_quant_act(xn * mask, activation.ACT_FORMATS["int8_sym_token"])
    expect = x_in.astype(np.float64) @ w_in.T + xn[:, outliers].astype(np.float64) @ w[:, outliers].T
    assert rel_err(compiled(x).numpy(), expect) <= 1e-5


def test_split_outliers_splits_the_experts():
    """A mixture of experts' products: the columns above the threshold in any expert's
    calibration rows stay float for every expert (W[:, :, outliers] kept as is), the rest runs
    on the gathered integer kernel (rows masked, quantized per token; W with those columns
    zeroed, int8 per channel): each row equals the numpy LLM.int8() reference of its expert.
    Before quantization the split keeps the float function."""
    experts, k, n = 4, K, N
    model = GatheredExperts(experts, n, k, seed=3).eval()
    ids_of = lambda m, seed: torch.randint(0, experts, (m,), generator=torch.Generator().manual_seed(seed))  # noqa: E731
    calib = [(make_inputs(s, m=8) * 0.01, ids_of(8, s)) for s in (4, 5)]
    calib[0][0][:, 9] *= 500.0  # column 9 above 6.0 in calibration rows of some experts
    calib[1][0][:, 100] *= 500.0
    x, ids = make_inputs(1, m=7), torch.tensor([0, 3, 3, -1, 2, 1, 0])
    compiled = qcc.compile(model, (x, ids), quant="llm-int8", calibration=calib)
    assert compiled.remarks == [f"split-outliers: w: 2 of {k} input columns above 6.0 stay float (all 4 experts)",
                                "quantize-activations: the experts' rows are quantized (int8_sym_token): w:inliers"]
    assert compiled.manifest["cpu"]["kernels"]["w:inliers"]["variant"] == "gathered int"
    mask = compiled.weights["w:inlier_mask"]
    outliers = np.flatnonzero(mask == 0)
    assert outliers.tolist() == [9, 100]
    w = model.w.detach().numpy().astype(np.float64)
    np.testing.assert_array_equal(compiled.weights["w:outliers"], model.w.detach().numpy()[:, :, outliers])
    w_in = dequantized_weights(compiled)["w:inliers"].astype(np.float64)
    assert not np.any(w_in[:, :, outliers])
    xn = x.numpy()
    x_in = activation.fake_quant_act(xn * mask, activation.ACT_FORMATS["int8_sym_token"]).astype(np.float64)
    e = ids.numpy() % experts
    expect = np.stack([x_in[r] @ w_in[e[r]].T + xn[r, outliers] @ w[e[r]][:, outliers].T for r in range(len(e))])
    assert rel_err(compiled(x, ids).numpy(), expect) <= 1e-5
    split = qcc.compile(model, (x, ids), quant={"weight_format": None, "passes": ["split-outliers{threshold=6.0}"]},
                        calibration=calib)
    with torch.no_grad():
        assert rel_err(split(x, ids).numpy(), model.double()(x.double(), ids).numpy()) <= 1e-5


def test_split_outliers_needs_calibration(linear):
    lin, ep, x = linear
    with pytest.raises(qcc.QccError, match="split-outliers: outlier columns are chosen from calibration data"):
        qcc.compile(ep, quant="llm-int8")


def test_split_outliers_with_static_activations(linear):
    """The int8 part's static scale is the calibrated absmax over the inlier columns only."""
    lin, ep, x = linear
    calib = [(make_inputs(s) * 0.01,) for s in (4, 5)]
    calib[1][0][:, 30] *= 1000.0
    compiled = qcc.compile(ep, quant={"weight_format": "int8_sym_channel", "act_format": "int8_sym_tensor",
                                      "passes": ["split-outliers{threshold=6.0}"]}, calibration=calib)
    absmax = np.max([c[0].abs().amax(0).numpy() for c in calib], axis=0)
    mask = compiled.weights["weight:inlier_mask"]
    np.testing.assert_array_equal(np.flatnonzero(mask == 0), [30])
    fmt = activation.ACT_FORMATS["int8_sym_tensor"]
    scale = activation.static_scale(absmax[mask > 0].max(), fmt)
    w = lin.weight.detach().numpy().astype(np.float64)
    w_in = dequantized_weights(compiled)["weight:inliers"].astype(np.float64)
    xs = x * 0.01  # within the calibrated range
    xn = xs.numpy()
    expect = (activation.fake_quant_act(xn * mask, fmt, scale).astype(np.float64) @ w_in.T
              + xn[:, [30]].astype(np.float64) @ w[:, [30]].T)
    assert rel_err(compiled(xs).numpy(), expect) <= 1e-5
