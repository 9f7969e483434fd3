"""Decode attention -> a split-over-keys kernel and a combine (plan level, after host_plan).

At decode one query row per head attends to the whole KV cache, and the plan runs it as
the launches the linalg ops give: the scores (q @ k^T, a warp a score, RoPE and the cache
concatenation replayed inside), elementwise epilogues on them (the 1/sqrt(d) scale),
softmax's max, ``exp(s - max)`` and sum, then probabilities @ V with softmax's division
fused in (split_reduce). On the H200 that was ~1/3 of a w8a8 decode step: five launches,
softmax in one block, p @ v on 64 blocks. This pass matches that sequence on the generic
ops' descriptions and replaces it by two launches (the split form of FlashDecoding):

* ``attn_split``: block (row r, chunk c of CHUNK keys). It first issues the chunk's V
  loads (threads along d, V's producer ops replayed: they do not depend on the scores),
  then warps compute the chunk's scores (lanes along the contraction, every key's loads
  before any product; the body ops that do not depend on the key, e.g. the query's RoPE,
  once per lane) and apply the epilogues; the block takes the chunk's max m_c,
  p = exp(s - m_c) with the exp op's own body, l_c = sum p and acc_c[d] = sum_n p_n v[n, d]
  -> scratch.
* ``attn_combine``: block a row: m = max_c m_c, w_c = exp(m_c - m) (a chunk a lane, the
  weights through shared memory), out[d] = init + (sum_c w_c acc_c[d]) / (sum_c w_c l_c).

Only the scores, max and sum buffers disappear, and only when nothing else reads them.
Numerics: the same body ops; the normalization moves after the sum over keys
(``(sum p v) / l`` instead of ``sum (p / l) v``) and the max is combined per chunk, so
results differ from the separate launches by rounding (the tests' float64 oracles bound it).
Prefill's q @ k^T is a tile_contract and does not match: this is the one-query-row form.

An elementwise launch right after the combine that reads its output (the split of attention's
output into f16 hi + lo rows for the o_proj GEMV of the weight-only recipes) runs in the
combine's stores instead (CONSUMER): each combine thread holding element l replays the op's
body at every loop point that reads l (l, l + R * D, ...), and the combine's own output,
read by nothing else, is not stored. One launch fewer a layer.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np

from . import linalg_kernels as lk
from .emit import KernelSpec, Param

CHUNK = 32  # keys a block of attn_split takes (513 keys x 16 heads: 272 blocks on 132 SMs)
SPLIT_WARPS = 4  # attn_split: warps computing scores (CHUNK / SPLIT_WARPS keys each)
# the q @ k^T kernels matched: with prefill's tile_contract ones too (16 heads x 128 queries,
# a block per query and chunk) w8a8 sm_90a prefill went 325.6 -> 428.0 us on the H200
# (bench_h200_attention_prefill.log): a query a block rereads K and V 128 times
QK_FORMS = ("warp_reduce",)
CONSUMER = True  # the elementwise launch after the combine in the combine's stores; A/B switch
_F32 = "f32"


@dataclass
class _Op:
    """One launch of the matched sequence and the description of its generic op."""

    desc: lk.GenericDesc
    launch: dict


@dataclass
class _Attention:
    qk: _Op
    epilogues: list  # (_Op, index of the scores input)
    mx: _Op
    ex: _Op
    pv: _Op
    s_in: tuple  # (exp's scores input, exp's max input)
    pv_refs: tuple  # (probability input, sum input, divf op, product op)
    rows: int
    keys: int
    head: int  # V's head dim: the outputs per row
    removed: set  # buffers only the sequence touched (scores, max, sum)


def _n_ins(desc, upto=None):
    """Launch arguments of desc's inputs [0, upto) (its scalar constants have none)."""
    return sum(o.const is None for o in desc.ins[:upto])


def _n_views(desc):
    """Launch arguments before the captures: the buffer inputs and the outputs."""
    return _n_ins(desc) + len(desc.outs)


def _out_arg(desc, launch):
    """The launch argument bound to output 0 (None for a kernel without outputs)."""
    args, at = launch["args"], _n_ins(desc)
    return args[at] if at < len(args) and desc.outs else None


def _whole(arg, roots, n) -> bool:
    """arg is a whole f32 buffer of n elements."""
    return arg is not None and "buf" in arg and arg["offset"] == 0 and roots[arg["buf"]]["bytes"] == 4 * n


def _dead_after(launches, j, buf, descs, roots) -> bool:
    """Nothing from launch j on reads `buf` before a generic op overwrites all of it."""
    from .host_plan import ESIZE

    for L in launches[j:]:
        d = descs.get(L["kernel"])
        args = L["args"]
        if d is None:  # a prebuilt kernel: taken to read every buffer it is given
            if any(a.get("buf") == buf for a in args):
                return False
            continue
        n_ins, n_views = _n_ins(d), _n_views(d)
        if any(a.get("buf") == buf for a in args[:n_ins] + args[n_views:]):
            return False
        hits = [k for k, a in enumerate(args[n_ins:n_views]) if a.get("buf") == buf]
        if not hits:
            continue
        used = lk._used_args(d)
        for k in hits:
            o = d.outs[k]
            if not (args[n_ins + k]["offset"] == 0 and math.prod(o.shape) == o.span
                    and o.span * ESIZE.get(o.elem, 0) == roots[buf]["bytes"] and d.n_in + k not in used
                    and (lk.classify(d, tile=False) == "elementwise" or k in d.out_init)):
                return False
        return True
    return True


def _arg_of(desc, launch, i):
    """The launch argument bound to input i (None: a constant)."""
    if desc.ins[i].const is not None:
        return None
    return launch["args"][_n_ins(desc, i)]


def _row_dims(E, desc, rows_at, r, inner: dict):
    """Loop dims of `desc` for row r (row-major over the loops in rows_at) and the other
    loops' values from `inner` (loop -> value)."""
    dims = [0] * len(desc.loops)
    for i, v in zip(rows_at, lk._decompose(E, r, [desc.loops[i] for i in rows_at])):
        dims[i] = v
    for i, v in inner.items():
        dims[i] = v
    return dims


def _flat_is(op, desc, rows_at, R, inner_dim, n_inner, want) -> bool:
    """Operand `op` of `desc` reads element want(r, j) at row r, inner loop value j (every
    point checked: the maps may hold floordiv / mod)."""
    if op.elem != _F32:
        return False
    r = np.repeat(np.arange(R), n_inner)
    j = np.tile(np.arange(n_inner), R)
    d = _row_dims(lk.Points, desc, rows_at, r, {inner_dim: j} if inner_dim is not None else {})
    return bool(np.array_equal(np.broadcast_to(lk._flat(lk.Points, op, d), r.shape), want(r, j)))


def _split(desc):
    par = [i for i, t in enumerate(desc.iters) if t == "parallel"]
    red = [i for i, t in enumerate(desc.iters) if t == "reduction"]
    return par, red


def _reduce(desc, launch, name, src, buf_len, rows):
    """desc is a reduction over the last loop with combiner `name` of input `src` (at
    r * buf_len + n) into a row vector started from a constant; returns its output buffer."""
    if lk.classify(desc, tile=False) not in ("warp_reduce", "block_reduce"):
        return None
    cb = lk._combiner(desc)
    par, red = _split(desc)
    if cb is None or desc.body[cb[0]].name not in name or red != [len(desc.loops) - 1]:
        return None
    if math.prod(desc.loops[i] for i in par) != rows or desc.loops[red[0]] != buf_len or 0 not in desc.out_init:
        return None
    ref = cb[1]
    if ref[0] != "arg" or _arg_of(desc, launch, ref[1]) is None or _arg_of(desc, launch, ref[1])["buf"] != src:
        return None
    if len(desc.body) != 1 or desc.captures:
        return None
    ok = _flat_is(desc.ins[ref[1]], desc, par, rows, red[0], buf_len, lambda r, j: r * buf_len + j)
    out = desc.outs[0]
    if not ok or not _flat_is(out, desc, par, rows, None, 1, lambda r, j: r):
        return None
    return _out_arg(desc, launch)


def _match(launches, i, descs, roots):
    """The attention sequence starting at launch i, or None."""
    def desc(k):
        return descs.get(launches[k]["kernel"]) if k < len(launches) else None

    d = desc(i)
    if d is None or lk.classify(d) not in QK_FORMS:
        return None
    cb = lk._combiner(d)
    par, red = _split(d)
    if cb is None or d.body[cb[0]].name != "arith.addf" or len(red) != 1 or red[0] != len(d.loops) - 1:
        return None
    if len(par) < 2 or 0 not in d.out_init or d.yields != [("op", cb[0], 0)]:
        return None
    n_dim, rows_at = par[-1], par[:-1]
    R, N = math.prod(d.loops[j] for j in rows_at), d.loops[n_dim]
    s_arg = _out_arg(d, launches[i])
    if s_arg is None or "buf" not in s_arg:
        return None
    S = s_arg["buf"]
    if s_arg["offset"] or roots[S]["bytes"] != 4 * R * N or N < 2:
        return None
    want = lambda r, j: r * N + j  # noqa: E731  (row-major rows x keys)
    if not _flat_is(d.outs[0], d, rows_at, R, n_dim, N, want):
        return None
    qk = _Op(d, launches[i])
    k = i + 1
    epilogues = []
    scores = [S]  # the buffers the scores pass through (epilogues may write new ones)
    while (e := desc(k)) is not None and lk.classify(e) == "elementwise":
        ep, _ = _split(e)
        ins = [j for j in range(e.n_in) if (a := _arg_of(e, launches[k], j)) is not None and a["buf"] == S]
        out = _out_arg(e, launches[k])
        if len(ins) != 1 or len(e.outs) != 1 or not _whole(out, roots, R * N) or ep[-1] != len(e.loops) - 1:
            return None
        if any(a.get("buf") == S for a in launches[k]["args"][_n_views(e):]):
            return None  # a capture of the scores
        if math.prod(e.loops[:-1]) != R or e.loops[-1] != N or not (
                _flat_is(e.ins[ins[0]], e, ep[:-1], R, ep[-1], N, want)
                and _flat_is(e.outs[0], e, ep[:-1], R, ep[-1], N, want)):
            return None
        epilogues.append((_Op(e, launches[k]), ins[0]))
        S = out["buf"]
        scores.append(S)
        k += 1
    # softmax: max, exp(s - max), sum
    mx = desc(k)
    if mx is None or (M := _reduce(mx, launches[k], ("arith.maximumf", "arith.maxnumf"), S, N, R)) is None:
        return None
    ex = desc(k + 1)
    if ex is None or lk.classify(ex) != "elementwise" or len(ex.outs) != 1:
        return None
    b = ex.body
    if [o.name for o in b] != ["arith.subf", "math.exp"] or b[1].operands != [("op", 0, 0)] or ex.yields != [("op", 1, 0)]:
        return None
    (sa, sj), (ma, mj) = [(r[0], r[1]) for r in b[0].operands]
    if sa != "arg" or ma != "arg" or sj >= ex.n_in or mj >= ex.n_in:
        return None
    ep_, _ = _split(ex)
    L1 = launches[k + 1]
    if (_arg_of(ex, L1, sj) or {}).get("buf") != S or (_arg_of(ex, L1, mj) or {}).get("buf") != M["buf"]:
        return None
    if not _whole(_out_arg(ex, L1), roots, R * N) or ex.captures:
        return None
    if not (_flat_is(ex.ins[sj], ex, ep_[:-1], R, ep_[-1], N, want) and _flat_is(ex.outs[0], ex, ep_[:-1], R, ep_[-1], N, want)
            and _flat_is(ex.ins[mj], ex, ep_[:-1], R, None, 1, lambda r, j: r) and M["offset"] == 0):
        return None
    S = _out_arg(ex, L1)["buf"]  # the probabilities (unnormalized)
    scores.append(S)
    sm = desc(k + 2)
    if sm is None or (L := _reduce(sm, launches[k + 2], ("arith.addf",), S, N, R)) is None or L["offset"]:
        return None
    if sm.out_init[0][1] != 0.0:
        return None
    # p @ v with the division by the sum
    pv = desc(k + 3)
    if pv is None or lk.classify(pv, tile=False) not in ("split_reduce", "warp_reduce"):
        return None
    cb = lk._combiner(pv)
    pp, pr = _split(pv)
    if cb is None or pv.body[cb[0]].name != "arith.addf" or pr != [len(pv.loops) - 1] or pv.loops[-1] != N:
        return None
    if math.prod(pv.loops[j] for j in pp[:-1]) != R or pv.yields != [("op", cb[0], 0)] or cb[1][0] != "op":
        return None
    Lp = launches[k + 3]
    j_mul = cb[1][1]
    mul = pv.body[j_mul]
    divs = [j for j, o in enumerate(pv.body) if o.name == "arith.divf" and ("op", j, 0) in mul.operands]
    if mul.name != "arith.mulf" or len(divs) != 1:
        return None
    j_div = divs[0]
    (pa, pj), (la, lj) = pv.body[j_div].operands
    if pa != "arg" or la != "arg" or pj >= pv.n_in or lj >= pv.n_in:
        return None
    if (_arg_of(pv, Lp, pj) or {}).get("buf") != S or (_arg_of(pv, Lp, lj) or {}).get("buf") != L["buf"]:
        return None
    if not (_flat_is(pv.ins[pj], pv, pp[:-1], R, pr[0], N, want)
            and _flat_is(pv.ins[lj], pv, pp[:-1], R, None, 1, lambda r, j: r)):
        return None
    special = {("arg", pj), ("arg", lj), ("op", j_div, 0), ("op", j_mul, 0)}
    uses = [r for j, o in enumerate(pv.body) if j not in (j_div, j_mul, cb[0]) for r in o.operands]
    if any(r in special for r in uses):
        return None  # the probabilities or the sum reach p @ v other than through the division
    removed = set(scores) | {M["buf"], L["buf"]}
    own = {id(_arg_of(pv, Lp, pj)), id(_arg_of(pv, Lp, lj))}
    if any(a.get("buf") in removed for a in Lp["args"] if id(a) not in own):
        return None  # V (or the output) in a buffer the sequence wrote
    if any(roots[b]["kind"] != "temp" or roots[b].get("output") or not _dead_after(launches, k + 4, b, descs, roots)
           for b in removed):
        return None
    return _Attention(qk, epilogues, _Op(mx, launches[k]), _Op(ex, L1), _Op(pv, Lp),
                      (sj, mj), (pj, lj, j_div, j_mul), R, N, pv.loops[pp[-1]], removed)


# --------------------------------------------------------------------------- kernels


def _key_dependent(desc, dim):
    """(inputs, body ops) of `desc` whose values depend on loop `dim`."""
    args = {i for i, o in enumerate(desc.ins) if o.const is None and any(dim in lk._expr_dims(e) for e in o.map)}
    ops = set()
    for j, b in enumerate(desc.body):
        for r in b.operands:
            if (r[0] == "idx" and r[1] == dim) or (r[0] == "arg" and r[1] in args) or (r[0] == "op" and r[1] in ops):
                ops.add(j)
    return args, ops


def _loads_first(desc, js):
    """Body ops js split into the loads with the ops their addresses need, and the rest (each
    in body order): the kernels issue every point's loads before computing any point."""
    need = set()
    for j in reversed(js):
        if desc.body[j].name == "memref.load" or j in need:
            need.add(j)
            need |= {r[1] for r in desc.body[j].operands if r[0] == "op"}
    return [j for j in js if j in need], [j for j in js if j not in need]


def _params(op: _Op, prefix: str, drop_ins=(), keep_out=False) -> list:
    """(Param, arg) of op's kernel parameters renamed with `prefix`, without inputs
    `drop_ins` (values the fused kernel computes itself) and, unless keep_out, the output."""
    out = []
    skip = {f"in{i}" for i in drop_ins} | (set() if keep_out else {"out0"})
    for p, a in zip(lk._params(op.desc), op.launch["args"]):
        if p.name not in skip:
            out.append((Param(prefix + p.name, p.type, p.role, p.doc), a))
    return out


def _bind(a, pairs, prefix):
    return {p.name[len(prefix):]: a[p.name] for p, _ in pairs}


def _exp_of(E, at, s, m):
    """exp(s - m) with the exp op's own body; 0 where m is -inf (no finite score)."""
    ex = at.ex.desc
    sj, mj = at.s_in
    argv = [None] * (ex.n_in + len(ex.outs))
    argv[sj], argv[mj] = s, m
    p = lk._Replay(E, ex, {}).run(argv, [0] * len(ex.loops))(ex.yields[0])
    return E.select(E.cmp("oeq", m, E.const(-math.inf, _F32)), E.const(0.0, _F32), p)


def _chunks(N: int) -> tuple[int, int]:
    """(keys a block of attn_split takes, a multiple of SPLIT_WARPS; chunks of N keys)."""
    C = min(CHUNK, -(-N // SPLIT_WARPS) * SPLIT_WARPS)
    return C, -(-N // C)


def _spec(kind, params, block, grid, body, smem, config, doc):
    spec = KernelSpec(kind, [p for p, _ in params], block, grid, body, smem, config, doc=doc)
    spec.name = f"{kind}_{hashlib.sha1(spec.mlir_func().encode()).hexdigest()[:12]}"
    return spec


@dataclass
class _Consumer:
    """An elementwise launch reading the combine's output (see the module doc)."""
    desc: lk.GenericDesc
    launch: dict
    o_ins: set  # its inputs that read the combine's output
    copies: int  # loop points reading each output element


def _consumer(at: _Attention, launches, j, descs, roots):
    """launches[j] as a _Consumer of the combine of `at`, or None."""
    if not CONSUMER or j >= len(launches):
        return None
    G = launches[j]
    d = descs.get(G["kernel"])
    if d is None or d.captures or any(t != "parallel" for t in d.iters) or lk.classify(d) != "elementwise":
        return None
    pv = at.pv.desc
    o_arg = _out_arg(pv, at.pv.launch)
    n_o = at.rows * at.head
    total = math.prod(d.loops)
    if total % n_o:
        return None
    # where the combine writes element l = r * D + dd
    vpar, (nv_dim,) = _split(pv)
    r = np.repeat(np.arange(at.rows), at.head)
    dd = np.tile(np.arange(at.head), at.rows)
    written = lk._flat(lk.Points, pv.outs[0], _row_dims(lk.Points, pv, vpar[:-1], r, {vpar[-1]: dd, nv_dim: 0}))
    own = np.arange(total)  # an operand read or written at the loop point's own element
    copies = np.tile(written, total // n_o)  # the combine's element l at points l, l + n_o, ...
    o_ins, k = set(), 0
    for i, op in enumerate(d.ins):
        if op.const is not None:
            continue
        arg = G["args"][k]
        k += 1
        if arg.get("buf") == o_arg["buf"]:
            if arg != o_arg or not np.array_equal(lk.flat_at_points(op, d.loops), copies):
                return None
            o_ins.add(i)
        elif not np.array_equal(lk.flat_at_points(op, d.loops), own):
            return None
    outs = G["args"][k:k + len(d.outs)]
    if not o_ins or any(a.get("buf") == o_arg["buf"] for a in outs) or \
            any(not np.array_equal(lk.flat_at_points(op, d.loops), own) for op in d.outs):
        return None
    if not _dead_after(launches, j + 1, o_arg["buf"], descs, roots) or roots[o_arg["buf"]].get("output"):
        return None
    return _Consumer(d, G, o_ins, total // n_o)


def build(at: _Attention, scratch: dict, consumer: _Consumer | None = None) -> list[tuple[KernelSpec, dict]]:
    """The two kernels and their launches; scratch: name -> buffer id of acc, mx, sum;
    consumer: the elementwise launch the combine takes into its stores."""
    qk, pv = at.qk.desc, at.pv.desc
    R, N, D = at.rows, at.keys, at.head
    W = SPLIT_WARPS
    C, S = _chunks(N)
    T = 32 * W
    qpar, (k_dim,) = _split(qk)
    n_dim, rows_q = qpar[-1], qpar[:-1]
    K = qk.loops[k_dim]
    KI = -(-K // 32)
    j_comb, v_ref = lk._combiner(qk)
    comb = qk.body[j_comb]
    dep_args, dep_ops = _key_dependent(qk, n_dim)
    used = lk._used_args(qk)
    front = [j for j in range(j_comb) if j not in dep_ops]
    back = [j for j in range(j_comb) if j in dep_ops]
    vpar, (nv_dim,) = _split(pv)
    d_dim, rows_v = vpar[-1], vpar[:-1]
    pj, lj, j_div, j_mul = at.pv_refs
    jv_comb, _ = lk._combiner(pv)
    vcomb, vmul, vdiv = pv.body[jv_comb], pv.body[j_mul], pv.body[j_div]
    v_ops = [j for j in range(jv_comb) if j not in (j_div, j_mul)]
    front_loads, front_rest = _loads_first(qk, front)
    back_loads, back_rest = _loads_first(qk, back)
    v_loads, v_rest = _loads_first(pv, v_ops)
    v_used = {r[1] for j in v_ops + [j_mul] for r in pv.body[j].operands if r[0] == "arg"} - {pj, lj}
    mcomb = at.mx.desc.body[0]
    qk_p = _params(at.qk, "qk_")
    ep_p = [_params(e, f"e{t}_", (si,)) for t, (e, si) in enumerate(at.epilogues)]
    pv_p = _params(at.pv, "pv_", (pj, lj))
    mk = lambda name, n, role: (Param(name, f"memref<{n}x{_F32}>", role),  # noqa: E731
                                {"buf": scratch[name], "offset": 0})
    outs = [mk("acc", R * S * D, "out"), mk("mx", R * S, "out"), mk("sum", R * S, "out")]
    split_params = qk_p + [x for ps in ep_p for x in ps] + pv_p + outs
    f32 = _F32

    def split_body(E, a):
        sa_qk, sa_pv = _bind(a, qk_p, "qk_"), _bind(a, pv_p, "pv_")
        sa_ep = [_bind(a, ps, f"e{t}_") for t, ps in enumerate(ep_p)]
        tid, bid = E.tid(), E.bid()
        lane, w = tid % 32, tid // 32
        r, c = bid // S, bid % S
        n0 = c * C
        # V's loads first: they do not depend on the scores, so they are in flight during them
        rpv = lk._Replay(E, pv, sa_pv)
        v_pts = []
        for q in range(-(-D // T)):
            dd = tid + T * q
            dc = E.minu(dd, E.const(D - 1, "index")) if D % T else dd
            pts = []
            for j in range(C):
                nc = E.minu(n0 + j, E.const(N - 1, "index"))
                dims = _row_dims(E, pv, rows_v, r, {d_dim: dc, nv_dim: nc})
                argv = [lk._load_in(E, sa_pv, pv, i, dims) if i in v_used else None for i in range(pv.n_in)]
                argv += [None] * len(pv.outs)
                vals = {}
                rpv.run(argv, dims, ops=v_loads, vals=vals)
                pts.append((j, dims, argv, vals))
            v_pts.append((dd, pts))
        rp = lk._Replay(E, qk, sa_qk)
        side = []  # per contraction step of a lane: the key-independent values
        for i in range(KI):
            kk = lane + 32 * i
            kc = E.minu(kk, E.const(K - 1, "index")) if K % 32 else kk
            dims = _row_dims(E, qk, rows_q, r, {n_dim: 0, k_dim: kc})
            argv = [lk._load_in(E, sa_qk, qk, j, dims) if j in used and j not in dep_args else None
                    for j in range(qk.n_in)] + [None] * len(qk.outs)
            vals = {}
            rp.run(argv, dims, ops=front_loads, vals=vals)
            side.append((kk, kc, argv, vals, dims))
        for kk, kc, argv, vals, dims in side:
            rp.run(argv, dims, ops=front_rest, vals=vals)
        side = [x[:4] for x in side]
        keys = []  # this warp's keys of the chunk: every key's loads first (in flight together)
        for jj in range(C // W):
            jl = w + W * jj
            n = n0 + jl
            nc = E.minu(n, E.const(N - 1, "index"))
            pts = []
            for kk, kc, argv0, vals0 in side:
                dims = _row_dims(E, qk, rows_q, r, {n_dim: nc, k_dim: kc})
                argv = list(argv0)
                for j in dep_args & used:
                    argv[j] = lk._load_in(E, sa_qk, qk, j, dims)
                vals = dict(vals0)
                rp.run(argv, dims, ops=back_loads, vals=vals)
                pts.append((kk, dims, argv, vals))
            keys.append((jl, n, nc, pts))
        for jl, n, nc, pts in keys:
            acc = E.const(lk._identity(comb.name, f32), f32)
            for kk, dims, argv, vals in pts:
                get = rp.run(argv, dims, ops=back_rest, vals=vals)
                new = E.raw(comb.name, [acc, get(v_ref)], [f32], comb.attrs, comb.info)[0]
                acc = E.select(E.cmp("ult", kk, E.const(K, "index")), new, acc) if K % 32 else new
            for off in (16, 8, 4, 2, 1):
                acc = E.raw(comb.name, [acc, E.shfl_xor(acc, off)], [f32], comb.attrs, comb.info)[0]
            s = E.raw(comb.name, [lk._init_out(E, sa_qk, qk, 0, []), acc], [f32], comb.attrs, comb.info)[0]
            for (eop, si), sa in zip(at.epilogues, sa_ep):
                e = eop.desc
                ep, _ = _split(e)
                dims = _row_dims(E, e, ep[:-1], r, {ep[-1]: nc})
                eu = lk._used_args(e)
                argv = [s if j == si else lk._load_in(E, sa, e, j, dims) if j in eu else None for j in range(e.n_in)]
                argv += [s] + [None] * (len(e.outs) - 1)
                s = lk._Replay(E, e, sa).run(argv, dims)(e.yields[0])
            s = E.select(E.cmp("ult", n, E.const(N, "index")), s, E.const(-math.inf, f32))
            E.if_(E.cmp("eq", lane, E.const(0, "index")), lambda s=s, jl=jl: E.store(s, a["sc"], jl))
        E.barrier()
        # the chunk's max, probabilities and their sum: every warp the same, lanes over keys
        m = E.const(-math.inf, f32)
        mine = []
        for t in range(-(-C // 32)):
            j = lane + 32 * t
            v = E.load(a["sc"], E.minu(j, E.const(C - 1, "index")))
            v = E.select(E.cmp("ult", j, E.const(C, "index")), v, E.const(-math.inf, f32)) if C % 32 else v
            mine.append((j, v))
            m = E.raw(mcomb.name, [m, v], [f32], mcomb.attrs, mcomb.info)[0]
        for off in (16, 8, 4, 2, 1):
            m = E.raw(mcomb.name, [m, E.shfl_xor(m, off)], [f32], mcomb.attrs, mcomb.info)[0]
        total = E.const(0.0, f32)
        for j, v in mine:
            p = _exp_of(E, at, v, m)
            ok = E.cmp("eq", w, E.const(0, "index"))
            if C % 32:
                ok = E.and_(ok, E.cmp("ult", j, E.const(C, "index")))
            E.if_(ok, lambda p=p, j=j: E.store(p, a["pc"], j))
            total = E.add(total, p)
        for off in (16, 8, 4, 2, 1):
            total = E.add(total, E.shfl_xor(total, off))
        E.barrier()
        # acc[d] = sum over the chunk's keys of p * v[n, d], threads along d
        for dd, pts in v_pts:
            acc = E.const(0.0, f32)
            for j, dims, argv, vals in pts:
                get = rpv.run(argv, dims, ops=v_rest, vals=vals)
                p = E.load(a["pc"], E.const(j, "index"))
                ops = [p if ref == ("op", j_div, 0) else get(ref) for ref in vmul.operands]
                prod = E.raw(vmul.name, ops, [f32], vmul.attrs, vmul.info)[0]
                acc = E.raw(vcomb.name, [acc, prod], [f32], vcomb.attrs, vcomb.info)[0]
            at_ = (r * S + c) * D + dd
            if D % T:
                E.if_(E.cmp("ult", dd, E.const(D, "index")), lambda acc=acc, at_=at_: E.store(acc, a["acc"], at_))
            else:
                E.store(acc, a["acc"], at_)

        def partials():
            E.store(m, a["mx"], r * S + c)
            E.store(total, a["sum"], r * S + c)
        E.if_(E.cmp("eq", tid, E.const(0, "index")), partials)

    split = _spec("attn_split", split_params, (T, 1, 1), (R * S, 1, 1), split_body,
                  [("sc", f32, C), ("pc", f32, C)], {"kind": "attention_split", "chunk": C, "splits": S},
                  f"decode attention, {R} rows x {N} keys in chunks of {C}: scores, softmax partials, p @ v")
    # combine: a block a row, the split's block size T (threads past D idle)
    out_p = [x for x in _params(at.pv, "pv_", keep_out=True) if x[0].name == "pv_out0"]
    ins = [(Param(p.name, p.type, "in"), arg) for p, arg in outs]
    g_p = []
    if consumer is not None:  # its parameters but the combine's output it reads
        skip = {f"in{i}" for i in consumer.o_ins}
        g_p = [(Param("g_" + p.name, p.type, p.role, p.doc), arg)
               for p, arg in zip(lk._params(consumer.desc), consumer.launch["args"]) if p.name not in skip]
        out_p = [(Param(p.name, p.type, "in", p.doc), arg) for p, arg in out_p]  # its init only
    comb_params = ins + out_p + g_p

    def combine_body(E, a):
        sa_pv = {"out0": a["pv_out0"]}
        tid, r = E.tid(), E.bid()
        lane, warp = tid % 32, tid // 32
        cols = []  # every load first (one round trip)
        for q in range(-(-D // T)):
            dd = tid + T * q
            dc = E.minu(dd, E.const(D - 1, "index")) if D % T else dd
            cols.append((dd, dc, [E.load(a["acc"], (r * S + c) * D + dc) for c in range(S)]))
        parts = []  # the chunks' max and sum, a chunk a lane (every warp the same)
        for t in range(-(-S // 32)):
            c = lane + 32 * t
            ok = E.cmp("ult", c, E.const(S, "index"))
            cc = E.minu(c, E.const(S - 1, "index")) if S % 32 else c
            mc = E.load(a["mx"], r * S + cc)
            lc = E.load(a["sum"], r * S + cc)
            if S % 32:
                mc = E.select(ok, mc, E.const(-math.inf, f32))
                lc = E.select(ok, lc, E.const(0.0, f32))
            parts.append((c, ok, mc, lc))
        m = E.const(-math.inf, f32)
        for _, _, mc, _ in parts:
            m = E.raw(mcomb.name, [m, mc], [f32], mcomb.attrs, mcomb.info)[0]
        for off in (16, 8, 4, 2, 1):
            m = E.raw(mcomb.name, [m, E.shfl_xor(m, off)], [f32], mcomb.attrs, mcomb.info)[0]
        tot = E.const(0.0, f32)
        for c, ok, mc, lc in parts:  # the chunks' weights exp(m_c - m) -> shared memory
            wc = _exp_of(E, at, mc, m)
            E.if_(E.and_(ok, E.cmp("eq", warp, E.const(0, "index"))), lambda wc=wc, c=c: E.store(wc, a["w"], c))
            tot = E.add(tot, E.mul(wc, lc))
        for off in (16, 8, 4, 2, 1):
            tot = E.add(tot, E.shfl_xor(tot, off))
        E.barrier()
        ws = [E.load(a["w"], E.const(c, "index")) for c in range(S)]
        for dd, dc, accs in cols:
            num = E.const(0.0, f32)
            for wc, x in zip(ws, accs):
                num = E.add(num, E.mul(wc, x))
            val = E.raw(vdiv.name, [num, tot], [f32], vdiv.attrs, vdiv.info)[0]
            dims = _row_dims(E, pv, rows_v, r, {d_dim: dc, nv_dim: 0})

            def store(val=val, dims=dims, dc=dc):
                res = E.raw(vcomb.name, [lk._init_out(E, sa_pv, pv, 0, dims), val], [f32], vcomb.attrs, vcomb.info)[0]
                if consumer is None:
                    E.store(res, a["pv_out0"], lk._ix(E, lk._flat(E, pv.outs[0], dims)))
                    return
                g, sa_g = consumer.desc, _bind(a, g_p, "g_")
                used = lk._used_args(g)
                for k in range(consumer.copies):  # every loop point of the consumer reading element l
                    q = r * D + dc + k * R * D
                    gd = lk._decompose(E, q, g.loops)
                    argv = [res if i in consumer.o_ins else
                            lk._load_in(E, sa_g, g, i, gd) if i in used or g.ins[i].const is not None else None
                            for i in range(g.n_in)]
                    argv += [lk._init_out(E, sa_g, g, o, gd) if g.n_in + o in used else None
                             for o in range(len(g.outs))]
                    get = lk._Replay(E, g, sa_g).run(argv, gd)
                    for o in range(len(g.outs)):
                        E.store(get(g.yields[o]), sa_g[f"out{o}"], lk._ix(E, lk._flat(E, g.outs[o], gd)))
            if D % T:
                E.if_(E.cmp("ult", dd, E.const(D, "index")), store)
            else:
                store()

    combine = _spec("attn_combine", comb_params, (T, 1, 1), (R, 1, 1), combine_body, [("w", f32, S)],
                    {"kind": "attention_combine", "splits": S},
                    f"decode attention: {S} chunks' softmax partials of {R} rows -> softmax @ V")
    launches = []
    for spec, params in ((split, split_params), (combine, comb_params)):
        launches.append({"kernel": spec.name, "grid": list(spec.grid), "block": list(spec.block),
                         "args": [a for _, a in params],
                         "writes": sorted({a["buf"] for p, a in params if p.role in ("out", "alias", "inout")})})
    launches[0]["writes"] = [scratch["acc"], scratch["mx"], scratch["sum"]]
    launches[1]["writes"] = [out_p[0][1]["buf"]] if consumer is None else list(consumer.launch["writes"])
    if consumer is not None:
        launches[1]["fused"] = [combine.name, consumer.launch["kernel"]]
    return [(split, launches[0]), (combine, launches[1])]


def fuse_attention(launches: list[dict], specs: dict, descs: dict, roots: list[dict]) -> list[dict]:
    """Replaces each matched decode-attention sequence by its split and combine launches;
    adds their kernels to `specs` and their scratch buffers to `roots`."""
    out, i = [], 0
    while i < len(launches):
        at = _match(launches, i, descs, roots)
        if at is None:
            out.append(launches[i])
            i += 1
            continue
        _, S = _chunks(at.keys)
        scratch = {}
        for name, n in (("acc", at.rows * S * at.head), ("mx", at.rows * S), ("sum", at.rows * S)):
            scratch[name] = len(roots)
            roots.append({"id": len(roots), "kind": "temp", "bytes": 4 * n, "elem": _F32, "shape": [n]})
        end = i + 5 + len(at.epilogues)  # scores, epilogues, max, exp, sum, p @ v
        consumer = _consumer(at, launches, end, descs, roots)
        for spec, launch in build(at, scratch, consumer):
            specs.setdefault(spec.name, spec)
            out.append(launch)
        i = end + (consumer is not None)
    return out
