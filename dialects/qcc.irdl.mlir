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

  // y[M, N] = x[M, K] @ dequant(w)[N, K]^T.  The weight arrives packed as the
  // weight format says; `act_format` is "none" for float activations.
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
}
