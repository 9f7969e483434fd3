"""Quantization formats registry and reference numerics.

Registered formats: int8 / int4, symmetric / asymmetric, at granularity
tensor, channel, or groups of 32, 64, 128 along K. Names are the canonical
keys of `Format.key()`, e.g. ``int4_asym_g128``. Layout and numerics are
documented in `base.py` (shapes) and `integer.py` (math and packing).
"""

from __future__ import annotations

from itertools import product

from .base import KEY_GRAMMAR, Format, FormatError, QuantizedTensor
from .integer import dequantize, fake_quant, grid, pack, quantize, unpack

__all__ = [
    "Format",
    "FormatError",
    "QuantizedTensor",
    "get_format",
    "list_formats",
    "parse_weight_format",
    "quantize",
    "dequantize",
    "fake_quant",
    "pack",
    "unpack",
    "grid",
]

_GROUP_SIZES = (32, 64, 128)


def _build_registry() -> dict[str, Format]:
    grans = [("tensor", None), ("channel", None)] + [("group", g) for g in _GROUP_SIZES]
    fmts = (
        Format(f"int{bits}", bits, sym, gran, g)
        for bits, sym, (gran, g) in product((8, 4), (True, False), grans)
    )
    return {f.key(): f for f in sorted(fmts, key=Format.key)}


_REGISTRY = _build_registry()


def list_formats() -> list[str]:
    """Sorted keys of all registered formats."""
    return list(_REGISTRY)


def get_format(name: str) -> Format:
    """The registered format with key `name` (exact match)."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise FormatError(
            f"unknown weight format {name!r}; allowed: {', '.join(_REGISTRY)}"
        ) from None


def parse_weight_format(spec: str | Format) -> Format:
    """Resolve user input (CLI flag, config value) to a `Format`.

    Accepts a `Format`, or a key in any letter case with surrounding spaces.
    Registered keys return the registry instance; other well-formed keys
    (e.g. ``int4_sym_g256``) are accepted too, so new group sizes need no
    registry change.
    """
    if isinstance(spec, Format):
        return spec
    if not isinstance(spec, str):
        raise FormatError(f"weight format must be a string key or Format, got {type(spec).__name__}")
    key = spec.strip().lower()
    if key in _REGISTRY:
        return _REGISTRY[key]
    try:
        return Format.from_key(key)
    except FormatError:
        raise FormatError(
            f"unknown weight format {spec!r}: expected {KEY_GRAMMAR}; "
            f"registered: {', '.join(_REGISTRY)}"
        ) from None
