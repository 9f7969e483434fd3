// RUN: qcc-opt %s --random-params=0 -p 'quantize-weights{format=int8_sym_channel},quantize-activations{format=int8_sym_token},dequant-after-gemm' 2>&1 | filecheck %s
// RUN: qcc-opt %s --random-params=0 -p 'quantize-weights{format=int4_asym_g128},quantize-activations{format=int8_sym_token},dequant-after-gemm' 2>&1 | filecheck %s --check-prefix=GROUP
// RUN: qcc-opt %s --random-params=0 -p 'quantize-weights{format=int4_asym_g128},quantize-activations{format=int8_sym_token},dequant-after-gemm,lower-qcc-to-linalg' 2>&1 | filecheck %s --check-prefix=LOWER

// A mixture of experts' product with quantized rows (bmm of the gathered, decoded weights and
// the decoded rows: quantize-activations' fake quantization) becomes an integer product with
// each row's expert: qcc.gather_matmul_int (i8 codes of the rows and of the experts' weights,
// i32 sums) and qcc.gather_scale_accumulate (the rows' scales times the row's expert's
// scales, once per sum).  Neither the decoded rows nor the decoded weights are left.

// CHECK-LABEL: func.func @experts
// CHECK: %[[IDS:.*]] = torch_c.to_builtin_tensor %arg1 : !torch.vtensor<[6],si64> -> tensor<6xi64>
// CHECK: %[[Q:.*]]:2 = "qcc.quantize_dynamic"(%{{.*}}) {format = #qcc.format<"int8_sym_token">} : (tensor<6x256xf32>) -> (tensor<6x256xi8>, tensor<6x1xf32>)
// CHECK: %[[ACC:.*]] = "qcc.gather_matmul_int"(%[[Q]]#0, %[[IDS]], %arg2) {act_format = #qcc.format<"int8_sym_token">, weight_format = #qcc.format<"int8_sym_channel">} : (tensor<6x256xi8>, tensor<6xi64>, tensor<4x96x256xi8>) -> tensor<6x96xi32>
// CHECK: %[[Y:.*]] = "qcc.gather_scale_accumulate"(%[[ACC]], %[[Q]]#1, %[[IDS]], %arg3) : (tensor<6x96xi32>, tensor<6x1xf32>, tensor<6xi64>, tensor<4x96x1xf32>) -> tensor<6x96xf32>
// CHECK: %[[YV:.*]] = torch_c.from_builtin_tensor %[[Y]]
// CHECK: %[[Y3:.*]] = torch.aten.unsqueeze %[[YV]], %{{.*}} -> !torch.vtensor<[6,96,1],f32>
// CHECK: return %[[Y3]]
// CHECK-NOT: qcc.gather_dequantize
// CHECK-NOT: torch.aten.bmm

// Grouped asymmetric int4 weights: per-group sums [T, N, K / G], the zero points gathered too.
// GROUP: "qcc.gather_matmul_int"(%{{.*}}#0, %{{.*}}, %arg2, %arg4) {act_format = #qcc.format<"int8_sym_token">, weight_format = #qcc.format<"int4_asym_g128">} : (tensor<6x256xi8>, tensor<6xi64>, tensor<4x96x128xi8>, tensor<4x96x2xi8>) -> tensor<6x96x2xi32>
// GROUP: "qcc.gather_scale_accumulate"(%{{.*}}, %{{.*}}#1, %{{.*}}, %arg3) : (tensor<6x96x2xi32>, tensor<6x1xf32>, tensor<6xi64>, tensor<4x96x2xf32>) -> tensor<6x96xf32>

// The reference lowering stays integer through the product: each row's expert's nibble, minus
// its zero point, times the row's i8 code, summed in i32; floats only in the scaling.
// LOWER-LABEL: func.func private @qcc_gather_matmul_int_int4_asym_g128_4x96x128
// LOWER: linalg.generic
// LOWER-SAME: iterator_types = ["parallel", "parallel", "parallel", "reduction"]
// LOWER-SAME: ins(%{{.*}}, %{{.*}} : tensor<?x2x128xi8>, tensor<?xi64>) outs(%{{.*}} : tensor<?x96x2xi32>)
// LOWER: tensor.extract %{{.*}} : tensor<4x96x128xi8>
// LOWER: tensor.extract %{{.*}} : tensor<4x96x2xi8>
// LOWER: arith.andi
// LOWER: arith.extui %{{.*}} : i8 to i32
// LOWER: arith.subi
// LOWER: arith.extsi %{{.*}} : i8 to i32
// LOWER-NEXT: arith.muli %{{.*}}, %{{.*}} : i32
// LOWER-NEXT: arith.addi %{{.*}}, %{{.*}} : i32
// LOWER-LABEL: func.func private @qcc_gather_scale_accumulate_96x2_row_4x96x2
// LOWER: tensor.extract %{{.*}} : tensor<4x96x2xf32>
// LOWER: arith.sitofp %{{.*}} : i32 to f32

func.func @experts(%w: !torch.vtensor<[4,96,256],f32> {qcc.param = "experts.w"}, %x: !torch.vtensor<[6,256,1],f32>,
                   %ids: !torch.vtensor<[6],si64>) -> !torch.vtensor<[6,96,1],f32> {
  %list = torch.prim.ListConstruct %ids : (!torch.vtensor<[6],si64>) -> !torch.list<vtensor>
  %g = torch.aten.index.Tensor_hacked_twin %w, %list : !torch.vtensor<[4,96,256],f32>, !torch.list<vtensor> -> !torch.vtensor<[6,96,256],f32>
  %y = torch.aten.bmm %g, %x : !torch.vtensor<[6,96,256],f32>, !torch.vtensor<[6,256,1],f32> -> !torch.vtensor<[6,96,1],f32>
  return %y : !torch.vtensor<[6,96,1],f32>
}
