"""The CPU kernels' weight layout ("panels"), its numpy packer and decoder.

A quantized weight w[N, K] in a `qcc.dialects.formats` format is repacked at
compile time so that each kernel reads one contiguous stream:

* rows are grouped in panels of R (`rows`) consecutive output features;
* K is cut in blocks of KB = 8 * V columns (V = `lanes`, the f32 lanes of one
  vector register: 8 for AVX2, 16 for AVX-512) and padded with zero codes to
  K_pad, a multiple of KB;
* codes[p, b, r] holds block b of row p * R + r:
    int4: V little-endian 32-bit words; nibble i of word j is column
          b * KB + i * V + j, so shifting a loaded vector right by 4 * i and
          masking gives columns [b*KB + i*V, b*KB + (i+1)*V) in lane order
          (the nibble is the format's: code for asym, code + 8 for sym);
    int8: KB bytes in column order (code bytes unchanged);
* scale[p, g, r] (f32) and zero[p, g, r] (uint8, asym only) per group g of
  G columns (G = K_pad for per-channel and per-tensor formats); groups that
  only cover padding get scale 1 and zero 0.

The kernels compute with activations padded by zeros to K_pad, so padding
codes never contribute.  `unpack` inverts `pack` exactly; `dequantize` gives
the format reference's dequantized weights bit for bit (tests check both).
"""

import dataclasses

import numpy as np

from qcc.dialects import formats


class LayoutError(ValueError):
    """The format/shape cannot be laid out as panels (the pass falls back)."""


@dataclasses.dataclass(frozen=True)
class PanelLayout:
    format_key: str
    n: int
    k: int
    rows: int = 4
    lanes: int = 8
    experts: int = 1  # a mixture of experts' [E, N, K]: each expert's panels after the last's

    @property
    def fmt(self):
        return formats.parse_weight_format(self.format_key)

    @property
    def kb(self) -> int:
        return 8 * self.lanes

    @property
    def k_pad(self) -> int:
        return -(-self.k // self.kb) * self.kb

    @property
    def panels(self) -> int:
        return -(-self.n // self.rows)

    @property
    def n_pad(self) -> int:
        return self.panels * self.rows

    @property
    def group(self) -> int:
        fmt = self.fmt
        return fmt.group_size if fmt.granularity == "group" else self.k_pad

    @property
    def groups(self) -> int:
        return self.k_pad // self.group

    @property
    def blocks(self) -> int:
        return self.k_pad // self.kb

    @property
    def needs_zero(self) -> bool:
        """Whether codes carry an offset the kernel must subtract (asym, or int4 sym's +8)."""
        fmt = self.fmt
        return not fmt.symmetric or fmt.bits == 4

    def check(self) -> None:
        g, kb, v = self.group, self.kb, self.lanes
        if g % v or (g % kb and kb % g):
            raise LayoutError(f"group size {g} does not tile blocks of {kb} columns in chunks of {v}")

    def shapes(self) -> dict:
        """name -> (shape, numpy dtype) of the packed arrays."""
        fmt = self.fmt
        p, b, r, gr = self.experts * self.panels, self.blocks, self.rows, self.groups
        out = {"codes": ((p, b, r, self.lanes), np.int32) if fmt.bits == 4 else ((p, b, r, self.kb), fmt.code_dtype.type),
               "scale": ((p, gr, r), np.float32)}
        if not fmt.symmetric:
            out["zero"] = ((p, gr, r), np.uint8)
        return out

    def to_json(self) -> dict:
        return {"layout": "panels", "rows": self.rows, "lanes": self.lanes, "k_pad": self.k_pad,
                "group": self.group, **({"experts": self.experts} if self.experts > 1 else {})}

    def one_expert(self) -> "PanelLayout":
        return dataclasses.replace(self, experts=1)


def _per_group(a: np.ndarray, lay: PanelLayout, fill) -> np.ndarray:
    """[N, g0] scale/zero -> [P, groups, R], broadcasting tensor/channel granules, padding with `fill`."""
    n, g0 = a.shape
    if n == 1:
        a = np.broadcast_to(a, (lay.n, g0))
    if lay.fmt.granularity != "group":
        a = a[:, :1]
    out = np.full((lay.n_pad, lay.groups), fill, a.dtype)
    out[:lay.n, :a.shape[1]] = a
    return np.ascontiguousarray(out.reshape(lay.panels, lay.rows, lay.groups).transpose(0, 2, 1))


def pack(lay: PanelLayout, packed_codes: np.ndarray, scale: np.ndarray, zero=None) -> dict:
    """The format's storage (formats.pack output, scale, zero) -> panel arrays by role; for
    E experts the storage of each ([E, N, ...]) packed in turn, the panels concatenated."""
    lay.check()
    if lay.experts > 1:
        one = lay.one_expert()
        parts = [pack(one, packed_codes[e], scale[e], None if zero is None else zero[e]) for e in range(lay.experts)]
        return {role: np.concatenate([p[role] for p in parts]) for role in parts[0]}
    fmt = lay.fmt
    codes = formats.unpack(packed_codes, fmt, (lay.n, lay.k))
    p, b, r, v = lay.panels, lay.blocks, lay.rows, lay.lanes
    if fmt.bits == 4:
        nib = codes.astype(np.int16) + (8 if fmt.symmetric else 0)
        full = np.zeros((lay.n_pad, lay.k_pad), np.uint32)
        full[:lay.n, :lay.k] = nib
        # [P, R, B, i, j] -> [P, B, R, j, i]; word = sum_i nib << 4i
        t = full.reshape(p, r, b, 8, v).transpose(0, 2, 1, 4, 3)
        words = np.zeros((p, b, r, v), np.uint32)
        for i in range(8):
            words |= t[..., i] << np.uint32(4 * i)
        out = {"codes": words.view(np.int32)}
    else:
        full = np.zeros((lay.n_pad, lay.k_pad), fmt.code_dtype)
        full[:lay.n, :lay.k] = codes
        out = {"codes": np.ascontiguousarray(full.reshape(p, r, b, lay.kb).transpose(0, 2, 1, 3))}
    out["scale"] = _per_group(np.asarray(scale, np.float32), lay, np.float32(1.0))
    if not fmt.symmetric:
        out["zero"] = _per_group(np.asarray(zero, np.uint8), lay, np.uint8(0))
    return out


def unpack(lay: PanelLayout, arrays: dict) -> formats.QuantizedTensor:
    """Panel arrays -> the format's QuantizedTensor (inverse of `pack`)."""
    fmt = lay.fmt
    if fmt.bits == 4:
        words = arrays["codes"].view(np.uint32)
        t = np.stack([(words >> np.uint32(4 * i)) & np.uint32(15) for i in range(8)], axis=-1)  # [P,B,R,j,i]
        full = t.transpose(0, 2, 1, 4, 3).reshape(lay.n_pad, lay.k_pad).astype(np.int16)
        if fmt.symmetric:
            full -= 8
    else:
        full = arrays["codes"].transpose(0, 2, 1, 3).reshape(lay.n_pad, lay.k_pad)
    codes = full[:lay.n, :lay.k].astype(fmt.code_dtype)
    sshape = fmt.scale_shape((lay.n, lay.k))

    def granules(a):
        a = a.transpose(0, 2, 1).reshape(lay.n_pad, lay.groups)[:sshape[0], :sshape[1]]
        return np.ascontiguousarray(a)

    zero = granules(arrays["zero"]) if not fmt.symmetric else None
    return formats.QuantizedTensor(codes=codes, scale=granules(arrays["scale"]), zero=zero,
                                   format=fmt, shape=(lay.n, lay.k))


def dequantize(lay: PanelLayout, arrays: dict) -> np.ndarray:
    """float32 [N, K] (E experts: [E * N, K]): the weights the kernels compute with."""
    if lay.experts > 1:
        one = lay.one_expert()
        return np.concatenate([dequantize(one, {role: np.split(a, lay.experts)[e] for role, a in arrays.items()})
                               for e in range(lay.experts)])
    return formats.dequantize(unpack(lay, arrays))


def dequantize_layer(layer: dict, kernel: dict, weights: dict) -> np.ndarray:
    """The dequantized weight of an artifact layer the CPU kernels own (manifest
    `layers[i]` and `cpu.kernels[weight]`)."""
    n, k = layer["shape"]  # [E * N, K] for E experts
    experts = layer.get("experts", 1)
    lay = PanelLayout(layer["format"], n // experts, k, rows=kernel["rows"], lanes=kernel["lanes"], experts=experts)
    return dequantize(lay, {role: weights[name] for role, name in kernel["params"].items()})
