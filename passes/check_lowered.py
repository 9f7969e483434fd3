"""check-lowered: every torch op must have been converted by now.

torch-mlir's conversions are partial: an op they cannot lower stays behind
and later surfaces as an opaque type-conversion failure.  This pass names the
first such op, at its source location, with what to do about it.
"""

import dataclasses

from qcc import irutil
from qcc.passes import PassError, QccPass, register


def _is_leftover(name: str) -> bool:
    return (name.startswith("torch.aten.") or name == "torch.operator"
            or (name.startswith("torch.prim.") and name != "torch.prim.ListConstruct"))


@register
class CheckLowered(QccPass):
    name = "check-lowered"
    summary = "Fail with a clear message on torch ops that the lowering left behind"

    @dataclasses.dataclass
    class Options:
        pass

    def run(self, module):
        for func in irutil.functions(module):
            for op in irutil.walk(func):
                if _is_leftover(op.name):
                    what = op.name
                    if op.name == "torch.operator":
                        what = f"torch.operator {op.attributes['name']}"
                    raise PassError(op, f"unsupported op '{what}': qcc cannot lower it to linalg "
                                        "(rewrite the model with supported ops)")
