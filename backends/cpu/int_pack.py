"""Weight layout of the integer (dequant-after-gemm) CPU kernels, its numpy packer and decoder.

The kernels multiply int8 activation codes with int8 / int4 weight codes
without any horizontal sum: one 256-bit vector of weights covers 8 output
columns ("a block") x 4 consecutive k ("a quad") and meets broadcast words of
activations, so its products land in 8 i32 lanes, one per column.  Each block is
one contiguous stream along K.  Two dot-product forms (`IntLayout.dot`):

* "avx2" (any AVX2 host): int8 (symmetric codes -127..127): codes[b, q, 32],
  byte 16h + 2j + i = w[8b + j, 4q + 2h + i]: each half, sign-extended to i16, is
  the 8 columns x 2 k that vpmaddwd multiplies with a broadcast pair of i16
  activation codes.
* "vnni" (AVX512-VNNI + VL, or AVX-VNNI): int8 codes[b, q, 32] as unsigned bytes
  (code + 128 for sym, the code for asym), byte 4j + i = w[8b + j, 4q + i]: the
  u8 operand of vpdpbusd against a broadcast quad of i8 activation codes (four
  products per lane straight into i32).  Grouped and asymmetric int8 weights
  have this kernel too.
* int4 (both forms): codes[b, t, 32]; byte 4j + i holds column 8b + j at
  k = 8t + i in its LOW nibble and at k = 8t + 4 + i in its HIGH nibble (quads 2t
  and 2t + 1), as the format's nibble (code for asym, code + 8 for sym: always
  0..15), the u8 operand of vpmaddubsw (avx2) or vpdpbusd (vnni) against a
  broadcast quad of i8 activation codes.
* scale[b, g, 8] (f32) per block, group g (one group for per-channel and
  per-tensor formats) and column; unsigned codes (int4, vnni int8) also
  zero[b, g, 8] (uint8; 8 resp. 128 for sym), so their kernels compute
  sum (u - z) * x as sum u * x - z * sum x.

K is padded with zero codes to K_pad, a multiple of 32 (a kernel unit of 8
quads), N to whole groups of `blocks_multiple` blocks (zero codes, scale 1):
padding never contributes and padded columns are never stored.
`unpack` inverts `pack` exactly.
"""

import dataclasses

import numpy as np

from qcc.dialects import formats

COLS = 8      # output columns per vector (i32 lanes of 256 bits)
QUAD = 4      # k per column per vector
UNIT = 32     # k per kernel unit (8 quads): int4 i16 sums stay below 2^15 over one unit


class IntLayoutError(ValueError):
    """The format/shape has no integer kernel (the pass leaves it to the reference lowering)."""


@dataclasses.dataclass(frozen=True)
class IntLayout:
    format_key: str
    n: int
    k: int
    blocks_multiple: int = 4
    dot: str = "avx2"           # "avx2" | "vnni": the dot-product instructions the codes are laid out for

    @property
    def fmt(self):
        return formats.parse_weight_format(self.format_key)

    @property
    def grouped(self) -> bool:
        return self.fmt.granularity == "group"

    @property
    def k_pad(self) -> int:
        return -(-self.k // UNIT) * UNIT

    @property
    def quads(self) -> int:
        return self.k_pad // QUAD

    @property
    def unsigned_codes(self) -> bool:
        """Codes stored as u8 with a zero point (int4; int8 for vnni): the kernels subtract z * sum x."""
        return self.fmt.bits == 4 or self.dot == "vnni"

    @property
    def x_per_word(self) -> int:
        """Activation codes per 32-bit word: i16 pairs against avx2 int8 weights, else i8 quads."""
        return 4 if self.unsigned_codes else 2

    @property
    def x_words(self) -> int:
        """32-bit words a row of quantized x takes: K's codes, and one more cache line when a
        row would be a multiple of 1 KB.  Rows a power-of-two stride apart fall in the same L1
        sets, and the int4 GEMM's 12-row tile then evicts its own rows: at K = 4096 and 8192
        it ran at 2/3 of its rate at K = 3968 or 4224 (Zen 4)."""
        words = self.k_pad // self.x_per_word
        return words + 16 if (4 * words) % 1024 == 0 else words

    @property
    def blocks(self) -> int:
        """Column blocks, padded to a multiple of blocks_multiple (the kernels' widest tile)."""
        bm = self.blocks_multiple
        return -(-self.n // (COLS * bm)) * bm

    @property
    def group(self) -> int:
        return self.fmt.group_size if self.grouped else self.k_pad

    @property
    def groups(self) -> int:
        return self.k_pad // self.group

    def check(self) -> None:
        fmt = self.fmt
        if self.dot not in ("avx2", "vnni"):
            raise ValueError(f"unknown dot-product form {self.dot!r} (avx2 or vnni)")
        if self.dot == "avx2" and fmt.bits == 8 and not fmt.symmetric:
            # u8 codes up to 255 against s8 activations saturate vpmaddubsw's i16 pairs
            raise IntLayoutError(f"{fmt.key()}: unsigned int8 codes have no integer kernel")
        if self.dot == "avx2" and fmt.bits == 8 and self.grouped:
            raise IntLayoutError(f"{fmt.key()}: grouped int8 weights have no integer kernel")
        # i32 sums over a group: weight codes up to 15 (int4), 255 (unsigned int8) or 127, activations |x| <= 128
        max_code = 15 if fmt.bits == 4 else 255 if self.unsigned_codes else 127
        if max_code * 128 * self.group >= 2 ** 31:
            raise IntLayoutError(f"{fmt.key()}: K={self.k} could overflow the i32 sums")
        if self.grouped and (self.group % UNIT or self.k % self.group):
            raise IntLayoutError(f"{fmt.key()}: group size {self.group} is not a multiple of {UNIT} dividing K={self.k}")

    def shapes(self) -> dict:
        """role -> (shape, numpy dtype) of the packed arrays."""
        b, g = self.blocks, self.groups
        out = {"codes": ((b, self.quads if self.fmt.bits == 8 else self.quads // 2, COLS * QUAD),
                         np.uint8 if self.unsigned_codes else np.int8),
               "scale": ((b, g, COLS), np.float32)}
        if self.unsigned_codes:
            out["zero"] = ((b, g, COLS), np.uint8)
        return out

    def tag(self) -> str:
        return f"int{self.fmt.bits}x{COLS}x{QUAD}" + ("vnni" if self.dot == "vnni" and self.fmt.bits == 8 else "")

    def to_json(self) -> dict:
        return {"layout": "int-blocks", "cols": COLS, "quad": QUAD, "k_pad": self.k_pad, "blocks": self.blocks,
                "group": self.group, "dot": self.dot}


def _per_group(a: np.ndarray, lay: IntLayout, fill) -> np.ndarray:
    """[N or 1, groups or 1] -> [blocks, groups, COLS], broadcast and padded with `fill`."""
    a = np.broadcast_to(a, (lay.n, lay.groups if lay.grouped else 1))
    out = np.full((lay.blocks * COLS, lay.groups), fill, a.dtype)
    out[:lay.n] = a
    return np.ascontiguousarray(out.reshape(lay.blocks, COLS, lay.groups).transpose(0, 2, 1))


def pack(lay: IntLayout, packed_codes: np.ndarray, scale: np.ndarray, zero=None) -> dict:
    """The format's storage (formats.pack output, scale, zero) -> the kernels' arrays by role."""
    lay.check()
    fmt = lay.fmt
    codes = formats.unpack(packed_codes, fmt, (lay.n, lay.k))
    b = lay.blocks
    if fmt.bits == 8 and lay.unsigned_codes:
        # padding holds the zero point (128 for sym, 0 for asym; padded columns are never stored)
        full = np.full((b * COLS, lay.k_pad), 128 if fmt.symmetric else 0, np.uint8)
        full[:lay.n, :lay.k] = codes.astype(np.int16) + (128 if fmt.symmetric else 0)
        # [b, j, q, i] -> [b, q, j, i]
        out = {"codes": np.ascontiguousarray(full.reshape(b, COLS, lay.quads, QUAD).transpose(0, 2, 1, 3)
                                             .reshape(b, lay.quads, COLS * QUAD))}
    elif fmt.bits == 8:
        full = np.zeros((b * COLS, lay.k_pad), np.int8)
        full[:lay.n, :lay.k] = codes
        # [b, j, q, h, i] -> [b, q, h, j, i]
        out = {"codes": np.ascontiguousarray(full.reshape(b, COLS, lay.quads, 2, 2).transpose(0, 2, 3, 1, 4)
                                             .reshape(b, lay.quads, COLS * QUAD))}
    else:
        full = np.zeros((b * COLS, lay.k_pad), np.uint8)
        full[:lay.n, :lay.k] = codes.astype(np.int16) + (8 if fmt.symmetric else 0)
        # [b, j, t, h, i] -> [b, t, j, i, h]: h = 0 low nibble (quad 2t), 1 high (quad 2t + 1)
        t = full.reshape(b, COLS, lay.quads // 2, 2, QUAD).transpose(0, 2, 1, 4, 3)
        out = {"codes": np.ascontiguousarray((t[..., 0] | (t[..., 1] << 4)).reshape(b, lay.quads // 2, COLS * QUAD))}
    out["scale"] = _per_group(np.asarray(scale, np.float32), lay, np.float32(1.0))
    if lay.unsigned_codes:
        z = np.full((1, 1), _sym_zero(fmt), np.uint8) if fmt.symmetric else np.asarray(zero, np.uint8)
        out["zero"] = _per_group(z, lay, np.uint8(_sym_zero(fmt) if fmt.symmetric else 0))
    return out


def _sym_zero(fmt) -> int:
    """The zero point of a symmetric format's codes stored unsigned: 2^(bits - 1)."""
    return 1 << (fmt.bits - 1)


def unpack(lay: IntLayout, arrays: dict) -> formats.QuantizedTensor:
    """The kernels' arrays -> the format's QuantizedTensor (inverse of `pack`)."""
    fmt = lay.fmt
    b = lay.blocks
    if fmt.bits == 8 and not lay.unsigned_codes:
        full = arrays["codes"].reshape(b, lay.quads, 2, COLS, 2).transpose(0, 3, 1, 2, 4).reshape(b * COLS, lay.k_pad)
        codes = full[:lay.n, :lay.k].astype(np.int8)
    else:
        if fmt.bits == 8:
            full = arrays["codes"].reshape(b, lay.quads, COLS, QUAD).transpose(0, 2, 1, 3).reshape(b * COLS, lay.k_pad)
        else:
            bytes_ = arrays["codes"].reshape(b, lay.quads // 2, COLS, QUAD)
            t = np.stack([bytes_ & 15, bytes_ >> 4], axis=-1)   # [b, t, j, i, h]
            full = t.transpose(0, 2, 1, 4, 3).reshape(b * COLS, lay.k_pad)
        codes = full[:lay.n, :lay.k].astype(np.int16)
        codes = (codes - _sym_zero(fmt)).astype(np.int8) if fmt.symmetric else codes.astype(np.uint8)
    sshape = fmt.scale_shape((lay.n, lay.k))

    def granules(a):
        a = a.transpose(0, 2, 1).reshape(b * COLS, -1)
        return np.ascontiguousarray(a[:sshape[0], :sshape[1]])

    zero = granules(arrays["zero"]) if lay.unsigned_codes and not fmt.symmetric else None
    return formats.QuantizedTensor(codes=codes, scale=granules(arrays["scale"]), zero=zero,
                                   format=fmt, shape=(lay.n, lay.k))


def dequantize_layer(layer: dict, kernel: dict, weights: dict) -> np.ndarray:
    """The dequantized weight of an artifact layer the integer kernels own (manifest
    `layers[i]` and `cpu.kernels[weight]`): [N, K], or a mixture of experts' [E * N, K] from
    its E layouts stacked along the blocks (kernel `experts`)."""
    n, k = layer["shape"]
    experts = kernel.get("experts", 1)
    lay = IntLayout(layer["format"], n // experts, k, blocks_multiple=kernel["blocks_multiple"],
                    dot=kernel.get("dot", "avx2"))
    arrays = {role: weights[name] for role, name in kernel["params"].items() if role != "act_scale"}
    return np.concatenate([
        formats.dequantize(unpack(lay, {role: a[e * lay.blocks:(e + 1) * lay.blocks] for role, a in arrays.items()}))
        for e in range(experts)])
