"""Walsh-Hadamard matrices, their fast transform (numpy reference) and its MLIR kernel.

A Hadamard matrix H of order n has entries +-1 and H H^T = n I, so H / sqrt(n)
is orthogonal.  Orders built here are n = m * 2^k: H = H_m (x) S_k, the
Kronecker product of a small "seed" matrix with Sylvester's S_k
(S_0 = [1], S_{k+1} = [[S_k, S_k], [S_k, -S_k]]).  Seeds: m = 1, and Paley's
constructions from a prime q (Paley, "On orthogonal matrices", 1933):
  I:  q = 3 (mod 4) gives order q + 1       (4, 8, 12, 20, 24, 32, 44, 48, 60, ...)
  II: q = 1 (mod 4) gives order 2 (q + 1)   (12, 28, 36, 60, 76, 84, ...)
so 12, 20 and 28 (and 36, 44, 60, ...) times a power of two are supported.

x @ H costs O(n (log n + m)) with the fast transform: a Sylvester butterfly
over the 2^k axis, then a dense m x m mix.
"""

import functools
import math

import numpy as np


class HadamardError(ValueError):
    """No Hadamard matrix of the requested order can be built here."""


def _is_prime(q: int) -> bool:
    return q >= 2 and all(q % d for d in range(2, int(math.isqrt(q)) + 1))


def _jacobsthal(q: int) -> np.ndarray:
    """Q[i, j] = legendre(j - i) over GF(q), q prime."""
    residues = {(x * x) % q for x in range(1, q)}
    chi = np.array([0] + [1 if a in residues else -1 for a in range(1, q)])
    idx = (np.arange(q)[None, :] - np.arange(q)[:, None]) % q
    return chi[idx]


@functools.lru_cache(maxsize=None)
def _paley(m: int) -> np.ndarray | None:
    """A Hadamard matrix of order m from Paley I or II, or None if neither applies."""
    q = m - 1
    if _is_prime(q) and q % 4 == 3:
        jac = _jacobsthal(q)
        s = np.zeros((m, m), np.int64)
        s[0, 1:] = 1
        s[1:, 0] = -1
        s[1:, 1:] = jac
        return s + np.eye(m, dtype=np.int64)
    if m % 2 == 0:
        q = m // 2 - 1
        if _is_prime(q) and q % 4 == 1:
            jac = _jacobsthal(q)
            c = np.zeros((q + 1, q + 1), np.int64)
            c[0, 1:] = 1
            c[1:, 0] = 1
            c[1:, 1:] = jac
            return (np.kron(c, np.array([[1, -1], [-1, -1]]))
                    + np.kron(np.eye(q + 1, dtype=np.int64), np.array([[1, 1], [1, -1]])))
    return None


def factor(n: int) -> tuple[int, int]:
    """(m, k) with n = m * 2^k and H_m buildable, smallest m first; HadamardError otherwise."""
    if not isinstance(n, int) or n < 1:
        raise HadamardError(f"no Hadamard matrix of order {n!r}")
    k = (n & -n).bit_length() - 1
    for kk in range(k, -1, -1):
        m = n >> kk
        if m == 1 or (m % 4 == 0 and _paley(m) is not None):
            return m, kk
    raise HadamardError(
        f"no Hadamard matrix of order n={n} is known to qcc: n must be m * 2^k with m = 1 or a "
        f"Paley order (12, 20, 28, 36, 44, 60, ...); n={n} = {n >> k} * 2^{k}")


def seed_matrix(m: int) -> np.ndarray:
    """The +-1 seed H_m (int64) of a factorization."""
    if m == 1:
        return np.ones((1, 1), np.int64)
    h = _paley(m)
    if h is None:
        raise HadamardError(f"no Paley Hadamard matrix of order {m}")
    return h


def hadamard_matrix(n: int) -> np.ndarray:
    """The +-1 Hadamard matrix H_m (x) S_k of order n (float64)."""
    m, k = factor(n)
    s = np.ones((1, 1))
    for _ in range(k):
        s = np.block([[s, s], [s, -s]])
    return np.kron(seed_matrix(m).astype(np.float64), s)


def orthogonal(n: int, seed: int | None = None) -> np.ndarray:
    """Q = D H / sqrt(n) (float64, orthogonal); D = diag(random +-1 from `seed`), or I for seed None."""
    q = hadamard_matrix(n) / math.sqrt(n)
    if seed is not None:
        signs = np.random.default_rng(seed).choice([-1.0, 1.0], size=n)
        q = signs[:, None] * q
    return q


def block_size(n: int, block: int = 0) -> int:
    """The order of the (block-diagonal) Hadamard transform used on n channels.

    block = 0: n itself when an order-n matrix exists, else the largest order that
    divides n; otherwise `block`, which must divide n and be buildable.
    """
    if block:
        if n % block:
            raise HadamardError(f"Hadamard block size {block} does not divide n={n}")
        factor(block)
        return block
    for b in sorted((d for d in range(1, n + 1) if n % d == 0), reverse=True):
        try:
            factor(b)
            return b
        except HadamardError:
            continue
    return 1


def block_matrix(n: int, block: int) -> np.ndarray:
    """I_{n/block} (x) H_block / sqrt(block): the orthogonal matrix of the blocked transform (float64)."""
    return np.kron(np.eye(n // block), hadamard_matrix(block) / math.sqrt(block))


def fast_transform(x: np.ndarray, block: int | None = None) -> np.ndarray:
    """x @ (H / sqrt(n)) along the last axis in O(n (log n + m)): the reference of the online kernel.

    With `block` < n the transform is block-diagonal: each run of `block` channels
    is transformed on its own (x @ block_matrix(n, block)).
    """
    x = np.asarray(x, dtype=np.float64)
    if block and block != x.shape[-1]:
        lead = x.shape
        return fast_transform(x.reshape(*lead[:-1], lead[-1] // block, block)).reshape(lead)
    n = x.shape[-1]
    m, k = factor(n)
    lead = x.shape[:-1]
    y = x.reshape(-1, n)
    # constant-geometry butterfly (Pease): k identical stages give x @ (I_m (x) S_k) on the
    # low 2^k index bits when the m axis is kept apart
    y = y.reshape(-1, m, 1 << k)
    for _ in range(k):
        a, b = y[..., 0::2], y[..., 1::2]
        y = np.concatenate([a + b, a - b], axis=-1)
    if m > 1:
        y = np.einsum("rab,ac->rcb", y, seed_matrix(m).astype(np.float64))
    return (y / math.sqrt(n)).reshape(*lead, n)


def _stage_lines(src: str, dst: str, res: str, m: int, k: int, n: int, ind: str) -> list[str]:
    """One constant-geometry butterfly stage: %res = stage(%src), written into %dst.

    out[:, i] = x[:, 2i] + x[:, 2i+1], out[:, h + i] = x[:, 2i] - x[:, 2i+1] (h = half
    the block) within each of the m blocks of 2^k columns.
    """
    blk = 1 << k
    half = blk // 2
    ty = f"tensor<?x{n}xf32>"
    t3 = f"tensor<?x{m}x{blk}xf32>"
    h3 = f"tensor<?x{m}x{half}xf32>"
    p = f"%{res}_"
    return [ind + line for line in (
        f"{p}s3 = tensor.expand_shape %{src} [[0], [1, 2]] output_shape [%rows, {m}, {blk}] : {ty} into {t3}",
        f"{p}d3 = tensor.expand_shape %{dst} [[0], [1, 2]] output_shape [%rows, {m}, {blk}] : {ty} into {t3}",
        f"{p}a = tensor.extract_slice {p}s3[0, 0, 0] [%rows, {m}, {half}] [1, 1, 2] : {t3} to {h3}",
        f"{p}b = tensor.extract_slice {p}s3[0, 0, 1] [%rows, {m}, {half}] [1, 1, 2] : {t3} to {h3}",
        f"{p}lo = tensor.extract_slice {p}d3[0, 0, 0] [%rows, {m}, {half}] [1, 1, 1] : {t3} to {h3}",
        f"{p}hi = tensor.extract_slice {p}d3[0, 0, {half}] [%rows, {m}, {half}] [1, 1, 1] : {t3} to {h3}",
        f"{p}sum = linalg.add ins({p}a, {p}b : {h3}, {h3}) outs({p}lo : {h3}) -> {h3}",
        f"{p}dif = linalg.sub ins({p}a, {p}b : {h3}, {h3}) outs({p}hi : {h3}) -> {h3}",
        f"{p}o1 = tensor.insert_slice {p}sum into {p}d3[0, 0, 0] [%rows, {m}, {half}] [1, 1, 1] : {h3} into {t3}",
        f"{p}o2 = tensor.insert_slice {p}dif into {p}o1[0, 0, {half}] [%rows, {m}, {half}] [1, 1, 1] : {h3} into {t3}",
        f"%{res} = tensor.collapse_shape {p}o2 [[0], [1, 2]] : {t3} into {ty}",
    )]


def kernel_mlir(name: str, n: int, block: int | None = None) -> str:
    """MLIR text of `func.func private @name(tensor<?xnxf32>) -> tensor<?xnxf32>` computing x @ H / sqrt(n).

    The butterfly is an scf.for over k identical stages (strided slices, add, sub,
    concatenate), so the code is O(n log n) and its size does not grow with n;
    the m x m seed mix is one linalg.generic over a dense constant.  With `block`
    < n, rows are first viewed as [rows * n / block, block] (the blocked transform).
    """
    full = n
    outer = f"tensor<?x{full}xf32>"
    lines = [f"func.func private @{name}(%arg: {outer}) -> {outer} {{",
             "  %c0 = arith.constant 0 : index",
             "  %c1 = arith.constant 1 : index"]
    if block and block != n:
        nb = n // block
        n = block
        lines += [
            f"  %rows0 = tensor.dim %arg, %c0 : {outer}",
            f"  %arg3 = tensor.expand_shape %arg [[0], [1, 2]] output_shape [%rows0, {nb}, {n}] : {outer} into tensor<?x{nb}x{n}xf32>",
            f"  %x = tensor.collapse_shape %arg3 [[0, 1], [2]] : tensor<?x{nb}x{n}xf32> into tensor<?x{n}xf32>",
        ]
        epilogue = [
            f"  %res3 = tensor.expand_shape %r [[0, 1], [2]] output_shape [%rows0, {nb}, {n}] : tensor<?x{n}xf32> into tensor<?x{nb}x{n}xf32>",
            f"  %res = tensor.collapse_shape %res3 [[0], [1, 2]] : tensor<?x{nb}x{n}xf32> into {outer}",
            f"  return %res : {outer}",
            "}",
        ]
    else:
        lines.append(f"  %x = tensor.cast %arg : {outer} to {outer}")
        epilogue = [f"  return %r : {outer}", "}"]
    m, k = factor(n)
    ty = f"tensor<?x{n}xf32>"
    lines.append(f"  %rows = tensor.dim %x, %c0 : {ty}")
    out = "%x"
    if k > 0:
        # Ping-pong between two buffers, two stages an iteration, so that every
        # loop-carried tensor stays in place (one-shot bufferization demands it).
        lines.append(f"  %tmp0 = tensor.empty(%rows) : {ty}")
        if k >= 2:
            lines += [
                f"  %cpairs = arith.constant {k // 2} : index",
                f"  %y:2 = scf.for %i = %c0 to %cpairs step %c1 iter_args(%cur = %x, %tmp = %tmp0) -> ({ty}, {ty}) {{",
            ]
            lines += _stage_lines("cur", "tmp", "t1", m, k, n, "    ")
            lines += _stage_lines("t1", "cur", "t2", m, k, n, "    ")
            lines += [f"    scf.yield %t2, %t1 : {ty}, {ty}", "  }"]
            out = "%y#0"
            if k % 2:
                lines += _stage_lines("y#0", "y#1", "ylast", m, k, n, "  ")
                out = "%ylast"
        else:
            lines += _stage_lines("x", "tmp0", "ylast", m, k, n, "  ")
            out = "%ylast"
    scale = f"{1.0 / math.sqrt(n):.9e}"
    lines.append(f"  %scale = arith.constant {scale} : f32")
    lines.append("  %zero = arith.constant 0.0 : f32")
    lines.append(f"  %init = tensor.empty(%rows) : {ty}")
    if m == 1:
        lines += [
            "  %r = linalg.generic {indexing_maps = [affine_map<(r, j) -> (r, j)>, affine_map<(r, j) -> (r, j)>],",
            '      iterator_types = ["parallel", "parallel"]}',
            f"      ins({out} : {ty}) outs(%init : {ty}) {{",
            "  ^bb0(%v: f32, %o: f32):",
            "    %p = arith.mulf %v, %scale : f32",
            "    linalg.yield %p : f32",
            f"  }} -> {ty}",
        ]
    else:
        blk = 1 << k
        t3 = f"tensor<?x{m}x{blk}xf32>"
        seed = seed_matrix(m)
        rows = ", ".join("[" + ", ".join(f"{float(v):.1f}" for v in row) + "]" for row in seed)
        lines += [
            f"  %seed = arith.constant dense<[{rows}]> : tensor<{m}x{m}xf32>",
            f"  %y3 = tensor.expand_shape {out} [[0], [1, 2]] output_shape [%rows, {m}, {blk}] : {ty} into {t3}",
            f"  %e3 = tensor.empty(%rows) : {t3}",
            f"  %z3 = linalg.fill ins(%zero : f32) outs(%e3 : {t3}) -> {t3}",
            # out[r, c, b] = sum_a y[r, a, b] * seed[a, c]
            "  %mix = linalg.generic {indexing_maps = [affine_map<(r, c, b, a) -> (r, a, b)>,",
            "                                           affine_map<(r, c, b, a) -> (a, c)>,",
            "                                           affine_map<(r, c, b, a) -> (r, c, b)>],",
            '      iterator_types = ["parallel", "parallel", "parallel", "reduction"]}',
            f"      ins(%y3, %seed : {t3}, tensor<{m}x{m}xf32>) outs(%z3 : {t3}) {{",
            "  ^bb0(%v: f32, %h: f32, %acc: f32):",
            "    %p = arith.mulf %v, %h : f32",
            "    %p2 = arith.mulf %p, %scale : f32",
            "    %s2 = arith.addf %acc, %p2 : f32",
            "    linalg.yield %s2 : f32",
            f"  }} -> {t3}",
            f"  %r = tensor.collapse_shape %mix [[0], [1, 2]] : {t3} into {ty}",
        ]
    return "\n".join(lines + epilogue) + "\n"
