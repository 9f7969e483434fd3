"""cuda-select-kernels: qcc ops -> calls of qcc's prebuilt GPU kernels (kernels.py).

Runs on linalg-on-tensors IR before lower-qcc-to-linalg. For each weight-only qlinear
whose format and shape a kernel of kernels.py handles (int4 sym/asym with groups of a
multiple of 32 or per channel, K % 128 == 0: ``gemv_w4a16``; int8 symmetric per channel,
K % 64 == 0: ``gemv_w8a16``; N % 8 == 0 for both), the weight is repacked at compile time
into the kernel's layout (pack.py; new parameters ``<weight>:<format>:cuda_w4|cuda_w8:<role>``)
and the op becomes

    %xh = to_f16(%x)            (a linalg.generic: fuses into the producer of x)
    %yh = call @qcc_cuda_<kernel>_m<M>(%xh, %wq, %scales[, %zeros]) : tensor<MxNxf16>
    %y  = to_f32(%yh)           (fuses into the consumers)

The callee is an external declaration (`bufferization.access = "read"` on its
arguments) carrying the kernel builder and its arguments as attributes; the host
walker (host_plan.py) turns each call into one launch per m_max rows of x. At more than
16 (split) rows an int4 layer with groups of a multiple of 128 calls ``gemm_w4a16``
instead: the same parameters, packing and numerics as a GEMM (``gemm_w4a16_wg`` on Hopper's
wgmma for ``arch=sm_90a``, its weights in the wgmma K order of pack.W4_KMAP).

Numerics: these kernels are "a16": x is rounded to f16 and y is stored in f16 (fp32
accumulation inside); with split_x (default) x enters as f16 hi + lo rows and y is fp32.

Quantized activations (after dequant-after-gemm), on the codes as stored, no repack:
``qcc.quantize_dynamic`` -> ``quantize_rows``; ``qcc.matmul_int`` of int8 / symmetric int4
per-channel weights (+ the ``qcc.scale_accumulate`` reading it) -> ``gemv_i8`` (scaled
epilogue); grouped asymmetric int4 -> ``gemv_i4g`` (exact per-group sums, scaled and added in
its epilogue); layers reading one x (q/k/v, gate/up) share one such launch; past 16 rows
the integer GEMVs become the tensor-core ``gemm_i8`` (``gemm_i8_wg`` on wgmma for int8 weights
and ``arch=sm_90a``), same parameters and results;
llm-int8-dynamic's float-activation qlinear -> ``gemv_w8_sparse_x`` on the integer part's
codes. fuse-rotation's online Hadamard calls -> ``hadamard_rows``. The integer
kernels are exact and the float steps repeat the reference lowering's ops in order.
Everything else (asymmetric or grouped int8, K or N that do not tile) is left to
lower-qcc-to-linalg, whose fused dequantize-and-reduce generic runs as a warp-per-output
kernel: no float copy of a weight is ever made.
"""

import dataclasses
import json
import re

from torch_mlir import ir

from qcc import irutil
from qcc.context import format_key
from qcc.dialects import formats
from qcc.dialects.formats import activation
from qcc.passes import QccPass, register
from qcc.passes.quantize_weights import FLOAT_ACTIVATIONS

M_MAX = 16  # rows per GEMV launch (weight-only GEMVs: up to kernels.GEMV_M_MAX); more run as several launches

_MLIR_ELEM = {"uint32": "i32", "int32": "i32", "uint8": "i8", "int8": "i8", "float32": "f32",
              "float16": "f16"}


def plan_kernel(fmt, M: int, K: int, N: int, out_f32: bool = True, arch: str = "sm_90"):
    """(builder name, builder kwargs) of the GEMV for this format and shape, or (None, why).
    M: rows the kernel multiplies (2 x the tokens when x is split into hi/lo halves); arch:
    the GPU target (sm_90a lets prefill take wgmma)."""
    from . import kernels

    # rows a launch: one 8- or 16-row mma tile at decode, up to GEMV_M_MAX (several 16-row
    # tiles a warp, each dequantized weight fragment used for all of them) for prefill
    m_max = 8 if M <= 8 else M_MAX if M <= M_MAX else min(kernels.GEMV_M_MAX, -(-M // 16) * 16)
    try:
        if fmt.bits == 4 and fmt.granularity in ("group", "channel"):
            G = fmt.group_size if fmt.granularity == "group" else K
            args = {"K": K, "N": N, "group_size": G, "zero_point": not fmt.symmetric, "m_max": m_max,
                    "out_f32": out_f32}
            kernels.gemv_w4a16(**args)
            if M > M_MAX:  # prefill: the same product and parameters as a GEMM, where it applies
                # (sm_90a, f16 activations: weights scaled in f16 as torch fp16 holds them, so the
                # wgmma GEMM accumulates all of K at once; fp32 output keeps the exact group sums)
                wg = dict(args, scale_mode="acc" if out_f32 else "weight")
                return _first_buildable(([("gemm_w4a16_wg", wg)] if arch == "sm_90a" else []) +
                                        [("gemm_w4a16", args), ("gemv_w4a16", args)])
            return "gemv_w4a16", args
        if fmt.bits == 8 and fmt.symmetric and fmt.granularity == "channel":
            args = {"K": K, "N": N, "m_max": m_max, "out_f32": out_f32}
            kernels.gemv_w8a16(**args)
            return "gemv_w8a16", args
    except kernels.KernelConstraintError as e:
        return None, str(e)
    return None, f"no GEMV kernel for {fmt.key()}"


def _prefill_gemm(builder: str, args: dict, M: int, arch: str = "sm_90"):
    """More rows than a GEMV launch takes: gemv_i8's product (int8 or int4 weights) as a
    tensor-core GEMM (same parameters, same results) on up to GEMV_M_MAX rows a launch, the
    first whose constraints hold: gemm_i8_wg (wgmma, int8 weights) for arch sm_90a, gemm_i8;
    else the builder and arguments unchanged."""
    from . import kernels

    if builder != "gemv_i8" or M <= M_MAX:
        return builder, args
    g = dict(args, m_max=min(kernels.GEMV_M_MAX, -(-M // 16) * 16))
    return _first_buildable([(gemm, g) for gemm in (["gemm_i8_wg"] if arch == "sm_90a" else []) + ["gemm_i8"]] +
                            [(builder, args)])


def _first_buildable(candidates):
    """The first (builder, args) whose kernel's constraints hold; the last one unchecked (the
    fallback the caller has already built)."""
    from . import kernels

    for builder, args in candidates[:-1]:
        try:
            getattr(kernels, builder)(**args)
            return builder, args
        except kernels.KernelConstraintError:
            pass
    return candidates[-1]


def _int_gemv(fmt) -> tuple[str, dict] | None:
    """(builder, format arguments) of the integer GEMV on the codes as stored for weights of
    `fmt`: gemv_i8 (symmetric per-channel int8 / int4) or gemv_i4g (grouped asymmetric int4,
    w4a8-g128); None for other formats."""
    if fmt.symmetric and fmt.granularity == "channel" and fmt.bits in (8, 4):
        return "gemv_i8", ({"w_bits": 4} if fmt.bits == 4 else {})
    if fmt.bits == 4 and not fmt.symmetric and fmt.granularity == "group":
        return "gemv_i4g", {"group_size": fmt.group_size}
    return None


def build_spec(builder: str, args: dict):
    from . import kernels

    return getattr(kernels, builder)(**args)


def _split_helpers(M, K, N):
    """Private helpers (inlined later): x f32 [M, K] -> f16 [2M, K] (rows 0..M-1 the rounded
    x, rows M..2M-1 the rounding error, so hi + lo = x to ~22 bits), and y f32 [2M, N] ->
    [M, N] as hi + lo rows."""
    split, join = f"qcc_cuda_split_f16_{M}x{K}", f"qcc_cuda_join_{M}x{N}"
    return split, f"""
func.func private @{split}(%x: tensor<{M}x{K}xf32>) -> tensor<{2 * M}x{K}xf16> {{
  %e = tensor.empty() : tensor<2x{M}x{K}xf16>
  %y = linalg.generic {{indexing_maps = [affine_map<(h, m, k) -> (m, k)>, affine_map<(h, m, k) -> (h, m, k)>],
      iterator_types = ["parallel", "parallel", "parallel"]}} ins(%x : tensor<{M}x{K}xf32>)
      outs(%e : tensor<2x{M}x{K}xf16>) {{
  ^bb0(%in: f32, %out: f16):
    %h = linalg.index 0 : index
    %c0 = arith.constant 0 : index
    %hi = arith.truncf %in : f32 to f16
    %hif = arith.extf %hi : f16 to f32
    %d = arith.subf %in, %hif : f32
    %lo = arith.truncf %d : f32 to f16
    %is_hi = arith.cmpi eq, %h, %c0 : index
    %r = arith.select %is_hi, %hi, %lo : f16
    linalg.yield %r : f16
  }} -> tensor<2x{M}x{K}xf16>
  %c = tensor.collapse_shape %y [[0, 1], [2]] : tensor<2x{M}x{K}xf16> into tensor<{2 * M}x{K}xf16>
  return %c : tensor<{2 * M}x{K}xf16>
}}
""", join, f"""
func.func private @{join}(%y: tensor<{2 * M}x{N}xf32>) -> tensor<{M}x{N}xf32> {{
  %hi = tensor.extract_slice %y[0, 0] [{M}, {N}] [1, 1] : tensor<{2 * M}x{N}xf32> to tensor<{M}x{N}xf32>
  %lo = tensor.extract_slice %y[{M}, 0] [{M}, {N}] [1, 1] : tensor<{2 * M}x{N}xf32> to tensor<{M}x{N}xf32>
  %e = tensor.empty() : tensor<{M}x{N}xf32>
  %s = linalg.generic {{indexing_maps = [affine_map<(m, n) -> (m, n)>, affine_map<(m, n) -> (m, n)>,
      affine_map<(m, n) -> (m, n)>], iterator_types = ["parallel", "parallel"]}}
      ins(%hi, %lo : tensor<{M}x{N}xf32>, tensor<{M}x{N}xf32>) outs(%e : tensor<{M}x{N}xf32>) {{
  ^bb0(%a: f32, %b: f32, %out: f32):
    %r = arith.addf %a, %b : f32
    linalg.yield %r : f32
  }} -> tensor<{M}x{N}xf32>
  return %s : tensor<{M}x{N}xf32>
}}
"""


def _join_cols(M, N, n0, n, split):
    """Columns [n0, n0 + n) of a GEMV result as f32 [M, n]: rows hi + lo of a [2M, N] f32
    result (split x), or the f16 [M, N] result widened."""
    name = f"qcc_cuda_{'join' if split else 'widen'}_{M}x{N}_{n0}_{n}"
    if split:
        body = f"""  %hi = tensor.extract_slice %y[0, {n0}] [{M}, {n}] [1, 1] : tensor<{2 * M}x{N}xf32> to tensor<{M}x{n}xf32>
  %lo = tensor.extract_slice %y[{M}, {n0}] [{M}, {n}] [1, 1] : tensor<{2 * M}x{N}xf32> to tensor<{M}x{n}xf32>
  %e = tensor.empty() : tensor<{M}x{n}xf32>
  %s = linalg.generic {{indexing_maps = [affine_map<(m, k) -> (m, k)>, affine_map<(m, k) -> (m, k)>,
      affine_map<(m, k) -> (m, k)>], iterator_types = ["parallel", "parallel"]}}
      ins(%hi, %lo : tensor<{M}x{n}xf32>, tensor<{M}x{n}xf32>) outs(%e : tensor<{M}x{n}xf32>) {{
  ^bb0(%a: f32, %b: f32, %out: f32):
    %r = arith.addf %a, %b : f32
    linalg.yield %r : f32
  }} -> tensor<{M}x{n}xf32>"""
        src = f"tensor<{2 * M}x{N}xf32>"
    else:
        body = f"""  %h = tensor.extract_slice %y[0, {n0}] [{M}, {n}] [1, 1] : tensor<{M}x{N}xf16> to tensor<{M}x{n}xf16>
  %e = tensor.empty() : tensor<{M}x{n}xf32>
  %s = linalg.generic {{indexing_maps = [affine_map<(m, k) -> (m, k)>, affine_map<(m, k) -> (m, k)>],
      iterator_types = ["parallel", "parallel"]}} ins(%h : tensor<{M}x{n}xf16>) outs(%e : tensor<{M}x{n}xf32>) {{
  ^bb0(%a: f16, %out: f32):
    %r = arith.extf %a : f16 to f32
    linalg.yield %r : f32
  }} -> tensor<{M}x{n}xf32>"""
        src = f"tensor<{M}x{N}xf16>"
    return name, f"""
func.func private @{name}(%y: {src}) -> tensor<{M}x{n}xf32> {{
{body}
  return %s : tensor<{M}x{n}xf32>
}}
"""


def _declaration(callee: str, arg_types, result_type: str, info: dict) -> str:
    """The external declaration of a kernel call: read-only arguments, and the kernel builder
    with its arguments (`info`) for the host walker."""
    attrs = json.dumps(info).replace("\\", "\\\\").replace('"', '\\"')
    args = ", ".join(f'{t} {{bufferization.access = "read"}}' for t in arg_types)
    return f'func.func private @{callee}({args}) -> {result_type} attributes {{qcc.cuda_kernel = "{attrs}"}}'


def _f16_helpers(M, K, N):
    """Private helpers: f32 -> f16 of x [M, K], f16 -> f32 of y [M, N] (inlined later)."""
    def conv(name, rows, cols, src, dst, op):
        return f"""
func.func private @{name}(%x: tensor<{rows}x{cols}x{src}>) -> tensor<{rows}x{cols}x{dst}> {{
  %e = tensor.empty() : tensor<{rows}x{cols}x{dst}>
  %y = linalg.generic {{indexing_maps = [affine_map<(m, k) -> (m, k)>, affine_map<(m, k) -> (m, k)>],
      iterator_types = ["parallel", "parallel"]}} ins(%x : tensor<{rows}x{cols}x{src}>)
      outs(%e : tensor<{rows}x{cols}x{dst}>) {{
  ^bb0(%in: {src}, %out: {dst}):
    %c = arith.{op} %in : {src} to {dst}
    linalg.yield %c : {dst}
  }} -> tensor<{rows}x{cols}x{dst}>
  return %y : tensor<{rows}x{cols}x{dst}>
}}
"""
    return (f"qcc_cuda_to_f16_{M}x{K}", conv(f"qcc_cuda_to_f16_{M}x{K}", M, K, "f32", "f16", "truncf"),
            f"qcc_cuda_to_f32_{M}x{N}", conv(f"qcc_cuda_to_f32_{M}x{N}", M, N, "f16", "f32", "extf"))


@register
class CudaSelectKernels(QccPass):
    name = "cuda-select-kernels"
    summary = "Replace weight-only qcc.qlinear by qcc's tensor-core GEMV kernels on repacked weights"

    @dataclasses.dataclass
    class Options:
        enable: bool = True  # false: every qlinear takes the generic (fp32, dequantize-in-reduction) path
        # true: x enters the tensor cores as f16 hi + lo rows and y leaves in fp32 (the layer is
        # as accurate as an fp32 GEMM; free for up to 4 tokens, whose 2M rows fit the m8 kernel);
        # false: "a16" proper, x rounded to f16 and y stored as f16.
        split_x: bool = True
        # stack the weights of layers that share their input (q/k/v, gate/up) into one GEMV
        fuse: bool = True
        # the GPU target: sm_90a (Hopper's arch-specific instructions) runs prefill's w4a16 on wgmma
        arch: str = "sm_90"

    def run(self, module):
        self.module = module
        self.defined = set()
        selected = self.session.options.setdefault("cuda_kernels", {})
        fallback = self.session.options.setdefault("cuda_fallback", {})
        int_layers = self.session.options.setdefault("cuda_int_layers", {})
        split, arch = self.options.split_x, self.options.arch
        for func in irutil.functions(module):
            sig = irutil.Signature(func)
            self.seeds = {}  # Hadamard seed name -> this function's argument holding it
            groups = {}  # (x, format, M, K) -> [candidate]: layers that share their input
            for op in list(irutil.walk(func, "qcc.qlinear")):
                if format_key(op.attributes["act_format"]) != "none":
                    continue
                if FLOAT_ACTIVATIONS in op.attributes and \
                        self._on_codes(op, sig, "gemv_w8_sparse_x", int_layers, {}):
                    continue  # else: a GEMV of its own (a repacked copy of the codes)
                fmt = formats.parse_weight_format(format_key(op.attributes["weight_format"]))
                x_shape, y_shape = irutil.tensor_shape(op.operands[0]), irutil.tensor_shape(op.result)
                names = [sig.param_of(v) for v in op.operands[1:]]
                base = names[0].rsplit(":", 2)[0] if names and names[0] else None
                if len(x_shape) != 2 or None in x_shape or None in y_shape or None in names \
                        or any(nm not in self.session.params for nm in names):
                    if base:
                        fallback[base] = "dynamic shape or non-parameter weight"
                    continue
                (M, K), N = x_shape, y_shape[1]
                if not self.options.enable:
                    fallback[base] = "disabled (cuda-select-kernels{enable=false})"
                    continue
                builder, args = plan_kernel(fmt, 2 * M if split else M, K, N, out_f32=split, arch=arch)
                if builder is None:
                    fallback[base] = args
                    continue
                groups.setdefault((op.operands[0], fmt.key(), M, K), []).append((op, fmt, N, names, base))
            for (x, _, M, K), members in groups.items():
                # one GEMV over the concatenated weights (q/k/v, gate/up): fewer launches, more blocks
                if self.options.fuse and len(members) > 1:
                    builder, args = plan_kernel(members[0][1], 2 * M if split else M, K,
                                                sum(m[2] for m in members), out_f32=split, arch=arch)
                    if builder is not None:
                        self._rewrite(members, sig, builder, args, M, K, selected)
                        continue
                for m in members:
                    builder, args = plan_kernel(m[1], 2 * M if split else M, K, m[2], out_f32=split, arch=arch)
                    self._rewrite([m], sig, builder, args, M, K, selected)
            for op in list(irutil.walk(func, "func.call")):
                if ir.FlatSymbolRefAttr(op.attributes["callee"]).value.startswith("qcc_hadamard_"):
                    self._hadamard(op, sig)
            quantized = {}  # (x, format) -> the call's results: q/k/v (gate/up) quantize their x once
            for op in list(irutil.walk(func, "qcc.quantize_dynamic")):
                self._quantize_rows(op, quantized)
            readers = {}  # (x codes, x scales) -> [(matmul, scaling)]: q/k/v, gate/up
            for sa in list(irutil.walk(func, "qcc.scale_accumulate")):  # matmul and scaling: one kernel
                mm = irutil.defining_op(sa.operands[0])
                if mm is not None and mm.name == "qcc.matmul_int" and len(list(mm.result.uses)) == 1:
                    readers.setdefault((mm.operands[0], sa.operands[1]), []).append((mm, sa))
            for members in readers.values():
                if not (self.options.fuse and self._stack_on_codes(members, sig, int_layers)):
                    for mm, sa in members:
                        self._on_codes(mm, sig, "gemv_i8", int_layers, fallback, scale=sa)
            for op in list(irutil.walk(func, "qcc.matmul_int")):
                self._on_codes(op, sig, "gemv_i8", int_layers, fallback)
            for sa in list(irutil.walk(func, "qcc.gather_scale_accumulate")):
                self._experts_on_codes(sa, sig, int_layers, fallback)
            for name in sig.erase_unused_params():
                if name in self.session.params:
                    del self.session.params[name]

    def _on_codes(self, op, sig, builder, chosen, fallback, scale=None) -> bool:
        """op -> a call of `builder` on the weight codes as quantize-weights stored them (no
        repacked copy); False (and why, in `fallback`) where it does not apply.

        gemv_i8: qcc.matmul_int of int8 activation codes and int8 or symmetric int4 per-channel
        weights (w8a8, w8a8-had, w4a4-had, llm-int8's int8 part...): exact i32 sums; grouped
        asymmetric int4 weights (w4a8-g128) take gemv_i4g instead. With `scale` (the qcc.scale_accumulate
        consuming them, whose sx and sw it takes) the call replaces that op too and scales in
        its epilogue, in the generic's order of rounding. gemv_w8_sparse_x: the
        float-activation qlinear of llm-int8-dynamic's outlier columns, on the codes its
        integer part reads.
        """
        from . import kernels

        fmt = formats.parse_weight_format(format_key(op.attributes["weight_format"]))
        name = sig.param_of(op.operands[1])
        base = name.rsplit(":", 2)[0] if name else "<non-parameter weight>"
        found = _int_gemv(fmt) if builder == "gemv_i8" else \
            (builder, {}) if (fmt.symmetric, fmt.granularity, fmt.bits) == (True, "channel", 8) else None
        if found is None:
            fallback[base] = f"no integer GEMV for {fmt.key()} weights"
            return False
        builder, extra = found
        x_shape, y_shape = irutil.tensor_shape(op.operands[0]), irutil.tensor_shape(op.result)
        why = self._not_on_codes(x_shape, y_shape, name)
        if why:
            fallback[base] = why
            return False
        (M, K), N = x_shape, y_shape[1]
        args = {"K": K, "N": N, "m_max": min(M, 8 if builder == "gemv_w8_sparse_x" else M_MAX), **extra}
        operands, replaced = list(op.operands), op
        if scale is not None:
            sx_shape = irutil.tensor_shape(scale.operands[1])
            args["scaled"] = "row" if sx_shape[0] == M and M > 1 else "tensor"
            operands, replaced = operands + list(scale.operands[1:]), scale
        builder, args = _prefill_gemm(builder, args, M, self.options.arch)
        try:
            spec = getattr(kernels, builder)(**args)
        except kernels.KernelConstraintError as e:
            fallback[base] = str(e)
            return False
        callee = f"qcc_cuda_{spec.name}_M{M}"
        self._define(callee, _declaration(callee, [str(v.type) for v in operands], str(replaced.result.type),
                                          {"builder": builder, "args": args, "M": M, "weight": base}))
        irutil.replace_with_call(replaced, callee, operands)
        if replaced is not op:
            op.erase()
        key = f"{base} (outlier columns)" if builder == "gemv_w8_sparse_x" else base
        chosen[key] = {"kernel": spec.name, "builder": builder, "args": args, "M": M, "format": fmt.key(),
                       "shape": [N, K], "params": {"wq": name}, "launches": -(-M // args["m_max"])}
        return True

    def _not_on_codes(self, x_shape, y_shape, weight) -> str | None:
        """Why an integer GEMV on the codes as stored cannot take x [M, K] -> y: a dynamic shape, a
        weight that is not a parameter (`weight` None), the pass switched off; None if it can."""
        if len(x_shape) != 2 or None in x_shape or None in y_shape or weight is None:
            return "dynamic shape or non-parameter weight"
        if not self.options.enable:
            return "disabled (cuda-select-kernels{enable=false})"
        return None

    def _experts_on_codes(self, sa, sig, chosen, fallback) -> bool:
        """A mixture of experts' integer product (gather_matmul_int, then its
        gather_scale_accumulate) -> gemv_i8(experts=E) (symmetric per-channel int8 / int4) or
        gemv_i4g(experts=E) (grouped asymmetric int4) on the experts' codes as stored: each row
        on its expert's weights, scaled in the epilogue in the generic's order; False (and why,
        in `fallback`) where it does not apply (the generic kernels of lower-qcc-to-linalg run it)."""
        from . import kernels

        mm = irutil.defining_op(sa.operands[0])
        if mm is None or mm.name != "qcc.gather_matmul_int" or len(list(mm.result.uses)) != 1:
            return False
        fmt = formats.parse_weight_format(format_key(mm.attributes["weight_format"]))
        name = sig.param_of(mm.operands[2])
        base = name.rsplit(":", 2)[0] if name else "<non-parameter weight>"
        found = _int_gemv(fmt)
        if found is None:
            fallback[base] = f"no gathered integer GEMV for {fmt.key()} experts' weights"
            return False
        builder, extra = found
        x_shape, y_shape = irutil.tensor_shape(mm.operands[0]), irutil.tensor_shape(sa.result)
        why = self._not_on_codes(x_shape, y_shape, name and sig.param_of(sa.operands[3]))
        if why:
            fallback[base] = why
            return False
        (M, K), N = x_shape, y_shape[1]
        experts = irutil.tensor_shape(mm.operands[2])[0]
        args = {"K": K, "N": N, "m_max": min(M, M_MAX), "experts": experts, **extra,
                "scaled": "row" if irutil.tensor_shape(sa.operands[1])[0] == M and M > 1 else "tensor"}
        try:
            spec = getattr(kernels, builder)(**args)
        except kernels.KernelConstraintError as e:
            fallback[base] = str(e)
            return False
        # x, ids, codes[, zero points], sx, scales: the kernels' parameter order
        operands = [mm.operands[0], sa.operands[2], *mm.operands[2:], sa.operands[1], sa.operands[3]]
        callee = f"qcc_cuda_{spec.name}_M{M}"
        self._define(callee, _declaration(callee, [str(v.type) for v in operands], str(sa.result.type),
                                          {"builder": builder, "args": args, "M": M, "weight": base}))
        irutil.replace_with_call(sa, callee, operands)
        mm.erase()
        chosen[base] = {"kernel": spec.name, "builder": builder, "args": args, "M": M, "format": fmt.key(),
                        "shape": [experts, N, K], "params": {"wq": name}, "launches": -(-M // args["m_max"])}
        return True

    def _stack_on_codes(self, members, sig, chosen) -> bool:
        """Layers whose integer matmuls read the same activation codes and scales (q/k/v,
        gate/up) -> one launch over all their weights (``members=``), each on its codes as
        stored: gemv_i8 (symmetric per-channel int8/int4) or gemv_i4g (grouped asymmetric
        int4); False (nothing changed) unless all of them qualify alike."""
        from . import kernels

        if len(members) < 2 or not self.options.enable:
            return False
        kinds, names = set(), []
        for mm, sa in members:
            fmt = formats.parse_weight_format(format_key(mm.attributes["weight_format"]))
            x_shape, y_shape = irutil.tensor_shape(mm.operands[0]), irutil.tensor_shape(mm.result)
            weights = [sig.param_of(v) for v in list(mm.operands[1:]) + [sa.operands[2]]]
            found = _int_gemv(fmt)
            if found is None:
                return False
            builder, extra = found
            if None in x_shape or None in y_shape or len(x_shape) != 2 or None in weights:
                return False
            kinds.add((builder, tuple(sorted(extra.items())), tuple(x_shape),
                       tuple(irutil.tensor_shape(sa.operands[1]))))
            names.append((weights[0], y_shape[1]))
        if len(kinds) != 1:
            return False
        ((builder, extra, (M, K), sx_shape),) = kinds
        Ns = [n for _, n in names]
        args = {"K": K, "N": sum(Ns), "m_max": min(M, M_MAX), "members": Ns, **dict(extra),
                "scaled": "row" if sx_shape[0] == M and M > 1 else "tensor"}
        builder, args = _prefill_gemm(builder, args, M, self.options.arch)
        try:
            spec = getattr(kernels, builder)(**args)
        except kernels.KernelConstraintError:
            return False
        fmt_key = format_key(members[0][0].attributes["weight_format"])
        x, sx = members[0][0].operands[0], members[0][1].operands[1]
        n_w = len(members[0][0].operands) - 1  # codes (and zero points) of each member
        operands = [x] + [mm.operands[1 + k] for k in range(n_w) for mm, _ in members] + [sx] + \
            [sa.operands[2] for _, sa in members]
        results = [sa.result.type for _, sa in members]
        bases = [wq.rsplit(":", 2)[0] for wq, _ in names]
        callee = f"qcc_cuda_{spec.name}_M{M}"
        self._define(callee, _declaration(callee, [str(v.type) for v in operands],
                                          f"({', '.join(map(str, results))})",
                                          {"builder": builder, "args": args, "M": M, "weight": bases[0]}))
        first = members[0][1]  # the walk's order: the operands (x, parameters) are defined above it
        with ir.InsertionPoint(first), first.location:
            call = ir.Operation.create("func.call", results=results, operands=operands,
                                       attributes={"callee": ir.FlatSymbolRefAttr.get(callee)})
        for k, (mm, sa) in enumerate(members):
            sa.result.replace_all_uses_with(call.results[k])
            sa.erase()
            mm.erase()
        n0 = 0
        for (wq, n), base in zip(names, bases):
            chosen[base] = {"kernel": spec.name, "builder": builder, "args": args, "M": M, "format": fmt_key,
                            "shape": [n, K], "params": {"wq": wq}, "cols": [n0, n0 + n],
                            "launches": -(-M // args["m_max"])}
            n0 += n
        return True

    def _hadamard(self, op, sig):
        """A call of fuse-rotation's online Hadamard function (an scf.for of butterfly stages,
        which the host walker cannot run) -> a call of hadamard_rows on the static shape the
        surrounding casts give, with the function's numerics."""
        from qcc import hadamard

        from . import kernels

        callee = ir.FlatSymbolRefAttr(op.attributes["callee"]).value
        m_ = re.fullmatch(r"qcc_hadamard_(\d+)(?:_b(\d+))?", callee)
        src = irutil.defining_op(op.operands[0])
        uses = [u.owner for u in op.result.uses]
        if m_ is None or src is None or src.name != "tensor.cast" or len(uses) != 1 or uses[0].name != "tensor.cast":
            return  # not the shape insert_online_hadamard emits: the host walker will name it
        x, out = src.operands[0], uses[0]
        shape = irutil.tensor_shape(x)
        if len(shape) != 2 or None in shape:
            return
        (M, width), n = shape, int(m_.group(2) or m_.group(1))
        m, k = hadamard.factor(n)
        args = {"n": n, "m": m, "k": k, "sub_rows": width // n, "m_max": min(M, kernels.ROWS_MAX)}
        try:
            spec = kernels.hadamard_rows(**args)
        except kernels.KernelConstraintError:
            return
        operands = [x]
        if m > 1:  # the seed H_m: a parameter (uploaded with the weights), shared by every call
            seed = f"qcc.hadamard_seed_{m}"
            if seed not in self.seeds:
                self.session.params[seed] = hadamard.seed_matrix(m).astype("float32")
                self.seeds[seed] = sig.add_param(seed, irutil.tensor_type([m, m], "f32"))
            operands.append(self.seeds[seed])
        name = f"qcc_cuda_{spec.name}_M{M}"
        self._define(name, _declaration(name, [str(v.type) for v in operands], str(out.result.type),
                                        {"builder": "hadamard_rows", "args": args, "M": M}))
        irutil.replace_with_call(out, name, operands)
        op.erase()
        if not list(src.result.uses):
            src.erase()

    def _quantize_rows(self, op, done):
        """qcc.quantize_dynamic (per-token int8/int4, clipped or not) -> one quantize_rows launch
        (per m_max rows) instead of the reference lowering's three (absmax, scale, codes);
        the same numerics, op for op. Shapes the kernel does not take stay with the lowering.
        An op quantizing what an earlier one in its block did takes that one's results."""
        from . import kernels

        key = (op.operands[0], format_key(op.attributes["format"]), op.operation.block)
        if key in done:
            for old, new in zip(op.results, done[key]):
                old.replace_all_uses_with(new)
            op.erase()
            return
        fmt = activation.parse_act_format(key[1])
        shape = irutil.tensor_shape(op.operands[0])
        if not self.options.enable or fmt is None or not fmt.dynamic or len(shape) != 2 or None in shape:
            return
        (M, K) = shape
        qmin, qmax = fmt.levels()
        args = {"K": K, "qmin": int(qmin), "qmax": int(qmax), "clip": float(fmt.clip),
                "m_max": min(M, kernels.ROWS_MAX)}
        try:
            spec = kernels.quantize_rows(**args)
        except kernels.KernelConstraintError:
            return
        callee = f"qcc_cuda_{spec.name}_M{M}"
        types = [str(r.type) for r in op.results]
        self._define(callee, _declaration(callee, [str(op.operands[0].type)], f"({', '.join(types)})",
                                          {"builder": "quantize_rows", "args": args, "M": M}))
        done[key] = list(irutil.replace_with_call(op, callee, [op.operands[0]]).results)

    def _define(self, name, text):
        if name not in self.defined:
            irutil.append_functions(self.module, text, self.defined)

    def _rewrite(self, members, sig, builder, args, M, K, selected):
        """members: [(op, fmt, N, param names, weight name)] sharing x, in block order; their
        weights are stacked along N into one GEMV (one member: no stacking)."""
        import numpy as np

        from . import pack

        store = self.session.params
        fmt = members[0][1]
        Ns = [m[2] for m in members]
        N = sum(Ns)
        srcs = [dict(zip(["codes", "scale", "zero"], m[3])) for m in members]
        cat = lambda role: np.concatenate([store[s[role]] for s in srcs], axis=0)  # noqa: E731
        if builder in pack.W4_BUILDERS:
            G = args["group_size"]
            scale = cat("scale").astype("float32").reshape(N, K // G)
            zero = cat("zero").view("uint8").reshape(N, K // G) if "zero" in srcs[0] else None
            arrays = pack.pack_w4a16(cat("codes").view("uint8"), scale, zero, G, scale_mode=args.get("scale_mode"),
                                     order=pack.w4_order(builder))
            tag = "cuda_w4"
        else:
            arrays = pack.pack_w8a16(cat("codes").view("int8"), cat("scale"))
            tag = "cuda_w8"
        if len(members) > 1:
            tag += f"_stack{len(members)}"
        spec = build_spec(builder, args)
        kparams = [p.name for p in spec.params if p.is_buffer and p.name not in ("x", "y")]
        base0 = members[0][4]
        new_names, operands = {}, []
        for role in kparams:
            name = f"{base0}:{fmt.key()}:{tag}:{role}"
            a = arrays[role]
            store[name] = a
            new_names[role] = name
            operands.append(sig.add_param(name, irutil.tensor_type(a.shape, _MLIR_ELEM[a.dtype.name])))
        split = args.get("out_f32", False)
        rows = 2 * M if split else M
        yt = "f32" if split else "f16"
        callee = f"qcc_cuda_{spec.name}_m{rows}"
        self._define(callee, _declaration(callee, [f"tensor<{rows}x{K}xf16>"] + [str(v.type) for v in operands],
                                          f"tensor<{rows}x{N}x{yt}>",
                                          {"builder": builder, "args": args, "M": rows,
                                           "weight": "+".join(m[4] for m in members)}))
        to16, to16_text, _, _ = (_split_helpers if split else _f16_helpers)(M, K, N)
        self._define(to16, to16_text)
        first = members[0][0]
        with ir.InsertionPoint(first), first.location:
            xh = ir.Operation.create("func.call", results=[irutil.tensor_type([rows, K], "f16")],
                                     operands=[first.operands[0]],
                                     attributes={"callee": ir.FlatSymbolRefAttr.get(to16)}).result
            yh = ir.Operation.create("func.call", results=[irutil.tensor_type([rows, N], yt)],
                                     operands=[xh, *operands],
                                     attributes={"callee": ir.FlatSymbolRefAttr.get(callee)}).result
            outs, n0 = [], 0
            for op, _, n, _, _ in members:  # each layer: its columns, hi + lo (or f16 -> f32)
                name, text = _join_cols(M, N, n0, n, split)
                self._define(name, text)
                outs.append(ir.Operation.create("func.call", results=[op.result.type], operands=[yh],
                                                attributes={"callee": ir.FlatSymbolRefAttr.get(name)}).result)
                n0 += n
        n0 = 0
        for (op, _, n, _, base), out in zip(members, outs):
            op.result.replace_all_uses_with(out)
            op.erase()
            selected[base] = {"kernel": spec.name, "builder": builder, "args": args, "M": M, "rows": rows,
                              "split_x": split, "format": fmt.key(), "shape": [n, K], "params": new_names,
                              "launches": -(-rows // args["m_max"])}
            if len(members) > 1:
                selected[base].update({"cols": [n0, n0 + n], "stacked": [m[4] for m in members]})
            n0 += n
