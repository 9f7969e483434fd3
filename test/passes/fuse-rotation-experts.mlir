// RUN: qcc-opt %s --random-params=0 -p 'fuse-rotation{online=none}' 2>&1 | filecheck %s
// RUN: qcc-opt %s --random-params=0 -p 'fuse-rotation' 2>&1 | filecheck %s --check-prefix=ONLINE

// A mixture of experts as the frontend gives it: each token's chosen experts' weights
// gathered from [E, N, K] parameters (W[ids]), one matrix-vector product per (token, expert),
// rows masked, scaled by the routing weights and summed over the chosen experts before the
// residual add. Row gathers, row masks, per-row factors and sums over rows commute with Q,
// so the up experts read the stream (their columns take the norm's scale and Q) and the down
// experts write it (rows Q^T W_e); the graph keeps its shape, the norm's product is gone.

// CHECK: qcc-opt: remark: fuse-rotation: rotated a 8-channel residual stream (random Hadamard): 1 embedding(s), 1 readers, 0 writers, 1 reading and 1 writing experts' weights, 2 norm scales absorbed
// CHECK-LABEL: func.func @main
// CHECK-NOT: qcc.param = "norm1.weight"
// CHECK: %[[N:.*]] = torch.aten.mul.Tensor %{{.*}}, %{{.*}} : !torch.vtensor<[4,8],f32>, !torch.vtensor<[4,1],f32>
// CHECK-NOT: torch.aten.mul.Tensor %[[N]]
// CHECK: %[[XR:.*]] = torch.aten.index.Tensor_hacked_twin %[[N]]
// CHECK: torch.aten.unsqueeze %[[XR]]
// CHECK: torch.aten.bmm
// CHECK: torch.aten.sum.dim_IntList %{{.*}} : !torch.vtensor<[4,2,8],f32>

// The down experts' rows (silu's output, as a dense down projection's input) take the online
// Hadamard butterfly before they become columns; each W_e takes H in its columns.
// ONLINE: remark: fuse-rotation: rotated a 8-channel residual stream {{.*}} 1 online Hadamard transform(s)
// ONLINE: %[[A:.*]] = torch.aten.silu
// ONLINE: %[[AB:.*]] = torch_c.to_builtin_tensor %[[A]]
// ONLINE: call @qcc_hadamard_16(
// ONLINE: %[[AH:.*]] = torch_c.from_builtin_tensor
// ONLINE: %[[AU:.*]] = torch.aten.unsqueeze %[[AH]], %int-1
// ONLINE: torch.aten.bmm %{{.*}}, %[[AU]]

func.func @main(%emb: !torch.vtensor<[32,8],f32> {qcc.param = "emb.weight"}, %g1: !torch.vtensor<[8],f32> {qcc.param = "norm1.weight"},
                %wup: !torch.vtensor<[3,16,8],f32> {qcc.param = "experts.up"}, %wdown: !torch.vtensor<[3,8,16],f32> {qcc.param = "experts.down"},
                %g2: !torch.vtensor<[8],f32> {qcc.param = "norm2.weight"}, %head: !torch.vtensor<[32,8],f32> {qcc.param = "head.weight"},
                %ids: !torch.vtensor<[4],si64>, %tok: !torch.vtensor<[8],si64>, %eid: !torch.vtensor<[8],si64>,
                %route: !torch.vtensor<[8,1],f32>, %keep: !torch.vtensor<[8,1],i1>) -> !torch.vtensor<[4,32],f32> {
  %int-1 = torch.constant.int -1
  %int0 = torch.constant.int 0
  %int1 = torch.constant.int 1
  %int2 = torch.constant.int 2
  %int4 = torch.constant.int 4
  %int8 = torch.constant.int 8
  %eps = torch.constant.float 1.000000e-05
  %true = torch.constant.bool true
  %false = torch.constant.bool false
  %none = torch.constant.none
  %zero = torch.vtensor.literal(dense<0.000000e+00> : tensor<f32>) : !torch.vtensor<[],f32>
  %last = torch.prim.ListConstruct %int-1 : (!torch.int) -> !torch.list<int>
  %t = torch.prim.ListConstruct %int1, %int0 : (!torch.int, !torch.int) -> !torch.list<int>
  %x = torch.aten.embedding %emb, %ids, %int-1, %false, %false : !torch.vtensor<[32,8],f32>, !torch.vtensor<[4],si64>, !torch.int, !torch.bool, !torch.bool -> !torch.vtensor<[4,8],f32>
  %sq = torch.aten.pow.Tensor_Scalar %x, %int2 : !torch.vtensor<[4,8],f32>, !torch.int -> !torch.vtensor<[4,8],f32>
  %ss = torch.aten.sum.dim_IntList %sq, %last, %true, %none : !torch.vtensor<[4,8],f32>, !torch.list<int>, !torch.bool, !torch.none -> !torch.vtensor<[4,1],f32>
  %ms = torch.aten.div.Scalar %ss, %int8 : !torch.vtensor<[4,1],f32>, !torch.int -> !torch.vtensor<[4,1],f32>
  %me = torch.aten.add.Scalar %ms, %eps, %int1 : !torch.vtensor<[4,1],f32>, !torch.float, !torch.int -> !torch.vtensor<[4,1],f32>
  %r = torch.aten.rsqrt %me : !torch.vtensor<[4,1],f32> -> !torch.vtensor<[4,1],f32>
  %n = torch.aten.mul.Tensor %x, %r : !torch.vtensor<[4,8],f32>, !torch.vtensor<[4,1],f32> -> !torch.vtensor<[4,8],f32>
  %n1 = torch.aten.mul.Tensor %n, %g1 : !torch.vtensor<[4,8],f32>, !torch.vtensor<[8],f32> -> !torch.vtensor<[4,8],f32>
  %tl = torch.prim.ListConstruct %tok : (!torch.vtensor<[8],si64>) -> !torch.list<vtensor>
  %xr = torch.aten.index.Tensor_hacked_twin %n1, %tl : !torch.vtensor<[4,8],f32>, !torch.list<vtensor> -> !torch.vtensor<[8,8],f32>
  %el = torch.prim.ListConstruct %eid : (!torch.vtensor<[8],si64>) -> !torch.list<vtensor>
  %wu = torch.aten.index.Tensor_hacked_twin %wup, %el : !torch.vtensor<[3,16,8],f32>, !torch.list<vtensor> -> !torch.vtensor<[8,16,8],f32>
  %xu = torch.aten.unsqueeze %xr, %int-1 : !torch.vtensor<[8,8],f32>, !torch.int -> !torch.vtensor<[8,8,1],f32>
  %hu = torch.aten.bmm %wu, %xu : !torch.vtensor<[8,16,8],f32>, !torch.vtensor<[8,8,1],f32> -> !torch.vtensor<[8,16,1],f32>
  %h = torch.aten.squeeze.dim %hu, %int2 : !torch.vtensor<[8,16,1],f32>, !torch.int -> !torch.vtensor<[8,16],f32>
  %a = torch.aten.silu %h : !torch.vtensor<[8,16],f32> -> !torch.vtensor<[8,16],f32>
  %wd = torch.aten.index.Tensor_hacked_twin %wdown, %el : !torch.vtensor<[3,8,16],f32>, !torch.list<vtensor> -> !torch.vtensor<[8,8,16],f32>
  %au = torch.aten.unsqueeze %a, %int-1 : !torch.vtensor<[8,16],f32>, !torch.int -> !torch.vtensor<[8,16,1],f32>
  %du = torch.aten.bmm %wd, %au : !torch.vtensor<[8,8,16],f32>, !torch.vtensor<[8,16,1],f32> -> !torch.vtensor<[8,8,1],f32>
  %d = torch.aten.squeeze.dim %du, %int2 : !torch.vtensor<[8,8,1],f32>, !torch.int -> !torch.vtensor<[8,8],f32>
  %dm = torch.aten.where.self %keep, %d, %zero : !torch.vtensor<[8,1],i1>, !torch.vtensor<[8,8],f32>, !torch.vtensor<[],f32> -> !torch.vtensor<[8,8],f32>
  %dw = torch.aten.mul.Tensor %dm, %route : !torch.vtensor<[8,8],f32>, !torch.vtensor<[8,1],f32> -> !torch.vtensor<[8,8],f32>
  %shape = torch.prim.ListConstruct %int4, %int2, %int8 : (!torch.int, !torch.int, !torch.int) -> !torch.list<int>
  %dv = torch.aten.view %dw, %shape : !torch.vtensor<[8,8],f32>, !torch.list<int> -> !torch.vtensor<[4,2,8],f32>
  %one = torch.prim.ListConstruct %int1 : (!torch.int) -> !torch.list<int>
  %moe = torch.aten.sum.dim_IntList %dv, %one, %false, %none : !torch.vtensor<[4,2,8],f32>, !torch.list<int>, !torch.bool, !torch.none -> !torch.vtensor<[4,8],f32>
  %x2 = torch.aten.add.Tensor %x, %moe, %int1 : !torch.vtensor<[4,8],f32>, !torch.vtensor<[4,8],f32>, !torch.int -> !torch.vtensor<[4,8],f32>
  %sq2 = torch.aten.pow.Tensor_Scalar %x2, %int2 : !torch.vtensor<[4,8],f32>, !torch.int -> !torch.vtensor<[4,8],f32>
  %ss2 = torch.aten.sum.dim_IntList %sq2, %last, %true, %none : !torch.vtensor<[4,8],f32>, !torch.list<int>, !torch.bool, !torch.none -> !torch.vtensor<[4,1],f32>
  %ms2 = torch.aten.div.Scalar %ss2, %int8 : !torch.vtensor<[4,1],f32>, !torch.int -> !torch.vtensor<[4,1],f32>
  %me2 = torch.aten.add.Scalar %ms2, %eps, %int1 : !torch.vtensor<[4,1],f32>, !torch.float, !torch.int -> !torch.vtensor<[4,1],f32>
  %r2 = torch.aten.rsqrt %me2 : !torch.vtensor<[4,1],f32> -> !torch.vtensor<[4,1],f32>
  %nn = torch.aten.mul.Tensor %x2, %r2 : !torch.vtensor<[4,8],f32>, !torch.vtensor<[4,1],f32> -> !torch.vtensor<[4,8],f32>
  %n2 = torch.aten.mul.Tensor %g2, %nn : !torch.vtensor<[8],f32>, !torch.vtensor<[4,8],f32> -> !torch.vtensor<[4,8],f32>
  %headt = torch.aten.permute %head, %t : !torch.vtensor<[32,8],f32>, !torch.list<int> -> !torch.vtensor<[8,32],f32>
  %logits = torch.aten.mm %n2, %headt : !torch.vtensor<[4,8],f32>, !torch.vtensor<[8,32],f32> -> !torch.vtensor<[4,32],f32>
  return %logits : !torch.vtensor<[4,32],f32>
}
