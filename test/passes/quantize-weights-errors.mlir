// RUN: not qcc-opt %s --random-params=0 -p 'quantize-weights{format=int4_asym_g128}' 2>&1 | filecheck %s
// RUN: not qcc-opt %s --random-params=0 -p 'quantize-weights{format=int3_sym_channel}' 2>&1 | filecheck %s --check-prefix=BADFMT
// RUN: not qcc-opt %s -p 'quantize-weights{bits=4}' 2>&1 | filecheck %s --check-prefix=BADOPT

// K = 96 is not a multiple of the group size: a clear error at the layer.
// CHECK: quantize-weights: cannot quantize 'fc.weight' [8x96] as int4_asym_g128
// CHECK-SAME: K=96 is not divisible by group size G=128
// CHECK-SAME: a recipe file ("overrides": [{"pattern": "fc", "weight_format": "int8_sym_channel"}])
// BADFMT: quantize-weights: unknown weight format 'int3_sym_channel': expected int{4,8}_{sym,asym}_{tensor,channel,g<G>}
// BADOPT: unknown option 'bits=4' for pass quantize-weights (options: format, exclude, clip-search)
func.func @linear(%w: !torch.vtensor<[8,96],f32> {qcc.param = "fc.weight"}, %x: !torch.vtensor<[2,96],f32>) -> !torch.vtensor<[2,8],f32> {
  %int0 = torch.constant.int 0
  %int1 = torch.constant.int 1
  %perm = torch.prim.ListConstruct %int1, %int0 : (!torch.int, !torch.int) -> !torch.list<int>
  %wt = torch.aten.permute %w, %perm : !torch.vtensor<[8,96],f32>, !torch.list<int> -> !torch.vtensor<[96,8],f32>
  %y = torch.aten.mm %x, %wt : !torch.vtensor<[2,96],f32>, !torch.vtensor<[96,8],f32> -> !torch.vtensor<[2,8],f32>
  return %y : !torch.vtensor<[2,8],f32>
}
