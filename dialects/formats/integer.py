"""Reference numerics for int8 / int4 weight formats (the oracle for every kernel).

All arithmetic is float32 with IEEE-correct division and round-half-to-even
(`np.rint`) everywhere, so a float32 kernel following the same steps
reproduces codes, scales and zero points bit for bit. Inputs are converted to
float32 first. "Granule" = the set of elements sharing one scale (see
`base.py` for the scale shapes).

Quantize, per granule (qmax = 127 for int8 sym, 7 for int4 sym, 2**bits-1 asym):

* symmetric:  scale = amax / qmax,  amax = max |w|
              code  = clip(rint(w / scale), qmin, qmax)         (signed int8)
* asymmetric: lo = min(min w, 0),  hi = max(max w, 0)           (0 is exactly representable)
              scale = (hi - lo) / qmax
              zero  = clip(rint(-lo / scale), 0, qmax)          (uint8)
              code  = clip(rint(w / scale) + zero, 0, qmax)     (uint8)

A scale that comes out 0 (all-zero granule, or amax so tiny the division
underflows) is replaced by 1.0. Dequantize: ``(code - zero) * scale`` in
float32 (zero = 0 for symmetric).

Packing (what artifacts store and kernels read), row-major:

* int8: the codes unchanged, [N, K] int8 (sym) or uint8 (asym).
* int4: uint8 [N, ceil(K/2)]; byte j of row n holds column 2j in its LOW
  nibble and column 2j+1 in its HIGH nibble. The nibble is the code for asym
  and ``code + 8`` (0..15) for sym, so a kernel always computes
  ``(nibble - z) * s`` with z = 8 (sym) or zero[n, g] (asym). For odd K the
  last high nibble is 0.
"""

from __future__ import annotations

import numpy as np

from .base import Format, FormatError, QuantizedTensor

_F32 = np.float32
_INT4_SYM_BIAS = 8


def quantize(w, fmt: Format) -> QuantizedTensor:
    """Quantize a 2-D float weight ``w[N, K]`` to `fmt` (see module docstring)."""
    w = _check_weight(w, fmt)
    shape = w.shape
    sshape = fmt.scale_shape(shape)
    g = _granules(w, sshape)
    qmin, qmax = fmt.storage_levels()
    if fmt.symmetric:
        scale = np.max(np.abs(g), axis=-1) / _F32(qmax)
        scale = np.where(scale == 0, _F32(1.0), scale)
        codes = np.clip(np.rint(g / scale[..., None]), qmin, qmax)
        zero = None
    else:
        lo = np.minimum(np.min(g, axis=-1), _F32(0))
        hi = np.maximum(np.max(g, axis=-1), _F32(0))
        with np.errstate(over="ignore"):  # overflow is reported below
            span = hi - lo
        if not np.all(np.isfinite(span)):
            idx = tuple(int(i) for i in np.argwhere(~np.isfinite(span))[0])
            raise FormatError(
                f"{fmt.key()}: max - min of the granule at scale index {idx} overflows "
                f"float32; rescale the weights or use a symmetric format"
            )
        scale = span / _F32(qmax)
        scale = np.where(scale == 0, _F32(1.0), scale)
        zero = np.clip(np.rint(-lo / scale), 0, qmax)
        codes = np.clip(np.rint(g / scale[..., None]) + zero[..., None], 0, qmax)
        zero = zero.astype(np.uint8)
    return QuantizedTensor(
        codes=codes.reshape(shape).astype(fmt.code_dtype),
        scale=scale.astype(_F32),
        zero=zero,
        format=fmt,
        shape=shape,
    )


def dequantize(qt: QuantizedTensor) -> np.ndarray:
    """float32 ``(codes - zero) * scale`` of shape [N, K]."""
    codes = _granules(qt.codes.astype(_F32), qt.scale.shape)
    if qt.zero is not None:
        codes = codes - qt.zero.astype(_F32)[..., None]
    return (codes * qt.scale[..., None]).reshape(qt.shape)


def fake_quant(w, fmt: Format) -> np.ndarray:
    """``dequantize(quantize(w, fmt))``: the values a quantized kernel will see."""
    return dequantize(quantize(w, fmt))


def pack(qt: QuantizedTensor) -> np.ndarray:
    """Storage layout of `qt.codes` (int8 unchanged; int4 two nibbles per byte)."""
    fmt = qt.format
    if fmt.bits == 8:
        return np.array(qt.codes, order="C")
    nib = qt.codes.astype(np.int16)
    if fmt.symmetric:
        nib += _INT4_SYM_BIAS
    nib = nib.astype(np.uint8)
    n, k = qt.shape
    if k % 2:
        nib = np.concatenate([nib, np.zeros((n, 1), np.uint8)], axis=1)
    return np.ascontiguousarray(nib[:, 0::2] | (nib[:, 1::2] << 4))


def unpack(packed: np.ndarray, fmt: Format, shape: tuple[int, int]) -> np.ndarray:
    """Exact inverse of `pack`: codes [N, K] of `fmt.code_dtype`.

    Checks dtype and shape of `packed`, and rejects content no `pack` call can
    produce (int8 sym code -128, non-zero padding nibble for odd K).
    """
    shape = tuple(shape)
    want = fmt.packed_shape(shape)
    if not isinstance(packed, np.ndarray) or packed.shape != want or packed.dtype != fmt.packed_dtype:
        got = f"{packed.dtype} {packed.shape}" if isinstance(packed, np.ndarray) else type(packed).__name__
        raise FormatError(
            f"unpack {fmt.key()} for shape {shape}: expected a {fmt.packed_dtype} array "
            f"of shape {want}, got {got}"
        )
    if fmt.bits == 8:
        qmin, _ = fmt.storage_levels()
        if packed.size and packed.min() < qmin:
            raise FormatError(f"unpack {fmt.key()}: code {packed.min()} is below {qmin}")
        return packed.copy()
    n, k = shape
    nib = np.empty((n, 2 * want[1]), np.uint8)
    nib[:, 0::2] = packed & 0x0F
    nib[:, 1::2] = packed >> 4
    if k % 2 and np.any(nib[:, k]):
        raise FormatError(
            f"unpack {fmt.key()}: odd K={k} but the padding high nibble of the last "
            f"byte is not 0; the buffer is not a packed {fmt.key()} weight"
        )
    nib = nib[:, :k]
    if fmt.symmetric:
        return (nib.astype(np.int16) - _INT4_SYM_BIAS).astype(np.int8)
    return nib.copy()


def grid(fmt: Format) -> np.ndarray:
    """Sorted representable values at scale 1 as float32: the codes qmin..qmax.

    Symmetric: these are the dequantized values (zero = 0). Asymmetric: the code
    levels 0..qmax; dequantized values are ``scale * (grid - zero)``.
    """
    qmin, qmax = fmt.storage_levels()
    return np.arange(qmin, qmax + 1, dtype=_F32)


def _granules(a: np.ndarray, sshape: tuple[int, int]) -> np.ndarray:
    """View [N, K] as [S0, S1, elements] so that scale[s0, s1] covers a[s0, s1, :]."""
    return a.reshape(sshape[0], sshape[1], -1)


def _check_weight(w, fmt: Format) -> np.ndarray:
    """Validate and convert the weight to a float32 [N, K] array."""
    a = np.asarray(w)
    where = f"quantize to {fmt.key()}"
    if a.dtype.kind not in "fiu":
        raise FormatError(f"{where}: weight dtype {a.dtype} is not a real number type; pass a float array")
    if a.ndim != 2:
        raise FormatError(
            f"{where}: expected a 2-D weight [N, K] (N outputs, K inputs), got shape "
            f"{a.shape}; reshape it to [N, K] first"
        )
    if a.size == 0:
        raise FormatError(f"{where}: weight of shape {a.shape} is empty; there is nothing to quantize")
    with np.errstate(over="ignore"):  # float32 overflow becomes Inf, reported below
        a = a.astype(_F32)
    bad = ~np.isfinite(a)
    if bad.any():
        n, k = (int(i) for i in np.argwhere(bad)[0])
        raise FormatError(
            f"{where}: weight has {int(bad.sum())} non-finite value(s), first w[{n}, {k}] = "
            f"{a[n, k]}; fix or mask NaN/Inf (or float32 overflow) before quantizing"
        )
    return a
