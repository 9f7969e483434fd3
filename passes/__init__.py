"""The pass registry: every qcc pass registers here under its dash-case name.

A pass is a class with `name`, `summary`, an `Options` dataclass (parsed from
`name{key=value ...}`) and `run(module_op)`.  It is anchored on the module (a
Python pass anchored elsewhere aborts the process in this MLIR build) and walks
the functions itself.  User errors are raised as `PassError(op, message)`; the
pipeline runner turns them into MLIR diagnostics at the op's location.
"""

import dataclasses
from typing import ClassVar

from torch_mlir import ir

_REGISTRY: dict[str, type["QccPass"]] = {}


class PassError(Exception):
    """A user-visible failure at `op` (or at the module when op is None)."""

    def __init__(self, op, message: str):
        super().__init__(message)
        self.op = op
        self.message = message


class QccPass:
    name: ClassVar[str]
    summary: ClassVar[str]

    @dataclasses.dataclass
    class Options:
        pass

    def __init__(self, session, options):
        self.session = session
        self.options = options

    def run(self, module: ir.Operation) -> None:
        raise NotImplementedError


def register(cls: type[QccPass]) -> type[QccPass]:
    assert cls.name not in _REGISTRY, cls.name
    _REGISTRY[cls.name] = cls
    return cls


def lookup(name: str) -> type[QccPass] | None:
    _load_all()
    return _REGISTRY.get(name)


def all_passes() -> dict[str, type[QccPass]]:
    _load_all()
    return dict(sorted(_REGISTRY.items()))


def _load_all() -> None:
    # Imported here, not at the top, so that `import qcc.passes` stays cheap and
    # pass modules can import the registry without a cycle.
    from . import check_lowered, cpu_contractions, fix_gelu_tanh, cpu_omp_schedule, cpu_reassociate_reductions, cpu_select_expert_kernels, cpu_select_int_kernels, cpu_select_kernels, lower_qcc, quantize_weights  # noqa: F401
    from . import quantize_activations  # noqa: F401
    from . import dequant_after_gemm  # noqa: F401
    from . import split_outliers  # noqa: F401
    from . import fuse_rotation  # noqa: F401
    from . import smooth_channels  # noqa: F401
    from . import awq  # noqa: F401
    from . import gptq  # noqa: F401
    from . import reorder_channels  # noqa: F401
    from qcc.backends.cuda import collapse_gathers, concat, select_kernels, unit_transposes  # noqa: F401  (the CUDA passes)
