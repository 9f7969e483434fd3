"""Weight re-layout for the CUDA kernels, and plain numpy reference numerics.

Needs only numpy (it runs on the GPU machine too, where there is no MLIR).

Formats (the contract shared with ``qcc.dialects.formats``), weight W[N, K]:

* ``w4a16-g{G}``: ``packed`` uint8 [N, K/2], byte j of row n holds column 2j in the
  low nibble and 2j+1 in the high nibble; ``scale`` float32 [N, K/G]; ``zero``
  uint8 [N, K/G] in 0..15 (symmetric int4 uses the constant 8);
  ``Wdeq = (nibble - zero) * scale``.
* ``w8a16``: ``q`` int8 [N, K], ``scale`` float32 [N, 1]; ``Wdeq = q * scale``.
* ``w8a8``: weights as w8a16; activations int8 [M, K] with a per-token scale
  float32 [M, 1]; ``y = (xq @ q^T) * sx * sw^T``.

Kernel layouts (see README.md in this folder for the thread mapping):

* w4: tiles of 8 rows x 128 columns; tile (tn, kt) is 512 contiguous bytes, lane
  ``l = 4g + t`` owns 16 of them = row ``8tn + g``, columns ``128kt + 32t + [0, 32)``,
  as four 32-bit words; nibble p of word wi holds column
  ``8wi + 2(p % 4) + p // 4`` of the lane's 32, so that ``(w >> 4c) & 0x000F000F``
  yields the f16x2 pair of one mma B register.
* w8: tiles of 8 rows x 64 columns (16 bytes per lane), stored offset-binary
  (``q ^ 0x80``), byte b of word wi holding column ``4wi + (0, 2, 1, 3)[b]``.
"""
from __future__ import annotations

import numpy as np

W4_JMAP = np.array([2 * (p % 4) + p // 4 for p in range(8)])  # nibble p -> column j
# The K index (within a 128-column tile) of nibble p of word wi of lane t, [t, wi, p], per
# kernel family. Either way the kernel turns word wi into the operands of k16 steps 2 wi and
# 2 wi + 1, nibbles (2 h, 2 h + 4) the pair b0 and (2 h + 1, 2 h + 5) the pair b1 of step
# 2 wi + h. "mma": a lane's 32 weights are contiguous in K (K = 32 t + 8 wi + W4_JMAP[p]), so
# its x values are two 16-byte loads a row; step s then covers K 32 t + 4 s + (0..3), in
# the order the GEMVs load x. "wgmma": step s covers K 16 s .. 16 s + 15 in the natural
# mma order (b0 = K 16 s + 2 t + e, b1 = 8 more), so x can feed the tensor cores from
# shared memory unpermuted (gemm_w4a16_wg).
_T, _WI, _P = np.meshgrid(np.arange(4), np.arange(4), np.arange(8), indexing="ij")
W4_KMAP = {"mma": 32 * _T + 8 * _WI + W4_JMAP[_P],
           "wgmma": 32 * _WI + 16 * ((_P // 2) % 2) + 8 * (_P % 2) + 2 * _T + _P // 4}

W8_PERM = np.array([0, 2, 1, 3])  # byte b -> column offset within a word
W4_BUILDERS = ("gemv_w4a16", "gemm_w4a16", "gemm_w4a16_wg")  # the kernels reading pack_w4a16's layout


def w4_order(builder: str) -> str:
    """The W4_KMAP order of the packed weights a w4a16 kernel builder reads."""
    return "wgmma" if builder == "gemm_w4a16_wg" else "mma"


class LayoutError(ValueError):
    pass


# --------------------------------------------------------------------------- reference


def unpack_int4(packed: np.ndarray) -> np.ndarray:
    """uint8 [N, K/2] -> uint8 [N, K] nibbles (column 2j low nibble)."""
    p = np.asarray(packed, np.uint8)
    out = np.empty(p.shape[:-1] + (p.shape[-1] * 2,), np.uint8)
    out[..., 0::2] = p & 0xF
    out[..., 1::2] = p >> 4
    return out


def pack_int4(nib: np.ndarray) -> np.ndarray:
    """uint8 [N, K] nibbles -> uint8 [N, K/2]."""
    n = np.asarray(nib, np.uint8)
    if n.shape[-1] % 2:
        raise LayoutError("K must be even to pack int4")
    return (n[..., 0::2] & 0xF) | ((n[..., 1::2] & 0xF) << 4)


def dequant_w4(packed, scale, zero=None, group_size=128) -> np.ndarray:
    """Reference dequantization of w4a16-g{G} to float32 [N, K]."""
    q = unpack_int4(packed).astype(np.float32)
    N, K = q.shape
    G = group_size
    z = np.full((N, K // G), 8.0, np.float32) if zero is None else np.asarray(zero, np.float32)
    s = np.asarray(scale, np.float32)
    if s.shape != (N, K // G) or z.shape != (N, K // G):
        raise LayoutError(f"scale/zero must be [N, K/G] = {(N, K // G)}; got {s.shape}, {z.shape}")
    return ((q.reshape(N, K // G, G) - z[..., None]) * s[..., None]).reshape(N, K)


def dequant_w8(q, scale) -> np.ndarray:
    q = np.asarray(q, np.int8)
    return q.astype(np.float32) * np.asarray(scale, np.float32).reshape(q.shape[0], 1)


def quantize_w4(w: np.ndarray, group_size=128, symmetric=False):
    """A plain min/max int4 quantizer (test data; the formats registry owns the real one)."""
    w = np.asarray(w, np.float32)
    N, K = w.shape
    G = group_size
    g = w.reshape(N, K // G, G)
    if symmetric:
        s = np.abs(g).max(-1) / 7.0
        s = np.where(s == 0, 1.0, s).astype(np.float32)
        z = np.full(s.shape, 8, np.uint8)
    else:
        lo, hi = g.min(-1), g.max(-1)
        s = ((hi - lo) / 15.0).astype(np.float32)
        s = np.where(s == 0, 1.0, s).astype(np.float32)
        z = np.clip(np.round(-lo / s), 0, 15).astype(np.uint8)
    q = np.clip(np.round(g / s[..., None]) + z[..., None], 0, 15).astype(np.uint8)
    return pack_int4(q.reshape(N, K)), s, (None if symmetric else z)


def quantize_w8(w: np.ndarray):
    w = np.asarray(w, np.float32)
    s = (np.abs(w).max(1, keepdims=True) / 127.0).astype(np.float32)
    s = np.where(s == 0, 1.0, s).astype(np.float32)
    return np.clip(np.round(w / s), -127, 127).astype(np.int8), s


# --------------------------------------------------------------------------- w4 layout


def check_w4_shape(K: int, N: int, group_size: int):
    if K % 128 or N % 8:
        raise LayoutError(f"w4a16 kernels need K % 128 == 0 and N % 8 == 0 (K={K}, N={N})")
    if group_size % 32 or K % group_size:
        raise LayoutError(f"group size must be a multiple of 32 dividing K (G={group_size}, K={K})")


def pack_w4a16(packed, scale, zero=None, group_size=128, scale_mode=None, order="mma") -> dict:
    """Re-layout a w4a16-g{G} weight for ``kernels.gemv_w4a16`` (``order="wgmma"``:
    ``kernels.gemm_w4a16_wg``; see W4_KMAP).

    Returns a dict of C-contiguous arrays named like the kernel parameters:
    ``wq`` uint32 [N/8, K/128, 32, 4]; for ``scale_mode="acc"`` (G % 128 == 0)
    ``scales`` float32 [N/8, K/G, 8] and (asymmetric) ``zeros`` uint8 [N/8, K/G, 8];
    for ``scale_mode="weight"`` ``meta`` float16 [N/8, K/G, 8, 2] = (1024 + zero, scale).
    """
    nib = unpack_int4(packed)
    N, K = nib.shape
    G = group_size
    check_w4_shape(K, N, G)
    mode = scale_mode or ("acc" if G % 128 == 0 else "weight")
    if mode == "acc" and G % 128:
        raise LayoutError("scale_mode='acc' needs G % 128 == 0")
    if np.shape(scale) != (N, K // G) or (zero is not None and np.shape(zero) != (N, K // G)):
        raise LayoutError(f"scale and zero must be [N, K/G] = {(N, K // G)}; got "
                          f"{np.shape(scale)}, {None if zero is None else np.shape(zero)}")
    q = nib.reshape(N // 8, 8, K // 128, 128)[..., W4_KMAP[order]].astype(np.uint32)  # tn, g, kt, t, wi, p
    words = np.zeros(q.shape[:-1], np.uint32)
    for p in range(8):
        words |= q[..., p] << np.uint32(4 * p)
    wq = np.ascontiguousarray(words.transpose(0, 2, 1, 3, 4))  # tn, kt, g, t, wi
    out = {"wq": wq.reshape(N // 8, K // 128, 32, 4)}
    s = np.asarray(scale, np.float32).reshape(N // 8, 8, K // G).transpose(0, 2, 1)
    z = None if zero is None else np.asarray(zero, np.uint8).reshape(N // 8, 8, K // G).transpose(0, 2, 1)
    if mode == "acc":
        if G % 128:
            raise LayoutError("scale_mode='acc' needs G % 128 == 0")
        out["scales"] = np.ascontiguousarray(s)
        if z is not None:
            out["zeros"] = np.ascontiguousarray(z)
    elif mode == "weight":
        zz = np.full(s.shape, 8, np.uint8) if z is None else z
        if np.any(np.abs(s) > 65504):
            raise LayoutError("scales overflow float16 in scale_mode='weight'")
        out["meta"] = np.ascontiguousarray(np.stack([1024.0 + zz.astype(np.float32), s], -1)
                                           .astype(np.float16))
    else:
        raise LayoutError(f"unknown scale_mode {scale_mode!r}")
    return out


def unpack_w4a16_nibbles(wq: np.ndarray, K: int, N: int, order: str = "mma") -> np.ndarray:
    """Inverse of the ``wq`` layout: uint8 nibbles [N, K] (for tests)."""
    w = np.asarray(wq, np.uint32).reshape(N // 8, K // 128, 8, 4, 4)  # tn, kt, g, t, wi
    w = w.transpose(0, 2, 1, 3, 4)  # tn, g, kt, t, wi
    nib = np.empty(w.shape[:3] + (128,), np.uint8)
    for p in range(8):
        nib[..., W4_KMAP[order][..., p]] = (w >> np.uint32(4 * p)) & 0xF
    return nib.reshape(N, K)


# --------------------------------------------------------------------------- w8 layout


def check_w8_shape(K: int, N: int):
    if K % 64 or N % 8:
        raise LayoutError(f"w8a16 kernels need K % 64 == 0 and N % 8 == 0 (K={K}, N={N})")


def pack_w8a16(q, scale) -> dict:
    """Re-layout an int8 [N, K] weight for ``kernels.gemv_w8a16``.

    ``wq`` uint8 [N/8, K/64, 32, 16] offset-binary (q ^ 0x80); ``scales`` float32 [N].
    """
    q = np.asarray(q, np.int8)
    N, K = q.shape
    check_w8_shape(K, N)
    u = (q.view(np.uint8) ^ 0x80).reshape(N // 8, 8, K // 64, 4, 4, 4)  # tn,g,kt,t,wi,c
    u = u[..., W8_PERM]  # byte b holds column perm[b]
    wq = np.ascontiguousarray(u.transpose(0, 2, 1, 3, 4, 5)).reshape(N // 8, K // 64, 32, 16)
    return {"wq": wq, "scales": np.ascontiguousarray(np.asarray(scale, np.float32).reshape(N))}


def unpack_w8a16(wq: np.ndarray, K: int, N: int) -> np.ndarray:
    u = np.asarray(wq, np.uint8).reshape(N // 8, K // 64, 8, 4, 4, 4).transpose(0, 2, 1, 3, 4, 5)
    out = np.empty_like(u)
    out[..., W8_PERM] = u
    return (out.reshape(N, K) ^ 0x80).view(np.int8)


# --------------------------------------------------------------------------- compiled layers


def dequantize_layer(info: dict, weights: dict) -> np.ndarray:
    """float32 [N, K] of a layer repacked for a GEMV kernel by cuda-select-kernels, decoded
    from the packed parameters exactly as the kernel reads them (``info`` is the artifact's
    manifest["cuda"]["layers"][weight] entry; in scale_mode="weight" the scales are f16)."""
    if "cols" in info:  # one layer of a stacked GEMV: its rows of the stacked weight
        n0, n1 = info["cols"]
        return dequantize_layer({k: v for k, v in info.items() if k != "cols"}, weights)[n0:n1]
    a, p = info["args"], info["params"]
    K, N = a["K"], a["N"]
    if info["builder"] == "gemv_w8a16":
        q = unpack_w8a16(weights[p["wq"]], K, N).astype(np.float32)
        return q * np.asarray(weights[p["scales"]], np.float32).reshape(N, 1)
    G = a["group_size"]
    nib = unpack_w4a16_nibbles(weights[p["wq"]], K, N, w4_order(info["builder"])).astype(np.float32)

    def per_row(arr):  # [N/8, K/G, 8] -> [N, K/G]
        return np.asarray(arr).reshape(N // 8, K // G, 8).transpose(0, 2, 1).reshape(N, K // G)
    if "meta" in p:
        meta = np.asarray(weights[p["meta"]]).view(np.float16).reshape(N // 8, K // G, 8, 2)
        z = per_row(meta[..., 0].astype(np.float32)) - 1024.0
        s = per_row(meta[..., 1].astype(np.float32))
    else:
        s = per_row(np.asarray(weights[p["scales"]], np.float32))
        z = per_row(np.asarray(weights[p["zeros"]]).view(np.uint8).astype(np.float32)) if "zeros" in p \
            else np.full((N, K // G), 8.0, np.float32)
    w = (nib.reshape(N, K // G, G) - z[..., None]) * s[..., None]
    if "meta" in p:  # scale_mode="weight": the kernel scales in f16, rounding each weight
        w = w.astype(np.float16).astype(np.float32)
    return w.reshape(N, K)
