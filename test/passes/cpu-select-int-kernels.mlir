// RUN: qcc-opt %s --random-params=0 -p 'quantize-weights{format=int4_asym_g128},quantize-activations,dequant-after-gemm,cpu-select-int-kernels' | filecheck %s
// RUN: qcc-opt %s --random-params=0 -p 'quantize-weights{format=int8_sym_channel},quantize-activations,dequant-after-gemm,cpu-select-int-kernels{threads=false}' | filecheck %s --check-prefix=INT8
// RUN: qcc-opt %s --random-params=0 -p 'quantize-weights{format=int8_asym_channel},quantize-activations,dequant-after-gemm,cpu-select-int-kernels' | filecheck %s --check-prefix=ASYM8
// RUN: qcc-opt %s --random-params=0 -p 'split-outliers{decide=dynamic},quantize-weights{format=int8_sym_channel},quantize-activations,dequant-after-gemm,cpu-select-int-kernels' | filecheck %s --check-prefix=DYN
// RUN: qcc-opt %s --random-params=0 -p 'quantize-weights{format=int8_sym_channel},quantize-activations,dequant-after-gemm,cpu-select-int-kernels{dot=vnni}' | filecheck %s --check-prefix=VNNI
// RUN: qcc-opt %s --random-params=0 -p 'quantize-weights{format=int4_asym_g128},quantize-activations,dequant-after-gemm,cpu-select-int-kernels{dot=vnni}' | filecheck %s --check-prefix=VNNI4
// RUN: qcc-opt %s --random-params=0 -p 'quantize-weights{format=int8_asym_channel},quantize-activations,dequant-after-gemm,cpu-select-int-kernels{dot=vnni}' | filecheck %s --check-prefix=VNNIASYM
// RUN: qcc-opt %s --random-params=0 -p 'split-outliers{decide=dynamic},quantize-weights{format=int8_sym_channel},quantize-activations,dequant-after-gemm,cpu-select-int-kernels{dot=vnni}' | filecheck %s --check-prefix=VNNIDYN
// RUN: %PYTHON -c "import numpy as np; from safetensors.numpy import save_file; a = np.ones(256, np.float32); a[5] = 12.7; save_file({'fc.weight/absmax': a, 'fc2.weight/absmax': a}, '%t.stats')"
// RUN: qcc-opt %s --random-params=0 -p 'quantize-weights{format=int8_sym_channel},quantize-activations{format=int8_sym_tensor stats=%t.stats},dequant-after-gemm,cpu-select-int-kernels' --output-params=%t.params | filecheck %s --check-prefix=STATIC
// RUN: %PYTHON -c "from safetensors.numpy import load_file; print('act_scale:', load_file('%t.params')['fc.weight:int8_sym_channel:int8x8x4:act_scale'].tolist())" | filecheck %s --check-prefix=STATICVAL

// quantize_dynamic -> matmul_int -> scale_accumulate on parameter weights becomes
// one call of a fused kernel that takes the float activations; the weight is
// repacked into blocks of 8 columns x 4 k (int4: two quads a byte vector) under
// new parameter names, with per-block scales (and zero points for int4).  A
// static M (1) gets the GEMV alone; a symbolic M an entry dispatching on M.

// CHECK-LABEL: func.func @decode
// CHECK-SAME: tensor<8x32x32xi8> {qcc.param = "fc.weight:int4_asym_g128:int4x8x4:codes"}
// CHECK-SAME: tensor<8x2x8xf32> {qcc.param = "fc.weight:int4_asym_g128:int4x8x4:scale"}
// CHECK-SAME: tensor<8x2x8xi8> {qcc.param = "fc.weight:int4_asym_g128:int4x8x4:zero"}
// CHECK-NOT: qcc.param = "fc.weight:int4_asym_g128:codes"
// CHECK-NOT: qcc.
// CHECK: %[[XD:.*]] = tensor.cast %{{.*}} : tensor<1x256xf32> to tensor<?x256xf32>
// CHECK: %[[Y:.*]] = call @qcc_cpu_int_int4_asym_g128_int8_sym_token_256x64_gemv(%[[XD]], %{{.*}}, %{{.*}}, %{{.*}})
// CHECK: tensor.cast %[[Y]] : tensor<?x64xf32> to tensor<1x64xf32>
// CHECK-LABEL: func.func @tokens
// CHECK-NOT: qcc.quantize_dynamic
// CHECK: call @qcc_cpu_int_int4_asym_g128_int8_sym_token_256x64(
// CHECK-DAG: func.func private @llvm.x86.avx2.pmadd.ub.sw(vector<32xi8>, vector<32xi8>) -> vector<16xi16>
// CHECK-DAG: func.func private @llvm.x86.avx2.pmadd.wd(vector<16xi16>, vector<16xi16>) -> vector<8xi32>
// CHECK-LABEL: func.func private @qcc_cpu_int_int4_asym_g128_int8_sym_token_256x64_gemv(
// CHECK-NOT: scf.if
// CHECK: call @qcc_cpu_int_int4_asym_g128_int8_sym_token_256x64_gemv__quantize(%{{.*}}, %{{.*}}, %{{.*}}, %{{.*}}, %{{.*}}, %{{.*}})
// CHECK: call @qcc_cpu_int_int4_asym_g128_int8_sym_token_256x64_gemv__gemv(
// The activations are quantized in the kernel (M = 1: on the calling thread, no scf.parallel):
// i8 codes four to a word, group sums.
// CHECK-LABEL: func.func private @qcc_cpu_int_int4_asym_g128_int8_sym_token_256x64_gemv__quantize(
// CHECK: math.roundeven %{{.*}} : vector<8xf32>
// CHECK: vector.bitcast %{{.*}} : vector<8xi8> to vector<2xi32>
// CHECK: memref.store %{{.*}}, %{{.*}} : memref<?x2xi32>
// CHECK-LABEL: func.func private @qcc_cpu_int_int4_asym_g128_int8_sym_token_256x64_gemv__gemv(
// CHECK: scf.parallel
// CHECK-LABEL: func.func private @qcc_cpu_int_int4_asym_g128_int8_sym_token_256x64_gemv__gemv_body(
// Nibbles as the u8 operand, i16 sums, one widening to i32 per 32 k, the zero
// point as z * (group sum of x), scaled per group in f32.
// CHECK: arith.andi %{{.*}} : vector<32xi8>
// CHECK: arith.shrui %{{.*}} : vector<32xi8>
// CHECK: func.call @llvm.x86.avx2.pmadd.ub.sw(
// CHECK: arith.addi %{{.*}} : vector<16xi16>
// CHECK: func.call @llvm.x86.avx2.pmadd.wd(
// CHECK: arith.extui %{{.*}} : vector<8xi8> to vector<8xi32>
// CHECK: arith.muli %{{.*}} : vector<8xi32>
// CHECK: arith.subi %{{.*}} : vector<8xi32>
// CHECK: arith.sitofp %{{.*}} : vector<8xi32> to vector<8xf32>
// CHECK: vector.transfer_write
// CHECK-LABEL: func.func private @qcc_cpu_int_int4_asym_g128_int8_sym_token_256x64(
// From 16 rows the quantizer runs over chunks of 8 rows on all threads.
// CHECK: %[[FEW:.*]] = arith.cmpi ult, %{{.*}}, %c16
// CHECK: scf.if %[[FEW]]
// CHECK: call @qcc_cpu_int_int4_asym_g128_int8_sym_token_256x64__quantize(
// CHECK: scf.parallel
// CHECK: call @qcc_cpu_int_int4_asym_g128_int8_sym_token_256x64__quantize({{.*}}) {no_inline}
// CHECK: scf.if
// CHECK: call @qcc_cpu_int_int4_asym_g128_int8_sym_token_256x64__gemv(
// CHECK: } else {
// CHECK: call @qcc_cpu_int_int4_asym_g128_int8_sym_token_256x64__gemm(

// INT8-LABEL: func.func @decode
// INT8-SAME: tensor<8x64x32xi8> {qcc.param = "fc.weight:int8_sym_channel:int8x8x4:codes"}
// INT8-SAME: tensor<8x1x8xf32> {qcc.param = "fc.weight:int8_sym_channel:int8x8x4:scale"}
// INT8: call @qcc_cpu_int_int8_sym_channel_int8_sym_token_256x64_gemv(
// Against int8 weights the activation codes are stored as i16 pairs.
// INT8-LABEL: func.func private @qcc_cpu_int_int8_sym_channel_int8_sym_token_256x64_gemv(
// INT8: vector.bitcast %{{.*}} : vector<8xi16> to vector<4xi32>
// INT8-LABEL: func.func private @qcc_cpu_int_int8_sym_channel_int8_sym_token_256x64_gemv__gemv(
// INT8-NOT: scf.parallel
// INT8: scf.for
// INT8-LABEL: func.func private @qcc_cpu_int_int8_sym_channel_int8_sym_token_256x64_gemv__gemv_body(
// INT8: vector.extract_strided_slice %{{.*}} {offsets = [16], sizes = [16], strides = [1]} : vector<32xi8> to vector<16xi8>
// INT8: arith.extsi %{{.*}} : vector<16xi8> to vector<16xi16>
// INT8: func.call @llvm.x86.avx2.pmadd.wd(
// INT8-NOT: pmadd.ub.sw(

// A static per-tensor scale (calibrated absmax 12.7 / 127) rides into the kernel as a
// parameter, so layers of one shape share the kernel; every row takes it, no absmax pass.
// STATIC-LABEL: func.func @decode
// STATIC-SAME: tensor<1xf32> {qcc.param = "fc.weight:int8_sym_channel:int8x8x4:act_scale"}
// STATIC-NOT: qcc.quantize
// STATIC: call @qcc_cpu_int_int8_sym_channel_int8_sym_tensor_256x64_gemv(%{{.*}}, %{{.*}}, %{{.*}}, %{{.*}})
// STATIC-LABEL: func.func private @qcc_cpu_int_int8_sym_channel_int8_sym_tensor_256x64_gemv(
// STATIC-SAME: %arg3: tensor<1xf32>) -> tensor<?x64xf32>
// STATIC: memref.load %{{.*}}[%{{.*}}] : memref<1xf32>
// STATIC-NOT: math.absf
// STATIC: math.roundeven
// STATICVAL: act_scale: [0.10000000149011612]

// split-outliers' dynamic float part (float input, the same int8 weight) reads the int8
// blocks of its integer part: a rank-k update over the columns the call made outliers,
// gathered from the block's quad vectors; no second packed copy of the weight.
// DYN-LABEL: func.func @decode
// DYN-SAME: %[[C:[^:]*]]: tensor<8x64x32xi8> {qcc.param = "fc.weight:int8_sym_channel:int8x8x4:codes"}
// DYN-SAME: %[[S:[^:]*]]: tensor<8x1x8xf32> {qcc.param = "fc.weight:int8_sym_channel:int8x8x4:scale"})
// DYN: call @qcc_cpu_int_int8_sym_channel_int8_sym_token_256x64_gemv(%{{.*}}, %[[C]], %[[S]])
// DYN: call @qcc_cpu_int_outliers_int8_sym_channel_256x64(%{{.*}}, %[[C]], %[[S]])
// DYN-LABEL: func.func private @qcc_cpu_int_outliers_int8_sym_channel_256x64(
// DYN: arith.cmpf one
// DYN: vector.from_elements {{.*}} : vector<8xi8>
// DYN: vector.fma

// dot=vnni (hosts with VNNI): int8 codes stored unsigned (code + 128) four k to an i32 lane
// with a zero point, activations as i8 quads with their sums, and one vpdpbusd per quad
// straight into i32; the correction 128 * sum x after the loop.
// VNNI-LABEL: func.func @decode
// VNNI-SAME: tensor<8x64x32xi8> {qcc.param = "fc.weight:int8_sym_channel:int8x8x4vnni:codes"}
// VNNI-SAME: tensor<8x1x8xf32> {qcc.param = "fc.weight:int8_sym_channel:int8x8x4vnni:scale"}
// VNNI-SAME: tensor<8x1x8xi8> {qcc.param = "fc.weight:int8_sym_channel:int8x8x4vnni:zero"}
// VNNI-DAG: func.func private @llvm.x86.avx512.vpdpbusd.256(vector<8xi32>, vector<32xi8>, vector<32xi8>) -> vector<8xi32>
// VNNI-LABEL: func.func private @qcc_cpu_int_int8_sym_channel_int8_sym_token_256x64_gemv(
// VNNI: vector.bitcast %{{.*}} : vector<8xi8> to vector<2xi32>
// VNNI-LABEL: func.func private @qcc_cpu_int_int8_sym_channel_int8_sym_token_256x64_gemv__gemv_body(
// VNNI-NOT: pmadd
// VNNI: %[[W:.*]] = vector.load %{{.*}} : memref<8x64x32xi8>, vector<32xi8>
// VNNI: func.call @llvm.x86.avx512.vpdpbusd.256(%{{.*}}, %[[W]], %{{.*}})
// VNNI: arith.extui %{{.*}} : vector<8xi8> to vector<8xi32>
// VNNI: arith.muli %{{.*}} : vector<8xi32>
// VNNI: arith.subi %{{.*}} : vector<8xi32>
// VNNI-NOT: pmadd

// int4 on vnni: the same nibbles, each quad's products straight into i32 (no i16 sums).
// VNNI4-LABEL: func.func private @qcc_cpu_int_int4_asym_g128_int8_sym_token_256x64_gemv__gemv_body(
// VNNI4: arith.andi %{{.*}} : vector<32xi8>
// VNNI4: arith.shrui %{{.*}} : vector<32xi8>
// VNNI4: func.call @llvm.x86.avx512.vpdpbusd.256(
// VNNI4-NOT: vector<16xi16>
// VNNI4: arith.subi %{{.*}} : vector<8xi32>

// Unsigned int8 codes are vnni's own form: the asymmetric int8 weight gets a kernel.
// VNNIASYM: call @qcc_cpu_int_int8_asym_channel_int8_sym_token_256x64_gemv(
// VNNIASYM-NOT: qcc.matmul_int

// The outlier part reads the unsigned blocks with stride 4 and subtracts their zero points.
// VNNIDYN: call @qcc_cpu_int_outliers_int8_sym_channel_256x64(%{{.*}}, %{{.*}}, %{{.*}}, %{{.*}})
// VNNIDYN-LABEL: func.func private @qcc_cpu_int_outliers_int8_sym_channel_256x64(
// VNNIDYN: vector.from_elements {{.*}} : vector<8xi8>
// VNNIDYN: arith.extui %{{.*}} : vector<8xi8> to vector<8xi32>
// VNNIDYN: arith.subi %{{.*}} : vector<8xi32>
// VNNIDYN: vector.fma

// Unsigned int8 codes (up to 255) would saturate vpmaddubsw: left to the reference lowering.
// ASYM8-LABEL: func.func @decode
// ASYM8: qcc.quantize_dynamic
// ASYM8: qcc.matmul_int
// ASYM8: qcc.scale_accumulate
// ASYM8-NOT: qcc_cpu_int
func.func @decode(%w: !torch.vtensor<[64,256],f32> {qcc.param = "fc.weight"}, %x: !torch.vtensor<[1,256],f32>) -> !torch.vtensor<[1,64],f32> {
  %int0 = torch.constant.int 0
  %int1 = torch.constant.int 1
  %perm = torch.prim.ListConstruct %int1, %int0 : (!torch.int, !torch.int) -> !torch.list<int>
  %wt = torch.aten.permute %w, %perm : !torch.vtensor<[64,256],f32>, !torch.list<int> -> !torch.vtensor<[256,64],f32>
  %y = torch.aten.mm %x, %wt : !torch.vtensor<[1,256],f32>, !torch.vtensor<[256,64],f32> -> !torch.vtensor<[1,64],f32>
  return %y : !torch.vtensor<[1,64],f32>
}

func.func @tokens(%w: !torch.vtensor<[64,256],f32> {qcc.param = "fc2.weight"}, %x: !torch.vtensor<[?,256],f32>) -> !torch.vtensor<[?,64],f32> {
  %int0 = torch.constant.int 0
  %int1 = torch.constant.int 1
  %perm = torch.prim.ListConstruct %int1, %int0 : (!torch.int, !torch.int) -> !torch.list<int>
  %wt = torch.aten.permute %w, %perm : !torch.vtensor<[64,256],f32>, !torch.list<int> -> !torch.vtensor<[256,64],f32>
  %y = torch.aten.mm %x, %wt : !torch.vtensor<[?,256],f32>, !torch.vtensor<[256,64],f32> -> !torch.vtensor<[?,64],f32>
  return %y : !torch.vtensor<[?,64],f32>
}
