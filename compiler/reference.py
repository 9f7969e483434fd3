"""The oracle side of a compiled model: its weights as the format reference decodes them.

Tests and the demo load these into the original PyTorch model; qcc's output must
then match PyTorch to float rounding, which checks the compiled semantics
exactly rather than "close to float".
"""

import numpy as np

from qcc.dialects import formats


def dequantized_weights(compiled) -> dict[str, np.ndarray]:
    """{original weight name: float32 in the model's layout} decoded from the artifact's packed
    weights: [N, K], or [K, N] for a weight the model multiplies as `x @ W` ("transposed"), a
    convolution's [O, C, k...], a mixture of experts' [E, N, K] (or [E, K, N], "transposed")."""
    out = _dequantized_nk(compiled)
    for layer in compiled.manifest.get("layers", []):
        if layer.get("transposed"):
            out[layer["weight"]] = np.ascontiguousarray(np.swapaxes(out[layer["weight"]], -1, -2))
        if layer.get("conv_layout") == "ohwi":  # rows (kh, kw, C) -> the model's [O, C, kh, kw]
            o, c, kh, kw = layer["conv_shape"]
            out[layer["weight"]] = np.ascontiguousarray(out[layer["weight"]].reshape(o, kh, kw, c).transpose(0, 3, 1, 2))
    return out


def _dequantized_nk(compiled) -> dict[str, np.ndarray]:
    out = {}
    backend_packed = compiled.manifest.get("cpu", {}).get("kernels", {})
    for layer in compiled.manifest.get("layers", []):
        base, fmt = layer["weight"], formats.parse_weight_format(layer["format"])
        if base in compiled.manifest.get("cuda", {}).get("layers", {}):  # repacked for a CUDA GEMV
            from qcc.backends.cuda.pack import dequantize_layer as cuda_dequantize_layer

            out[base] = cuda_dequantize_layer(compiled.manifest["cuda"]["layers"][base], compiled.weights)
            continue
        if base in backend_packed and backend_packed[base].get("layout") != "format":  # repacked for the CPU kernels
            if backend_packed[base].get("layout") == "int-blocks":
                from qcc.backends.cpu.int_pack import dequantize_layer
            else:
                from qcc.backends.cpu.pack import dequantize_layer

            w = dequantize_layer(layer, backend_packed[base], compiled.weights)
            out[base] = w.reshape(layer["experts"], -1, w.shape[1]) if "experts" in layer else w
            continue
        shape = tuple(layer["shape"])  # [E * N, K] for a mixture of experts' weights [E, N, K]
        rows = lambda a: None if a is None else a.reshape(shape[0], -1)  # noqa: E731
        codes = formats.unpack(rows(compiled.weights[f"{base}:{fmt.key()}:codes"]), fmt, shape)
        zero = rows(compiled.weights.get(f"{base}:{fmt.key()}:zero"))
        scale = rows(compiled.weights[f"{base}:{fmt.key()}:scale"])
        qt = formats.QuantizedTensor(codes=codes, scale=scale, zero=zero, format=fmt, shape=shape)
        w = formats.dequantize(qt)
        out[base] = w.reshape(layer["experts"], -1, shape[1]) if "experts" in layer else \
            w.reshape(layer["conv_shape"]) if "conv_shape" in layer and "conv_layout" not in layer else w
    return out


def load_into_torch(module, weights: dict) -> None:
    """Sets `module`'s parameters by name (`dequantized_weights`' names), each in the dtype the
    module holds it in (a float64 copy takes float64); a parameter tied to another (a head tied
    to the embedding) gets its own value, as the artifact stores it."""
    import torch

    modules = dict(module.named_modules())
    for name, value in weights.items():
        owner, attr = name.rsplit(".", 1) if "." in name else ("", name)
        old = getattr(modules[owner], attr)
        setattr(modules[owner], attr, torch.nn.Parameter(torch.from_numpy(np.ascontiguousarray(value)).to(old.dtype),
                                                         requires_grad=old.requires_grad))
