"""A compiled model: call it, save it, load it.  Imports neither torch nor MLIR."""

import os

import numpy as np

from qcc import artifact
from qcc.errors import QccError


class CompiledModel:
    """`m(*inputs)` runs the model; inputs are numpy arrays or torch tensors."""

    def __init__(self, manifest: dict, weights: dict, code: dict[str, bytes]):
        self.manifest = manifest
        self.weights = weights
        self.code = code
        self._runner = None
        self._entry = self._fixed = None
        self._state = None  # {state name: current value}, from the artifact's initial values

    # -- running ---------------------------------------------------------------
    @property
    def inputs(self) -> list[dict]:
        return self.manifest["inputs"]

    @property
    def outputs(self) -> list[dict]:
        """The values a call returns (the function's outputs less the states' new values)."""
        return [o for o in self.manifest["outputs"] if "state" not in o]

    # -- state -----------------------------------------------------------------
    # A model whose forward() updates registered buffers (a static KV cache, a step counter)
    # keeps them here: each call reads them and they take the values the call computed.
    @property
    def state(self) -> dict[str, np.ndarray]:
        """{buffer name: its current value} (empty for a pure function).  A state updated in
        place is the array the next call writes into: copy it to keep this value."""
        if self._state is None:
            self.reset_state()
        return dict(self._state)

    def reset_state(self) -> None:
        """Puts every state back to the value the model had when it was compiled (new arrays:
        a state updated in place is written into its array by each call)."""
        self._state = {s["name"]: self.weights[s["name"]].copy() for s in self.manifest.get("states", [])}

    @property
    def remarks(self) -> list[str]:
        """What the compiler chose not to do, and why (layers left float, rotations skipped):
        the quantization passes' remarks, kept in the artifact."""
        return self.manifest.get("remarks", [])

    def _check_inputs(self, arrays):
        """Checks inputs against the signature; returns them contiguous, and the values
        of the symbolic dimensions ({name: size})."""
        specs = self.inputs
        if len(arrays) != len(specs):
            raise QccError(f"model takes {len(specs)} input(s), got {len(arrays)}")
        checked, symbols = [], {}
        for i, (a, spec) in enumerate(zip(arrays, specs)):
            where = f"input {i} '{spec['name']}'"
            if not isinstance(a, np.ndarray):
                raise QccError(f"expected a numpy array or torch tensor, got {type(a).__name__}", where=where)
            want_shape = [d if isinstance(d, int) else None for d in spec["shape"]]
            if a.ndim != len(want_shape) or any(w is not None and w != s for w, s in zip(want_shape, a.shape)):
                raise QccError(f"expected shape {spec['shape']}, got {list(a.shape)}", where=where)
            for d, size in zip(spec["shape"], a.shape):
                if isinstance(d, str) and symbols.setdefault(d, size) != size:
                    raise QccError(f"dimension '{d}' is {symbols[d]} in an earlier input, {size} here", where=where)
                lo, hi = self.manifest.get("dims", {}).get(d, (None, None)) if isinstance(d, str) else (None, None)
                if (lo is not None and size < lo) or (hi is not None and size > hi):
                    raise QccError(f"dimension '{d}' is {size}, outside the sizes the model was exported for "
                                   f"({lo}..{'' if hi is None else hi})", where=where,
                                   hint="export it again with a torch.export.Dim range that holds this size")
            if a.dtype != np.dtype(spec["dtype"]):
                raise QccError(f"expected dtype {spec['dtype']}, got {a.dtype}", where=where,
                               hint=f"convert with .astype('{spec['dtype']}')")
            checked.append(np.require(a, requirements="C"))  # (ascontiguousarray makes 0-d arrays 1-d)
        return checked, symbols

    def run(self, *arrays: np.ndarray) -> list[np.ndarray]:
        """Runs on numpy arrays and returns numpy arrays."""
        arrays, symbols = self._check_inputs(list(arrays))
        runner = self._get_runner()
        if self._entry is None:  # per entry argument: ("param" | "state" | "input", name)
            self._entry = [next((k, a[k]) for k in ("param", "state", "input") if k in a)
                           for a in self.manifest["entry"]["args"]]
            self._fixed = frozenset(i for i, (k, _) in enumerate(self._entry) if k == "param")
        if self._state is None:
            self.reset_state()
        weights, user, state = self.weights, iter(arrays), self._state
        args = [weights[n] if k == "param" else state[n] if k == "state" else next(user) for k, n in self._entry]
        every = self.manifest["outputs"]
        outs = [state[o["state"]] if o.get("in_place") else  # the call updates the state's array
                np.empty([_dim(d, symbols) for d in o["shape"]], np.dtype(o["dtype"])) for o in every]
        runner.call(args, outs, fixed=self._fixed)  # (the parameters' descriptors are kept)
        for o, value in zip(every, outs):
            if "state" in o:
                state[o["state"]] = value
        return [value for o, value in zip(every, outs) if "state" not in o]

    def __call__(self, *inputs):
        if self.manifest["target"] == "cuda" and any(getattr(x, "is_cuda", False) for x in inputs):
            return self._get_runner()(*inputs)  # torch CUDA tensors in and out, on torch's stream
        torch_in = any(type(x).__module__.startswith("torch") for x in inputs)
        arrays = [x.detach().cpu().numpy() if type(x).__module__.startswith("torch") else x for x in inputs]
        outs = self.run(*arrays)
        if torch_in:
            import torch

            outs = [torch.from_numpy(o) for o in outs]
        return outs[0] if len(outs) == 1 else tuple(outs)

    def _get_runner(self):
        if self._runner is None:
            target = self.manifest["target"]
            if target == "cpu":
                from qcc.backends.cpu import host
                from qcc.backends.cpu.runtime import CpuLibrary

                host.check_can_run(self.manifest.get("cpu", {}))
                path = artifact.materialize(self.code["cpu.so"], ".so")
                try:
                    self._runner = CpuLibrary(path)
                finally:
                    os.unlink(path)  # the mapping stays valid after unlink
            elif target == "cuda":  # numpy + cuda-bindings; uploads the weights once
                from qcc.backends.cuda.model_runtime import CudaModel

                self._runner = CudaModel(self.manifest, self.weights, self.code)
            else:
                raise QccError(f"target '{target}' cannot run in this process")
        return self._runner

    # -- persistence -----------------------------------------------------------
    def save(self, path: str) -> None:
        from safetensors.numpy import save

        weights = save({n: np.require(self.weights[n], requirements="C") for n in sorted(self.weights)})
        artifact.write(path, self.manifest, weights, self.code)

    def weight_bytes(self) -> int:
        return sum(int(w.nbytes) for w in self.weights.values())


_SYMBOLIC = __import__("re").compile(r"[A-Za-z_][A-Za-z_0-9]*|\d+|[-+*()]|//|\s+")


def _dim(d, symbols: dict) -> int:
    """An output dimension: an int, a symbol bound by the inputs, or +-*// of those (`2*s0 + 1`)."""
    if isinstance(d, int):
        return d
    tokens = _SYMBOLIC.findall(d)
    if "".join(tokens) != d:
        raise QccError(f"cannot size output dimension '{d}'")
    expr = "".join(str(symbols[t]) if t in symbols else t for t in tokens if not t.isspace())
    if any(t[0].isalpha() or t[0] == "_" for t in _SYMBOLIC.findall(expr)):
        raise QccError(f"output dimension '{d}' depends on no input dimension")
    return int(eval(expr, {"__builtins__": {}}))  # noqa: S307 (digits and + - * // ( ) only)


def load(path: str) -> CompiledModel:
    manifest, weights, code = artifact.read(path)
    return CompiledModel(manifest, weights, code)
