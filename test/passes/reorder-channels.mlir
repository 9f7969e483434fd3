// RUN: %PYTHON -c "import numpy as np; from safetensors.numpy import save_file; a = np.ones(8, np.float32); a[[1, 5]] = 30.0; d = np.ones(16, np.float32); d[[0, 9]] = 50.0; save_file({'up.weight/absmax': a, 'head.weight/absmax': a, 'down.weight/absmax': d, 'fc.weight/absmax': d}, '%t.stats')"
// RUN: qcc-opt %s --random-params=0 --output-params=%t.before
// RUN: qcc-opt %s --random-params=0 -p 'reorder-channels{outliers=2 stats=%t.stats}' --output-params=%t.after | filecheck %s
// RUN: %PYTHON -c "from safetensors.numpy import load_file as L; import numpy as np; b, a = L('%t.before'), L('%t.after'); p = [0, 2, 3, 4, 6, 7, 1, 5]; q = [1, 2, 3, 4, 5, 6, 7, 8, 10, 11, 12, 13, 14, 15, 0, 9]; print('embedding columns:', np.array_equal(a['emb.weight'], b['emb.weight'][:, p])); print('norm scale:', np.array_equal(a['norm1.weight'], b['norm1.weight'][p])); print('writer rows:', np.array_equal(np.concatenate([a['down.weight:main'], a['down.weight:outliers']], 1), b['down.weight'][p][:, q])); print('up rows follow down:', np.array_equal(np.concatenate([a['up.weight:main'], a['up.weight:outliers']], 1), b['up.weight'][q][:, p]))" | filecheck %s --check-prefix=VALUES
// RUN: not qcc-opt %s --random-params=0 -p 'reorder-channels{outliers=8 stats=%t.stats}' 2>&1 | filecheck %s --check-prefix=TOOMANY

// Outlier channels (1 and 5 of the residual stream, 0 and 9 of the MLP) move
// last.  The residual permutation is folded into the embedding, norm scales,
// writers and readers; the down projection's into the up projection's rows.
// Each linear splits along K: a low-bit part over x[:, :K-2] and an outlier
// part over x[:, K-2:] ('<W>:outliers', which a recipe override keeps wider).
// CHECK-LABEL: func.func @main
// CHECK-SAME: !torch.vtensor<[16,6],f32> {qcc.param = "up.weight:main"}
// CHECK-SAME: !torch.vtensor<[16,2],f32> {qcc.param = "up.weight:outliers"}
// CHECK-SAME: !torch.vtensor<[8,14],f32> {qcc.param = "down.weight:main"}
// CHECK: %[[N:.*]] = torch.aten.mul.Tensor %{{.*}}, %{{.*}} : !torch.vtensor<[8],f32>, !torch.vtensor<[4,8],f32>
// CHECK: %[[XM:.*]] = torch.aten.slice.Tensor %[[N]], %{{.*}}, %{{.*}}, %{{.*}}, %{{.*}} : {{.*}} -> !torch.vtensor<[4,6],f32>
// CHECK: %[[YM:.*]] = torch.aten.mm %[[XM]], %{{.*}} : !torch.vtensor<[4,6],f32>, !torch.vtensor<[6,16],f32>
// CHECK: %[[XO:.*]] = torch.aten.slice.Tensor %[[N]], {{.*}} -> !torch.vtensor<[4,2],f32>
// CHECK: %[[YO:.*]] = torch.aten.mm %[[XO]], %{{.*}} : !torch.vtensor<[4,2],f32>, !torch.vtensor<[2,16],f32>
// CHECK: torch.aten.add.Tensor %[[YM]], %[[YO]]
// CHECK: torch.aten.silu
// CHECK-NOT: index_select
// CHECK-LABEL: func.func @gather

// VALUES: embedding columns: True
// VALUES: norm scale: True
// VALUES: writer rows: True
// VALUES: up rows follow down: True
// TOOMANY: error: reorder-channels: outliers=8 leaves no channels of K=8 in '{{.*}}' for the low-bit part

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

// A linear whose input comes from outside (here: the function argument) keeps
// an explicit gather of the permuted columns.
// CHECK: %[[IM:.*]] = torch.vtensor.literal(dense<[1, 2, 3, 4, 5, 6, 7, 8, 10, 11, 12, 13, 14, 15]> : tensor<14xsi64>)
// CHECK: torch.aten.index_select %{{.*}}, %{{.*}}, %[[IM]]
// CHECK: %[[IO:.*]] = torch.vtensor.literal(dense<[0, 9]> : tensor<2xsi64>)
// CHECK: torch.aten.index_select %{{.*}}, %{{.*}}, %[[IO]]
func.func @gather(%w: !torch.vtensor<[4,16],f32> {qcc.param = "fc.weight"}, %x: !torch.vtensor<[3,16],f32>) -> !torch.vtensor<[3,4],f32> {
  %int0 = torch.constant.int 0
  %int1 = torch.constant.int 1
  %t = torch.prim.ListConstruct %int1, %int0 : (!torch.int, !torch.int) -> !torch.list<int>
  %wt = torch.aten.permute %w, %t : !torch.vtensor<[4,16],f32>, !torch.list<int> -> !torch.vtensor<[16,4],f32>
  %y = torch.aten.mm %x, %wt : !torch.vtensor<[3,16],f32>, !torch.vtensor<[16,4],f32> -> !torch.vtensor<[3,4],f32>
  return %y : !torch.vtensor<[3,4],f32>
}
