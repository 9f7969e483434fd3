"""cuda-fold-unit-transposes: a transpose that only moves size-1 dims becomes a reshape.

At decode (one token) the attention heads' `transpose(1, 2)` of [1, 1, H, D] into
[1, H, 1, D] moves nothing in memory, but as a copy generic it is a launch whenever it cannot
be fused (its producer is a kernel call, e.g. an integer GEMV, and its consumer reads it
more than once). Rewritten as collapse_shape + expand_shape it is a view: no kernel, no
buffer. Only generics that copy (the body yields the input), all-parallel, with an identity
output map and a permuted input map whose non-unit dims keep their order are rewritten.
"""

import dataclasses

from torch_mlir import ir

from qcc import irutil
from qcc.passes import QccPass, register


def _groups(shape):
    """Reassociation of `shape` onto its non-unit dims: each group one non-unit dim (and the
    unit dims around it)."""
    groups, cur, has = [], [], False
    for i, d in enumerate(shape):
        if d != 1 and has:
            groups.append(cur)
            cur, has = [], False
        cur.append(i)
        has = has or d != 1
    groups.append(cur)
    return groups


def _ty(shape, elem):
    return f"tensor<{'x'.join(map(str, shape))}x{elem}>"


def reshape_func(name: str, src, dst, elem: str) -> str:
    mid = [d for d in src if d != 1]
    gi, go = _groups(src), _groups(dst)
    lines, cur = [], "%x"
    if len(gi) < len(src):
        lines.append(f"  %c = tensor.collapse_shape %x {gi} : {_ty(src, elem)} into {_ty(mid, elem)}")
        cur = "%c"
    if len(go) < len(dst):
        lines.append(f"  %e = tensor.expand_shape {cur} {go} output_shape {list(dst)} "
                     f": {_ty(mid, elem)} into {_ty(dst, elem)}")
        cur = "%e"
    body = "\n".join(lines)
    return f"""
func.func private @{name}(%x: {_ty(src, elem)}) -> {_ty(dst, elem)} {{
{body}
  return {cur} : {_ty(dst, elem)}
}}
"""


def unit_transpose(op):
    """(source shape, result shape, elem) if `op` is a copy generic moving only size-1 dims."""
    if op.name != "linalg.generic" or len(op.operands) != 2 or len(op.results) != 1:
        return None
    if any(str(ir.StringAttr(t).value if isinstance(t, ir.StringAttr) else t) != "#linalg.iterator_type<parallel>"
           for t in ir.ArrayAttr(op.attributes["iterator_types"])):
        return None
    body = [o.operation for o in op.regions[0].blocks[0].operations]
    if len(body) != 1 or body[0].operands[0] != op.regions[0].blocks[0].arguments[0]:
        return None
    maps = [ir.AffineMapAttr(a).value for a in ir.ArrayAttr(op.attributes["indexing_maps"])]
    try:
        src_t, dst_t = ir.RankedTensorType(op.operands[0].type), ir.RankedTensorType(op.result.type)
    except ValueError:  # a scalar input
        return None
    if not (src_t.has_static_shape and dst_t.has_static_shape) or src_t.element_type != dst_t.element_type:
        return None
    n = dst_t.rank
    if maps[1] != ir.AffineMap.get_identity(n) or not maps[0].is_permutation or maps[0] == maps[1]:
        return None
    perm = [ir.AffineDimExpr(e).position for e in maps[0].results]
    src, dst = list(src_t.shape), list(dst_t.shape)
    order = [perm[i] for i in range(n) if src[i] != 1]
    if order != sorted(order) or not order:
        return None
    return src, dst, str(dst_t.element_type)


@register
class CudaFoldUnitTransposes(QccPass):
    name = "cuda-fold-unit-transposes"
    summary = "Rewrite copy generics that only move size-1 dims as collapse/expand_shape views"

    @dataclasses.dataclass
    class Options:
        pass

    def run(self, module):
        defined = set()
        for func in irutil.functions(module):
            for op in list(irutil.walk(func, "linalg.generic")):
                found = unit_transpose(op)
                if found is None:
                    continue
                src, dst, elem = found
                name = f"qcc_cuda_reshape_{'x'.join(map(str, src))}_to_{'x'.join(map(str, dst))}_{elem}"
                if name not in defined:
                    irutil.append_functions(module, reshape_func(name, src, dst, elem), defined)
                irutil.replace_with_call(op, name, [op.operands[0]])
