"""qcc: an MLIR-based compiler for quantized PyTorch models.

    m = qcc.compile(model, (x,), target="cpu", quant="w4a16-g128")
    y = m(x); m.save("model.qcc"); m2 = qcc.load("model.qcc")
"""

from qcc.errors import QccError
from qcc.model import CompiledModel, load


def compile(model, example_inputs=None, **kwargs) -> CompiledModel:  # noqa: A001 (the API's verb)
    from qcc.driver import compile as _compile

    return _compile(model, example_inputs, **kwargs)


__all__ = ["compile", "load", "CompiledModel", "QccError"]
