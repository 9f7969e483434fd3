"""The one factory for MLIR contexts: upstream dialects, torch, and `qcc` (IRDL)."""

import re
from importlib import resources

from torch_mlir import ir, passmanager
from torch_mlir.dialects import irdl
from torch_mlir.dialects import torch as torch_d

_FORMAT_ATTR = re.compile(r'^#qcc\.format<"([^"]*)">$')


def make_context() -> ir.Context:
    ctx = ir.Context()
    torch_d.register_dialect(ctx)
    ctx.load_all_available_dialects()
    # torch_c (the torch <-> builtin tensor casts) has no Python registration;
    # running a pass that depends on it on a tiny module loads it.
    with ctx, ir.Location.unknown():
        passmanager.PassManager.parse("builtin.module(func.func(convert-torch-to-linalg))").run(
            ir.Module.parse("func.func private @qcc_load_torch_c()").operation)
    text = resources.files("qcc.dialects").joinpath("qcc.irdl.mlir").read_text()
    with ctx, ir.Location.unknown():
        irdl.load_dialects(ir.Module.parse(text))
    return ctx


def format_attr(key: str) -> ir.Attribute:
    """`#qcc.format<"key">` in the current context."""
    return ir.Attribute.parse(f'#qcc.format<"{key}">')


def format_key(attr: ir.Attribute) -> str:
    m = _FORMAT_ATTR.match(str(attr))
    if not m:
        raise ValueError(f"not a #qcc.format attribute: {attr}")
    return m.group(1)
