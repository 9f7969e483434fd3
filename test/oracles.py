"""The numerical oracles the tests compare qcc against."""

import copy

import numpy as np


def rel_err(a, b) -> float:
    """max |a - b| / max |b| in float64; NaN/inf in `a` fails loudly (an unwritten buffer was read)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert np.isfinite(a).all(), "output has NaN/inf (an unwritten or poisoned buffer was read)"
    return float(np.abs(a - b).max() / np.abs(b).max())


def float64_out(model, inputs):
    """`model` run in double precision on a copy (the model itself is left as it is)."""
    import torch

    inputs = [x.double() if x.is_floating_point() else x for x in inputs]
    with torch.no_grad():
        return copy.deepcopy(model).double()(*inputs).numpy()


def assert_packed_roundtrip(layout, arrays, unpack, qt):
    """A weight layout's packed arrays have the shapes/dtypes it declares and unpack to `qt` exactly."""
    for role, (shape, dtype) in layout.shapes().items():
        assert arrays[role].shape == shape and arrays[role].dtype == dtype
    back = unpack(layout, arrays)
    np.testing.assert_array_equal(back.codes, qt.codes)
    np.testing.assert_array_equal(back.scale, qt.scale)
    if qt.zero is not None:
        np.testing.assert_array_equal(back.zero, qt.zero)
