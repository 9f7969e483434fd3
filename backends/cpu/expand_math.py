"""math.exp on f32 as inline arithmetic the loop vectorizer can widen.

convert-math-to-libm turns a scalar `math.exp` into a call of libm's expf per
element, which no loop around it can vectorize: SiLU and softmax spent ~4% of
decode and prefill there.  `expand_exp` replaces each scalar f32 `math.exp` by a
call of `@qcc_expf`, a private function of plain arith/math ops that LLVM
inlines and vectorizes with the loop:

    n = roundeven(x / ln 2), r = x - n ln 2 (ln 2 in two parts, Cody-Waite),
    exp(r) = 1 + r + r^2 P(r) on |r| <= ln(2)/2 (Cephes' expf polynomial),
    exp(x) = exp(r) * 2^n1 * 2^n2 with n1 + n2 = n (two scalings keep every
    factor a normal float, so results down to the denormals round once).

x above ln(FLT_MAX) gives +inf, x below the smallest denormal's log gives 0,
NaN stays NaN; elsewhere within 2 ulp of the correctly rounded result
(test_cpu_kernels checks it against numpy's exp in float64).
"""

from torch_mlir import ir

from qcc import irutil

EXPF = "qcc_expf"

_EXPF_TEXT = f"""func.func private @{EXPF}(%x: f32) -> f32 {{
  %hi = arith.constant 88.72283935546875 : f32
  %lo = arith.constant -103.97208404541016 : f32
  %log2e = arith.constant 1.44269502162933349609375 : f32
  %ln2_hi = arith.constant 0.693359375 : f32
  %ln2_lo = arith.constant -2.12194440e-4 : f32
  %c5 = arith.constant 1.9875691500e-4 : f32
  %c4 = arith.constant 1.3981999507e-3 : f32
  %c3 = arith.constant 8.3334519073e-3 : f32
  %c2 = arith.constant 4.1665795894e-2 : f32
  %c1 = arith.constant 1.6666665459e-1 : f32
  %c0 = arith.constant 5.0000001201e-1 : f32
  %one = arith.constant 1.0 : f32
  %zero = arith.constant 0.0 : f32
  %inf = arith.constant 0x7F800000 : f32
  %bias = arith.constant 127 : i32
  %shift = arith.constant 23 : i32
  %i1 = arith.constant 1 : i32
  %xc0 = arith.maxnumf %x, %lo : f32
  %xc = arith.minnumf %xc0, %hi : f32
  %t = arith.mulf %xc, %log2e : f32
  %n = math.roundeven %t : f32
  %nh = arith.mulf %n, %ln2_hi : f32
  %r0 = arith.subf %xc, %nh : f32
  %nl = arith.mulf %n, %ln2_lo : f32
  %r = arith.subf %r0, %nl : f32
  %p0 = arith.mulf %c5, %r : f32
  %p1 = arith.addf %p0, %c4 : f32
  %p2 = arith.mulf %p1, %r : f32
  %p3 = arith.addf %p2, %c3 : f32
  %p4 = arith.mulf %p3, %r : f32
  %p5 = arith.addf %p4, %c2 : f32
  %p6 = arith.mulf %p5, %r : f32
  %p7 = arith.addf %p6, %c1 : f32
  %p8 = arith.mulf %p7, %r : f32
  %p9 = arith.addf %p8, %c0 : f32
  %r2 = arith.mulf %r, %r : f32
  %q0 = arith.mulf %p9, %r2 : f32
  %q1 = arith.addf %q0, %r : f32
  %e = arith.addf %q1, %one : f32
  %ni = arith.fptosi %n : f32 to i32
  %n1 = arith.shrsi %ni, %i1 : i32
  %n2 = arith.subi %ni, %n1 : i32
  %n1b = arith.addi %n1, %bias : i32
  %n2b = arith.addi %n2, %bias : i32
  %b1 = arith.shli %n1b, %shift : i32
  %b2 = arith.shli %n2b, %shift : i32
  %s1 = arith.bitcast %b1 : i32 to f32
  %s2 = arith.bitcast %b2 : i32 to f32
  %y0 = arith.mulf %e, %s1 : f32
  %y1 = arith.mulf %y0, %s2 : f32
  %over = arith.cmpf ogt, %x, %hi : f32
  %y2 = arith.select %over, %inf, %y1 : f32
  %under = arith.cmpf olt, %x, %lo : f32
  %y3 = arith.select %under, %zero, %y2 : f32
  %nan = arith.cmpf uno, %x, %x : f32
  %y = arith.select %nan, %x, %y3 : f32
  return %y : f32
}}
"""

def expand_exp(module: ir.Module) -> int:
    """Replaces every scalar f32 math.exp of the module by a call of @qcc_expf (added once);
    returns how many."""
    f32 = ir.F32Type.get()
    exps = [op for fn in irutil.functions(module.operation) for op in irutil.walk(fn, "math.exp")
            if op.results[0].type == f32]
    if not exps:
        return 0
    irutil.append_functions(module.operation, _EXPF_TEXT, set())
    for op in exps:
        with ir.InsertionPoint(op), op.location:
            call = ir.Operation.create("func.call", results=[f32], operands=[op.operands[0]],
                                       attributes={"callee": ir.FlatSymbolRefAttr.get(EXPF)}).result
        op.results[0].replace_all_uses_with(call)
        op.erase()
    return len(exps)
