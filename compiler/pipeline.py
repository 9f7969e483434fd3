"""Pipelines as data: a list of pass names (qcc's) and upstream pipeline text.

`parse_pipeline("qcc-a{x=1},canonicalize,func.func(cse)")` splits at top-level
commas.  Registered qcc passes become Python passes inside the same MLIR
PassManager as the upstream ones, so IR is verified after every pass and
`--print-ir-after-all` shows both.  On failure the input IR is saved and the
error ends with the command that reproduces it.
"""

import dataclasses
import os
import re
import tempfile
import typing

from torch_mlir import ir, passmanager

from qcc import passes as pass_registry
from qcc.errors import QccError


@dataclasses.dataclass
class Session:
    """What passes share besides the IR: the parameter store and build options."""

    params: "object"  # qcc.params.ParamStore
    options: dict = dataclasses.field(default_factory=dict)
    remarks: list = dataclasses.field(default_factory=list)
    # base weight name -> {"format": key, "shape": [N, K]}, filled by quantizing passes
    layers: dict = dataclasses.field(default_factory=dict)
    user_errors: int = 0


def split_top_level(text: str) -> list[str]:
    parts, depth, cur = [], 0, []
    for ch in text:
        if ch in "({<[":
            depth += 1
        elif ch in ")}>]":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append("".join(cur).strip())
            cur = []
        else:
            cur.append(ch)
    if "".join(cur).strip():
        parts.append("".join(cur).strip())
    return [p for p in parts if p]


def _parse_options(pass_cls, text: str):
    fields = {f.name.replace("_", "-"): f for f in dataclasses.fields(pass_cls.Options)}
    values = {}
    for item in text.split():
        key, eq, val = item.partition("=")
        if key not in fields or not eq:
            allowed = ", ".join(fields) or "none"
            raise QccError(f"unknown option '{item}' for pass {pass_cls.name}",
                           hint=f"options: {allowed}")
        f = fields[key]
        typ = f.type if not isinstance(f.type, str) else eval(f.type)  # noqa: S307 (dataclass annotations)
        if typ is bool:
            values[f.name] = val.lower() in ("1", "true", "yes")
        elif typ in (int, float):
            try:
                values[f.name] = typ(val)
            except ValueError:
                raise QccError(f"option {key} of pass {pass_cls.name} expects {typ.__name__}, got '{val}'")
        else:
            values[f.name] = val
    return pass_cls.Options(**values)


def parse_element(element: str):
    """Returns (qcc pass class, options) or (None, upstream text)."""
    name, brace, rest = element.partition("{")
    pass_cls = pass_registry.lookup(name.strip())
    if pass_cls is None:
        return None, element
    if brace and not rest.endswith("}"):
        raise QccError(f"unbalanced braces in pipeline element '{element}'")
    return pass_cls, _parse_options(pass_cls, rest[:-1] if brace else "")


def _python_pass(pass_obj, session):
    def run(op, mlir_pass):
        try:
            pass_obj.run(op)
        except pass_registry.PassError as e:
            where = e.op if e.op is not None else op
            where.location.emit_error(f"{pass_obj.name}: {e.message}")
            session.user_errors += 1
            mlir_pass.signal_pass_failure()
    return run


def build_pass_manager(ctx: ir.Context, pipeline: typing.Sequence[str], session: Session,
                       print_ir_after_all: bool = False) -> passmanager.PassManager:
    with ctx:
        pm = passmanager.PassManager("builtin.module")
        for element in pipeline:
            pass_cls, opts = parse_element(element)
            if pass_cls is None:
                try:
                    pm.add(opts)
                except ValueError as e:
                    raise QccError(f"unknown pass or bad pipeline element '{element}': {e}",
                                   hint="run `qcc-opt --list-passes` for qcc passes")
            else:
                pm.add(_python_pass(pass_cls(session, opts), session), name=pass_cls.name,
                       argument=pass_cls.name, description=pass_cls.summary)
        if print_ir_after_all:
            ctx.enable_multithreading(False)
            pm.enable_ir_printing()
    return pm


def expand(pipeline: typing.Sequence[str] | str) -> list[str]:
    if isinstance(pipeline, str):
        return split_top_level(pipeline)
    out = []
    for p in pipeline:
        out.extend(split_top_level(p))
    return out


def run_pipeline(module: ir.Module, pipeline, session: Session, stage: str,
                 print_ir_after_all: bool = False) -> None:
    """Runs `pipeline` on `module` in place; a failure raises QccError with a repro."""
    elements = expand(pipeline)
    ctx = module.context
    pm = build_pass_manager(ctx, elements, session, print_ir_after_all)
    # the input, for the repro of a failed stage: a copy is much cheaper than printing
    before = module.operation.clone()
    errors_before = session.user_errors
    try:
        with ctx:
            pm.run(module.operation)
    except ir.MLIRError as e:
        diags = list(e.error_diagnostics)
        where = source_location(diags[0].location) if diags else None
        what = "; ".join(_message(d) for d in diags) or str(e)
        if session.user_errors > errors_before:
            raise QccError(what, where=where)  # a qcc pass rejected the input: no repro needed
        unsupported = _UNSUPPORTED_OP.search(what)
        if unsupported:  # an aten op torch-mlir has no lowering for: the model's problem, said plainly
            raise QccError(f"PyTorch op {unsupported.group(1)} is not supported (torch-mlir cannot lower it)",
                           where=where, hint="write that part of the model with other ops")
        fd, path = tempfile.mkstemp(prefix=f"qcc-{stage}-", suffix=".mlir")
        with os.fdopen(fd, "w") as f:
            f.write(before.get_asm(enable_debug_info=True, large_elements_limit=16))
        repro = f"qcc-opt {path} -p '{','.join(elements)}'"
        raise QccError(f"{stage} failed: {what}", where=where, hint=f"reproduce with: {repro}")


_FRAME = re.compile(r'"([^"]+)":(\d+):(\d+)')
_UNSUPPORTED_OP = re.compile(r"failed to legalize operation 'torch\.operator'.*?name = \"torch\.(aten\.[\w.]+)\"")


def source_location(loc) -> str | None:
    """`file:line:col` of a location; for call stacks, the innermost frame outside torch itself."""
    frames = _FRAME.findall(str(loc))
    if not frames:
        return None
    user = [f for f in frames if "/site-packages/torch/" not in f[0]]
    path, line, col = (user or frames)[0]
    return f"{path}:{line}:{col}"


def _message(d) -> str:
    notes = "".join(f" [note: {n.message}]" for n in d.notes if "see current operation" not in n.message)
    return f"{d.message}{notes}"
