"""An elementwise op that feeds a one-row quantize_rows -> computed inside it (plan level).

At decode a token's activations are quantized right after the elementwise op that makes
them: RMSNorm's normalize-and-scale before q/k/v and gate/up, SwiGLU's silu(g) * u before
the down projection. As separate stages (even inside one fused block) the quantization
waits for the elementwise op's stores and loads them back: an L2 round trip more, on the
critical path of every layer. Here the pair becomes one quantize_rows kernel whose x is
the elementwise op's body replayed at each element (its inputs loaded instead of x); it
still stores the op's output, so nothing downstream changes, and the numerics are the
same ops in the same order (bit for bit).

Only one-row launches (m_max 1, decode) are folded: at prefill the pair runs row-fused
(fuse_launches.fuse_row_launches), whose row analysis reads quantize_rows' row parameters.
"""
from __future__ import annotations

import hashlib

from . import kernels
from . import linalg_kernels as lk
from .emit import Param


def _foldable(desc, launch, q_launch, spec, buffers) -> bool:
    cfg = spec.config
    if cfg.get("kind") != "quantize_rows" or cfg.get("m_max") != 1 or q_launch["grid"] != [1, 1, 1]:
        return False
    if desc is None or lk.classify(desc) != "elementwise" or len(desc.outs) != 1 or desc.outs[0].elem != "f32":
        return False
    K = cfg["K"]
    out = launch["args"][sum(o.const is None for o in desc.ins)]
    if q_launch["args"][0] != out or out["offset"] or buffers[out["buf"]]["bytes"] != 4 * K:
        return False
    o = desc.outs[0]
    return all(lk._flat(None, o, lk._decompose(None, p, desc.loops)) == p for p in range(K))


def _folded(desc, launch, q_launch, spec):
    """The quantize_rows kernel computing x with desc's body, and its launch."""
    cfg = spec.config
    own = [Param("p_" + p.name, p.type, p.role, p.doc) for p in lk._params(desc)]
    used = lk._used_args(desc)

    def values(E, a, base, c, ok):
        sa = {p.name[2:]: a[p.name] for p in own}
        vals = []
        for j in range(4):
            flat = base + c * 4 + j
            dims = lk._decompose(E, flat, desc.loops)
            args = lk._load_ins(E, sa, desc, dims, used) + [None] * len(desc.outs)
            v = lk._Replay(E, desc, sa).run(args, dims)(desc.yields[0])
            at = lk._ix(E, lk._flat(E, desc.outs[0], dims))
            if ok is None:
                E.store(v, sa["out0"], at)
            else:
                E.if_(ok, lambda v=v, at=at: E.store(v, sa["out0"], at))
            vals.append(v)
        return vals

    q = kernels.quantize_rows(cfg["K"], qmin=cfg["qmin"], qmax=cfg["qmax"], clip=cfg["clip"], m_max=1,
                              warps=cfg["warps"], name="quantize_rows_folded", producer=(own, values))
    h = hashlib.sha1(q.mlir_func().encode()).hexdigest()[:12]
    q.name = f"{spec.name}_f{h}"
    q.config = dict(q.config, producer=launch["kernel"])
    q.doc = f"{q.doc} x computed by {launch['kernel']}'s body (fold_producers.py)"
    args = list(launch["args"]) + list(q_launch["args"][1:])
    return q, {"kernel": q.name, "grid": [1, 1, 1], "block": list(q.block), "args": args,
               "writes": sorted(set(launch["writes"]) | set(q_launch["writes"]))}


def fold_quantize_producers(launches: list[dict], specs: dict, descs: dict, buffers: list[dict]) -> list[dict]:
    """Replaces each (elementwise op, one-row quantize_rows of its output) pair of consecutive
    launches by one quantize_rows launch computing x itself; adds the kernels to `specs`."""
    out, i = [], 0
    while i < len(launches):
        L = launches[i]
        if i + 1 < len(launches):
            Q = launches[i + 1]
            d, qs = descs.get(L["kernel"]), specs[Q["kernel"]]
            if _foldable(d, L, Q, qs, buffers):
                spec, launch = _folded(d, L, Q, qs)
                specs.setdefault(spec.name, spec)
                out.append(launch)
                i += 2
                continue
        out.append(L)
        i += 1
    return out
