// RUN: qcc-opt %s --random-params=0 -p 'fuse-rotation{online=none}' 2>&1 | filecheck %s

// Two more forms of a mixture of experts, as the frontend gives transformers' Llama 4 and gpt-oss.
//
// @repeated (Llama 4): every expert reads every token: the normalized stream repeated once per
// expert (unsqueeze(0), broadcast_to, view), each row scaled by its router score, turned into a
// column by unsqueeze(1) + permute(0, 2, 1); each expert's product [T, N, 1] goes back to a row
// by permute(0, 2, 1) before the sum over experts. Repeating, permuting leading dims and moving a
// size-1 dim all commute with x Q, so the experts read (W_e diag(g) Q) and write (Q^T W_e) the
// stream. The L2 norm of the attention's q (read by no weight) is no stream's: no remark.
//
// @expert_bias (gpt-oss): each chosen expert's output bias, b[e] from a [E, hidden] table, is
// added to the stream: the table's rows rotate, b_e Q.

// CHECK-NOT: left unrotated
// CHECK: qcc-opt: remark: fuse-rotation: rotated a 8-channel residual stream (random Hadamard): 1 embedding(s), 1 readers, 0 writers, 1 reading and 1 writing experts' weights, 2 norm scales absorbed
// CHECK-NOT: left unrotated
// CHECK: qcc-opt: remark: fuse-rotation: rotated a 8-channel residual stream (random Hadamard): 1 embedding(s), 1 readers, 0 writers, 1 reading and 1 writing experts' weights, 2 norm scales absorbed
// CHECK-NOT: left unrotated
// CHECK-LABEL: func.func @repeated
// CHECK-NOT: qcc.param = "r.norm1.weight"
// CHECK: %[[N:.*]] = torch.aten.mul.Tensor %{{.*}}, %{{.*}} : !torch.vtensor<[4,8],f32>, !torch.vtensor<[4,1],f32>
// CHECK-NOT: torch.aten.mul.Tensor %[[N]]
// CHECK: torch.aten.unsqueeze %[[N]], %int0
// CHECK: torch.aten.permute %{{.*}} : !torch.vtensor<[12,1,8],f32>, !torch.list<int> -> !torch.vtensor<[12,8,1],f32>
// CHECK-LABEL: func.func @expert_bias
// CHECK: torch.aten.index.Tensor_hacked_twin %{{.*}} : !torch.vtensor<[3,8],f32>

func.func @repeated(%emb: !torch.vtensor<[32,8],f32> {qcc.param = "r.emb.weight"}, %g1: !torch.vtensor<[8],f32> {qcc.param = "r.norm1.weight"},
                    %wup: !torch.vtensor<[3,16,8],f32> {qcc.param = "r.experts.up"}, %wdown: !torch.vtensor<[3,8,16],f32> {qcc.param = "r.experts.down"},
                    %g2: !torch.vtensor<[8],f32> {qcc.param = "r.norm2.weight"}, %head: !torch.vtensor<[32,8],f32> {qcc.param = "r.head.weight"},
                    %ids: !torch.vtensor<[4],si64>, %eid: !torch.vtensor<[12],si64>, %score: !torch.vtensor<[12,1],f32>,
                    %q: !torch.vtensor<[4,2,4],f32>) -> (!torch.vtensor<[4,32],f32>, !torch.vtensor<[4,2,4],f32>) {
  %int-1 = torch.constant.int -1
  %int0 = torch.constant.int 0
  %int1 = torch.constant.int 1
  %int2 = torch.constant.int 2
  %int3 = torch.constant.int 3
  %int4 = torch.constant.int 4
  %int8 = torch.constant.int 8
  %int12 = torch.constant.int 12
  %eps = torch.constant.float 1.000000e-05
  %true = torch.constant.bool true
  %false = torch.constant.bool false
  %none = torch.constant.none
  %last = torch.prim.ListConstruct %int-1 : (!torch.int) -> !torch.list<int>
  %t = torch.prim.ListConstruct %int1, %int0 : (!torch.int, !torch.int) -> !torch.list<int>
  %swap = torch.prim.ListConstruct %int0, %int2, %int1 : (!torch.int, !torch.int, !torch.int) -> !torch.list<int>
  %x = torch.aten.embedding %emb, %ids, %int-1, %false, %false : !torch.vtensor<[32,8],f32>, !torch.vtensor<[4],si64>, !torch.int, !torch.bool, !torch.bool -> !torch.vtensor<[4,8],f32>
  %sq = torch.aten.pow.Tensor_Scalar %x, %int2 : !torch.vtensor<[4,8],f32>, !torch.int -> !torch.vtensor<[4,8],f32>
  %ss = torch.aten.sum.dim_IntList %sq, %last, %true, %none : !torch.vtensor<[4,8],f32>, !torch.list<int>, !torch.bool, !torch.none -> !torch.vtensor<[4,1],f32>
  %ms = torch.aten.div.Scalar %ss, %int8 : !torch.vtensor<[4,1],f32>, !torch.int -> !torch.vtensor<[4,1],f32>
  %me = torch.aten.add.Scalar %ms, %eps, %int1 : !torch.vtensor<[4,1],f32>, !torch.float, !torch.int -> !torch.vtensor<[4,1],f32>
  %r = torch.aten.rsqrt %me : !torch.vtensor<[4,1],f32> -> !torch.vtensor<[4,1],f32>
  %n = torch.aten.mul.Tensor %x, %r : !torch.vtensor<[4,8],f32>, !torch.vtensor<[4,1],f32> -> !torch.vtensor<[4,8],f32>
  %n1 = torch.aten.mul.Tensor %n, %g1 : !torch.vtensor<[4,8],f32>, !torch.vtensor<[8],f32> -> !torch.vtensor<[4,8],f32>
  %n1u = torch.aten.unsqueeze %n1, %int0 : !torch.vtensor<[4,8],f32>, !torch.int -> !torch.vtensor<[1,4,8],f32>
  %bshape = torch.prim.ListConstruct %int3, %int4, %int8 : (!torch.int, !torch.int, !torch.int) -> !torch.list<int>
  %rep = torch.aten.broadcast_to %n1u, %bshape : !torch.vtensor<[1,4,8],f32>, !torch.list<int> -> !torch.vtensor<[3,4,8],f32>
  %rows = torch.prim.ListConstruct %int12, %int8 : (!torch.int, !torch.int) -> !torch.list<int>
  %xr = torch.aten.view %rep, %rows : !torch.vtensor<[3,4,8],f32>, !torch.list<int> -> !torch.vtensor<[12,8],f32>
  %xs = torch.aten.mul.Tensor %xr, %score : !torch.vtensor<[12,8],f32>, !torch.vtensor<[12,1],f32> -> !torch.vtensor<[12,8],f32>
  %el = torch.prim.ListConstruct %eid : (!torch.vtensor<[12],si64>) -> !torch.list<vtensor>
  %wu = torch.aten.index.Tensor_hacked_twin %wup, %el : !torch.vtensor<[3,16,8],f32>, !torch.list<vtensor> -> !torch.vtensor<[12,16,8],f32>
  %xs1 = torch.aten.unsqueeze %xs, %int1 : !torch.vtensor<[12,8],f32>, !torch.int -> !torch.vtensor<[12,1,8],f32>
  %xc = torch.aten.permute %xs1, %swap : !torch.vtensor<[12,1,8],f32>, !torch.list<int> -> !torch.vtensor<[12,8,1],f32>
  %hu = torch.aten.bmm %wu, %xc : !torch.vtensor<[12,16,8],f32>, !torch.vtensor<[12,8,1],f32> -> !torch.vtensor<[12,16,1],f32>
  %h = torch.aten.squeeze.dim %hu, %int2 : !torch.vtensor<[12,16,1],f32>, !torch.int -> !torch.vtensor<[12,16],f32>
  %a = torch.aten.silu %h : !torch.vtensor<[12,16],f32> -> !torch.vtensor<[12,16],f32>
  %wd = torch.aten.index.Tensor_hacked_twin %wdown, %el : !torch.vtensor<[3,8,16],f32>, !torch.list<vtensor> -> !torch.vtensor<[12,8,16],f32>
  %au = torch.aten.unsqueeze %a, %int-1 : !torch.vtensor<[12,16],f32>, !torch.int -> !torch.vtensor<[12,16,1],f32>
  %du = torch.aten.bmm %wd, %au : !torch.vtensor<[12,8,16],f32>, !torch.vtensor<[12,16,1],f32> -> !torch.vtensor<[12,8,1],f32>
  %dr = torch.aten.permute %du, %swap : !torch.vtensor<[12,8,1],f32>, !torch.list<int> -> !torch.vtensor<[12,1,8],f32>
  %dv = torch.aten.view %dr, %bshape : !torch.vtensor<[12,1,8],f32>, !torch.list<int> -> !torch.vtensor<[3,4,8],f32>
  %zero = torch.prim.ListConstruct %int0 : (!torch.int) -> !torch.list<int>
  %moe = torch.aten.sum.dim_IntList %dv, %zero, %false, %none : !torch.vtensor<[3,4,8],f32>, !torch.list<int>, !torch.bool, !torch.none -> !torch.vtensor<[4,8],f32>
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
  // an L2 norm of attention's q: read by no weight
  %qsq = torch.aten.pow.Tensor_Scalar %q, %int2 : !torch.vtensor<[4,2,4],f32>, !torch.int -> !torch.vtensor<[4,2,4],f32>
  %qss = torch.aten.sum.dim_IntList %qsq, %last, %true, %none : !torch.vtensor<[4,2,4],f32>, !torch.list<int>, !torch.bool, !torch.none -> !torch.vtensor<[4,2,1],f32>
  %qr = torch.aten.rsqrt %qss : !torch.vtensor<[4,2,1],f32> -> !torch.vtensor<[4,2,1],f32>
  %qn = torch.aten.mul.Tensor %q, %qr : !torch.vtensor<[4,2,4],f32>, !torch.vtensor<[4,2,1],f32> -> !torch.vtensor<[4,2,4],f32>
  return %logits, %qn : !torch.vtensor<[4,32],f32>, !torch.vtensor<[4,2,4],f32>
}

func.func @expert_bias(%emb: !torch.vtensor<[32,8],f32> {qcc.param = "b.emb.weight"}, %g1: !torch.vtensor<[8],f32> {qcc.param = "b.norm1.weight"},
                       %wup: !torch.vtensor<[3,16,8],f32> {qcc.param = "b.experts.up"}, %wdown: !torch.vtensor<[3,8,16],f32> {qcc.param = "b.experts.down"},
                       %bdown: !torch.vtensor<[3,8],f32> {qcc.param = "b.experts.down_bias"},
                       %g2: !torch.vtensor<[8],f32> {qcc.param = "b.norm2.weight"}, %head: !torch.vtensor<[32,8],f32> {qcc.param = "b.head.weight"},
                       %ids: !torch.vtensor<[4],si64>, %tok: !torch.vtensor<[8],si64>, %eid: !torch.vtensor<[8],si64>,
                       %route: !torch.vtensor<[8,1],f32>) -> !torch.vtensor<[4,32],f32> {
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
  %be = torch.aten.index.Tensor_hacked_twin %bdown, %el : !torch.vtensor<[3,8],f32>, !torch.list<vtensor> -> !torch.vtensor<[8,8],f32>
  %db = torch.aten.add.Tensor %d, %be, %int1 : !torch.vtensor<[8,8],f32>, !torch.vtensor<[8,8],f32>, !torch.int -> !torch.vtensor<[8,8],f32>
  %dw = torch.aten.mul.Tensor %db, %route : !torch.vtensor<[8,8],f32>, !torch.vtensor<[8,1],f32> -> !torch.vtensor<[8,8],f32>
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
