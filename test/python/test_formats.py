"""Tests for qcc.dialects.formats: the numpy reference every kernel is checked against."""

import numpy as np
import pytest

from qcc.dialects.formats import (
    Format,
    FormatError,
    QuantizedTensor,
    dequantize,
    fake_quant,
    get_format,
    grid,
    list_formats,
    pack,
    parse_weight_format,
    quantize,
    unpack,
)

KEYS = [
    f"int{bits}_{sym}_{gran}"
    for bits in (8, 4)
    for sym in ("sym", "asym")
    for gran in ("tensor", "channel", "g32", "g64", "g128")
]
N, K = 6, 384  # K divisible by every registered group size


def make_weight(seed, shape=(N, K)):
    """Random weight with per-row magnitudes over 5 decades, rows shifted
    positive/negative (exercises the asym min/max clamp to 0), outliers and
    some exact zeros."""
    rng = np.random.default_rng(seed)
    n, k = shape
    w = rng.standard_normal(shape) * 10.0 ** rng.uniform(-3, 2, size=(n, 1))
    row_abs = np.abs(w).max(axis=1, keepdims=True)
    w += rng.choice([-1.0, 0.0, 1.0], size=(n, 1)) * 1.5 * row_abs  # all-pos / all-neg / mixed rows
    w[rng.integers(0, n, 4), rng.integers(0, k, 4)] *= 8.0  # outliers
    nz = max(1, n * k // 64)  # a few exact zeros, never the whole tensor
    w.flat[rng.choice(n * k, nz, replace=False)] = 0.0
    return w.astype(np.float32)


def broadcast(qt, a):
    """Per-element [N, K] view of a per-granule array (scale or zero)."""
    reps = qt.shape[1] // a.shape[1]
    return np.repeat(a, reps, axis=1) if a.shape[1] > 1 else np.broadcast_to(a, qt.shape)


def per_element(qt):
    scale = broadcast(qt, qt.scale)
    zero = np.zeros(qt.shape, np.float32) if qt.zero is None else broadcast(qt, qt.zero).astype(np.float32)
    return scale, zero


def shapes_for(key):
    """(N, K) cases: K=384, plus odd K for formats that allow it."""
    fmt = get_format(key)
    return [(N, K)] if fmt.granularity == "group" else [(N, K), (5, 383), (1, 3)]


CASES = [(key, shape) for key in KEYS for shape in shapes_for(key)]


# --- registry -----------------------------------------------------------------


def test_registry_lists_exactly_the_keys():
    assert sorted(list_formats()) == sorted(KEYS)


@pytest.mark.parametrize("key", KEYS)
def test_key_round_trip(key):
    fmt = get_format(key)
    assert fmt.key() == key
    assert Format.from_key(key) == fmt
    assert parse_weight_format(f"  {key.upper()} ") is fmt
    assert fmt.bits == int(key[3])
    assert fmt.symmetric == ("_sym_" in key)


def test_parse_accepts_unregistered_group_size_and_format_instances():
    fmt = parse_weight_format("int4_sym_g256")
    assert (fmt.granularity, fmt.group_size) == ("group", 256)
    assert parse_weight_format(fmt) is fmt


@pytest.mark.parametrize("bad", ["int3_sym_tensor", "int4", "int4_sym_g0", "int8_sym_g128x", ""])
def test_unknown_key_names_allowed_values(bad):
    with pytest.raises(FormatError) as e:
        get_format(bad)
    assert "int4_asym_g128" in str(e.value) and "int8_sym_channel" in str(e.value)
    with pytest.raises(FormatError, match=r"int\{4,8\}_\{sym,asym\}"):
        parse_weight_format(bad)
    with pytest.raises(FormatError, match="expected"):
        Format.from_key(bad)


def test_format_error_is_value_error():
    assert issubclass(FormatError, ValueError)


@pytest.mark.parametrize(
    "args",
    [
        ("int4", 4, True, "group", None),  # group without size
        ("int4", 4, True, "channel", 32),  # size without group
        ("int8", 4, True, "tensor", None),  # name/bits mismatch
        ("int2", 2, True, "tensor", None),
        ("int4", 4, True, "row", None),
        ("int4", 4, True, "group", -32),
    ],
)
def test_invalid_format_parameters(args):
    with pytest.raises(FormatError):
        Format(*args)


def test_storage_levels_and_grid():
    assert get_format("int8_sym_tensor").storage_levels() == (-127, 127)
    assert get_format("int4_sym_tensor").storage_levels() == (-8, 7)
    assert get_format("int8_asym_tensor").storage_levels() == (0, 255)
    assert get_format("int4_asym_g32").storage_levels() == (0, 15)
    np.testing.assert_array_equal(grid(get_format("int4_sym_g64")), np.arange(-8, 8))
    np.testing.assert_array_equal(grid(get_format("int4_asym_g64")), np.arange(16))
    np.testing.assert_array_equal(grid(get_format("int8_sym_channel")), np.arange(-127, 128))
    assert grid(get_format("int8_asym_channel")).dtype == np.float32


# --- properties over every format ---------------------------------------------


@pytest.mark.parametrize("key,shape", CASES)
def test_types_and_shapes(key, shape):
    fmt = get_format(key)
    qt = quantize(make_weight(1, shape), fmt)
    n, k = shape
    want = {"tensor": (1, 1), "channel": (n, 1), "group": (n, k // (fmt.group_size or 1))}
    assert qt.shape == shape and qt.format is fmt
    assert qt.codes.shape == shape and qt.codes.dtype == (np.int8 if fmt.symmetric else np.uint8)
    assert qt.scale.shape == want[fmt.granularity] and qt.scale.dtype == np.float32
    assert np.all(qt.scale > 0)
    if fmt.symmetric:
        assert qt.zero is None
    else:
        assert qt.zero.shape == qt.scale.shape and qt.zero.dtype == np.uint8
    deq = dequantize(qt)
    assert deq.shape == shape and deq.dtype == np.float32


@pytest.mark.parametrize("key,shape", CASES)
def test_pack_round_trip(key, shape):
    fmt = get_format(key)
    qt = quantize(make_weight(2, shape), fmt)
    packed = pack(qt)
    n, k = shape
    assert packed.dtype == fmt.packed_dtype
    assert packed.shape == ((n, k) if fmt.bits == 8 else (n, (k + 1) // 2))
    assert packed.flags.c_contiguous
    codes = unpack(packed, fmt, shape)
    assert codes.dtype == qt.codes.dtype
    np.testing.assert_array_equal(codes, qt.codes)
    if fmt.bits == 4 and k % 2:
        assert np.all(packed[:, -1] >> 4 == 0)


@pytest.mark.parametrize("key", [k for k in KEYS if k.startswith("int4")])
def test_int4_unpack_is_inverse_for_every_code(key):
    """All 16 stored codes survive pack/unpack, including int4 sym -8."""
    fmt = get_format(key)
    qmin, qmax = fmt.storage_levels()
    codes = np.arange(qmin, qmax + 1).repeat(8).reshape(1, -1).astype(fmt.code_dtype)
    scale_shape = fmt.scale_shape(codes.shape)
    qt = QuantizedTensor(
        codes,
        np.ones(scale_shape, np.float32),
        None if fmt.symmetric else np.zeros(scale_shape, np.uint8),
        fmt,
        codes.shape,
    )
    np.testing.assert_array_equal(unpack(pack(qt), fmt, codes.shape), codes)


@pytest.mark.parametrize("key,shape", CASES)
def test_codes_in_storage_levels_and_values_on_grid(key, shape):
    fmt = get_format(key)
    qt = quantize(make_weight(3, shape), fmt)
    qmin, qmax = fmt.storage_levels()
    assert qt.codes.min() >= qmin and qt.codes.max() <= qmax
    if fmt.symmetric:  # quantize never emits -qmax-1 (int4 -8): the range is symmetric
        assert qt.codes.min() >= -qmax
    scale, zero = per_element(qt)
    deq = dequantize(qt)
    level = np.rint(deq / scale + zero)
    assert np.all(np.isin(level, grid(fmt)))
    np.testing.assert_array_equal(deq, ((level - zero) * scale).astype(np.float32))


@pytest.mark.parametrize("key,shape", CASES)
def test_error_at_most_half_a_step(key, shape):
    """Every input lies within the clip range by construction of the scale,
    so each element is within scale/2 (plus float32 rounding)."""
    fmt = get_format(key)
    w = make_weight(4, shape)
    qt = quantize(w, fmt)
    scale, _ = per_element(qt)
    err = np.abs(w.astype(np.float64) - fake_quant(w, fmt))
    tol = scale * (0.5 + 1e-5) + 1e-6 * np.abs(w)
    assert np.all(err <= tol), f"worst excess {np.max(err - tol)}"


@pytest.mark.parametrize("key,shape", CASES)
def test_granule_extremes_and_zero(key, shape):
    fmt = get_format(key)
    w = make_weight(5, shape)
    qt = quantize(w, fmt)
    deq = dequantize(qt)
    scale, _ = per_element(qt)
    # Element of largest |w| in each granule.
    a = np.abs(w).reshape(qt.scale.shape[0], qt.scale.shape[1], -1)
    wg = w.reshape(a.shape)
    dg = deq.reshape(a.shape)
    sg = scale.reshape(a.shape)
    idx = np.argmax(a, axis=-1)[..., None]
    w_max, d_max, s_max = (np.take_along_axis(x, idx, -1) for x in (wg, dg, sg))
    assert np.all(np.abs(w_max - d_max) <= s_max * (0.5 + 1e-5))
    if fmt.symmetric:  # amax maps to code +-qmax, reproduced up to float rounding
        np.testing.assert_allclose(d_max, w_max, rtol=1e-6)
    # Exact zeros stay exactly zero.
    zeros = w == 0
    assert zeros.any()
    assert np.all(deq[zeros] == 0.0)


def test_zero_granule_uses_unit_scale():
    w = make_weight(6, (3, 64))
    w[1] = 0.0
    for key in ("int8_sym_channel", "int4_asym_channel"):
        qt = quantize(w, get_format(key))
        assert qt.scale[1, 0] == 1.0
        assert np.all(dequantize(qt)[1] == 0.0)


def test_float64_input_is_rounded_to_float32_first():
    w = make_weight(7, (4, 64)).astype(np.float64) + 1e-12
    fmt = get_format("int8_asym_g32")
    np.testing.assert_array_equal(quantize(w, fmt).codes, quantize(w.astype(np.float32), fmt).codes)


def test_format_method_matches_function():
    fmt = get_format("int4_sym_g32")
    w = make_weight(8, (2, 64))
    np.testing.assert_array_equal(fmt.quantize(w).codes, quantize(w, fmt).codes)


# --- hand-computed examples ---------------------------------------------------


def test_int4_asym_by_hand():
    # min=-1, max=2 -> scale = 3/15 = 0.2, zero = rint(1/0.2) = 5.
    # codes: rint(-5)+5=0, 0+5=5, rint(2.5)=2 (half-even) +5=7, rint(10)+5=15.
    qt = quantize(np.array([[-1.0, 0.0, 0.5, 2.0]]), get_format("int4_asym_tensor"))
    assert qt.scale[0, 0] == np.float32(0.2) and qt.zero[0, 0] == 5
    np.testing.assert_array_equal(qt.codes, [[0, 5, 7, 15]])
    np.testing.assert_array_equal(dequantize(qt), np.float32([[-1.0, 0.0, 0.4, 2.0]]))
    # byte0 = 0 | 5<<4 = 0x50, byte1 = 7 | 15<<4 = 0xF7
    np.testing.assert_array_equal(pack(qt), np.array([[0x50, 0xF7]], np.uint8))


def test_int4_sym_by_hand():
    # amax=7 -> scale 1; rint(-3.5)=-4, rint(0.5)=0, rint(1.5)=2, 7.
    qt = quantize(np.array([[-3.5, 0.5, 1.5, 7.0]]), get_format("int4_sym_channel"))
    assert qt.scale[0, 0] == 1.0 and qt.zero is None
    np.testing.assert_array_equal(qt.codes, [[-4, 0, 2, 7]])
    np.testing.assert_array_equal(dequantize(qt), [[-4.0, 0.0, 2.0, 7.0]])
    # biased nibbles 4, 8, 10, 15 -> bytes 0x84, 0xFA
    np.testing.assert_array_equal(pack(qt), np.array([[0x84, 0xFA]], np.uint8))


def test_int4_odd_k_by_hand():
    # asym, min=0, max=3 -> scale 0.2, zero 0; codes 5, 10, 15 -> bytes 0xA5, 0x0F.
    fmt = get_format("int4_asym_tensor")
    qt = quantize(np.array([[1.0, 2.0, 3.0]]), fmt)
    np.testing.assert_array_equal(qt.codes, [[5, 10, 15]])
    packed = pack(qt)
    np.testing.assert_array_equal(packed, np.array([[0xA5, 0x0F]], np.uint8))
    np.testing.assert_array_equal(unpack(packed, fmt, (1, 3)), qt.codes)


def test_int8_sym_by_hand():
    # amax=254 -> scale 2; rint(0.5)=0, rint(1.5)=2, rint(63.5)=64.
    qt = quantize(np.array([[-254.0, 1.0, 3.0, 127.0]]), get_format("int8_sym_tensor"))
    assert qt.scale[0, 0] == 2.0
    np.testing.assert_array_equal(qt.codes, np.array([[-127, 0, 2, 64]], np.int8))
    np.testing.assert_array_equal(dequantize(qt), [[-254.0, 0.0, 4.0, 128.0]])
    np.testing.assert_array_equal(pack(qt), qt.codes)


def test_int8_asym_by_hand():
    # min=-64, max=63.5 -> scale 127.5/255 = 0.5, zero = rint(128) = 128.
    # rint(-128)+128=0, rint(-0.5)=0 -> 128, rint(0.5)=0 -> 128, 127+128=255.
    qt = quantize(np.array([[-64.0, -0.25, 0.25, 63.5]]), get_format("int8_asym_channel"))
    assert qt.scale[0, 0] == 0.5 and qt.zero[0, 0] == 128
    np.testing.assert_array_equal(qt.codes, np.array([[0, 128, 128, 255]], np.uint8))
    np.testing.assert_array_equal(dequantize(qt), [[-64.0, 0.0, 0.0, 63.5]])


def test_group_scales_by_hand():
    # Two groups of 2 per row: each gets its own scale.
    # Group 1: amax 1.75 -> scale 0.25; 0.625/0.25 = 2.5 -> 2 (half-even).
    qt = quantize(np.array([[1.0, -7.0, -1.75, 0.625]]), Format("int4", 4, True, "group", 2))
    np.testing.assert_array_equal(qt.scale, np.float32([[1.0, 0.25]]))
    np.testing.assert_array_equal(qt.codes, [[1, -7, -7, 2]])


# --- errors -------------------------------------------------------------------


@pytest.mark.parametrize("key", ["int4_sym_g128", "int8_asym_g32"])
def test_k_not_divisible_by_group(key):
    fmt = get_format(key)
    with pytest.raises(FormatError, match=rf"K=100 is not divisible by group size G={fmt.group_size}"):
        quantize(make_weight(9, (2, 100)), fmt)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_input(bad):
    w = make_weight(10, (4, 64))
    w[2, 17] = bad
    with pytest.raises(FormatError, match=r"w\[2, 17\]"):
        quantize(w, get_format("int8_sym_channel"))


def test_float32_overflow_is_non_finite():
    w = np.full((2, 4), 1e39)
    with pytest.raises(FormatError, match="non-finite"):
        quantize(w, get_format("int8_sym_tensor"))


@pytest.mark.parametrize("w", [np.ones(8, np.float32), np.ones((2, 3, 4), np.float32), np.float32(1.0)])
def test_not_2d(w):
    with pytest.raises(FormatError, match="expected a 2-D weight"):
        quantize(w, get_format("int8_sym_tensor"))


@pytest.mark.parametrize("shape", [(0, 4), (4, 0)])
def test_empty(shape):
    with pytest.raises(FormatError, match="empty"):
        quantize(np.ones(shape, np.float32), get_format("int4_sym_channel"))


def test_asym_range_overflow():
    w = np.array([[-3e38, 3e38]], np.float32)
    with pytest.raises(FormatError, match="overflows float32"):
        quantize(w, get_format("int8_asym_tensor"))


def test_non_numeric_input():
    with pytest.raises(FormatError, match="not a real number type"):
        quantize(np.array([["a", "b"]]), get_format("int8_sym_tensor"))


def test_unpack_rejects_bad_buffers():
    fmt = get_format("int4_asym_tensor")
    with pytest.raises(FormatError, match=r"expected a uint8 array of shape \(1, 2\)"):
        unpack(np.zeros((1, 3), np.uint8), fmt, (1, 3))
    with pytest.raises(FormatError, match="padding high nibble"):
        unpack(np.array([[0x00, 0x10]], np.uint8), fmt, (1, 3))
    with pytest.raises(FormatError, match="below -127"):
        unpack(np.array([[-128, 0]], np.int8), get_format("int8_sym_tensor"), (1, 2))


def test_quantized_tensor_validates_its_arrays():
    fmt = get_format("int8_asym_channel")
    codes = np.zeros((2, 4), np.uint8)
    with pytest.raises(FormatError, match="scale must be a float32 array of shape"):
        QuantizedTensor(codes, np.ones((1, 1), np.float32), np.zeros((2, 1), np.uint8), fmt, (2, 4))
    with pytest.raises(FormatError, match="zero must be a uint8 array"):
        QuantizedTensor(codes, np.ones((2, 1), np.float32), None, fmt, (2, 4))
