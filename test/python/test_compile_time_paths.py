"""What the compile-time work changed: the entry's loop nests outlined (one
function per distinct nest), LLVM IR compiled by llvmlite with MLIR's JIT as
the fallback, and a failed stage's repro written from a copy of its input.
Correctness only: compile speed is the benchmark harness's business."""

import subprocess

import numpy as np
import pytest
from torch_mlir import ir

from qcc.backends.cpu import lowering
from qcc.backends.cpu.runtime import CpuLibrary
from qcc.context import make_context
from qcc.errors import QccError
from qcc.irutil import functions, walk
from qcc.pipeline import Session, run_pipeline

_MAP = "affine_map<(d0, d1) -> (d0, d1)>"
_T = "memref<4x8xf32>"


def _scale(src: str, dst: str) -> str:
    return f"""
    linalg.generic {{indexing_maps = [{_MAP}, {_MAP}], iterator_types = ["parallel", "parallel"]}}
        ins({src} : {_T}) outs({dst} : {_T}) {{
    ^bb0(%x: f32, %y: f32):
      %r = arith.mulf %x, %two : f32
      linalg.yield %r : f32
    }}"""


# two identical nests on different buffers, a third different one, and a copy
ENTRY = f"""
func.func @main(%a: {_T}, %b: {_T}, %o1: {_T}, %o2: {_T}, %o3: {_T}, %o4: {_T}) {{
    %two = arith.constant 2.0 : f32
    {_scale("%a", "%o1")}
    {_scale("%b", "%o2")}
    linalg.generic {{indexing_maps = [{_MAP}, {_MAP}, {_MAP}], iterator_types = ["parallel", "parallel"]}}
        ins(%a, %b : {_T}, {_T}) outs(%o3 : {_T}) {{
    ^bb0(%x: f32, %y: f32, %z: f32):
      %r = arith.addf %x, %y : f32
      linalg.yield %r : f32
    }}
    memref.copy %b, %o4 : {_T} to {_T}
    return
}}
"""


def _names(module):
    return {f.attributes["sym_name"].value: f for f in functions(module.operation)}


@pytest.fixture
def outlined():
    ctx = make_context()
    with ctx:
        module = ir.Module.parse(ENTRY)
        count = lowering.outline_loop_nests(module)
        module.operation.verify()
    return ctx, module, count


def test_identical_nests_share_one_function(outlined):
    _, module, count = outlined
    funcs = _names(module)
    nests = {n: f for n, f in funcs.items() if n != "main"}
    assert count == len(nests) == 3  # scale (twice: one function), add, copy
    for f in nests.values():
        assert f.attributes["sym_visibility"].value == "private" and "llvm.no_inline" in f.attributes
        assert not [op for op in walk(f) if op.name == "func.call"]
    calls = [op for op in walk(funcs["main"]) if op.name == "func.call"]
    assert len(calls) == 4 and len({str(c.attributes["callee"]) for c in calls}) == 3
    assert not [op for op in walk(funcs["main"]) if op.name.startswith("linalg.") or op.name == "memref.copy"]
    # the scale nest reads the constant inside (it stays a constant for LLVM), not as an argument
    scale = next(f for f in nests.values() if [op for op in walk(f) if op.name == "arith.mulf"])
    assert [op for op in walk(scale) if op.name == "arith.constant"]
    assert len(scale.regions[0].blocks[0].arguments) == 2


def _build(ctx, module, tmp_path):
    with ctx:
        lowering.mark_entry(module)
    run_pipeline(module, lowering.TO_LLVM, Session(None), "to-llvm")
    so = str(tmp_path / "lib.so")
    with ctx:
        lowering.emit_shared_library(module, so)
    return so


def _check(so):
    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((4, 8), dtype=np.float32) for _ in range(2))
    outs = [np.zeros((4, 8), np.float32) for _ in range(4)]
    CpuLibrary(so).call([a, b, *outs], [])
    for got, want in zip(outs, (2 * a, 2 * b, a + b, b)):
        np.testing.assert_array_equal(got, want)


def test_outlined_library_runs(outlined, tmp_path):
    ctx, module, _ = outlined
    _check(_build(ctx, module, tmp_path))


def test_engine_fallback_when_llvmlite_cannot_read(outlined, tmp_path, monkeypatch):
    def unreadable(llvm_ir, opt_level):
        raise lowering._UnreadableIR("too new")

    monkeypatch.setattr(lowering, "_object_code", unreadable)
    ctx, module, _ = outlined
    _check(_build(ctx, module, tmp_path))


def test_older_llvm_literals():
    text = ("  %1 = fcmp olt float %0, 8.000000e-01\n"
            "  %2 = fadd double %1, 8.000000e-01\n"
            "  store float 5.000000e-01, ptr %3\n"
            "  %4 = fmul <8 x float> %2, splat (float f0x3DB504F3)\n"
            "  %5 = call double @f(float %x, double 1.000000e-01)\n")
    got = lowering.older_llvm_literals(text).splitlines()
    assert got[0].endswith("0x3FE99999A0000000")  # the double equal to float(0.8)
    assert got[1].endswith("8.000000e-01") and got[2] == "  store float 5.000000e-01, ptr %3"
    assert "f0x" not in got[3] and got[4].endswith("double 1.000000e-01)")


def test_failed_stage_repro_is_the_stage_input(tmp_path):
    ctx = make_context()
    with ctx:
        module = ir.Module.parse("""
        func.func @f(%a: tensor<4xf32>) -> tensor<4xf32> {
          %c1 = arith.constant 1 : index
          %c2 = arith.constant 2 : index
          %s = arith.addi %c1, %c2 : index
          %0 = builtin.unrealized_conversion_cast %a, %s : tensor<4xf32>, index to tensor<4xf32>
          return %0 : tensor<4xf32>
        }""")
    pipeline = ["canonicalize", "one-shot-bufferize"]  # the first folds the addi, the second fails
    with pytest.raises(QccError, match="lowering failed.*reproduce with: qcc-opt") as ei:
        run_pipeline(module, pipeline, Session(None), "lowering")
    cmd = ei.value.hint.split("reproduce with: ", 1)[1]
    path = cmd.split()[1]
    with open(path) as f:
        saved = f.read()
    assert "arith.addi" in saved and "loc(" in saved  # the input, with locations, not the folded IR
    proc = subprocess.run(cmd, shell=True, capture_output=True, text=True)
    assert proc.returncode != 0 and "op was not bufferized" in proc.stderr


_M3 = "memref<40x33xf32>"
# out[i, j] = a[i, j] * w[j] + bt[j, i] (a broadcast operand, a transposed one), and row sums
PARALLEL_ENTRY = f"""
func.func @main(%a: {_M3}, %w: memref<33xf32>, %bt: memref<33x40xf32>, %o: {_M3}, %s: memref<40xf32>) {{
    linalg.generic {{indexing_maps = [affine_map<(d0, d1) -> (d0, d1)>, affine_map<(d0, d1) -> (d1)>,
                                      affine_map<(d0, d1) -> (d1, d0)>, affine_map<(d0, d1) -> (d0, d1)>],
                     iterator_types = ["parallel", "parallel"]}}
        ins(%a, %w, %bt : {_M3}, memref<33xf32>, memref<33x40xf32>) outs(%o : {_M3}) {{
    ^bb0(%x: f32, %y: f32, %z: f32, %out: f32):
      %m = arith.mulf %x, %y : f32
      %r = arith.addf %m, %z : f32
      linalg.yield %r : f32
    }}
    linalg.generic {{indexing_maps = [affine_map<(d0, d1) -> (d0, d1)>, affine_map<(d0, d1) -> (d0)>],
                     iterator_types = ["parallel", "reduction"]}}
        ins(%a : {_M3}) outs(%s : memref<40xf32>) {{
    ^bb0(%x: f32, %acc: f32):
      %r = arith.addf %x, %acc : f32
      linalg.yield %r : f32
    }}
    return
}}
"""


def test_parallelized_nests_run_in_chunks(tmp_path):
    """Nests above the size threshold run over ranges of one parallel loop in an scf.parallel
    (here 40 rows in chunks of 3, the last of 1); results equal numpy's."""
    from qcc.backends.cpu import host

    openmp = host.openmp_runtime()
    if openmp is None:
        pytest.skip("no OpenMP runtime")
    ctx = make_context()
    with ctx:
        module = ir.Module.parse(PARALLEL_ENTRY)
        lowering.outline_loop_nests(module)
        assert lowering.parallelize_nests(module, min_iterations=40 * 33) == 2
        smaller = ir.Module.parse(PARALLEL_ENTRY)
        lowering.outline_loop_nests(smaller)
        assert lowering.parallelize_nests(smaller, min_iterations=40 * 33 + 1) == 0  # below the threshold
        module.operation.verify()
        funcs = _names(module)
        wrappers = [f for n, f in funcs.items() if n.endswith("_par")]
        assert len(wrappers) == 2 and all([op for op in walk(f) if op.name == "scf.parallel"] for f in wrappers)
        assert {str(c.attributes["callee"]) for c in walk(funcs["main"]) if c.name == "func.call"} == \
            {f"@{n}" for n in funcs if n.endswith("_par")}
        assert [op for op in walk(funcs["main_nest0"]) if op.name == "memref.subview"]
        lowering.mark_entry(module)
    run_pipeline(module, lowering.TO_LLVM, Session(None), "to-llvm")
    so = str(tmp_path / "lib.so")
    with ctx:
        lowering.emit_shared_library(module, so, openmp=openmp)
    rng = np.random.default_rng(1)
    a, w, bt = (rng.standard_normal(s, dtype=np.float32) for s in ((40, 33), (33,), (33, 40)))
    o, s = np.full((40, 33), np.nan, np.float32), np.zeros(40, np.float32)
    host.load_openmp(openmp["soname"])
    CpuLibrary(so).call([a, w, bt, o, s], [])
    np.testing.assert_array_equal(o, a * w + bt.T)
    np.testing.assert_allclose(s, a.sum(1), rtol=1e-5)


def test_nests_reading_loop_indices_stay_whole():
    """A body that reads linalg.index (a gather, a column mask: split-outliers, reorder-channels)
    would see a range's local index after the split: such nests are not parallelized."""
    entry = f"""
func.func @main(%a: {_M3}, %o: {_M3}) {{
    linalg.generic {{indexing_maps = [affine_map<(d0, d1) -> (d0, d1)>, affine_map<(d0, d1) -> (d0, d1)>],
                     iterator_types = ["parallel", "parallel"]}} ins(%a : {_M3}) outs(%o : {_M3}) {{
    ^bb0(%x: f32, %out: f32):
      %i = linalg.index 0 : index
      %c = arith.index_cast %i : index to i32
      %f = arith.sitofp %c : i32 to f32
      %r = arith.addf %x, %f : f32
      linalg.yield %r : f32
    }}
    return
}}
"""
    with make_context():
        module = ir.Module.parse(entry)
        lowering.outline_loop_nests(module)
        assert lowering.parallelize_nests(module, min_iterations=1) == 0


def test_nests_on_distinct_buffers_get_noalias_pointers(tmp_path):
    """noalias_nests: a nest whose memref arguments view different buffers at every call site
    (the entry's arguments, its allocations) gets `llvm.noalias` on their aligned pointers
    after convert-func-to-llvm; one reading and writing two views of the same buffer does not
    (one buffer read and written in place is one argument, so it qualifies). The library's
    results equal numpy's."""
    big = "memref<8x8xf32>"
    top, bottom = "memref<4x8xf32, strided<[8, 1]>>", "memref<4x8xf32, strided<[8, 1], offset: 32>>"
    entry = f"""
func.func @main(%a: {_T}, %o: {_T}, %o2: {_T}, %big: {big}) {{
    %two = arith.constant 2.0 : f32
    %t = memref.alloc() : {_T}
    {_scale("%a", "%t")}
    linalg.generic {{indexing_maps = [{_MAP}, {_MAP}], iterator_types = ["parallel", "parallel"]}}
        ins(%t : {_T}) outs(%o : {_T}) {{
    ^bb0(%x: f32, %y: f32):
      %r = arith.addf %x, %x : f32
      linalg.yield %r : f32
    }}
    linalg.generic {{indexing_maps = [{_MAP}, {_MAP}], iterator_types = ["parallel", "parallel"]}}
        ins(%o : {_T}) outs(%o2 : {_T}) {{
    ^bb0(%x: f32, %y: f32):
      %r = arith.addf %x, %two : f32
      linalg.yield %r : f32
    }}
    %v1 = memref.subview %big[0, 0] [4, 8] [1, 1] : {big} to {top}
    %v2 = memref.subview %big[4, 0] [4, 8] [1, 1] : {big} to {bottom}
    linalg.generic {{indexing_maps = [{_MAP}, {_MAP}], iterator_types = ["parallel", "parallel"]}}
        ins(%v1 : {top}) outs(%v2 : {bottom}) {{
    ^bb0(%x: f32, %y: f32):
      %r = arith.addf %x, %two : f32
      linalg.yield %r : f32
    }}
    memref.dealloc %t : {_T}
    return
}}
"""
    ctx = make_context()
    with ctx:
        module = ir.Module.parse(entry)
        assert lowering.outline_loop_nests(module) == 4
        marked = lowering.noalias_nests(module)
        assert sorted(marked) == ["main_nest0", "main_nest1", "main_nest2"]  # not the two halves of %big
        assert marked["main_nest0"] == [1, 8]  # two rank-2 descriptors of 7 fields: the aligned pointers
        lowering.mark_entry(module)
    run_pipeline(module, lowering.TO_LLVM, Session(None), "to-llvm")
    with ctx:
        lowering.set_noalias(module, marked)
        funcs = {op.attributes["sym_name"].value: op for op in module.body.operations
                 if op.operation.name == "llvm.func"}
        attrs = [str(a) for a in funcs["main_nest0"].attributes["arg_attrs"]]
        assert [i for i, a in enumerate(attrs) if "noalias" in a] == [1, 8]
        assert "noalias" not in str(funcs["main_nest3"].attributes)
        so = str(tmp_path / "lib.so")
        lowering.emit_shared_library(module, so)
    rng = np.random.default_rng(2)
    a, b = rng.standard_normal((4, 8), dtype=np.float32), rng.standard_normal((8, 8), dtype=np.float32)
    o, o2 = np.full((4, 8), np.nan, np.float32), np.full((4, 8), np.nan, np.float32)
    want = b.copy()
    want[4:] = b[:4] + 2
    CpuLibrary(so).call([a, o, o2, b], [])
    np.testing.assert_array_equal(o, (a * 2) + (a * 2))
    np.testing.assert_array_equal(o2, o + 2)
    np.testing.assert_array_equal(b, want)
