"""A mixture of experts' weights, quantized by the weight quantizers (quantize-weights, gptq).

transformers' `batched_mm` experts gather each token's expert weights from a 3-D parameter
W [E, N, K] (`aten.index(W, [ids])` -> [T, N, K]) and multiply them by the token's row.
W is quantized as E * N rows of the weight format (round-to-nearest, or its clip search),
stored as codes [E, N, K packed], scale / zero [E, N, groups], and the gather becomes
`qcc.gather_dequantize(ids, codes, scale[, zero])`: only the tokens' experts are read and
decoded (not all E), and the float W leaves the function.  The product itself stays a float
batched matmul here; with an activation format, quantize-activations quantizes its rows and
dequant-after-gemm makes it integer (qcc.gather_matmul_int).  Tensor-granularity formats
keep the experts float.
"""

import numpy as np
from torch_mlir import ir

from qcc import irutil
from qcc.context import format_attr
from qcc.dialects import formats
from qcc.passes import PassError
from qcc.passes.quantize_weights import FLOAT_WEIGHTS, add_quantized_params

GATHERS = ("torch.aten.index.Tensor_hacked_twin", "torch.aten.index.Tensor")


def expert_gathers(func):
    """(gather op, weight name, ids value) for each gather of a 3-D parameter by one index
    tensor along its first dim (but those marked FLOAT_WEIGHTS)."""
    sig = irutil.Signature(func)
    found = []
    for name in GATHERS:
        for op in irutil.walk(func, name):
            if FLOAT_WEIGHTS in op.attributes:
                continue  # split-outliers' float outlier columns
            index = irutil.block_arg_number(op.operands[0])
            w_name = None if index is None else sig.param_name(index)
            lst = irutil.defining_op(op.operands[1])
            if w_name is None or lst is None or lst.name != "torch.prim.ListConstruct" or len(lst.operands) != 1:
                continue
            shape, dtype = irutil.vtensor_shape(op.operands[0].type)
            ids_shape, ids_dtype = irutil.vtensor_shape(lst.operands[0].type)
            if len(shape) == 3 and None not in shape and dtype == "f32" and len(ids_shape) == 1 \
                    and ids_dtype == "si64":
                found.append((op, w_name, lst.operands[0]))
    return found


def rewrite_experts(pass_, module, fmt, exclude, solve) -> list[str]:
    """Quantizes every gathered expert weight (not matching `exclude`) with
    solve(name, w [E, N, K] float32) -> QuantizedTensor of its E * N rows; returns the names.  The float weights'
    arguments go with the caller's `rewrite_linears`, which erases every unused parameter."""
    if fmt.granularity == "tensor":
        return []
    store, solved = pass_.session.params, {}
    for func in irutil.functions(module):
        sig = irutil.Signature(func)
        for op, w_name, ids in expert_gathers(func):
            if exclude and exclude.search(w_name):
                continue
            w = np.asarray(store[w_name], np.float32)
            e, n, k = w.shape
            if w_name not in solved:  # a weight gathered twice is quantized once
                try:
                    solved[w_name] = solve(w_name, w)
                except formats.FormatError as err:
                    raise PassError(op, f"cannot quantize the experts' weight '{w_name}' [{e}x{n}x{k}] as "
                                        f"{fmt.key()}: {err}")
            args = add_quantized_params(pass_.session, sig, w_name, solved[w_name], experts=e)
            ids_shape, _ = irutil.vtensor_shape(ids.type)
            with ir.InsertionPoint(op), op.location:
                ids_builtin = ir.Operation.create("torch_c.to_builtin_tensor",
                                                  results=[irutil.tensor_type(ids_shape, "i64")],
                                                  operands=[ids]).result
                weights = ir.Operation.create(
                    "qcc.gather_dequantize", results=[irutil.tensor_type([ids_shape[0], n, k], "f32")],
                    operands=[ids_builtin, *args], attributes={"format": format_attr(fmt.key())}).result
                back = ir.Operation.create("torch_c.from_builtin_tensor", results=[op.result.type],
                                           operands=[weights]).result
            op.result.replace_all_uses_with(back)
            op.erase()
    return sorted(solved)
