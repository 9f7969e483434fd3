// RUN: qcc-opt %s -p 'cpu-vectorize-contractions{lanes=8}' | filecheck %s
// RUN: qcc-opt %s -p 'cpu-vectorize-contractions{lanes=8}' | filecheck %s --check-prefix=KV
// RUN: qcc-opt %s -p 'cpu-vectorize-contractions{lanes=8}' | filecheck %s --check-prefix=TILED
// RUN: qcc-opt %s -p 'cpu-vectorize-contractions{lanes=8}' | filecheck %s --check-prefix=LIN
// RUN: qcc-opt %s -p 'cpu-vectorize-contractions{lanes=8}' | filecheck %s --check-prefix=DYN
// RUN: qcc-opt %s -p 'cpu-vectorize-contractions{lanes=8}' | filecheck %s --check-prefix=F16
// RUN: qcc-opt %s -p 'cpu-vectorize-contractions{lanes=8}' | filecheck %s --check-prefix=GQA
// RUN: qcc-opt %s -p 'cpu-vectorize-contractions{lanes=8}' | filecheck %s --check-prefix=KVDYN
// RUN: qcc-opt %s -p 'cpu-vectorize-contractions{lanes=8}' | filecheck %s --check-prefix=SCALED

// Attention's q @ k^T: the transpose feeding B (through a collapse) is folded
// into a dot-product kernel that reads the keys in their own layout; p @ v
// becomes a row-accumulating (axpy) kernel.  Both run over rows in parallel.

// CHECK-LABEL: func.func @attention
// CHECK-NOT: linalg.batch_matmul
// CHECK: %[[KC:.*]] = tensor.collapse_shape %arg1 {{\[\[}}0, 1], [2], [3]] : tensor<1x4x9x16xf32> into tensor<4x9x16xf32>
// CHECK: call @qcc_cpu_bmm_dot_4x1x9x16(%arg0, %[[KC]]) : (tensor<4x1x16xf32>, tensor<4x9x16xf32>) -> tensor<4x1x9xf32>
// CHECK: call @qcc_cpu_bmm_axpy_4x1x16x9(%{{.*}}, %arg2) : (tensor<4x1x9xf32>, tensor<4x9x16xf32>) -> tensor<4x1x16xf32>
// CHECK-LABEL: func.func private @qcc_cpu_bmm_dot_4x1x9x16(
// CHECK: scf.parallel
// CHECK-LABEL: func.func private @qcc_cpu_bmm_dot_4x1x9x16_row(
// CHECK: vector.fma
// CHECK: vector.reduction <add>
// CHECK-LABEL: func.func private @qcc_cpu_bmm_axpy_4x1x16x9_row(
// CHECK: vector.broadcast
// CHECK: vector.fma
// CHECK: vector.transfer_write
func.func @attention(%q: tensor<4x1x16xf32>, %k: tensor<1x4x9x16xf32>, %v: tensor<4x9x16xf32>) -> tensor<4x1x16xf32> {
  %zero = arith.constant 0.0 : f32
  %e = tensor.empty() : tensor<1x4x16x9xf32>
  %kt = linalg.transpose ins(%k : tensor<1x4x9x16xf32>) outs(%e : tensor<1x4x16x9xf32>) permutation = [0, 1, 3, 2]
  %ktc = tensor.collapse_shape %kt [[0, 1], [2], [3]] : tensor<1x4x16x9xf32> into tensor<4x16x9xf32>
  %s0 = tensor.empty() : tensor<4x1x9xf32>
  %s1 = linalg.fill ins(%zero : f32) outs(%s0 : tensor<4x1x9xf32>) -> tensor<4x1x9xf32>
  %s = linalg.batch_matmul ins(%q, %ktc : tensor<4x1x16xf32>, tensor<4x16x9xf32>) outs(%s1 : tensor<4x1x9xf32>) -> tensor<4x1x9xf32>
  %o0 = tensor.empty() : tensor<4x1x16xf32>
  %o1 = linalg.fill ins(%zero : f32) outs(%o0 : tensor<4x1x16xf32>) -> tensor<4x1x16xf32>
  %o = linalg.batch_matmul ins(%s, %v : tensor<4x1x9xf32>, tensor<4x9x16xf32>) outs(%o1 : tensor<4x1x16xf32>) -> tensor<4x1x16xf32>
  return %o : tensor<4x1x16xf32>
}

// Decode attention over a KV cache: B is the concatenation of the cache (a slice of
// the cache argument) and the step's new key / value.  The kernels take the parts
// and read each where it lies (strided memrefs, so the slice needs no copy): no
// tensor.concat is left to build an 8 x 513 x 16 copy of the cache.
// KV-LABEL: func.func @decode_attention
// KV-NOT: tensor.concat
// KV: %[[KS:.*]] = tensor.extract_slice %arg1[0, 0, 0, 0, 0] [1, 1, 8, 512, 16]
// KV: %[[KP:.*]] = tensor.collapse_shape %{{.*}} {{\[\[}}0, 1], [2], [3]] : tensor<1x8x512x16xf32> into tensor<8x512x16xf32>
// KV: %[[KN:.*]] = tensor.collapse_shape %arg2 {{\[\[}}0, 1], [2], [3]] : tensor<1x8x1x16xf32> into tensor<8x1x16xf32>
// KV: call @qcc_cpu_bmm_dot_8x1x513x16_parts512_1(%arg0, %[[KP]], %[[KN]])
// KV: call @qcc_cpu_bmm_axpy_8x1x16x513_parts512_1(%{{.*}}, %{{.*}}, %{{.*}})
// KV-NOT: tensor.concat
// KV-LABEL: func.func private @qcc_cpu_bmm_dot_8x1x513x16_parts512_1(
// KV-SAME: %{{.*}}: tensor<8x1x16xf32>, %{{.*}}: tensor<8x512x16xf32>, %{{.*}}: tensor<8x1x16xf32>)
// KV: bufferization.to_buffer %{{.*}} read_only : tensor<8x512x16xf32> to memref<8x512x16xf32, strided<[?, ?, 1], offset: ?>>
// KV-LABEL: func.func private @qcc_cpu_bmm_dot_8x1x513x16_parts512_1_row(
// KV: scf.for %{{.*}} = %{{.*}} to %{{.*}} step
// KV: vector.transfer_read %{{.*}} : memref<8x512x16xf32, strided<[?, ?, 1], offset: ?>>, vector<8xf32>
// KV: vector.transfer_read %{{.*}} : memref<8x1x16xf32, strided<[?, ?, 1], offset: ?>>, vector<8xf32>
// KV-LABEL: func.func private @qcc_cpu_bmm_axpy_8x1x16x513_parts512_1_row(
// KV: memref.load
// KV: vector.fma
// KV: arith.addi %{{.*}}, %c512
// KV: vector.fma
func.func @decode_attention(%q: tensor<8x1x16xf32>, %cache: tensor<2x1x8x512x16xf32>, %k: tensor<1x8x1x16xf32>,
                            %p: tensor<8x1x513xf32>, %vcache: tensor<2x1x8x512x16xf32>, %v: tensor<1x8x1x16xf32>) -> (tensor<8x1x513xf32>, tensor<8x1x16xf32>) {
  %zero = arith.constant 0.0 : f32
  %ks = tensor.extract_slice %cache[0, 0, 0, 0, 0] [1, 1, 8, 512, 16] [1, 1, 1, 1, 1] : tensor<2x1x8x512x16xf32> to tensor<1x1x8x512x16xf32>
  %kc = tensor.collapse_shape %ks [[0, 1], [2], [3], [4]] : tensor<1x1x8x512x16xf32> into tensor<1x8x512x16xf32>
  %keys = tensor.concat dim(2) %kc, %k : (tensor<1x8x512x16xf32>, tensor<1x8x1x16xf32>) -> tensor<1x8x513x16xf32>
  %e = tensor.empty() : tensor<1x8x16x513xf32>
  %kt = linalg.transpose ins(%keys : tensor<1x8x513x16xf32>) outs(%e : tensor<1x8x16x513xf32>) permutation = [0, 1, 3, 2]
  %ktc = tensor.collapse_shape %kt [[0, 1], [2], [3]] : tensor<1x8x16x513xf32> into tensor<8x16x513xf32>
  %s0 = tensor.empty() : tensor<8x1x513xf32>
  %s1 = linalg.fill ins(%zero : f32) outs(%s0 : tensor<8x1x513xf32>) -> tensor<8x1x513xf32>
  %s = linalg.batch_matmul ins(%q, %ktc : tensor<8x1x16xf32>, tensor<8x16x513xf32>) outs(%s1 : tensor<8x1x513xf32>) -> tensor<8x1x513xf32>
  %vs = tensor.extract_slice %vcache[1, 0, 0, 0, 0] [1, 1, 8, 512, 16] [1, 1, 1, 1, 1] : tensor<2x1x8x512x16xf32> to tensor<1x1x8x512x16xf32>
  %vc = tensor.collapse_shape %vs [[0, 1], [2], [3], [4]] : tensor<1x1x8x512x16xf32> into tensor<1x8x512x16xf32>
  %values = tensor.concat dim(2) %vc, %v : (tensor<1x8x512x16xf32>, tensor<1x8x1x16xf32>) -> tensor<1x8x513x16xf32>
  %vcl = tensor.collapse_shape %values [[0, 1], [2], [3]] : tensor<1x8x513x16xf32> into tensor<8x513x16xf32>
  %o0 = tensor.empty() : tensor<8x1x16xf32>
  %o1 = linalg.fill ins(%zero : f32) outs(%o0 : tensor<8x1x16xf32>) -> tensor<8x1x16xf32>
  %o = linalg.batch_matmul ins(%p, %vcl : tensor<8x1x513xf32>, tensor<8x513x16xf32>) outs(%o1 : tensor<8x1x16xf32>) -> tensor<8x1x16xf32>
  return %s, %o : tensor<8x1x513xf32>, tensor<8x1x16xf32>
}

// A cache kept in f16 (`cache.float()` before the concatenation: an elementwise extf): the
// kernel takes the f16 slice as its part and widens it in registers; the f32 copy of the
// cache, like the concatenation, is left without users.
// F16-LABEL: func.func @decode_attention_f16_cache
// F16: %[[KS:.*]] = tensor.collapse_shape %{{.*}} {{\[\[}}0, 1], [2], [3]] : tensor<1x8x512x16xf16> into tensor<8x512x16xf16>
// F16: call @qcc_cpu_bmm_dot_8x1x513x16_parts512f16_1(%arg0, %[[KS]], %{{.*}}) : (tensor<8x1x16xf32>, tensor<8x512x16xf16>, tensor<8x1x16xf32>)
// F16-LABEL: func.func private @qcc_cpu_bmm_dot_8x1x513x16_parts512f16_1_row(
// F16: vector.transfer_read %{{.*}} : memref<8x512x16xf16, strided<[?, ?, 1], offset: ?>>, vector<8xf16>
// F16: arith.extf %{{.*}} : vector<8xf16> to vector<8xf32>
// F16: vector.fma
func.func @decode_attention_f16_cache(%q: tensor<8x1x16xf32>, %cache: tensor<2x1x8x512x16xf16>, %k: tensor<1x8x1x16xf32>) -> tensor<8x1x513xf32> {
  %zero = arith.constant 0.0 : f32
  %ks = tensor.extract_slice %cache[0, 0, 0, 0, 0] [1, 1, 8, 512, 16] [1, 1, 1, 1, 1] : tensor<2x1x8x512x16xf16> to tensor<1x1x8x512x16xf16>
  %kc = tensor.collapse_shape %ks [[0, 1], [2], [3], [4]] : tensor<1x1x8x512x16xf16> into tensor<1x8x512x16xf16>
  %w0 = tensor.empty() : tensor<1x8x512x16xf32>
  %kw = linalg.generic {indexing_maps = [affine_map<(d0, d1, d2, d3) -> (d0, d1, d2, d3)>, affine_map<(d0, d1, d2, d3) -> (d0, d1, d2, d3)>],
                        iterator_types = ["parallel", "parallel", "parallel", "parallel"]}
      ins(%kc : tensor<1x8x512x16xf16>) outs(%w0 : tensor<1x8x512x16xf32>) {
  ^bb0(%in: f16, %out: f32):
    %x = arith.extf %in : f16 to f32
    linalg.yield %x : f32
  } -> tensor<1x8x512x16xf32>
  %keys = tensor.concat dim(2) %kw, %k : (tensor<1x8x512x16xf32>, tensor<1x8x1x16xf32>) -> tensor<1x8x513x16xf32>
  %e = tensor.empty() : tensor<1x8x16x513xf32>
  %kt = linalg.transpose ins(%keys : tensor<1x8x513x16xf32>) outs(%e : tensor<1x8x16x513xf32>) permutation = [0, 1, 3, 2]
  %ktc = tensor.collapse_shape %kt [[0, 1], [2], [3]] : tensor<1x8x16x513xf32> into tensor<8x16x513xf32>
  %s0 = tensor.empty() : tensor<8x1x513xf32>
  %s1 = linalg.fill ins(%zero : f32) outs(%s0 : tensor<8x1x513xf32>) -> tensor<8x1x513xf32>
  %s = linalg.batch_matmul ins(%q, %ktc : tensor<8x1x16xf32>, tensor<8x16x513xf32>) outs(%s1 : tensor<8x1x513xf32>) -> tensor<8x1x513xf32>
  return %s : tensor<8x1x513xf32>
}

// Grouped-query attention: 2 KV heads, each repeated for 4 query heads after the
// concatenation (repeat_kv: a broadcast generic, collapsed with the batch).  The kernel
// takes the KV heads' parts and reads batch i / 4 of them: no repeated copy, no concat.
// GQA-LABEL: func.func @decode_attention_gqa
// GQA: call @qcc_cpu_bmm_axpy_8x1x16x513_parts512_1_rep4(%arg0, %{{.*}}, %{{.*}}) : (tensor<8x1x513xf32>, tensor<2x512x16xf32>, tensor<2x1x16xf32>)
// GQA-LABEL: func.func private @qcc_cpu_bmm_axpy_8x1x16x513_parts512_1_rep4_row(
// GQA: %[[BI:.*]] = arith.divui %arg0, %{{.*}} : index
// GQA: arith.divui %[[BI]], %c4 : index
func.func @decode_attention_gqa(%p: tensor<8x1x513xf32>, %vcache: tensor<1x2x512x16xf32>, %v: tensor<1x2x1x16xf32>) -> tensor<8x1x16xf32> {
  %zero = arith.constant 0.0 : f32
  %values = tensor.concat dim(2) %vcache, %v : (tensor<1x2x512x16xf32>, tensor<1x2x1x16xf32>) -> tensor<1x2x513x16xf32>
  %e5 = tensor.empty() : tensor<1x2x4x513x16xf32>
  %rep = linalg.generic {indexing_maps = [affine_map<(d0, d1, d2, d3, d4) -> (d0, d1, d3, d4)>, affine_map<(d0, d1, d2, d3, d4) -> (d0, d1, d2, d3, d4)>],
                         iterator_types = ["parallel", "parallel", "parallel", "parallel", "parallel"]}
      ins(%values : tensor<1x2x513x16xf32>) outs(%e5 : tensor<1x2x4x513x16xf32>) {
  ^bb0(%in: f32, %out: f32):
    linalg.yield %in : f32
  } -> tensor<1x2x4x513x16xf32>
  %vcl = tensor.collapse_shape %rep [[0, 1, 2], [3], [4]] : tensor<1x2x4x513x16xf32> into tensor<8x513x16xf32>
  %o0 = tensor.empty() : tensor<8x1x16xf32>
  %o1 = linalg.fill ins(%zero : f32) outs(%o0 : tensor<8x1x16xf32>) -> tensor<8x1x16xf32>
  %o = linalg.batch_matmul ins(%p, %vcl : tensor<8x1x513xf32>, tensor<8x513x16xf32>) outs(%o1 : tensor<8x1x16xf32>) -> tensor<8x1x16xf32>
  return %o : tensor<8x1x16xf32>
}

// Prefill attention (12 query rows, at least TILED_MIN_M): register-tiled kernels.  For
// q @ k^T the keys are first copied k-major (a parallel loop over heads), rows padded to
// whole vectors (20 keys -> 24 columns); the tiles then run over heads x chunks of rows,
// each tile's accumulators carried through the k loop (6 rows x 3 vectors: 18 FMAs a step).
// TILED-LABEL: func.func @prefill_attention
// TILED: call @qcc_cpu_bmm_tiled_t_4x12x20x16(%arg0, %{{.*}}) : (tensor<4x12x16xf32>, tensor<4x20x16xf32>) -> tensor<4x12x20xf32>
// TILED: call @qcc_cpu_bmm_tiled_4x12x16x20(%{{.*}}, %arg2) : (tensor<4x12x20xf32>, tensor<4x20x16xf32>) -> tensor<4x12x16xf32>
// TILED-LABEL: func.func private @qcc_cpu_bmm_tiled_t_4x12x20x16(
// TILED: memref.alloc() {alignment = 64 : i64} : memref<4x16x24xf32>
// TILED: scf.parallel
// TILED: call @qcc_cpu_bmm_tiled_t_4x12x20x16_pack(
// TILED: scf.parallel
// TILED: call @qcc_cpu_bmm_tiled_t_4x12x20x16_tiles(
// TILED-LABEL: func.func private @qcc_cpu_bmm_tiled_t_4x12x20x16_tiles(
// TILED: %{{.*}}:18 = scf.for {{.*}} iter_args({{.*}}) -> ({{(vector<8xf32>, )+}}vector<8xf32>)
// TILED-COUNT-18: vector.fma
// TILED-LABEL: func.func private @qcc_cpu_bmm_tiled_t_4x12x20x16_pack(
// TILED: memref.load %{{.*}} : memref<4x20x16xf32, strided<[?, ?, 1], offset: ?>>
// TILED: memref.store %{{.*}} : memref<4x16x24xf32>
// TILED-LABEL: func.func private @qcc_cpu_bmm_tiled_4x12x16x20_tiles(
// TILED: vector.transfer_read %{{.*}} : memref<4x20x16xf32, strided<[?, ?, 1], offset: ?>>, vector<8xf32>
// TILED-COUNT-12: vector.fma
func.func @prefill_attention(%q: tensor<4x12x16xf32>, %k: tensor<1x4x20x16xf32>, %v: tensor<4x20x16xf32>) -> tensor<4x12x16xf32> {
  %zero = arith.constant 0.0 : f32
  %e = tensor.empty() : tensor<1x4x16x20xf32>
  %kt = linalg.transpose ins(%k : tensor<1x4x20x16xf32>) outs(%e : tensor<1x4x16x20xf32>) permutation = [0, 1, 3, 2]
  %ktc = tensor.collapse_shape %kt [[0, 1], [2], [3]] : tensor<1x4x16x20xf32> into tensor<4x16x20xf32>
  %s0 = tensor.empty() : tensor<4x12x20xf32>
  %s1 = linalg.fill ins(%zero : f32) outs(%s0 : tensor<4x12x20xf32>) -> tensor<4x12x20xf32>
  %s = linalg.batch_matmul ins(%q, %ktc : tensor<4x12x16xf32>, tensor<4x16x20xf32>) outs(%s1 : tensor<4x12x20xf32>) -> tensor<4x12x20xf32>
  %o0 = tensor.empty() : tensor<4x12x16xf32>
  %o1 = linalg.fill ins(%zero : f32) outs(%o0 : tensor<4x12x16xf32>) -> tensor<4x12x16xf32>
  %o = linalg.batch_matmul ins(%s, %v : tensor<4x12x20xf32>, tensor<4x20x16xf32>) outs(%o1 : tensor<4x12x16xf32>) -> tensor<4x12x16xf32>
  return %o : tensor<4x12x16xf32>
}

// A float linear layer, x @ W^T with a dynamic token count: the transposed copy of W goes,
// the kernel reads W [N, K] as it is.  4 x 4 tiles of dot products (vectors along k: two
// full steps of 8 and a masked last one for K = 20), each reduced once; rows in tiles of
// 4, 2, 1; columns in parallel chunks, the last chunk's odd column on its own.
// LIN-LABEL: func.func @float_linear
// LIN-NOT: linalg.transpose
// LIN: call @qcc_cpu_matmul_bt_dx9x20(%arg0, %arg1) : (tensor<?x20xf32>, tensor<9x20xf32>) -> tensor<?x9xf32>
// LIN-LABEL: func.func private @qcc_cpu_matmul_bt_dx9x20(
// LIN: memref.alloc(%{{.*}}) {alignment = 64 : i64} : memref<?x9xf32>
// LIN: scf.parallel
// LIN-LABEL: func.func private @qcc_cpu_matmul_bt_dx9x20_tiles(
// LIN: %{{.*}}:16 = scf.for %{{.*}} = %{{.*}} to %{{.*}} step %{{.*}} iter_args(
// LIN-COUNT-16: vector.fma
// LIN: vector.transfer_read %{{.*}}, %{{.*}} : memref<?x20xf32>, vector<8xf32>
// LIN-COUNT-16: vector.reduction <add>
func.func @float_linear(%x: tensor<?x20xf32>, %w: tensor<9x20xf32>) -> tensor<?x9xf32> {
  %zero = arith.constant 0.0 : f32
  %c0 = arith.constant 0 : index
  %m = tensor.dim %x, %c0 : tensor<?x20xf32>
  %e = tensor.empty() : tensor<20x9xf32>
  %wt = linalg.transpose ins(%w : tensor<9x20xf32>) outs(%e : tensor<20x9xf32>) permutation = [1, 0]
  %y0 = tensor.empty(%m) : tensor<?x9xf32>
  %y1 = linalg.fill ins(%zero : f32) outs(%y0 : tensor<?x9xf32>) -> tensor<?x9xf32>
  %y = linalg.matmul ins(%x, %wt : tensor<?x20xf32>, tensor<20x9xf32>) outs(%y1 : tensor<?x9xf32>) -> tensor<?x9xf32>
  return %y : tensor<?x9xf32>
}

// p @ v with a sequence length known only at run time (rows of p and of v): the tiled kernel
// with dynamic sizes, its k loop bound read from A, C allocated with the run-time row count.
// DYN-LABEL: func.func @dynamic_pv
// DYN: call @qcc_cpu_bmm_tiled_4xdx16xd(%arg0, %arg1) : (tensor<4x?x?xf32>, tensor<4x?x16xf32>) -> tensor<4x?x16xf32>
// DYN-LABEL: func.func private @qcc_cpu_bmm_tiled_4xdx16xd(
// DYN: memref.alloc(%{{.*}}) {alignment = 64 : i64} : memref<4x?x16xf32>
// DYN-LABEL: func.func private @qcc_cpu_bmm_tiled_4xdx16xd_tiles(
// DYN: %[[K:.*]] = memref.dim %{{.*}}, %{{.*}} : memref<4x?x?xf32>
// DYN: scf.for %{{.*}} = %{{.*}} to %[[K]] step
func.func @dynamic_pv(%p: tensor<4x?x?xf32>, %v: tensor<4x?x16xf32>) -> tensor<4x?x16xf32> {
  %zero = arith.constant 0.0 : f32
  %c1 = arith.constant 1 : index
  %m = tensor.dim %p, %c1 : tensor<4x?x?xf32>
  %o0 = tensor.empty(%m) : tensor<4x?x16xf32>
  %o1 = linalg.fill ins(%zero : f32) outs(%o0 : tensor<4x?x16xf32>) -> tensor<4x?x16xf32>
  %o = linalg.batch_matmul ins(%p, %v : tensor<4x?x?xf32>, tensor<4x?x16xf32>) outs(%o1 : tensor<4x?x16xf32>) -> tensor<4x?x16xf32>
  return %o : tensor<4x?x16xf32>
}

// Decode over a KV cache of any length (a step compiled with dynamic_shapes): the same parts
// as with a static cache, the cache's row count read at run time (memref.dim) for the loops,
// for where the new key's row starts, and for C's columns; no concatenation is built.
// KVDYN-LABEL: func.func @decode_attention_any_length
// KVDYN-NOT: tensor.concat
// KVDYN: call @qcc_cpu_bmm_dot_8x1xdx16_partsd_1(%arg0, %{{.*}}, %{{.*}}) : (tensor<8x1x16xf32>, tensor<8x?x16xf32>, tensor<8x1x16xf32>) -> tensor<8x1x?xf32>
// KVDYN: call @qcc_cpu_bmm_axpy_8x1x16xd_partsd_1(%arg3, %{{.*}}, %{{.*}}) : (tensor<8x1x?xf32>, tensor<8x?x16xf32>, tensor<8x1x16xf32>) -> tensor<8x1x16xf32>
// KVDYN-LABEL: func.func private @qcc_cpu_bmm_dot_8x1xdx16_partsd_1(
// KVDYN: %[[N0:.*]] = memref.dim %{{.*}}, %{{.*}} : memref<8x?x16xf32, strided<[?, ?, 1], offset: ?>>
// KVDYN: %[[N:.*]] = arith.addi %[[N0]], %{{.*}} : index
// KVDYN: memref.alloc(%[[N]]) {alignment = 64 : i64} : memref<8x1x?xf32>
// KVDYN-LABEL: func.func private @qcc_cpu_bmm_dot_8x1xdx16_partsd_1_row(
// KVDYN: %[[R:.*]] = memref.dim %{{.*}}, %c1 : memref<8x?x16xf32, strided<[?, ?, 1], offset: ?>>
// KVDYN: scf.for %{{.*}} = %c0 to %[[R]] step %c1
// KVDYN: arith.addi %{{.*}}, %c0 : index
// KVDYN: %[[START:.*]] = arith.addi %c0, %[[R]] : index
// KVDYN: scf.for
// KVDYN: arith.addi %{{.*}}, %[[START]] : index
func.func @decode_attention_any_length(%q: tensor<8x1x16xf32>, %kcache: tensor<1x8x?x16xf32>, %k: tensor<1x8x1x16xf32>,
                                       %p: tensor<8x1x?xf32>, %vcache: tensor<1x8x?x16xf32>, %v: tensor<1x8x1x16xf32>) -> (tensor<8x1x?xf32>, tensor<8x1x16xf32>) {
  %zero = arith.constant 0.0 : f32
  %c2 = arith.constant 2 : index
  %keys = tensor.concat dim(2) %kcache, %k : (tensor<1x8x?x16xf32>, tensor<1x8x1x16xf32>) -> tensor<1x8x?x16xf32>
  %n0 = tensor.dim %kcache, %c2 : tensor<1x8x?x16xf32>
  %n = affine.apply affine_map<()[s0] -> (s0 + 1)>()[%n0]
  %e = tensor.empty(%n) : tensor<1x8x16x?xf32>
  %kt = linalg.transpose ins(%keys : tensor<1x8x?x16xf32>) outs(%e : tensor<1x8x16x?xf32>) permutation = [0, 1, 3, 2]
  %ktc = tensor.collapse_shape %kt [[0, 1], [2], [3]] : tensor<1x8x16x?xf32> into tensor<8x16x?xf32>
  %s0 = tensor.empty(%n) : tensor<8x1x?xf32>
  %s1 = linalg.fill ins(%zero : f32) outs(%s0 : tensor<8x1x?xf32>) -> tensor<8x1x?xf32>
  %s = linalg.batch_matmul ins(%q, %ktc : tensor<8x1x16xf32>, tensor<8x16x?xf32>) outs(%s1 : tensor<8x1x?xf32>) -> tensor<8x1x?xf32>
  %values = tensor.concat dim(2) %vcache, %v : (tensor<1x8x?x16xf32>, tensor<1x8x1x16xf32>) -> tensor<1x8x?x16xf32>
  %vcl = tensor.collapse_shape %values [[0, 1], [2], [3]] : tensor<1x8x?x16xf32> into tensor<8x?x16xf32>
  %o0 = tensor.empty() : tensor<8x1x16xf32>
  %o1 = linalg.fill ins(%zero : f32) outs(%o0 : tensor<8x1x16xf32>) -> tensor<8x1x16xf32>
  %o = linalg.batch_matmul ins(%p, %vcl : tensor<8x1x?xf32>, tensor<8x?x16xf32>) outs(%o1 : tensor<8x1x16xf32>) -> tensor<8x1x16xf32>
  return %s, %o : tensor<8x1x?xf32>, tensor<8x1x16xf32>
}

// F.scaled_dot_product_attention's decomposition multiplies k^T by sqrt(scale) (0.5 here,
// 0x3f000000) before q @ k^T: the kernel takes the cache parts and multiplies each loaded
// vector by the constant before its FMA (the same f32 products), so neither the
// concatenation, its transpose nor the scaled copy is built.
// SCALED-LABEL: func.func @decode_sdpa_scaled_keys
// SCALED-NOT: linalg.generic
// SCALED: call @qcc_cpu_bmm_dot_8x1x513x16_parts512_1_scaled3f000000(%arg0, %{{.*}}, %{{.*}})
// SCALED-LABEL: func.func private @qcc_cpu_bmm_dot_8x1x513x16_parts512_1_scaled3f000000_row(
// SCALED: %[[S:.*]] = arith.constant dense<5.000000e-01> : vector<8xf32>
// SCALED: %[[K:.*]] = vector.transfer_read %arg2
// SCALED: %[[KS:.*]] = arith.mulf %[[K]], %[[S]] : vector<8xf32>
// SCALED: vector.fma %{{.*}}, %[[KS]], %{{.*}} : vector<8xf32>
func.func @decode_sdpa_scaled_keys(%q: tensor<8x1x16xf32>, %kcache: tensor<1x8x512x16xf32>, %k: tensor<1x8x1x16xf32>) -> tensor<8x1x513xf32> {
  %zero = arith.constant 0.0 : f32
  %half = arith.constant 0.5 : f64
  %keys = tensor.concat dim(2) %kcache, %k : (tensor<1x8x512x16xf32>, tensor<1x8x1x16xf32>) -> tensor<1x8x513x16xf32>
  %e = tensor.empty() : tensor<1x8x16x513xf32>
  %kt = linalg.transpose ins(%keys : tensor<1x8x513x16xf32>) outs(%e : tensor<1x8x16x513xf32>) permutation = [0, 1, 3, 2]
  %ks = linalg.generic {indexing_maps = [affine_map<(d0, d1, d2, d3) -> (d0, d1, d2, d3)>, affine_map<(d0, d1, d2, d3) -> (d0, d1, d2, d3)>],
                        iterator_types = ["parallel", "parallel", "parallel", "parallel"]}
      ins(%kt : tensor<1x8x16x513xf32>) outs(%e : tensor<1x8x16x513xf32>) {
  ^bb0(%in: f32, %out: f32):
    %c = arith.truncf %half : f64 to f32
    %x = arith.mulf %in, %c : f32
    linalg.yield %x : f32
  } -> tensor<1x8x16x513xf32>
  %ktc = tensor.collapse_shape %ks [[0, 1], [2], [3]] : tensor<1x8x16x513xf32> into tensor<8x16x513xf32>
  %s0 = tensor.empty() : tensor<8x1x513xf32>
  %s1 = linalg.fill ins(%zero : f32) outs(%s0 : tensor<8x1x513xf32>) -> tensor<8x1x513xf32>
  %s = linalg.batch_matmul ins(%q, %ktc : tensor<8x1x16xf32>, tensor<8x16x513xf32>) outs(%s1 : tensor<8x1x513xf32>) -> tensor<8x1x513xf32>
  return %s : tensor<8x1x513xf32>
}
