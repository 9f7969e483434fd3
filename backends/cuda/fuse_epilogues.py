"""A decode GEMV and the elementwise launch that consumes its output -> one launch (plan level).

After a weight GEMV at decode comes an elementwise op over its output row: the residual add
after o_proj and down_proj, SwiGLU after the stacked gate/up GEMV. As a launch of its own it
costs a kernel boundary and, for SwiGLU, 5632 exp/divide chains on the one SM of a one-block
kernel (fuse_launches.py). Here it runs in the GEMV's epilogue instead: lane 0 of each warp,
which holds the GEMV's scaled results for its output n, loads the op's other inputs at n,
replays the op's body (linalg_kernels._Replay, its numerics op for op) and stores its outputs;
the GEMV's own result is never stored. When the op reads the outputs of several stacked
layers at one index (gate and up), the GEMV interleaves them: each warp owns row n of every
layer (``interleave`` of kernels.gemv_i8 / gemv_i4g), so that one lane has all of them.

Valid when every operand of the op is the point's own element (each output element is then
read and written by the one lane that computes it, however the blocks run), the op has no
captured buffers, its outputs are nothing the GEMV reads, and the GEMV's results are read by
nothing else (later launches, plan outputs).
"""
from __future__ import annotations

import hashlib
import math

import numpy as np

from . import kernels
from . import linalg_kernels as lk
from .emit import Param

TAILS = ("gemv_i8", "gemv_i4g")  # GEMV kinds that take an epilogue (scaled f32 results)
MAX_ROWS = 8  # m_max of those GEMVs (decode)


def _own_element(op, loops) -> bool:
    """Operand `op` reads or writes element p at linear loop point p (every point checked)."""
    return bool(np.array_equal(lk.flat_at_points(op, loops), np.arange(math.prod(loops))))


def _match(L, G, later, specs, descs, buffers):
    """(desc, member of each op input or None, Nm) when launch G can be L's epilogue, else None."""
    spec = specs[L["kernel"]]
    cfg = spec.config
    if (cfg.get("kind") not in TAILS or not cfg.get("scaled") or cfg.get("m_max", MAX_ROWS + 1) > MAX_ROWS
            or cfg.get("interleave")):
        return None
    desc = descs.get(G["kernel"]) if G is not None else None
    if desc is None or desc.captures or any(t != "parallel" for t in desc.iters) or lk.classify(desc) != "elementwise":
        return None
    members = cfg["members"]
    bound = dict(zip((p.name for p in spec.params), L["args"]))
    ys = [bound["y" if len(members) == 1 else f"y{i}"] for i in range(len(members))]
    y_buf = {a["buf"]: i for i, a in enumerate(ys)}
    if any(a["offset"] for a in ys) or len(set(members)) != 1:
        return None
    gemv_reads = {a["buf"] for p, a in zip(spec.params, L["args"]) if p.is_buffer and p.role != "out"}
    views = [o for o in desc.ins if o.const is None] + list(desc.outs)
    args = G["args"][:len(views)]
    if len(G["args"]) != len(views) or any(not _own_element(o, desc.loops) for o in views):
        return None
    n_in = len(views) - len(desc.outs)
    if any(a["buf"] in gemv_reads or a["buf"] in y_buf for a in args[n_in:]):
        return None  # an output the GEMV reads, or a result of it written over
    member = [y_buf[a["buf"]] if a["buf"] in y_buf else None for a in args[:n_in]]
    if sorted(m for m in member if m is not None) != list(range(len(members))):
        return None  # each stacked result read once
    rows = bound["M"]["scalar"]
    if math.prod(desc.loops) != rows * members[0]:
        return None
    dead = not any(a.get("buf") in y_buf for L2 in later for a in L2["args"]) and \
        not any(buffers[b].get("output") for b in y_buf)
    return (desc, member, members[0]) if dead else None


def _epilogue(desc, member, Nm):
    """(extra params, fn) for kernels.gemv_i8 / gemv_i4g: desc's body at output (r, n) of the GEMV."""
    views = [o for o in desc.ins if o.const is None]
    params, names = [], []
    for j, (o, m) in enumerate(zip(views, member)):
        if m is None:
            params.append(Param(f"e_in{j}", f"memref<{max(o.span, 1)}x{o.elem}>", "alias" if o.alias else "in"))
        names.append(f"e_in{j}" if m is None else m)
    for k, o in enumerate(desc.outs):
        params.append(Param(f"e_out{k}", f"memref<{max(o.span, 1)}x{o.elem}>", "alias" if o.alias else "out"))
    used = lk._used_args(desc)

    def fn(E, a, r, n, values):
        p = E.const(r * Nm, "index") + n
        dims = lk._decompose(E, p, desc.loops)
        it = iter(names)
        args = []
        for i, o in enumerate(desc.ins):
            if o.const is not None:
                args.append(lk._load_in(E, a, desc, i, dims))
                continue
            nm = next(it)
            args.append(values[nm] if isinstance(nm, int) else E.load(a[nm], p) if i in used else None)
        args += [E.load(a[f"e_out{k}"], p) if len(desc.ins) + k in used else None for k in range(len(desc.outs))]
        get = lk._Replay(E, desc, a).run(args, dims)
        for k in range(len(desc.outs)):
            E.store(get(desc.yields[k]), a[f"e_out{k}"], p)
    return params, fn


def fuse_gemv_epilogues(launches: list[dict], specs: dict, descs: dict, buffers: list[dict]) -> list[dict]:
    """Replaces each decode GEMV launch followed by an elementwise launch that consumes its
    results (as above) by one launch; adds the kernels to `specs`. Returns the new launch list."""
    out, i = [], 0
    while i < len(launches):
        L = launches[i]
        G = launches[i + 1] if i + 1 < len(launches) else None
        m = _match(L, G, launches[i + 2:], specs, descs, buffers)
        if m is None:
            out.append(L)
            i += 1
            continue
        desc, member, Nm = m
        cfg = specs[L["kernel"]].config
        interleave = len(cfg["members"]) > 1
        common = dict(m_max=cfg["m_max"], warps=cfg["warps"], n_rows=None if interleave else cfg["n_rows"],
                      scaled=cfg["scaled"], members=cfg["members"], interleave=interleave,
                      epilogue=_epilogue(desc, member, Nm), name="gemv_epilogue")
        if cfg["kind"] == "gemv_i8":
            spec = kernels.gemv_i8(cfg["K"], cfg["N"], unroll=cfg["unroll"], w_bits=cfg["w_bits"], **common)
        else:
            spec = kernels.gemv_i4g(cfg["K"], cfg["N"], cfg["group_size"], **common)
        h = hashlib.sha1(spec.mlir_func().encode()).hexdigest()[:12]
        spec.name = f"{L['kernel']}_e_{h}"
        spec.config["epilogue"] = G["kernel"]
        specs.setdefault(spec.name, spec)
        # the op's arguments but the GEMV results it reads: its other inputs, then its outputs
        extra_args = [a for a, mb in zip(G["args"], member + [None] * len(desc.outs)) if mb is None]
        out.append({"kernel": spec.name, "grid": list(spec.grid), "block": list(spec.block),
                    "args": L["args"] + extra_args, "writes": list(G["writes"]), "layer": L.get("layer"),
                    "fused": [L["kernel"], G["kernel"]]})
        i += 2
    return out
