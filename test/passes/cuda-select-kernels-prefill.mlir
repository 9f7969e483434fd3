// RUN: qcc-opt %s --random-params=0 -p 'quantize-weights{format=int8_sym_channel},quantize-activations,dequant-after-gemm,cse,cuda-select-kernels' | filecheck %s
// RUN: qcc-opt %s --random-params=0 -p 'quantize-weights{format=int8_sym_channel},quantize-activations,dequant-after-gemm,cse,cuda-select-kernels{arch=sm_90a}' | filecheck %s --check-prefix=WG

// Prefill (32 rows of x, more than a GEMV launch takes): the two int8 linears reading one x
// run as one tensor-core GEMM on the codes as stored, with the same parameters and results
// as gemv_i8: gemm_i8 (mma.sync) by default, gemm_i8_wg (wgmma, 128-byte swizzled shared
// memory) for arch=sm_90a.

// CHECK-LABEL: func.func @prefill
// CHECK: %[[Q:.*]]:2 = call @qcc_cuda_quantize_rows_k256_m32_q127_M32(%{{.*}}) : (tensor<32x256xf32>) -> (tensor<32x256xi8>, tensor<32x1xf32>)
// CHECK: call @qcc_cuda_gemm_i8_k256_n128_128_m32_{{[a-z0-9_]+}}_sr_M32(%[[Q]]#0, %{{.*}}, %{{.*}}, %[[Q]]#1, %{{.*}}, %{{.*}}) : (tensor<32x256xi8>, tensor<128x256xi8>, tensor<128x256xi8>, tensor<32x1xf32>, tensor<128x1xf32>, tensor<128x1xf32>) -> (tensor<32x128xf32>, tensor<32x128xf32>)
// CHECK-NOT: gemm_i8_wg
// CHECK-NOT: qcc.matmul_int

// WG-LABEL: func.func @prefill
// WG: %[[Q:.*]]:2 = call @qcc_cuda_quantize_rows_k256_m32_q127_M32(
// WG: call @qcc_cuda_gemm_i8_wg_k256_n128_128_m32_r32w1x{{[0-9]+}}_sr_M32(%[[Q]]#0, %{{.*}}, %{{.*}}, %[[Q]]#1, %{{.*}}, %{{.*}}) : (tensor<32x256xi8>, tensor<128x256xi8>, tensor<128x256xi8>, tensor<32x1xf32>, tensor<128x1xf32>, tensor<128x1xf32>) -> (tensor<32x128xf32>, tensor<32x128xf32>)
// WG-NOT: qcc.matmul_int
// WG: func.func private @qcc_cuda_gemm_i8_wg_{{.*}}\22builder\22: \22gemm_i8_wg\22
func.func @prefill(%w: !torch.vtensor<[128,256],f32> {qcc.param = "fc.weight"}, %w2: !torch.vtensor<[128,256],f32> {qcc.param = "fc2.weight"}, %x: !torch.vtensor<[32,256],f32>) -> (!torch.vtensor<[32,128],f32>, !torch.vtensor<[32,128],f32>) {
  %int0 = torch.constant.int 0
  %int1 = torch.constant.int 1
  %perm = torch.prim.ListConstruct %int1, %int0 : (!torch.int, !torch.int) -> !torch.list<int>
  %wt = torch.aten.permute %w, %perm : !torch.vtensor<[128,256],f32>, !torch.list<int> -> !torch.vtensor<[256,128],f32>
  %y = torch.aten.mm %x, %wt : !torch.vtensor<[32,256],f32>, !torch.vtensor<[256,128],f32> -> !torch.vtensor<[32,128],f32>
  %wt2 = torch.aten.permute %w2, %perm : !torch.vtensor<[128,256],f32>, !torch.list<int> -> !torch.vtensor<[256,128],f32>
  %y2 = torch.aten.mm %x, %wt2 : !torch.vtensor<[32,256],f32>, !torch.vtensor<[256,128],f32> -> !torch.vtensor<[32,128],f32>
  return %y, %y2 : !torch.vtensor<[32,128],f32>, !torch.vtensor<[32,128],f32>
}
