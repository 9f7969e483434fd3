// RUN: qcc-opt %s -p 'quantize-activations{format=int8_sym_token}' | filecheck %s
// RUN: qcc-opt %s -p 'quantize-activations{format=int4_sym_token exclude=^head}' | filecheck %s --check-prefix=EXCL
// RUN: qcc-opt %s -p 'quantize-activations{format=int4_sym_token exclude=^fc},quantize-activations{format=int8_sym_token}' | filecheck %s --check-prefix=TWO
// RUN: %PYTHON -c "import numpy as np; from safetensors.numpy import save_file; a = np.ones(256, np.float32); a[5] = 12.7; save_file({'fc1.weight/absmax': a, 'head.weight/absmax': 2 * np.ones(256, np.float32)}, '%t.stats')"
// RUN: qcc-opt %s -p 'quantize-activations{format=int8_sym_tensor stats=%t.stats}' | filecheck %s --check-prefix=STATIC
// RUN: not qcc-opt %s -p 'quantize-activations{format=int8_sym_tensor}' 2>&1 | filecheck %s --check-prefix=NOCAL
// RUN: not qcc-opt %s -p 'quantize-activations{format=int8_asym_token}' 2>&1 | filecheck %s --check-prefix=BADFMT
// RUN: qcc-opt %s -p 'quantize-activations{format=int4_sym_token_clip0.9}' | filecheck %s --check-prefix=CLIP
// RUN: not qcc-opt %s -p 'quantize-activations{format=int4_sym_tensor_clip0.9}' 2>&1 | filecheck %s --check-prefix=BADCLIP

// quantize-activations only decides: it sets act_format on each qcc.qlinear
// whose activations are still float (dequant-after-gemm rewrites them).  Layers
// are named by their float weight; `exclude` keeps matching ones float, and a
// later instance leaves ops that an earlier one decided alone (per-layer overrides).

// Per-token scales that map 0.9 of each row's absmax to qmax (QuaRot's activation clipping).
// CLIP-LABEL: func.func @two_linears
// CLIP: act_format = #qcc.format<"int4_sym_token_clip0.9">
// BADCLIP: error: quantize-activations: a clip ratio applies to per-token scales; a per-tensor scale comes from calibration

// CHECK-LABEL: func.func @two_linears
// CHECK: "qcc.qlinear"(%arg0, %arg1, %arg2) {act_format = #qcc.format<"int8_sym_token">, weight_format = #qcc.format<"int8_sym_channel">}
// CHECK: "qcc.qlinear"(%{{.*}}, %arg3, %arg4, %arg5) {act_format = #qcc.format<"int8_sym_token">, weight_format = #qcc.format<"int4_asym_g128">}
// CHECK-NOT: act_scale

// EXCL-LABEL: func.func @two_linears
// EXCL: "qcc.qlinear"(%arg0, %arg1, %arg2) {act_format = #qcc.format<"int4_sym_token">
// EXCL: "qcc.qlinear"(%{{.*}}, %arg3, %arg4, %arg5) {act_format = #qcc.format<"none">

// TWO-LABEL: func.func @two_linears
// TWO: "qcc.qlinear"(%arg0, %arg1, %arg2) {act_format = #qcc.format<"int8_sym_token">
// TWO: "qcc.qlinear"(%{{.*}}, %arg3, %arg4, %arg5) {act_format = #qcc.format<"int4_sym_token">

// Static per-tensor scales: the calibrated absmax of the layer's input / qmax,
// in the f32 attribute act_scale (12.7 / 127 and 2 / 127).
// STATIC-LABEL: func.func @two_linears
// STATIC: "qcc.qlinear"(%arg0, %arg1, %arg2) {act_format = #qcc.format<"int8_sym_tensor">, act_scale = 1.000000e-01 : f32
// STATIC: "qcc.qlinear"(%{{.*}}, %arg3, %arg4, %arg5) {act_format = #qcc.format<"int8_sym_tensor">, act_scale = 0.0157480314 : f32

// Without calibration data (or a statistics file) there is no static scale.
// NOCAL: error: quantize-activations: static activation scales need calibration: this pass needs calibration data
// NOCAL-SAME: calibration=[inputs, ...]
// BADFMT: error: quantize-activations: unknown activation format 'int8_asym_token': expected int{4,8}_sym_{token,tensor}, int{4,8}_sym_token_clip<r> (0 < r < 1) or none
func.func @two_linears(%x: tensor<4x256xf32>,
                       %w1: tensor<256x256xi8> {qcc.param = "fc1.weight:int8_sym_channel:codes"},
                       %s1: tensor<256x1xf32> {qcc.param = "fc1.weight:int8_sym_channel:scale"},
                       %w2: tensor<64x128xi8> {qcc.param = "head.weight:int4_asym_g128:codes"},
                       %s2: tensor<64x2xf32> {qcc.param = "head.weight:int4_asym_g128:scale"},
                       %z2: tensor<64x2xi8> {qcc.param = "head.weight:int4_asym_g128:zero"}) -> tensor<4x64xf32> {
  %h = "qcc.qlinear"(%x, %w1, %s1) {act_format = #qcc.format<"none">, weight_format = #qcc.format<"int8_sym_channel">} : (tensor<4x256xf32>, tensor<256x256xi8>, tensor<256x1xf32>) -> tensor<4x256xf32>
  %y = "qcc.qlinear"(%h, %w2, %s2, %z2) {act_format = #qcc.format<"none">, weight_format = #qcc.format<"int4_asym_g128">} : (tensor<4x256xf32>, tensor<64x128xi8>, tensor<64x2xf32>, tensor<64x2xi8>) -> tensor<4x64xf32>
  return %y : tensor<4x64xf32>
}
