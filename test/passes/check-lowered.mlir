// RUN: not qcc-opt %s -p check-lowered 2>&1 | filecheck %s

// A torch op that survived the lowering is named, at its location.
// CHECK: error: check-lowered: unsupported op 'torch.aten.fft_fft': qcc cannot lower it to linalg
func.func @leftover(%x: !torch.vtensor<[8],f32>) -> !torch.vtensor<[8],f32> {
  %none = torch.constant.none
  %int-1 = torch.constant.int -1
  %y = torch.aten.fft_fft %x, %none, %int-1, %none : !torch.vtensor<[8],f32>, !torch.none, !torch.int, !torch.none -> !torch.vtensor<[8],f32>
  return %y : !torch.vtensor<[8],f32>
}
