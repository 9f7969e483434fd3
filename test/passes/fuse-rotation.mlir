// RUN: qcc-opt %s --random-params=0 -p fuse-rotation | filecheck %s
// RUN: qcc-opt %s --random-params=0 -p 'fuse-rotation{online=none rotation=hadamard}' | filecheck %s --check-prefix=NOONLINE
// RUN: not qcc-opt %s --random-params=0 -p 'fuse-rotation{rotation=%S/no-such-rotation.npy}' 2>&1 | filecheck %s --check-prefix=BADFILE

// The residual stream (embedding -> adds) is found through the RMSNorm pattern:
// norm scales are absorbed into the readers (their mul disappears), the
// embedding, readers and writers keep their parameters with rotated values, and
// the MLP down projection reads its input through an online Hadamard kernel.

// CHECK-LABEL: func.func @main
// CHECK-NOT: qcc.param = "norm1.weight"
// CHECK: %[[X:.*]] = torch.aten.embedding
// CHECK: %[[R:.*]] = torch.aten.rsqrt
// CHECK: %[[N:.*]] = torch.aten.mul.Tensor %[[X]], %[[R]]
// CHECK-NOT: torch.aten.mul.Tensor
// CHECK: torch.aten.mm %[[N]],
// CHECK: %[[A:.*]] = torch.aten.silu
// CHECK: %[[AB:.*]] = torch_c.to_builtin_tensor %[[A]]
// CHECK: %[[AD:.*]] = tensor.cast %[[AB]] : tensor<4x16xf32> to tensor<?x16xf32>
// CHECK: %[[HD:.*]] = call @qcc_hadamard_16(%[[AD]])
// CHECK: %[[HB:.*]] = tensor.cast %[[HD]]
// CHECK: %[[H:.*]] = torch_c.from_builtin_tensor %[[HB]]
// CHECK: torch.aten.mm %[[H]],

// NOONLINE-LABEL: func.func @main
// NOONLINE-NOT: qcc_hadamard
// NOONLINE-LABEL: func.func @block

// BADFILE: fuse-rotation: rotation of the 8-channel residual stream: rotation file '{{.*}}no-such-rotation.npy' does not exist

func.func @main(%emb: !torch.vtensor<[32,8],f32> {qcc.param = "emb.weight"}, %g1: !torch.vtensor<[8],f32> {qcc.param = "norm1.weight"},
                %wup: !torch.vtensor<[16,8],f32> {qcc.param = "up.weight"}, %wdown: !torch.vtensor<[8,16],f32> {qcc.param = "down.weight"},
                %g2: !torch.vtensor<[8],f32> {qcc.param = "norm2.weight"}, %head: !torch.vtensor<[32,8],f32> {qcc.param = "head.weight"},
                %ids: !torch.vtensor<[4],si64>) -> !torch.vtensor<[4,32],f32> {
  %int-1 = torch.constant.int -1
  %int0 = torch.constant.int 0
  %int1 = torch.constant.int 1
  %int2 = torch.constant.int 2
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
  %n1 = torch.aten.mul.Tensor %g1, %n : !torch.vtensor<[8],f32>, !torch.vtensor<[4,8],f32> -> !torch.vtensor<[4,8],f32>
  %wupt = torch.aten.permute %wup, %t : !torch.vtensor<[16,8],f32>, !torch.list<int> -> !torch.vtensor<[8,16],f32>
  %h = torch.aten.mm %n1, %wupt : !torch.vtensor<[4,8],f32>, !torch.vtensor<[8,16],f32> -> !torch.vtensor<[4,16],f32>
  %a = torch.aten.silu %h : !torch.vtensor<[4,16],f32> -> !torch.vtensor<[4,16],f32>
  %wdownt = torch.aten.permute %wdown, %t : !torch.vtensor<[8,16],f32>, !torch.list<int> -> !torch.vtensor<[16,8],f32>
  %d = torch.aten.mm %a, %wdownt : !torch.vtensor<[4,16],f32>, !torch.vtensor<[16,8],f32> -> !torch.vtensor<[4,8],f32>
  %x2 = torch.aten.add.Tensor %x, %d, %int1 : !torch.vtensor<[4,8],f32>, !torch.vtensor<[4,8],f32>, !torch.int -> !torch.vtensor<[4,8],f32>
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

// A block whose residual stream is a function argument cannot be rotated by
// folding alone: it is left as it was (with a remark).
// CHECK-LABEL: func.func @block
// CHECK-SAME: {qcc.param = "block.norm.weight"}
// CHECK: torch.aten.mul.Tensor %{{.*}}, %{{.*}} : !torch.vtensor<[8],f32>, !torch.vtensor<[4,8],f32>
// CHECK-NOT: call

// Gemma's forms: the embedding times a 0-d scale (it commutes with the rotation and stays),
// the norm's scale 1 + g (absorbed into the reader like g: the add and the mul go).
// CHECK-LABEL: func.func @gemma
// CHECK-NOT: qcc.param = "gemma.norm.weight"
// CHECK: %[[E:.*]] = torch.aten.embedding
// CHECK: %[[X:.*]] = torch.aten.mul.Tensor %[[E]], %{{.*}} : !torch.vtensor<[4,8],f32>, !torch.vtensor<[],f32>
// CHECK: %[[N:.*]] = torch.aten.mul.Tensor %[[X]], %{{.*}} : !torch.vtensor<[4,8],f32>, !torch.vtensor<[4,1],f32>
// CHECK-NOT: torch.aten.add.Scalar %{{.*}} : !torch.vtensor<[8],f32>
// CHECK-NOT: torch.aten.mul.Tensor
// CHECK: torch.aten.mm %[[N]],

// The online transform is an O(n log n) butterfly: a loop of add/sub stages.
// CHECK-LABEL: func.func private @qcc_hadamard_16(%{{.*}}: tensor<?x16xf32>) -> tensor<?x16xf32>
// CHECK: scf.for
// CHECK: linalg.add
// CHECK: linalg.sub
func.func @block(%g: !torch.vtensor<[8],f32> {qcc.param = "block.norm.weight"}, %w: !torch.vtensor<[8,8],f32> {qcc.param = "block.fc.weight"},
                 %x: !torch.vtensor<[4,8],f32>) -> !torch.vtensor<[4,8],f32> {
  %int-1 = torch.constant.int -1
  %int0 = torch.constant.int 0
  %int1 = torch.constant.int 1
  %int2 = torch.constant.int 2
  %int8 = torch.constant.int 8
  %eps = torch.constant.float 1.000000e-05
  %true = torch.constant.bool true
  %none = torch.constant.none
  %last = torch.prim.ListConstruct %int-1 : (!torch.int) -> !torch.list<int>
  %t = torch.prim.ListConstruct %int1, %int0 : (!torch.int, !torch.int) -> !torch.list<int>
  %sq = torch.aten.pow.Tensor_Scalar %x, %int2 : !torch.vtensor<[4,8],f32>, !torch.int -> !torch.vtensor<[4,8],f32>
  %ss = torch.aten.sum.dim_IntList %sq, %last, %true, %none : !torch.vtensor<[4,8],f32>, !torch.list<int>, !torch.bool, !torch.none -> !torch.vtensor<[4,1],f32>
  %ms = torch.aten.div.Scalar %ss, %int8 : !torch.vtensor<[4,1],f32>, !torch.int -> !torch.vtensor<[4,1],f32>
  %me = torch.aten.add.Scalar %ms, %eps, %int1 : !torch.vtensor<[4,1],f32>, !torch.float, !torch.int -> !torch.vtensor<[4,1],f32>
  %r = torch.aten.rsqrt %me : !torch.vtensor<[4,1],f32> -> !torch.vtensor<[4,1],f32>
  %n = torch.aten.mul.Tensor %x, %r : !torch.vtensor<[4,8],f32>, !torch.vtensor<[4,1],f32> -> !torch.vtensor<[4,8],f32>
  %n1 = torch.aten.mul.Tensor %g, %n : !torch.vtensor<[8],f32>, !torch.vtensor<[4,8],f32> -> !torch.vtensor<[4,8],f32>
  %wt = torch.aten.permute %w, %t : !torch.vtensor<[8,8],f32>, !torch.list<int> -> !torch.vtensor<[8,8],f32>
  %y = torch.aten.mm %n1, %wt : !torch.vtensor<[4,8],f32>, !torch.vtensor<[8,8],f32> -> !torch.vtensor<[4,8],f32>
  %o = torch.aten.add.Tensor %x, %y, %int1 : !torch.vtensor<[4,8],f32>, !torch.vtensor<[4,8],f32>, !torch.int -> !torch.vtensor<[4,8],f32>
  return %o : !torch.vtensor<[4,8],f32>
}

func.func @gemma(%emb: !torch.vtensor<[32,8],f32> {qcc.param = "gemma.emb.weight"}, %scale: !torch.vtensor<[],f32> {qcc.param = "gemma.embed_scale"},
                 %g: !torch.vtensor<[8],f32> {qcc.param = "gemma.norm.weight"}, %w: !torch.vtensor<[16,8],f32> {qcc.param = "gemma.fc.weight"},
                 %ids: !torch.vtensor<[4],si64>) -> !torch.vtensor<[4,16],f32> {
  %int-1 = torch.constant.int -1
  %int0 = torch.constant.int 0
  %int1 = torch.constant.int 1
  %int2 = torch.constant.int 2
  %int8 = torch.constant.int 8
  %eps = torch.constant.float 1.000000e-05
  %one = torch.constant.float 1.000000e+00
  %true = torch.constant.bool true
  %false = torch.constant.bool false
  %none = torch.constant.none
  %last = torch.prim.ListConstruct %int-1 : (!torch.int) -> !torch.list<int>
  %t = torch.prim.ListConstruct %int1, %int0 : (!torch.int, !torch.int) -> !torch.list<int>
  %e = torch.aten.embedding %emb, %ids, %int-1, %false, %false : !torch.vtensor<[32,8],f32>, !torch.vtensor<[4],si64>, !torch.int, !torch.bool, !torch.bool -> !torch.vtensor<[4,8],f32>
  %x = torch.aten.mul.Tensor %e, %scale : !torch.vtensor<[4,8],f32>, !torch.vtensor<[],f32> -> !torch.vtensor<[4,8],f32>
  %sq = torch.aten.pow.Tensor_Scalar %x, %int2 : !torch.vtensor<[4,8],f32>, !torch.int -> !torch.vtensor<[4,8],f32>
  %ss = torch.aten.sum.dim_IntList %sq, %last, %true, %none : !torch.vtensor<[4,8],f32>, !torch.list<int>, !torch.bool, !torch.none -> !torch.vtensor<[4,1],f32>
  %ms = torch.aten.div.Scalar %ss, %int8 : !torch.vtensor<[4,1],f32>, !torch.int -> !torch.vtensor<[4,1],f32>
  %me = torch.aten.add.Scalar %ms, %eps, %int1 : !torch.vtensor<[4,1],f32>, !torch.float, !torch.int -> !torch.vtensor<[4,1],f32>
  %r = torch.aten.rsqrt %me : !torch.vtensor<[4,1],f32> -> !torch.vtensor<[4,1],f32>
  %n = torch.aten.mul.Tensor %x, %r : !torch.vtensor<[4,8],f32>, !torch.vtensor<[4,1],f32> -> !torch.vtensor<[4,8],f32>
  %g1 = torch.aten.add.Scalar %g, %one, %int1 : !torch.vtensor<[8],f32>, !torch.float, !torch.int -> !torch.vtensor<[8],f32>
  %n1 = torch.aten.mul.Tensor %n, %g1 : !torch.vtensor<[4,8],f32>, !torch.vtensor<[8],f32> -> !torch.vtensor<[4,8],f32>
  %wt = torch.aten.permute %w, %t : !torch.vtensor<[16,8],f32>, !torch.list<int> -> !torch.vtensor<[8,16],f32>
  %y = torch.aten.mm %n1, %wt : !torch.vtensor<[4,8],f32>, !torch.vtensor<[8,16],f32> -> !torch.vtensor<[4,16],f32>
  return %y : !torch.vtensor<[4,16],f32>
}
