"""The rows of a mixture of experts' product grouped by expert, for the gathered CPU kernels
(kernels.gathered_qlinear, int_kernels.gathered).

A counting sort over the rows' expert ids: `%perm[%off[e] .. %off[e + 1])` are the rows that
chose expert e, in order, and `%active[0 .. %active[E])` the experts some row chose.  A kernel
then runs each chosen expert's rows against that expert's weights only, read once however many
rows chose it; an expert no row chose costs nothing."""

from qcc.backends.cpu.mlir_text import MlirText


def expert_of(t: MlirText, ids: str, m: str, experts: int) -> str:
    """ids[m] as torch indexes: -1 is the last expert; then clamped into range (memory safety;
    torch raises there)."""
    i = t.v(f"memref.load {ids}[{m}] : memref<?xi64>")
    neg = t.v(f"arith.cmpi slt, {i}, {t.v('arith.constant 0 : i64')} : i64")
    wrapped = t.v(f"arith.addi {i}, {t.v(f'arith.constant {experts} : i64')} : i64")
    i = t.v(f"arith.select {neg}, {wrapped}, {i} : i64")
    e = t.v(f"arith.index_cast {i} : i64 to index")
    return t.v(f"arith.minui {e}, {t.idx(experts - 1)} : index")  # still negative: a large unsigned one


def sort_rows(t: MlirText, ids: str, rows: str, experts: int) -> None:
    """Defines %off (memref<E+1xindex>), %active (memref<E+1xindex>, the count at [E]) and
    %perm (memref<?xindex>) for the `rows` rows whose experts are ids (memref<?xi64>)."""
    E = experts
    offty = f"memref<{E + 1}xindex>"
    c0, c1 = t.idx(0), t.idx(1)
    t.op(f"%off = memref.alloc() : {offty}")
    t.open(f"scf.for %e = {c0} to {t.idx(E + 1)} step {c1} {{")
    t.op(f"memref.store {c0}, %off[%e] : {offty}")
    t.close()
    t.open(f"scf.for %m = {c0} to {rows} step {c1} {{")
    e1 = t.v(f"arith.addi {expert_of(t, ids, '%m', E)}, {c1} : index")
    count = t.v(f"memref.load %off[{e1}] : {offty}")
    t.op(f"memref.store {t.v(f'arith.addi {count}, {c1} : index')}, %off[{e1}] : {offty}")
    t.close()
    t.open(f"scf.for %e = {c1} to {t.idx(E + 1)} step {c1} {{")
    before = t.v(f"memref.load %off[{t.v(f'arith.subi %e, {c1} : index')}] : {offty}")
    count = t.v(f"memref.load %off[%e] : {offty}")
    t.op(f"memref.store {t.v(f'arith.addi {before}, {count} : index')}, %off[%e] : {offty}")
    t.close()
    t.op(f"%active = memref.alloc() : {offty}")
    nact = t.v(f"scf.for %e = {c0} to {t.idx(E)} step {c1} iter_args(%na = {c0}) -> (index) {{")
    t.indent += 2
    first = t.v(f"memref.load %off[%e] : {offty}")
    last = t.v(f"memref.load %off[{t.v(f'arith.addi %e, {c1} : index')}] : {offty}")
    t.op(f"memref.store %e, %active[%na] : {offty}")
    used = t.v(f"arith.cmpi ult, {first}, {last} : index")
    more = t.v(f"arith.addi %na, {c1} : index")
    t.op(f"scf.yield {t.v(f'arith.select {used}, {more}, %na : index')} : index")
    t.close()
    t.op(f"memref.store {nact}, %active[{t.idx(E)}] : {offty}")
    t.op(f"%next = memref.alloc() : {offty}")
    t.op(f"memref.copy %off, %next : {offty} to {offty}")
    t.op(f"%perm = memref.alloc({rows}) : memref<?xindex>")
    t.open(f"scf.for %m = {c0} to {rows} step {c1} {{")
    e = expert_of(t, ids, "%m", E)
    j = t.v(f"memref.load %next[{e}] : {offty}")
    t.op(f"memref.store {t.v(f'arith.addi {j}, {c1} : index')}, %next[{e}] : {offty}")
    t.op(f"memref.store %m, %perm[{j}] : memref<?xindex>")
    t.close()
