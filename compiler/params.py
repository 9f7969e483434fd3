"""The parameter store: weights live here, by name, never in the IR.

Function arguments of the imported module carry `{qcc.param = "<name>"}`; a
pass that rewrites weights (quantize, pack, rotate, permute) reads entries and
writes new ones, and the artifact saves the store as safetensors.
"""

import hashlib
from collections import OrderedDict

import numpy as np


class ParamStore:
    def __init__(self, tensors: dict | None = None):
        self._tensors: "OrderedDict[str, np.ndarray]" = OrderedDict()
        for name, value in (tensors or {}).items():
            self[name] = value

    def __getitem__(self, name: str) -> np.ndarray:
        return self._tensors[name]

    def __setitem__(self, name: str, value: np.ndarray) -> None:
        self._tensors[name] = np.require(value, requirements="C")  # (ascontiguousarray makes 0-d arrays 1-d)

    def __contains__(self, name: str) -> bool:
        return name in self._tensors

    def __delitem__(self, name: str) -> None:
        del self._tensors[name]

    def names(self) -> list[str]:
        return list(self._tensors)

    def items(self):
        return self._tensors.items()

    def nbytes(self, names=None) -> int:
        names = self._tensors if names is None else names
        return sum(self._tensors[n].nbytes for n in names)

    def subset(self, names) -> "ParamStore":
        return ParamStore({n: self._tensors[n] for n in names})

    def save(self, path: str) -> str:
        """Writes safetensors (sorted names, so equal stores give equal bytes); returns sha256."""
        from safetensors.numpy import save_file

        save_file({n: self._tensors[n] for n in sorted(self._tensors)}, path)
        with open(path, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()

    @staticmethod
    def load(path: str) -> "ParamStore":
        from safetensors.numpy import load_file

        return ParamStore(load_file(path))
