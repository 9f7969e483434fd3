// RUN: qcc-opt %s -p 'convert-scf-to-openmp,cpu-omp-schedule' | filecheck %s
// RUN: qcc-opt %s -p 'convert-scf-to-openmp,cpu-omp-schedule{kind=dynamic}' | filecheck %s --check-prefix=DYN

// The worksharing loop of a parallel kernel gets a guided schedule, so a
// thread delayed by another process on its core takes a smaller share.

// CHECK-LABEL: func.func @fill
// CHECK: omp.parallel
// CHECK: omp.wsloop schedule(guided)
// DYN: omp.wsloop schedule(dynamic)
func.func @fill(%m: memref<64xf32>) {
  %c0 = arith.constant 0 : index
  %c1 = arith.constant 1 : index
  %c64 = arith.constant 64 : index
  %z = arith.constant 0.0 : f32
  scf.parallel (%i) = (%c0) to (%c64) step (%c1) {
    memref.store %z, %m[%i] : memref<64xf32>
  }
  return
}
