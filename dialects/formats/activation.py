"""Activation formats: symmetric int8 / int4 codes per token (dynamic) or per tensor (static).

Keys ``int{8,4}_sym_{token,tensor}``, per token also ``..._token_clip<r>``;
``none`` means float activations. The activation of a linear layer is a 2-D
``x[M, K]`` (M tokens, K input features).

* ``token`` (dynamic): one scale per row, computed at run time,
  ``scale[m] = max_k |x[m, k]| / qmax`` with shape ``[M, 1]``; with ``clip<r>``
  (0 < r < 1, e.g. ``int4_sym_token_clip0.9``, QuaRot's activation clipping)
  ``scale[m] = (max_k |x[m, k]| * r) / qmax``: the largest entries of a row
  saturate, the rest get a finer step (for rows without outliers, e.g. rotated).
* ``tensor`` (static): one scale ``[1, 1]`` fixed at compile time from
  calibration, ``scale = absmax / qmax`` where absmax is the largest |x| the
  linear's input reached over the calibration inputs.

qmax is 127 (int8) or 7 (int4); codes = ``clip(rint(x / scale), qmin, qmax)``
with (qmin, qmax) = (-127, 127) or (-8, 7), stored as int8 (int4 codes are not
packed: activations are transient). Arithmetic is float32 with IEEE division
and round-half-to-even, like the weight formats (integer.py), so a kernel
following these steps reproduces the codes bit for bit. A scale of 0 (an
all-zero row, absmax 0) becomes 1.0. Dequantize: ``codes * scale``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from .base import FormatError

_F32 = np.float32
_ACT_KEY_RE = re.compile(r"int(4|8)_sym_(token|tensor)(?:_clip(0?\.[0-9]+))?")
ACT_KEY_GRAMMAR = "int{4,8}_sym_{token,tensor}, int{4,8}_sym_token_clip<r> (0 < r < 1) or none"


@dataclass(frozen=True)
class ActFormat:
    """A symmetric integer activation format.

    bits: 8 or 4.  granularity: "token" (dynamic, per row) or "tensor" (static).
    clip: the fraction of each row's absmax that maps to qmax (per token only; 1.0: none).
    """

    bits: int
    granularity: str
    clip: float = 1.0

    def __post_init__(self) -> None:
        if self.bits not in (4, 8):
            raise FormatError(f"activation format bits must be 4 or 8, got {self.bits!r}")
        if self.granularity not in ("token", "tensor"):
            raise FormatError(f"activation granularity must be 'token' or 'tensor', got {self.granularity!r}")
        if not 0.0 < self.clip <= 1.0:
            raise FormatError(f"activation clip ratio must be in (0, 1], got {self.clip!r}")
        if self.clip != 1.0 and self.granularity != "token":
            raise FormatError("a clip ratio applies to per-token scales; a per-tensor scale comes from calibration")

    def key(self) -> str:
        return f"int{self.bits}_sym_{self.granularity}" + (f"_clip{self.clip:g}" if self.clip != 1.0 else "")

    @property
    def dynamic(self) -> bool:
        """Scales computed at run time (per token) rather than fixed at compile time."""
        return self.granularity == "token"

    def levels(self) -> tuple[int, int]:
        """(qmin, qmax) of the code: (-127, 127) for int8, (-8, 7) for int4."""
        return (-127, 127) if self.bits == 8 else (-8, 7)

    @property
    def qmax(self) -> int:
        return self.levels()[1]


ACT_FORMATS = {f.key(): f for f in (ActFormat(b, g) for b in (8, 4) for g in ("token", "tensor"))}


def list_act_formats() -> list[str]:
    return sorted(ACT_FORMATS)


def parse_act_format(spec: str) -> ActFormat | None:
    """The activation format with key `spec`, or None for "none" (float activations)."""
    if not isinstance(spec, str):
        raise FormatError(f"activation format must be a string key, got {type(spec).__name__}")
    key = spec.strip().lower()
    if key == "none":
        return None
    if key in ACT_FORMATS:
        return ACT_FORMATS[key]
    m = _ACT_KEY_RE.fullmatch(key)
    if m and m.group(3) is not None:
        fmt = ActFormat(int(m.group(1)), m.group(2), float(m.group(3)))
        if fmt.clip < 1.0:
            return fmt
    raise FormatError(f"unknown activation format {spec!r}: expected {ACT_KEY_GRAMMAR}; "
                      f"registered: {', '.join(list_act_formats())}, none")


def static_scale(absmax, fmt: ActFormat) -> np.ndarray:
    """The [1, 1] float32 per-tensor scale for calibrated absmax: absmax / qmax (0 -> 1)."""
    if fmt.dynamic:
        raise FormatError(f"{fmt.key()} is dynamic: its scales are computed at run time")
    a = _F32(absmax)
    if not np.isfinite(a) or a < 0:
        raise FormatError(f"{fmt.key()}: calibrated absmax must be finite and >= 0, got {absmax!r}")
    s = a / _F32(fmt.qmax)
    return np.full((1, 1), _F32(1.0) if s == 0 else s, _F32)


def quantize_act(x, fmt: ActFormat, scale=None) -> tuple[np.ndarray, np.ndarray]:
    """(codes int8 [M, K], scale float32 [M, 1] or [1, 1]) of a 2-D activation.

    Per token the scale comes from x; per tensor `scale` (from `static_scale`) is required.
    """
    x = np.asarray(x)
    if x.ndim != 2:
        raise FormatError(f"{fmt.key()}: expected a 2-D activation [M, K], got shape {x.shape}")
    x = x.astype(_F32)
    qmin, qmax = fmt.levels()
    if fmt.dynamic:
        if scale is not None:
            raise FormatError(f"{fmt.key()} computes its scales from x; do not pass one")
        s = np.max(np.abs(x), axis=1, keepdims=True) * _F32(fmt.clip) / _F32(qmax)  # * 1.0 is exact
        s = np.where(s == 0, _F32(1.0), s).astype(_F32)
    else:
        if scale is None:
            raise FormatError(f"{fmt.key()} is static: pass the calibrated scale (static_scale)")
        s = np.asarray(scale, _F32).reshape(1, 1)
    codes = np.clip(np.rint(x / s), qmin, qmax).astype(np.int8)
    return codes, s


def dequantize_act(codes, scale) -> np.ndarray:
    """float32 codes * scale."""
    return np.asarray(codes).astype(_F32) * np.asarray(scale, _F32)


def fake_quant_act(x, fmt: ActFormat | None, scale=None) -> np.ndarray:
    """What a quantized kernel sees of x: dequantize(quantize(x)); x itself for None (float)."""
    if fmt is None:
        return np.asarray(x, _F32)
    return dequantize_act(*quantize_act(x, fmt, scale))
