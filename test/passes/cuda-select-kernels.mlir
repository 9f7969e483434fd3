// RUN: qcc-opt %s --random-params=0 -p 'quantize-weights{format=int8_sym_channel},quantize-activations,dequant-after-gemm,cse,cuda-select-kernels' | filecheck %s
// RUN: qcc-opt %s --random-params=0 -p 'quantize-weights{format=int4_sym_channel},quantize-activations{format=int4_sym_token_clip0.9},dequant-after-gemm,cse,cuda-select-kernels' | filecheck %s --check-prefix=INT4
// RUN: qcc-opt %s --random-params=0 -p 'quantize-weights{format=int4_asym_g128},quantize-activations,dequant-after-gemm,cse,cuda-select-kernels' | filecheck %s --check-prefix=GROUP
// RUN: qcc-opt %s --random-params=0 -p 'split-outliers{decide=dynamic},quantize-weights{format=int8_sym_channel},quantize-activations,dequant-after-gemm,cse,cuda-select-kernels' | filecheck %s --check-prefix=DYN

// A quantized-activation linear becomes two kernel calls on the codes as stored (no
// repacked copy): quantize_rows (x -> int8 codes + per-token scales) and gemv_i8, whose
// epilogue applies scale_accumulate's (acc * sx) * sw.  Two linears reading one x share
// one quantization (after cse, as TORCH_TO_LINALG leaves them) and one gemv_i8 launch
// (members=(64, 64)), each on its own codes and scales.

// CHECK-LABEL: func.func @two_linears
// CHECK-SAME: tensor<64x256xi8> {qcc.param = "fc.weight:int8_sym_channel:codes"}
// CHECK-NOT: cuda_w8
// CHECK: %[[Q:.*]]:2 = call @qcc_cuda_quantize_rows_k256_m4_q127_M4(%{{.*}}) : (tensor<4x256xf32>) -> (tensor<4x256xi8>, tensor<4x1xf32>)
// CHECK-NOT: quantize_rows
// CHECK: call @qcc_cuda_gemv_i8_k256_n64_64_m4_r2w4u1_sr_M4(%[[Q]]#0, %[[W1:arg[0-9]+]], %[[W2:arg[0-9]+]], %[[Q]]#1, %{{.*}}, %{{.*}}) : (tensor<4x256xi8>, tensor<64x256xi8>, tensor<64x256xi8>, tensor<4x1xf32>, tensor<64x1xf32>, tensor<64x1xf32>) -> (tensor<4x64xf32>, tensor<4x64xf32>)
// CHECK-NOT: gemv_i8
// CHECK-NOT: qcc.matmul_int
// CHECK-NOT: qcc.scale_accumulate
// CHECK: func.func private @qcc_cuda_quantize_rows_k256_m4_q127_M4(tensor<4x256xf32> {bufferization.access = "read"}) -> (tensor<4x256xi8>, tensor<4x1xf32>) attributes {qcc.cuda_kernel =

// Symmetric int4 weights: the same kernel on the packed nibbles (w_bits=4), clipped int4 codes.
// INT4-LABEL: func.func @two_linears
// INT4: call @qcc_cuda_quantize_rows_k256_m4_q7_c0p9_M4(
// INT4: call @qcc_cuda_gemv_i4_k256_n64_64_m4_r2w4u1_sr_M4(%{{.*}}#0, %{{.*}}, %{{.*}}, %{{.*}}#1, %{{.*}}, %{{.*}}) : (tensor<4x256xi8>, tensor<64x128xi8>, tensor<64x128xi8>, tensor<4x1xf32>, tensor<64x1xf32>, tensor<64x1xf32>) -> (tensor<4x64xf32>, tensor<4x64xf32>)

// Grouped asymmetric int4: gemv_i4g gives the exact per-group sums and scales and adds them
// in its epilogue (scale_accumulate's order); both layers in one launch.
// GROUP-LABEL: func.func @two_linears
// GROUP: call @qcc_cuda_gemv_i4g128_k256_n64_64_m4_r2w4_sr_M4(%{{.*}}#0, %{{.*}}, %{{.*}}, %{{.*}}, %{{.*}}, %{{.*}}#1, %{{.*}}, %{{.*}}) : (tensor<4x256xi8>, tensor<64x128xi8>, tensor<64x128xi8>, tensor<64x2xi8>, tensor<64x2xi8>, tensor<4x1xf32>, tensor<64x2xf32>, tensor<64x2xf32>) -> (tensor<4x64xf32>, tensor<4x64xf32>)
// GROUP-NOT: qcc.scale_accumulate

// llm-int8-dynamic: the float outlier part reads the integer part's codes (gemv_w8_sparse_x).
// DYN-LABEL: func.func @two_linears
// DYN: call @qcc_cuda_gemv_i8_k256_n64_m4_r2w4u1_sr_M4(%{{.*}}#0, %[[W:arg[0-9]+]],
// DYN: call @qcc_cuda_gemv_w8_sparse_x_k256_n64_m4_r2w8_M4(%{{.*}}, %[[W]], %{{.*}}) : (tensor<4x256xf32>, tensor<64x256xi8>, tensor<64x1xf32>) -> tensor<4x64xf32>
// DYN-NOT: cuda_w8
func.func @two_linears(%w: !torch.vtensor<[64,256],f32> {qcc.param = "fc.weight"}, %w2: !torch.vtensor<[64,256],f32> {qcc.param = "fc2.weight"}, %x: !torch.vtensor<[4,256],f32>) -> (!torch.vtensor<[4,64],f32>, !torch.vtensor<[4,64],f32>) {
  %int0 = torch.constant.int 0
  %int1 = torch.constant.int 1
  %perm = torch.prim.ListConstruct %int1, %int0 : (!torch.int, !torch.int) -> !torch.list<int>
  %wt = torch.aten.permute %w, %perm : !torch.vtensor<[64,256],f32>, !torch.list<int> -> !torch.vtensor<[256,64],f32>
  %y = torch.aten.mm %x, %wt : !torch.vtensor<[4,256],f32>, !torch.vtensor<[256,64],f32> -> !torch.vtensor<[4,64],f32>
  %wt2 = torch.aten.permute %w2, %perm : !torch.vtensor<[64,256],f32>, !torch.list<int> -> !torch.vtensor<[256,64],f32>
  %y2 = torch.aten.mm %x, %wt2 : !torch.vtensor<[4,256],f32>, !torch.vtensor<[256,64],f32> -> !torch.vtensor<[4,64],f32>
  return %y, %y2 : !torch.vtensor<[4,64],f32>, !torch.vtensor<[4,64],f32>
}
