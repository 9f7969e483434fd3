"""Frontend: a PyTorch program in, a `torch`-dialect module plus a parameter store out.

torch.export gives an ExportedProgram whose parameters, buffers and lifted
constants are graph placeholders.  We import the graph *stateless* (torch-mlir's
FX importer), so every parameter stays a function argument tagged
`{qcc.param = "<state name>"}` and its value goes to the ParamStore: the IR
holds names and shapes, never weights.
"""

import dataclasses
import functools
import logging
import operator
import os
import re
import zipfile

import numpy as np
import torch

from qcc.errors import QccError
from qcc.params import ParamStore

_TORCH_TO_NP = {
    torch.float32: np.float32, torch.float64: np.float64, torch.float16: np.float16,
    torch.int64: np.int64, torch.int32: np.int32, torch.int8: np.int8, torch.uint8: np.uint8,
    torch.bool: np.bool_,
}


@dataclasses.dataclass
class TensorSpec:
    name: str
    shape: list  # ints, or strings for symbolic dims
    dtype: str   # numpy dtype name
    state: str | None = None  # an output: the new value of this state (a buffer forward() updates)

    def to_json(self):
        d = dataclasses.asdict(self)
        if self.state is None:
            del d["state"]
        return d


@dataclasses.dataclass
class ImportedProgram:
    module: "object"            # ir.Module in the torch backend dialect
    params: ParamStore
    inputs: list                # [TensorSpec] user inputs, in call order
    outputs: list               # [TensorSpec]
    dims: dict = dataclasses.field(default_factory=dict)  # symbol -> [min, max or None]: export's ranges
    program: "object" = None    # the canonical ExportedProgram the module was imported from
    transposed: frozenset = frozenset()  # state names stored transposed (a [K, N] `x @ W` weight)
    # buffers forward() updates (a KV cache kept in the model): [TensorSpec], and initial values
    states: list = dataclasses.field(default_factory=list)
    state_values: dict = dataclasses.field(default_factory=dict)
    # 2-D convolutions made linear layers: weight name -> [O, C, kh, kw], stored [O, kh * kw * C]
    convs: dict = dataclasses.field(default_factory=dict)


def load_program(path: str, allow_pickle: bool = False, example_inputs=None):
    """Reads a `.pt2` ExportedProgram; a pickled module only with allow_pickle."""
    if not os.path.isfile(path):
        raise QccError("no such model file", where=path, hint="give a .pt2 file written by torch.export.save")
    if not zipfile.is_zipfile(path):
        raise QccError("not a PyTorch export archive (not a zip file)", where=path,
                       hint="write the model with torch.export.save(torch.export.export(model, inputs), path)")
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
    if any(n.endswith("data.pkl") for n in names) and not any("serialized_exported_program" in n or "/models/" in n for n in names):
        if not allow_pickle:
            raise QccError("file is a pickled torch.save() checkpoint; unpickling runs arbitrary code", where=path,
                           hint="pass --allow-pickle if you trust it, or export with torch.export.save")
        return _load_pickled_module(path, example_inputs)
    missing = _register_custom_ops(path)
    # torch.export.load logs a traceback before trying its legacy format; our
    # error below says what matters
    logger = logging.getLogger("torch.export")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        return torch.export.load(path)
    except Exception as e:  # the archive is malformed in one of many ways
        if missing:
            raise QccError(f"the program calls custom ops of {', '.join(sorted(missing))}, which no loaded package "
                           "registers", where=path, hint="load it from Python after importing the package that "
                           "defines them (qcc.compile(torch.export.load(path), ...)), or export without them")
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise QccError(f"malformed .pt2 archive: {first[:200]}", where=path,
                       hint="re-create it with torch.export.save")
    finally:
        logger.setLevel(level)


# custom-op namespaces a .pt2 may call, and the module whose import registers them
_OP_PROVIDERS = {"transformers": "transformers.integrations.moe"}  # MoE experts' grouped_mm_fallback
_BUILTIN_NAMESPACES = {"aten", "prims", "higher_order", "_c10d_functional", "c10d_functional", "_ops"}


def _register_custom_ops(path) -> set:
    """Imports the providers of the custom ops the archive's graphs call (torch.export.load needs
    them registered); returns the namespaces no known provider registers."""
    import importlib

    with zipfile.ZipFile(path) as z:
        text = " ".join(z.read(n).decode(errors="ignore") for n in z.namelist()
                        if n.endswith(".json") and "/models/" in n)
    missing = set()
    for ns in set(re.findall(r"torch\.ops\.([A-Za-z_]\w*)\.", text)) - _BUILTIN_NAMESPACES:
        try:
            importlib.import_module(_OP_PROVIDERS[ns])
        except (KeyError, ImportError):
            missing.add(ns)
    return missing


def _load_pickled_module(path, example_inputs):
    try:
        obj = torch.load(path, weights_only=False)
    except Exception as e:
        raise QccError(f"cannot unpickle the model: {type(e).__name__}: {e}", where=path,
                       hint="the classes it pickled must be importable (set PYTHONPATH)")
    if isinstance(obj, torch.export.ExportedProgram):
        return obj
    if not isinstance(obj, torch.nn.Module):
        raise QccError(f"pickled object is a {type(obj).__name__}, not an nn.Module", where=path)
    if example_inputs is None:
        raise QccError("a pickled module needs example inputs to be exported", where=path,
                       hint="pass --example-inputs inputs.npz")
    return export_module(obj.eval(), example_inputs)


def export_module(module: torch.nn.Module, example_inputs, dynamic_shapes=None):
    try:
        return torch.export.export(module, tuple(example_inputs), dynamic_shapes=dynamic_shapes)
    except Exception as e:
        first = str(e).strip().splitlines()[0]
        raise QccError(f"torch.export failed: {first[:300]}", hint="the model must be exportable by torch.export")


def _spec_from_meta(name, val) -> TensorSpec:
    shape = [int(d) if isinstance(d, int) or str(d).isdigit() else str(d) for d in val.shape]
    if val.dtype not in _TORCH_TO_NP:
        raise QccError(f"input or output '{name}' has dtype {str(val.dtype).replace('torch.', '')}, which a "
                       f"qcc artifact cannot take or return (its runtime speaks numpy dtypes)",
                       hint=f"pass it as one of {', '.join(sorted(str(d).replace('torch.', '') for d in _TORCH_TO_NP))}"
                            " and convert inside the model")
    return TensorSpec(name, shape, np.dtype(_TORCH_TO_NP[val.dtype]).name)


def _simplify_expands(graph) -> None:
    """Drop `aten.expand` nodes whose result has their input's shape, and write -1 ("keep this
    size") for each run-time size an expand keeps (symbolically equal to its input's).

    torch.export writes matmul's batch broadcasting (and repeat_kv) as expands. With static
    shapes torch-mlir sees which sizes stay; a run-time size (a KV cache of any length) it
    must lower as a gather that reads index 0 if the size turns out to be 1, a copy that
    keeps the backends from reading the tensor in place (the CPU's attention kernels)."""
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not torch.ops.aten.expand.default:
            continue
        src, out = node.args[0].meta.get("val"), node.meta.get("val")
        if not isinstance(src, torch.Tensor) or not isinstance(out, torch.Tensor):
            continue
        lead = out.dim() - src.dim()  # expand may add leading dims
        kept = [i >= lead and str(src.shape[i - lead]) == str(out.shape[i]) for i in range(out.dim())]
        if lead == 0 and all(kept):
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
            continue
        sizes = list(node.args[1])
        dynamic = [k and not isinstance(out.shape[i], int) for i, k in enumerate(kept)]
        if any(dynamic):
            node.args = (node.args[0], [-1 if d else size for size, d in zip(sizes, dynamic)], *node.args[2:])


def _relayout_state(ep, spec, node, relayout) -> None:
    """Stores state tensor `spec.target` as relayout(value) and gives its placeholder `node`
    the new layout's meta value (what the importer types the argument by)."""
    from torch.fx.passes.shape_prop import _extract_tensor_metadata

    store = ep.constants if spec.kind.name == "CONSTANT_TENSOR" else ep.state_dict
    value = store[spec.target]
    new = relayout(value.detach())
    store[spec.target] = torch.nn.Parameter(new, requires_grad=False) if isinstance(value, torch.nn.Parameter) \
        else new
    node.meta["val"] = relayout(node.meta["val"])
    node.meta["tensor_meta"] = _extract_tensor_metadata(node.meta["val"])


def _linear_weights_as_nk(ep) -> frozenset:
    """Store every 2-D state tensor W that is the right operand of `aten.mm(x, W)` transposed, as
    W' = W^T, and read it through `aten.permute(W', [1, 0])`; returns the names so stored.

    `x @ W` with W [K, N] (GPT-2's Conv1D, hand-written projections) then has nn.Linear's form
    `mm(x, permute(W', [1, 0]))` with W' [N, K], the one form the quantization passes, the
    calibration and the backends take as a linear layer: such layers are quantized like any
    other instead of staying float.  Every other reader of W reads the same permute, so the
    function is unchanged."""
    from torch.fx.passes.shape_prop import _extract_tensor_metadata

    specs = {n.name: s for n, s in zip((n for n in ep.graph.nodes if n.op == "placeholder"),
                                       ep.graph_signature.input_specs)}
    state_kinds = ("PARAMETER", "BUFFER", "CONSTANT_TENSOR")
    updated = set(ep.graph_signature.buffers_to_mutate.values())  # state: kept in the model's layout
    weights = []
    for node in ep.graph.nodes:
        if node.op == "call_function" and node.target is torch.ops.aten.mm.default:
            w = node.args[1]
            spec = specs.get(getattr(w, "name", None)) if getattr(w, "op", None) == "placeholder" else None
            if spec is not None and spec.kind.name in state_kinds and spec.target not in updated \
                    and w not in weights and isinstance(w.meta.get("val"), torch.Tensor) and w.meta["val"].dim() == 2:
                weights.append(w)
    if not weights:
        return frozenset()
    first_op = next(n for n in ep.graph.nodes if n.op != "placeholder")
    names = []
    for w in weights:
        target = specs[w.name].target
        kn = w.meta["val"]
        _relayout_state(ep, specs[w.name], w, lambda t: t.t().contiguous())
        with ep.graph.inserting_before(first_op):
            read = ep.graph.call_function(torch.ops.aten.permute.default, (w, [1, 0]))
        read.meta["val"] = kn
        read.meta["tensor_meta"] = _extract_tensor_metadata(kn)
        w.replace_all_uses_with(read, delete_user_cb=lambda user: user is not read)
        names.append(target)
    ep.graph_module.recompile()
    return frozenset(names)


def _placeholder_specs(ep) -> dict:
    """{placeholder name: its input spec}."""
    return {n.name: s for n, s in zip((n for n in ep.graph.nodes if n.op == "placeholder"),
                                      ep.graph_signature.input_specs)}


def _weights_3d(ep, specs):
    """weight(node): `node` if it is a 3-D state tensor forward() does not update (a
    mixture of experts' weights), else None."""
    updated = set(ep.graph_signature.buffers_to_mutate.values())

    def weight(node):
        spec = specs.get(node.name) if getattr(node, "op", None) == "placeholder" else None
        val = node.meta.get("val") if spec is not None else None
        ok = spec is not None and spec.kind.name in ("PARAMETER", "BUFFER", "CONSTANT_TENSOR") \
            and spec.target not in updated and isinstance(val, torch.Tensor) and val.dim() == 3
        return node if ok else None

    return weight


def _experts_as_nk(ep) -> frozenset:
    """Store a mixture of experts' 3-D weight kept as [E, K, N] (transformers' `is_transposed`
    experts, gpt-oss's) as [E, N, K], so that its products take the one form qcc quantizes
    along K and runs on its gathered kernels: `bmm(W'[ids], x [S, K, 1])`.  Two forms read it so:
    `bmm(a [S, 1, K], W[ids])` (batched_mm experts; becomes `permute(bmm(W'[ids], permute(a)))`)
    and `bmm(permute(W, [0, 2, 1])[ids], x)` (what `_grouped_mm_as_gathers` makes of grouped_mm
    experts; `_fold_inverse_permutes` then leaves `W'[ids]`).  Every other reader of W reads
    `permute(W', [0, 2, 1])`, so the function is unchanged.  Returns the names so stored."""
    from torch.fx.passes.shape_prop import _extract_tensor_metadata

    aten = torch.ops.aten
    specs = _placeholder_specs(ep)
    weight = _weights_3d(ep, specs)

    def gathered(node):
        """(W's node, ids) when `node` is W[ids] along dim 0 with 1-D ids."""
        if getattr(node, "target", None) is not aten.index.Tensor or len(node.args[1]) != 1 \
                or node.args[1][0] is None or node.args[1][0].meta["val"].dim() != 1:
            return None
        return node.args[0], node.args[1][0]

    stored_kn, row_products = set(), []
    for node in ep.graph.nodes:
        if node.op != "call_function" or node.target is not aten.bmm.default:
            continue
        a, b = node.args
        left, right = gathered(a), gathered(b)
        if left is not None and getattr(left[0], "target", None) is aten.permute.default \
                and list(left[0].args[1]) == [0, 2, 1] and weight(left[0].args[0]) is not None:
            stored_kn.add(left[0].args[0])
        elif right is not None and weight(right[0]) is not None and a.meta["val"].shape[1] == 1:
            stored_kn.add(right[0])
            row_products.append((node, a, right[1]))
    if not stored_kn:
        return frozenset()
    first_op = next(n for n in ep.graph.nodes if n.op != "placeholder")
    for w in stored_kn:
        kn = w.meta["val"]
        _relayout_state(ep, specs[w.name], w, lambda t: t.transpose(1, 2).contiguous())
        with ep.graph.inserting_before(first_op):
            read = ep.graph.call_function(aten.permute.default, (w, [0, 2, 1]))
        read.meta["val"] = kn
        read.meta["tensor_meta"] = _extract_tensor_metadata(kn)
        w.replace_all_uses_with(read, delete_user_cb=lambda user: user is not read)
    for bmm, a, ids in row_products:  # a [S, 1, K] @ W[ids] -> (W'[ids] @ a^T)^T
        w = bmm.args[1].args[0].args[0]  # index(permute(W'), ids)
        with ep.graph.inserting_before(bmm):
            emit = functools.partial(_emit, ep.graph)
            product = emit(aten.bmm.default, emit(aten.index.Tensor, w, [ids]), emit(aten.permute.default, a, [0, 2, 1]))
            out = emit(aten.permute.default, product, [0, 2, 1])
        bmm.replace_all_uses_with(out)
        ep.graph.erase_node(bmm)
    ep.graph.eliminate_dead_code()
    ep.graph_module.recompile()
    return frozenset(specs[w.name].target for w in stored_kn)


def _meta_empty(fake_mode, *shape):
    """A meta value of `shape` (sizes may be the program's SymInts: made in its fake mode)."""
    if fake_mode is None:
        return torch.empty(*shape)
    with fake_mode:
        return torch.empty(*shape)


def _convolutions_as_linears(ep) -> dict:
    """Each 2-D convolution (groups 1; static channels and spatial sizes, the batch may be a
    run-time size) whose weight W [O, C, kh, kw] is a state
    tensor read by it alone becomes a linear layer over its input patches: x is padded, viewed
    channels-last, and the kh * kw shifted (strided, dilated) windows are concatenated along
    the channels into P [N * Ho * Wo, kh * kw * C]; then `mm(P, permute(W', [1, 0]))` (+ bias)
    with W' = W viewed [O, kh * kw * C] (kh, kw, C order), stored so, back to NCHW.  Returns
    {name: [O, C, kh, kw]} of the weights so stored.

    Why: torch-mlir's convolution lowers to scalar loops (4-6 GFLOP/s here, 30x slower than
    torch), while a linear layer runs on the CPU backend's GEMM kernels and is what every
    quantization pass takes: weight formats, activation quantization, GPTQ on the patches'
    Hessian, the integer kernels."""
    from torch.fx.passes.shape_prop import _extract_tensor_metadata

    aten = torch.ops.aten
    specs = {n.name: s for n, s in zip((n for n in ep.graph.nodes if n.op == "placeholder"),
                                       ep.graph_signature.input_specs)}
    updated = set(ep.graph_signature.buffers_to_mutate.values())
    graph, stored = ep.graph, {}

    def emit(target, args, val):
        node = graph.call_function(target, args)
        node.meta["val"] = val
        node.meta["tensor_meta"] = _extract_tensor_metadata(val)
        return node

    for conv in list(graph.nodes):
        if conv.op != "call_function" or conv.target is not aten.convolution.default:
            continue
        x, w, bias, stride, padding, dilation, transposed, _, groups = conv.args
        spec = specs.get(getattr(w, "name", None)) if getattr(w, "op", None) == "placeholder" else None
        xv, wv, yv = x.meta.get("val"), w.meta.get("val"), conv.meta.get("val")
        if spec is None or spec.kind.name not in ("PARAMETER", "BUFFER", "CONSTANT_TENSOR") or \
                spec.target in updated or transposed or groups != 1 or len(w.users) != 1 or \
                not all(isinstance(v, torch.Tensor) and v.dim() == 4 and v.dtype == torch.float32
                        for v in (xv, wv, yv)) or \
                not all(isinstance(d, int) for d in (*xv.shape[1:], *yv.shape[1:])):
            continue
        n, c, _, _ = xv.shape  # the batch may be a run-time size (a SymInt)
        # one value stands for both spatial dims (SigLIP's patch embedding has padding=[0])
        stride, padding, dilation = (list(v) * 2 if len(v) == 1 else list(v) for v in (stride, padding, dilation))
        empty = functools.partial(_meta_empty, getattr(xv, "fake_mode", None))
        o, _, kh, kw = wv.shape
        _, _, ho, wo = yv.shape
        with graph.inserting_before(conv):
            xs, hp, wp = x, xv.shape[2] + 2 * padding[0], xv.shape[3] + 2 * padding[1]
            if any(padding):
                pad = [padding[1], padding[1], padding[0], padding[0]]
                xs = emit(aten.constant_pad_nd.default, (xs, pad, 0.0), empty(n, c, hp, wp))
            xh = emit(aten.permute.default, (xs, [0, 2, 3, 1]), empty(n, c, hp, wp).permute(0, 2, 3, 1))
            taps = []
            for dy in range(kh):
                for dx in range(kw):
                    t = emit(aten.slice.Tensor, (xh, 1, dy * dilation[0], dy * dilation[0] + stride[0] * (ho - 1) + 1,
                                                 stride[0]), empty(n, ho, wp, c))
                    t = emit(aten.slice.Tensor, (t, 2, dx * dilation[1], dx * dilation[1] + stride[1] * (wo - 1) + 1,
                                                 stride[1]), empty(n, ho, wo, c))
                    taps.append(t)
            patches_val = empty(n, ho, wo, kh * kw * c)
            patches = emit(aten.cat.default, (taps, -1), patches_val) if len(taps) > 1 else \
                emit(aten.clone.default, (taps[0],), patches_val)
            if isinstance(n, int):
                n_arg, rows_arg = n, n * ho * wo
            else:  # run-time batch: its size read from x, times the positions
                n_arg = graph.call_function(aten.sym_size.int, (x, 0))
                n_arg.meta["val"] = n
                rows_arg = graph.call_function(operator.mul, (n_arg, ho * wo))
                rows_arg.meta["val"] = n * ho * wo
            rows = emit(aten.view.default, (patches, [rows_arg, kh * kw * c]), empty(n * ho * wo, kh * kw * c))
            wl = emit(aten.permute.default, (w, [1, 0]), empty(o, kh * kw * c).t())
            y = emit(aten.mm.default, (rows, wl), empty(n * ho * wo, o))
            if bias is not None:
                y = emit(aten.add.Tensor, (y, bias), empty(n * ho * wo, o))
            y = emit(aten.view.default, (y, [n_arg, ho, wo, o]), empty(n, ho, wo, o))
            y = emit(aten.permute.default, (y, [0, 3, 1, 2]), empty(n, ho, wo, o).permute(0, 3, 1, 2))
        conv.replace_all_uses_with(y)
        graph.erase_node(conv)
        _relayout_state(ep, spec, w, lambda t: t.permute(0, 2, 3, 1).reshape(t.shape[0], -1).contiguous())
        stored[spec.target] = [o, c, kh, kw]
    if stored:
        graph.eliminate_dead_code()
        ep.graph_module.recompile()
    return stored


def _batched_linears_as_mm(ep) -> None:
    """`bmm(a, expand(W^T or W, [B, K, N]))` with W a 2-D state tensor becomes
    `view(mm(reshape(a, [B M, K]), W^T or W), [B, M, N])`.

    torch's matmul decomposition writes x @ W^T this way when x is 3-D and not contiguous as
    [B M, K] (nn.MultiheadAttention's packed in-projection after its batch_first transpose).
    As an mm it is a linear layer (then quantized) instead of a float batched matmul against
    B broadcast copies of the weight.  B and M may be run-time sizes."""
    aten = torch.ops.aten
    state = {n.name for n, spec in zip((n for n in ep.graph.nodes if n.op == "placeholder"),
                                       ep.graph_signature.input_specs) if spec.kind.name != "USER_INPUT"}
    for node in list(ep.graph.nodes):
        if node.op != "call_function" or node.target is not aten.bmm.default:
            continue
        a, b = node.args
        w = b.args[0] if getattr(b, "target", None) is aten.view.default else b
        if getattr(w, "target", None) is not aten.expand.default:
            continue
        w = w.args[0]
        src = w.args[0] if getattr(w, "target", None) is aten.permute.default and list(w.args[1]) == [1, 0] else w
        if getattr(src, "op", None) != "placeholder" or src.name not in state:
            continue
        a_val, w_val, out_val = a.meta.get("val"), w.meta.get("val"), node.meta.get("val")
        if not (isinstance(a_val, torch.Tensor) and isinstance(w_val, torch.Tensor)) or w_val.dim() != 2 \
                or not all(isinstance(d, int) for d in w_val.shape):
            continue
        k = w_val.shape[0]
        with ep.graph.inserting_before(node):  # reshape: `a` may be a transposed view (a copy then)
            sizes = []
            for i in range(2):  # run-time sizes read from `a`, as export writes them
                if isinstance(a_val.shape[i], int):
                    sizes.append(a_val.shape[i])
                else:
                    sizes.append(ep.graph.call_function(aten.sym_size.int, (a, i)))
                    sizes[-1].meta["val"] = a_val.shape[i]
            rows = ep.graph.call_function(aten.reshape.default, (a, [-1, k]))
            mm = ep.graph.call_function(aten.mm.default, (rows, w))
            out = ep.graph.call_function(aten.view.default, (mm, [*sizes, w_val.shape[1]]))
        rows.meta["val"] = a_val.reshape(-1, k)
        mm.meta["val"] = torch.mm(rows.meta["val"], w_val)
        out.meta["val"] = mm.meta["val"].view(out_val.shape)
        node.replace_all_uses_with(out)
        ep.graph.erase_node(node)
    ep.graph.eliminate_dead_code()


def _scatter_as_where(x, dim, index, src, add: bool = False):
    """scatter / scatter_add without a scatter (torch-mlir's TMTensor scatter lowering crashes
    the process: a router's `scatter`, as Phi-MoE's has, killed qcc).  Along `dim`, each
    position takes the src value of the last index entry naming it (torch leaves which of
    several writers wins unspecified) or keeps x; scatter_add adds them all.  The index must
    span x in every other dim (the form top-k and argmax give); the work is
    index.size(dim) x x.size(dim) a row."""
    d = dim % x.dim()
    for i in range(x.dim()):
        if i != d and index.shape[i] != x.shape[i]:
            raise QccError(f"scatter with an index of shape {list(index.shape)} into {list(x.shape)} along dim {d}: "
                           f"the index is smaller in dim {i}", hint="qcc's scatter takes an index spanning the "
                           "other dims (as top-k gives); expand the index and source")
    src = src[tuple(slice(0, n) for n in index.shape)]
    xt, it, st = x.movedim(d, -1), index.movedim(d, -1), src.movedim(d, -1)
    match = it.unsqueeze(-1) == torch.arange(xt.shape[-1], device=x.device)  # [..., K, S]
    if add:
        y = xt + (match.to(x.dtype) * st.unsqueeze(-1)).sum(-2)
    else:
        writer = torch.where(match, torch.arange(it.shape[-1], device=x.device).unsqueeze(-1), -1)
        last = writer.max(-2).values  # the last entry naming each position, -1 for none
        y = torch.where(last >= 0, torch.gather(st, -1, last.clamp(min=0)), xt)
    return y.movedim(-1, d)


def _histc_by_compare(x, bins: int = 100, lo=0, hi=0):
    """histc without torch-mlir's missing lowering (transformers' grouped_mm experts count
    their tokens per expert with it): each element's bin by torch's formula, then a compare
    with every bin and a sum.  Elements outside [lo, hi] and NaN count nowhere; lo == hi
    takes the data's range, widened by 1 each way when that is empty too, as torch does.
    The work is x.numel() x bins."""
    flat = x.reshape(-1)
    if lo == hi:
        lo, hi = flat.min(), flat.max()
        same = lo == hi
        lo, hi = torch.where(same, lo - 1, lo), torch.where(same, hi + 1, hi)
    pos = ((flat - lo) * bins / (hi - lo)).floor().to(torch.int64).clamp(max=bins - 1)
    inside = (flat >= lo) & (flat <= hi)
    hits = (pos.unsqueeze(-1) == torch.arange(bins, device=x.device)) & inside.unsqueeze(-1)
    return hits.sum(0).to(x.dtype)


def _cumsum_by_doubling(x, dim, dtype=None):
    """cumsum as log2(n) shifted adds (Hillis-Steele): elementwise work any target lowers
    (CUDA has no lowering of TMTensor's scan, and every Hugging Face causal LM takes one: its
    mask code looks for packed sequences with a cumsum over the positions).  Exact for
    integers; floats add in another order than a sequential scan (within rounding).  A
    run-time length takes as many steps as its upper bound needs."""
    if dtype is not None:
        x = x.to(dtype)
    elif not x.is_floating_point() and x.dtype != torch.int64:
        x = x.to(torch.int64)  # torch.cumsum's promotion of integer and bool inputs
    d = dim % max(x.dim(), 1)
    if x.dim() == 0:
        return x.clone()
    n = x.shape[d]
    bound = n if isinstance(n, int) else _upper_bound(n)
    y, shift = x, 1
    while shift < bound:
        # y shifted by `shift` along d, zeros in front: all zeros once shift >= n at run time
        y = y + torch.nn.functional.pad(y, [0, 0] * (x.dim() - 1 - d) + [shift, 0]).narrow(d, 0, n)
        shift *= 2
    return y


def _topk_by_selection(x, k, dim=-1, largest=True, sorted=True):
    """topk as k rounds of "the first remaining extreme" (compare, max, argmax): CUDA has no
    lowering of TMTensor's sort, which the routers of mixtures of experts take their top-k
    experts with.  Ties go to the lowest index and NaN counts as the largest, as torch's topk
    does; the result comes sorted (a valid order for sorted=False too).  Large k stays
    torch-mlir's (work k x n a row)."""
    if not isinstance(k, int) or k > 64 or x.dim() == 0:
        return NotImplemented
    xs = x.movedim(dim, -1)
    n = xs.shape[-1]
    positions = torch.arange(n, device=x.device)
    floating = xs.is_floating_point()
    worst = (float("-inf") if largest else float("inf")) if floating else \
        (torch.iinfo(xs.dtype).min if largest else torch.iinfo(xs.dtype).max)
    taken = torch.zeros(xs.shape, dtype=torch.bool, device=x.device)
    values, indices = [], []
    nan = torch.isnan(xs) if floating else torch.zeros(xs.shape, dtype=torch.bool, device=x.device)
    for _ in range(k):
        rest = torch.where(taken, worst, xs)
        if largest:  # a NaN is the largest value (amax returns it when one is left)
            best = rest.amax(-1, keepdim=True)
            hit = torch.where(torch.isnan(best), nan, rest == best) if floating else rest == best
        else:  # ... so the smallest only once nothing else is left
            best = torch.where(nan, worst, rest).amin(-1, keepdim=True)
            hit = (rest == best) & ~nan & ~taken
            hit = torch.where(hit.any(-1, keepdim=True), hit, nan)
        first = (hit & ~taken).to(torch.int32).argmax(-1, keepdim=True)
        values.append(xs.gather(-1, first))
        indices.append(first)
        taken = taken | (positions == first)
    return torch.cat(values, -1).movedim(-1, dim), torch.cat(indices, -1).movedim(-1, dim)


def _sort_by_rank(x, dim=-1, descending=False, stable=None):
    """sort for the CUDA target (no lowering of TMTensor's sort there; grouped_mm experts sort
    their rows by expert): each element's rank is how many elements go before it (smaller,
    or equal at a lower index: a stable sort; NaN last ascending, first descending, as torch
    sorts), the permutation is the element of each rank.  Work n x n a row, so rows up to 4096
    long (a prefill of 512 tokens with 8 experts each)."""
    xs = x.movedim(dim, -1)
    n = xs.shape[-1]
    if (n if isinstance(n, int) else _upper_bound(n)) > 4096:
        raise QccError(f"sort of rows of {n} elements for the CUDA target (at most 4096)",
                       hint="compile for the CPU, or give the sorted dim a smaller bound")
    a, b = xs.unsqueeze(-1), xs.unsqueeze(-2)  # element i (rows) against element j (columns)
    if xs.is_floating_point():
        nan_a, nan_b = torch.isnan(a), torch.isnan(b)
        first = (b > a) | (nan_b & ~nan_a) if descending else (b < a) | (nan_a & ~nan_b)
        same = (b == a) | (nan_a & nan_b)
    else:
        first, same = (b > a) if descending else (b < a), b == a
    index = torch.arange(n, device=x.device)
    earlier = index.unsqueeze(0) < index.unsqueeze(1)  # [i, j]: j < i
    rank = (first | (same & earlier)).sum(-1)  # [..., n]
    order = (rank.unsqueeze(-2) == index.unsqueeze(-1)).to(torch.int32).argmax(-1)
    return xs.gather(-1, order).movedim(-1, dim), order.movedim(-1, dim)


def _upper_bound(n) -> int:
    """The largest value run-time size `n` (a SymInt) may take, from export's ranges."""
    from torch.utils._sympy.numbers import int_oo

    upper = n.node.shape_env.bound_sympy(n.node.expr).upper
    if upper is int_oo or upper > 1 << 20:
        raise QccError(f"cumsum over a run-time length {n} without an upper bound",
                       hint="give the dim a max in dynamic_shapes (torch.export.Dim(..., max=N))")
    return int(upper)


def _grouped_mm_as_gathers(x, w, offs=None, bias=None, out_dtype=None):
    """A grouped product (`torch._grouped_mm`, transformers' grouped_mm experts and their
    `grouped_mm_fallback`) as a gather of each row's group weight and a batched product:
    rows [offs[g-1], offs[g]) of x [S, K] times w[g] [K, N]; rows past the last offset are 0,
    as the fallback leaves them.  Written as `bmm(w^T[group], x)`: where w is a parameter's
    transpose, `_fold_inverse_permutes` leaves `W[group]` of the stored [E, N, K] weight,
    the form transformers' batched_mm experts take, which qcc quantizes and runs on its
    gathered kernels."""
    if offs is None or x.dim() != 2 or w.dim() != 3 or bias is not None \
            or (out_dtype is not None and out_dtype != x.dtype):
        raise QccError(f"grouped_mm of a {x.dim()}-D by a {w.dim()}-D operand"
                       + ("" if offs is not None else " without offsets")
                       + (" with a bias or another output dtype" if bias is not None or out_dtype else ""),
                       hint="qcc takes the mixture-of-experts form: 2-D rows sorted by group, 3-D weights, "
                            "offsets, no bias (add it after)")
    groups = w.shape[0]
    rows = torch.arange(x.shape[0], device=x.device)
    group = (offs.to(torch.int64).unsqueeze(0) <= rows.unsqueeze(1)).sum(1)
    picked = w.transpose(-2, -1)[group.clamp(max=groups - 1)]
    y = torch.bmm(picked, x.unsqueeze(-1).to(w.dtype)).squeeze(-1)
    return torch.where((group < groups).unsqueeze(-1), y, torch.zeros((), dtype=y.dtype, device=y.device))


def _fold_inverse_permutes(graph) -> None:
    """permute(permute(t, p), q) with q undoing p is t (what `_grouped_mm_as_gathers` leaves
    of a transposed weight; the decompositions write transposes as permutes)."""
    aten = torch.ops.aten

    def order(node):
        if node.op != "call_function":
            return None
        if node.target is aten.permute.default:
            return [d % len(node.args[1]) for d in node.args[1]]
        if node.target is aten.transpose.int:
            rank = node.meta["val"].dim()
            a, b = (d % rank for d in node.args[1:3])
            dims = list(range(rank))
            dims[a], dims[b] = b, a
            return dims
        return None

    for node in list(graph.nodes):
        outer = order(node)
        inner = order(node.args[0]) if outer is not None and isinstance(node.args[0], torch.fx.Node) else None
        if inner is not None and len(inner) == len(outer) and [inner[d] for d in outer] == sorted(inner):
            node.replace_all_uses_with(node.args[0].args[0])
            graph.erase_node(node)
    graph.eliminate_dead_code()


def _index_put_as_where(x, indices, values, accumulate=False):
    """`x[idx] = values` (one 1-D index along dim 0: transformers' inverse permutation of the
    grouped_mm rows) as `_scatter_as_where` along dim 0, for the CUDA target (no lowering of
    TMTensor's scatter there)."""
    if len(indices) != 1 or indices[0] is None or indices[0].dim() != 1 or x.dim() == 0:
        return NotImplemented
    idx = indices[0]
    shape = (idx.shape[0], *x.shape[1:])
    index = idx.reshape(-1, *([1] * (x.dim() - 1))).expand(shape)
    return _scatter_as_where(x, 0, index, values.expand(shape), add=accumulate)


def _sorted_topk(graph) -> None:
    """topk(sorted=False) as topk(sorted=True): torch-mlir lowers only the sorted form, and a
    sorted result is one of the orders an unsorted topk may return (GLM-4 MoE's router)."""
    for node in graph.nodes:
        if node.op == "call_function" and node.target == torch.ops.aten.topk.default:
            args = list(node.args) + list((None, None, -1, True, True)[len(node.args):])
            for i, name in enumerate(("self", "k", "dim", "largest", "sorted")):
                args[i] = node.kwargs.get(name, args[i])
            if args[4] is False:
                node.args, node.kwargs = tuple(args[:4]) + (True,), {}


def _decompositions(target: str = "cpu") -> dict:
    from torch_mlir.extras.fx_decomp_util import get_decomposition_table

    aten = torch.ops.aten
    table = dict(get_decomposition_table())
    table[aten.scatter.src] = lambda x, dim, index, src: _scatter_as_where(x, dim, index, src)
    table[aten.scatter.value] = lambda x, dim, index, value: _scatter_as_where(
        x, dim, index, torch.full(index.shape, value, dtype=x.dtype, device=x.device))
    table[aten.scatter_add.default] = lambda x, dim, index, src: _scatter_as_where(x, dim, index, src, add=True)
    table[aten.histc.default] = _histc_by_compare
    table[aten.cumsum.default] = _cumsum_by_doubling
    table[aten.topk.default] = _topk_by_selection
    if target == "cuda":  # the CPU lowers TMTensor's sort (a loop nest), CUDA does not
        table[aten.sort.default] = _sort_by_rank
        table[aten.sort.stable] = lambda x, *, stable=None, dim=-1, descending=False: _sort_by_rank(
            x, dim, descending)
        table[aten.index_put.default] = _index_put_as_where
    table[aten._grouped_mm.default] = _grouped_mm_as_gathers
    fallback = getattr(getattr(torch.ops, "transformers", None), "grouped_mm_fallback", None)
    if fallback is not None:  # registered when transformers' MoE integration is imported
        table[fallback.default] = _grouped_mm_as_gathers
    return table


def _node_where(node) -> str | None:
    """`file:line` of the model's source line that made FX node `node` (the innermost frame
    of its recorded stack outside torch), or None."""
    frames = [(f, line) for f, line in _STACK_FRAME.findall(node.meta.get("stack_trace") or "")
              if f"{os.sep}torch{os.sep}" not in f]
    return f"{frames[-1][0]}:{frames[-1][1]}" if frames else None


_STACK_FRAME = re.compile(r'File "([^"]+)", line (\d+)')


def _emit(graph, target, *args):
    """A new node target(*args) at the graph's insertion point, its meta value computed from
    its arguments' (fake tensors, SymInts) in the graph's fake mode."""
    from torch._guards import detect_fake_mode

    def val(a):
        if isinstance(a, torch.fx.Node):
            return a.meta["val"]
        return [val(x) for x in a] if isinstance(a, (list, tuple)) else a

    node = graph.call_function(target, args)
    mode = detect_fake_mode([next(n.meta["val"] for n in graph.nodes if n.op == "placeholder"
                                  and isinstance(n.meta.get("val"), torch.Tensor))])
    with mode:
        node.meta["val"] = target(*(val(a) for a in args))
    return node


def _weight_batches_as_gathers(ep) -> None:
    """`bmm(x [E, T, K], W)` with W a 3-D state tensor (each batch its own weight: Llama 4's
    experts, which run every token through every expert) as the gathered form of
    transformers' experts: rows [E T, K] with ids = each row's batch, `W[ids]`, one row's
    product each, viewed back to [E, T, N].  W [E, K, N] read as is takes the `x @ W` form
    (`_experts_as_nk` then stores it [E, N, K]); W read as `permute(W', [0, 2, 1])`, W' [E, N, K],
    the `W'[ids] @ x` form.  Either way it is quantized along K and runs on the gathered
    kernels instead of staying a float batched product."""
    aten = torch.ops.aten
    weight = _weights_3d(ep, _placeholder_specs(ep))

    for node in list(ep.graph.nodes):
        if node.op != "call_function" or node.target is not aten.bmm.default:
            continue
        a, w = node.args
        nk = getattr(w, "target", None) is aten.permute.default and list(w.args[1]) == [0, 2, 1] \
            and weight(w.args[0])
        if not (nk or weight(w)) or not isinstance(w.meta["val"].shape[0], int):
            continue
        e, k, n = w.meta["val"].shape
        t = a.meta["val"].shape[1]
        with ep.graph.inserting_before(node):
            emit = functools.partial(_emit, ep.graph)
            if not isinstance(t, int):
                t = emit(aten.sym_size.int, a, 1)
            rows = emit(aten.reshape.default, a, [-1, k])
            ids = emit(aten.reshape.default, emit(aten.expand.default, emit(
                aten.unsqueeze.default, emit(aten.arange.default, e), 1), [e, t]), [-1])
            if nk:
                y = emit(aten.bmm.default, emit(aten.index.Tensor, w.args[0], [ids]),
                         emit(aten.unsqueeze.default, rows, -1))
            else:
                y = emit(aten.bmm.default, emit(aten.unsqueeze.default, rows, 1),
                         emit(aten.index.Tensor, w, [ids]))
            out = emit(aten.reshape.default, y, [e, t, n])
        node.replace_all_uses_with(out)
        ep.graph.erase_node(node)
    ep.graph.eliminate_dead_code()
    ep.graph_module.recompile()


def _complex_as_pairs(graph) -> None:
    """Complex tensors as real ones with a trailing pair (re, im): the rotary embeddings of
    Meta's Llama, Llama 4 and DeepSeek-V2 (`view_as_complex(x) * polar(1, angles)`, then
    `view_as_real`).  Each complex value gets its pair tensor, built op by op: polar,
    view_as_complex / view_as_real (the pair itself), complex and real products, sums,
    and the views and slices such code applies; a complex value any other op makes is left
    for `_refuse_complex`."""
    aten = torch.ops.aten
    pairs = {}
    emit = functools.partial(_emit, graph)

    def part(p, i):  # the real (0) or imaginary (1) component, pair dim dropped
        return emit(aten.select.int, p, -1, i)

    def complex_in(a):
        return isinstance(a, torch.fx.Node) and a in pairs

    def pair_of(node):
        t, args = node.target, node.args
        rank = node.meta["val"].dim()
        if t is aten.view_as_complex.default:
            return args[0]
        if t is aten.polar.default:
            return emit(aten.stack.default, [emit(aten.mul.Tensor, args[0], emit(aten.cos.default, args[1])),
                                             emit(aten.mul.Tensor, args[0], emit(aten.sin.default, args[1]))], -1)
        if t is aten.mul.Tensor and complex_in(args[0]) and complex_in(args[1]):
            (ar, ai), (br, bi) = [(part(pairs[a], 0), part(pairs[a], 1)) for a in args]
            re = emit(aten.sub.Tensor, emit(aten.mul.Tensor, ar, br), emit(aten.mul.Tensor, ai, bi))
            im = emit(aten.add.Tensor, emit(aten.mul.Tensor, ar, bi), emit(aten.mul.Tensor, ai, br))
            return emit(aten.stack.default, [re, im], -1)
        if t in (aten.mul.Tensor, aten.div.Tensor) and complex_in(args[0]) != complex_in(args[1]):
            z, r = (args[0], args[1]) if complex_in(args[0]) else (args[1], args[0])
            if t is aten.div.Tensor and z is not args[0]:
                return None
            if isinstance(r, torch.fx.Node):
                if r.meta["val"].dtype.is_complex:
                    return None
                r = emit(aten.unsqueeze.default, r, -1)
            elif isinstance(r, complex):
                return None
            return emit(t, pairs[z], r)
        if t in (aten.add.Tensor, aten.sub.Tensor) and len(args) == 2 and not node.kwargs \
                and complex_in(args[0]) and complex_in(args[1]):
            return emit(t, pairs[args[0]], pairs[args[1]])
        if not complex_in(args[0]):
            return None
        z = pairs[args[0]]
        if t is aten.unsqueeze.default:
            return emit(t, z, args[1] % rank)
        if t in (aten.view.default, aten.reshape.default, aten._unsafe_view.default):
            return emit(aten.reshape.default, z, [*args[1], 2])
        if t is aten.expand.default:
            return emit(t, z, [*args[1], 2])
        if t is aten.permute.default:
            return emit(t, z, [d % rank for d in args[1]] + [rank])
        if t in (aten.slice.Tensor, aten.select.int, aten.squeeze.dim):
            return emit(t, z, args[1] % args[0].meta["val"].dim(), *args[2:])
        if t in (aten.clone.default, aten.alias.default) or (
                t is aten._to_copy.default and node.kwargs.get("dtype") in (None, args[0].meta["val"].dtype)):
            return z
        return None

    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        if node.target is aten._assert_tensor_metadata.default and complex_in(node.args[0]):
            graph.erase_node(node)
            continue
        if node.target is aten.view_as_real.default and complex_in(node.args[0]):
            node.replace_all_uses_with(pairs[node.args[0]])
            continue
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor) and val.dtype.is_complex:
            with graph.inserting_before(node):
                pair = pair_of(node)
            if pair is not None:
                pairs[node] = pair
    graph.eliminate_dead_code()


def _refuse_complex(graph) -> None:
    """Complex tensors other ops make have no lowering: one clear error at the first op
    making one."""
    for node in graph.nodes:
        val = node.meta.get("val")
        if node.op == "call_function" and isinstance(val, torch.Tensor) and val.dtype.is_complex:
            raise QccError(f"complex tensors are not supported ({node.target} makes a {val.dtype})",
                           where=_node_where(node),
                           hint="write the rotation with real tensors: cos / sin and rotate_half, as Llama's "
                                "rotary embedding does")


def canonical_program(ep, target: str = "cpu"):
    """(`ep` as qcc imports it, the state names stored transposed): torch-mlir's decompositions
    (and qcc's of scatter), expands simplified, batched products with a broadcast weight as mm, every linear's weight
    in nn.Linear's [N, K] layout.  Calibration runs this same program, so its linear layers
    and parameter values are the IR's."""
    ep = ep.run_decompositions(_decompositions(target))
    _complex_as_pairs(ep.graph)
    _refuse_complex(ep.graph)
    _fold_inverse_permutes(ep.graph)
    _weight_batches_as_gathers(ep)
    experts = _experts_as_nk(ep)
    _fold_inverse_permutes(ep.graph)
    _sorted_topk(ep.graph)
    _simplify_expands(ep.graph)
    _batched_linears_as_mm(ep)
    convs = _convolutions_as_linears(ep)
    return ep, _linear_weights_as_nk(ep) | experts, convs


def import_program(ep, ctx, target: str = "cpu") -> ImportedProgram:
    from torch_mlir import ir
    from torch_mlir.extras.fx_importer import FxImporter

    ep, transposed, convs = canonical_program(ep, target)
    sig = ep.graph_signature
    if getattr(sig, "user_inputs_to_mutate", None):
        raise QccError("the model writes into its inputs in forward()",
                       hint="return the new value instead, or keep it in a registered buffer "
                            "(a buffer forward() updates is state the compiled model keeps between calls)")
    mutated = set(sig.buffers_to_mutate.values())

    state = {**ep.state_dict, **getattr(ep, "constants", {})}
    params = ParamStore()
    arg_attr: dict[int, tuple[str, str]] = {}  # placeholder index -> ("qcc.param" | "qcc.state", name)
    inputs, states, state_values = [], [], {}
    placeholders = [n for n in ep.graph.nodes if n.op == "placeholder"]
    for i, (node, spec) in enumerate(zip(placeholders, sig.input_specs)):
        kind = spec.kind.name
        if kind == "USER_INPUT":
            inputs.append(_spec_from_meta(node.name, node.meta["val"]))
        elif kind == "BUFFER" and spec.target in mutated:  # state: an input and an output of each call
            states.append(_spec_from_meta(spec.target, node.meta["val"]))
            state_values[spec.target] = state[spec.target].detach().contiguous().numpy().copy()
            arg_attr[i] = ("qcc.state", spec.target)
        elif kind in ("PARAMETER", "BUFFER", "CONSTANT_TENSOR"):
            value = state[spec.target].detach()
            if value.dtype == torch.bfloat16:
                raise QccError(f"parameter {spec.target} is bfloat16, which a qcc program cannot hold", hint="export the model after model.float() (exact for "
                               "the weights), or pass the nn.Module itself to qcc.compile, which does that")
            if value.dtype not in _TORCH_TO_NP:
                raise QccError(f"parameter {spec.target} has unsupported dtype {value.dtype}")
            params[spec.target] = value.contiguous().numpy()
            arg_attr[i] = ("qcc.param", spec.target)
        else:
            raise QccError(f"unsupported graph input kind {kind} for {node.name}")
    out_node = next(n for n in ep.graph.nodes if n.op == "output")
    outputs = []
    for o, spec in zip(out_node.args[0], sig.output_specs):
        j = len([x for x in outputs if x.state is None])
        if not hasattr(o, "meta") or not isinstance(o.meta.get("val"), torch.Tensor):
            raise QccError(f"output {j} is not a tensor", hint="return tensors (or a tuple of tensors) from forward()")
        if spec.kind.name == "BUFFER_MUTATION":
            outputs.append(dataclasses.replace(_spec_from_meta(spec.target, o.meta["val"]), state=spec.target))
        else:
            outputs.append(_spec_from_meta(f"output{j}", o.meta["val"]))

    importer = FxImporter(context=ctx)
    importer.import_stateless_graph(ep.graph, func_name="main")
    module = importer.module
    with ctx:
        func = module.body.operations[0]
        arg_attrs = []
        for i in range(len(placeholders)):
            if i in arg_attr:
                arg_attrs.append(ir.DictAttr.get({arg_attr[i][0]: ir.StringAttr.get(arg_attr[i][1])}))
            else:
                arg_attrs.append(ir.DictAttr.get({}))
        func.attributes["arg_attrs"] = ir.ArrayAttr.get(arg_attrs)
    return ImportedProgram(module, params, inputs, outputs, _dim_ranges(ep), ep, transposed, states, state_values,
                           convs)


def _dim_ranges(ep) -> dict:
    """{symbol: [min, max or None]}: the sizes the exported program holds for (torch.export's
    range_constraints; a Dim.DYNAMIC size starts at 2, sizes 0 and 1 being specialized)."""
    def bound(v):
        return None if str(v) in ("int_oo", "oo", "-int_oo", "-oo") else int(v)
    return {str(sym): [bound(vr.lower), bound(vr.upper)] for sym, vr in ep.range_constraints.items()}
