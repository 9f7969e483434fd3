"""cpu-reassociate-reductions: float sum reductions may be summed in any order.

A `linalg.generic` reduction such as RMSNorm's sum of squares or softmax's sum of
exponentials becomes, after convert-linalg-to-loops, a scalar loop that adds one
element at a time into one accumulator.  IEEE addition is not associative, so LLVM
must keep that order: one `vaddss` per element, each waiting for the previous one
(3-4 cycles), 16x below what the vector units could sum.  This pass puts
`fastmath<reassoc>` on the combining `arith.addf` of such reductions (the add whose
result is yielded for an output and that reads that output's running value), which
lets LLVM's loop vectorizer keep lane-wise partial sums and add them up at the end.

The result changes by rounding only: the same terms, summed in a different order
(partial sums over lanes are, if anything, closer to the exact sum).  Other adds,
elementwise ops and non-float reductions are left as they are; max/min reductions
need no flag (they are exact in any order, and LLVM vectorizes them already).
"""

from torch_mlir import ir

from qcc import irutil
from qcc.passes import QccPass, register


def _with_reassoc(op) -> None:
    flags = []
    if "fastmath" in op.attributes:
        text = str(op.attributes["fastmath"])  # e.g. #arith.fastmath<contract>
        flags = [f.strip() for f in text[text.index("<") + 1:text.rindex(">")].split(",") if f.strip() != "none"]
    if "reassoc" in flags or "fast" in flags:
        return
    op.attributes["fastmath"] = ir.Attribute.parse(f"#arith.fastmath<{','.join(['reassoc', *flags])}>")


def combining_adds(generic) -> list:
    """The arith.addf ops of a linalg.generic with a reduction loop that fold an element
    into an output's running value (yielded for output i, one operand that output's
    block argument)."""
    iterators = [str(a) for a in ir.ArrayAttr(generic.attributes["iterator_types"])]
    if not any("reduction" in it for it in iterators):
        return []
    block = generic.regions[0].blocks[0]
    values = list(block.operations[len(block.operations) - 1].operands)  # linalg.yield: one per output
    out_args = list(block.arguments)[len(block.arguments) - len(values):]
    adds = []
    for value, out in zip(values, out_args):
        op = irutil.defining_op(value)
        if op is None or op.name != "arith.addf":
            continue
        if any(v == out for v in op.operands):
            adds.append(op)
    return adds


@register
class CpuReassociateReductions(QccPass):
    name = "cpu-reassociate-reductions"
    summary = "Let float sum reductions of linalg.generic ops be vectorized (fastmath<reassoc> on their combiner)"

    def run(self, module):
        for func in irutil.functions(module):
            for generic in irutil.walk(func, "linalg.generic"):
                for add in combining_adds(generic):
                    _with_reassoc(add)
