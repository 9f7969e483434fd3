"""cpu-select-expert-kernels: a mixture of experts' gathered product -> one CPU kernel call.

Runs in the CPU select-kernels stage (after torch-to-linalg, before lower-qcc-to-linalg).
Each

    %w = qcc.gather_dequantize(%ids, codes, scale[, zero])      [T, N, K] f32
    %y = linalg.batch_matmul ins(%w, %x : [T, N, K], [T, K, 1]) outs(zeros [T, N, 1])

(transformers' `batched_mm` experts after quantize-experts) whose weights are parameters
becomes `call @qcc_cpu_experts_<format>_<E>x<K>x<N>_v<V>(%x, %ids, panels...)`
(backends/cpu/kernels.gathered_qlinear): every expert's weight repacked at compile time into
the panel layout of the weight-only GEMV (pack.py, the experts' panels one after another), and
each row multiplied by its expert's panels in place, so no [T, N, K] float weights are written
and read back.  A gather with any other use, or a format the panels do not tile, stays on the
reference lowering (lower-qcc-to-linalg).
"""

import dataclasses

from torch_mlir import ir

from qcc import irutil
from qcc.context import format_key
from qcc.dialects import formats
from qcc.passes import QccPass, register


def _row_count(op) -> bool:
    """`op` is tensor.dim of dim 0 (the rows: a run-time count reads it for the matmul's check)."""
    if op.name != "tensor.dim":
        return False
    index = irutil.defining_op(op.operands[1])
    return index is not None and index.name == "arith.constant" and ir.IntegerAttr(index.attributes["value"]).value == 0


def _row_product(bm) -> bool:
    """`bm` (a batch matmul) multiplies each row's matrix by a vector [K, 1], from zeros."""
    return len(bm.operands) == 3 and irutil.tensor_shape(bm.operands[1])[2:] == [1] and \
        irutil.zero_filled(bm.operands[2])


def _products(gather) -> tuple[list, list] | None:
    """(batch matmuls, row counts) reading the gather's result: the matmuls read it as their
    weights, each a matrix-vector product per row accumulated from zeros; nothing else reads
    it but tensor.dim of its rows.  None otherwise."""
    bms, dims = [], []
    for use in gather.result.uses:
        op = use.owner
        if _row_count(op):
            dims.append(op)
            continue
        if op.name != "linalg.batch_matmul" or use.operand_number != 0 or not _row_product(op):
            return None
        bms.append(op)
    return (bms, dims) if bms else None


def _float_expert_gather(op, sig) -> tuple[str, ir.Value, list] | None:
    """(parameter name, ids, W's shape) when `op` is torch-mlir's lowering of a float parameter W [E, N, K]
    indexed by 1-D ids along its first dim (`W[ids]`): a parallel linalg.generic over
    (row, n, k) whose body wraps a negative id by E, then yields W[id, n, k].  Else None."""
    if op.name != "linalg.generic" or len(op.operands) != 2:
        return None
    ids, out = op.operands
    if not isinstance(ids.type, ir.RankedTensorType) or str(ir.RankedTensorType(ids.type).element_type) != "i64" \
            or len(irutil.tensor_shape(ids)) != 1 or len(irutil.tensor_shape(out)) != 3:
        return None
    body = list(op.regions[0].blocks[0].operations)
    names = [o.name for o in body]
    if names not in (["arith.cmpi", "arith.addi", "arith.select", "arith.index_cast", "linalg.index", "linalg.index",
                      "tensor.extract", "linalg.yield"],
                     ["arith.index_cast", "linalg.index", "linalg.index", "tensor.extract", "linalg.yield"]):
        return None
    extract, yield_ = body[-2], body[-1]
    w_name = sig.param_of(extract.operands[0])
    shape = irutil.tensor_shape(extract.operands[0])
    if w_name is None or len(shape) != 3 or yield_.operands[0] != extract.results[0]:
        return None
    dims = [ir.IntegerAttr(o.attributes["dim"]).value for o in body if o.name == "linalg.index"]
    if dims != [1, 2] or [v.owner for v in extract.operands[2:]] != [o for o in body if o.name == "linalg.index"]:
        return None
    if len(body) == 8:  # torch's wrap of a negative index: id < 0 ? id + E : id
        cmpi, addi = body[0], body[1]
        const = irutil.defining_op(addi.operands[1])
        if ir.IntegerAttr(cmpi.attributes["predicate"]).value != 2 or const is None \
                or const.name != "arith.constant" or ir.IntegerAttr(const.attributes["value"]).value != shape[0]:
            return None
    return w_name, ids, shape


@register
class CpuSelectExpertKernels(QccPass):
    name = "cpu-select-expert-kernels"
    summary = "Replace a mixture of experts' gathered weights and batch matmul by a CPU kernel on panels"

    @dataclasses.dataclass
    class Options:
        lanes: int = 0          # f32 lanes per vector: 8 (AVX2), 16 (AVX-512); 0 = the host's
        rows: int = 4           # weight rows per panel
        threads: bool = True    # scf.parallel (OpenMP) over (row, panel) pairs

    def run(self, module):
        from qcc.backends.cpu import host, kernel_calls, kernels
        from qcc.backends.cpu.pack import LayoutError, PanelLayout, pack

        lanes = self.options.lanes or host.features()["lanes"]
        cfg = kernels.KernelConfig(threads=self.options.threads)
        store, defined = self.session.params, set()
        selected = self.session.options.setdefault("cpu_kernels", {})
        for func in irutil.functions(module):
            sig = irutil.Signature(func)
            for gather in irutil.walk(func, "qcc.gather_dequantize"):
                names = [sig.param_of(v) for v in gather.operands[1:]]
                uses = _products(gather)
                if uses is None or None in names or any(n not in store for n in names):
                    continue
                fmt = formats.parse_weight_format(format_key(gather.attributes["format"]))
                experts, n, k = (irutil.tensor_shape(gather.operands[1])[0], *irutil.tensor_shape(gather.result)[1:])
                lay = PanelLayout(fmt.key(), n, k, rows=self.options.rows, lanes=lanes, experts=experts)
                try:
                    lay.check()
                except LayoutError:
                    continue
                src = dict(zip(["codes", "scale", "zero"], names))
                arrays = pack(lay, store[src["codes"]], store[src["scale"]],
                              store[src["zero"]] if "zero" in src else None)
                args, new_names = kernel_calls.add_packed_params(store, sig, src["codes"],
                                                                 f"panels{lay.rows}x{lay.lanes}", arrays)
                kname = f"qcc_cpu_experts_{lay.format_key}_{experts}x{k}x{n}_v{lay.lanes}"
                if kname not in defined:
                    irutil.append_functions(module, kernels.gathered_qlinear(kname, lay, cfg), defined)
                ids = gather.operands[0]
                products, row_counts = uses
                for bm in products:
                    _call(bm, kname, ids, args, n, k)
                for dim in row_counts:  # the gather's rows are the ids'
                    dim.operands[0] = ids
                gather.erase()
                selected[src["codes"].rsplit(":", 2)[0]] = {"kernel": kname, "variant": "gathered gemv",
                                                            "params": new_names, **lay.to_json(), **cfg.to_json()}
            for bm in list(irutil.walk(func, "linalg.batch_matmul")):
                self._float_experts(module, sig, bm, lanes, defined, selected)
            for name in sig.erase_unused_params():
                if name in store:
                    del store[name]

    def _float_experts(self, module, sig, bm, lanes, defined, selected) -> None:
        """The float form (no quantizer ran): W[ids] gathered by a linalg.generic, then the
        batched matmul -> the f32 gathered GEMV on W where it is stored."""
        from qcc.backends.cpu import kernels

        gather = irutil.defining_op(bm.operands[0])
        found = None if gather is None else _float_expert_gather(gather, sig)
        if found is None or len(list(gather.results[0].uses)) != 1 or not _row_product(bm):
            return
        w_name, ids, (experts, n, k) = found
        if k % lanes:
            return
        kname = f"qcc_cpu_experts_f32_{experts}x{k}x{n}_v{lanes}"
        if kname not in defined:
            irutil.append_functions(module, kernels.gathered_matvec_f32(kname, experts, n, k, lanes,
                                                                        self.options.threads), defined)
        w = sig.block.arguments[sig.param_index(w_name)]
        _call(bm, kname, ids, [w], n, k)
        irutil.erase_dead_producers(gather.results[0])
        selected[w_name] = {"kernel": kname, "variant": "gathered f32 gemv"}


def _call(bm, kname: str, ids: ir.Value, args, n: int, k: int) -> None:
    """bm's result <- cast(call @kname(cast(x), cast(ids), args...)); bm and its zeros erased."""
    x, init = bm.operands[1], bm.operands[2]
    with ir.InsertionPoint(bm), bm.location:
        def cast(value, shape, elem):
            return ir.Operation.create("tensor.cast", results=[irutil.tensor_type(shape, elem)],
                                       operands=[value]).result
        call = ir.Operation.create(
            "func.call", results=[irutil.tensor_type([None, n, 1], "f32")],
            operands=[cast(x, [None, k, 1], "f32"), cast(ids, [None], "i64"), *args],
            attributes={"callee": ir.FlatSymbolRefAttr.get(kname)}).result
        y = ir.Operation.create("tensor.cast", results=[bm.results[0].type], operands=[call]).result
    bm.results[0].replace_all_uses_with(y)
    bm.erase()
    irutil.erase_dead_producers(init)

