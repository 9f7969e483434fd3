// RUN: qcc-opt %s --random-params=0 -p 'quantize-weights{format=int4_asym_g128},cpu-select-kernels{lanes=8}' | filecheck %s
// RUN: qcc-opt %s --random-params=0 -p 'quantize-weights{format=int8_sym_channel},cpu-select-kernels{lanes=16 threads=false}' | filecheck %s --check-prefix=INT8
// RUN: qcc-opt %s --random-params=0 -p 'quantize-weights{format=int4_asym_g32},cpu-select-kernels{lanes=16}' | filecheck %s --check-prefix=G32
// RUN: qcc-opt %s --random-params=0 -p 'quantize-weights{format=int4_asym_g128},cpu-select-kernels{lanes=16 bf16=true}' | filecheck %s --check-prefix=BF16
// RUN: qcc-opt %s --random-params=0 -p 'quantize-weights{format=int4_asym_g128},cpu-select-kernels{lanes=16}' | filecheck %s --check-prefix=MANY

// A weight-only qcc.qlinear becomes a call of a CPU kernel for its format and
// shape; the packed weight is repacked into panels of 4 rows x blocks of
// 8 * lanes columns under new parameter names, the format's own arrays leave
// the signature.  A static M (here 1) gets the one kernel for it (the GEMV); a
// symbolic M gets an entry that dispatches on M between the GEMV (tiles of a few rows,
// each code vector decoded once for them) and the GEMM.

// bf16=true: the entry rounds x to bf16 once (every variant reads that).  Below 32 rows
// the int4 GEMV takes x as bf16 pairs of chunks j and j + 4 (vector.interleave) and
// decodes two nibbles a lane into bf16 1 + q / 16 (shift, mask, or with 1.0) for
// vdpbf16ps; from 32 rows a GEMM takes x as bf16 pairs along k and multiplies with
// vdpbf16ps on q - z (exact in bf16), each block's sums scaled by its group's scales.
// BF16-LABEL: func.func private @qcc_cpu_qlinear_int4_asym_g128_256x64_v16_bf16_gemv(
// BF16: arith.truncf %{{.*}} : vector<16xf32> to vector<16xbf16>
// BF16: arith.extf %{{.*}} : vector<16xbf16> to vector<16xf32>
// BF16: vector.interleave %{{.*}}, %{{.*}} : vector<16xbf16> -> vector<32xbf16>
// BF16: call @qcc_cpu_qlinear_int4_asym_g128_256x64_v16_bf16_gemv__gemv(%{{.*}}) : (memref<?x128xi32>,
// BF16-LABEL: func.func private @qcc_cpu_qlinear_int4_asym_g128_256x64_v16_bf16_gemv__gemv_body(
// BF16: arith.shli %{{.*}}, %{{.*}} : vector<16xi32>
// BF16: arith.andi
// BF16: arith.ori
// BF16: func.call @llvm.x86.avx512bf16.dpbf16ps.512(%{{.*}}, %{{.*}}, %{{.*}}) : (vector<16xf32>, vector<32xbf16>, vector<32xbf16>) -> vector<16xf32>
// BF16-LABEL: func.func private @qcc_cpu_qlinear_int4_asym_g128_256x64_v16_bf16(
// BF16: arith.cmpi ult, %{{.*}}, %c32
// BF16: vector.interleave
// BF16: call @qcc_cpu_qlinear_int4_asym_g128_256x64_v16_bf16__gemv(
// BF16: } else {
// BF16: vector.bitcast %{{.*}} : vector<16xbf16> to vector<8xi32>
// BF16: call @qcc_cpu_qlinear_int4_asym_g128_256x64_v16_bf16__gemm_bf16(%{{.*}}) : (memref<?x128xi32>,
// BF16-LABEL: func.func private @qcc_cpu_qlinear_int4_asym_g128_256x64_v16_bf16__gemm_bf16_body(
// BF16: arith.subf
// BF16-NOT: arith.mulf
// BF16: arith.truncf %{{.*}} : vector<16xf32> to vector<16xbf16>
// BF16: vector.transpose %{{.*}}, [1, 0] : vector<4x8xi32> to vector<8x4xi32>
// BF16: func.call @llvm.x86.avx512bf16.dpbf16ps.512(%{{.*}}, %{{.*}}, %{{.*}}) : (vector<16xf32>, vector<32xbf16>, vector<32xbf16>) -> vector<16xf32>
// BF16: vector.fma

// CHECK-LABEL: func.func @decode
// CHECK-SAME: tensor<16x4x4x8xi32> {qcc.param = "fc.weight:int4_asym_g128:panels4x8:codes"}
// CHECK-SAME: tensor<16x2x4xf32> {qcc.param = "fc.weight:int4_asym_g128:panels4x8:scale"}
// CHECK-SAME: tensor<16x2x4xi8> {qcc.param = "fc.weight:int4_asym_g128:panels4x8:zero"}
// CHECK-NOT: qcc.param = "fc.weight:int4_asym_g128:codes"
// CHECK-NOT: qcc.qlinear
// CHECK: %[[XD:.*]] = tensor.cast %{{.*}} : tensor<1x256xf32> to tensor<?x256xf32>
// CHECK: %[[Y:.*]] = call @qcc_cpu_qlinear_int4_asym_g128_256x64_v8_gemv(%[[XD]], %{{.*}}, %{{.*}}, %{{.*}})
// CHECK: tensor.cast %[[Y]] : tensor<?x64xf32> to tensor<1x64xf32>
// CHECK-LABEL: func.func @tokens
// CHECK: call @qcc_cpu_qlinear_int4_asym_g128_256x64_v8(
// CHECK-LABEL: func.func private @qcc_cpu_qlinear_int4_asym_g128_256x64_v8_gemv(
// CHECK-NOT: scf.if
// CHECK: call @qcc_cpu_qlinear_int4_asym_g128_256x64_v8_gemv__gemv(
// CHECK-LABEL: func.func private @qcc_cpu_qlinear_int4_asym_g128_256x64_v8_gemv__gemv(
// CHECK: scf.parallel
// CHECK: call @qcc_cpu_qlinear_int4_asym_g128_256x64_v8_gemv__gemv_body({{.*}}) {no_inline}
// CHECK-LABEL: func.func private @qcc_cpu_qlinear_int4_asym_g128_256x64_v8_gemv__gemv_body(
// CHECK: vector.load %{{.*}} : memref<16x4x4x8xi32>, vector<8xi32>
// CHECK: arith.andi %{{.*}} : vector<8xi32>
// CHECK: arith.sitofp %{{.*}} : vector<8xi32> to vector<8xf32>
// CHECK: vector.fma
// CHECK-LABEL: func.func private @qcc_cpu_qlinear_int4_asym_g128_256x64_v8(
// CHECK: arith.cmpi ult, %{{.*}}, %c64
// CHECK: scf.if
// CHECK: call @qcc_cpu_qlinear_int4_asym_g128_256x64_v8__gemv(
// CHECK: } else {
// CHECK: call @qcc_cpu_qlinear_int4_asym_g128_256x64_v8__gemm_bcast(
// CHECK-LABEL: func.func private @qcc_cpu_qlinear_int4_asym_g128_256x64_v8__gemm_bcast_body(
// CHECK: memref.alloca() {alignment = 64 : i64} : memref<256x16xf32>
// CHECK: vector.transpose

// INT8-LABEL: func.func @decode
// INT8-SAME: tensor<16x2x4x128xi8> {qcc.param = "fc.weight:int8_sym_channel:panels4x16:codes"}
// INT8-SAME: tensor<16x1x4xf32> {qcc.param = "fc.weight:int8_sym_channel:panels4x16:scale"}
// INT8: call @qcc_cpu_qlinear_int8_sym_channel_256x64_v16_gemv(
// INT8-LABEL: func.func private @qcc_cpu_qlinear_int8_sym_channel_256x64_v16_gemv__gemv(
// INT8-NOT: scf.parallel
// INT8: scf.for
// INT8-LABEL: func.func private @qcc_cpu_qlinear_int8_sym_channel_256x64_v16_gemv__gemv_body(
// INT8: vector.load %{{.*}} : memref<16x2x4x128xi8>, vector<16xi8>
// INT8: arith.sitofp %{{.*}} : vector<16xi8> to vector<16xf32>

// Groups of 32 inside blocks of 128 columns: four groups flushed per block.
// G32-LABEL: func.func @decode
// G32-SAME: tensor<16x2x4x16xi32> {qcc.param = "fc.weight:int4_asym_g32:panels4x16:codes"}
// G32-SAME: tensor<16x8x4xf32> {qcc.param = "fc.weight:int4_asym_g32:panels4x16:scale"}
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

// Many rows (from dequant-gemm-min-m = 512), few output columns (up to 128): a convolution
// over its patches.  The weight is decoded to f32 once a call (qcc.dequantize, lowered later)
// and multiplied by the f32 GEMM (the linalg.matmul cpu-vectorize-contractions takes),
// which beats the panel GEMM's 32-column chunks there; the codes stay in the format's layout.
// MANY-LABEL: func.func @many_rows
// MANY-SAME: tensor<64x128xi8> {qcc.param = "conv.weight:int4_asym_g128:codes"}
// MANY: call @qcc_cpu_dequant_gemm_int4_asym_g128_1024x64x256(%{{.*}}) : (tensor<1024x256xf32>, tensor<64x128xi8>, tensor<64x2xf32>, tensor<64x2xi8>) -> tensor<1024x64xf32>
// MANY-LABEL: func.func private @qcc_cpu_dequant_gemm_int4_asym_g128_1024x64x256(
// MANY: "qcc.dequantize"(%{{.*}}, %{{.*}}, %{{.*}}) {format = #qcc.format<"int4_asym_g128">} : (tensor<64x128xi8>, tensor<64x2xf32>, tensor<64x2xi8>) -> tensor<64x256xf32>
// MANY: linalg.transpose
// MANY: linalg.matmul
func.func @many_rows(%w: !torch.vtensor<[64,256],f32> {qcc.param = "conv.weight"}, %x: !torch.vtensor<[1024,256],f32>) -> !torch.vtensor<[1024,64],f32> {
  %int0 = torch.constant.int 0
  %int1 = torch.constant.int 1
  %perm = torch.prim.ListConstruct %int1, %int0 : (!torch.int, !torch.int) -> !torch.list<int>
  %wt = torch.aten.permute %w, %perm : !torch.vtensor<[64,256],f32>, !torch.list<int> -> !torch.vtensor<[256,64],f32>
  %y = torch.aten.mm %x, %wt : !torch.vtensor<[1024,256],f32>, !torch.vtensor<[256,64],f32> -> !torch.vtensor<[1024,64],f32>
  return %y : !torch.vtensor<[1024,64],f32>
}
