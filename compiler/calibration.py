"""Calibration: statistics of every linear layer's input, from running the float model.

`linear_input_stats(ep, batches)` runs the ExportedProgram in the form qcc
imports it (frontend.canonical_program: its aten.mm(x, aten.permute(W, [1, 0]))
nodes are the IR's linear layers), in a torch.fx Interpreter and returns, per weight name W,
statistics of the rows of x (`LinearStats`).

Passes reach it through `session_stats(session, ...)`, which caches results per
session.  Passes that change the function before quantization (rotations,
permutations, scalings, online transforms, split layers) describe the change in
the session's `ModelView`, so that statistics gathered afterwards are those of
the rewritten function, not of the original model:

* `view.set_param(name, value)`: a new parameter value (also written to the store);
* `view.add_input_transform(weight, fn)`: the IR now applies fn to that linear's input;
* `view.add_output_bias(weight, u)`: the IR now adds the vector u to that linear's output;
* `view.add_scaled_transform(scale, fn)`: the IR now applies fn to the product by the
  per-channel parameter `scale` (directly, or plus a constant: Gemma's `x * (1 + w)`);
* `view.add_derived(new_weight, parent_weight, columns, width=None)`: a new linear reads
  columns `columns` of `parent_weight`'s (transformed) input (with `width`: all columns,
  the others zeroed).
"""

import dataclasses
import hashlib

import numpy as np

from qcc.errors import QccError

KINDS = ("absmax", "tensor_absmax", "mean_abs", "hessian", "samples")


@dataclasses.dataclass
class LinearStats:
    """Statistics of the input rows x[r, :] (K columns) of one linear layer."""

    rows: int
    absmax: np.ndarray | None = None      # [K] max_r |x[r, k]|
    tensor_absmax: float | None = None    # max |x|
    mean_abs: np.ndarray | None = None    # [K] mean_r |x[r, k]|
    hessian: np.ndarray | None = None     # [K, K] float64, X^T X / rows
    samples: np.ndarray | None = None     # [S, K] float32, rows drawn without replacement

    def select(self, columns: np.ndarray, width: int | None = None) -> "LinearStats":
        """The statistics of x[:, columns]; with `width`, of a [rows, width] input holding those
        columns at the same positions and zeros elsewhere (x with the other columns masked)."""
        def pick(a):
            if a is None or width is None:
                return None if a is None else a[..., columns]
            out = np.zeros(a.shape[:-1] + (width,), a.dtype)
            out[..., columns] = a[..., columns]
            return out

        hessian = None
        if self.hessian is not None:
            hessian = self.hessian[np.ix_(columns, columns)]
            if width is not None:
                hessian = np.zeros((width, width))
                hessian[np.ix_(columns, columns)] = self.hessian[np.ix_(columns, columns)]
        return LinearStats(
            rows=self.rows, absmax=pick(self.absmax),
            tensor_absmax=None if self.absmax is None else float(np.max(self.absmax[columns], initial=0.0)),
            mean_abs=pick(self.mean_abs), hessian=hessian, samples=pick(self.samples))


class _Accumulator:
    def __init__(self, want, k):
        self.want, self.rows = want, 0
        self.absmax = np.zeros(k, np.float64)
        self.sum_abs = np.zeros(k, np.float64)
        self.xtx = np.zeros((k, k), np.float64) if "hessian" in want else None
        self.chunks = [] if "samples" in want else None

    def add(self, x: np.ndarray):
        ax = np.abs(x)
        self.rows += x.shape[0]
        np.maximum(self.absmax, ax.max(axis=0, initial=0.0), out=self.absmax)
        self.sum_abs += ax.sum(axis=0, dtype=np.float64)
        if self.xtx is not None:
            x64 = x.astype(np.float64)
            self.xtx += x64.T @ x64
        if self.chunks is not None:
            self.chunks.append(x.astype(np.float32))

    def finish(self, sample_rows: int, rng) -> LinearStats:
        st = LinearStats(rows=self.rows)
        if "absmax" in self.want or "tensor_absmax" in self.want:
            st.absmax = self.absmax
            st.tensor_absmax = float(self.absmax.max(initial=0.0))
        if "mean_abs" in self.want:
            st.mean_abs = self.sum_abs / max(self.rows, 1)
        if self.xtx is not None:
            st.hessian = self.xtx / max(self.rows, 1)
        if self.chunks is not None:
            allrows = np.concatenate(self.chunks) if self.chunks else np.zeros((0, len(self.absmax)), np.float32)
            if sample_rows and len(allrows) > sample_rows:
                allrows = allrows[np.sort(rng.choice(len(allrows), sample_rows, replace=False))]
            st.samples = allrows
        return st


def decomposed(ep):
    """`ep` as frontend.import_program imports it (`canonical_program`), so its nodes and
    parameter values match the IR's."""
    from qcc.frontend import canonical_program

    return canonical_program(ep)[0]


def _linear_weight(node, param_of):
    """The parameter name W if `node` is aten.mm(x, permute(W, [1, 0])) (or aten.t(W))."""
    import torch

    if node.op != "call_function" or node.target != torch.ops.aten.mm.default:
        return None
    wt = node.args[1]
    if getattr(wt, "op", None) != "call_function":
        return None
    if wt.target == torch.ops.aten.permute.default and list(wt.args[1]) == [1, 0]:
        src = wt.args[0]
    elif wt.target == torch.ops.aten.t.default:
        src = wt.args[0]
    else:
        return None
    return param_of.get(getattr(src, "name", None))


def expert_key(weight: str, expert: int) -> str:
    """The statistics key of the rows routed to expert `expert` of a mixture of experts' weight."""
    return f"{weight}#{expert}"


def _expert_gather(node, param_of):
    """(W's name, the ids node) if `node` is bmm(W[ids], x) with W a 3-D parameter and x
    [S, K, 1]: transformers' gathered experts as the frontend leaves them."""
    import torch

    if node.op != "call_function" or node.target != torch.ops.aten.bmm.default:
        return None
    gather, x = node.args
    if getattr(gather, "target", None) != torch.ops.aten.index.Tensor or len(gather.args[1]) != 1:
        return None
    name = param_of.get(getattr(gather.args[0], "name", None))
    shape = getattr(x, "meta", {}).get("val")
    if name is None or shape is None or shape.dim() != 3 or shape.shape[2] != 1:
        return None
    return name, gather.args[1][0]


def linear_input_stats(ep, calibration_batches, want=("absmax", "mean_abs"), *, params=None,
                       input_transforms=None, output_biases=None, scaled_transforms=None, sample_rows: int = 256, seed: int = 0,
                       progress: bool = False, already_decomposed: bool = False) -> dict[str, LinearStats]:
    """{weight name: LinearStats of that linear's input} over all calibration batches.

    params: {state name: array} overriding the program's values; input_transforms:
    {weight name: [fn(x: np.ndarray [M, K]) -> np.ndarray]} applied, in order, to
    the linear's input before it is measured and multiplied; output_biases: {weight name:
    vector} added to the linear's output; scaled_transforms: {parameter name: [fn]} applied to the
    product by that parameter (see `ModelView.add_scaled_transform`).
    """
    import torch
    import torch.fx

    unknown = set(want) - set(KINDS)
    if unknown:
        raise ValueError(f"unknown statistics {sorted(unknown)}; choose from {KINDS}")
    params = params or {}
    input_transforms = input_transforms or {}
    output_biases = {name: torch.from_numpy(np.asarray(u, np.float64)) for name, u in (output_biases or {}).items()}
    dep = ep if already_decomposed else decomposed(ep)
    specs = dep.graph_signature.input_specs
    placeholders = [n for n in dep.graph.nodes if n.op == "placeholder"]
    state = {**dep.state_dict, **getattr(dep, "constants", {})}
    param_of, fixed = {}, []
    for node, spec in zip(placeholders, specs):
        if spec.kind.name == "USER_INPUT":
            fixed.append(None)
            continue
        param_of[node.name] = spec.target
        value = params.get(spec.target)
        fixed.append(torch.from_numpy(np.require(value, requirements="C")) if value is not None
                     else state[spec.target].detach())
    n_user = sum(v is None for v in fixed)
    user_shapes = [node.meta["val"].shape for node, v in zip(placeholders, fixed)
                   if v is None and isinstance(node.meta.get("val"), torch.Tensor)]
    accs: dict[str, _Accumulator] = {}

    class _Probe(torch.fx.Interpreter):
        ids_of = {}  # gather node -> its ids (the interpreter frees them after the gather)

        def run_node(self, node):
            if node in gathers:
                self.ids_of[node] = self.env[node.args[1][0]].detach().numpy()
            expert = _expert_gather(node, param_of)
            if expert is not None:  # each expert's rows, keyed by expert_key
                name, _ = expert
                if name in input_transforms:  # the experts' online Hadamard: x H against W H
                    args, _ = self.fetch_args_kwargs_from_env(node)
                    x = args[1].detach().double().numpy()[:, :, 0]
                    for fn in input_transforms[name]:
                        x = fn(x)
                    result = torch.bmm(args[0], torch.from_numpy(np.ascontiguousarray(x)).to(args[1].dtype)[:, :, None])
                else:
                    result = super().run_node(node)
                    x = self.env[node.args[1]].detach().double().numpy()[:, :, 0]
                experts = node.args[0].args[0].meta["val"].shape[0]
                ids = self.ids_of[node.args[0]] % experts  # negative ids count from the end
                for e in np.unique(ids):
                    key = expert_key(name, int(e))
                    if key not in accs:
                        accs[key] = _Accumulator(want, x.shape[1])
                    accs[key].add(x[ids == e])
                return result
            if node in after:
                result = super().run_node(node)
                x = result.detach().double().numpy()
                for fn in after[node]:
                    x = fn(x)
                return torch.from_numpy(np.ascontiguousarray(x)).to(result.dtype)
            w_name = _linear_weight(node, param_of)
            if w_name is None:
                return super().run_node(node)
            args, kwargs = self.fetch_args_kwargs_from_env(node)
            x = args[0].detach().double().numpy()
            for fn in input_transforms.get(w_name, ()):
                x = fn(x)
            if w_name not in accs:
                accs[w_name] = _Accumulator(want, x.shape[1])
            accs[w_name].add(x)
            y = torch.mm(torch.from_numpy(np.ascontiguousarray(x)).to(args[0].dtype), args[1])
            return y + output_biases[w_name].to(y.dtype) if w_name in output_biases else y

    gathers = {n.args[0] for n in dep.graph.nodes if _expert_gather(n, param_of) is not None}
    after = _scaled_nodes(dep.graph, param_of, scaled_transforms or {})
    interp = _Probe(dep.graph_module)
    batches = list(calibration_batches)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(batches), desc="qcc: calibration", unit="batch", leave=False)
    with torch.no_grad():
        for i, batch in enumerate(batches):
            batch = tuple(batch)
            if len(batch) != n_user:
                raise QccError(f"calibration sample {i} has {len(batch)} inputs, the model takes {n_user}")
            it = iter(batch)
            args = [next(it) if v is None else v for v in fixed]
            try:
                interp.run(*args)
            except Exception as e:  # the program is shape-specialized: say which sample and why
                _check_shapes(i, batch, user_shapes, e)
                raise QccError(f"running the model on calibration sample {i} failed: {_first_line(e)}")
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    rng = np.random.default_rng(seed)
    return {name: acc.finish(sample_rows, rng) for name, acc in sorted(accs.items())}


def _scaled_nodes(graph, param_of, transforms) -> dict:
    """{mul node: [fn]}: the products by each parameter of `transforms` (or by it plus a number)."""
    if not transforms:
        return {}

    import torch

    adds = (torch.ops.aten.add.Tensor, torch.ops.aten.add.Scalar)

    def scale_param(arg):
        if getattr(arg, "op", None) == "call_function" and arg.target in adds \
                and any(isinstance(a, (int, float)) for a in arg.args):
            arg = next((a for a in arg.args if hasattr(a, "op")), None)
        return param_of.get(arg.name) if getattr(arg, "op", None) == "placeholder" else None

    found = {}
    for node in graph.nodes:
        if node.op == "call_function" and node.target == torch.ops.aten.mul.Tensor:
            for arg in node.args:
                name = scale_param(arg)
                if name in transforms:
                    found[node] = transforms[name]
    missing = set(transforms) - {scale_param(a) for n in found for a in n.args}
    if missing:
        raise QccError(f"calibration: no product by {sorted(missing)} in the exported program")
    return found


def _first_line(e) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:300]


def _check_shapes(i, batch, shapes, error) -> None:
    """After sample i failed in the program: a clear error if its tensors' static dims differ
    from the export's (the program is shape-specialized; a model without shape-dependent code
    runs other batch sizes, so the shapes are not checked up front)."""
    for j, (x, shape) in enumerate(zip(batch, shapes)):
        got = list(getattr(x, "shape", ()))
        if len(got) != len(shape) or any(isinstance(d, int) and d != g for d, g in zip(shape, got)):
            want = [d if isinstance(d, int) else str(d) for d in shape]
            raise QccError(f"calibration sample {i}, input {j} has shape {got}; the model was exported for {want} "
                           f"({_first_line(error)})", hint="give the calibration samples the example inputs' "
                           "shapes, or compile with dynamic_shapes naming the dims that vary")


@dataclasses.dataclass
class ModelView:
    """How the function being compiled differs from the ExportedProgram (see module docstring)."""

    params: dict = dataclasses.field(default_factory=dict)
    transforms: dict = dataclasses.field(default_factory=dict)
    derived: dict = dataclasses.field(default_factory=dict)
    output_biases: dict = dataclasses.field(default_factory=dict)
    scaled_transforms: dict = dataclasses.field(default_factory=dict)
    version: int = 0

    def set_param(self, session, name: str, value: np.ndarray) -> None:
        value = np.ascontiguousarray(value, dtype=np.float32)
        session.params[name] = value
        self.params[name] = value
        self.version += 1

    def add_input_transform(self, weight: str, fn) -> None:
        self.transforms.setdefault(weight, []).append(fn)
        self.version += 1

    def add_output_bias(self, weight: str, u: np.ndarray) -> None:
        self.output_biases[weight] = self.output_biases.get(weight, 0.0) + np.asarray(u, np.float64)
        self.version += 1

    def add_scaled_transform(self, scale: str, fn) -> None:
        self.scaled_transforms.setdefault(scale, []).append(fn)
        self.version += 1

    def add_derived(self, new_weight: str, parent_weight: str, columns, width: int | None = None) -> None:
        """`new_weight`'s linear reads columns `columns` of the parent's input; with `width`, it reads
        all `width` columns with the others zeroed (a masked input)."""
        self.derived[new_weight] = (parent_weight, np.asarray(columns, np.int64), width)
        self.version += 1


def view(session) -> ModelView:
    """The session's ModelView (created empty on first use)."""
    return session.options.setdefault("qcc.calibration.view", ModelView())


def save_stats(stats: dict, path: str) -> None:
    """Writes statistics as safetensors: '<weight>/<kind>' arrays and '<weight>/rows'."""
    from safetensors.numpy import save_file

    out = {}
    for name, st in stats.items():
        out[f"{name}/rows"] = np.array([st.rows], np.int64)
        for kind in ("absmax", "mean_abs", "hessian", "samples"):
            value = getattr(st, kind)
            if value is not None:
                out[f"{name}/{kind}"] = np.ascontiguousarray(value, np.float64 if kind == "hessian" else np.float32)
    save_file(out, path)


def load_stats(path: str, want=()) -> dict[str, LinearStats]:
    """Statistics written by `save_stats` (or by hand, e.g. in tests); QccError if a wanted kind is missing."""
    import os

    from safetensors.numpy import load_file

    if not os.path.isfile(path):
        raise QccError("calibration statistics file not found", where=path)
    try:
        raw = load_file(path)
    except Exception as e:  # safetensors raises its own error types for malformed files
        raise QccError(f"cannot read calibration statistics: {e}", where=path)
    stats = {}
    for key, value in raw.items():
        name, _, kind = key.rpartition("/")
        if kind not in ("rows", "absmax", "mean_abs", "hessian", "samples"):
            raise QccError(f"unknown statistic '{key}' (expected <weight>/rows|absmax|mean_abs|hessian|samples)",
                           where=path)
        st = stats.setdefault(name, LinearStats(rows=0))
        if kind == "rows":
            st.rows = int(value.reshape(-1)[0])
        else:
            setattr(st, kind, value.astype(np.float64))
    for name, st in stats.items():
        if st.absmax is not None:
            st.tensor_absmax = float(st.absmax.max(initial=0.0))
        for kind in want:
            key = "absmax" if kind == "tensor_absmax" else kind
            if getattr(st, key) is None:
                raise QccError(f"statistics of '{name}' lack '{key}'", where=path)
    return stats


def session_stats(session, want=("absmax", "mean_abs"), sample_rows: int = 256,
                  stats_file: str = "") -> dict[str, LinearStats]:
    """`linear_input_stats` for the function as rewritten so far, cached per session.

    stats_file: precomputed statistics (`save_stats`) to use instead of running the model.
    Raises QccError when the session has no calibration data or program.
    """
    if stats_file:
        return load_stats(stats_file, want)
    batches = session.options.get("calibration")
    ep = session.options.get("exported_program")
    if not batches or ep is None:
        raise QccError("this pass needs calibration data",
                       hint="qcc.compile(..., calibration=[inputs, ...]), `qcc compile --calib FILE`, "
                            "or the pass option stats=FILE")
    v = view(session)
    want = tuple(sorted(set(want)))
    key = (v.version, want, sample_rows, _batches_key(batches))
    cache = session.options.setdefault("qcc.calibration.cache", {})
    if key not in cache:
        if "qcc.calibration.decomposed" not in session.options:
            session.options["qcc.calibration.decomposed"] = decomposed(ep)
        stats = linear_input_stats(session.options["qcc.calibration.decomposed"], batches, want,
                                   params=v.params, input_transforms=v.transforms,
                                   output_biases=v.output_biases, scaled_transforms=v.scaled_transforms,
                                   sample_rows=sample_rows,
                                   progress=bool(session.options.get("progress")), already_decomposed=True)
        for new, (parent, cols, width) in v.derived.items():  # a mixture of experts' per expert too
            for key in [k for k in stats if k == parent or k.startswith(f"{parent}#")]:
                stats[new + key[len(parent):]] = stats[key].select(cols, width)
        cache.clear()
        cache[key] = stats
    return cache[key]


def _batches_key(batches) -> str:
    h = hashlib.sha1()
    for batch in batches:
        for t in batch:
            h.update(str(tuple(t.shape)).encode())
            h.update(t.detach().contiguous().numpy().tobytes())
    return h.hexdigest()
