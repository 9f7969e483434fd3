"""cuda-concat-to-generic: `tensor.concat` -> one gather-style linalg.generic.

torch.cat (rotate_half in RoPE, appending to a KV cache) bufferizes into an allocation
plus one copy per operand: a launch each, and the whole KV cache copied every step.
As a generic (all-parallel, no inputs; the body picks the operand by the index along
the concatenated dim and reads it with tensor.extract at a clamped index) it is one
elementwise producer, which linalg-fuse-elementwise-ops fuses into its consumer: the
rotation reads q directly, and attention reads the cache and the new key in place. An
operand made by a one-op unary generic used only here (rotate_half's -x2; a KV cache kept
in f16 and widened by `.float()`) is absorbed: the gather reads its input and applies the
op, so attention reads the f16 cache itself, not an f32 copy made by a launch of its own.
"""

import dataclasses

from torch_mlir import ir

from qcc import irutil
from qcc.passes import QccPass, register


def _ty(shape, elem):
    return f"tensor<{'x'.join(map(str, shape))}x{elem}>"


_UNARY = ("arith.negf", "math.absf", "math.exp", "math.tanh", "arith.extf")


def _unary_producer(v):
    """(op name, input) when `v` is made by an elementwise linalg.generic that applies one
    unary op to one same-shaped input (rotate_half's negation) and has no other use."""
    from qcc.irutil import defining_op

    g = defining_op(v)
    if g is None or g.name != "linalg.generic" or len(list(v.uses)) != 1:
        return None
    ins = list(g.opview.inputs)
    maps = [str(ir.AffineMapAttr(a).value) for a in ir.ArrayAttr(g.attributes["indexing_maps"])]
    if len(ins) != 1 or len(set(maps)) != 1 or "reduction" in str(g.attributes["iterator_types"]):
        return None
    body = [op.operation for op in g.regions[0].blocks[0].operations]
    if len(body) != 2 or body[0].name not in _UNARY or body[1].name != "linalg.yield":
        return None
    arg0 = g.regions[0].blocks[0].arguments[0]
    if body[0].operands[0] != arg0 or body[1].operands[0] != body[0].result:
        return None
    if ir.RankedTensorType(ins[0].type).shape != ir.RankedTensorType(v.type).shape:
        return None
    same_type = str(ir.RankedTensorType(ins[0].type).element_type) == str(ir.RankedTensorType(v.type).element_type)
    if same_type == (body[0].name == "arith.extf"):  # extf widens; the others keep the type
        return None
    return body[0].name, ins[0]


def concat_func(name: str, dim: int, shapes, out_shape, elem: str, unary=None, in_elems=None) -> str:
    """unary[j]: an op name applied to operand j after the gather (an absorbed producer);
    in_elems[j]: operand j's element type (an extf's narrower source), else `elem`."""
    unary = unary or [None] * len(shapes)
    in_elems = in_elems or [elem] * len(shapes)
    rank = len(out_shape)
    args = ", ".join(f"%a{j}: {_ty(s, e)}" for j, (s, e) in enumerate(zip(shapes, in_elems)))
    lines = [f"    %i{d} = linalg.index {d} : index" for d in range(rank)]
    lines.append("    %c0 = arith.constant 0 : index")
    off, vals = 0, []
    for j, s in enumerate(shapes):
        n = s[dim]
        lines.append(f"    %o{j} = arith.constant {off} : index")
        lines.append(f"    %hi{j} = arith.constant {n - 1} : index")
        lines.append(f"    %l{j} = arith.subi %i{dim}, %o{j} : index")
        lines.append(f"    %p{j} = arith.maxsi %l{j}, %c0 : index")
        lines.append(f"    %q{j} = arith.minsi %p{j}, %hi{j} : index")
        idx = ", ".join(f"%q{j}" if d == dim else f"%i{d}" for d in range(rank))
        if unary[j]:
            lines.append(f"    %x{j} = tensor.extract %a{j}[{idx}] : {_ty(s, in_elems[j])}")
            widen = f" : {in_elems[j]} to {elem}" if unary[j] == "arith.extf" else f" : {elem}"
            lines.append(f"    %v{j} = {unary[j]} %x{j}{widen}")
        else:
            lines.append(f"    %v{j} = tensor.extract %a{j}[{idx}] : {_ty(s, elem)}")
        vals.append((off, n))
        off += n
    # select from the last operand backwards: v = i < end_j ? v_j : v
    cur = f"%v{len(shapes) - 1}"
    for j in range(len(shapes) - 2, -1, -1):
        end = vals[j][0] + vals[j][1]
        lines.append(f"    %e{j} = arith.constant {end} : index")
        lines.append(f"    %in{j} = arith.cmpi ult, %i{dim}, %e{j} : index")
        lines.append(f"    %s{j} = arith.select %in{j}, %v{j}, {cur} : {elem}")
        cur = f"%s{j}"
    ident = ", ".join(f"d{d}" for d in range(rank))
    body = "\n".join(lines)
    iters = ", ".join(['"parallel"'] * rank)
    return f"""
func.func private @{name}({args}) -> {_ty(out_shape, elem)} {{
  %e = tensor.empty() : {_ty(out_shape, elem)}
  %r = linalg.generic {{indexing_maps = [affine_map<({ident}) -> ({ident})>], iterator_types = [{iters}]}}
      outs(%e : {_ty(out_shape, elem)}) {{
  ^bb0(%out: {elem}):
{body}
    linalg.yield {cur} : {elem}
  }} -> {_ty(out_shape, elem)}
  return %r : {_ty(out_shape, elem)}
}}
"""


@register
class CudaConcatToGeneric(QccPass):
    name = "cuda-concat-to-generic"
    summary = "Rewrite static tensor.concat as one gather-style linalg.generic (fusable into consumers)"

    @dataclasses.dataclass
    class Options:
        pass

    def run(self, module):
        defined = set()
        for func in irutil.functions(module):
            for op in irutil.walk(func, "tensor.concat"):
                rt = ir.RankedTensorType(op.result.type)
                shapes = [list(ir.RankedTensorType(v.type).shape) for v in op.operands]
                if not rt.has_static_shape or any(ir.ShapedType.get_dynamic_size() in s for s in shapes):
                    continue
                dim = ir.IntegerAttr(op.attributes["dim"]).value
                elem = str(rt.element_type)
                operands, unary = [], []
                for v in op.operands:  # absorb a unary elementwise producer (rotate_half's -x2)
                    prod = _unary_producer(v)
                    unary.append(prod[0] if prod else None)
                    operands.append(prod[1] if prod else v)
                in_elems = [str(ir.RankedTensorType(v.type).element_type) for v in operands]
                tag = "_".join((u.split(".")[1] + (e if u == "arith.extf" else "")) if u else "id"
                               for u, e in zip(unary, in_elems))
                name = ("qcc_cuda_concat_" + "_".join("x".join(map(str, s)) for s in shapes) + f"_d{dim}_{elem}"
                        + (f"_{tag}" if any(unary) else ""))
                if name not in defined:
                    irutil.append_functions(module, concat_func(name, dim, shapes, list(rt.shape), elem, unary,
                                                                in_elems), defined)
                irutil.replace_with_call(op, name, operands)
