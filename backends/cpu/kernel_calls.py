"""IR plumbing shared by the passes that swap ops for calls of CPU kernels
(cpu-select-kernels, cpu-select-int-kernels): packed weights become new
parameters, and the op's result becomes a call on the token-dynamic input (kernel
functions are appended once per module with irutil.append_functions)."""

from torch_mlir import ir

from qcc import irutil

_MLIR_ELEM = {"int32": "i32", "int8": "i8", "uint8": "i8", "float32": "f32"}


def add_packed_params(store, sig: irutil.Signature, codes_name: str, tag: str, arrays: dict):
    """Stores `arrays` (role -> numpy array) as parameters `<weight>:<format>:<tag>:<role>`
    next to the weight's `<weight>:<format>:codes`; returns (block arguments, {role: name})."""
    base = codes_name.rsplit(":", 1)[0]
    args, names = [], {}
    for role, a in arrays.items():
        name = f"{base}:{tag}:{role}"
        store[name] = a
        names[role] = name
        args.append(sig.add_param(name, irutil.tensor_type(a.shape, _MLIR_ELEM[a.dtype.name])))
    return args, names


def replace_with_call(result: ir.Value, x: ir.Value, args, kname: str, k: int, n: int,
                      ids: ir.Value | None = None) -> None:
    """Before `result`'s op: y = cast(call @kname(cast(x to ?xK)[, cast(ids to ?)], args...)) to
    result's type; all uses of `result` move to y (the caller erases the replaced ops)."""
    anchor = result.owner
    with ir.InsertionPoint(anchor), anchor.location:
        x_dyn = ir.Operation.create("tensor.cast", results=[irutil.tensor_type([None, k], "f32")],
                                    operands=[x]).result
        rows = [] if ids is None else [ir.Operation.create(
            "tensor.cast", results=[irutil.tensor_type([None], "i64")], operands=[ids]).result]
        call = ir.Operation.create(
            "func.call", results=[irutil.tensor_type([None, n], "f32")], operands=[x_dyn, *rows, *args],
            attributes={"callee": ir.FlatSymbolRefAttr.get(kname)}).result
        y = ir.Operation.create("tensor.cast", results=[result.type], operands=[call]).result
    result.replace_all_uses_with(y)
