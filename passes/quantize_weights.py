"""quantize-weights: linear layers with a parameter weight become `qcc.qlinear`, round-to-nearest.

In the torch dialect a linear layer is `aten.mm(x, aten.permute(W, [1, 0]))`
(torch.export's decomposition of linear/addmm/matmul).  Weight quantization is two
steps that every weight quantizer shares:

* rounding: the weight's codes, scales and zero points (a formats.QuantizedTensor).
  Here round-to-nearest, with the format reference's scales or, with `clip-search=N`,
  per-granule clipped ones (an MSE search over N clipping ratios in [0.5, 1]);
  the `gptq` pass computes the codes with Hessian-based error compensation instead.
* emission (`rewrite_linears`): packed codes, scales and zero points become new
  parameters, and the mm is replaced by `qcc.qlinear` on builtin tensors between
  torch_c casts.  The float weight leaves the function if nothing else reads it.
"""

import dataclasses
import re

import numpy as np
from torch_mlir import ir

from qcc import irutil
from qcc.context import format_attr
from qcc.dialects import formats
from qcc.passes import PassError, QccPass, register

_NP_TO_MLIR = {np.dtype(np.int8): "i8", np.dtype(np.uint8): "i8", np.dtype(np.float32): "f32"}
_F32 = np.float32


def transposed_param(func, value: ir.Value):
    """If `value` is W^T for a 2-D parameter argument W, returns W's arg index."""
    op = irutil.defining_op(value)
    if op is None:
        return None
    if op.name == "torch.aten.permute" and irutil.const_int_list(op.operands[1]) == [1, 0]:
        src = op.operands[0]
    elif op.name == "torch.aten.t":
        src = op.operands[0]
    else:
        return None
    index = irutil.block_arg_number(src)
    if index is None or irutil.Signature(func).param_name(index) is None:
        return None
    return index


def linear_sites(func):
    """(mm op, weight arg index) for each quantizable linear layer in `func`."""
    sites = []
    for op in irutil.walk(func, "torch.aten.mm"):
        index = transposed_param(func, op.operands[1])
        if index is not None:
            sites.append((op, index))
    return sites


_WEIGHT_READERS = {"torch.aten.convolution": "convolution", "torch.aten.mm": "matmul",
                   "torch.aten.bmm": "batched matmul", "torch.aten.matmul": "matmul"}
# ops through which a parameter still reaches a product as a weight (transposed, sliced, broadcast)
_WEIGHT_VIEWS = ("torch.aten.permute", "torch.aten.t", "torch.aten.transpose.int", "torch.aten.view",
                 "torch.aten.reshape", "torch.aten._unsafe_view", "torch.aten.expand", "torch.aten.broadcast_to",
                 "torch.aten.slice.Tensor",
                 "torch.aten.unsqueeze", "torch.aten.squeeze.dim", "torch.aten.contiguous", "torch.aten.clone",
                 # a mixture of experts' weights [E, N, K], gathered per token
                 "torch.aten.index.Tensor", "torch.aten.index.Tensor_hacked_twin", "torch.aten.index_select",
                 "torch.aten.select.int")


def float_weight_uses(module) -> list[str]:
    """"<param> [shape] (<op>)" for each parameter a convolution or matmul reads (directly or
    through views, transposes, slices, gathers: a mixture of experts' weights) other than as a
    linear layer's weight (`linear_sites`): weights a weight quantizer leaves float."""
    found = set()
    for func in irutil.functions(module):
        sig = irutil.Signature(func)
        block = func.regions[0].blocks[0]
        for index, arg in enumerate(block.arguments):
            param = sig.param_name(index)
            if param is None or not str(arg.type).startswith("!torch.vtensor"):  # codes are builtin tensors
                continue
            shape = "x".join(str(d) for d in irutil.vtensor_shape(arg.type)[0])
            pending = [arg]
            while pending:
                value = pending.pop()
                for use in value.uses:
                    op = use.owner.operation
                    if FLOAT_WEIGHTS in op.attributes:
                        continue
                    if op.name in _WEIGHT_VIEWS and use.operand_number == 0:
                        pending.append(op.results[0])
                    elif op.name in _WEIGHT_READERS and use.operand_number < 2 and not (
                            op.name == "torch.aten.mm" and transposed_param(func, op.operands[1]) is not None):
                        found.add(f"{param} [{shape}] ({_WEIGHT_READERS[op.name]})")
    return sorted(found)


# ---------------------------------------------------------------------------
# Rounding
# ---------------------------------------------------------------------------

def _granules(a, fmt, shape):
    """[N, K] viewed as [S0, S1, elements]: scale[s0, s1] covers a[s0, s1, :]."""
    s0, s1 = fmt.scale_shape(shape)
    return a.reshape(s0, s1, -1)


def clipped_scales(w, fmt, ratio: float):
    """The format's round-to-nearest scale and zero point with the granule's range shrunk by `ratio`."""
    g = _granules(np.asarray(w, _F32), fmt, w.shape)
    _, qmax = fmt.storage_levels()
    r = _F32(ratio)
    if fmt.symmetric:
        scale = np.max(np.abs(g), axis=-1) * r / _F32(qmax)
        return np.where(scale == 0, _F32(1.0), scale).astype(_F32), None
    lo = np.minimum(np.min(g, axis=-1), _F32(0)) * r
    hi = np.maximum(np.max(g, axis=-1), _F32(0)) * r
    scale = (hi - lo) / _F32(qmax)
    scale = np.where(scale == 0, _F32(1.0), scale).astype(_F32)
    return scale, np.clip(np.rint(-lo / scale), 0, qmax).astype(np.uint8)


def round_with_scales(w, fmt, scale, zero) -> formats.QuantizedTensor:
    """Round-to-nearest codes of w [N, K] for given scales and zero points (clipped to the code range)."""
    w = np.asarray(w, _F32)
    qmin, qmax = fmt.storage_levels()
    g = _granules(w, fmt, w.shape)
    q = np.rint(g / scale[..., None])
    if zero is not None:
        q = np.clip(q + zero.astype(_F32)[..., None], 0, qmax)
    else:
        q = np.clip(q, qmin, qmax)
    return formats.QuantizedTensor(codes=q.reshape(w.shape).astype(fmt.code_dtype), scale=scale, zero=zero,
                                   format=fmt, shape=w.shape)


def search_clip(w, fmt, steps: int) -> formats.QuantizedTensor:
    """Round-to-nearest with each granule's clipping ratio in [0.5, 1] (steps + 1 points) chosen to
    minimize its squared rounding error; ratio 1 (the format's own scales) is on the grid."""
    w = np.asarray(w, _F32)
    best = fmt.quantize(w)
    g = _granules(w, fmt, w.shape)
    err = np.sum((_granules(formats.dequantize(best), fmt, w.shape) - g) ** 2, axis=-1)
    codes = _granules(best.codes, fmt, w.shape).copy()
    scale = best.scale.copy()
    zero = None if best.zero is None else best.zero.copy()
    for ratio in np.linspace(1.0, 0.5, steps + 1)[1:]:
        s, z = clipped_scales(w, fmt, ratio)
        qt = round_with_scales(w, fmt, s, z)
        e = np.sum((_granules(formats.dequantize(qt), fmt, w.shape) - g) ** 2, axis=-1)
        better = e < err
        err = np.where(better, e, err)
        scale = np.where(better, s, scale)
        codes = np.where(better[..., None], _granules(qt.codes, fmt, w.shape), codes)
        if zero is not None:
            zero = np.where(better, z, zero)
    return formats.QuantizedTensor(codes=codes.reshape(w.shape), scale=scale, zero=zero, format=fmt,
                                   shape=w.shape)


def rtn_scales(w, fmt, clip_search: int = 0):
    """(scale, zero) a weight quantizer rounds to: the format's, or the clip search's."""
    qt = search_clip(w, fmt, clip_search) if clip_search else fmt.quantize(w)
    return qt.scale, qt.zero


# ---------------------------------------------------------------------------
# Emission
# ---------------------------------------------------------------------------

def parse_common(options):
    """(Format, exclude regex or None) from a weight quantizer's `format` and `exclude` options."""
    try:
        fmt = formats.parse_weight_format(options.format)
    except formats.FormatError as e:
        raise PassError(None, str(e))
    if options.clip_search < 0:
        raise PassError(None, f"clip-search must be >= 0 (grid points in [0.5, 1]), got {options.clip_search}")
    try:
        exclude = re.compile(options.exclude) if options.exclude else None
    except re.error as e:
        raise PassError(None, f"bad exclude regex '{options.exclude}': {e}")
    return fmt, exclude


# unit attribute on a linear (torch.aten.mm, carried to its qcc.qlinear) whose input stays float
FLOAT_ACTIVATIONS = "qcc.float_activations"
# unit attribute on a product (torch.aten.mm) or a gather of experts' weights (torch.aten.index)
# whose weights stay float on purpose: split-outliers' outlier columns (its remark says so)
FLOAT_WEIGHTS = "qcc.float_weights"


def wanted_linears(module, exclude):
    """[(func, mm, weight name)] of the linear layers a weight quantizer with `exclude` rewrites."""
    found = []
    for func in irutil.functions(module):
        sig = irutil.Signature(func)
        for mm, w_index in linear_sites(func):
            name = sig.param_name(w_index)
            if not (exclude and exclude.search(name)):
                found.append((func, mm, name))
    return found


def rewrite_linears(pass_, module, fmt, exclude, solve) -> None:
    """Every wanted linear becomes a qcc.qlinear of `fmt` whose codes come from
    solve(mm, w_name, w [N, K] float32) -> formats.QuantizedTensor of `fmt`."""
    store = pass_.session.params
    solved = {}  # a weight read by several linears (split-outliers' dynamic parts) is quantized once
    convs, untiled = pass_.session.options.get("conv_weights", {}), []
    for func, mm, w_name in wanted_linears(module, exclude):
        if w_name in convs and fmt.granularity == "group" and store[w_name].shape[1] % fmt.group_size:
            untiled.append(w_name)  # a convolution's rows (a CNN's first: 3 x 3 x 3) stay float, said
            continue
        if w_name not in solved:
            if w_name not in store:
                raise PassError(mm, f"no value for parameter '{w_name}' in the parameter store")
            w = np.asarray(store[w_name], _F32)
            try:
                solved[w_name] = solve(mm, w_name, w)
            except formats.FormatError as e:
                raise PassError(mm, f"cannot quantize '{w_name}' [{w.shape[0]}x{w.shape[1]}] as {fmt.key()}: {e}; "
                                    f"or give that layer its own format in a recipe file (\"overrides\": [{{\"pattern\": "
                                    f"\"{re.escape(w_name.rsplit('.', 1)[0].rsplit('.', 1)[-1])}\", \"weight_format\": "
                                    f"\"int8_sym_channel\"}}])")
        emit_qlinear(pass_.session, irutil.Signature(func), mm, w_name, solved[w_name])
    if untiled:
        pass_.session.remarks.append(
            f"{pass_.name}: convolution weights left float (groups of {fmt.group_size} do not tile their rows of "
            + ", ".join(f"{convs[n][1]}x{convs[n][2]}x{convs[n][3]}" for n in sorted(set(untiled))) + " columns): "
            + ", ".join(sorted(set(untiled))))
    for func in irutil.functions(module):
        for name in irutil.Signature(func).erase_unused_params():
            if name in store:
                del store[name]


def add_quantized_params(session, sig, w_name, qt, experts: int = 0) -> list:
    """qt's packed codes, scales (and zero points) as parameters `<w_name>:<format>:<role>`
    (reused if there), recorded in session.layers; with `experts` E, qt holds a mixture of
    experts' weights [E, N, K] as E * N rows and each array is stored [E, N, ...]."""
    fmt, store = qt.format, session.params
    entries = {"codes": formats.pack(qt), "scale": qt.scale.astype(_F32)}
    if not fmt.symmetric:
        entries["zero"] = qt.zero
    session.layers[w_name] = {"format": fmt.key(), "shape": list(qt.shape), **({"experts": experts} if experts else {})}
    args = []
    for role, value in entries.items():
        name = f"{w_name}:{fmt.key()}:{role}"
        store[name] = value.reshape(experts, qt.shape[0] // experts, -1) if experts else value
        args.append(sig.add_param(name, irutil.tensor_type(store[name].shape, _NP_TO_MLIR[value.dtype])))
    return args


def emit_qlinear(session, sig, mm, w_name, qt) -> None:
    """mm(x, W^T) -> qcc.qlinear(x, codes, scale[, zero]) with qt's packed values as new parameters."""
    fmt = qt.format
    n, _ = qt.shape
    args = add_quantized_params(session, sig, w_name, qt)

    x = mm.operands[0]
    x_shape, x_dtype = irutil.vtensor_shape(x.type)
    if x_dtype != "f32":
        raise PassError(mm, f"quantized linear expects f32 activations, got {x_dtype}")
    with ir.InsertionPoint(mm), mm.location:
        x_builtin = ir.Operation.create(
            "torch_c.to_builtin_tensor", results=[irutil.tensor_type(x_shape, "f32")], operands=[x]).result
        y = ir.Operation.create(
            "qcc.qlinear", results=[irutil.tensor_type([x_shape[0], n], "f32")],
            operands=[x_builtin, *args],
            attributes={"weight_format": format_attr(fmt.key()), "act_format": format_attr("none")}).result
        if FLOAT_ACTIVATIONS in mm.attributes:
            y.owner.attributes[FLOAT_ACTIVATIONS] = ir.UnitAttr.get()
        y_torch = ir.Operation.create(
            "torch_c.from_builtin_tensor", results=[mm.result.type], operands=[y]).result
    permute = irutil.defining_op(mm.operands[1])
    mm.result.replace_all_uses_with(y_torch)
    mm.erase()
    if not list(permute.result.uses):
        permute.erase()


@register
class QuantizeWeights(QccPass):
    name = "quantize-weights"
    summary = "Quantize the weights of linear layers round-to-nearest into qcc.qlinear"

    @dataclasses.dataclass
    class Options:
        format: str = "int4_asym_g128"
        exclude: str = ""     # regex over parameter names left in float
        clip_search: int = 0  # > 0: per-granule MSE-optimal clipping ratio on this many points of [0.5, 1)

    def run(self, module):
        fmt, exclude = parse_common(self.options)
        steps = self.options.clip_search

        def solve(mm, w_name, w):
            return search_clip(w, fmt, steps) if steps else fmt.quantize(w)

        from qcc.passes.quantize_convs import rewrite_convs  # (they build on this module)
        from qcc.passes.quantize_experts import rewrite_experts

        rewrite_experts(self, module, fmt, exclude, lambda _, w: solve(None, None, w.reshape(-1, w.shape[-1])))
        rewrite_convs(self, module, fmt, exclude, lambda w: solve(None, None, w))
        rewrite_linears(self, module, fmt, exclude, solve)
