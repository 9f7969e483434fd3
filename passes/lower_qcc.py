"""lower-qcc-to-linalg: qcc ops become linalg on tensors (CPU reference lowering).

`qcc.qlinear` becomes one linalg.generic over (m, n, k) whose body unpacks the
weight code (nibble select for int4), subtracts the zero point, scales and
accumulates in f32: dequantization fused into the reduction, so no float copy
of the weight ever exists.  The generic stays a plain contraction, which keeps
it open to tiling and vectorization.  The integer path of dequant-after-gemm
(qcc.quantize_dynamic / quantize -> matmul_int -> scale_accumulate) becomes an
i8 x i8 -> i32 contraction (extsi, muli, addi: the VNNI / IMMA shape), a
row-sum zero-point correction in i32, and one f32 scaling generic.
"""

import dataclasses

from torch_mlir import ir

from qcc import irutil
from qcc.context import format_key
from qcc.dialects import formats
from qcc.dialects.formats import activation
from qcc.passes import PassError, QccPass, register


def _code_expr(fmt) -> tuple[str, str, str, str]:
    """(weight map, body lines computing %code as f32, scale/zero map, constants) for `fmt`."""
    if fmt.granularity == "tensor":
        smap = "(m, n, k) -> (0, 0)"
    elif fmt.granularity == "channel":
        smap = "(m, n, k) -> (n, 0)"
    else:
        smap = f"(m, n, k) -> (n, k floordiv {fmt.group_size})"
    if fmt.bits == 8:
        wmap = "(m, n, k) -> (n, k)"
        to_f = "arith.sitofp" if fmt.symmetric else "arith.uitofp"
        body = f"    %code0 = {to_f} %w : i8 to f32\n"
    else:
        wmap = "(m, n, k) -> (n, k floordiv 2)"
        body = (
            "    %k = linalg.index 2 : index\n"
            "    %odd = arith.remui %k, %c2 : index\n"
            "    %odd_i8 = arith.index_cast %odd : index to i8\n"
            "    %shift = arith.muli %odd_i8, %c4_i8 : i8\n"
            "    %shifted = arith.shrui %w, %shift : i8\n"
            "    %nibble = arith.andi %shifted, %c15_i8 : i8\n"
            "    %code0 = arith.uitofp %nibble : i8 to f32\n")
    if fmt.symmetric:
        bias = "8.0" if fmt.bits == 4 else "0.0"
        body += "    %code = arith.subf %code0, %cbias : f32\n"
        consts = f"  %cbias = arith.constant {bias} : f32\n"
    else:
        body += ("    %zf = arith.uitofp %z : i8 to f32\n"
                 "    %code = arith.subf %code0, %zf : f32\n")
        consts = ""
    return wmap, body, smap, consts


def qlinear_kernel(name: str, fmt, k: int, n: int, w_shape, s_shape) -> str:
    """MLIR text of a function computing qcc.qlinear for one weight format and shape."""
    wmap, body, smap, consts = _code_expr(fmt)
    zero_arg = "" if fmt.symmetric else f", %zp: tensor<{s_shape[0]}x{s_shape[1]}xi8>"
    zero_in = "" if fmt.symmetric else ", %zp"
    zero_ty = "" if fmt.symmetric else f", tensor<{s_shape[0]}x{s_shape[1]}xi8>"
    zero_map = "" if fmt.symmetric else f", affine_map<{smap}>"
    zero_bb = "" if fmt.symmetric else ", %z: i8"
    return f"""
func.func private @{name}(%x: tensor<?x{k}xf32>, %wq: tensor<{w_shape[0]}x{w_shape[1]}xi8>,
                          %sc: tensor<{s_shape[0]}x{s_shape[1]}xf32>{zero_arg}) -> tensor<?x{n}xf32> {{
  %c0 = arith.constant 0 : index
  %c2 = arith.constant 2 : index
  %c4_i8 = arith.constant 4 : i8
  %c15_i8 = arith.constant 15 : i8
  %zero = arith.constant 0.0 : f32
{consts}  %m = tensor.dim %x, %c0 : tensor<?x{k}xf32>
  %init = tensor.empty(%m) : tensor<?x{n}xf32>
  %acc = linalg.fill ins(%zero : f32) outs(%init : tensor<?x{n}xf32>) -> tensor<?x{n}xf32>
  %y = linalg.generic {{
      indexing_maps = [affine_map<(m, n, k) -> (m, k)>, affine_map<{wmap}>, affine_map<{smap}>{zero_map},
                       affine_map<(m, n, k) -> (m, n)>],
      iterator_types = ["parallel", "parallel", "reduction"]}}
      ins(%x, %wq, %sc{zero_in} : tensor<?x{k}xf32>, tensor<{w_shape[0]}x{w_shape[1]}xi8>, tensor<{s_shape[0]}x{s_shape[1]}xf32>{zero_ty})
      outs(%acc : tensor<?x{n}xf32>) {{
  ^bb0(%xv: f32, %w: i8, %s: f32{zero_bb}, %out: f32):
{body}    %wf = arith.mulf %code, %s : f32
    %p = arith.mulf %xv, %wf : f32
    %sum = arith.addf %out, %p : f32
    linalg.yield %sum : f32
  }} -> tensor<?x{n}xf32>
  return %y : tensor<?x{n}xf32>
}}
"""


def _expert_index(experts: int) -> str:
    """Body lines: %e (index) = the expert of %id (i64) as torch indexes, -1 the last; then
    clamped into [0, E) (memory safety: torch raises there), as the CPU's gathered kernels do."""
    return (f"    %cE = arith.constant {experts} : i64\n"
            f"    %clast = arith.constant {experts - 1} : index\n"
            "    %cz = arith.constant 0 : i64\n"
            "    %neg = arith.cmpi slt, %id, %cz : i64\n"
            "    %wrapped = arith.addi %id, %cE : i64\n"
            "    %idw = arith.select %neg, %wrapped, %id : i64\n"
            "    %ei = arith.index_cast %idw : i64 to index\n"
            "    %e = arith.minui %ei, %clast : index\n")


def gather_dequantize_kernel(name: str, fmt, n: int, k: int, w_shape, s_shape) -> str:
    """MLIR text of qcc.gather_dequantize for one format and shape: one parallel generic over
    (token, n, k) reading the token's expert rows with tensor.extract."""
    _, body, _, consts = _code_expr(fmt)  # needs %w (and %z) as i8; defines %k = linalg.index 2
    w_ty = "x".join(map(str, w_shape)) + "xi8"
    s_ty = "x".join(map(str, s_shape))
    zero_arg = "" if fmt.symmetric else f", %zp: tensor<{s_ty}xi8>"
    col = "%kk2" if fmt.bits == 4 else "%kk"
    group = "%c0" if fmt.granularity == "channel" else "%g"
    zero_load = "" if fmt.symmetric else f"    %z = tensor.extract %zp[%e, %nn, {group}] : tensor<{s_ty}xi8>\n"
    return f"""
func.func private @{name}(%ids: tensor<?xi64>, %wq: tensor<{w_ty}>, %sc: tensor<{s_ty}xf32>{zero_arg})
    -> tensor<?x{n}x{k}xf32> {{
  %c0 = arith.constant 0 : index
  %c2 = arith.constant 2 : index
  %cg = arith.constant {fmt.group_size if fmt.granularity == "group" else 1} : index
  %c4_i8 = arith.constant 4 : i8
  %c15_i8 = arith.constant 15 : i8
{consts}  %t = tensor.dim %ids, %c0 : tensor<?xi64>
  %init = tensor.empty(%t) : tensor<?x{n}x{k}xf32>
  %y = linalg.generic {{
      indexing_maps = [affine_map<(t, n, k) -> (t)>, affine_map<(t, n, k) -> (t, n, k)>],
      iterator_types = ["parallel", "parallel", "parallel"]}}
      ins(%ids : tensor<?xi64>) outs(%init : tensor<?x{n}x{k}xf32>) {{
  ^bb0(%id: i64, %out: f32):
{_expert_index(w_shape[0])}    %nn = linalg.index 1 : index
    %kk = linalg.index 2 : index
    %kk2 = arith.divui %kk, %c2 : index
    %g = arith.divui %kk, %cg : index
    %w = tensor.extract %wq[%e, %nn, {col}] : tensor<{w_ty}>
    %s = tensor.extract %sc[%e, %nn, {group}] : tensor<{s_ty}xf32>
{zero_load}{body}    %v = arith.mulf %code, %s : f32
    linalg.yield %v : f32
  }} -> tensor<?x{n}x{k}xf32>
  return %y : tensor<?x{n}x{k}xf32>
}}
"""


def dequantize_kernel(name: str, fmt, n: int, k: int, w_shape, s_shape) -> str:
    """MLIR text of qcc.dequantize of a weight format: codes [N, K packed], scale / zero
    [N or 1, groups] -> w [N, K] f32, one parallel generic over (n, k)."""
    wmap, body, smap, consts = _code_expr(fmt)
    two_d = {"(m, n, k)": "(n, k)", "linalg.index 2": "linalg.index 1"}
    for old, new in two_d.items():
        wmap, body, smap = wmap.replace(old, new), body.replace(old, new), smap.replace(old, new)
    w_ty, s_ty = "x".join(map(str, w_shape)) + "xi8", "x".join(map(str, s_shape))
    zero = not fmt.symmetric
    ins = "%wq, %sc" + (", %zp" if zero else "")
    tys = f"tensor<{w_ty}>, tensor<{s_ty}xf32>" + (f", tensor<{s_ty}xi8>" if zero else "")
    maps = [f"affine_map<{wmap}>", f"affine_map<{smap}>"] + ([f"affine_map<{smap}>"] if zero else []) + \
        ["affine_map<(n, k) -> (n, k)>"]
    return f"""
func.func private @{name}(%wq: tensor<{w_ty}>, %sc: tensor<{s_ty}xf32>{f", %zp: tensor<{s_ty}xi8>" if zero else ""})
    -> tensor<{n}x{k}xf32> {{
  %c2 = arith.constant 2 : index
  %c4_i8 = arith.constant 4 : i8
  %c15_i8 = arith.constant 15 : i8
{consts}  %init = tensor.empty() : tensor<{n}x{k}xf32>
  %y = linalg.generic {{indexing_maps = [{", ".join(maps)}], iterator_types = ["parallel", "parallel"]}}
      ins({ins} : {tys}) outs(%init : tensor<{n}x{k}xf32>) {{
  ^bb0(%w: i8, %s: f32{", %z: i8" if zero else ""}, %out: f32):
{body}    %v = arith.mulf %code, %s : f32
    linalg.yield %v : f32
  }} -> tensor<{n}x{k}xf32>
  return %y : tensor<{n}x{k}xf32>
}}
"""


def _scale_map(fmt, dims: str = "(m, n, k)", n: str = "n", g: str | None = None) -> str:
    """Affine map from the iteration `dims` to a weight scale/zero of `fmt`'s granularity."""
    if fmt.granularity == "tensor":
        return f"{dims} -> (0, 0)"
    if fmt.granularity == "channel":
        return f"{dims} -> ({n}, 0)"
    return f"{dims} -> ({n}, {g})"


def _act_codes_body(fmt) -> tuple[str, str]:
    """(constants, body) turning f32 %xv and its scale %s into the i8 code %code."""
    qmin, qmax = fmt.levels()
    consts = (f"  %cqmin = arith.constant {float(qmin)} : f32\n"
              f"  %cqmax = arith.constant {float(qmax)} : f32\n")
    body = ("    %d = arith.divf %xv, %s : f32\n"
            "    %r = math.roundeven %d : f32\n"
            "    %lo = arith.maximumf %r, %cqmin : f32\n"
            "    %hi = arith.minimumf %lo, %cqmax : f32\n"
            "    %code = arith.fptosi %hi : f32 to i8\n")
    return consts, body


def quantize_dynamic_kernel(name: str, fmt, k: int) -> str:
    """Per-token quantization: amax over each row, scale = (amax [* clip]) / qmax (0 -> 1), codes."""
    consts, body = _act_codes_body(fmt)
    clip, amax = "", "%a"
    if fmt.clip != 1.0:
        consts += f"  %cclip = arith.constant {float(fmt.clip)!r} : f32\n"
        clip, amax = "    %ac = arith.mulf %a, %cclip : f32\n", "%ac"
    return f"""
func.func private @{name}(%x: tensor<?x{k}xf32>) -> (tensor<?x{k}xi8>, tensor<?x1xf32>) {{
  %c0 = arith.constant 0 : index
  %zero = arith.constant 0.0 : f32
  %one = arith.constant 1.0 : f32
{consts}  %m = tensor.dim %x, %c0 : tensor<?x{k}xf32>
  %e = tensor.empty(%m) : tensor<?x1xf32>
  %init = linalg.fill ins(%zero : f32) outs(%e : tensor<?x1xf32>) -> tensor<?x1xf32>
  %amax = linalg.generic {{
      indexing_maps = [affine_map<(m, k) -> (m, k)>, affine_map<(m, k) -> (m, 0)>],
      iterator_types = ["parallel", "reduction"]}}
      ins(%x : tensor<?x{k}xf32>) outs(%init : tensor<?x1xf32>) {{
  ^bb0(%xv: f32, %acc: f32):
    %a = math.absf %xv : f32
    %mx = arith.maximumf %acc, %a : f32
    linalg.yield %mx : f32
  }} -> tensor<?x1xf32>
  %scale = linalg.generic {{
      indexing_maps = [affine_map<(m, o) -> (m, o)>, affine_map<(m, o) -> (m, o)>],
      iterator_types = ["parallel", "parallel"]}}
      ins(%amax : tensor<?x1xf32>) outs(%e : tensor<?x1xf32>) {{
  ^bb0(%a: f32, %unused: f32):
{clip}    %q = arith.divf {amax}, %cqmax : f32
    %is0 = arith.cmpf oeq, %q, %zero : f32
    %sc = arith.select %is0, %one, %q : f32
    linalg.yield %sc : f32
  }} -> tensor<?x1xf32>
  %ce = tensor.empty(%m) : tensor<?x{k}xi8>
  %codes = linalg.generic {{
      indexing_maps = [affine_map<(m, k) -> (m, k)>, affine_map<(m, k) -> (m, 0)>, affine_map<(m, k) -> (m, k)>],
      iterator_types = ["parallel", "parallel"]}}
      ins(%x, %scale : tensor<?x{k}xf32>, tensor<?x1xf32>) outs(%ce : tensor<?x{k}xi8>) {{
  ^bb0(%xv: f32, %s: f32, %unused: i8):
{body}    linalg.yield %code : i8
  }} -> tensor<?x{k}xi8>
  return %codes, %scale : tensor<?x{k}xi8>, tensor<?x1xf32>
}}
"""


def quantize_static_kernel(name: str, fmt, k: int) -> str:
    """Per-tensor quantization with a given [1, 1] scale."""
    consts, body = _act_codes_body(fmt)
    return f"""
func.func private @{name}(%x: tensor<?x{k}xf32>, %sc: tensor<1x1xf32>) -> tensor<?x{k}xi8> {{
  %c0 = arith.constant 0 : index
{consts}  %m = tensor.dim %x, %c0 : tensor<?x{k}xf32>
  %ce = tensor.empty(%m) : tensor<?x{k}xi8>
  %codes = linalg.generic {{
      indexing_maps = [affine_map<(m, k) -> (m, k)>, affine_map<(m, k) -> (0, 0)>, affine_map<(m, k) -> (m, k)>],
      iterator_types = ["parallel", "parallel"]}}
      ins(%x, %sc : tensor<?x{k}xf32>, tensor<1x1xf32>) outs(%ce : tensor<?x{k}xi8>) {{
  ^bb0(%xv: f32, %s: f32, %unused: i8):
{body}    linalg.yield %code : i8
  }} -> tensor<?x{k}xi8>
  return %codes : tensor<?x{k}xi8>
}}
"""


def _unpack_int4_kernel_text(n: int, k: int, symmetric: bool) -> str:
    """Lines computing %wu: tensor<NxKxi8>, the int4 codes of packed %wq unpacked to one byte each.

    Symmetric nibbles hold code + 8 and come back as signed codes -8..7;
    asymmetric ones stay 0..15 (the zero point is subtracted later).
    """
    bias = ("    %code = arith.subi %nibble, %c8_i8 : i8\n    linalg.yield %code : i8\n" if symmetric
            else "    linalg.yield %nibble : i8\n")
    return f"""  %wue = tensor.empty() : tensor<{n}x{k}xi8>
  %wu = linalg.generic {{
      indexing_maps = [affine_map<(n, k) -> (n, k floordiv 2)>, affine_map<(n, k) -> (n, k)>],
      iterator_types = ["parallel", "parallel"]}}
      ins(%wq : tensor<{n}x{(k + 1) // 2}xi8>) outs(%wue : tensor<{n}x{k}xi8>) {{
  ^bb0(%w: i8, %unused: i8):
    %k = linalg.index 1 : index
    %odd = arith.remui %k, %c2 : index
    %odd_i8 = arith.index_cast %odd : index to i8
    %shift = arith.muli %odd_i8, %c4_i8 : i8
    %shifted = arith.shrui %w, %shift : i8
    %nibble = arith.andi %shifted, %c15_i8 : i8
{bias}  }} -> tensor<{n}x{k}xi8>
"""


def matmul_int_kernel(name: str, fmt, k: int, n: int, w_shape, z_shape) -> str:
    """acc = xq @ (wq - z)^T in i32; per-group partial sums [M, N, K/G] for group formats.

    int4 weights are first unpacked to one i8 code a byte, so the contraction
    is always i8 x i8 -> i32 (extsi, muli, addi; extui for unsigned int8
    codes).  Group formats view xq as [M, K/G, G] and the weight as [N, K/G, G]
    (tensor.expand_shape), so each group's partial sum is a plain reduction over j.
    """
    grouped = fmt.granularity == "group"
    w_ty = f"tensor<{w_shape[0]}x{w_shape[1]}xi8>"
    x_ty = f"tensor<?x{k}xi8>"
    wk_ty = f"tensor<{n}x{k}xi8>"  # the weight codes, one a byte
    unpack = _unpack_int4_kernel_text(n, k, fmt.symmetric) if fmt.bits == 4 else ""
    w_codes = "%wu" if fmt.bits == 4 else "%wq"
    w_ext = "arith.extui" if fmt.bits == 8 and not fmt.symmetric else "arith.extsi"
    if grouped:
        gs = fmt.group_size
        ngroups = k // gs
        xg_ty, wg_ty = f"tensor<?x{ngroups}x{gs}xi8>", f"tensor<{n}x{ngroups}x{gs}xi8>"
        views = (f"  %xg = tensor.expand_shape %xq [[0], [1, 2]] output_shape [%m, {ngroups}, {gs}]"
                 f" : {x_ty} into {xg_ty}\n"
                 f"  %wg = tensor.expand_shape {w_codes} [[0], [1, 2]] output_shape [{n}, {ngroups}, {gs}]"
                 f" : {wk_ty} into {wg_ty}\n")
        x_in, w_in, x_in_ty, w_in_ty = "%xg", "%wg", xg_ty, wg_ty
        dims, iters = "(m, n, g, j)", '["parallel", "parallel", "parallel", "reduction"]'
        xmap, wmap = f"{dims} -> (m, g, j)", f"{dims} -> (n, g, j)"
        acc_ty, acc_out = f"tensor<?x{n}x{ngroups}xi32>", "(m, n, g)"
    else:
        views = ""
        x_in, w_in, x_in_ty, w_in_ty = "%xq", w_codes, x_ty, wk_ty
        dims, iters = "(m, n, k)", '["parallel", "parallel", "reduction"]'
        xmap, wmap = f"{dims} -> (m, k)", f"{dims} -> (n, k)"
        acc_ty, acc_out = f"tensor<?x{n}xi32>", "(m, n)"
    zero_arg = "" if fmt.symmetric else f", %zp: tensor<{z_shape[0]}x{z_shape[1]}xi8>"
    text = f"""
func.func private @{name}(%xq: {x_ty}, %wq: {w_ty}{zero_arg}) -> {acc_ty} {{
  %c0 = arith.constant 0 : index
  %c2 = arith.constant 2 : index
  %c4_i8 = arith.constant 4 : i8
  %c8_i8 = arith.constant 8 : i8
  %c15_i8 = arith.constant 15 : i8
  %zero = arith.constant 0 : i32
  %m = tensor.dim %xq, %c0 : {x_ty}
{unpack}{views}  %e = tensor.empty(%m) : {acc_ty}
  %init = linalg.fill ins(%zero : i32) outs(%e : {acc_ty}) -> {acc_ty}
  %acc = linalg.generic {{
      indexing_maps = [affine_map<{xmap}>, affine_map<{wmap}>, affine_map<{dims} -> {acc_out}>],
      iterator_types = {iters}}}
      ins({x_in}, {w_in} : {x_in_ty}, {w_in_ty}) outs(%init : {acc_ty}) {{
  ^bb0(%xv: i8, %w: i8, %out: i32):
    %xi = arith.extsi %xv : i8 to i32
    %wi = {w_ext} %w : i8 to i32
    %p = arith.muli %xi, %wi : i32
    %sum = arith.addi %out, %p : i32
    linalg.yield %sum : i32
  }} -> {acc_ty}
"""
    if fmt.symmetric:
        return text + f"  return %acc : {acc_ty}\n}}\n"
    # Asymmetric weights: sum_k xq * (wq - z) = sum_k xq * wq - z * sum_k xq, all in i32.
    if grouped:
        rs_ty = f"tensor<?x{ngroups}xi32>"
        rs_dims, rs_iters = "(m, g, j)", '["parallel", "parallel", "reduction"]'
        rs_in, rs_out = "(m, g, j)", "(m, g)"
        c_dims, c_iters = "(m, n, g)", '["parallel", "parallel", "parallel"]'
        c_acc, c_z, c_rs = "(m, n, g)", _scale_map(fmt, c_dims, g="g"), "(m, g)"
    else:
        rs_ty = "tensor<?x1xi32>"
        rs_dims, rs_iters = "(m, k)", '["parallel", "reduction"]'
        rs_in, rs_out = "(m, k)", "(m, 0)"
        c_dims, c_iters = "(m, n)", '["parallel", "parallel"]'
        c_acc, c_z, c_rs = "(m, n)", _scale_map(fmt, c_dims), "(m, 0)"
    z_ty = f"tensor<{z_shape[0]}x{z_shape[1]}xi8>"
    return text + f"""  %rse = tensor.empty(%m) : {rs_ty}
  %rsi = linalg.fill ins(%zero : i32) outs(%rse : {rs_ty}) -> {rs_ty}
  %rowsum = linalg.generic {{
      indexing_maps = [affine_map<{rs_dims} -> {rs_in}>, affine_map<{rs_dims} -> {rs_out}>],
      iterator_types = {rs_iters}}}
      ins({x_in} : {x_in_ty}) outs(%rsi : {rs_ty}) {{
  ^bb0(%xv: i8, %out: i32):
    %xi = arith.extsi %xv : i8 to i32
    %sum = arith.addi %out, %xi : i32
    linalg.yield %sum : i32
  }} -> {rs_ty}
  %corrected = linalg.generic {{
      indexing_maps = [affine_map<{c_dims} -> {c_acc}>, affine_map<{c_z}>, affine_map<{c_dims} -> {c_rs}>,
                       affine_map<{c_dims} -> {c_acc}>],
      iterator_types = {c_iters}}}
      ins(%acc, %zp, %rowsum : {acc_ty}, {z_ty}, {rs_ty}) outs(%e : {acc_ty}) {{
  ^bb0(%a: i32, %z: i8, %rs: i32, %unused: i32):
    %zi = arith.extui %z : i8 to i32
    %zx = arith.muli %zi, %rs : i32
    %c = arith.subi %a, %zx : i32
    linalg.yield %c : i32
  }} -> {acc_ty}
  return %corrected : {acc_ty}
}}
"""


def scale_accumulate_kernel(name: str, n: int, acc_shape, sx_per_row: bool, sw_shape) -> str:
    """y[m, n] = sum_g f32(acc[m, n, g]) * sx[m] * sw[n, g] (rank-2 acc: a single term)."""
    grouped = len(acc_shape) == 3
    sx_ty = "tensor<?x1xf32>" if sx_per_row else "tensor<1x1xf32>"
    sw_ty = f"tensor<{sw_shape[0]}x{sw_shape[1]}xf32>"
    y_ty = f"tensor<?x{n}xf32>"
    if grouped:
        dims, iters = "(m, n, g)", '["parallel", "parallel", "reduction"]'
        acc_ty, acc_map = f"tensor<?x{n}x{acc_shape[2]}xi32>", "(m, n, g)"
        sw_map = f"{dims} -> (n, g)" if sw_shape[1] > 1 else f"{dims} -> ({'n' if sw_shape[0] > 1 else '0'}, 0)"
        body = ("    %t = arith.mulf %af, %sw : f32\n"
                "    %u = arith.mulf %t, %sx : f32\n"
                "    %y = arith.addf %out, %u : f32\n")
    else:
        dims, iters = "(m, n)", '["parallel", "parallel"]'
        acc_ty, acc_map = f"tensor<?x{n}xi32>", "(m, n)"
        sw_map = f"{dims} -> ({'n' if sw_shape[0] > 1 else '0'}, 0)"
        body = ("    %t = arith.mulf %af, %sx : f32\n"
                "    %y = arith.mulf %t, %sw : f32\n")
    sx_map = f"{dims} -> ({'m' if sx_per_row else '0'}, 0)"
    return f"""
func.func private @{name}(%acc: {acc_ty}, %sxs: {sx_ty}, %sws: {sw_ty}) -> {y_ty} {{
  %c0 = arith.constant 0 : index
  %zero = arith.constant 0.0 : f32
  %m = tensor.dim %acc, %c0 : {acc_ty}
  %e = tensor.empty(%m) : {y_ty}
  %init = linalg.fill ins(%zero : f32) outs(%e : {y_ty}) -> {y_ty}
  %y = linalg.generic {{
      indexing_maps = [affine_map<{dims} -> {acc_map}>, affine_map<{sx_map}>, affine_map<{sw_map}>,
                       affine_map<{dims} -> (m, n)>],
      iterator_types = {iters}}}
      ins(%acc, %sxs, %sws : {acc_ty}, {sx_ty}, {sw_ty}) outs(%init : {y_ty}) {{
  ^bb0(%a: i32, %sx: f32, %sw: f32, %out: f32):
    %af = arith.sitofp %a : i32 to f32
{body}    linalg.yield %y : f32
  }} -> {y_ty}
  return %y : {y_ty}
}}
"""


def _weight_code_i32(fmt) -> str:
    """Body lines turning the extracted code byte %w (and zero point %z) into %code: i32, the
    integer the weight's value is a multiple of (int4: the nibble at %kk's parity)."""
    if fmt.bits == 8 and fmt.symmetric:
        return "    %code = arith.extsi %w : i8 to i32\n"
    if fmt.bits == 8:
        body = "    %code0 = arith.extui %w : i8 to i32\n"
    else:
        body = ("    %odd = arith.remui %kk, %c2 : index\n"
                "    %odd_i8 = arith.index_cast %odd : index to i8\n"
                "    %shift = arith.muli %odd_i8, %c4_i8 : i8\n"
                "    %shifted = arith.shrui %w, %shift : i8\n"
                "    %nibble = arith.andi %shifted, %c15_i8 : i8\n"
                "    %code0 = arith.extui %nibble : i8 to i32\n")
    if fmt.symmetric:  # int4 nibbles hold code + 8
        return body + "    %code = arith.subi %code0, %c8_i32 : i32\n"
    return body + "    %zi = arith.extui %z : i8 to i32\n    %code = arith.subi %code0, %zi : i32\n"


def gather_matmul_int_kernel(name: str, fmt, k: int, n: int, w_shape, z_shape) -> str:
    """acc[t, n(, g)] = sum_k xq[t, k] * (codes[ids[t], n, k] - z) in i32: one generic whose body
    extracts each token's expert's code (the reference; the CPU's gathered kernel is the fast form)."""
    grouped = fmt.granularity == "group"
    w_ty = "x".join(map(str, w_shape)) + "xi8"
    x_ty = f"tensor<?x{k}xi8>"
    if grouped:
        gs, ng = fmt.group_size, k // fmt.group_size
        xg_ty = f"tensor<?x{ng}x{gs}xi8>"
        view = f"  %xg = tensor.expand_shape %xq [[0], [1, 2]] output_shape [%m, {ng}, {gs}] : {x_ty} into {xg_ty}\n"
        dims, iters = "(t, n, g, j)", '["parallel", "parallel", "parallel", "reduction"]'
        x_in, x_in_ty, xmap = "%xg", xg_ty, "(t, g, j)"
        acc_ty, acc_out = f"tensor<?x{n}x{ng}xi32>", "(t, n, g)"
        index = (f"    %g = linalg.index 2 : index\n    %j = linalg.index 3 : index\n"
                 f"    %kk = affine.apply affine_map<(g, j) -> (g * {gs} + j)>(%g, %j)\n")
        group = "%g"
    else:
        view = ""
        dims, iters = "(t, n, k)", '["parallel", "parallel", "reduction"]'
        x_in, x_in_ty, xmap = "%xq", x_ty, "(t, k)"
        acc_ty, acc_out = f"tensor<?x{n}xi32>", "(t, n)"
        index, group = "    %kk = linalg.index 2 : index\n", "%c0"
    col = "%kk2" if fmt.bits == 4 else "%kk"
    zero_arg = "" if fmt.symmetric else f", %zp: tensor<{'x'.join(map(str, z_shape))}xi8>"
    zero_load = "" if fmt.symmetric else \
        f"    %z = tensor.extract %zp[%e, %nn, {group}] : tensor<{'x'.join(map(str, z_shape))}xi8>\n"
    return f"""
func.func private @{name}(%xq: {x_ty}, %ids: tensor<?xi64>, %wq: tensor<{w_ty}>{zero_arg}) -> {acc_ty} {{
  %c0 = arith.constant 0 : index
  %c2 = arith.constant 2 : index
  %c4_i8 = arith.constant 4 : i8
  %c15_i8 = arith.constant 15 : i8
  %c0_i32 = arith.constant 0 : i32
  %c8_i32 = arith.constant 8 : i32
  %m = tensor.dim %xq, %c0 : {x_ty}
{view}  %e0 = tensor.empty(%m) : {acc_ty}
  %init = linalg.fill ins(%c0_i32 : i32) outs(%e0 : {acc_ty}) -> {acc_ty}
  %acc = linalg.generic {{
      indexing_maps = [affine_map<{dims} -> {xmap}>, affine_map<{dims} -> (t)>, affine_map<{dims} -> {acc_out}>],
      iterator_types = {iters}}}
      ins({x_in}, %ids : {x_in_ty}, tensor<?xi64>) outs(%init : {acc_ty}) {{
  ^bb0(%xv: i8, %id: i64, %out: i32):
{_expert_index(w_shape[0])}    %nn = linalg.index 1 : index
{index}    %kk2 = arith.divui %kk, %c2 : index
    %w = tensor.extract %wq[%e, %nn, {col}] : tensor<{w_ty}>
{zero_load}{_weight_code_i32(fmt)}    %xi = arith.extsi %xv : i8 to i32
    %p = arith.muli %xi, %code : i32
    %sum = arith.addi %out, %p : i32
    linalg.yield %sum : i32
  }} -> {acc_ty}
  return %acc : {acc_ty}
}}
"""


def gather_scale_accumulate_kernel(name: str, n: int, acc_shape, sx_per_row: bool, sw_shape) -> str:
    """y[t, n] = sum_g f32(acc[t, n, g]) * sx[t] * sw[ids[t], n, g], in scale_accumulate's order."""
    grouped = len(acc_shape) == 3
    sx_ty = "tensor<?x1xf32>" if sx_per_row else "tensor<1x1xf32>"
    sw_ty = f"tensor<{'x'.join(map(str, sw_shape))}xf32>"
    y_ty = f"tensor<?x{n}xf32>"
    sx_map = f"({'t' if sx_per_row else '0'}, 0)"
    if grouped:
        dims, iters = "(t, n, g)", '["parallel", "parallel", "reduction"]'
        acc_ty, acc_map = f"tensor<?x{n}x{acc_shape[2]}xi32>", "(t, n, g)"
        group = "    %g = linalg.index 2 : index\n"
        body = ("    %u = arith.mulf %af, %sw : f32\n"
                "    %v = arith.mulf %u, %sx : f32\n"
                "    %y = arith.addf %out, %v : f32\n")
    else:
        dims, iters = "(t, n)", '["parallel", "parallel"]'
        acc_ty, acc_map = f"tensor<?x{n}xi32>", "(t, n)"
        group = "    %g = arith.constant 0 : index\n"
        body = ("    %u = arith.mulf %af, %sx : f32\n"
                "    %y = arith.mulf %u, %sw : f32\n")
    return f"""
func.func private @{name}(%acc: {acc_ty}, %sxs: {sx_ty}, %ids: tensor<?xi64>, %sws: {sw_ty}) -> {y_ty} {{
  %c0 = arith.constant 0 : index
  %zero = arith.constant 0.0 : f32
  %m = tensor.dim %acc, %c0 : {acc_ty}
  %e0 = tensor.empty(%m) : {y_ty}
  %init = linalg.fill ins(%zero : f32) outs(%e0 : {y_ty}) -> {y_ty}
  %y = linalg.generic {{
      indexing_maps = [affine_map<{dims} -> {acc_map}>, affine_map<{dims} -> {sx_map}>,
                       affine_map<{dims} -> (t)>, affine_map<{dims} -> (t, n)>],
      iterator_types = {iters}}}
      ins(%acc, %sxs, %ids : {acc_ty}, {sx_ty}, tensor<?xi64>) outs(%init : {y_ty}) {{
  ^bb0(%a: i32, %sx: f32, %id: i64, %out: f32):
{_expert_index(sw_shape[0])}    %nn = linalg.index 1 : index
{group}    %sw = tensor.extract %sws[%e, %nn, %g] : {sw_ty}
    %af = arith.sitofp %a : i32 to f32
{body}    linalg.yield %y : f32
  }} -> {y_ty}
  return %y : {y_ty}
}}
"""


def _dynamic_rows(t: ir.Type) -> ir.Type:
    """`t` with its leading (row / token) dim made dynamic, so kernels serve every M."""
    rt = ir.RankedTensorType(t)
    return irutil.tensor_type([None] + list(rt.shape[1:]), str(rt.element_type))


def _act_format(op, attr: str = "format"):
    try:
        fmt = activation.parse_act_format(format_key(op.attributes[attr]))
    except formats.FormatError as e:
        raise PassError(op, str(e))
    if fmt is None:
        raise PassError(op, f"'{op.name}' needs an activation format, got \"none\"")
    return fmt


def _weight_format(op):
    return _weight_format_of(op, "weight_format")


def _weight_format_of(op, attr: str):
    try:
        return formats.parse_weight_format(format_key(op.attributes[attr]))
    except formats.FormatError as e:
        raise PassError(op, str(e))


@register
class LowerQccToLinalg(QccPass):
    name = "lower-qcc-to-linalg"
    summary = "Lower qcc ops to linalg/arith on tensors (fused dequantization, integer GEMM)"

    @dataclasses.dataclass
    class Options:
        pass

    def run(self, module):
        self.body = module.regions[0].blocks[0]
        self.defined = {}
        lowerings = {
            "qcc.qlinear": self._lower_qlinear,
            "qcc.quantize_dynamic": self._lower_quantize_dynamic,
            "qcc.quantize": self._lower_quantize,
            "qcc.matmul_int": self._lower_matmul_int,
            "qcc.scale_accumulate": self._lower_scale_accumulate,
            "qcc.gather_dequantize": self._lower_gather_dequantize,
            "qcc.gather_matmul_int": self._lower_gather_matmul_int,
            "qcc.gather_scale_accumulate": self._lower_gather_scale_accumulate,
            "qcc.dequantize": self._lower_dequantize,
        }
        for func in irutil.functions(module):
            for op in irutil.walk(func):
                if op.name in lowerings:
                    lowerings[op.name](op)
                elif op.name.startswith("qcc."):
                    raise PassError(op, f"no CPU lowering for '{op.name}' yet")

    def _kernel(self, name: str, make_text) -> None:
        """Defines private func @name (from make_text()) once per module."""
        if name not in self.defined:
            kernel = ir.Module.parse(make_text())  # must outlive the move below
            func = kernel.body.operations[0]
            func.operation.move_after(self.body.operations[len(self.body.operations) - 1])
            self.defined[name] = func

    def _call(self, op, name: str, operands, dyn_operands: set[int], dyn_results: set[int]) -> None:
        """Replaces `op` by a call of @name; operands/results at the given positions get dynamic rows."""
        with ir.InsertionPoint(op), op.location:
            args = []
            for i, v in enumerate(operands):
                if i in dyn_operands:
                    v = ir.Operation.create("tensor.cast", results=[_dynamic_rows(v.type)], operands=[v]).result
                args.append(v)
            result_types = [_dynamic_rows(r.type) if i in dyn_results else r.type for i, r in enumerate(op.results)]
            call = ir.Operation.create("func.call", results=result_types, operands=args,
                                       attributes={"callee": ir.FlatSymbolRefAttr.get(name)})
            outs = []
            for i, r in enumerate(op.results):
                v = call.results[i]
                if i in dyn_results:
                    v = ir.Operation.create("tensor.cast", results=[r.type], operands=[v]).result
                outs.append(v)
        for r, v in zip(op.results, outs):
            r.replace_all_uses_with(v)
        op.erase()

    def _lower_qlinear(self, op):
        fmt = _weight_format(op)
        if format_key(op.attributes["act_format"]) != "none":
            raise PassError(op, "quantized activations reach lower-qcc-to-linalg; run dequant-after-gemm first")
        x, w, s = op.operands[0], op.operands[1], op.operands[2]
        k = irutil.tensor_shape(x)[1]
        n = irutil.tensor_shape(op.result)[1]
        w_shape, s_shape = irutil.tensor_shape(w), irutil.tensor_shape(s)
        name = f"qcc_qlinear_{fmt.key()}_{k}x{n}"
        self._kernel(name, lambda: qlinear_kernel(name, fmt, k, n, w_shape, s_shape))
        self._call(op, name, list(op.operands), {0}, {0})

    def _lower_gather_dequantize(self, op):
        fmt = _weight_format_of(op, "format")
        w_shape, s_shape = irutil.tensor_shape(op.operands[1]), irutil.tensor_shape(op.operands[2])
        _, n, k = irutil.tensor_shape(op.result)
        name = f"qcc_gather_dequantize_{fmt.key()}_{'x'.join(map(str, w_shape))}"
        self._kernel(name, lambda: gather_dequantize_kernel(name, fmt, n, k, w_shape, s_shape))
        self._call(op, name, list(op.operands), {0}, {0})

    def _lower_dequantize(self, op):
        fmt = _weight_format_of(op, "format")
        w_shape, s_shape = irutil.tensor_shape(op.operands[0]), irutil.tensor_shape(op.operands[1])
        n, k = irutil.tensor_shape(op.result)
        name = f"qcc_dequantize_{fmt.key()}_{n}x{k}"
        self._kernel(name, lambda: dequantize_kernel(name, fmt, n, k, w_shape, s_shape))
        self._call(op, name, list(op.operands), set(), set())

    def _lower_quantize_dynamic(self, op):
        fmt = _act_format(op)
        if not fmt.dynamic:
            raise PassError(op, f"qcc.quantize_dynamic needs a per-token format, got \"{fmt.key()}\"")
        k = irutil.tensor_shape(op.operands[0])[1]
        name = f"qcc_quantize_{fmt.key()}_{k}"
        self._kernel(name, lambda: quantize_dynamic_kernel(name, fmt, k))
        self._call(op, name, list(op.operands), {0}, {0, 1})

    def _lower_quantize(self, op):
        key = format_key(op.attributes["format"])
        if key not in activation.ACT_FORMATS:
            raise PassError(op, f"no CPU lowering for qcc.quantize to \"{key}\" (only static activation formats)")
        fmt = activation.ACT_FORMATS[key]
        if fmt.dynamic:
            raise PassError(op, f"\"{key}\" is per token: use qcc.quantize_dynamic")
        if len(op.operands) != 2 or irutil.tensor_shape(op.operands[1]) != [1, 1]:
            raise PassError(op, f"qcc.quantize to \"{key}\" takes (x, scale: tensor<1x1xf32>)")
        k = irutil.tensor_shape(op.operands[0])[1]
        name = f"qcc_quantize_{key}_{k}"
        self._kernel(name, lambda: quantize_static_kernel(name, fmt, k))
        self._call(op, name, list(op.operands), {0}, {0})

    def _lower_matmul_int(self, op):
        fmt = _weight_format(op)
        _act_format(op, "act_format")
        xq, wq = op.operands[0], op.operands[1]
        k = irutil.tensor_shape(xq)[1]
        n = irutil.tensor_shape(op.result)[1]
        w_shape = irutil.tensor_shape(wq)
        want_rank = 3 if fmt.granularity == "group" else 2
        if len(irutil.tensor_shape(op.result)) != want_rank:
            raise PassError(op, f"qcc.matmul_int with {fmt.key()} weights has a rank-{want_rank} accumulator")
        if fmt.symmetric != (len(op.operands) == 2):
            raise PassError(op, f"{fmt.key()} weights take {'no' if fmt.symmetric else 'a'} zero-point operand")
        z_shape = None if fmt.symmetric else irutil.tensor_shape(op.operands[2])
        name = f"qcc_matmul_int_{fmt.key()}_{k}x{n}"
        self._kernel(name, lambda: matmul_int_kernel(name, fmt, k, n, w_shape, z_shape))
        self._call(op, name, list(op.operands), {0}, {0})

    def _lower_scale_accumulate(self, op):
        acc, sx, sw = op.operands
        acc_shape, sx_shape, sw_shape = irutil.tensor_shape(acc), irutil.tensor_shape(sx), irutil.tensor_shape(sw)
        n = acc_shape[1]
        sx_per_row = sx_shape != [1, 1]
        name = (f"qcc_scale_accumulate_{'x'.join(map(str, acc_shape[1:]))}_"
                f"{'row' if sx_per_row else 'tensor'}_{sw_shape[0]}x{sw_shape[1]}")
        self._kernel(name, lambda: scale_accumulate_kernel(name, n, acc_shape, sx_per_row, sw_shape))
        self._call(op, name, list(op.operands), {0, 1} if sx_per_row else {0}, {0})

    def _lower_gather_matmul_int(self, op):
        fmt = _weight_format(op)
        _act_format(op, "act_format")
        xq, wq = op.operands[0], op.operands[2]
        k = irutil.tensor_shape(xq)[1]
        n = irutil.tensor_shape(op.result)[1]
        w_shape = irutil.tensor_shape(wq)
        if fmt.granularity == "tensor":
            raise PassError(op, f"experts' weights are quantized per row or group, not {fmt.key()}")
        if fmt.symmetric != (len(op.operands) == 3):
            raise PassError(op, f"{fmt.key()} weights take {'no' if fmt.symmetric else 'a'} zero-point operand")
        z_shape = None if fmt.symmetric else irutil.tensor_shape(op.operands[3])
        name = f"qcc_gather_matmul_int_{fmt.key()}_{'x'.join(map(str, w_shape))}"
        self._kernel(name, lambda: gather_matmul_int_kernel(name, fmt, k, n, w_shape, z_shape))
        self._call(op, name, list(op.operands), {0, 1}, {0})

    def _lower_gather_scale_accumulate(self, op):
        acc, sx, ids, sw = op.operands
        acc_shape, sw_shape = irutil.tensor_shape(acc), irutil.tensor_shape(sw)
        sx_per_row = irutil.tensor_shape(sx) != [1, 1]
        name = (f"qcc_gather_scale_accumulate_{'x'.join(map(str, acc_shape[1:]))}_"
                f"{'row' if sx_per_row else 'tensor'}_{'x'.join(map(str, sw_shape))}")
        self._kernel(name, lambda: gather_scale_accumulate_kernel(name, acc_shape[1], acc_shape, sx_per_row, sw_shape))
        self._call(op, name, list(op.operands), {0, 1, 2} if sx_per_row else {0, 2}, {0})
