"""cuda-concat-to-generic: `tensor.concat` -> one gather-style linalg.generic.

torch.cat (rotate_half in RoPE, appending to a KV cache) bufferizes into an allocation
plus one copy per operand: a launch each, and the whole KV cache copied every step.
As a generic (all-parallel, no inputs; the body picks the operand by the index along
the concatenated dim and reads it with tensor.extract at a clamped index) it is one
elementwise producer, which linalg-fuse-elementwise-ops fuses into its consumer: the
rotation reads q directly, and attention reads the cache and the new key in place.
"""

import dataclasses

from torch_mlir import ir

from qcc import irutil
from qcc.passes import QccPass, register


def _ty(shape, elem):
    return f"tensor<{'x'.join(map(str, shape))}x{elem}>"


def concat_func(name: str, dim: int, shapes, out_shape, elem: str) -> str:
    rank = len(out_shape)
    args = ", ".join(f"%a{j}: {_ty(s, elem)}" for j, s in enumerate(shapes))
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
        body = module.regions[0].blocks[0]
        defined = set()
        for func in irutil.functions(module):
            for op in irutil.walk(func, "tensor.concat"):
                rt = ir.RankedTensorType(op.result.type)
                shapes = [list(ir.RankedTensorType(v.type).shape) for v in op.operands]
                if not rt.has_static_shape or any(ir.ShapedType.get_dynamic_size() in s for s in shapes):
                    continue
                dim = ir.IntegerAttr(op.attributes["dim"]).value
                elem = str(rt.element_type)
                name = "qcc_cuda_concat_" + "_".join("x".join(map(str, s)) for s in shapes) + f"_d{dim}_{elem}"
                if name not in defined:
                    m = ir.Module.parse(concat_func(name, dim, shapes, list(rt.shape), elem))
                    for f in list(m.body.operations):
                        f.operation.move_after(body.operations[len(body.operations) - 1])
                    defined.add(name)
                with ir.InsertionPoint(op), op.location:
                    call = ir.Operation.create("func.call", results=[op.result.type], operands=list(op.operands),
                                               attributes={"callee": ir.FlatSymbolRefAttr.get(name)})
                op.result.replace_all_uses_with(call.result)
                op.erase()
