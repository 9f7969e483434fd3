"""Run a kernel written against :mod:`qcc.backends.cuda.emit` on the CPU, with numpy.

The emulator executes every op for all threads of a batch of thread blocks at once
(lock-step SIMT with an active mask for ``scf.if``), with the semantics of the
matching MLIR/PTX operation:

* integers wrap at their width; ``f16`` arithmetic rounds each op to half;
* ``mma_f16`` implements ``mma.sync.m16n8k16.row.col.f32.f16.f16.f32`` with the
  fragment layout of the PTX ISA (section "Matrix Fragments for mma.m16n8k16
  with floating point type"), ``mma_s8`` ``mma.sync.m16n8k32.row.col.s32.s8.s8.s32``
  (4 bytes a register; A rows g / g + 8, K 4t.. and 16 + 4t..; B the same K, column g);
  both need all 32 lanes of a warp active;
* ``shfl_xor`` is a butterfly shuffle within each warp;
* shared memory is per block and checked: reading an element that another thread
  wrote since the last ``barrier`` raises :class:`SimtError` (a missing barrier),
  as does reading one nobody wrote;
* loads and stores are bounds-checked for active threads; two active threads
  storing different values to one address in one op raise :class:`SimtError`.

It is slow-ish (numpy per op) but exact enough to test packed layouts, fragment
mappings and index arithmetic on small shapes. Only numpy is needed.
"""
from __future__ import annotations

import numpy as np

from .emit import (SWIZZLE_MODES, Emitter, KernelSpec, Val, parse_memref, parse_type, vec, is_float,
                   INT_TYPES)

_NP = {"i1": np.bool_, "i8": np.uint8, "i16": np.uint16, "i32": np.uint32,
       "i64": np.uint64, "index": np.int64, "f16": np.float16, "f32": np.float32,
       "f64": np.float64}
_SIGNED = {np.uint8: np.int8, np.uint16: np.int16, np.uint32: np.int32,
           np.uint64: np.int64, np.int64: np.int64}


class SimtError(RuntimeError):
    pass


def np_dtype(e: str):
    return _NP[e]


class _Mem:
    def __init__(self, name, arr, space, etype, nblocks=None):
        self.name, self.arr, self.space, self.etype = name, arr, space, etype
        if space == "workgroup":
            n = arr.shape[1]
            self.epoch_w = np.full((nblocks, n), -1, np.int64)  # epoch of last write
            self.writer = np.full((nblocks, n), -1, np.int64)  # thread of last write


class SimtEmulator(Emitter):
    def __init__(self, spec: KernelSpec, block_lo: int, block_hi: int):
        assert spec.block[1] == spec.block[2] == 1, "emulator supports 1-D blocks"
        self.spec = spec
        self.bx = spec.block[0]
        assert self.bx % 32 == 0, "block size must be a multiple of 32"
        nb = block_hi - block_lo
        self.T = nb * self.bx
        lin = np.arange(self.T, dtype=np.int64)
        self._tid = lin % self.bx
        blk = block_lo + lin // self.bx
        self._bidx = blk % spec.grid[0]
        self._bidy = blk // spec.grid[0]
        self._blk_local = lin // self.bx
        self._gtid = block_lo * self.bx + lin
        self.nb = nb
        self.mask = np.ones(self.T, bool)
        self.epoch = 0
        self._cp_open, self._cp_groups, self._pending_ok = [], [], False
        self._wg_pending = 0  # committed wgmma groups not yet waited for

    # -- helpers
    def _v(self, arr, t):
        return Val(self, arr, t)

    def _full(self, value, t):
        s, e = parse_type(t)
        dt = _NP[e]
        if e in INT_TYPES and e not in ("i1", "index"):
            value = int(value) % (1 << INT_TYPES[e])
        return np.full((self.T,) + s, value, dtype=dt)

    def _check_active_all(self, what, group=None):
        """`what` must run with every thread of each `group` of threads (a warp, a block:
        the whole batch when None) active or none of them: a branch on the block or warp
        index is fine, one that splits a warp (block) is divergent control flow."""
        m = self.mask.reshape(-1, group or self.T)
        if not (m.all(axis=1) | ~m.any(axis=1)).all():
            raise SimtError(f"{what} executed with inactive threads (divergent control flow)")

    # -- values
    def const(self, value, t):
        return self._v(self._full(value, t), t)

    def _bin(self, op, a, b):
        assert a.type == b.type, (op, a, b)
        x, y = a.v, b.v
        with np.errstate(over="ignore", invalid="ignore"):
            if op in ("addi", "addf"):
                r = x + y
            elif op in ("subi", "subf"):
                r = x - y
            elif op in ("muli", "mulf"):
                r = x * y
            elif op in ("divui", "remui"):
                if np.any((y == 0) & self._mvec(y)):
                    raise SimtError("division by zero")
                yy = np.where(y == 0, 1, y)
                r = x // yy if op == "divui" else x % yy
            elif op == "minui":
                r = np.minimum(x, y)
            elif op == "maximumf":
                r = np.maximum(x, y)
            elif op == "andi":
                r = x & y
            elif op == "ori":
                r = x | y
            elif op == "xori":
                r = x ^ y
            elif op in ("shrui", "shli"):
                w = INT_TYPES[parse_type(a.type)[1]]
                if np.any((y >= w) & self._mvec(y)):
                    raise SimtError(f"shift by >= {w}")
                r = (x >> y) if op == "shrui" else (x << y)
            else:
                raise SimtError(f"simt: no emulation of arith op {op}")
        return self._v(r.astype(x.dtype, copy=False), a.type)

    def _mvec(self, arr):
        m = self.mask
        return m.reshape((-1,) + (1,) * (arr.ndim - 1))

    def maxf(self, a, b):
        return self._bin("maximumf", a, b)

    def fma(self, a, b, c):
        r = a.v.astype(np.float64) * b.v.astype(np.float64) + c.v.astype(np.float64)
        return self._v(r.astype(a.v.dtype), a.type)

    def cmp(self, pred, a, b):
        x, y = a.v, b.v
        if pred.startswith("s") and x.dtype.type in _SIGNED:
            x, y = x.view(_SIGNED[x.dtype.type]), y.view(_SIGNED[y.dtype.type])
        p = pred[-2:] if pred[0] in "suo" else pred
        r = {"eq": x == y, "ne": x != y, "lt": x < y, "le": x <= y, "gt": x > y,
             "ge": x >= y}[p]
        return self._v(r, "i1")

    def select(self, c, a, b):
        cc = c.v.reshape((-1,) + (1,) * (a.v.ndim - 1))
        return self._v(np.where(cc, a.v, b.v), a.type)

    def cast(self, op, v, t):
        s, e = parse_type(t)
        dt = _NP[e]
        x = v.v
        if op == "index_cast":
            if x.dtype.type in _SIGNED:
                x = x.view(_SIGNED[x.dtype.type])
            r = x.astype(np.int64).astype(dt) if e != "index" else x.astype(np.int64)
        elif op == "extui":
            r = x.astype(dt)
        elif op == "extsi":
            r = x.view(_SIGNED[x.dtype.type]).astype(_SIGNED[dt]).view(dt)
        elif op == "trunci":
            r = x.astype(dt)
        elif op == "sitofp":
            r = x.view(_SIGNED[x.dtype.type]).astype(dt)
        elif op == "uitofp":
            r = x.astype(dt)
        elif op in ("truncf", "extf"):
            r = x.astype(dt)
        else:
            raise SimtError(f"simt: no emulation of arith op {op}")
        return self._v(r, t)

    def bitcast(self, v, t):
        s, e = parse_type(t)
        x = np.ascontiguousarray(v.v).reshape(self.T, -1)
        r = x.view(_NP[e]).reshape((self.T,) + s)
        return self._v(r, t)

    def shuffle(self, a, b, mask):
        both = np.concatenate([a.v, b.v], axis=1)
        return self._v(both[:, list(mask)], vec(len(mask), parse_type(a.type)[1]))

    def extract(self, v, i):
        return self._v(v.v[:, i].copy(), parse_type(v.type)[1])

    def broadcast(self, s, t):
        n = parse_type(t)[0][0]
        return self._v(np.repeat(s.v[:, None], n, axis=1), t)

    def from_elements(self, xs):
        return self._v(np.stack([x.v for x in xs], axis=1), vec(len(xs), xs[0].type))

    def reduce_add(self, v):
        e = parse_type(v.type)[1]
        if is_float(v.type):
            r = v.v.astype(np.float64).sum(axis=1).astype(v.v.dtype)
        else:
            r = v.v.astype(np.uint64).sum(axis=1).astype(v.v.dtype)
        return self._v(r, e)

    # -- generic scalar ops (the body of a linalg op replayed in a kernel)
    def raw(self, name, operands, result_types, attrs="", info=None):
        info = info or {}
        x = [o.v for o in operands]
        rt = result_types[0] if result_types else None
        if name == "arith.constant":
            return [self.const(info["value"], rt)]
        fn = _RAW.get(name)
        if fn is None:
            raise SimtError(f"simt: no emulation of {name}")
        with np.errstate(all="ignore"):
            r = fn(x, info, rt, self.mask)
        e = parse_type(rt)[1]
        return [self._v(np.asarray(r).astype(_NP[e], copy=False), rt)]

    # -- memory
    def _checked_index(self, mem, i, what: str):
        """(memory, per-thread index, active mask, extent), raising on an active thread's
        out-of-bounds index."""
        m: _Mem = mem.v
        i = self.idx(i).v
        act = self.mask
        n = m.arr.shape[1] if m.space == "workgroup" else m.arr.shape[0]
        bad = act & ((i < 0) | (i >= n))
        if bad.any():
            t = int(np.nonzero(bad)[0][0])
            raise SimtError(f"out-of-bounds {what} {m.name}[{int(i[t])}] (size {n}) "
                            f"by thread {int(self._tid[t])} of block {int(self._bidx[t])}")
        return m, i, act, n

    def load(self, mem, i):
        m, i, act, n = self._checked_index(mem, i, "load of")
        ii = np.where(act, i, 0)
        if m.space == "workgroup":
            self._check_pending(m, ii, act)
            b = self._blk_local
            ep = m.epoch_w[b, ii]
            wr = m.writer[b, ii]
            if np.any(act & (ep < 0)):
                t = int(np.nonzero(act & (ep < 0))[0][0])
                raise SimtError(f"read of unwritten shared memory {m.name}[{int(ii[t])}]")
            race = act & (ep == self.epoch) & (wr != self._gtid)
            if race.any():
                t = int(np.nonzero(race)[0][0])
                raise SimtError(f"race: {m.name}[{int(ii[t])}] read by thread "
                                f"{int(self._tid[t])} without a barrier after thread "
                                f"{int(wr[t]) % self.bx} wrote it")
            r = m.arr[b, ii]
        else:
            r = m.arr[ii]
        r = r.copy()
        r[~act] = 0
        return self._v(r, m.etype)

    def load_hint(self, mem, i, hint):
        return self.load(mem, i)  # cache hints do not change values

    def prefetch_l2(self, mem, i):
        self.load(mem, i)  # no value; bounds-checked like the load it stands for

    def grid_dependency_wait(self):
        pass  # the emulator runs one grid at a time

    def launch_dependents(self):
        pass  # likewise

    # cp.async: copies are queued per commit group and land in shared memory only when
    # a cp_async_wait retires their group; reading an element that still has a copy in
    # flight (by any thread of the block) raises SimtError.
    def cp_async(self, dst, di, src, si):
        v = self.load(src, si)
        m: _Mem = dst.v
        i = self.idx(di).v
        act = self.mask.copy()
        n = m.arr.shape[1]
        if np.any(act & ((i < 0) | (i >= n))):
            raise SimtError(f"out-of-bounds cp.async to {m.name}")
        self._cp_open.append((m, i.copy(), v, act))

    def cp_async_commit(self):
        self._cp_groups.append(self._cp_open)
        self._cp_open = []

    def cp_async_wait(self, n):
        self._check_active_all("cp.async.wait_group", 32)
        while len(self._cp_groups) > n:
            for m, i, v, act in self._cp_groups.pop(0):
                saved, self.mask = self.mask, act
                self._pending_ok = True
                self.store(v, Val(self, m, ""), Val(self, i, "index"))
                self._pending_ok = False
                self.mask = saved

    def _check_pending(self, m, ii, act):
        if self._pending_ok:
            return
        for grp in self._cp_groups + [self._cp_open]:
            for mm, i, v, a in grp:
                if mm is not m:
                    continue
                kb = self._blk_local[a] * m.arr.shape[1] + i[a]
                kr = self._blk_local[act] * m.arr.shape[1] + ii[act]
                if np.isin(kr, kb).any():
                    raise SimtError(f"shared memory {m.name} accessed while a cp.async to it "
                                    f"is in flight (missing cp.async.wait_group)")

    def store(self, val, mem, i):
        m, i, act, n = self._checked_index(mem, i, "store to")
        sel = np.nonzero(act)[0]
        if m.space == "workgroup":
            self._check_pending(m, np.where(act, i, 0), act)
            key = self._blk_local[sel] * n + i[sel]
        else:
            key = i[sel]
        vals = val.v[sel]
        order = np.argsort(key, kind="stable")
        ks, vs = key[order], vals[order]
        dup = ks[1:] == ks[:-1]
        if dup.any():
            a = vs[1:][dup].reshape(int(dup.sum()), -1)
            b = vs[:-1][dup].reshape(int(dup.sum()), -1)
            if np.any(a.view(np.uint8) != b.view(np.uint8)):
                raise SimtError(f"conflicting stores to {m.name} in one op")
        if m.space == "workgroup":
            b = self._blk_local[sel]
            m.arr[b, i[sel]] = vals
            m.epoch_w[b, i[sel]] = self.epoch
            m.writer[b, i[sel]] = self._gtid[sel]
        else:
            m.arr[i[sel]] = vals

    # -- gpu
    def tid(self):
        return self._v(self._tid.copy(), "index")

    def bid(self, dim="x"):
        return self._v((self._bidx if dim == "x" else self._bidy).copy(), "index")

    def barrier(self):
        self._check_active_all("gpu.barrier", self.bx)
        self.epoch += 1

    def shfl_xor(self, v, offset):
        self._check_active_all("gpu.shuffle", 32)
        x = v.v.reshape((self.T // 32, 32) + v.v.shape[1:])
        perm = np.arange(32) ^ offset
        return self._v(x[:, perm].reshape(v.v.shape), v.type)

    def dp4a(self, a, b, c):
        x = np.ascontiguousarray(a.v).view(np.int8).reshape(self.T, 4).astype(np.int64)
        y = np.ascontiguousarray(b.v).view(np.int8).reshape(self.T, 4).astype(np.int64)
        r = (x * y).sum(axis=1) + c.v.view(np.int32).astype(np.int64)
        return self._v(r.astype(np.uint32), "i32")  # wraps modulo 2^32, as the hardware does

    def mma_f16(self, a, b, c):
        self._check_active_all("nvvm.mma.sync", 32)
        W = self.T // 32
        lane = np.arange(32)
        g, t = lane // 4, lane % 4
        A = np.zeros((W, 16, 16))
        B = np.zeros((W, 16, 8))
        C = np.zeros((W, 16, 8))
        av = [x.v.reshape(W, 32, 2).astype(np.float64) for x in a]
        bv = [x.v.reshape(W, 32, 2).astype(np.float64) for x in b]
        cv = [x.v.reshape(W, 32).astype(np.float64) for x in c]
        for e in range(2):
            A[:, g, 2 * t + e] = av[0][:, :, e]
            A[:, g + 8, 2 * t + e] = av[1][:, :, e]
            A[:, g, 2 * t + 8 + e] = av[2][:, :, e]
            A[:, g + 8, 2 * t + 8 + e] = av[3][:, :, e]
            B[:, 2 * t + e, g] = bv[0][:, :, e]
            B[:, 2 * t + 8 + e, g] = bv[1][:, :, e]
            C[:, g, 2 * t + e] = cv[e]
            C[:, g + 8, 2 * t + e] = cv[2 + e]
        D = (A @ B + C).astype(np.float32)
        out = [D[:, g, 2 * t], D[:, g, 2 * t + 1], D[:, g + 8, 2 * t], D[:, g + 8, 2 * t + 1]]
        return [self._v(o.reshape(self.T), "f32") for o in out]

    def mma_s8(self, a, b, c):
        self._check_active_all("nvvm.mma.sync", 32)
        W = self.T // 32
        lane = np.arange(32)
        g, t = lane // 4, lane % 4

        def sbytes(x):  # [W, 32, 4] signed bytes of each lane's register
            return np.ascontiguousarray(x.v).view(np.int8).reshape(W, 32, 4).astype(np.int64)
        A = np.zeros((W, 16, 32), np.int64)
        B = np.zeros((W, 32, 8), np.int64)
        C = np.zeros((W, 16, 8), np.int64)
        av, bv = [sbytes(x) for x in a], [sbytes(x) for x in b]
        cv = [x.v.view(np.int32).reshape(W, 32).astype(np.int64) for x in c]
        for i in range(4):
            A[:, g, 4 * t + i] = av[0][:, :, i]
            A[:, g + 8, 4 * t + i] = av[1][:, :, i]
            A[:, g, 16 + 4 * t + i] = av[2][:, :, i]
            A[:, g + 8, 16 + 4 * t + i] = av[3][:, :, i]
            B[:, 4 * t + i, g] = bv[0][:, :, i]
            B[:, 16 + 4 * t + i, g] = bv[1][:, :, i]
        for e in range(2):
            C[:, g, 2 * t + e] = cv[e]
            C[:, g + 8, 2 * t + e] = cv[2 + e]
        D = np.matmul(A, B) + C
        out = [D[:, g, 2 * t], D[:, g, 2 * t + 1], D[:, g + 8, 2 * t], D[:, g + 8, 2 * t + 1]]
        return [self._v(o.reshape(self.T).astype(np.uint32), "i32") for o in out]  # wraps mod 2^32

    # -- control flow
    # -- warpgroup MMA: executed at issue (the kernel must keep its operands until the wait,
    # which the emulator does not check, except that no group may stay in flight across a
    # loop's back edge); B is read through the checked shared-memory loads
    def smem_desc(self, mem, i, lbo, sbo, swizzle=0):
        m: _Mem = mem.v
        esz = m.arr.itemsize * int(np.prod(m.arr.shape[2:]))
        addr = self._smem_base[id(m)] + self.idx(i).v.astype(np.int64) * esz
        d = ((addr & 0x3FFFF) >> 4) | ((lbo >> 4) << 16) | ((sbo >> 4) << 32) | (SWIZZLE_MODES[swizzle] << 62)
        return self._v(d.astype(np.uint64), "i64")

    def _desc_rows(self, desc, rows):
        """The K-major operand a descriptor names, two 16-byte chunks (one k16 f16 or k32 s8
        step) of each of ``rows`` rows: uint8 [warpgroups, rows, 32], read through the checked
        shared-memory loads."""
        G = self.T // 128
        d = desc.v.astype(np.int64).reshape(G, 128)
        if (d != d[:, :1]).any():
            raise SimtError("wgmma: the matrix descriptor differs between threads of a warpgroup")
        d = d[:, 0]
        start, lbo, sbo = (d & 0x3FFF) << 4, ((d >> 16) & 0x3FFF) << 4, ((d >> 32) & 0x3FFF) << 4
        mode = d >> 62
        if (mode != mode[0]).any() or int(mode[0]) not in (0, 1):
            raise SimtError(f"wgmma: descriptor layout type {int(mode[0])} (the emulator knows none and 128-byte swizzle)")
        kk, jj = np.arange(2)[:, None], np.arange(rows)[None, :]
        if mode[0] == 0:  # chunk k of row j: byte start + k lbo + (j // 8) sbo + (j % 8) 16
            byte = start[:, None, None] + kk * lbo[:, None, None] + (jj // 8) * sbo[:, None, None] + (jj % 8) * 16
        else:  # 128-byte rows, chunk bits 4-6 XORed with the row-in-atom bits 7-9 of the address
            byte = start[:, None, None] + kk * 16 + (jj // 8) * sbo[:, None, None] + (jj % 8) * 128
            byte = byte ^ (((byte >> 7) & 7) << 4)
        mem, off = self._smem_at(byte)
        flat = off.reshape(G, -1)  # [G, 2 rows] element indices, loaded 128 a pass with the checks
        vals = np.zeros(flat.shape + (16,), np.uint8)
        for c in range(0, flat.shape[1], 128):
            w = min(128, flat.shape[1] - c)
            idx = np.repeat(flat[:, c:c + 1], 128, axis=1)  # spare threads re-read an operand element
            idx[:, :w] = flat[:, c:c + w]
            v = np.ascontiguousarray(self.load(Val(self, mem, ""), Val(self, idx.reshape(-1), "index")).v)
            vals[:, c:c + w] = v.view(np.uint8).reshape(G, 128, 16)[:, :w]
        return vals.reshape(G, 2, rows, 16).transpose(0, 2, 1, 3).reshape(G, rows, 32)

    def _wgmma_d(self, D, acc, accumulate, dtype, vtype):
        """D [warpgroups, 64, n] (+ acc) -> the accumulator registers' values."""
        lane = np.arange(32)
        g, t = lane // 4, lane % 4
        out = []
        wi = np.arange(4)[:, None]
        for j in range(D.shape[2] // 8):
            for r, c in ((0, 0), (0, 1), (8, 0), (8, 1)):
                out.append(D[:, 16 * wi + g + r, 8 * j + 2 * t + c].reshape(self.T))  # [G, 4, 32]
        if acc is not None and accumulate is not False:
            out = [o + x.v.astype(D.dtype) for o, x in zip(out, acc)]
        return [self._v(o.astype(dtype), vtype) for o in out]

    def wgmma_f16(self, a, desc, acc, n, accumulate=None):
        self._check_active_all("wgmma.mma_async", 128)
        G = self.T // 128
        B = self._desc_rows(desc, n).view(np.float16).astype(np.float64).transpose(0, 2, 1)  # [G, 16, n]
        lane = np.arange(32)
        g, t = lane // 4, lane % 4
        A = np.zeros((G, 64, 16))
        av = [x.v.reshape(G, 4, 32, 2).astype(np.float64) for x in a]
        for w in range(4):
            for e in range(2):
                A[:, 16 * w + g, 2 * t + e] = av[0][:, w, :, e]
                A[:, 16 * w + g + 8, 2 * t + e] = av[1][:, w, :, e]
                A[:, 16 * w + g, 2 * t + 8 + e] = av[2][:, w, :, e]
                A[:, 16 * w + g + 8, 2 * t + 8 + e] = av[3][:, w, :, e]
        return self._wgmma_d(A @ B, acc, accumulate, np.float32, "f32")

    def wgmma_s8(self, a_desc, b_desc, acc, n, accumulate=None):
        self._check_active_all("wgmma.mma_async", 128)
        A = self._desc_rows(a_desc, 64).view(np.int8).astype(np.int64)  # [G, 64, 32]
        B = self._desc_rows(b_desc, n).view(np.int8).astype(np.int64)  # [G, n, 32]
        out = self._wgmma_d(A @ B.transpose(0, 2, 1), acc, accumulate, np.int64, "i32")
        return [self._v((o.v & 0xFFFFFFFF).astype(np.uint32), "i32") for o in out]  # wraps mod 2^32

    def _smem_at(self, byte):
        """(shared buffer, 16-byte element indices) of byte addresses that a descriptor names."""
        for base, m in self._smem_bases:
            lo, size = base, m.arr.shape[1] * m.arr.itemsize * int(np.prod(m.arr.shape[2:]))
            if ((byte >= lo) & (byte < lo + size)).all():
                if m.arr.itemsize * int(np.prod(m.arr.shape[2:])) != 16:
                    raise SimtError(f"wgmma operand buffer {m.name} must have 16-byte elements")
                return m, (byte - lo) // 16
        raise SimtError("wgmma: descriptor addresses outside any one shared buffer")

    def wgmma_fence(self):
        self._check_active_all("wgmma.fence", 128)

    def wgmma_commit(self):
        self._check_active_all("wgmma.commit_group", 128)
        self._wg_pending += 1

    def wgmma_wait(self, pending, regs):
        self._check_active_all("wgmma.wait_group", 128)
        self._wg_pending = min(self._wg_pending, pending)
        return [self._v(r.v.copy(), r.type) for r in regs]

    def fence_proxy_async(self):
        pass

    def _uniform(self, v, what):
        x = self.idx(v).v
        if not np.all(x == x[0]):
            raise SimtError(f"non-uniform loop {what}")
        return int(x[0])

    def for_(self, lo, hi, step, inits, body):
        lo, hi, st = (self._uniform(x, w) for x, w in ((lo, "bound"), (hi, "bound"),
                                                       (step, "step")))
        args = list(inits)
        for i in range(lo, hi, st):
            entry = self._wg_pending
            outs = list(body(self._v(np.full(self.T, i, np.int64), "index"), args) or [])
            assert [o.type for o in outs] == [x.type for x in inits]
            if self._wg_pending > entry:  # its A registers would be free for the next iteration
                raise SimtError("wgmma group in flight across a loop's back edge (wait for it in the iteration)")
            args = outs
        return args

    def if_(self, cond, then, else_=None, types=()):
        saved = self.mask
        c = cond.v.astype(bool)
        outs = []
        for fn, m in ((then, saved & c), (else_, saved & ~c)):
            if fn is None:
                outs.append(None)
                continue
            self.mask = m
            outs.append(list(fn() or []))
        self.mask = saved
        if not types:
            return []
        res = []
        for tv, ev in zip(outs[0], outs[1]):
            cc = c.reshape((-1,) + (1,) * (tv.v.ndim - 1))
            res.append(self._v(np.where(cc, tv.v, ev.v), tv.type))
        return res


def _as_elems(arr: np.ndarray, etype: str, count: int, name: str, partial: bool) -> np.ndarray:
    """View ``arr``'s bytes as ``count`` memref elements.

    Larger buffers are cut to the declared size. A smaller one is accepted only for
    row-scaled parameters (``partial``, e.g. x/y with M < m_max): the emulated memref
    then ends where the buffer ends, so any access past it is an out-of-bounds error.
    """
    s, e = parse_type(etype)
    if not arr.flags["C_CONTIGUOUS"]:
        raise ValueError(f"buffer {name} must be C-contiguous")
    raw = arr.reshape(-1).view(np.uint8)
    esz = (s[0] if s else 1) * np.dtype(_NP[e]).itemsize
    need = count * esz
    if raw.size < need:
        if not partial or raw.size % esz:
            raise ValueError(f"buffer {name}: {raw.size} bytes given, kernel declares {need}")
        count = raw.size // esz
    return raw[:count * esz].view(_NP[e]).reshape((count,) + s)


def run(spec: KernelSpec, args: dict, *, blocks_per_batch: int = 64,
        block_range: tuple[int, int] | None = None) -> None:
    """Execute ``spec`` over its grid (or ``block_range``) with numpy.

    ``args`` maps parameter names to numpy arrays (any dtype; the bytes are
    reinterpreted as the memref element type, sizes must match exactly) or to
    Python ints for scalar parameters. Output buffers are written in place.
    """
    views = {}
    for p in spec.params:
        if p.name not in args:
            raise KeyError(f"missing argument {p.name!r} for {spec.name}")
        if p.is_buffer:
            n, et, _ = parse_memref(p.type)
            views[p.name] = (n, et, _as_elems(args[p.name], et, n, p.name, p.rows is not None))
    nblocks = spec.grid[0] * spec.grid[1] * spec.grid[2]
    lo, hi = block_range or (0, nblocks)
    for b0 in range(lo, hi, blocks_per_batch):
        b1 = min(hi, b0 + blocks_per_batch)
        E = SimtEmulator(spec, b0, b1)
        vals = {}
        for p in spec.params:
            if p.is_buffer:
                n, et, arr = views[p.name]
                vals[p.name] = Val(E, _Mem(p.name, arr, "global", et), p.type)
            else:
                vals[p.name] = E.const(int(args[p.name]), p.type)
        E._smem_base, E._smem_bases, base, al = {}, [], 0, max(128, spec.smem_align)
        for name, et, n in spec.smem:
            s, e = parse_type(et)
            arr = np.zeros((b1 - b0, n) + s, _NP[e])
            t = f"memref<{n}x{et}, #gpu.address_space<workgroup>>"
            m = _Mem(name, arr, "workgroup", et, b1 - b0)
            vals[name] = Val(E, m, t)
            E._smem_base[id(m)] = base  # byte addresses for wgmma descriptors, buffers laid end to end
            E._smem_bases.append((base, m))
            base += -(-n * arr.itemsize * int(np.prod(s or (1,))) // al) * al
        spec.body(E, vals)


# --------------------------------------------------------------------------- scalar ops


def _sg(a):
    """Signed view of an integer array stored unsigned (index is already int64)."""
    return a.view(_SIGNED[a.dtype.type]) if a.dtype.type in _SIGNED else a


def _fcmp(pred, a, b):
    nan = np.isnan(a) | np.isnan(b)
    base = {"eq": a == b, "gt": a > b, "ge": a >= b, "lt": a < b, "le": a <= b, "ne": a != b}
    if pred == "false":
        return np.zeros(a.shape, bool)
    if pred == "true":
        return np.ones(a.shape, bool)
    if pred == "ord":
        return ~nan
    if pred == "uno":
        return nan
    kind, rel = pred[0], pred[1:]
    r = base[rel]
    return (r & ~nan) if kind == "o" else (r | nan)


def _icmp(pred, a, b):
    if pred in ("eq", "ne"):
        return a == b if pred == "eq" else a != b
    if pred[0] == "s":
        a, b = _sg(a), _sg(b)
    else:
        a, b = a.view(np.uint64) if a.dtype == np.int64 else a, b.view(np.uint64) if b.dtype == np.int64 else b
    return {"lt": a < b, "le": a <= b, "gt": a > b, "ge": a >= b}[pred[1:]]


def _sdiv(a, b, mask):
    a, b = _sg(a).astype(np.int64), _sg(b).astype(np.int64)
    b = np.where(b == 0, 1, b)
    q = np.abs(a) // np.abs(b) * np.sign(a) * np.sign(b)
    return q, a - b * q


def _erf(a):
    try:
        from scipy.special import erf
        return erf(a.astype(np.float64)).astype(a.dtype)
    except ImportError:  # pragma: no cover
        import math
        return np.vectorize(math.erf)(a.astype(np.float64)).astype(a.dtype)


def _intw(t):
    return INT_TYPES[parse_type(t)[1]]


def _to_int(a, rt, signed):
    e = parse_type(rt)[1]
    w = INT_TYPES[e]
    v = np.trunc(a.astype(np.float64))
    if e == "index":
        return v.astype(np.int64)
    v = np.nan_to_num(v, nan=0.0)
    if signed:
        lo, hi = -(1 << (w - 1)), (1 << (w - 1)) - 1
        return np.clip(v, lo, hi).astype(np.int64).astype(_NP[e])
    return np.clip(v, 0, (1 << w) - 1).astype(np.uint64).astype(_NP[e])


_RAW = {
    "arith.addf": lambda x, i, t, m: x[0] + x[1],
    "arith.subf": lambda x, i, t, m: x[0] - x[1],
    "arith.mulf": lambda x, i, t, m: x[0] * x[1],
    "arith.divf": lambda x, i, t, m: x[0] / x[1],
    "arith.remf": lambda x, i, t, m: np.fmod(x[0], x[1]),
    "arith.negf": lambda x, i, t, m: -x[0],
    "arith.maximumf": lambda x, i, t, m: np.maximum(x[0], x[1]),
    "arith.minimumf": lambda x, i, t, m: np.minimum(x[0], x[1]),
    "arith.maxnumf": lambda x, i, t, m: np.fmax(x[0], x[1]),
    "arith.minnumf": lambda x, i, t, m: np.fmin(x[0], x[1]),
    "arith.cmpf": lambda x, i, t, m: _fcmp(i["predicate"], x[0], x[1]),
    "arith.cmpi": lambda x, i, t, m: _icmp(i["predicate"], x[0], x[1]),
    "arith.select": lambda x, i, t, m: np.where(x[0].reshape((-1,) + (1,) * (x[1].ndim - 1)), x[1], x[2]),
    "arith.addi": lambda x, i, t, m: x[0] + x[1],
    "arith.subi": lambda x, i, t, m: x[0] - x[1],
    "arith.muli": lambda x, i, t, m: x[0] * x[1],
    "arith.divsi": lambda x, i, t, m: _sdiv(x[0], x[1], m)[0],
    "arith.remsi": lambda x, i, t, m: _sdiv(x[0], x[1], m)[1],
    "arith.divui": lambda x, i, t, m: x[0] // np.where(x[1] == 0, 1, x[1]),
    "arith.remui": lambda x, i, t, m: x[0] % np.where(x[1] == 0, 1, x[1]),
    "arith.andi": lambda x, i, t, m: x[0] & x[1],
    "arith.ori": lambda x, i, t, m: x[0] | x[1],
    "arith.xori": lambda x, i, t, m: x[0] ^ x[1],
    "arith.shli": lambda x, i, t, m: x[0] << (x[1] % _intw(t)).astype(x[0].dtype),
    "arith.shrui": lambda x, i, t, m: x[0] >> (x[1] % _intw(t)).astype(x[0].dtype),
    "arith.shrsi": lambda x, i, t, m: (_sg(x[0]) >> (x[1] % _intw(t)).astype(_sg(x[0]).dtype)),
    "arith.maxsi": lambda x, i, t, m: np.maximum(_sg(x[0]), _sg(x[1])),
    "arith.minsi": lambda x, i, t, m: np.minimum(_sg(x[0]), _sg(x[1])),
    "arith.maxui": lambda x, i, t, m: np.maximum(x[0], x[1]),
    "arith.minui": lambda x, i, t, m: np.minimum(x[0], x[1]),
    "arith.extf": lambda x, i, t, m: x[0],
    "arith.truncf": lambda x, i, t, m: x[0],
    "arith.sitofp": lambda x, i, t, m: _sg(x[0]),
    "arith.uitofp": lambda x, i, t, m: x[0],
    "arith.fptosi": lambda x, i, t, m: _to_int(x[0], t, True),
    "arith.fptoui": lambda x, i, t, m: _to_int(x[0], t, False),
    "arith.extsi": lambda x, i, t, m: _sg(x[0]).astype(np.int64),
    "arith.extui": lambda x, i, t, m: x[0],
    "arith.trunci": lambda x, i, t, m: x[0],
    "arith.index_cast": lambda x, i, t, m: _sg(x[0]).astype(np.int64),
    "arith.index_castui": lambda x, i, t, m: x[0],
    "math.exp": lambda x, i, t, m: np.exp(x[0]),
    "math.exp2": lambda x, i, t, m: np.exp2(x[0]),
    "math.expm1": lambda x, i, t, m: np.expm1(x[0]),
    "math.log": lambda x, i, t, m: np.log(x[0]),
    "math.log2": lambda x, i, t, m: np.log2(x[0]),
    "math.log1p": lambda x, i, t, m: np.log1p(x[0]),
    "math.sqrt": lambda x, i, t, m: np.sqrt(x[0]),
    "math.rsqrt": lambda x, i, t, m: 1 / np.sqrt(x[0]),
    "math.tanh": lambda x, i, t, m: np.tanh(x[0]),
    "math.erf": lambda x, i, t, m: _erf(x[0]),
    "math.absf": lambda x, i, t, m: np.abs(x[0]),
    "math.absi": lambda x, i, t, m: np.abs(_sg(x[0])),
    "math.sin": lambda x, i, t, m: np.sin(x[0]),
    "math.cos": lambda x, i, t, m: np.cos(x[0]),
    "math.floor": lambda x, i, t, m: np.floor(x[0]),
    "math.ceil": lambda x, i, t, m: np.ceil(x[0]),
    "math.roundeven": lambda x, i, t, m: np.rint(x[0]),
    "math.round": lambda x, i, t, m: np.sign(x[0]) * np.floor(np.abs(x[0]) + 0.5),
    "math.powf": lambda x, i, t, m: np.power(x[0], x[1]),
    "math.fma": lambda x, i, t, m: (x[0].astype(np.float64) * x[1] + x[2]),
    "math.copysign": lambda x, i, t, m: np.copysign(x[0], x[1]),
}
