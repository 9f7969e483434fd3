"""quantize-weights: linear layers with a parameter weight become `qcc.qlinear`.

In the torch dialect a linear layer is `aten.mm(x, aten.permute(W, [1, 0]))`
(torch.export's decomposition of linear/addmm/matmul).  Where W is a parameter,
the pass quantizes it round-to-nearest in the weight format (numpy reference in
qcc.dialects.formats), stores packed codes, scales and zero points as new
parameters, and replaces the mm by `qcc.qlinear` on builtin tensors between
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


@register
class QuantizeWeights(QccPass):
    name = "quantize-weights"
    summary = "Quantize the weights of linear layers round-to-nearest into qcc.qlinear"

    @dataclasses.dataclass
    class Options:
        format: str = "int4_asym_g128"
        exclude: str = ""  # regex over parameter names left in float

    def run(self, module):
        try:
            fmt = formats.parse_weight_format(self.options.format)
        except formats.FormatError as e:
            raise PassError(None, str(e))
        exclude = re.compile(self.options.exclude) if self.options.exclude else None
        for func in irutil.functions(module):
            sig = irutil.Signature(func)
            for mm, w_index in linear_sites(func):
                w_name = sig.param_name(w_index)
                if exclude and exclude.search(w_name):
                    continue
                self._rewrite(func, sig, mm, w_name, fmt)
            for name in sig.erase_unused_params():
                if name in self.session.params:
                    del self.session.params[name]

    def _rewrite(self, func, sig, mm, w_name, fmt):
        store = self.session.params
        if w_name not in store:
            raise PassError(mm, f"no value for parameter '{w_name}' in the parameter store")
        w = np.asarray(store[w_name], dtype=np.float32)
        n, k = w.shape
        try:
            qt = fmt.quantize(w)
        except formats.FormatError as e:
            raise PassError(mm, f"cannot quantize '{w_name}' [{n}x{k}] as {fmt.key()}: {e}")
        entries = {"codes": formats.pack(qt), "scale": qt.scale.astype(np.float32)}
        if not fmt.symmetric:
            entries["zero"] = qt.zero
        self.session.layers[w_name] = {"format": fmt.key(), "shape": [n, k]}
        args = []
        for role, value in entries.items():
            name = f"{w_name}:{fmt.key()}:{role}"
            store[name] = value
            args.append(sig.add_param(name, irutil.tensor_type(value.shape, _NP_TO_MLIR[value.dtype])))

        x = mm.operands[0]
        x_shape, x_dtype = irutil.vtensor_shape(x.type)
        if x_dtype != "f32":
            raise PassError(mm, f"quantized linear expects f32 activations, got {x_dtype}")
        loc = mm.location
        with ir.InsertionPoint(mm), loc:
            x_builtin = ir.Operation.create(
                "torch_c.to_builtin_tensor", results=[irutil.tensor_type(x_shape, "f32")], operands=[x]).result
            y = ir.Operation.create(
                "qcc.qlinear", results=[irutil.tensor_type([x_shape[0], n], "f32")],
                operands=[x_builtin, *args],
                attributes={"weight_format": format_attr(fmt.key()), "act_format": format_attr("none")}).result
            y_torch = ir.Operation.create(
                "torch_c.from_builtin_tensor", results=[mm.result.type], operands=[y]).result
        permute = irutil.defining_op(mm.operands[1])
        mm.result.replace_all_uses_with(y_torch)
        mm.erase()
        if not list(permute.result.uses):
            permute.erase()
