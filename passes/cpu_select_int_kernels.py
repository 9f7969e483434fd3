"""cpu-select-int-kernels: the integer path of dequant-after-gemm -> one fused CPU kernel call.

Runs before lower-qcc-to-linalg.  Each chain

    %xq, %sx = qcc.quantize_dynamic %x          (or, static: %xq = qcc.quantize %x, %sx
    %acc = qcc.matmul_int %xq, %wq [, %wz]       with %sx = arith.constant, the calibrated scale)
    %y = qcc.scale_accumulate %acc, %sx, %sw

whose weights are parameters becomes `call @qcc_cpu_int_<wfmt>_<afmt>_<K>x<N>(%x, codes, scale
[, zero][, act_scale])` (backends/cpu/int_kernels.py): activations quantized in the kernel,
integer dot products (`dot=avx2`: vpmaddubsw / vpmaddwd; `dot=vnni`: vpdpbusd) in
i32 per group, scaled into f32 y; a GEMV for M < `gemm-min-m`, a blocked GEMM otherwise, chosen at run
time (at compile time for a static M).  The weight is repacked at compile time
(backends/cpu/int_pack.py) into new parameters `<weight>:<format>:<layout tag>:<role>`
(tag int<bits>x8x4, int8 on vnni int8x8x4vnni).

A static scale becomes the parameter `<weight>:<format>:int<bits>x8x4:act_scale`
(tensor<1xf32>), so layers of one shape share one kernel.  Chains it does not
handle (unsigned int8 weights, shared intermediate values) are left to the
reference lowering.  It emits x86
code: the CPU select-kernels stage (backends/cpu/lowering.select_kernels) runs
it only on AVX2 / AVX-512 hosts, with dot=vnni where the host has VNNI, and not
with QCC_CPU_KERNELS=reference.
"""

import dataclasses

import numpy as np
from torch_mlir import ir

from qcc import irutil
from qcc.context import format_key
from qcc.dialects import formats
from qcc.dialects.formats import activation
from qcc.errors import QccError
from qcc.passes import QccPass, register
from qcc.passes.quantize_weights import FLOAT_ACTIVATIONS

def _splat_scale(value) -> float | None:
    """The f32 of a splat arith.constant [1, 1] (dequant-after-gemm's static scale), else None."""
    op = irutil.defining_op(value)
    if op is None or op.name != "arith.constant":
        return None
    attr = ir.DenseElementsAttr(op.attributes["value"])
    return float(ir.FloatAttr(attr.get_splat_value()).value) if attr.is_splat else None


def _sole_user(value):
    uses = list(value.uses)
    return uses[0].owner if len(uses) == 1 else None


@register
class CpuSelectIntKernels(QccPass):
    name = "cpu-select-int-kernels"
    summary = "Replace quantize_dynamic -> matmul_int -> scale_accumulate by fused x86 integer kernels"

    @dataclasses.dataclass
    class Options:
        gemm_min_m: int = 4       # M at and above which the blocked GEMM runs
        threads: bool = True      # scf.parallel (OpenMP) over column chunks
        dot: str = "avx2"         # dot-product instructions: avx2 (vpmaddwd/vpmaddubsw) or vnni (vpdpbusd)

    def run(self, module):
        from qcc.backends.cpu.int_kernels import IntKernelConfig

        if self.options.dot not in ("avx2", "vnni"):
            raise QccError(f"cpu-select-int-kernels: unknown dot={self.options.dot!r}", hint="dot=avx2 or dot=vnni")
        cfg = IntKernelConfig(gemm_min_m=self.options.gemm_min_m, threads=self.options.threads)
        defined = set()
        selected = self.session.options.setdefault("cpu_kernels", {})
        for func in irutil.functions(module):
            sig = irutil.Signature(func)
            packed = {}  # original codes parameter -> (layout, new parameter names) of the chains rewritten
            for op in irutil.walk(func, "qcc.scale_accumulate") + irutil.walk(func, "qcc.gather_scale_accumulate"):
                chain = self._match(op, sig)
                if chain is not None:
                    self._rewrite(op, *chain, sig, cfg, module, defined, selected, packed)
            for op in irutil.walk(func, "qcc.qlinear"):
                if FLOAT_ACTIVATIONS in op.attributes:
                    self._rewrite_outlier_part(op, sig, module, defined, selected, packed)
            for name in sig.erase_unused_params():
                if name in self.session.params:
                    del self.session.params[name]

    def _match(self, sa, sig):
        """(quantize op, matmul op, layout, act format, weight param names, static scale) or None;
        `sa` a scale_accumulate or (experts) gather_scale_accumulate."""
        from qcc.backends.cpu.int_pack import IntLayout, IntLayoutError

        gathered = sa.name == "qcc.gather_scale_accumulate"
        acc, sx, sw = (sa.operands[0], sa.operands[1], sa.operands[3]) if gathered else sa.operands
        mm = irutil.defining_op(acc)
        if mm is None or mm.name != ("qcc.gather_matmul_int" if gathered else "qcc.matmul_int") \
                or _sole_user(acc) is None or (gathered and mm.operands[1] != sa.operands[2]):
            return None
        qd = irutil.defining_op(mm.operands[0])
        if qd is None or qd.name not in ("qcc.quantize_dynamic", "qcc.quantize") or _sole_user(qd.results[0]) is None:
            return None
        afmt = activation.parse_act_format(format_key(qd.attributes["format"]))
        if afmt is None:
            return None
        if afmt.dynamic:
            if qd.results[1] != sx or _sole_user(qd.results[1]) is None:
                return None
            static_scale = None
        else:
            static_scale = _splat_scale(sx)
            if qd.name != "qcc.quantize" or qd.operands[1] != sx or static_scale is None:
                return None
        fmt = formats.parse_weight_format(format_key(mm.attributes["weight_format"]))
        first = 2 if gathered else 1  # gather_matmul_int(xq, ids, codes[, zero])
        weights = [mm.operands[first], sw] + ([mm.operands[first + 1]] if len(mm.operands) > first + 1 else [])
        names = [sig.param_of(v) for v in weights]
        if None in names or any(nm not in self.session.params for nm in names):
            return None
        k, n = irutil.tensor_shape(mm.operands[0])[1], irutil.tensor_shape(sa.result)[1]
        if k is None or n is None:
            return None
        lay = IntLayout(fmt.key(), n, k, dot=self.options.dot)
        try:
            lay.check()
        except IntLayoutError:
            return None
        return qd, mm, lay, afmt, dict(zip(["codes", "scale", "zero"], names)), static_scale

    def _rewrite_outlier_part(self, op, sig, module, defined, selected, packed):
        """split-outliers' dynamic float part, on the int8 blocks its integer part already reads:
        a rank-k update over the columns the call made outliers, no second copy of the weight."""
        from qcc.backends.cpu import int_kernels, kernel_calls

        codes = sig.param_of(op.operands[1])
        if codes not in packed or format_key(op.attributes["act_format"]) != "none":
            return
        lay, names = packed[codes]
        if lay.fmt.bits != 8 or lay.grouped:
            return
        args = [sig.block.arguments[sig.param_index(names[role])] for role in lay.shapes()]
        kname = f"qcc_cpu_int_outliers_{lay.format_key}_{lay.k}x{lay.n}"
        if kname not in defined:
            irutil.append_functions(module, int_kernels.outlier_columns(kname, lay), defined)
        kernel_calls.replace_with_call(op.result, op.operands[0], args, kname, lay.k, lay.n)
        op.erase()
        selected[codes.rsplit(":", 2)[0]]["outlier_kernel"] = kname

    def _rewrite(self, sa, qd, mm, lay, afmt, src, static_scale, sig, cfg, module, defined, selected, packed):
        from qcc.backends.cpu import int_kernels, kernel_calls
        from qcc.backends.cpu.int_pack import pack

        store = self.session.params
        if sa.name == "qcc.gather_scale_accumulate":
            return self._rewrite_experts(sa, qd, mm, lay, afmt, src, static_scale, sig, cfg, module, defined,
                                         selected)
        arrays = pack(lay, store[src["codes"]], store[src["scale"]], store[src["zero"]] if "zero" in src else None)
        if static_scale is not None:
            arrays["act_scale"] = np.array([static_scale], np.float32)
        args, new_names = kernel_calls.add_packed_params(store, sig, src["codes"], lay.tag(), arrays)
        static_m = irutil.tensor_shape(qd.operands[0])[0]
        variant = cfg.variant(static_m) if static_m is not None else "dispatch"
        kname = f"qcc_cpu_int_{lay.format_key}_{afmt.key()}_{lay.k}x{lay.n}" + \
            ("" if variant == "dispatch" else f"_{variant}")
        if kname not in defined:
            irutil.append_functions(module, int_kernels.fused(kname, lay, cfg, afmt.levels(), static_m,
                                                               static_scale=static_scale is not None,
                                                               act_clip=afmt.clip), defined)
        kernel_calls.replace_with_call(sa.result, qd.operands[0], args, kname, lay.k, lay.n)
        _erase_chain(sa, mm, qd)
        packed[src["codes"]] = (lay, new_names)
        weight = src["codes"].rsplit(":", 2)[0]
        selected[weight] = {"kernel": kname, "variant": variant, "params": new_names, "act_format": afmt.key(),
                            "blocks_multiple": lay.blocks_multiple, **lay.to_json(), **cfg.to_json(),
                            "gemm_from_m": cfg.gemm_min_m}

    def _rewrite_experts(self, sa, qd, mm, lay, afmt, src, static_scale, sig, cfg, module, defined, selected):
        """The gathered chain -> int_kernels.gathered on every expert's packed blocks, stacked."""
        from qcc.backends.cpu import int_kernels, kernel_calls
        from qcc.backends.cpu.int_pack import pack

        store = self.session.params
        codes = store[src["codes"]]
        experts = codes.shape[0]
        parts = [pack(lay, codes[e], store[src["scale"]][e], store[src["zero"]][e] if "zero" in src else None)
                 for e in range(experts)]
        arrays = {role: np.concatenate([p[role] for p in parts]) for role in parts[0]}
        if static_scale is not None:
            arrays["act_scale"] = np.array([static_scale], np.float32)
        args, new_names = kernel_calls.add_packed_params(store, sig, src["codes"], lay.tag(), arrays)
        kname = f"qcc_cpu_int_experts_{lay.format_key}_{afmt.key()}_{experts}x{lay.k}x{lay.n}"
        if kname not in defined:
            irutil.append_functions(module, int_kernels.gathered(kname, lay, experts, cfg, afmt.levels(),
                                                                  static_scale=static_scale is not None,
                                                                  act_clip=afmt.clip), defined)
        kernel_calls.replace_with_call(sa.result, qd.operands[0], args, kname, lay.k, lay.n, ids=sa.operands[2])
        _erase_chain(sa, mm, qd)
        selected[src["codes"].rsplit(":", 2)[0]] = {
            "kernel": kname, "variant": "gathered int", "params": new_names, "act_format": afmt.key(),
            "experts": experts, "blocks_multiple": lay.blocks_multiple, **lay.to_json(), **cfg.to_json()}


def _erase_chain(sa, mm, qd) -> None:
    """The replaced scale_accumulate, matmul and quantization ops (and a static scale's constant)."""
    sx = sa.operands[1]
    scale = irutil.defining_op(sx)  # qd itself (per token), or the static scale's constant
    static = scale is not None and scale.name == "arith.constant"
    for op in (sa, mm, qd):
        op.erase()
    if static and not list(sx.uses):
        scale.erase()
