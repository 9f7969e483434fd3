"""Core types of the quantization formats: `Format`, `QuantizedTensor`, `FormatError`.

A format is named by its canonical key ``int{bits}_{sym|asym}_{granularity}``,
where granularity is ``tensor``, ``channel`` or ``g<G>`` (groups of G columns):
``int4_asym_g128``, ``int8_sym_channel``, ``int4_sym_tensor``.

Weights are 2-D ``w[N, K]``: N output features (rows), K input features
(columns, the reduction axis). Scale (and zero-point) shapes per granularity:

* ``tensor``  -> ``[1, 1]``     one scale for the whole matrix
* ``channel`` -> ``[N, 1]``     one scale per row n
* ``group``   -> ``[N, K // G]`` scale ``[n, g]`` covers row n, columns
  ``[g*G, (g+1)*G)``; K must be a multiple of G.

The numerics live in `integer.py`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

GRANULARITIES = ("tensor", "channel", "group")
KEY_GRAMMAR = "int{4,8}_{sym,asym}_{tensor,channel,g<G>}"
_KEY_RE = re.compile(r"int(4|8)_(sym|asym)_(tensor|channel|g([1-9][0-9]*))")


class FormatError(ValueError):
    """Invalid format name, format parameters, or input to a format operation."""


@dataclass(frozen=True)
class Format:
    """An integer weight quantization format.

    name: "int8" or "int4" (must agree with `bits`).
    bits: 8 or 4.
    symmetric: True -> signed codes, no zero point; False -> unsigned codes
        plus a uint8 zero point per granule.
    granularity: "tensor", "channel" or "group".
    group_size: G, required iff granularity == "group" (groups run along K).
    """

    name: str
    bits: int
    symmetric: bool
    granularity: str
    group_size: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.bits, int) or self.bits not in (4, 8):
            raise FormatError(f"Format bits must be 4 or 8, got {self.bits!r}")
        if self.name != f"int{self.bits}":
            raise FormatError(
                f"Format name {self.name!r} does not match bits={self.bits}; "
                f"use name='int{self.bits}'"
            )
        if not isinstance(self.symmetric, bool):
            raise FormatError(f"Format symmetric must be a bool, got {self.symmetric!r}")
        if self.granularity not in GRANULARITIES:
            raise FormatError(
                f"Format granularity {self.granularity!r} is not one of {GRANULARITIES}"
            )
        if self.granularity == "group":
            g = self.group_size
            if not isinstance(g, int) or isinstance(g, bool) or g <= 0:
                raise FormatError(
                    f"granularity='group' needs a positive integer group_size, got {g!r}"
                )
        elif self.group_size is not None:
            raise FormatError(
                f"group_size={self.group_size!r} is only allowed with "
                f"granularity='group', not {self.granularity!r}"
            )

    def key(self) -> str:
        """Canonical name, e.g. ``int4_asym_g128``; the registry is keyed by it."""
        gran = f"g{self.group_size}" if self.granularity == "group" else self.granularity
        return f"{self.name}_{'sym' if self.symmetric else 'asym'}_{gran}"

    @classmethod
    def from_key(cls, key: str) -> Format:
        """Inverse of `key()`; accepts any positive group size, not only registered ones."""
        m = _KEY_RE.fullmatch(key) if isinstance(key, str) else None
        if m is None:
            raise FormatError(
                f"malformed format key {key!r}: expected {KEY_GRAMMAR}, e.g. 'int4_asym_g128'"
            )
        bits, sym, gran, g = m.groups()
        group = g is not None
        return cls(
            name=f"int{bits}",
            bits=int(bits),
            symmetric=sym == "sym",
            granularity="group" if group else gran,
            group_size=int(g) if group else None,
        )

    def storage_levels(self) -> tuple[int, int]:
        """(qmin, qmax) of the stored code.

        int8 sym: (-127, 127) -- -128 is never used, so the range is symmetric.
        int4 sym: (-8, 7)     -- quantize only emits -7..7 (scale = amax/7),
                                 but -8 is a valid stored code.
        asym:     (0, 2**bits - 1).
        """
        if not self.symmetric:
            return 0, (1 << self.bits) - 1
        return (-127, 127) if self.bits == 8 else (-8, 7)

    @property
    def code_dtype(self) -> np.dtype:
        """dtype of unpacked codes: int8 for symmetric, uint8 for asymmetric."""
        return np.dtype(np.int8 if self.symmetric else np.uint8)

    @property
    def packed_dtype(self) -> np.dtype:
        """dtype of the packed array: int4 always packs into uint8 bytes."""
        return self.code_dtype if self.bits == 8 else np.dtype(np.uint8)

    def scale_shape(self, shape: tuple[int, int]) -> tuple[int, int]:
        """Shape of scale (and zero) for a weight of `shape` = (N, K)."""
        n, k = shape
        if self.granularity == "tensor":
            return 1, 1
        if self.granularity == "channel":
            return n, 1
        if k % self.group_size:
            raise FormatError(
                f"{self.key()}: K={k} is not divisible by group size G={self.group_size}; "
                f"pad K to a multiple of {self.group_size} or use a channel/tensor format"
            )
        return n, k // self.group_size

    def packed_shape(self, shape: tuple[int, int]) -> tuple[int, int]:
        """Shape of the packed array: [N, K] for int8, [N, ceil(K/2)] for int4."""
        n, k = shape
        return (n, k) if self.bits == 8 else (n, (k + 1) // 2)

    def quantize(self, w) -> QuantizedTensor:
        """Same as ``formats.quantize(w, self)``."""
        from .integer import quantize  # deferred: integer.py imports this module

        return quantize(w, self)


@dataclass(frozen=True, eq=False)
class QuantizedTensor:
    """Quantized weight: ``w ~= (codes - zero) * scale`` with scale broadcast per granule.

    codes: [N, K] unpacked codes, `format.code_dtype` (int8 sym / uint8 asym).
    scale: float32, shape `format.scale_shape(shape)`.
    zero:  uint8, same shape as scale, for asymmetric formats; None for
           symmetric ones (implicit 0).
    format: the `Format`.
    shape: (N, K).
    """

    codes: np.ndarray
    scale: np.ndarray
    zero: np.ndarray | None
    format: Format
    shape: tuple[int, int]

    def __post_init__(self) -> None:
        fmt = self.format
        if not isinstance(fmt, Format):
            raise FormatError(f"QuantizedTensor.format must be a Format, got {fmt!r}")
        shape = tuple(self.shape)
        if len(shape) != 2:
            raise FormatError(f"QuantizedTensor.shape must be (N, K), got {self.shape!r}")
        object.__setattr__(self, "shape", shape)
        _check_array("codes", self.codes, shape, fmt.code_dtype, fmt)
        sshape = fmt.scale_shape(shape)
        _check_array("scale", self.scale, sshape, np.dtype(np.float32), fmt)
        if fmt.symmetric:
            if self.zero is not None:
                raise FormatError(f"{fmt.key()} is symmetric: zero must be None")
        else:
            _check_array("zero", self.zero, sshape, np.dtype(np.uint8), fmt)


def _check_array(what: str, a, shape: tuple, dtype: np.dtype, fmt: Format) -> None:
    if not isinstance(a, np.ndarray) or a.shape != shape or a.dtype != dtype:
        got = f"{a.dtype} {a.shape}" if isinstance(a, np.ndarray) else type(a).__name__
        raise FormatError(
            f"{fmt.key()}: {what} must be a {dtype} array of shape {shape}, got {got}"
        )
