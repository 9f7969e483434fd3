"""lower-qcc-to-linalg: qcc ops become linalg on tensors (CPU reference lowering).

`qcc.qlinear` becomes one linalg.generic over (m, n, k) whose body unpacks the
weight code (nibble select for int4), subtracts the zero point, scales and
accumulates in f32: dequantization fused into the reduction, so no float copy
of the weight ever exists.  The generic stays a plain contraction, which keeps
it open to tiling and vectorization.
"""

import dataclasses

from torch_mlir import ir

from qcc import irutil
from qcc.context import format_key
from qcc.dialects import formats
from qcc.passes import PassError, QccPass, register


def _code_expr(fmt) -> tuple[str, str, str]:
    """(weight map, body lines computing %code as f32, scale/zero map) for `fmt`."""
    if fmt.granularity == "tensor":
        smap = "(m, n, k) -> (0, 0)"
    elif fmt.granularity == "channel":
        smap = "(m, n, k) -> (n, 0)"
    else:
        smap = f"(m, n, k) -> (n, k floordiv {fmt.group_size})"
    if fmt.bits == 8:
        wmap = "(m, n, k) -> (n, k)"
        to_f = "arith.sitofp" if fmt.symmetric else "arith.uitofp"
        body = f"    %code0 = {to_f} %w : i8 to f32\n"
    else:
        wmap = "(m, n, k) -> (n, k floordiv 2)"
        body = (
            "    %k = linalg.index 2 : index\n"
            "    %odd = arith.remui %k, %c2 : index\n"
            "    %odd_i8 = arith.index_cast %odd : index to i8\n"
            "    %shift = arith.muli %odd_i8, %c4_i8 : i8\n"
            "    %shifted = arith.shrui %w, %shift : i8\n"
            "    %nibble = arith.andi %shifted, %c15_i8 : i8\n"
            "    %code0 = arith.uitofp %nibble : i8 to f32\n")
    if fmt.symmetric:
        bias = "8.0" if fmt.bits == 4 else "0.0"
        body += f"    %code = arith.subf %code0, %cbias : f32\n"
        consts = f"  %cbias = arith.constant {bias} : f32\n"
    else:
        body += ("    %zf = arith.uitofp %z : i8 to f32\n"
                 "    %code = arith.subf %code0, %zf : f32\n")
        consts = ""
    return wmap, body, smap, consts


def qlinear_kernel(name: str, fmt, k: int, n: int, w_shape, s_shape) -> str:
    """MLIR text of a function computing qcc.qlinear for one weight format and shape."""
    wmap, body, smap, consts = _code_expr(fmt)
    zero_arg = "" if fmt.symmetric else f", %zp: tensor<{s_shape[0]}x{s_shape[1]}xi8>"
    zero_in = "" if fmt.symmetric else ", %zp"
    zero_ty = "" if fmt.symmetric else f", tensor<{s_shape[0]}x{s_shape[1]}xi8>"
    zero_map = "" if fmt.symmetric else f", affine_map<{smap}>"
    zero_bb = "" if fmt.symmetric else ", %z: i8"
    return f"""
func.func private @{name}(%x: tensor<?x{k}xf32>, %wq: tensor<{w_shape[0]}x{w_shape[1]}xi8>,
                          %sc: tensor<{s_shape[0]}x{s_shape[1]}xf32>{zero_arg}) -> tensor<?x{n}xf32> {{
  %c0 = arith.constant 0 : index
  %c2 = arith.constant 2 : index
  %c4_i8 = arith.constant 4 : i8
  %c15_i8 = arith.constant 15 : i8
  %zero = arith.constant 0.0 : f32
{consts}  %m = tensor.dim %x, %c0 : tensor<?x{k}xf32>
  %init = tensor.empty(%m) : tensor<?x{n}xf32>
  %acc = linalg.fill ins(%zero : f32) outs(%init : tensor<?x{n}xf32>) -> tensor<?x{n}xf32>
  %y = linalg.generic {{
      indexing_maps = [affine_map<(m, n, k) -> (m, k)>, affine_map<{wmap}>, affine_map<{smap}>{zero_map},
                       affine_map<(m, n, k) -> (m, n)>],
      iterator_types = ["parallel", "parallel", "reduction"]}}
      ins(%x, %wq, %sc{zero_in} : tensor<?x{k}xf32>, tensor<{w_shape[0]}x{w_shape[1]}xi8>, tensor<{s_shape[0]}x{s_shape[1]}xf32>{zero_ty})
      outs(%acc : tensor<?x{n}xf32>) {{
  ^bb0(%xv: f32, %w: i8, %s: f32{zero_bb}, %out: f32):
{body}    %wf = arith.mulf %code, %s : f32
    %p = arith.mulf %xv, %wf : f32
    %sum = arith.addf %out, %p : f32
    linalg.yield %sum : f32
  }} -> tensor<?x{n}xf32>
  return %y : tensor<?x{n}xf32>
}}
"""


def _static_shape(value) -> list[int]:
    t = ir.RankedTensorType(value.type)
    return [None if t.is_dynamic_dim(i) else t.shape[i] for i in range(t.rank)]


@register
class LowerQccToLinalg(QccPass):
    name = "lower-qcc-to-linalg"
    summary = "Lower qcc ops to linalg/arith on tensors (fused dequantization)"

    @dataclasses.dataclass
    class Options:
        pass

    def run(self, module):
        body = module.regions[0].blocks[0]
        defined = {}
        for func in irutil.functions(module):
            for op in irutil.walk(func):
                if op.name == "qcc.qlinear":
                    self._lower_qlinear(op, body, defined)
                elif op.name.startswith("qcc."):
                    raise PassError(op, f"no CPU lowering for '{op.name}' yet")

    def _lower_qlinear(self, op, body, defined):
        fmt = formats.parse_weight_format(format_key(op.attributes["weight_format"]))
        if format_key(op.attributes["act_format"]) != "none":
            raise PassError(op, "quantized activations reach lower-qcc-to-linalg; run dequant-after-gemm first")
        x, w, s = op.operands[0], op.operands[1], op.operands[2]
        k = _static_shape(x)[1]
        n = _static_shape(op.result)[1]
        w_shape, s_shape = _static_shape(w), _static_shape(s)
        name = f"qcc_qlinear_{fmt.key()}_{k}x{n}"
        if name not in defined:
            text = qlinear_kernel(name, fmt, k, n, w_shape, s_shape)
            kernel = ir.Module.parse(text)
            func = kernel.body.operations[0]
            func.operation.move_after(body.operations[len(body.operations) - 1])
            defined[name] = func
        loc = op.location
        with ir.InsertionPoint(op), loc:
            dyn = irutil.tensor_type([None, k], "f32")
            x_dyn = ir.Operation.create("tensor.cast", results=[dyn], operands=[x]).result
            call = ir.Operation.create(
                "func.call", results=[irutil.tensor_type([None, n], "f32")],
                operands=[x_dyn, *op.operands[1:]],
                attributes={"callee": ir.FlatSymbolRefAttr.get(name)}).result
            y = ir.Operation.create("tensor.cast", results=[op.result.type], operands=[call]).result
        op.result.replace_all_uses_with(y)
        op.erase()
