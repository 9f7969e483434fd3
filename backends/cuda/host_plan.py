"""The bufferized host function -> a static launch plan (plus the kernels it launches).

After bufferization every shape is static, so the host side of a model is a straight
line of allocations, views, linalg ops on memrefs and calls of prebuilt kernels. This
walker executes it symbolically:

* buffers ("roots"): function arguments (a parameter by name, or user input i),
  ``memref.alloc`` and the results of prebuilt-kernel calls (temporaries),
  ``memref.get_global`` (constants, stored with the weights);
* views (``memref.subview``, ``expand_shape``, ``collapse_shape``, ``cast``,
  ``reinterpret_cast``): a root plus the static strides and offset of the result type
  (a memref layout is relative to its root's base pointer), so views cost nothing;
* ``linalg.generic`` / ``memref.copy``: a :class:`linalg_kernels.GenericDesc` ->
  a generated kernel and one launch;
* ``func.call`` of a ``qcc.cuda_kernel`` declaration (cuda-select-kernels): one launch
  of a prebuilt GEMV per 16 rows of x;
* ``func.return``: the outputs (copied into a fresh buffer when not a contiguous temporary).

Any other host op is an error that names it. ``linalg.fill`` launches are folded into
the reduction that consumes the filled buffer (the kernel starts from the constant), and
a fill copied into another buffer stays a fill. Temporaries share one arena, packed by
liveness (first-fit on byte ranges of buffers whose lifetimes overlap).

The plan is plain JSON (manifest["cuda"]); the runtime (model_runtime.py) and the CPU
emulation (emulate.py) execute it without MLIR.
"""
from __future__ import annotations

import json
import math
import re

import numpy as np
from torch_mlir import ir

from . import linalg_kernels as lk
from .select_kernels import build_spec

ESIZE = {"f32": 4, "f16": 2, "bf16": 2, "f64": 8, "i64": 8, "i32": 4, "i16": 2, "i8": 1, "i1": 1}
NP_DTYPE = {"f32": "float32", "f16": "float16", "f64": "float64", "i64": "int64", "i32": "int32",
            "i16": "int16", "i8": "int8", "i1": "bool"}
ARENA_ALIGN = 256
_VIEW_OPS = ("memref.subview", "memref.expand_shape", "memref.collapse_shape", "memref.cast",
             "memref.reinterpret_cast")
_FCMP = ["false", "oeq", "ogt", "oge", "olt", "ole", "one", "ord", "ueq", "ugt", "uge", "ult", "ule",
         "une", "uno", "true"]
_ICMP = ["eq", "ne", "slt", "sle", "sgt", "sge", "ult", "ule", "ugt", "uge"]


def _down(t):
    return t.maybe_downcast() if hasattr(t, "maybe_downcast") else t


class HostOpError(ValueError):
    """A host-side op the walker does not understand (the message names it)."""


def _where(op) -> str:
    return str(op.location)


class _View:
    __slots__ = ("root", "offset", "shape", "strides", "elem")

    def __init__(self, root, offset, shape, strides, elem):
        self.root, self.offset, self.shape, self.strides, self.elem = root, offset, tuple(shape), \
            tuple(strides), elem

    def key(self):
        return (self.root, self.offset, self.shape, self.strides)

    def same_region(self, other) -> bool:
        """Both views cover the same bytes of one root densely (shapes may differ)."""
        return self.key() == other.key() or (
            self.root == other.root and self.elem == other.elem and self.offset == other.offset
            and math.prod(self.shape) == math.prod(other.shape) and self.contiguous() and other.contiguous())

    def byte_range(self):
        es = ESIZE[self.elem]
        span = 1 + sum((n - 1) * s for n, s in zip(self.shape, self.strides)) if all(self.shape) else 0
        return self.offset * es, (self.offset + span) * es

    def contiguous(self) -> bool:
        want, acc = [], 1
        for n in reversed(self.shape):
            want.append(acc)
            acc *= n
        return all(n == 1 or s == w for n, s, w in zip(self.shape, self.strides, reversed(want)))


def _memref_info(t):
    mt = ir.MemRefType(t)
    if not mt.has_static_shape:
        raise HostOpError(f"dynamic memref type {t}: the CUDA backend needs static shapes")
    strides, offset = mt.get_strides_and_offset()
    if any(ir.ShapedType.get_dynamic_stride_or_offset() == s for s in list(strides) + [offset]):  # noqa
        raise HostOpError(f"memref type {t} has a dynamic stride or offset")
    elem = str(mt.element_type)
    if elem not in ESIZE:
        raise HostOpError(f"element type {elem} is not supported in GPU buffers")
    return list(mt.shape), list(strides), offset, elem


def _ast(e, n_dims=None):
    """AffineExpr -> the tuple AST of linalg_kernels._eval; symbols (affine.apply) become
    dims n_dims + i."""
    e = e.maybe_downcast()
    if isinstance(e, ir.AffineDimExpr):
        return ("d", e.position)
    if isinstance(e, ir.AffineSymbolExpr) and n_dims is not None:
        return ("d", n_dims + e.position)
    if isinstance(e, ir.AffineConstantExpr):
        return ("c", e.value)
    for cls, tag in ((ir.AffineAddExpr, "+"), (ir.AffineMulExpr, "*"), (ir.AffineFloorDivExpr, "fd"),
                     (ir.AffineCeilDivExpr, "cd"), (ir.AffineModExpr, "mod")):
        if isinstance(e, cls):
            return (tag, _ast(e.lhs, n_dims), _ast(e.rhs, n_dims))
    raise HostOpError(f"unsupported affine expression {e}")


def _const_value(attr):
    a = attr.maybe_downcast() if hasattr(attr, "maybe_downcast") else attr
    if isinstance(a, ir.FloatAttr):
        return float(a.value)
    if isinstance(a, ir.BoolAttr):
        return int(a.value)
    if isinstance(a, ir.IntegerAttr):
        return int(a.value)
    raise HostOpError(f"constant {a} is not a scalar")


def _attrs(op) -> tuple[str, dict]:
    parts, info = [], {}
    for k in op.attributes:
        a = op.attributes[k]
        parts.append(f"{k} = {a}")
    name = op.name
    if name in ("arith.cmpf", "arith.cmpi"):
        p = ir.IntegerAttr(op.attributes["predicate"]).value
        info["predicate"] = (_FCMP if name == "arith.cmpf" else _ICMP)[p]
    if name == "arith.constant":
        info["value"] = _const_value(op.attributes["value"])
    return ", ".join(parts), info


class PlanBuilder:
    def __init__(self, module: ir.Module, weights: dict):
        self.module = module
        self.weights = weights  # param name -> array (for sizes); constants are added here
        self.roots: list[dict] = []
        self.views: dict = {}
        self.launches: list[dict] = []
        self.specs: dict = {}
        self.descs: dict = {}  # generated kernel name -> its GenericDesc (fuse_launches rebuilds them)
        self.scalars: dict = {}  # Value -> (attr text, python value)
        self.pending: dict[int, list] = {}  # root -> [(view key, const, launch)]
        self.outputs: list[dict] = []
        self.inputs: list[dict] = []
        self.n_const = 0
        self.stats = {"folded_fills": 0, "copies_as_fills": 0}

    # ------------------------------------------------------------------ roots and views
    def _root(self, kind, nbytes, **kw) -> int:
        self.roots.append({"id": len(self.roots), "kind": kind, "bytes": int(nbytes), **kw})
        return len(self.roots) - 1

    def _view_of(self, v) -> _View:
        try:
            return self.views[v]
        except KeyError:
            owner = v.owner
            name = owner.name if hasattr(owner, "name") else "a block argument"
            raise HostOpError(f"no buffer for value defined by '{name}'")

    def build(self, func_name: str = "main", entry_args=None):
        main = None
        for op in self.module.body.operations:
            if op.operation.name == "func.func" and ir.StringAttr(op.attributes["sym_name"]).value == func_name:
                main = op
        if main is None:
            raise HostOpError(f"no func.func @{func_name}")
        block = main.regions[0].blocks[0]
        for i, arg in enumerate(block.arguments):
            shape, strides, off, elem = _memref_info(arg.type)
            nbytes = math.prod(shape) * ESIZE[elem]
            spec = entry_args[i] if entry_args else {}
            if "param" in spec:
                rid = self._root("param", nbytes, name=spec["param"], elem=elem, shape=shape)
            else:
                rid = self._root("input", nbytes, index=spec.get("input", i), elem=elem, shape=shape)
                self.inputs.append({"buf": rid, "index": spec.get("input", i), "shape": shape,
                                    "dtype": NP_DTYPE[elem]})
            self.views[arg] = _View(rid, off, shape, strides, elem)
        for op in block.operations:
            self._op(op.operation)
        return self

    def _op(self, op):
        name = op.name
        if name == "memref.alloc":
            shape, strides, off, elem = _memref_info(op.result.type)
            rid = self._root("temp", math.prod(shape) * ESIZE[elem], elem=elem, shape=shape)
            self.views[op.result] = _View(rid, off, shape, strides, elem)
        elif name in _VIEW_OPS:
            src = self._view_of(op.operands[0])
            shape, strides, off, elem = _memref_info(op.result.type)
            self.views[op.result] = _View(src.root, off, shape, strides, elem)
        elif name == "arith.constant":
            if not isinstance(_down(op.result.type), ir.ShapedType):
                self.scalars[op.result] = (str(op.attributes["value"]), _const_value(op.attributes["value"]))
        elif name == "memref.get_global":
            self._global(op)
        elif name == "linalg.generic":
            self._generic(op)
        elif name == "memref.copy":
            self._copy(self._view_of(op.operands[0]), self._view_of(op.operands[1]))
        elif name == "func.call":
            self._call(op)
        elif name in ("memref.dealloc", "memref.assume_alignment"):
            pass
        elif name == "func.return":
            self._return(op)
        else:
            raise HostOpError(f"the CUDA host walker does not handle '{name}' (at {_where(op)}); "
                              "only allocations, views, linalg.generic, memref.copy and calls of "
                              "qcc kernels may remain on the host after bufferization")

    def _global(self, op):
        sym = ir.FlatSymbolRefAttr(op.attributes["name"]).value
        glob = None
        for g in self.module.body.operations:
            if g.operation.name == "memref.global" and ir.StringAttr(g.attributes["sym_name"]).value == sym:
                glob = g
        if glob is None or "initial_value" not in glob.attributes:
            raise HostOpError(f"memref.get_global @{sym}: no initialized memref.global")
        shape, strides, off, elem = _memref_info(op.result.type)
        attr = glob.attributes["initial_value"]
        dt = NP_DTYPE[elem]
        if isinstance(attr, ir.DenseResourceElementsAttr) or str(attr).startswith("dense_resource<"):
            arr = np.frombuffer(self._resource_blob(str(attr)[len("dense_resource<"):].split(">")[0]),
                                dtype=dt).reshape(shape)
            self._constant(op, arr, shape, strides, off, elem)
            return
        dense = ir.DenseElementsAttr(attr)
        if dense.is_splat:
            arr = np.full(shape, _const_value(dense.get_splat_value()), dtype=dt)
        else:
            arr = np.array(dense, dtype=dt).reshape(shape)
        self._constant(op, arr, shape, strides, off, elem)

    def _constant(self, op, arr, shape, strides, off, elem):
        name = f"__cuda_const{self.n_const}"
        self.n_const += 1
        self.weights[name] = np.ascontiguousarray(arr)
        rid = self._root("param", arr.nbytes, name=name, elem=elem, shape=shape)
        self.views[op.result] = _View(rid, off, shape, strides, elem)

    def _resource_blob(self, key: str) -> bytes:
        """The bytes of a `dense_resource<key>` constant (the FX importer's form of a literal
        tensor of more than one element), read from the module's printed resources: the Python
        bindings give no access to a resource's data."""
        if not hasattr(self, "_resources"):
            text = self.module.operation.get_asm()
            self._resources = dict(re.findall(r'^\s*([\w.]+): "0x([0-9A-Fa-f]*)"', text[text.rfind("{-#"):], re.M))
        if key not in self._resources:
            raise HostOpError(f"constant dense_resource<{key}> has no data in the module")
        return bytes.fromhex(self._resources[key])[4:]  # after the blob's 4-byte alignment

    # ------------------------------------------------------------------ linalg
    def _operand(self, v, amap) -> tuple[lk.Operand, _View | None]:
        exprs = [_ast(e) for e in amap.results]
        if not isinstance(_down(v.type), ir.MemRefType):
            if v not in self.scalars:
                raise HostOpError("a scalar linalg operand that is not a constant")
            text, val = self.scalars[v]
            return lk.Operand(str(v.type), (), (), exprs, const=(text, val)), None
        vw = self._view_of(v)
        return lk.Operand(vw.elem, vw.shape, vw.strides, exprs), vw

    def _generic(self, op):
        g = op.opview
        ins, outs = list(g.inputs), list(g.outputs)
        maps = [ir.AffineMapAttr(a).value for a in ir.ArrayAttr(op.attributes["indexing_maps"])]
        iters = ["reduction" if "reduction" in str(x) else "parallel"
                 for x in ir.ArrayAttr(op.attributes["iterator_types"])]
        n = maps[0].n_dims
        loops = [None] * n
        d_ins, v_ins, d_outs, v_outs = [], [], [], []
        for v, m in zip(ins, maps[:len(ins)]):
            o, vw = self._operand(v, m)
            d_ins.append(o)
            v_ins.append(vw)
        for v, m in zip(outs, maps[len(ins):]):
            o, vw = self._operand(v, m)
            d_outs.append(o)
            v_outs.append(vw)
        for o in d_ins + d_outs:
            for e, size in zip(o.map, o.shape):
                if e[0] == "d" and loops[e[1]] is None:
                    loops[e[1]] = size
        if None in loops:
            raise HostOpError(f"linalg.generic at {_where(op)}: a loop extent is not given by any operand")
        body, yields, caps, cap_views = self._body(op, len(ins) + len(outs))
        desc = lk.GenericDesc(loops, iters, d_ins, d_outs, body, yields,
                              [lk.Capture(c.elem, c.shape, c.strides) for c in cap_views],
                              tag=_tag(op))
        self._launch_generic(desc, v_ins, v_outs, cap_views)

    def _body(self, op, n_args):
        block = op.regions[0].blocks[0]
        refs = {a: ("arg", i) for i, a in enumerate(block.arguments)}
        body, yields, caps, cap_ids = [], None, [], {}
        consts = {}

        def ref(v):
            if v in refs:
                return refs[v]
            owner = v.owner
            oname = owner.name if hasattr(owner, "name") else None
            if oname == "arith.constant":
                key = (str(owner.attributes["value"]), str(v.type))
                if key not in consts:
                    text, info = _attrs(owner.operation if hasattr(owner, "operation") else owner)
                    body.append(lk.BodyOp("arith.constant", [], [str(v.type)], text, info))
                    consts[key] = ("op", len(body) - 1, 0)
                return consts[key]
            raise HostOpError(f"linalg body at {_where(op)} uses a value defined outside it by '{oname}'")

        for b in block.operations:
            b = b.operation
            if b.regions and len(b.regions) and any(len(r.blocks) for r in b.regions):
                raise HostOpError(f"'{b.name}' with regions inside a linalg body (at {_where(op)})")
            if b.name == "cf.assert":  # index checks of gathers: not checked on the GPU
                continue
            if b.name == "linalg.yield":
                yields = [ref(v) for v in b.operands]
                continue
            if b.name == "linalg.index":
                refs[b.result] = ("idx", ir.IntegerAttr(b.attributes["dim"]).value)
                continue
            if b.name == "memref.load" and b.operands[0] not in refs:
                m = b.operands[0]
                if m not in cap_ids:
                    cap_ids[m] = len(caps)
                    caps.append(self._view_of(m))
                operands = [("cap", cap_ids[m])] + [ref(v) for v in b.operands[1:]]
                body.append(lk.BodyOp("memref.load", operands, [str(b.result.type)]))
                refs[b.result] = ("op", len(body) - 1, 0)
                continue
            if b.name == "affine.apply":  # from fusing producers that use linalg.index
                amap = ir.AffineMapAttr(b.attributes["map"]).value
                body.append(lk.BodyOp("affine.apply", [ref(v) for v in b.operands], ["index"],
                                      info={"expr": _ast(amap.results[0], amap.n_dims)}))
                refs[b.result] = ("op", len(body) - 1, 0)
                continue
            if b.name == "math.fpowi":
                e = b.operands[1].owner
                if getattr(e, "name", None) == "arith.constant":
                    nexp = _const_value(e.attributes["value"])
                    if abs(nexp) <= 16:
                        body.append(lk.BodyOp("qcc.powi", [ref(b.operands[0])], [str(b.result.type)],
                                              info={"n": nexp}))
                        refs[b.result] = ("op", len(body) - 1, 0)
                        continue
            operands = [ref(v) for v in b.operands]
            text, info = _attrs(b)
            body.append(lk.BodyOp(b.name, operands, [str(r.type) for r in b.results], text, info))
            for k, r in enumerate(b.results):
                refs[r] = ("op", len(body) - 1, k)
        return body, yields, caps, caps

    # ------------------------------------------------------------------ launches
    def _mark_alias(self, desc, views):
        """Flags operands that overlap another operand of the same launch (no noalias)."""
        ops = [o for o in desc.ins if o.const is None] + desc.outs + desc.captures
        vws = [v for v in views if v is not None]
        for i, (o, v) in enumerate(zip(ops, vws)):
            lo, hi = v.byte_range()
            for j, w in enumerate(vws):
                if i != j and w.root == v.root:
                    lo2, hi2 = w.byte_range()
                    if lo < hi2 and lo2 < hi:
                        o.alias = True

    def _launch_generic(self, desc, v_ins, v_outs, caps):
        kind = lk.classify(desc)
        # a fill: remember it, emit it only if something reads the buffer as data
        const = _fill_value(desc) if kind == "elementwise" else None
        if const is not None:
            launch = self._register(desc, v_ins, v_outs, [])
            self.pending.setdefault(v_outs[0].root, []).append((v_outs[0].key(), const, launch, v_outs[0]))
            return
        if kind != "elementwise":
            for k, vw in enumerate(v_outs):
                fold = self._take_fill(vw, reads=[v for v in v_ins + caps if v is not None])
                if fold is not None:
                    desc.out_init[k] = fold
        touched = [v for v in v_ins + v_outs + caps if v is not None]
        for vw in touched:
            self._materialize(vw.root)
        for vw in v_outs:
            self._check_writable(vw)
        self.launches.append(self._register(desc, v_ins, v_outs, caps))

    def _take_fill(self, vw, reads):
        """The constant of a pending fill of exactly `vw` (dropping that fill), if nothing in
        `reads` overlaps the root; else None."""
        lst = self.pending.get(vw.root)
        if not lst or any(r.root == vw.root for r in reads):
            return None
        for i, (key, const, launch, fv) in enumerate(lst):
            if fv.same_region(vw):
                del lst[i]
                self.stats["folded_fills"] += 1
                return const
        return None

    def _materialize(self, root):
        for key, const, launch, fv in self.pending.pop(root, []):
            self.launches.append(launch)

    def _check_writable(self, vw):
        kind = self.roots[vw.root]["kind"]
        if kind in ("param", "input"):
            r = self.roots[vw.root]
            what = f"parameter '{r['name']}'" if kind == "param" else f"input {r['index']}"
            raise HostOpError(f"a kernel would write {what} in place")

    def _register(self, desc, v_ins, v_outs, caps) -> dict:
        self._mark_alias(desc, list(v_ins) + list(v_outs) + list(caps))
        spec = lk.build_kernel(desc)
        self.specs.setdefault(spec.name, spec)
        self.descs.setdefault(spec.name, desc)
        args = []
        for o, vw in zip(desc.ins, v_ins):
            if o.const is None:
                args.append(self._arg(vw))
        args += [self._arg(vw) for vw in v_outs]
        args += [self._arg(vw) for vw in caps]
        return {"kernel": spec.name, "grid": list(spec.grid), "block": list(spec.block),
                "args": args, "writes": [self._arg(vw)["buf"] for vw in v_outs]}

    def _arg(self, vw):
        return {"buf": vw.root, "offset": vw.offset * ESIZE[vw.elem]}

    def _copy(self, src: _View, dst: _View):
        if src.shape != dst.shape or src.elem != dst.elem:
            raise HostOpError(f"memref.copy between {src.shape}x{src.elem} and {dst.shape}x{dst.elem}")
        lst = self.pending.get(src.root, [])
        for key, const, launch, fv in lst:
            if fv.same_region(src):  # copying a filled buffer: a fill of the destination
                self._materialize(dst.root)
                d = lk.GenericDesc(list(dst.shape), ["parallel"] * len(dst.shape),
                                   [lk.Operand(src.elem, (), (), [], const=const)],
                                   [lk.Operand(dst.elem, dst.shape, dst.strides,
                                               [("d", i) for i in range(len(dst.shape))])],
                                   [], [("arg", 0)], tag="fill")
                self._check_writable(dst)
                self.stats["copies_as_fills"] += 1
                self._launch_generic(d, [None], [dst], [])
                return
        desc = lk.copy_desc(src.elem, src.shape, src.strides, dst.strides)
        self._launch_generic(desc, [src], [dst], [])

    def _call(self, op):
        callee = ir.FlatSymbolRefAttr(op.attributes["callee"]).value
        decl = None
        for f in self.module.body.operations:
            if f.operation.name == "func.func" and ir.StringAttr(f.attributes["sym_name"]).value == callee:
                decl = f
        if decl is None or "qcc.cuda_kernel" not in decl.attributes:
            raise HostOpError(f"call of @{callee} (at {_where(op)}): only qcc CUDA kernel declarations "
                              "may be called on the host")
        info = json.loads(ir.StringAttr(decl.attributes["qcc.cuda_kernel"]).value)
        spec = build_spec(info["builder"], info["args"])
        self.specs.setdefault(spec.name, spec)
        M, m_max = info["M"], info["args"]["m_max"]
        x = self._view_of(op.operands[0])
        weights = [self._view_of(v) for v in op.operands[1:]]
        if not x.contiguous() or (x.offset * ESIZE[x.elem]) % 16:
            raise HostOpError(f"x of {spec.name} is not a contiguous 16-byte aligned [M, K] buffer")
        for vw in [x] + weights:
            self._materialize(vw.root)
        # results: the kernel's out parameters in order, each a fresh temporary of M rows
        outs = [p for p in spec.params if p.is_buffer and p.role == "out"]
        if len(outs) != len(op.results):
            raise HostOpError(f"call of {spec.name}: {len(op.results)} results for {len(outs)} out parameters")
        bound = {}
        for p, res in zip(outs, op.results):
            shape, strides, off, elem = _memref_info(res.type)
            root = self._root("temp", math.prod(shape) * ESIZE[elem], elem=elem, shape=list(shape))
            self.views[res] = _View(root, 0, shape, strides, elem)
            bound[p.name] = (root, 0)
        names = [p.name for p in spec.params]
        ins = [n for n in names if n != "M" and n not in bound]
        bound.update({n: (vw.root, vw.offset * ESIZE[vw.elem]) for n, vw in zip(ins, [x] + weights)})
        per_row = {p.name: p.manifest()["row_bytes"] for p in spec.params if p.is_buffer and p.rows}
        for c in range(-(-M // m_max)):  # one launch per m_max rows: buffers with rows move along
            bind = {"M": {"scalar": min(m_max, M - c * m_max), "type": "i32"}}
            for n, (root, offset) in bound.items():
                bind[n] = {"buf": root, "offset": offset + c * m_max * per_row.get(n, 0)}
            self.launches.append({"kernel": spec.name, "grid": list(spec.grid), "block": list(spec.block),
                                  "args": [bind[n_] for n_ in names], "writes": [bound[p.name][0] for p in outs],
                                  "layer": info.get("weight")})

    def _return(self, op):
        for i, v in enumerate(op.operands):
            vw = self._view_of(v)
            self._materialize(vw.root)
            r = self.roots[vw.root]
            if r["kind"] != "temp" or not vw.contiguous():
                n = math.prod(vw.shape)
                rid = self._root("temp", n * ESIZE[vw.elem], elem=vw.elem, shape=list(vw.shape))
                ident = []
                acc = 1
                for s in reversed(vw.shape):
                    ident.append(acc)
                    acc *= s
                dst = _View(rid, 0, vw.shape, tuple(reversed(ident)), vw.elem)
                self._launch_generic(lk.copy_desc(vw.elem, vw.shape, vw.strides, dst.strides), [vw], [dst], [])
                vw = dst
            self.roots[vw.root]["output"] = True
            self.outputs.append({"buf": vw.root, "offset": vw.offset * ESIZE[vw.elem], "shape": list(vw.shape),
                                 "dtype": NP_DTYPE[vw.elem], "index": i})

    # ------------------------------------------------------------------ arena
    def assign_arena(self) -> int:
        n = len(self.launches)
        first, last = {}, {}
        for i, L in enumerate(self.launches):
            for a in L["args"]:
                if "buf" in a:
                    first.setdefault(a["buf"], i)
                    last[a["buf"]] = i
        placed = []  # (lo, hi, first, last)
        top = 0
        temps = [r for r in self.roots if r["kind"] == "temp"]
        temps.sort(key=lambda r: (first.get(r["id"], n), -r["bytes"]))
        for r in temps:
            f = first.get(r["id"], n)
            l_ = n + 1 if r.get("output") else last.get(r["id"], f)
            size = -(-max(r["bytes"], 1) // ARENA_ALIGN) * ARENA_ALIGN
            busy = sorted((lo, hi) for lo, hi, f2, l2 in placed if not (l2 < f or l_ < f2))
            off = 0
            for lo, hi in busy:
                if off + size <= lo:
                    break
                off = max(off, hi)
            r["offset"] = off
            placed.append((off, off + size, f, l_))
            top = max(top, off + size)
        return top

    def to_json(self) -> dict:
        arena = self.assign_arena()
        return {"buffers": self.roots, "arena_bytes": arena, "launches": self.launches,
                "inputs": self.inputs, "outputs": self.outputs, "stats": dict(self.stats,
                                                                           launches=len(self.launches),
                                                                           kernels=len(self.specs))}


def _fill_value(desc) -> tuple | None:
    """(attr text, value) when `desc` writes one constant to its single output."""
    if len(desc.outs) != 1 or any(o.const is None for o in desc.ins) or len(desc.yields) != 1:
        return None
    y = desc.yields[0]
    if y[0] == "arg" and y[1] < len(desc.ins):
        return desc.ins[y[1]].const
    if y[0] == "op" and desc.body[y[1]].name == "arith.constant":
        op = desc.body[y[1]]
        text = op.attrs.split("=", 1)[1].strip() if op.attrs.startswith("value") else None
        return (text, op.info["value"]) if text else None
    return None


def _tag(op) -> str:
    """A short hint of what a generic computes, for kernel names."""
    iters = str(op.attributes["iterator_types"])
    names = [b.operation.name.split(".")[-1] for b in op.regions[0].blocks[0].operations
             if b.operation.name not in ("linalg.yield", "linalg.index", "arith.constant")]
    if "reduction" in iters:
        return "red_" + "_".join(names[-2:]) if names else "red"
    return ("ew_" + "_".join(names[:2])) if names else "copy"
