"""Launch one w4a16 (gemv_w4a16 / gemm_w4a16 / gemm_w4a16_wg) or int8 (gemv_i8 / gemm_i8 / gemm_i8_wg,
unscaled) kernel of a device bundle 5 times at M rows of random data, nothing else: the program to put
under Nsight Compute on the device, e.g.

    ncu --launch-skip 3 --launch-count 1 --section WarpStateStats --section SchedulerStats \
        python3 tools/launch_bundle_kernel.py gemm_w4a16_g128_k2048_n6144_m256_t2n8m2x3 256

(the bundle: `python tools/cuda_device_run.py build --prefill-sweep`, carried as .cuda_build; another
bundle folder as a third argument).
Needs numpy, torch and cuda-bindings only (the backend modules are loaded by path).
"""
import importlib.util, os, sys
import numpy as np, torch
spec = importlib.util.spec_from_file_location("cdr", os.path.join(os.path.dirname(__file__), "cuda_device_run.py"))
cdr = importlib.util.module_from_spec(spec); spec.loader.exec_module(cdr)
runtime, pack = cdr._load("runtime"), cdr._load("pack")
name, M = sys.argv[1], int(sys.argv[2])
rt = runtime.Runtime(); mod = runtime.load_bundle(sys.argv[3] if len(sys.argv) > 3 else ".cuda_build", rt)
c = mod.kernels[name]["config"]; K, N = c["K"], c["N"]
rng = np.random.default_rng(0)
if c["kind"] in ("gemv_i8", "gemm_i8", "gemm_i8_wg"):
    w = {"wq": torch.randint(-127, 128, (N, K), dtype=torch.int8, device="cuda")}
    x = torch.randint(-128, 128, (M, K), dtype=torch.int8, device="cuda")
    y = torch.empty(M, N, dtype=torch.int32, device="cuda")
else:
    P = pack.pack_w4a16(*cdr.w4_data(rng, K, N), 128, order=pack.w4_order(c["kind"]))
    w = {k: torch.from_numpy(np.ascontiguousarray(v)).cuda() for k, v in P.items()}
    x = torch.randn(M, K, dtype=torch.float16, device="cuda")
    y = torch.empty(M, N, dtype=torch.float32 if c.get("out_f32") else torch.float16, device="cuda")
b = mod.bind(name, x=x, y=y, M=M, **w)
for _ in range(5):
    b(sync=True)
print("ok", name, M)
