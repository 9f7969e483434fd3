"""cuda-collapse-gathers: a gather generic read through `tensor.collapse_shape` becomes a
gather over the collapsed shape.

Grouped-query attention repeats each KV head for its query heads (`repeat_kv`: a broadcast
to [b, kv_heads, rep, s, d], collapsed into [b, heads, s, d]). Once the cache's
concatenation (cuda-concat-to-generic) and that broadcast are fused into one gather
generic (no inputs: linalg.index and tensor.extract), the collapse still stands between it
and attention's p @ v, and linalg-fuse-elementwise-ops cannot fuse across it (expanding
p @ v instead is refused, since the collapsed dims are reduced there). So every step wrote
the rep-fold V cache, `rep` times the cache's bytes, for attention to read back.

Here the gather computes the collapsed shape itself: each original index is recovered from
the collapsed one (`i floordiv inner mod size`, so the KV head is `h floordiv rep`) and the
body is moved over unchanged. The next linalg-fuse-elementwise-ops then fuses the gather
into its consumer, and attention reads the cache argument in place. Only static shapes,
all-parallel gathers with no inputs, an identity output map and a body that does not read
its output, whose one use is the collapse.
"""

import dataclasses

from torch_mlir import ir

from qcc import irutil
from qcc.passes import QccPass, register


def _collapsible_gather(collapse):
    """The gather generic feeding `collapse` (a tensor.collapse_shape), or None."""
    g = irutil.defining_op(collapse.operands[0])
    if g is None or g.name != "linalg.generic" or len(g.results) != 1 or len(list(g.results[0].uses)) != 1:
        return None
    if len(g.operands) != 1:  # no inputs: the one operand is the output's init
        return None
    its = [str(a) for a in ir.ArrayAttr(g.attributes["iterator_types"])]
    if any("parallel" not in a for a in its):
        return None
    out_map = ir.AffineMapAttr(ir.ArrayAttr(g.attributes["indexing_maps"])[0]).value
    if out_map != ir.AffineMap.get_identity(out_map.n_dims):
        return None
    block = g.regions[0].blocks[0]
    if list(block.arguments[0].uses):
        return None
    src = ir.RankedTensorType(g.results[0].type)
    dst = ir.RankedTensorType(collapse.results[0].type)
    if not (src.has_static_shape and dst.has_static_shape):
        return None
    return g


def _reassociation(collapse):
    return [[ir.IntegerAttr(i).value for i in ir.ArrayAttr(group)]
            for group in ir.ArrayAttr(collapse.attributes["reassociation"])]


def _collapse(collapse, g):
    src = list(ir.RankedTensorType(g.results[0].type).shape)
    dst_t = ir.RankedTensorType(collapse.results[0].type)
    groups = _reassociation(collapse)
    index = ir.IndexType.get()
    parallel = ir.ArrayAttr(g.attributes["iterator_types"])[0]
    with ir.InsertionPoint(g), g.location:
        init = ir.Operation.create("tensor.empty", results=[dst_t]).result
        ident = ir.AffineMapAttr.get(ir.AffineMap.get_identity(dst_t.rank))
        new = ir.Operation.create(
            "linalg.generic", results=[dst_t], operands=[init], regions=1,
            attributes={"indexing_maps": ir.ArrayAttr.get([ident]),
                        "iterator_types": ir.ArrayAttr.get([parallel] * dst_t.rank),
                        "operandSegmentSizes": ir.DenseI32ArrayAttr.get([0, 1])})
    block = new.regions[0].blocks.append(dst_t.element_type, arg_locs=[g.location])
    old_block = g.regions[0].blocks[0]
    old_ops = [op.operation for op in old_block.operations]
    used = {ir.IntegerAttr(op.attributes["dim"]).value for op in old_ops if op.name == "linalg.index"}
    with ir.InsertionPoint(block), g.location:
        # each original index the body reads, from its group's collapsed index: (i floordiv inner) mod size
        original = {}
        for k, group in enumerate(groups):
            if not used & set(group):
                continue
            i = ir.Operation.create("linalg.index", results=[index],
                                    attributes={"dim": ir.IntegerAttr.get(ir.IntegerType.get_signless(64), k)}).result
            for pos, d in enumerate(group):
                if d not in used:
                    continue
                if len(group) == 1:
                    original[d] = i
                    continue
                inner = 1
                for e in group[pos + 1:]:
                    inner *= src[e]
                expr = ir.AffineExpr.get_floor_div(ir.AffineDimExpr.get(0), ir.AffineConstantExpr.get(inner))
                if pos > 0:
                    expr = ir.AffineExpr.get_mod(expr, ir.AffineConstantExpr.get(src[d]))
                original[d] = ir.Operation.create(
                    "affine.apply", results=[index], operands=[i],
                    attributes={"map": ir.AffineMapAttr.get(ir.AffineMap.get(1, 0, [expr]))}).result
        yield_op = ir.Operation.create("linalg.yield", operands=[old_ops[-1].operands[0]])
    for op in old_ops[:-1]:
        if op.name == "linalg.index":
            op.results[0].replace_all_uses_with(original[ir.IntegerAttr(op.attributes["dim"]).value])
            op.erase()
        else:
            op.move_before(yield_op)
    collapse.results[0].replace_all_uses_with(new.results[0])
    collapse.erase()
    init_old = g.operands[0]
    g.erase()
    irutil.erase_dead_producers(init_old)


@register
class CudaCollapseGathers(QccPass):
    name = "cuda-collapse-gathers"
    summary = "Fold a tensor.collapse_shape into the gather generic it reads (GQA's repeated KV heads)"

    @dataclasses.dataclass
    class Options:
        pass

    def run(self, module):
        for func in irutil.functions(module):
            for op in irutil.walk(func, "tensor.collapse_shape"):
                g = _collapsible_gather(op)
                if g is not None:
                    _collapse(op, g)
