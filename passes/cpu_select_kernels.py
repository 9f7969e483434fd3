"""cpu-select-kernels: `qcc.qlinear` -> calls of the CPU backend's vector kernels.

Runs before lower-qcc-to-linalg.  For each weight-only qlinear whose format
the kernels handle, the packed weight is repacked at compile time into the
panel layout (backends/cpu/pack.py: contiguous per kernel stream, new
parameters `<codes param>` with `:panels<R>x<V>` before the role), and the op
becomes a call of `@qcc_cpu_qlinear_<format>_<K>x<N>_v<V>` (backends/cpu/
kernels.py): a GEMV with in-register int4/int8 decode over tiles of a few rows
for M < `gemm-min-m`, a blocked GEMM over dequantized tiles of broadcast x
otherwise, chosen at run time on M, or at compile time when M is static.  With
`bf16` every variant reads x rounded to bf16, and where each block of K lies in
one group the int4 GEMV and the GEMM (from M = `gemm-min-m-bf16`) run on
vdpbf16ps (AVX512-BF16).
Ops it does not handle (quantized activations, group sizes that do not tile,
non-parameter weights) are left to the reference lowering.
"""

import dataclasses


from qcc import irutil
from qcc.context import format_key
from qcc.dialects import formats
from qcc.passes import QccPass, register

@register
class CpuSelectKernels(QccPass):
    name = "cpu-select-kernels"
    summary = "Replace qcc.qlinear by CPU vector kernels on weights repacked into panels"

    @dataclasses.dataclass
    class Options:
        lanes: int = 0          # f32 lanes per vector: 8 (AVX2), 16 (AVX-512); 0 = the host's
        rows: int = 4           # weight rows per panel
        gemm_min_m: int = 64    # M at and above which the blocked GEMM runs
        gemm_min_m_bf16: int = 32  # the same for the vdpbf16ps GEMM
        threads: bool = True    # scf.parallel (OpenMP) over panels
        bf16: bool = False      # x rounded to bf16; vdpbf16ps kernels (AVX512-BF16)
        # from this static M, a weight of at most dequant_gemm_max_n rows is decoded to f32 once
        # a call and multiplied by the f32 GEMM (see _dequantized_gemm); 0: never
        dequant_gemm_min_m: int = 512
        dequant_gemm_max_n: int = 128

    def run(self, module):
        from qcc.backends.cpu import host, kernels
        from qcc.backends.cpu.pack import LayoutError, PanelLayout

        lanes = self.options.lanes or host.features()["lanes"]
        cfg = kernels.KernelConfig(gemm_min_m=self.options.gemm_min_m, gemm_min_m_bf16=self.options.gemm_min_m_bf16,
                                   threads=self.options.threads, bf16_activations=self.options.bf16)
        defined = set()
        selected = self.session.options.setdefault("cpu_kernels", {})
        for func in irutil.functions(module):
            sig = irutil.Signature(func)
            for op in irutil.walk(func, "qcc.qlinear"):
                if format_key(op.attributes["act_format"]) != "none":
                    continue
                fmt = formats.parse_weight_format(format_key(op.attributes["weight_format"]))
                x_shape, y_shape = irutil.tensor_shape(op.operands[0]), irutil.tensor_shape(op.result)
                k, n = x_shape[1], y_shape[1]
                names = [sig.param_of(v) for v in op.operands[1:]]
                if k is None or n is None or None in names or any(nm not in self.session.params for nm in names):
                    continue
                m = x_shape[0]
                # a convolution's rows are batch x positions: many, also where the batch is a run-time size
                many = (m is not None and m >= self.options.dequant_gemm_min_m) or \
                    (m is None and names[0].rsplit(":", 2)[0] in self.session.options.get("conv_weights", {}))
                if self.options.dequant_gemm_min_m and many and n <= self.options.dequant_gemm_max_n \
                        and not self.options.bf16:
                    self._dequantized_gemm(op, fmt, module, defined, selected, names, m, k, n)
                    continue
                lay = PanelLayout(fmt.key(), n, k, rows=self.options.rows, lanes=lanes)
                try:
                    lay.check()
                except LayoutError:
                    continue
                self._rewrite(op, func, sig, lay, cfg, names, module, defined, selected, x_shape[0])
            for name in sig.erase_unused_params():
                if name in self.session.params:
                    del self.session.params[name]

    def _dequantized_gemm(self, op, fmt, module, defined, selected, names, m, k, n) -> None:
        """Many rows, few output columns (a convolution over its patches: M = N Ho Wo, 64 channels):
        the weight decoded to f32 once a call (N x K, small) and x @ W^T on the f32 GEMM
        (cpu-vectorize-contractions' matmul_bt).  The panel GEMM parallelizes over chunks of 32
        output columns and decodes per block: at M 3136, K 576, N 64 it ran 47 GFLOP/s against
        the f32 GEMM's 149 (BENCHMARKS); at N 256 it depends on K (K 576: the f32 GEMM 1.48x
        faster; K 128: the panel GEMM 1.8x), hence up to 128 columns."""
        shapes = [irutil.tensor_shape(v) for v in op.operands[1:]]
        elems = ["i8", "f32", "i8"][:len(shapes)]
        tys = ["tensor<" + "x".join(map(str, sh)) + f"x{e}>" for sh, e in zip(shapes, elems)]
        params = ", ".join(f"%{r}: {t}" for r, t in zip(("codes", "scale", "zero"), tys))
        args = ", ".join(f"%{r}" for r in ("codes", "scale", "zero")[:len(tys)])
        kname = f"qcc_cpu_dequant_gemm_{fmt.key()}_{'d' if m is None else m}x{n}x{k}"
        m = "?" if m is None else m
        if kname not in defined:
            irutil.append_functions(module, f"""
func.func private @{kname}(%x: tensor<{m}x{k}xf32>, {params}) -> tensor<{m}x{n}xf32> {{
  %w = "qcc.dequantize"({args}) {{format = #qcc.format<"{fmt.key()}">}} : ({", ".join(tys)}) -> tensor<{n}x{k}xf32>
  %wt0 = tensor.empty() : tensor<{k}x{n}xf32>
  %wt = linalg.transpose ins(%w : tensor<{n}x{k}xf32>) outs(%wt0 : tensor<{k}x{n}xf32>) permutation = [1, 0]
  %zero_f = arith.constant 0.0 : f32
  %c0 = arith.constant 0 : index
  %rows = tensor.dim %x, %c0 : tensor<{m}x{k}xf32>
  %y0 = tensor.empty({"%rows" if m == "?" else ""}) : tensor<{m}x{n}xf32>
  %yz = linalg.fill ins(%zero_f : f32) outs(%y0 : tensor<{m}x{n}xf32>) -> tensor<{m}x{n}xf32>
  %y = linalg.matmul ins(%x, %wt : tensor<{m}x{k}xf32>, tensor<{k}x{n}xf32>) outs(%yz : tensor<{m}x{n}xf32>) -> tensor<{m}x{n}xf32>
  return %y : tensor<{m}x{n}xf32>
}}
""", defined)
        irutil.replace_with_call(op, kname, list(op.operands))
        weight = names[0].rsplit(":", 2)[0]
        selected[weight] = {"kernel": kname, "variant": "dequantized gemm", "layout": "format"}

    def _rewrite(self, op, func, sig, lay, cfg, names, module, defined, selected, static_m):
        from qcc.backends.cpu import kernel_calls, kernels
        from qcc.backends.cpu.pack import pack

        store = self.session.params
        roles = ["codes", "scale", "zero"][:len(names)]
        src = dict(zip(roles, names))
        arrays = pack(lay, store[src["codes"]], store[src["scale"]], store[src.get("zero")] if "zero" in src else None)
        args, new_names = kernel_calls.add_packed_params(store, sig, src["codes"], f"panels{lay.rows}x{lay.lanes}",
                                                         {role: arrays[role] for role in roles})
        # a static M needs one kernel: less code to compile than the dispatch over two
        variant = cfg.variant(static_m, lay) if static_m is not None else "dispatch"
        kname = f"qcc_cpu_qlinear_{lay.format_key}_{lay.k}x{lay.n}_v{lay.lanes}" + \
            ("_bf16" if cfg.bf16_activations else "") + ("" if variant == "dispatch" else f"_{variant}")
        if kname not in defined:
            irutil.append_functions(module, kernels.qlinear(kname, lay, cfg, static_m), defined)
        kernel_calls.replace_with_call(op.result, op.operands[0], args, kname, lay.k, lay.n)
        op.erase()
        weight = src["codes"].rsplit(":", 2)[0]
        selected[weight] = {"kernel": kname, "variant": variant, "params": new_names, **lay.to_json(),
                            **cfg.to_json(), "gemm_from_m": cfg.gemm_from(lay)}
