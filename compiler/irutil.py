"""Small helpers over the MLIR Python bindings that several passes share."""

import re

from torch_mlir import ir

_VTENSOR = re.compile(r"^!torch\.vtensor<\[([^\]]*)\],(\w+)>$")


def functions(module_op: ir.Operation):
    """The func.func ops with a body of a module (module_op may be a Module or its Operation);
    declarations (e.g. the CPU kernels' intrinsics) are left out."""
    body = module_op.regions[0].blocks[0]
    return [op for op in body.operations if op.operation.name == "func.func" and len(op.regions[0].blocks)]


def walk(op, name: str | None = None):
    """All ops nested in `op` (pre-order), optionally only those named `name`."""
    found = []
    for region in op.regions:
        for block in region.blocks:
            for child in block.operations:
                child = child.operation
                if name is None or child.name == name:
                    found.append(child)
                found.extend(walk(child, name))
    return found


def append_functions(module_op: ir.Operation, text: str, defined: set) -> None:
    """Parse `text` (func.func definitions) and move its functions to the end of the module,
    skipping symbols in `defined` (shared subkernels, intrinsic declarations); adds the rest."""
    body = module_op.regions[0].blocks[0]
    parsed = ir.Module.parse(text)  # owns the functions until they are moved: keep it alive
    for f in list(parsed.body.operations):
        sym = ir.StringAttr(f.attributes["sym_name"]).value
        if sym in defined:
            f.operation.erase()
            continue
        f.operation.move_after(body.operations[len(body.operations) - 1])
        defined.add(sym)


def replace_with_call(op, callee: str, operands) -> ir.Operation:
    """Replace `op` by `func.call @callee(operands)` with the same result types."""
    with ir.InsertionPoint(op), op.location:
        call = ir.Operation.create("func.call", results=[r.type for r in op.results], operands=list(operands),
                                   attributes={"callee": ir.FlatSymbolRefAttr.get(callee)})
    for old, new in zip(op.results, call.results):
        old.replace_all_uses_with(new)
    op.erase()
    return call


def vtensor_shape(t: ir.Type) -> tuple[list, str]:
    """Shape (ints, or None for '?') and dtype of a !torch.vtensor type."""
    m = _VTENSOR.match(str(t))
    if not m:
        raise ValueError(f"not a ranked !torch.vtensor: {t}")
    dims = [None if d.strip() == "?" else int(d) for d in m.group(1).split(",") if d.strip()]
    return dims, m.group(2)


def tensor_shape(value: ir.Value) -> list:
    """Dims of a ranked builtin tensor value (None for '?')."""
    t = ir.RankedTensorType(value.type)
    return [None if t.is_dynamic_dim(i) else t.shape[i] for i in range(t.rank)]


def tensor_type(shape, elem: str) -> ir.Type:
    dims = "x".join("?" if d is None else str(d) for d in shape)
    return ir.Type.parse(f"tensor<{dims}x{elem}>" if dims else f"tensor<{elem}>")


def vtensor_type(shape, dtype: str = "f32") -> ir.Type:
    """!torch.vtensor<[shape],dtype> (None for '?')."""
    dims = ",".join("?" if d is None else str(d) for d in shape)
    return ir.Type.parse(f"!torch.vtensor<[{dims}],{dtype}>")


def const_int(value: int) -> ir.Value:
    """A new torch.constant.int (at the current insertion point)."""
    return ir.Operation.create("torch.constant.int", results=[ir.Type.parse("!torch.int")],
                               attributes={"value": ir.IntegerAttr.get(ir.IntegerType.get_signless(64), value)}).result


def const_bool(value: bool) -> ir.Value:
    """A new torch.constant.bool (at the current insertion point)."""
    return ir.Operation.create("torch.constant.bool", results=[ir.Type.parse("!torch.bool")],
                               attributes={"value": ir.BoolAttr.get(value)}).result


def const_none() -> ir.Value:
    """A new torch.constant.none (at the current insertion point)."""
    return ir.Operation.create("torch.constant.none", results=[ir.Type.parse("!torch.none")]).result


def f32_splat(shape, value: float) -> ir.Value:
    """A new arith.constant tensor<shape x f32> of `value` everywhere (at the current insertion point)."""
    ty = tensor_type(shape, "f32")
    return ir.Operation.create("arith.constant", results=[ty], attributes={"value": ir.DenseElementsAttr.get_splat(
        ty, ir.FloatAttr.get(ir.F32Type.get(), float(value)))}).result


def int_list(items) -> ir.Value:
    """A new !torch.list<int> of `items` (ints, made constants, or !torch.int values)."""
    values = [const_int(v) if isinstance(v, int) else v for v in items]
    return ir.Operation.create("torch.prim.ListConstruct", results=[ir.Type.parse("!torch.list<int>")],
                               operands=values).result


def defining_op(value: ir.Value):
    owner = value.owner
    return owner.operation if isinstance(owner, (ir.OpView, ir.Operation)) else None


def zero_filled(value: ir.Value) -> bool:
    """`value` is `linalg.fill` of the float constant 0 (a contraction's accumulator from zeros)."""
    op = defining_op(value)
    if op is None or op.name != "linalg.fill":
        return False
    cst = defining_op(op.operands[0])
    return cst is not None and cst.name == "arith.constant" and ir.FloatAttr(cst.attributes["value"]).value == 0.0


# ops without side effects that a rewrite may leave without users
_PURE = {"tensor.collapse_shape", "tensor.expand_shape", "tensor.extract_slice", "tensor.concat", "tensor.empty",
         "linalg.transpose", "linalg.fill", "arith.constant"}


def erase_dead_producers(value: ir.Value) -> None:
    """Erases `value`'s defining op if nothing uses its results and it is one of _PURE or a
    linalg.generic on tensors, then its operands' producers likewise (what a rewrite that
    stopped reading `value` left behind)."""
    op = defining_op(value)
    if op is None or any(list(r.uses) for r in op.results):
        return
    tensor_generic = op.name == "linalg.generic" and all(isinstance(v.type, ir.RankedTensorType)
                                                         for v in op.operands)
    if op.name not in _PURE and not tensor_generic:
        return
    operands = list(op.operands)
    op.erase()
    for v in operands:
        erase_dead_producers(v)


def block_arg_number(value: ir.Value) -> int | None:
    value = value.maybe_downcast() if hasattr(value, "maybe_downcast") else value
    return value.arg_number if isinstance(value, ir.BlockArgument) else None


def const_int_list(value: ir.Value) -> list[int] | None:
    """The ints of a torch.prim.ListConstruct of torch.constant.int, else None."""
    op = defining_op(value)
    if op is None or op.name != "torch.prim.ListConstruct":
        return None
    out = []
    for v in op.operands:
        c = defining_op(v)
        if c is None or c.name != "torch.constant.int":
            return None
        out.append(ir.IntegerAttr(c.attributes["value"]).value)
    return out


class Signature:
    """Edits a func.func's arguments and their `qcc.param` names together."""

    def __init__(self, func):
        self.func = func.operation
        self.block = self.func.regions[0].blocks[0]

    def _arg_attrs(self) -> list[ir.Attribute]:
        n = len(self.block.arguments)
        if "arg_attrs" in self.func.attributes:
            attrs = list(ir.ArrayAttr(self.func.attributes["arg_attrs"]))
        else:
            attrs = []
        return attrs + [ir.DictAttr.get({}, context=self.func.context)] * (n - len(attrs))

    def param_name(self, index: int) -> str | None:
        d = ir.DictAttr(self._arg_attrs()[index])
        return ir.StringAttr(d["qcc.param"]).value if "qcc.param" in d else None

    def state_name(self, index: int) -> str | None:
        """The state (a buffer forward() updates) argument `index` carries in, if any."""
        d = ir.DictAttr(self._arg_attrs()[index])
        return ir.StringAttr(d["qcc.state"]).value if "qcc.state" in d else None

    def param_of(self, value: ir.Value) -> str | None:
        """The parameter name `value` is bound to, if it is a parameter argument of this function."""
        index = block_arg_number(value)
        return self.param_name(index) if index is not None else None

    def param_index(self, name: str) -> int | None:
        for i in range(len(self.block.arguments)):
            if self.param_name(i) == name:
                return i
        return None

    def _sync(self, attrs):
        ftype = ir.FunctionType(ir.TypeAttr(self.func.attributes["function_type"]).value)
        inputs = [a.type for a in self.block.arguments]
        self.func.attributes["function_type"] = ir.TypeAttr.get(ir.FunctionType.get(inputs, ftype.results))
        self.func.attributes["arg_attrs"] = ir.ArrayAttr.get(attrs)

    def add_param(self, name: str, type_: ir.Type) -> ir.Value:
        """Appends an argument bound to store entry `name` (reusing one that exists)."""
        existing = self.param_index(name)
        if existing is not None:
            return self.block.arguments[existing]
        attrs = self._arg_attrs()
        arg = self.block.add_argument(type_, self.func.location)
        attrs.append(ir.DictAttr.get({"qcc.param": ir.StringAttr.get(name)}))
        self._sync(attrs)
        return arg

    def erase_unused_params(self) -> list[str]:
        """Drops parameter arguments nothing uses; returns their names."""
        attrs = self._arg_attrs()
        dropped = []
        for i in reversed(range(len(self.block.arguments))):
            name = self.param_name(i)
            if name is not None and not list(self.block.arguments[i].uses):
                self.block.erase_argument(i)
                del attrs[i]
                dropped.append(name)
        self._sync(attrs)
        return dropped
