"""Convolution weights, quantized by the weight quantizers (quantize-weights, gptq).

The frontend makes each 2-D convolution of groups 1 and static sizes a linear layer over its
patches (`frontend._convolutions_as_linears`), quantized as any linear.  This pass takes the
convolutions left: grouped and depthwise ones, 1-D and 3-D, run-time sizes.
A convolution's weight W [O, I / groups, k...] (a parameter read directly by
`torch.aten.convolution`, not transposed) is quantized as O rows of I / groups * prod(k)
columns of the weight format: per output channel, or per group of that many columns (the
group size must divide them: otherwise the weight stays float and the driver's remark
names it).  The convolution then reads `qcc.dequantize(codes, scale[, zero])` viewed back
to W's shape: the artifact stores the codes only, and the convolution itself runs in float
(weight-only quantization: the model's size and the format's accuracy; the work is the
float convolution's).  Tensor-granularity formats quantize the whole weight with one
scale.  The manifest layer keeps W's shape (`conv_shape`) for `reference.dequantized_weights`.
"""

import numpy as np
from torch_mlir import ir

from qcc import irutil
from qcc.context import format_attr
from qcc.dialects import formats
from qcc.passes import PassError
from qcc.passes.quantize_weights import add_quantized_params


def conv_weights(func):
    """(convolution op, weight name, W's shape) for each non-transposed convolution whose
    weight is an f32 parameter."""
    sig = irutil.Signature(func)
    found = []
    for op in irutil.walk(func, "torch.aten.convolution"):
        index = irutil.block_arg_number(op.operands[1])
        w_name = None if index is None else sig.param_name(index)
        transposed = irutil.defining_op(op.operands[6])
        if w_name is None or transposed is None or transposed.name != "torch.constant.bool" \
                or ir.BoolAttr(transposed.attributes["value"]).value:
            continue
        shape, dtype = irutil.vtensor_shape(op.operands[1].type)
        if dtype == "f32" and None not in shape and len(shape) >= 3:
            found.append((op, w_name, shape))
    return found


def rewrite_convs(pass_, module, fmt, exclude, solve) -> list[str]:
    """Quantizes every convolution weight (not matching `exclude`) that the format tiles with
    solve(w [O, C] float32) -> QuantizedTensor; returns the names quantized.  The float
    weights' arguments go with the caller's `rewrite_linears`, which erases unused parameters."""
    store, solved = pass_.session.params, {}
    for func in irutil.functions(module):
        sig = irutil.Signature(func)
        for op, w_name, shape in conv_weights(func):
            o, c = shape[0], int(np.prod(shape[1:]))
            if (exclude and exclude.search(w_name)) or (fmt.granularity == "group" and c % fmt.group_size):
                continue
            if w_name not in solved:
                try:
                    solved[w_name] = solve(np.asarray(store[w_name], np.float32).reshape(o, c))
                except formats.FormatError as err:
                    raise PassError(op, f"cannot quantize the convolution weight '{w_name}' "
                                        f"[{'x'.join(map(str, shape))}] as {fmt.key()}: {err}")
            args = add_quantized_params(pass_.session, sig, w_name, solved[w_name])
            pass_.session.layers[w_name]["conv_shape"] = list(shape)
            with ir.InsertionPoint(op), op.location:
                w = ir.Operation.create("qcc.dequantize", results=[irutil.tensor_type([o, c], "f32")],
                                        operands=args, attributes={"format": format_attr(fmt.key())}).result
                w = ir.Operation.create("torch_c.from_builtin_tensor",
                                        results=[ir.Type.parse(f"!torch.vtensor<[{o},{c}],f32>")], operands=[w]).result
                w = ir.Operation.create("torch.aten.view", results=[op.operands[1].type],
                                        operands=[w, irutil.int_list(shape)]).result
            op.operands[1] = w
    return sorted(solved)
