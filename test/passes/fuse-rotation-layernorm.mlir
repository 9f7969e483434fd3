// RUN: qcc-opt %s --random-params=0 -p 'fuse-rotation{online=none}' | filecheck %s
// RUN: not qcc-opt %s --random-params=0 -p 'fuse-rotation{rotation=hadamard}' 2>&1 | filecheck %s --check-prefix=SYLVESTER

// A LayerNorm stream: LayerNorm subtracts the mean over channels, so the rotation is
// made to keep the all-ones vector (Q R) and the LayerNorms stay as they are: only
// their scale g and bias b leave the graph.  g is absorbed into the readers' weights,
// b W^T into their biases: the one fc has, a new parameter for the head, which has none.

// CHECK-LABEL: func.func @main
// CHECK-NOT: qcc.param = "ln
// CHECK-SAME: {qcc.param = "fc.bias"}
// CHECK-SAME: %arg6: !torch.vtensor<[32],f32> {qcc.param = "head.weight:norm_bias"}
// CHECK: %[[X:.*]] = torch.aten.embedding
// CHECK: %[[S:.*]] = torch.aten.sum.dim_IntList %[[X]]
// CHECK: %[[M:.*]] = torch.aten.div.Scalar %[[S]]
// CHECK: %[[D:.*]] = torch.aten.sub.Tensor %[[X]], %[[M]]
// CHECK: %[[R:.*]] = torch.aten.rsqrt
// CHECK: %[[N:.*]] = torch.aten.mul.Tensor %[[D]], %[[R]]
// CHECK-NOT: torch.aten.mul.Tensor
// CHECK: torch.aten.mm %[[N]],
// CHECK: %[[N2:.*]] = torch.aten.mul.Tensor %{{.*}}, %{{.*}} : !torch.vtensor<[4,16],f32>, !torch.vtensor<[4,1],f32>
// CHECK-NEXT: %[[HT:.*]] = torch.aten.permute
// CHECK-NEXT: %[[L:.*]] = torch.aten.mm %[[N2]], %[[HT]]
// CHECK: %[[LB:.*]] = torch.aten.add.Tensor %[[L]], %arg6, %{{.*}} : !torch.vtensor<[4,32],f32>, !torch.vtensor<[32],f32>
// CHECK-NEXT: return %[[LB]]

// SYLVESTER: fuse-rotation: rotation of the 16-channel residual stream: it is LayerNorm's, so the rotation must keep the all-ones vector; made to (Q R, R a reflection), 'hadamard' leaves channel 0 nearly in place (|QR[0, 0]| = 1.00); use rotation=random-hadamard

func.func @main(%emb: !torch.vtensor<[32,16],f32> {qcc.param = "emb.weight"},
                %g: !torch.vtensor<[16],f32> {qcc.param = "ln.weight"}, %b: !torch.vtensor<[16],f32> {qcc.param = "ln.bias"},
                %w1: !torch.vtensor<[32,16],f32> {qcc.param = "fc.weight"}, %b1: !torch.vtensor<[32],f32> {qcc.param = "fc.bias"},
                %w2: !torch.vtensor<[16,32],f32> {qcc.param = "out.weight"},
                %gf: !torch.vtensor<[16],f32> {qcc.param = "lnf.weight"}, %bf: !torch.vtensor<[16],f32> {qcc.param = "lnf.bias"},
                %wh: !torch.vtensor<[32,16],f32> {qcc.param = "head.weight"},
                %ids: !torch.vtensor<[4],si64>) -> !torch.vtensor<[4,32],f32> {
  %int-1 = torch.constant.int -1
  %int0 = torch.constant.int 0
  %int1 = torch.constant.int 1
  %int16 = torch.constant.int 16
  %eps = torch.constant.float 1.000000e-05
  %true = torch.constant.bool true
  %false = torch.constant.bool false
  %none = torch.constant.none
  %last = torch.prim.ListConstruct %int-1 : (!torch.int) -> !torch.list<int>
  %t = torch.prim.ListConstruct %int1, %int0 : (!torch.int, !torch.int) -> !torch.list<int>
  %x = torch.aten.embedding %emb, %ids, %int-1, %false, %false : !torch.vtensor<[32,16],f32>, !torch.vtensor<[4],si64>, !torch.int, !torch.bool, !torch.bool -> !torch.vtensor<[4,16],f32>
  %s = torch.aten.sum.dim_IntList %x, %last, %true, %none : !torch.vtensor<[4,16],f32>, !torch.list<int>, !torch.bool, !torch.none -> !torch.vtensor<[4,1],f32>
  %mean = torch.aten.div.Scalar %s, %int16 : !torch.vtensor<[4,1],f32>, !torch.int -> !torch.vtensor<[4,1],f32>
  %d = torch.aten.sub.Tensor %x, %mean, %int1 : !torch.vtensor<[4,16],f32>, !torch.vtensor<[4,1],f32>, !torch.int -> !torch.vtensor<[4,16],f32>
  %dd = torch.aten.mul.Tensor %d, %d : !torch.vtensor<[4,16],f32>, !torch.vtensor<[4,16],f32> -> !torch.vtensor<[4,16],f32>
  %vs = torch.aten.sum.dim_IntList %dd, %last, %true, %none : !torch.vtensor<[4,16],f32>, !torch.list<int>, !torch.bool, !torch.none -> !torch.vtensor<[4,1],f32>
  %var = torch.aten.div.Scalar %vs, %int16 : !torch.vtensor<[4,1],f32>, !torch.int -> !torch.vtensor<[4,1],f32>
  %ve = torch.aten.add.Scalar %var, %eps, %int1 : !torch.vtensor<[4,1],f32>, !torch.float, !torch.int -> !torch.vtensor<[4,1],f32>
  %r = torch.aten.rsqrt %ve : !torch.vtensor<[4,1],f32> -> !torch.vtensor<[4,1],f32>
  %n = torch.aten.mul.Tensor %d, %r : !torch.vtensor<[4,16],f32>, !torch.vtensor<[4,1],f32> -> !torch.vtensor<[4,16],f32>
  %ng = torch.aten.mul.Tensor %n, %g : !torch.vtensor<[4,16],f32>, !torch.vtensor<[16],f32> -> !torch.vtensor<[4,16],f32>
  %y = torch.aten.add.Tensor %ng, %b, %int1 : !torch.vtensor<[4,16],f32>, !torch.vtensor<[16],f32>, !torch.int -> !torch.vtensor<[4,16],f32>
  %w1t = torch.aten.permute %w1, %t : !torch.vtensor<[32,16],f32>, !torch.list<int> -> !torch.vtensor<[16,32],f32>
  %h = torch.aten.mm %y, %w1t : !torch.vtensor<[4,16],f32>, !torch.vtensor<[16,32],f32> -> !torch.vtensor<[4,32],f32>
  %hb = torch.aten.add.Tensor %h, %b1, %int1 : !torch.vtensor<[4,32],f32>, !torch.vtensor<[32],f32>, !torch.int -> !torch.vtensor<[4,32],f32>
  %a = torch.aten.relu %hb : !torch.vtensor<[4,32],f32> -> !torch.vtensor<[4,32],f32>
  %w2t = torch.aten.permute %w2, %t : !torch.vtensor<[16,32],f32>, !torch.list<int> -> !torch.vtensor<[32,16],f32>
  %o = torch.aten.mm %a, %w2t : !torch.vtensor<[4,32],f32>, !torch.vtensor<[32,16],f32> -> !torch.vtensor<[4,16],f32>
  %x2 = torch.aten.add.Tensor %x, %o, %int1 : !torch.vtensor<[4,16],f32>, !torch.vtensor<[4,16],f32>, !torch.int -> !torch.vtensor<[4,16],f32>
  %s2 = torch.aten.sum.dim_IntList %x2, %last, %true, %none : !torch.vtensor<[4,16],f32>, !torch.list<int>, !torch.bool, !torch.none -> !torch.vtensor<[4,1],f32>
  %mean2 = torch.aten.div.Scalar %s2, %int16 : !torch.vtensor<[4,1],f32>, !torch.int -> !torch.vtensor<[4,1],f32>
  %d2 = torch.aten.sub.Tensor %x2, %mean2, %int1 : !torch.vtensor<[4,16],f32>, !torch.vtensor<[4,1],f32>, !torch.int -> !torch.vtensor<[4,16],f32>
  %dd2 = torch.aten.mul.Tensor %d2, %d2 : !torch.vtensor<[4,16],f32>, !torch.vtensor<[4,16],f32> -> !torch.vtensor<[4,16],f32>
  %vs2 = torch.aten.sum.dim_IntList %dd2, %last, %true, %none : !torch.vtensor<[4,16],f32>, !torch.list<int>, !torch.bool, !torch.none -> !torch.vtensor<[4,1],f32>
  %var2 = torch.aten.div.Scalar %vs2, %int16 : !torch.vtensor<[4,1],f32>, !torch.int -> !torch.vtensor<[4,1],f32>
  %ve2 = torch.aten.add.Scalar %var2, %eps, %int1 : !torch.vtensor<[4,1],f32>, !torch.float, !torch.int -> !torch.vtensor<[4,1],f32>
  %r2 = torch.aten.rsqrt %ve2 : !torch.vtensor<[4,1],f32> -> !torch.vtensor<[4,1],f32>
  %n2 = torch.aten.mul.Tensor %d2, %r2 : !torch.vtensor<[4,16],f32>, !torch.vtensor<[4,1],f32> -> !torch.vtensor<[4,16],f32>
  %ng2 = torch.aten.mul.Tensor %n2, %gf : !torch.vtensor<[4,16],f32>, !torch.vtensor<[16],f32> -> !torch.vtensor<[4,16],f32>
  %y2 = torch.aten.add.Tensor %ng2, %bf, %int1 : !torch.vtensor<[4,16],f32>, !torch.vtensor<[16],f32>, !torch.int -> !torch.vtensor<[4,16],f32>
  %wht = torch.aten.permute %wh, %t : !torch.vtensor<[32,16],f32>, !torch.list<int> -> !torch.vtensor<[16,32],f32>
  %logits = torch.aten.mm %y2, %wht : !torch.vtensor<[4,16],f32>, !torch.vtensor<[16,32],f32> -> !torch.vtensor<[4,32],f32>
  return %logits : !torch.vtensor<[4,32],f32>
}
