"""Quantization recipes: a name the user types -> the passes that realize it.

`w{bits}a16[-g{G}]` quantizes every linear layer's weight (activations stay
float): `w8a16` is int8 symmetric per channel, `w4a16-g128` int4 asymmetric in
groups of 128 along K.  `float` compiles the model unquantized.
"""

import dataclasses
import re

from qcc.errors import QccError

_WEIGHT_ONLY = re.compile(r"w(8|4)a16(?:-g([1-9][0-9]*))?(-sym|-asym)?")


@dataclasses.dataclass(frozen=True)
class Recipe:
    name: str
    weight_format: str | None  # a qcc.dialects.formats key, None for float
    passes: tuple[str, ...]

    def to_json(self) -> dict:
        return {"name": self.name, "weight_format": self.weight_format, "passes": list(self.passes)}


PRESETS = ("float", "w8a16", "w4a16-g128")


def get_recipe(name: str) -> Recipe:
    if name in (None, "", "float", "none"):
        return Recipe("float", None, ())
    m = _WEIGHT_ONLY.fullmatch(name)
    if not m:
        raise QccError(f"unknown quantization recipe '{name}'", where="--quant",
                       hint=f"choose one of {', '.join(PRESETS)} (or w8a16-g<G>, w4a16-g<G>[-sym])")
    bits, group, sym = m.group(1), m.group(2), m.group(3)
    symmetric = sym == "-sym" if sym else bits == "8"
    gran = f"g{group}" if group else "channel"
    fmt = f"int{bits}_{'sym' if symmetric else 'asym'}_{gran}"
    return Recipe(name, fmt, (f"quantize-weights{{format={fmt}}}",))
