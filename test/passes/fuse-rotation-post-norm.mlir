// RUN: qcc-opt %s --random-params=0 -p 'fuse-rotation{online=none}' | filecheck %s
// RUN: %PYTHON -c "import numpy, sys; q, _ = numpy.linalg.qr(numpy.random.default_rng(0).standard_normal((16, 16))); numpy.save(sys.argv[1], q)" %t.npy
// RUN: qcc-opt %s --random-params=0 -p 'fuse-rotation{online=none rotation=%t.npy}' 2>&1 | filecheck %s --check-prefix=DENSE
// RUN: not qcc-opt %s --random-params=0 -p 'fuse-rotation{rotation=%S/no-such-rotation.npy}' 2>&1 | filecheck %s --check-prefix=BADFILE

// A norm after the sublayer writes the stream (Gemma 2, OLMo 2): x + RMSNorm(down(.)) * g.
// No weight can absorb Q there, so the product by g is followed by an online Hadamard
// transform (the signs of Q = D H folded into g, which stays); the down projection is
// not rotated, the pre-norm's scale is absorbed into the reader as usual.

// CHECK-LABEL: func.func @main
// CHECK-NOT: qcc.param = "norm1.weight"
// CHECK-SAME: {qcc.param = "post.weight"}
// CHECK: %[[P:.*]] = torch.aten.mul.Tensor %{{.*}}, %arg{{[0-9]+}} : !torch.vtensor<[4,16],f32>, !torch.vtensor<[16],f32>
// CHECK-NEXT: %[[PB:.*]] = torch_c.to_builtin_tensor %[[P]]
// CHECK-NEXT: %[[PD:.*]] = tensor.cast %[[PB]] : tensor<4x16xf32> to tensor<?x16xf32>
// CHECK-NEXT: %[[HD:.*]] = call @qcc_hadamard_16(%[[PD]])
// CHECK-NEXT: %[[HB:.*]] = tensor.cast %[[HD]]
// CHECK-NEXT: %[[H:.*]] = torch_c.from_builtin_tensor %[[HB]]
// CHECK-NEXT: torch.aten.add.Tensor %{{.*}}, %[[H]]

// A rotation without a fast form cannot be applied online: the stream stays as it was, said so.
// DENSE: qcc-opt: remark: fuse-rotation: residual stream left unrotated: 1 product(s) by a norm scale added to it need an online Hadamard transform after them, and rotation '{{.*}}.npy' is not a Hadamard matrix
// DENSE-LABEL: func.func @main
// DENSE-SAME: {qcc.param = "norm1.weight"}
// DENSE-NOT: qcc_hadamard

// BADFILE: fuse-rotation: rotation of the 16-channel residual stream: rotation file '{{.*}}no-such-rotation.npy' does not exist

func.func @main(%emb: !torch.vtensor<[32,16],f32> {qcc.param = "emb.weight"}, %g1: !torch.vtensor<[16],f32> {qcc.param = "norm1.weight"},
                %wup: !torch.vtensor<[32,16],f32> {qcc.param = "up.weight"}, %wdown: !torch.vtensor<[16,32],f32> {qcc.param = "down.weight"},
                %gp: !torch.vtensor<[16],f32> {qcc.param = "post.weight"}, %head: !torch.vtensor<[32,16],f32> {qcc.param = "head.weight"},
                %ids: !torch.vtensor<[4],si64>) -> !torch.vtensor<[4,32],f32> {
  %int-1 = torch.constant.int -1
  %int0 = torch.constant.int 0
  %int1 = torch.constant.int 1
  %int2 = torch.constant.int 2
  %int16 = torch.constant.int 16
  %eps = torch.constant.float 1.000000e-05
  %true = torch.constant.bool true
  %false = torch.constant.bool false
  %none = torch.constant.none
  %last = torch.prim.ListConstruct %int-1 : (!torch.int) -> !torch.list<int>
  %t = torch.prim.ListConstruct %int1, %int0 : (!torch.int, !torch.int) -> !torch.list<int>
  %x = torch.aten.embedding %emb, %ids, %int-1, %false, %false : !torch.vtensor<[32,16],f32>, !torch.vtensor<[4],si64>, !torch.int, !torch.bool, !torch.bool -> !torch.vtensor<[4,16],f32>
  %sq = torch.aten.pow.Tensor_Scalar %x, %int2 : !torch.vtensor<[4,16],f32>, !torch.int -> !torch.vtensor<[4,16],f32>
  %ss = torch.aten.sum.dim_IntList %sq, %last, %true, %none : !torch.vtensor<[4,16],f32>, !torch.list<int>, !torch.bool, !torch.none -> !torch.vtensor<[4,1],f32>
  %ms = torch.aten.div.Scalar %ss, %int16 : !torch.vtensor<[4,1],f32>, !torch.int -> !torch.vtensor<[4,1],f32>
  %me = torch.aten.add.Scalar %ms, %eps, %int1 : !torch.vtensor<[4,1],f32>, !torch.float, !torch.int -> !torch.vtensor<[4,1],f32>
  %r = torch.aten.rsqrt %me : !torch.vtensor<[4,1],f32> -> !torch.vtensor<[4,1],f32>
  %n = torch.aten.mul.Tensor %x, %r : !torch.vtensor<[4,16],f32>, !torch.vtensor<[4,1],f32> -> !torch.vtensor<[4,16],f32>
  %n1 = torch.aten.mul.Tensor %n, %g1 : !torch.vtensor<[4,16],f32>, !torch.vtensor<[16],f32> -> !torch.vtensor<[4,16],f32>
  %wupt = torch.aten.permute %wup, %t : !torch.vtensor<[32,16],f32>, !torch.list<int> -> !torch.vtensor<[16,32],f32>
  %h = torch.aten.mm %n1, %wupt : !torch.vtensor<[4,16],f32>, !torch.vtensor<[16,32],f32> -> !torch.vtensor<[4,32],f32>
  %a = torch.aten.silu %h : !torch.vtensor<[4,32],f32> -> !torch.vtensor<[4,32],f32>
  %wdownt = torch.aten.permute %wdown, %t : !torch.vtensor<[16,32],f32>, !torch.list<int> -> !torch.vtensor<[32,16],f32>
  %d = torch.aten.mm %a, %wdownt : !torch.vtensor<[4,32],f32>, !torch.vtensor<[32,16],f32> -> !torch.vtensor<[4,16],f32>
  %dsq = torch.aten.pow.Tensor_Scalar %d, %int2 : !torch.vtensor<[4,16],f32>, !torch.int -> !torch.vtensor<[4,16],f32>
  %dss = torch.aten.sum.dim_IntList %dsq, %last, %true, %none : !torch.vtensor<[4,16],f32>, !torch.list<int>, !torch.bool, !torch.none -> !torch.vtensor<[4,1],f32>
  %dms = torch.aten.div.Scalar %dss, %int16 : !torch.vtensor<[4,1],f32>, !torch.int -> !torch.vtensor<[4,1],f32>
  %dme = torch.aten.add.Scalar %dms, %eps, %int1 : !torch.vtensor<[4,1],f32>, !torch.float, !torch.int -> !torch.vtensor<[4,1],f32>
  %dr = torch.aten.rsqrt %dme : !torch.vtensor<[4,1],f32> -> !torch.vtensor<[4,1],f32>
  %dn = torch.aten.mul.Tensor %d, %dr : !torch.vtensor<[4,16],f32>, !torch.vtensor<[4,1],f32> -> !torch.vtensor<[4,16],f32>
  %dp = torch.aten.mul.Tensor %dn, %gp : !torch.vtensor<[4,16],f32>, !torch.vtensor<[16],f32> -> !torch.vtensor<[4,16],f32>
  %x2 = torch.aten.add.Tensor %x, %dp, %int1 : !torch.vtensor<[4,16],f32>, !torch.vtensor<[4,16],f32>, !torch.int -> !torch.vtensor<[4,16],f32>
  %sq2 = torch.aten.pow.Tensor_Scalar %x2, %int2 : !torch.vtensor<[4,16],f32>, !torch.int -> !torch.vtensor<[4,16],f32>
  %ss2 = torch.aten.sum.dim_IntList %sq2, %last, %true, %none : !torch.vtensor<[4,16],f32>, !torch.list<int>, !torch.bool, !torch.none -> !torch.vtensor<[4,1],f32>
  %ms2 = torch.aten.div.Scalar %ss2, %int16 : !torch.vtensor<[4,1],f32>, !torch.int -> !torch.vtensor<[4,1],f32>
  %me2 = torch.aten.add.Scalar %ms2, %eps, %int1 : !torch.vtensor<[4,1],f32>, !torch.float, !torch.int -> !torch.vtensor<[4,1],f32>
  %r2 = torch.aten.rsqrt %me2 : !torch.vtensor<[4,1],f32> -> !torch.vtensor<[4,1],f32>
  %nn = torch.aten.mul.Tensor %x2, %r2 : !torch.vtensor<[4,16],f32>, !torch.vtensor<[4,1],f32> -> !torch.vtensor<[4,16],f32>
  %headt = torch.aten.permute %head, %t : !torch.vtensor<[32,16],f32>, !torch.list<int> -> !torch.vtensor<[16,32],f32>
  %logits = torch.aten.mm %nn, %headt : !torch.vtensor<[4,16],f32>, !torch.vtensor<[16,32],f32> -> !torch.vtensor<[4,32],f32>
  return %logits : !torch.vtensor<[4,32],f32>
}
