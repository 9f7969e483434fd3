"""cpu-omp-schedule: OpenMP worksharing loops get a guided schedule.

convert-scf-to-openmp emits `omp.wsloop` with the default (static) schedule:
equal shares per thread, so a kernel waits for its slowest thread.  On a
machine whose cores are shared with other processes that is the common case;
`guided` hands out shrinking chunks, so a delayed thread takes less work, at
the cost of a few atomic dispatches per loop.
"""

import dataclasses

from torch_mlir import ir

from qcc import irutil
from qcc.passes import QccPass, register


@register
class CpuOmpSchedule(QccPass):
    name = "cpu-omp-schedule"
    summary = "Set the schedule of omp.wsloop ops (default: guided)"

    @dataclasses.dataclass
    class Options:
        kind: str = "guided"  # static, dynamic, guided, auto, runtime

    def run(self, module):
        attr = ir.Attribute.parse(f"#omp<schedulekind {self.options.kind}>")
        for func in irutil.functions(module):
            for op in irutil.walk(func, "omp.wsloop"):
                if "schedule_kind" not in op.attributes:
                    op.attributes["schedule_kind"] = attr
