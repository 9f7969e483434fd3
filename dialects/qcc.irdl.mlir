// The qcc dialect: quantization decisions as IR.
//
// Formats are attributes (#qcc.format<"int4_asym_g128">, keys from
// qcc.dialects.formats); scales and zero points are SSA operands, never type
// parameters, and weights stay outside the IR as function arguments that name
// entries of the parameter store (arg attribute `qcc.param`).
irdl.dialect @qcc {
  // A quantization format, by registry key, e.g. "int8_sym_channel".
  irdl.attribute @format {
    %key = irdl.base "#builtin.string"
    irdl.parameters(key: %key)
  }

  // codes = clamp(round(x / scale) + zero); operands: x, scale, [zero].
  irdl.operation @quantize {
    %input = irdl.base "!builtin.tensor"
    %scale = irdl.base "!builtin.tensor"
    %zero = irdl.base "!builtin.tensor"
    %codes = irdl.base "!builtin.tensor"
    %fmt = irdl.base @qcc::@format
    irdl.operands(input: %input, scale: %scale, zero: optional %zero)
    irdl.results(codes: %codes)
    irdl.attributes { "format" = %fmt }
  }

  // x = (codes - zero) * scale; operands: codes, scale, [zero].
  irdl.operation @dequantize {
    %codes = irdl.base "!builtin.tensor"
    %scale = irdl.base "!builtin.tensor"
    %zero = irdl.base "!builtin.tensor"
    %output = irdl.base "!builtin.tensor"
    %fmt = irdl.base @qcc::@format
    irdl.operands(codes: %codes, scale: %scale, zero: optional %zero)
    irdl.results(output: %output)
    irdl.attributes { "format" = %fmt }
  }

  // w[t, n, k] = (codes[ids[t], n, k] - zero) * scale: a mixture of experts' weights [E, N, K],
  // quantized as E * N rows of the weight format (codes [E, N, K packed], scale / zero
  // [E, N, groups]), gathered for each token's expert (ids: i64 [T]) and decoded.
  irdl.operation @gather_dequantize {
    %ids = irdl.base "!builtin.tensor"
    %codes = irdl.base "!builtin.tensor"
    %scale = irdl.base "!builtin.tensor"
    %zero = irdl.base "!builtin.tensor"
    %output = irdl.base "!builtin.tensor"
    %fmt = irdl.base @qcc::@format
    irdl.operands(ids: %ids, codes: %codes, scale: %scale, zero: optional %zero)
    irdl.results(output: %output)
    irdl.attributes { "format" = %fmt }
  }

  // y[M, N] = x[M, K] @ dequant(w)[N, K]^T.  The weight arrives packed as the
  // weight format says; `act_format` is "none" for float activations, else an
  // activation format (qcc.dialects.formats.activation): x is quantized first,
  // per token at run time ("int8_sym_token") or per tensor with the calibrated
  // scale in the f32 attribute `act_scale` ("int8_sym_tensor").  The static
  // scale is an attribute, not an operand, because IRDL gives one op only one
  // optional operand without operandSegmentSizes (weight_zero has it).
  irdl.operation @qlinear {
    %input = irdl.base "!builtin.tensor"
    %weight = irdl.base "!builtin.tensor"
    %wscale = irdl.base "!builtin.tensor"
    %wzero = irdl.base "!builtin.tensor"
    %output = irdl.base "!builtin.tensor"
    %wfmt = irdl.base @qcc::@format
    %afmt = irdl.base @qcc::@format
    irdl.operands(input: %input, weight: %weight, weight_scale: %wscale, weight_zero: optional %wzero)
    irdl.results(output: %output)
    irdl.attributes { "weight_format" = %wfmt, "act_format" = %afmt }
  }

  // Dynamic activation quantization: per-row scale = max|x[m, :]| / qmax
  // (0 -> 1), codes = clip(rint(x / scale)); results: codes (i8), scale [M, 1].
  irdl.operation @quantize_dynamic {
    %input = irdl.base "!builtin.tensor"
    %codes = irdl.base "!builtin.tensor"
    %scale = irdl.base "!builtin.tensor"
    %fmt = irdl.base @qcc::@format
    irdl.operands(input: %input)
    irdl.results(codes: %codes, scale: %scale)
    irdl.attributes { "format" = %fmt }
  }

  // Integer GEMM with i32 accumulation: acc[M, N] = sum_k xq[m, k] * (wq[n, k] - wz),
  // xq: i8 activation codes, wq: packed weight codes (weight_format), wz: the
  // weight zero point of asymmetric formats (applied as the row-sum correction
  // sum_k xq*wq - wz * sum_k xq).  Group formats give per-group partial sums:
  // acc[M, N, K / G].
  irdl.operation @matmul_int {
    %lhs = irdl.base "!builtin.tensor"
    %rhs = irdl.base "!builtin.tensor"
    %rzero = irdl.base "!builtin.tensor"
    %acc = irdl.base "!builtin.tensor"
    %wfmt = irdl.base @qcc::@format
    %afmt = irdl.base @qcc::@format
    irdl.operands(lhs: %lhs, rhs: %rhs, rhs_zero: optional %rzero)
    irdl.results(acc: %acc)
    irdl.attributes { "weight_format" = %wfmt, "act_format" = %afmt }
  }

  // A mixture of experts' integer product: acc[t, n(, g)] = sum_k xq[t, k] * (codes[ids[t], n, k] - zero),
  // the experts' weights [E, N, K packed] as gather_dequantize takes them (zero [E, N, groups]
  // for asymmetric formats); per-group partial sums [T, N, K / G] for group formats.
  irdl.operation @gather_matmul_int {
    %lhs = irdl.base "!builtin.tensor"
    %ids = irdl.base "!builtin.tensor"
    %rhs = irdl.base "!builtin.tensor"
    %rzero = irdl.base "!builtin.tensor"
    %acc = irdl.base "!builtin.tensor"
    %wfmt = irdl.base @qcc::@format
    %afmt = irdl.base @qcc::@format
    irdl.operands(lhs: %lhs, ids: %ids, rhs: %rhs, rhs_zero: optional %rzero)
    irdl.results(acc: %acc)
    irdl.attributes { "weight_format" = %wfmt, "act_format" = %afmt }
  }

  // scale_accumulate with each token's expert's scales: y[t, n] = sum_g f32(acc[t, n, g])
  // * act_scale[t] * weight_scale[ids[t], n, g] (weight_scale [E, N, groups]).
  irdl.operation @gather_scale_accumulate {
    %acc = irdl.base "!builtin.tensor"
    %ascale = irdl.base "!builtin.tensor"
    %ids = irdl.base "!builtin.tensor"
    %wscale = irdl.base "!builtin.tensor"
    %output = irdl.base "!builtin.tensor"
    irdl.operands(acc: %acc, act_scale: %ascale, ids: %ids, weight_scale: %wscale)
    irdl.results(output: %output)
  }

  // The dequantization moved after the GEMM: y[m, n] = sum_g f32(acc[m, n, g])
  // * act_scale[m] * weight_scale[n, g] (acc rank 2: one term, g = 0).  Scales
  // broadcast over size-1 dims ([1, 1] per tensor, [M, 1] per token, [N, 1]
  // per channel).
  irdl.operation @scale_accumulate {
    %acc = irdl.base "!builtin.tensor"
    %ascale = irdl.base "!builtin.tensor"
    %wscale = irdl.base "!builtin.tensor"
    %output = irdl.base "!builtin.tensor"
    irdl.operands(acc: %acc, act_scale: %ascale, weight_scale: %wscale)
    irdl.results(output: %output)
  }
}
