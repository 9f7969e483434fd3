"""A decode GEMV and the small launches after it -> one launch whose last block runs them.

Off by default (lowering.FUSE_GEMV_TAILS): its first version made decode slower on the H200
(w8a8 140.7 -> 165.6 us; docs/BENCHMARKS.md); the trigger placement and register cap below
came after that run and are not measured yet.

At decode a weight GEMV is followed by one-block work on its whole output row: RMSNorm and
per-token quantization after o_proj and down_proj, the quantization of SwiGLU's row after
gate/up, the new key's RoPE after q/k/v. fuse_launches.py already runs such a run as one
launch of one block; here that block's work moves into the GEMV itself. Every block of the
GEMV, its outputs written, takes a ticket (Emitter.grid_ticket: a block barrier, a GPU-scope
fence and an atomic add on a counter); the block that draws the last ticket knows all the
others are done and runs the stages in turn, as the fused one-block kernel would, then sets
the counter back to zero for the next launch. Attention's split kernel has a counter per
head: the last split block of head r runs block r of the combine, and the last of those the
small launches after it. The run pays no launch of its own and no kernel boundary.

* The counters (a parameter of TICKETS words, zero in the artifact) serve every such launch:
  the next kernel touches them only after griddepcontrol.wait or stream order.
* The stages are those of fuse_launches (the same kernels, the same numerics bit for bit) at
  the GEMV's block size (quantize_rows rebuilt for it where its own differs); buffers
  written anywhere in the kernel lose noalias and ld.global.nc, in the GEMV's body too.
* The next kernel may launch when the last block starts the tail (TRIGGER_AT_TAIL), and
  ptxas keeps a tailed GEMV at the GEMV's own registers (CAP_REGISTERS).
* Only decode GEMVs (m_max <= MAX_ROWS rows, static shared memory) and attention splits.
"""
from __future__ import annotations

import hashlib

from . import fuse_launches as fl
from .emit import MAX_STATIC_SMEM, KernelSpec, Param

TICKET = "__cuda_grid_ticket"  # the plan parameter holding the counters
TICKETS = 256  # counters in it: [0] for whole grids, [1 + r] for row r of an attention split
KINDS = ("gemv",)  # kernel kinds (config "kind" prefixes) that take a tail
MAX_ROWS = 16  # m_max of those GEMVs (decode; lowering.EARLY_TRIGGER_GEMV_ROWS)
ATTENTION = True  # attention's combine in the split's last blocks (off: the device A/B of it)
# the next kernel launches when the last block starts the tail (its weight prefetch then
# overlaps the tail, as it overlapped the one-block launch before); False: at the kernel's
# start like a decode GEMV's (H200: slower, docs/ARCHITECTURE.md)
TRIGGER_AT_TAIL = True
# ptxas caps the kernel at the GEMV's own register count (lowering.build_images): the tail
# (a quantize_rows row in registers) would otherwise cost the GEMV blocks per SM
CAP_REGISTERS = True


def _flat(spec) -> bool:
    return not spec.smem_dynamic and spec.grid[1:] == (1, 1) and spec.block[1:] == (1, 1)


def _per_row(launches: list[dict], i: int, specs: dict) -> fl.Stage | None:
    """The combine after attention split launch i, when its block r can run in the last of
    the split's blocks of row r."""
    split = specs[launches[i]["kernel"]]
    if (not ATTENTION or split.config.get("kind") != "attention_split" or i + 1 == len(launches)
            or not _flat(split)):
        return None
    L = launches[i + 1]
    comb = specs[L["kernel"]]
    S = split.config["splits"]
    if (comb.config.get("kind") != "attention_combine" or comb.config.get("splits") != S or not _flat(comb)
            or comb.threads != split.threads or comb.grid[0] * S != split.grid[0] or 1 + comb.grid[0] > TICKETS
            or not set(launches[i]["writes"]) <= {a.get("buf") for a in L["args"]}):
        return None
    return fl.Stage(comb, L)


def _tail(launches: list[dict], i: int, specs: dict, descs: dict):
    """(per-row stage or None, the small launches after launch i that can run in its last
    block) when launch i takes a tail, else None."""
    spec = specs[launches[i]["kernel"]]
    cfg = spec.config
    row = _per_row(launches, i, specs)
    if row is None and (not cfg.get("kind", "").startswith(KINDS) or cfg.get("m_max", MAX_ROWS + 1) > MAX_ROWS
                        or not _flat(spec)):
        return None
    if cfg.get("tail"):
        return None
    run = fl.small_run(launches, i + 1 + (row is not None), specs, descs, spec.threads, resize=True)
    smem = spec.smem_bytes() + 4 + sum(s.spec.smem_bytes() for s in run) + (row.spec.smem_bytes() if row else 0)
    if smem > MAX_STATIC_SMEM:
        run = []
    return (row, run) if row or run else None


def fuse(main: fl.Stage, row: fl.Stage | None, tail: list[fl.Stage], ticket: int) -> tuple[KernelSpec, dict]:
    """`main` with `row` (an attention combine: its block r in the last of main's blocks of
    row r) and `tail` (in main's last block, or the last combine's), and its launch; `ticket`:
    the counters' buffer."""
    stages = [main] + ([row] if row else []) + tail
    A, T, blocks = main.spec, main.spec.threads, main.spec.grid[0]
    written = {w for s in stages for w in s.launch["writes"]} | {ticket}
    params, args, smem = fl.bind_stages(stages, written)
    params.append(Param("ticket", f"memref<{TICKETS}xi32>", "alias", "ticket counters (zero between launches)"))
    args.append({"buf": ticket, "offset": 0})
    smem.append(("ticket_slot", "i32", 1))
    at_tail = 1 + (row is not None)  # stage index of the tail's first

    def body(E, a):
        alias = {id(a[p.name]) for p in params if p.role == "alias"}
        zero = E.const(0, "index")

        def reset(i):
            E.if_(E.cmp("eq", E.tid(), zero), lambda: E.store(E.const(0, "i32"), a["ticket"], i))

        def last_of(n: int, i, then):
            t = E.grid_ticket(a["ticket"], a["ticket_slot"], i)

            def run():
                then()
                reset(i)
            E.if_(E.cmp("eq", t, E.const(n - 1, "i32")), run)

        def run_tail():
            if TRIGGER_AT_TAIL:
                E.launch_dependents()
            for k, s in enumerate(tail, at_tail):
                if k > at_tail:
                    E.barrier()
                fl.run_stage(E, a, k, s, T, alias, zero, s.vblocks)

        fl.run_stage(E, a, 0, main, T, alias, E.bid(), 1)
        if row is None:
            last_of(blocks, zero, run_tail)
            return
        R = row.spec.grid[0]
        r = E.bid() // (blocks // R)

        def combine():
            fl.run_stage(E, a, 1, row, T, alias, r, 1)
            if tail:
                last_of(R, zero, run_tail)
        last_of(blocks // R, r + 1, combine)

    kinds = [s.spec.config.get("kind", "?") for s in stages[1:]]
    cap = CAP_REGISTERS and row is None  # (attention split: 2 blocks an SM, no cap needed)
    cfg = dict(A.config, tail=kinds, **({"tail_of": A.name} if cap else {}))
    spec = KernelSpec(A.name, params, A.block, A.grid, body, smem, cfg,
                      doc=f"{A.doc} Then in its last block{' of each row' if row else ''}: {', '.join(kinds)}.")
    h = hashlib.sha1(spec.mlir_func().encode()).hexdigest()[:12]
    spec.name = f"{A.name}_t{len(kinds)}_{h}"
    launch = {"kernel": spec.name, "grid": list(A.grid), "block": list(A.block), "args": args,
              "writes": sorted(written), "layer": main.launch.get("layer"),
              "fused": [s.launch["kernel"] for s in stages]}
    return spec, launch


def fuse_gemv_tails(launches: list[dict], specs: dict, descs: dict, ticket_buffer) -> list[dict]:
    """Replaces each decode GEMV followed by small launches by one launch (the GEMV, then the
    launches in its last block), and each attention split + combine (+ small launches) by
    one; adds the kernels to `specs`. `ticket_buffer()`: the plan buffer id of the ticket
    counters (made on first use). Returns the new launch list."""
    out, i = [], 0
    while i < len(launches):
        found = _tail(launches, i, specs, descs)
        if found is None:
            out.append(launches[i])
            i += 1
            continue
        row, tail = found
        spec, launch = fuse(fl.Stage(specs[launches[i]["kernel"]], launches[i]), row, tail, ticket_buffer())
        specs.setdefault(spec.name, spec)
        out.append(launch)
        i += 1 + (row is not None) + len(tail)
    return out
