// RUN: qcc-opt %s --random-params=0 -p 'quantize-weights{format=int4_asym_g128},func.func(convert-torch-to-linalg),torch-func-backend-type-conversion,func.func(canonicalize),func.func(torch-finalizing-backend-type-conversion),cpu-select-expert-kernels{lanes=16}' | filecheck %s
// RUN: qcc-opt %s --random-params=0 -p 'quantize-weights{format=int8_sym_channel},func.func(convert-torch-to-linalg),torch-func-backend-type-conversion,func.func(canonicalize),func.func(torch-finalizing-backend-type-conversion),cpu-select-expert-kernels{lanes=8 threads=false}' | filecheck %s --check-prefix=INT8
// RUN: qcc-opt %s --random-params=0 -p 'func.func(convert-torch-to-linalg),torch-func-backend-type-conversion,func.func(canonicalize),func.func(torch-finalizing-backend-type-conversion),cpu-select-expert-kernels{lanes=16}' | filecheck %s --check-prefix=FLOAT

// A mixture of experts' gathered product (qcc.gather_dequantize, then a batched matmul of
// each token's expert weights [N, K] with its row [K, 1]) becomes one call of a CPU kernel:
// the experts' weights repacked into the weight-only GEMV's panels, experts one after another
// ([E * N / 4, ...]).  The kernel sorts the rows by expert (bounds %off) and lists the experts
// chosen (%active); each work item, a panel of one chosen expert, runs the GEMV's row tiles
// over that expert's rows on its panel where it is stored: neither the gathered float
// weights nor the batched matmul are left, and each chosen expert is read once.

// CHECK-LABEL: func.func @experts
// CHECK-SAME: tensor<96x2x4x16xi32> {qcc.param = "experts.w:int4_asym_g128:panels4x16:codes"}
// CHECK-SAME: tensor<96x2x4xf32> {qcc.param = "experts.w:int4_asym_g128:panels4x16:scale"}
// CHECK-SAME: tensor<96x2x4xi8> {qcc.param = "experts.w:int4_asym_g128:panels4x16:zero"}
// CHECK-NOT: qcc.param = "experts.w:int4_asym_g128:codes"
// CHECK-NOT: qcc.gather_dequantize
// CHECK-NOT: linalg.batch_matmul
// CHECK: %[[X:.*]] = tensor.cast %{{.*}} : tensor<6x256x1xf32> to tensor<?x256x1xf32>
// CHECK: %[[IDS:.*]] = tensor.cast %{{.*}} : tensor<6xi64> to tensor<?xi64>
// CHECK: %[[Y:.*]] = call @qcc_cpu_experts_int4_asym_g128_4x256x96_v16(%[[X]], %[[IDS]], %{{.*}}, %{{.*}}, %{{.*}}) : (tensor<?x256x1xf32>, tensor<?xi64>, tensor<96x2x4x16xi32>, tensor<96x2x4xf32>, tensor<96x2x4xi8>) -> tensor<?x96x1xf32>
// CHECK: tensor.cast %[[Y]] : tensor<?x96x1xf32> to tensor<6x96x1xf32>
// CHECK-LABEL: func.func private @qcc_cpu_experts_int4_asym_g128_4x256x96_v16(
// CHECK: arith.minui %{{.*}}, %c3{{.*}} : index
// CHECK: call @qcc_cpu_experts_int4_asym_g128_4x256x96_v16__gemv(%{{.*}}) : (memref<?x256xf32>, memref<?x2xf32>, memref<5xindex>, memref<5xindex>,
// CHECK-LABEL: func.func private @qcc_cpu_experts_int4_asym_g128_4x256x96_v16__gemv(
// CHECK: scf.parallel
// CHECK-LABEL: func.func private @qcc_cpu_experts_int4_asym_g128_4x256x96_v16__gemv_body(
// CHECK-SAME: %[[I:[^:]*]]: index, %{{[^:]*}}: memref<?x256xf32>, %{{[^:]*}}: memref<?x2xf32>, %[[OFF:[^:]*]]: memref<5xindex>, %[[ACT:[^:]*]]: memref<5xindex>,
// CHECK: %[[P:.*]] = arith.remui %[[I]], %c24 : index
// CHECK: %[[A:.*]] = arith.divui %[[I]], %c24 : index
// CHECK: %[[E:.*]] = memref.load %[[ACT]][%[[A]]] : memref<5xindex>
// CHECK: memref.load %[[OFF]][%[[E]]] : memref<5xindex>
// CHECK: %[[EP:.*]] = arith.muli %[[E]], %c24 : index
// CHECK: %[[WP:.*]] = arith.addi %[[EP]], %[[P]] : index
// CHECK: vector.load %{{.*}}[%[[WP]], %{{.*}}, %{{.*}}, %{{.*}}] : memref<96x2x4x16xi32>, vector<16xi32>
// CHECK: vector.fma

// INT8-LABEL: func.func @experts
// INT8-SAME: tensor<96x4x4x64xi8> {qcc.param = "experts.w:int8_sym_channel:panels4x8:codes"}
// INT8: call @qcc_cpu_experts_int8_sym_channel_4x256x96_v8(
// INT8-LABEL: func.func private @qcc_cpu_experts_int8_sym_channel_4x256x96_v8__gemv(
// INT8-NOT: scf.parallel
// INT8: scf.for
// The float form (no quantizer ran): torch-mlir's gather of W[ids] (a generic that wraps a
// negative id and extracts W[id, n, k]) and the batched matmul become the f32 gathered GEMV
// on W as it is stored.
// FLOAT-LABEL: func.func @experts
// FLOAT-SAME: tensor<4x96x256xf32> {qcc.param = "experts.w"}
// FLOAT-NOT: tensor.extract
// FLOAT-NOT: linalg.batch_matmul
// FLOAT: call @qcc_cpu_experts_f32_4x256x96_v16(%{{.*}}, %{{.*}}, %{{.*}}) : (tensor<?x256x1xf32>, tensor<?xi64>, tensor<4x96x256xf32>) -> tensor<?x96x1xf32>
// FLOAT-LABEL: func.func private @qcc_cpu_experts_f32_4x256x96_v16__gemv_body(
// FLOAT: arith.select
// FLOAT: vector.load %{{.*}} : memref<4x96x256xf32>, vector<16xf32>
// FLOAT: vector.fma
func.func @experts(%w: !torch.vtensor<[4,96,256],f32> {qcc.param = "experts.w"}, %x: !torch.vtensor<[6,256,1],f32>,
                   %ids: !torch.vtensor<[6],si64>) -> !torch.vtensor<[6,96,1],f32> {
  %list = torch.prim.ListConstruct %ids : (!torch.vtensor<[6],si64>) -> !torch.list<vtensor>
  %g = torch.aten.index.Tensor_hacked_twin %w, %list : !torch.vtensor<[4,96,256],f32>, !torch.list<vtensor> -> !torch.vtensor<[6,96,256],f32>
  %y = torch.aten.bmm %g, %x : !torch.vtensor<[6,96,256],f32>, !torch.vtensor<[6,256,1],f32> -> !torch.vtensor<[6,96,1],f32>
  return %y : !torch.vtensor<[6,96,1],f32>
}
