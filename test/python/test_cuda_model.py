"""CUDA backend, whole models: `qcc.compile(..., target="cuda")` end to end.

Without a GPU: the launch plan of each compiled model runs on the CPU, every launch
through the numpy SIMT emulator (backends/cuda/emulate.py), and must match PyTorch with
the bounds of the CPU tests -- float within 1e-4 of float64 PyTorch, weight-only recipes
within 1e-4 of PyTorch on the dequantized weights (the GEMV layers feed x to the tensor
cores as f16 hi + lo rows and return fp32, so no f16 rounding is involved), w8a8 within
1e-4 of the fake-quant reference of test_recipes (its integer matmuls run on gemv_i8, exact). Every generated kernel must assemble
with ptxas for sm_90a and sm_80 without spills or a stack frame, and the GPU runtime
(model_runtime.py: buffers, marshalled launches, CUDA graph capture) runs against a fake
driver that executes launches with the emulator. GPU tests skip without a device.
"""
from __future__ import annotations

import copy
import os
import re

import numpy as np
import pytest
import torch

import models
from oracles import rel_err
import qcc
from bench_models import DecodeStep, bench_llama
from qcc.backends.cuda import emulate, lowering, model_runtime, ptx, runtime, torch_ref
from qcc.reference import dequantized_weights

ROTATED = os.path.join(os.path.dirname(__file__), "..", "data", "fuse-rotation.json")  # recipe file: the pass alone


def f64(model, inputs):
    inputs = [x.double() if x.is_floating_point() else x for x in inputs]
    with torch.no_grad():
        out = model.double()(*inputs)
    return [o.numpy() for o in (out if isinstance(out, tuple) else (out,))]


def llama_block(seq=8, batch=1):
    m = models.LlamaBlock(hidden=256, heads=4, kv_heads=2, ffn=768, seed=2).eval()
    return m, m.example_inputs(batch=batch, seq=seq, seed=3)


def outlier_block(seq):
    """llama_block whose input has two residual channels 20x the rest (LLM.int8()'s outliers)."""
    m, (x,) = llama_block(seq=seq)
    x = x.clone()
    x[..., [7, 200]] *= 20.0
    return m, (x,)


def llama_model(seq=5):
    m = models.LlamaModel(vocab=512, hidden=256, layers=2, heads=4, kv_heads=2, ffn=768, max_seq=64,
                          seed=2).eval()
    return m, m.example_inputs(batch=1, seq=seq, seed=3)


def decode_step():
    step = DecodeStep(bench_llama(layers=1, hidden=256, ffn=768, heads=4, max_seq=160), 64).eval()
    return step, step.example_inputs()


def decode_step_f16_cache():
    step = DecodeStep(bench_llama(layers=1, hidden=256, ffn=768, heads=4, max_seq=160), 64,
                      cache_dtype=torch.float16).eval()
    return step, step.example_inputs()


def decode_step_gqa(cache_dtype=torch.float32):
    """Grouped-query attention (4 query heads on 2 KV heads) at decode."""
    model = models.LlamaModel(vocab=512, hidden=256, layers=1, heads=4, kv_heads=2, ffn=768, max_seq=160,
                              seed=4).eval()
    step = DecodeStep(model, 64, cache_dtype=cache_dtype).eval()
    return step, step.example_inputs()


class CausalSdpa(torch.nn.Module):
    """F.scaled_dot_product_attention as HF models call it: its decomposition has a boolean
    all() over each row of the mask (i1 values in a warp reduction) and a scaled k^T."""

    def forward(self, q, k, v):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)


class SdpaGqaDecode(torch.nn.Module):
    """One query row a head over a KV cache plus the new key / value, SDPA's own grouped-query
    form (enable_gqa: 8 query heads on 2 KV heads, no repeat_kv in the model)."""

    def forward(self, q, k_cache, v_cache, k, v):
        keys, values = torch.cat([k_cache, k], dim=2), torch.cat([v_cache, v], dim=2)
        return torch.nn.functional.scaled_dot_product_attention(q, keys, values, enable_gqa=True)


def sdpa_gqa_decode():
    g = torch.Generator().manual_seed(7)
    shapes = ((1, 8, 1, 32), (1, 2, 40, 32), (1, 2, 40, 32), (1, 2, 1, 32), (1, 2, 1, 32))
    return SdpaGqaDecode(), tuple(torch.randn(*s, generator=g) for s in shapes)


def sdpa(seq=16):
    g = torch.Generator().manual_seed(seq)
    return CausalSdpa(), tuple(torch.randn(1, 4, seq, 32, generator=g) for _ in range(3))


class GeluTanh(torch.nn.Module):
    """GPT-2's MLP activation: its constants reach the PTX as f32 literals (0.044715)."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(64, 96)

    def forward(self, x):
        return torch.nn.functional.gelu(self.fc(x), approximate="tanh")


def gelu_tanh():
    torch.manual_seed(5)
    return GeluTanh().eval(), (torch.randn(3, 64),)


def mlp():
    m = models.MLP(in_features=128, seed=2).eval()
    return m, m.example_inputs(batch=5, seed=3)


class GatheredExperts(torch.nn.Module):
    """Each token's expert weights gathered from a 3-D parameter, then bmm (the router's top-k,
    a sort, has no CUDA lowering: the expert ids are an input here)."""

    def __init__(self, e=4, n=96, k=128):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w = torch.nn.Parameter(torch.randn(e, n, k, generator=g) / k ** 0.5)

    def forward(self, x, ids):
        return torch.bmm(self.w[ids], x.unsqueeze(-1)).squeeze(-1)


def experts():
    return GatheredExperts().eval(), (torch.randn(6, 128), torch.tensor([0, 3, 1, 1, 2, 0]))


def complex_rope():
    from test_e2e import _ComplexRope

    g = torch.Generator().manual_seed(13)
    return _ComplexRope().eval(), (torch.randn(5, 3, 8, generator=g), torch.randn(5, 4, generator=g) * 3)


def weight_batches():
    from test_e2e import _WeightBatches

    return _WeightBatches().eval(), (torch.randn(3, 4, 128, generator=torch.Generator().manual_seed(15)),)


class HFCausalLM(torch.nn.Module):
    """A transformers causal LM's logits.  Its float64 copy runs grouped_mm experts as
    batched_mm (transformers' grouped_mm takes no float64 on the CPU)."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, ids):
        return self.lm(input_ids=ids, use_cache=False).logits

    def double(self):
        if getattr(self.lm.config, "_experts_implementation", None) == "grouped_mm":
            self.lm.set_experts_implementation("batched_mm")
        return super().double()


def hf_causal_lm(arch):
    import transformers as T

    common = dict(vocab_size=320, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    config = {"llama": lambda: T.LlamaConfig(**common),
              "mixtral": lambda: T.MixtralConfig(num_local_experts=4, num_experts_per_tok=2, **common),
              "llama4": lambda: T.Llama4TextConfig(num_local_experts=4, **common),
              "gpt_oss": lambda: T.GptOssConfig(num_local_experts=4, num_experts_per_tok=2, head_dim=32,
                                                **common)}[arch]()
    torch.manual_seed(0)
    model = HFCausalLM(T.AutoModelForCausalLM.from_config(config).eval()).eval()
    return model, (torch.randint(0, 320, (1, 10), generator=torch.Generator().manual_seed(6)),)


class RelativeBias(torch.nn.Module):
    """T5's relative position bias: |i - j| of integer positions (math.absi in the kernels)
    indexes a learned table."""

    def __init__(self, n=12, buckets=16):
        super().__init__()
        self.n = n
        self.table = torch.nn.Parameter(torch.randn(buckets, generator=torch.Generator().manual_seed(18)))

    def forward(self, scores):
        pos = torch.arange(self.n)
        distance = (pos[:, None] - pos[None, :]).abs().clamp(max=self.table.shape[0] - 1)
        return scores + self.table[distance]


def small_cnn():
    m = models.SmallCNN(seed=1).eval()
    return m, m.example_inputs(batch=1, size=8)


def gpt2_block():
    m = models.GPT2Block(hidden=128, heads=4, seed=2).eval()
    return m, m.example_inputs(batch=1, seq=4, seed=3)


CASES = {
    "block-float": (llama_block, "float"),
    "block-w4a16-g128": (llama_block, "w4a16-g128"),
    "block-w4a16-g128-m20": (lambda: llama_block(seq=10, batch=2), "w4a16-g128"),  # 40 split rows: m-tiles
    "block-w8a16": (llama_block, "w8a16"),
    "block-w4a16-g64-sym": (lambda: llama_block(seq=2), "w4a16-g64-sym"),  # scale_mode="weight"
    "block-w8a8": (lambda: llama_block(seq=4), "w8a8"),  # integer matmuls on gemv_i8 (dp4a)
    "block-w8a8-m20": (lambda: llama_block(seq=10, batch=2), "w8a8"),  # gemm_i8 (tensor cores)
    "block-llm-int8-dynamic": (lambda: outlier_block(seq=4), "llm-int8-dynamic"),  # run-time outlier columns
    "block-llm-int8-dynamic-m12": (lambda: outlier_block(seq=12), "llm-int8-dynamic"),  # 2 sparse-x launches
    "model-float": (llama_model, "float"),
    "model-float-s40": (lambda: llama_model(seq=40), "float"),  # tile_contract matmuls and attention
    "model-w4a16-g128": (llama_model, "w4a16-g128"),
    "decode-w4a16-g128": (decode_step, "w4a16-g128"),
    "decode-f16-cache-w4a16-g128": (decode_step_f16_cache, "w4a16-g128"),  # f16 inputs, widened in the plan
    "decode-gqa-float": (decode_step_gqa, "float"),  # repeat_kv folded into attention's reads
    "decode-gqa-f16-cache-w4a16-g128": (lambda: decode_step_gqa(torch.float16), "w4a16-g128"),
    "sdpa-causal-float": (sdpa, "float"),  # bool constants, shuffles of i1
    "sdpa-gqa-decode-float": (sdpa_gqa_decode, "float"),  # k^T scaled, heads mapped onto KV heads
    "gelu-tanh-float": (gelu_tanh, "float"),  # an f32 constant LLVM prints as a short decimal
    "mlp-w8a16": (mlp, "w8a16"),  # biases, GELU (erf): libdevice
    "gpt2-block-w4a16-g128": (gpt2_block, "w4a16-g128"),  # x @ W weights, LayerNorm, fused qkv
    "experts-w4a16-g128": (experts, "w4a16-g128"),  # a mixture of experts' weights gathered per token
    "cnn-w8a16": (small_cnn, "w8a16"),
    "rope-complex-float": (complex_rope, "float"),  # complex tensors as (re, im) pairs
    "relative-bias-float": (lambda: (RelativeBias().eval(), (torch.randn(2, 12, 12),)), "float"),  # integer abs
    "weight-batches-w4a16-g128": (weight_batches, "w4a16-g128"),  # Llama 4's experts: every token, every expert
    # transformers' models: the mask's cumsum, a router's topk, grouped_mm's sort and inverse permutation
    "hf-llama-w4a16-g128": (lambda: hf_causal_lm("llama"), "w4a16-g128"),
    "hf-mixtral-w4a16-g128": (lambda: hf_causal_lm("mixtral"), "w4a16-g128"),
    # fuse-rotation alone keeps the float function: Llama 4's experts read every token, gpt-oss
    # adds each chosen expert's bias (a row of an [E, hidden] table) to the rotated stream
    "hf-llama4-rotated": (lambda: hf_causal_lm("llama4"), ROTATED),
    "hf-gpt_oss-rotated": (lambda: hf_causal_lm("gpt_oss"), ROTATED),  # convolution weights decoded (qcc.dequantize) for float convolutions
}
_COMPILED = {}


def compiled_case(name):
    if name not in _COMPILED:
        make, recipe = CASES[name]
        model, inputs = make()
        _COMPILED[name] = (model, inputs, recipe, qcc.compile(model, inputs, target="cuda", quant=recipe))
    return _COMPILED[name]


def reference(model, inputs, recipe, compiled):
    if recipe in ("float", ROTATED):
        return f64(model, inputs)
    if recipe == "w8a8":
        from test_recipes import RECIPE_FORMATS, fake_quant_model

        linears = [f"{n}.weight" for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
        ref = fake_quant_model(model, {w: RECIPE_FORMATS["w8a8"] for w in linears})
        with torch.no_grad():
            out = ref(*inputs)
        return [o.numpy() for o in (out if isinstance(out, tuple) else (out,))]
    if recipe == "llm-int8-dynamic":
        from test_recipes import dynamic_split_model

        with torch.no_grad():
            return [dynamic_split_model(model)(*inputs).numpy()]
    return f64(torch_ref.a16_reference(model, compiled.manifest, dequantized_weights(compiled)), inputs)


@pytest.mark.parametrize("name", sorted(CASES))
def test_emulated_plan_matches_pytorch(name):
    model, inputs, recipe, compiled = compiled_case(name)
    got = emulate.run_compiled(compiled, *inputs)
    expect = reference(model, inputs, recipe, compiled)
    assert len(got) == len(expect)
    for g, e in zip(got, expect):
        assert g.shape == e.shape
        assert rel_err(g, e) <= 1e-4, name
    if recipe == ROTATED:  # the rotation really happened
        assert any(r.startswith("fuse-rotation: rotated") for r in compiled.remarks), compiled.remarks
    elif recipe != "float":
        assert rel_err(f64(model, inputs)[0], expect[0]) > 1e-4  # quantization really happened


def test_gemv_selection_and_fallback():
    _, _, _, c = compiled_case("block-w4a16-g128")
    cuda = c.manifest["cuda"]
    assert len(cuda["layers"]) == 7 and not cuda["fallback"]  # every linear on a tensor-core GEMV
    # q/k/v (and gate/up) share their input: one GEMV over the stacked weights each
    lay = cuda["layers"]
    qkv = [lay[f"self_attn.{p}_proj.weight"] for p in "qkv"]
    assert qkv[0]["params"] == qkv[1]["params"] == qkv[2]["params"] and qkv[2]["cols"] == [384, 512]
    assert lay["mlp.gate_proj.weight"]["params"] == lay["mlp.up_proj.weight"]["params"]
    assert sum(L["kernel"].startswith("gemv") for L in cuda["plan"]["launches"]) == 4
    total = sum(c.weights[n].nbytes for n in qkv[0]["params"].values())
    assert sum(layer["bytes"] for layer in c.manifest["layers"] if "self_attn" in layer["weight"]
               and "o_proj" not in layer["weight"]) == total
    # weights are stored repacked once, no float copy of a quantized weight exists
    assert not any(n.endswith(":codes") for n in c.weights)
    assert all(w.dtype != np.float32 or w.size <= 64 * 64 for n, w in c.weights.items() if "proj" in n)
    # w8a8: no f16 GEMV; each integer matmul runs on gemv_i8 over the weight codes as stored
    _, _, _, c8 = compiled_case("block-w8a8")
    cu8 = c8.manifest["cuda"]
    assert not cu8["layers"] and not cu8["fallback"] and len(cu8["int_layers"]) == 7
    assert all(c8.weights[L["params"]["wq"]].dtype == np.int8 for L in cu8["int_layers"].values())
    # ... q/k/v and gate/up stacked into one launch each (their codes stay separate parameters)
    assert sum(L["kernel"].startswith("gemv_i8") for L in cu8["plan"]["launches"]) == 4
    qkv8 = [cu8["int_layers"][f"self_attn.{p}_proj.weight"] for p in "qkv"]
    assert len({L["kernel"] for L in qkv8}) == 1 and qkv8[0]["args"]["members"] == [256, 128, 128]
    assert [L["cols"] for L in qkv8] == [[0, 256], [256, 384], [384, 512]]
    assert len({L["params"]["wq"] for L in qkv8}) == 3
    # llm-int8-dynamic: the float outlier part reads the same codes (gemv_w8_sparse_x): one copy
    _, _, _, cd = compiled_case("block-llm-int8-dynamic")
    int_layers = cd.manifest["cuda"]["int_layers"]
    assert not cd.manifest["cuda"]["layers"] and len(int_layers) == 14
    for w in ("self_attn.q_proj.weight", "mlp.down_proj.weight"):
        assert int_layers[f"{w} (outlier columns)"]["params"] == int_layers[w]["params"]
    assert sum(w.nbytes for w in cd.weights.values()) == sum(w.nbytes for w in c8.weights.values())
    _, _, _, c8m = compiled_case("block-w8a8-m20")  # 20 rows: one tensor-core GEMM launch (32 rows max)
    i8 = [L for L in c8m.manifest["cuda"]["plan"]["launches"] if L["kernel"].startswith("gemm_i8")]
    assert len(i8) == 4 and all(L["args"][-1]["scalar"] == 20 and "_m32_" in L["kernel"] for L in i8)
    _, _, _, c20 = compiled_case("block-w4a16-g128-m20")  # 20 tokens: 40 split rows, one GEMM launch
    launches = [L for L in c20.manifest["cuda"]["plan"]["launches"] if L["kernel"].startswith("gemm_w4a16")]
    assert [L["args"][-1]["scalar"] for L in launches[:2]] == [40, 40] and "_m48_" in launches[0]["kernel"]


@pytest.mark.parametrize("recipe,bound,kernel,seq", [
    ("w8a8-static", 0.0, "gemv_i8 w_bits=8", 5), ("w8a8-had", 1e-6, "gemv_i8 w_bits=8", 5),
    ("w4a4-had", 1e-6, "gemv_i8 w_bits=4", 5), ("w4a8-g128", 1e-6, "gemv_i4g", 5),
    ("w4a4-had-reorder", 1e-6, None, 5),  # int4 main parts, int8 outlier parts, explicit gathers
    ("w8a8-static", 0.0, "gemm_i8 w_bits=8", 40)])  # prefill: the tensor-core GEMM, still exact
def test_quantized_activations_match_the_cpu_backend(recipe, bound, kernel, seq):
    """The emulated CUDA plan against the CPU artifact of the same recipe (same calibration),
    on a whole LlamaModel (an embedding, so fuse-rotation rotates its residual stream): every
    linear on gemv_i8 (int4 weights: w_bits=4; grouped asymmetric int4: gemv_i4g) after
    quantize_rows, the online Hadamard
    transforms on hadamard_rows. The integer sums are exact and the float ops the same, so
    w8a8-static agrees bit for bit; the others differ where float reductions (RMSNorm,
    attention) round differently."""
    model, inputs = llama_model(seq)
    kw = {"calibration": [inputs]} if recipe.endswith(("static", "reorder")) else {}
    gpu = qcc.compile(model, inputs, target="cuda", quant=recipe, **kw)
    cpu = qcc.compile(model, inputs, target="cpu", quant=recipe, **kw)
    got = emulate.run_compiled(gpu, *inputs)[0]
    want = np.asarray(cpu(*inputs))
    assert np.abs(got - want).max() <= bound * np.abs(want).max()
    cuda = gpu.manifest["cuda"]
    assert len(cuda["int_layers"]) == (30 if "reorder" in recipe else 15) and not cuda["fallback"]
    assert kernel is None or all(f"{L['builder']} w_bits={L['args'].get('w_bits', 8)}".startswith(kernel)
                                 for L in cuda["int_layers"].values())
    hadamards = [L for L in cuda["plan"]["launches"] if L["kernel"].startswith("hadamard_rows")]
    assert len(hadamards) == (2 if "had" in recipe else 0)  # the two down projections' inputs


@pytest.mark.parametrize("recipe", ["w8a8", "w8a8-static", "w4a4", "w4a8-g128"])
def test_quantized_expert_rows_match_the_cpu_backend(recipe):
    """w8a8 on transformers' Mixtral: the experts' rows quantized per token or per tensor
    (quantize-activations; dequant-after-gemm's gathered integer product) give the emulated CUDA plan
    the CPU artifact's output, up to float reductions rounding differently; every dense linear
    on gemv_i8 (gemv_i4g: w4a8-g128), and every experts' product on its gathered form
    (experts=4: each row on its expert's codes as stored)."""
    model, inputs = hf_causal_lm("mixtral")
    cal = {"calibration": [(torch.randint(0, 320, (1, 10), generator=torch.Generator().manual_seed(s)),)
                           for s in (3, 4)]} if recipe.endswith("static") else {}
    gpu = qcc.compile(model, inputs, target="cuda", quant=recipe, **cal)
    cpu = qcc.compile(model, inputs, target="cpu", quant=recipe, **cal)
    assert any(r.startswith("quantize-activations: the experts' rows are quantized") for r in gpu.remarks)
    got, want = emulate.run_compiled(gpu, *inputs)[0], np.asarray(cpu(*inputs))
    assert rel_err(got, want) <= 1e-5
    cuda = gpu.manifest["cuda"]
    builder = "gemv_i4g" if recipe == "w4a8-g128" else "gemv_i8"
    assert not cuda["fallback"] and all(L["builder"] == builder for L in cuda["int_layers"].values())
    assert sum(L["args"].get("experts") == 4 for L in cuda["int_layers"].values()) == 4  # 2 layers x (gate_up, down)


def test_prefill_gemm_plan_equals_the_gemv_plan(monkeypatch):
    """At 40 tokens w4a4-had's integer matmuls run on gemm_i8 (int4 weights on the s8 tensor
    cores); the plan's output equals, bit for bit, that of the same model on gemv_i8 (dp4a, 16
    rows a launch). (Against the CPU artifact both differ from token 26 on: a float reduction
    rounding differently flips an int4 activation code.)"""
    from qcc.backends.cuda import select_kernels

    model, inputs = llama_model(40)
    gemm = qcc.compile(model, inputs, target="cuda", quant="w4a4-had")
    assert {L["builder"] for L in gemm.manifest["cuda"]["int_layers"].values()} == {"gemm_i8"}
    monkeypatch.setattr(select_kernels, "_prefill_gemm", lambda builder, args, M, arch: (builder, args))
    gemv = qcc.compile(model, inputs, target="cuda", quant="w4a4-had")
    assert {L["builder"] for L in gemv.manifest["cuda"]["int_layers"].values()} == {"gemv_i8"}
    a, b = emulate.run_compiled(gemm, *inputs)[0], emulate.run_compiled(gemv, *inputs)[0]
    assert np.array_equal(a.view(np.uint32), b.view(np.uint32))


def test_f16_activations():
    """gpu_activations="f16" (--gpu-activations f16): the weight-only layers take x rounded to
    f16 (20 rows for 20 tokens, not 40 hi + lo rows) and return f16, as torch fp16 runs them.
    The emulated plan matches the a16 oracle (the same roundings in float64 PyTorch) and
    differs from the fp32-accurate one by the rounding; a bad value is a clear error."""
    model, inputs = llama_block(seq=10, batch=2)
    c = qcc.compile(model, inputs, target="cuda", quant="w4a16-g128", gpu_activations="f16")
    assert c.manifest["cuda"]["activations"] == "f16"
    gemms = [L for L in c.manifest["cuda"]["plan"]["launches"] if L["kernel"].startswith("gemm_w4a16")]
    assert gemms and all("_o32" not in L["kernel"] and L["args"][-1]["scalar"] == 20 for L in gemms)
    got = emulate.run_compiled(c, *inputs)[0]
    assert rel_err(got, reference(model, inputs, "w4a16-g128", c)[0]) <= 1e-3
    exact = compiled_case("block-w4a16-g128-m20")[3]
    assert rel_err(got, reference(model, inputs, "w4a16-g128", exact)[0]) > 1e-5
    with pytest.raises(qcc.QccError, match="gpu-activations"):
        qcc.compile(model, inputs, target="cuda", quant="w4a16-g128", gpu_activations="bf16")
    with pytest.raises(qcc.QccError, match="target='cuda' only"):
        qcc.compile(model, inputs, target="cpu", quant="w4a16-g128", gpu_activations="f16")


class _Routing(torch.nn.Module):
    """A router's ops that reach CUDA as decompositions: top-k experts, the rows sorted by
    expert (with NaN and ties), the inverse permutation by index_put, cumsum of counts."""

    def forward(self, logits, keys):
        weights, ids = torch.topk(logits.softmax(-1), 2, dim=-1)
        flat, perm = torch.sort(ids.reshape(-1))
        inverse = torch.empty_like(perm)
        inverse[perm] = torch.arange(perm.shape[0])
        counts = (flat.unsqueeze(-1) == torch.arange(logits.shape[-1])).sum(0).cumsum(0)
        down, down_order = torch.sort(keys, dim=-1, descending=True)
        return weights, ids, flat, perm, inverse, counts, down, down_order


def test_router_ops_on_cuda():
    g = torch.Generator().manual_seed(17)
    logits, keys = torch.randn(7, 6, generator=g), torch.randn(3, 10, generator=g)
    keys[0, 3], keys[1, 2] = float("nan"), keys[1, 7]
    model = _Routing().eval()
    got = [torch.from_numpy(a) for a in emulate.run_compiled(qcc.compile(model, (logits, keys), target="cuda"),
                                                             logits, keys)]
    weights, ids, flat, perm, inverse, counts, down, down_order = got
    want = model(logits, keys)
    np.testing.assert_allclose(weights.numpy(), want[0].numpy(), rtol=1e-6)
    np.testing.assert_array_equal(flat.numpy(), want[2].numpy())
    np.testing.assert_array_equal(ids.reshape(-1)[perm].numpy(), flat.numpy())  # a permutation sorting them
    np.testing.assert_array_equal(inverse[perm].numpy(), np.arange(14))
    np.testing.assert_array_equal(counts.numpy(), want[5].numpy())
    np.testing.assert_array_equal(down.numpy(), want[6].numpy())  # NaN first, as torch sorts descending
    np.testing.assert_array_equal(keys.gather(-1, down_order).numpy(), down.numpy())


def test_buffers_updated_in_forward_are_a_clear_error():
    """State kept between calls (buffers forward() updates) runs on the CPU target only: a
    QccError naming the buffers and the ways out, not a plan that drops the updates."""

    class Counter(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(16, 16)
            self.register_buffer("calls", torch.zeros(16))

        def forward(self, x):
            self.calls.add_(1.0)
            return self.fc(x) + self.calls

    with pytest.raises(qcc.QccError, match=r"updates its buffers in forward\(\) \(calls\).*--target cpu"):
        qcc.compile(Counter().eval(), (torch.randn(2, 16),), target="cuda", quant="w8a16")


def test_run_time_sizes_are_a_clear_error():
    """A model exported with a run-time size (a KV cache of any length) cannot get a static
    launch plan: a QccError naming the input and what to do, not a failure deep in planning."""
    step = DecodeStep(bench_llama(layers=1, hidden=256, ffn=768, heads=4, max_seq=64), 24).eval()
    with pytest.raises(qcc.QccError, match=r"input k_cache \[1, 1, 4, '\w+', 64\] has a run-time size.*--target cpu"):
        qcc.compile(step, step.example_inputs(), target="cuda", quant="w4a16-g128",
                    dynamic_shapes=step.dynamic_shapes())


def test_sm90a_prefill_takes_wgmma():
    """--gpu-arch sm_90a: prefill's w4a16 layers run on gemm_w4a16_wg (wgmma), their weights
    packed in its K order; the emulated plan gives the sm_90 plan's output (gemm_w4a16, mma)
    to f32 rounding. With f16 activations it scales the weights in f16 (scale_mode="weight")
    and matches the a16 oracle built from the artifact's own weights."""
    mma = compiled_case("block-w4a16-g128-m20")[3]
    model, inputs = llama_block(seq=10, batch=2)  # a fresh copy: other tests turn the cached one to f64
    c = qcc.compile(model, inputs, target="cuda", quant="w4a16-g128", gpu_arch="sm_90a")
    assert c.manifest["cuda"]["arch"] == "sm_90a"
    gemms = [L for L in c.manifest["cuda"]["plan"]["launches"] if L["kernel"].startswith("gemm_w4a16")]
    assert len(gemms) == 4 and all(L["kernel"].startswith("gemm_w4a16_wg") for L in gemms)
    assert {L["builder"] for L in c.manifest["cuda"]["layers"].values()} == {"gemm_w4a16_wg"}
    got = emulate.run_compiled(c, *inputs)[0]
    assert rel_err(got, emulate.run_compiled(mma, *inputs)[0]) <= 1e-6
    assert rel_err(got, reference(model, inputs, "w4a16-g128", mma)[0]) <= 1e-5
    # f16 activations: the weights scaled in f16 (scale_mode="weight"), as the a16 oracle holds them
    model, inputs = llama_block(seq=10, batch=2)
    h = qcc.compile(model, inputs, target="cuda", quant="w4a16-g128", gpu_arch="sm_90a", gpu_activations="f16")
    assert {(L["builder"], L["args"]["scale_mode"]) for L in h.manifest["cuda"]["layers"].values()} == \
        {("gemm_w4a16_wg", "weight")}
    assert rel_err(emulate.run_compiled(h, *inputs)[0], reference(model, inputs, "w4a16-g128", h)[0]) <= 1e-3


def test_sm90a_prefill_takes_s8_wgmma():
    """--gpu-arch sm_90a: at 40 tokens w8a8's integer matmuls (q/k/v and gate/up stacked) run
    on gemm_i8_wg (s8 wgmma, both operands from shared memory); exact sums and the same
    epilogue give the sm_90 plan's output (gemm_i8, mma.sync) bit for bit. w4a4's int4
    weights stay on gemm_i8."""
    model, inputs = llama_model(40)
    wg = qcc.compile(model, inputs, target="cuda", quant="w8a8", gpu_arch="sm_90a")
    assert {L["builder"] for L in wg.manifest["cuda"]["int_layers"].values()} == {"gemm_i8_wg"}
    model, inputs = llama_model(40)
    mma = qcc.compile(model, inputs, target="cuda", quant="w8a8")
    assert {L["builder"] for L in mma.manifest["cuda"]["int_layers"].values()} == {"gemm_i8"}
    a, b = emulate.run_compiled(wg, *inputs)[0], emulate.run_compiled(mma, *inputs)[0]
    assert np.array_equal(a.view(np.uint32), b.view(np.uint32))
    model, inputs = llama_model(40)
    w4 = qcc.compile(model, inputs, target="cuda", quant="w4a4-had", gpu_arch="sm_90a")
    assert {L["builder"] for L in w4.manifest["cuda"]["int_layers"].values()} == {"gemm_i8"}


def test_prefill_contractions_take_shared_memory_tiles():
    """At 40 tokens the float model's linears and both attention contractions (q @ k^T with
    its fused RoPE gathers, p @ v with the softmax division) run as tile_contract; at 5
    tokens (fewer than TILE_MIN rows) none does."""
    kinds = [s.config["kind"] for s in compiled_case("model-float-s40")[3].cuda_specs.values()]
    assert kinds.count("linalg_tile_contract") >= 6
    assert "linalg_tile_contract" not in [s.config["kind"] for s in compiled_case("model-float")[3].cuda_specs.values()]


def test_plan_fuses_and_folds():
    _, _, _, c = compiled_case("decode-w4a16-g128")
    plan = c.manifest["cuda"]["plan"]
    assert plan["stats"]["folded_fills"] >= 4  # reductions start from the fill constant
    # the KV-cache concatenation is fused into attention: nothing copies the cache
    cache_bytes = 4 * 64 * 64 * 4
    big_copies = [L for L in plan["launches"] if "copy" in L["kernel"]
                  and any(plan["buffers"][a["buf"]]["bytes"] >= cache_bytes for a in L["args"] if "buf" in a)]
    assert not big_copies
    assert len(plan["launches"]) <= 28  # stacked q/k/v and gate/up GEMVs, rotate_half in the gather
    assert not any("negf" in L["kernel"] for L in plan["launches"])
    # attention (scores, softmax, probabilities @ V) as two launches: chunks of keys, then the
    # combine of their softmax partials (fuse_attention.py)
    names = [n for L in plan["launches"] for n in L.get("fused", [L["kernel"]])]
    assert sum(n.startswith("attn_split") for n in names) == sum(n.startswith("attn_combine") for n in names) == 1
    assert not any("maximumf" in n or "split_reduce" in n for n in names)
    # temporaries share the arena
    temps = sum(b["bytes"] for b in plan["buffers"] if b["kind"] == "temp")
    assert plan["arena_bytes"] < temps


def _plans_without_and_with(monkeypatch, flag, make, recipe):
    """The model compiled with lowering.<flag> off, then on; asserts the emulated plans'
    outputs equal bit for bit and returns the two artifacts."""
    out = []
    for on in (False, True):
        monkeypatch.setattr(lowering, flag, on)
        model, inputs = make()
        c = qcc.compile(model, inputs, target="cuda", quant=recipe)
        out.append((c, emulate.run_compiled(c, *inputs)))
    for g, w in zip(out[1][1], out[0][1]):
        assert np.array_equal(g, w)
    return out[0][0], out[1][0]


@pytest.mark.parametrize("recipe", ["float", "w8a8"])
def test_small_launches_run_as_one_block(recipe, monkeypatch):
    """fuse_launches.py: each run of small launches of a decode step (residual add, RMSNorm's
    two kernels, quantize_rows; softmax's four; SwiGLU's product + quantize_rows) becomes one
    launch of one block, with the same numerics bit for bit (the same kernels, run in turn)."""
    monkeypatch.setattr(lowering, "FUSE_ROW_LAUNCHES", False)  # (test_row_local_launches_fuse)
    monkeypatch.setattr(lowering, "FUSE_ATTENTION", False)  # softmax's four stay (test_decode_attention_*)
    monkeypatch.setattr(lowering, "FUSE_GEMV_EPILOGUES", False)  # (test_gemv_epilogues_*)
    plain, fused = _plans_without_and_with(monkeypatch, "FUSE_SMALL_LAUNCHES", decode_step, recipe)
    launches = fused.manifest["cuda"]["plan"]["launches"]
    n_plain = len(plain.manifest["cuda"]["plan"]["launches"])
    groups = [L for L in launches if "fused" in L]
    assert len(launches) + sum(len(L["fused"]) - 1 for L in groups) == n_plain
    assert len(launches) <= n_plain - 8 and all(L["grid"] == [1, 1, 1] for L in groups)
    if recipe == "w8a8":  # per-token quantization joins the norm before it
        assert any(L["fused"][-1].startswith("quantize_rows") and any("fpowi" in k for k in L["fused"])
                   for L in groups)
    for L in groups:  # a buffer written in the kernel is read without noalias / ld.global.nc
        spec = fused.cuda_specs[L["kernel"]]
        for p, a in zip(spec.params, L["args"]):
            if "buf" in a and a["buf"] in L["writes"]:
                assert p.role == "alias", (L["kernel"], p.name)


@pytest.mark.parametrize("recipe", ["w8a8", "w4a4", "w4a8-g128"])
def test_gemv_epilogues_take_the_elementwise_op_after_the_gemv(recipe, monkeypatch):
    """fuse_epilogues.py: at decode the residual adds after o_proj / down_proj and SwiGLU after
    the stacked gate/up GEMV run in those GEMVs' epilogues (gate/up interleaved: a warp owns
    row n of both); the GEMVs' own results are no kernel argument of anything else, and the
    outputs equal those without the fusion bit for bit (the same ops on the same values)."""
    plain, fused = _plans_without_and_with(monkeypatch, "FUSE_GEMV_EPILOGUES", decode_step, recipe)
    launches = fused.manifest["cuda"]["plan"]["launches"]
    epi = [L for L in launches if "_e_" in L["kernel"]]
    assert len(epi) == 3 * 1  # one layer: o_proj + add, gate/up + SwiGLU, down_proj + add
    ops = [L["fused"][1] for L in epi]
    assert sum("addf" in k and "exp" not in k for k in ops) == 2 and sum("exp" in k for k in ops) == 1
    swiglu = next(L for L in epi if "exp" in L["fused"][1])
    spec = fused.cuda_specs[swiglu["kernel"]]
    assert spec.config["interleave"] and spec.grid[0] * spec.config["warps"] == spec.config["members"][0]
    for L in epi:  # the GEMV's results are written by nobody and read by no later launch
        spec = fused.cuda_specs[L["kernel"]]
        ys = {a["buf"] for p, a in zip(spec.params, L["args"]) if p.name.startswith("y")}
        assert ys and not ys & set(L["writes"])
        assert not ys & {a.get("buf") for L2 in launches if L2 is not L for a in L2["args"]}
    alone = [k for L in launches if L not in epi for k in [L["kernel"]] + L.get("fused", [])]
    before = [k for L in plain.manifest["cuda"]["plan"]["launches"] for k in [L["kernel"]] + L.get("fused", [])]
    assert not any("exp" in k for k in alone) and any("exp" in k for k in before)
    assert sum(k.startswith("qk_ew_addf_elementwise") for k in alone) == \
        sum(k.startswith("qk_ew_addf_elementwise") for k in before) - 2


@pytest.mark.parametrize("recipe", ["w8a8", "float"])
def test_row_local_launches_fuse(recipe, monkeypatch):
    """fuse_launches.fuse_row_launches: at prefill (64 tokens) each run of row-local launches
    (RMSNorm's three and the per-token quantization; softmax's four over heads x queries;
    SwiGLU's product and its quantization) becomes one launch of a block a row, with the
    same results bit for bit (the same stages, the same reduction orders). Small-launch
    fusion is off here, so the runs are the prefill-sized ones."""
    monkeypatch.setattr(lowering, "FUSE_SMALL_LAUNCHES", False)
    plain, fused = _plans_without_and_with(monkeypatch, "FUSE_ROW_LAUNCHES", lambda: llama_model(64), recipe)
    launches = fused.manifest["cuda"]["plan"]["launches"]
    rows = [L for L in launches if L["kernel"].startswith("rowfused")]
    n_plain = len(plain.manifest["cuda"]["plan"]["launches"])
    assert len(launches) + sum(len(L["fused"]) - 1 for L in rows) == n_plain
    assert {L["grid"][0] for L in rows} == {64, 4 * 64}  # tokens; heads x queries
    norm = [L for L in rows if any("fpowi" in k for k in L["fused"])]
    assert len(norm) >= 4 and all(len(L["fused"]) == (4 if recipe == "w8a8" else 3) for L in norm[:4])
    if recipe == "w8a8":  # the norm's output is quantized in the same launch
        assert all(L["fused"][-1].startswith("quantize_rows") for L in norm[:4])
    else:  # matmuls streaming weights (the float linears) keep their own launches
        assert not any("tile_contract" in k or "split_reduce" in k for L in rows for k in L["fused"])


def test_attention_combine_stores_through_the_op_after_it(monkeypatch):
    """fuse_attention.CONSUMER: at w4a16 decode the attention output goes to o_proj's GEMV as
    f16 hi + lo rows, an elementwise launch reading each element twice (hi and lo); the
    combine replays it in its stores: one launch fewer a layer, the same outputs bit for bit."""
    from qcc.backends.cuda import fuse_attention

    out = []
    for on in (False, True):
        monkeypatch.setattr(fuse_attention, "CONSUMER", on)
        model, inputs = decode_step()
        c = qcc.compile(model, inputs, target="cuda", quant="w4a16-g128")
        out.append((c, emulate.run_compiled(c, *inputs)))
    for g, w in zip(out[1][1], out[0][1]):
        assert np.array_equal(g, w)
    plain, fused = (c.manifest["cuda"]["plan"]["launches"] for c, _ in out)
    assert len(fused) == len(plain) - 1  # one layer
    i = next(k for k, L in enumerate(plain) if L["kernel"].startswith("attn_combine"))
    assert "truncf_extf" in plain[i + 1]["kernel"]
    comb = next(L for L in fused if L["kernel"].startswith("attn_combine"))
    assert comb["fused"][1] == plain[i + 1]["kernel"] and comb["writes"] == plain[i + 1]["writes"]
    spec = out[1][0].cuda_specs[comb["kernel"]]
    assert not any(p.role == "out" for p in spec.params if p.name == "pv_out0")  # not stored


@pytest.mark.parametrize("recipe", ["float", "w8a8"])
def test_decode_attention_runs_as_split_and_combine(recipe, monkeypatch):
    """fuse_attention.py: a decode step's attention (q @ k^T with RoPE and the cache concatenation
    replayed, the scale, softmax's max / exp / sum, p @ v with the division) becomes a kernel over
    chunks of keys and a combine of their softmax partials; the scores, max and sum buffers are
    gone. Numerics move by rounding only (the normalization after the sum over keys)."""
    out = {}
    for on in (False, True):
        monkeypatch.setattr(lowering, "FUSE_ATTENTION", on)
        model, inputs = decode_step()
        c = qcc.compile(model, inputs, target="cuda", quant=recipe)
        out[on] = (c, emulate.run_compiled(c, *inputs))
    plain, fused = (out[k][0].manifest["cuda"]["plan"] for k in (False, True))
    names = [L["kernel"] for L in fused["launches"]]
    split = [L for L in fused["launches"] if L["kernel"].startswith("attn_split")]
    assert len(split) == 1 and names[names.index(split[0]["kernel"]) + 1].startswith("attn_combine")
    assert split[0]["grid"] == [4 * 3, 1, 1]  # 4 heads x 3 chunks of 32 of the 65 keys
    assert not any("maximumf" in n or "split_reduce" in n or "exp" in n for n in names)
    assert len(fused["launches"]) < len(plain["launches"])
    # the scores buffer (heads x keys floats) is no kernel argument any more
    scores = {b["id"] for b in plain["buffers"] if b["kind"] == "temp" and b["bytes"] == 4 * 4 * 65}
    assert scores and not scores & {a.get("buf") for L in fused["launches"] for a in L["args"]}
    for g, w in zip(out[True][1], out[False][1]):
        assert rel_err(g, w) <= 1e-6
    model, inputs = decode_step()
    for g, e in zip(out[True][1], reference(model, inputs, recipe, out[True][0])):
        assert rel_err(g, e) <= 1e-4


@pytest.mark.parametrize("hidden,heads", [(320, 4), (512, 2)])
def test_decode_attention_head_dims(hidden, heads):
    """Head dims that are not a multiple of the 32 lanes (80: the last lane step and the
    threads past d are masked) and larger than a block (256: two passes over d); 41 keys:
    a partial last chunk."""
    step = DecodeStep(bench_llama(layers=1, hidden=hidden, ffn=640, heads=heads, max_seq=64), 40).eval()
    inputs = step.example_inputs()
    c = qcc.compile(step, inputs, target="cuda", quant="float")
    assert sum(L["kernel"].startswith("attn_split") for L in c.manifest["cuda"]["plan"]["launches"]) == 1
    for got, e in zip(emulate.run_compiled(c, *inputs), f64(step, inputs)):
        assert rel_err(got, e) <= 1e-4


def test_attention_fusion_over_masked_chunks(monkeypatch):
    """Prefill of a few tokens (q @ k^T a warp per score, not a tile) takes the same kernels:
    GQA, the additive causal mask as a score epilogue; with chunks of 4 keys some chunks of the
    early queries are fully masked and weigh ~0 in the combine."""
    from qcc.backends.cuda import fuse_attention

    monkeypatch.setattr(fuse_attention, "CHUNK", 4)
    model, inputs = llama_block(seq=8)
    c = qcc.compile(model, inputs, target="cuda", quant="float")
    split = [L for L in c.manifest["cuda"]["plan"]["launches"] if L["kernel"].startswith("attn_split")]
    assert len(split) == 1 and split[0]["grid"] == [4 * 8 * 2, 1, 1]  # heads x queries x 2 chunks
    assert rel_err(emulate.run_compiled(c, *inputs)[0], f64(model, inputs)[0]) <= 1e-4


class _Attention(torch.nn.Module):
    def __init__(self, with_probs):
        super().__init__()
        self.with_probs = with_probs

    def forward(self, q, k, v):
        p = torch.softmax(q @ k.transpose(-1, -2) * 0.125, dim=-1)
        return (p @ v, p) if self.with_probs else p @ v


def test_attention_fusion_keeps_buffers_that_are_read():
    """Attention that also returns its probabilities keeps its launches (they must reach memory);
    the same without them fuses."""
    g = torch.Generator().manual_seed(5)
    inputs = tuple(torch.randn(1, 2, n, 64, generator=g) for n in (1, 40, 40))
    for with_probs in (True, False):
        model = _Attention(with_probs).eval()
        c = qcc.compile(model, inputs, target="cuda", quant="float")
        fused = [n for L in c.manifest["cuda"]["plan"]["launches"] for n in L.get("fused", [L["kernel"]])
                 if n.startswith("attn_")]
        assert len(fused) == (0 if with_probs else 2)
        for got, e in zip(emulate.run_compiled(c, *inputs), f64(model, inputs)):
            assert rel_err(got, e) <= 1e-5


def test_row_fusion_leaves_weight_gemvs_alone():
    """At decode the float recipe's linears are warp-per-output GEMVs over the weights: row
    fusion (one output a "row", 32-thread blocks) would slow them down, so it leaves every
    reduction over a weight bigger than MAX_ROW_PARAM_BYTES alone."""
    from qcc.backends.cuda import fuse_launches

    model, inputs = decode_step()
    plan = qcc.compile(model, inputs, target="cuda", quant="float").manifest["cuda"]["plan"]
    big = {b["id"] for b in plan["buffers"] if b["kind"] == "param" and b["bytes"] > fuse_launches.MAX_ROW_PARAM_BYTES}
    for L in plan["launches"]:
        if L["kernel"].startswith("rowfused"):
            assert not any(a.get("buf") in big for a in L["args"]), L["fused"]
    assert any(any(a.get("buf") in big for a in L["args"]) for L in plan["launches"])


@pytest.mark.skipif(ptx.ptxas_path() is None, reason="ptxas not on PATH")
def test_every_generated_kernel_assembles_without_spills():
    specs = {}
    for name in CASES:
        specs.update(compiled_case(name)[3].cuda_specs)
    img = lowering.build_images(specs.values(), ("sm_90a", "sm_80"))
    for arch in ("sm_90a", "sm_80"):
        res = img.resources[arch]
        missing = set(specs) - set(res)
        assert not missing, f"{arch}: no ptxas report for {sorted(missing)[:3]}"
        bad = {k: r for k, r in res.items() if r["spill_stores"] or r["spill_loads"] or r["stack"]}
        assert not bad, f"{arch}: spills or stack frames in {bad}"
        assert re.search(rf"\.target {arch}\b", img.ptx[arch])
        # sm_90+: each kernel waits for its predecessor before any memory access but L2
        # prefetches of weights (programmatic launch); none triggers its successor early unless
        # told to
        waits = _kernel_waits(img.ptx[arch])
        assert set(waits) == set(specs)
        for k, (before, heads) in waits.items():
            assert bool(heads) == (arch == "sm_90a"), k
            assert all(h == ["griddepcontrol.wait;"] for h in heads), k
            if heads:
                assert not [i for i in before if _MEMORY_OP.match(i)
                            and not i.startswith(("ld.param", "prefetch.global.L2"))], k
        if arch == "sm_90a":
            assert any("prefetch.global.L2" in i for before, _ in waits.values() for i in before)


_MEMORY_OP = re.compile(r"(@!?%p\d+\s+)?(ld|st|atom|red|cp|prefetch|tex|wgmma|mma|ldmatrix|bar|fence)\.")


def _kernel_waits(ptx_text: str) -> dict:
    """kernel name -> (its instructions before the first griddepcontrol.wait (all of them when
    there is none), [the wait and the griddepcontrol instruction after it, for every wait])."""
    out = {}
    for m in re.finditer(r"\.entry (\w+)\(", ptx_text):
        body = ptx_text[ptx_text.index("{", m.end()) + 1:]
        lines = [ln.strip() for ln in body[:body.index("\n}")].split("\n")]
        ins = [ln for ln in lines if ln and not ln.startswith((".", "//", "$", "{", "}"))]
        first = next((i for i, x in enumerate(ins) if x == "griddepcontrol.wait;"), len(ins))
        heads = [[x] + (["griddepcontrol.launch_dependents;"] if i + 1 < len(ins)
                        and ins[i + 1] == "griddepcontrol.launch_dependents;" else [])
                 for i, x in enumerate(ins) if x == "griddepcontrol.wait;"]
        out[m.group(1)] = (ins[:first], heads)
    return out


def test_artifact_code_and_manifest():
    _, _, _, c = compiled_case("block-w8a16")
    cuda = c.manifest["cuda"]
    assert cuda["arch"] == "sm_90" and "cuda_sm_90.ptx" in c.code
    assert ".target sm_90" in c.code["cuda_sm_90.ptx"].decode()
    if ptx.ptxas_path():
        assert c.code["cuda_sm_90.cubin"][:4] == b"\x7fELF"
        for k in cuda["kernels"].values():
            r = k["resources"]["sm_90"]
            assert r["spill_stores"] == r["spill_loads"] == r["stack"] == 0
    launched = {L["kernel"] for L in cuda["plan"]["launches"]}
    assert launched == set(cuda["kernels"])
    # programmatic launch: every kernel waits before any memory access but the GEMVs' L2
    # prefetches of weights; those of at most EARLY_TRIGGER_BLOCKS blocks (here the one-block
    # fused norms) and the GEMVs let the next kernel launch right after that
    assert cuda["launch"] == "programmatic"
    text = c.code["cuda_sm_90.ptx"].decode()
    early = lowering.early_trigger_kernels(cuda["plan"], c.cuda_specs)
    assert early and early < launched and any(k.startswith("gemv") for k in early)
    waits = _kernel_waits(text)
    assert set(waits) == launched
    for k, (before, heads) in waits.items():
        assert heads and not [i for i in before if _MEMORY_OP.match(i) and not i.startswith(("ld.param", "prefetch.global.L2"))]
        assert all(h == ["griddepcontrol.wait;", "griddepcontrol.launch_dependents;"] if k in early
                   else h == ["griddepcontrol.wait;"] for h in heads), (k, heads)


@pytest.fixture
def fake_driver(monkeypatch):
    box = {}

    def install(specs):
        box["drv"] = emulate.FakeDriver(specs)
        monkeypatch.setattr(runtime, "_driver", lambda: box["drv"])
        return box["drv"]
    return install


def test_runtime_refuses_code_for_another_gpu(fake_driver):
    """An sm_90a artifact (wgmma) on a GPU other than sm_90, or an sm_90 one on an older GPU:
    a clear error naming the --gpu-arch to use, before any memory is allocated."""
    model, inputs = llama_block(seq=10, batch=2)
    c = qcc.compile(model, inputs, target="cuda", quant="w4a16-g128", gpu_arch="sm_90a")
    drv = fake_driver(c.cuda_specs)
    for cc, arch_msg in (((10, 0), "--gpu-arch sm_90 "), ((8, 0), "--gpu-arch sm_90 ")):
        drv.cc = cc
        with pytest.raises(model_runtime.ArchError, match=arch_msg):
            model_runtime.CudaModel(c.manifest, c.weights, c.code)
    drv.cc = (9, 0)
    y = model_runtime.CudaModel(c.manifest, c.weights, c.code, graph=False)(*[t.numpy() for t in inputs])
    np.testing.assert_array_equal(y, emulate.run_compiled(c, *inputs)[0])
    sm90 = compiled_case("block-w4a16-g128")[3]
    drv = fake_driver(sm90.cuda_specs)
    drv.cc = (8, 6)
    with pytest.raises(model_runtime.ArchError, match="older architecture: recompile with --gpu-arch sm_80"):
        model_runtime.CudaModel(sm90.manifest, sm90.weights, sm90.code)


def test_runtime_on_fake_driver_matches_emulation(tmp_path, fake_driver):
    model, inputs, recipe, c = compiled_case("model-w4a16-g128")
    path = str(tmp_path / "m.qcc")
    c.save(path)
    manifest, weights, code = model_runtime.load_artifact(path)  # no qcc, torch or MLIR needed
    assert {k: v for k, v in manifest.items() if k not in ("files", "format_version")} == c.manifest
    assert set(weights) == set(c.weights) and code == c.code
    drv = fake_driver(c.cuda_specs)
    m = model_runtime.CudaModel(manifest, weights, code)
    assert m.image == "cubin for sm_90 on sm_90" or "ptx" in m.image
    x = inputs[0].numpy()
    y1, y2 = m(x), m(x)  # second call replays the captured graph
    n = len(c.manifest["cuda"]["plan"]["launches"])
    assert m.use_graph and drv.launches == 2 * n
    # every kernel but the first (after the input copies) launches programmatically (sm_90)
    assert c.manifest["cuda"]["launch"] == "programmatic" and m.programmatic and drv.programmatic_launches == n - 1
    assert not m.set_programmatic(False)  # serial launches (the benchmark's A/B), captured anew
    assert drv.graphs_destroyed == 1  # the programmatic graph
    np.testing.assert_array_equal(m(x), emulate.run_compiled(c, *inputs)[0])
    assert drv.programmatic_launches == n - 1 and drv.launches == 3 * n and m.set_programmatic(True)
    drv.driver_version = 12020  # a driver without programmatic launches in graphs: serial ones
    old_driver = model_runtime.CudaModel(manifest, weights, code)
    assert not old_driver.programmatic and not old_driver.set_programmatic(True)
    drv.driver_version = 13000
    expect = emulate.run_compiled(c, *inputs)[0]
    np.testing.assert_array_equal(y1, expect)
    np.testing.assert_array_equal(y2, expect)
    prof = m.profile(reps=1)  # captured with event records between the launches
    assert sum(d["launches"] for d in prof) == len(c.manifest["cuda"]["plan"]["launches"])
    with pytest.raises(ValueError, match="expected shape"):
        m(x[:, :2])
    # qcc.load -> CompiledModel -> the cuda runner
    loaded = qcc.load(path)
    np.testing.assert_array_equal(loaded(*inputs).numpy(), expect)


@pytest.mark.parametrize("name", ["sdpa-causal-float", "gpt2-block-w4a16-g128"])
def test_runtime_passes_bool_buffers_whole(fake_driver, name):
    """A causal mask (i1 elements, a byte each in memory) through the runtime: the kernels'
    manifest counts the bytes the launch hands over."""
    _, inputs, _, c = compiled_case(name)
    fake_driver(c.cuda_specs)
    m = model_runtime.CudaModel(c.manifest, c.weights, c.code)
    np.testing.assert_array_equal(m(*[t.numpy() for t in inputs]), emulate.run_compiled(c, *inputs)[0])


def test_runtime_rejects_a_broken_plan(fake_driver):
    _, _, _, c = compiled_case("block-w8a16")
    fake_driver(c.cuda_specs)
    manifest = copy.deepcopy(c.manifest)
    L = next(L for L in manifest["cuda"]["plan"]["launches"] if L["kernel"].startswith("gemv"))
    L["args"][0]["offset"] += 1 << 20
    with pytest.raises(model_runtime.PlanError, match="needs .* bytes at offset"):
        model_runtime.CudaModel(manifest, c.weights, c.code)


def test_unsupported_host_op_is_named():
    class TopK(torch.nn.Module):  # k > 64: torch-mlir's topk (a TMTensor sort), not decomposed
        def forward(self, x):
            return torch.topk(x, 70, dim=-1).values * 2

    with pytest.raises(qcc.QccError, match="does not handle 'tm_tensor.sort'"):
        qcc.compile(TopK(), (torch.randn(4, 100),), target="cuda")


def test_cli_gpu_arch(tmp_path):
    from qcc.tools.qcc_main import main

    model, inputs = mlp()
    pt2 = str(tmp_path / "mlp.pt2")
    torch.export.save(torch.export.export(model, inputs), pt2)
    out = str(tmp_path / "mlp.qcc")
    assert main(["compile", pt2, "--target", "cuda", "--gpu-arch", "sm_80", "--quant", "w8a16",
                 "--gpu-activations", "f16", "-o", out, "-q"]) == 0
    loaded = qcc.load(out)
    assert loaded.manifest["cuda"]["arch"] == "sm_80" and loaded.manifest["cuda"]["activations"] == "f16"
    assert ".target sm_80" in loaded.code["cuda_sm_80.ptx"].decode()
    assert loaded.manifest["cuda"]["launch"] == "serial" and "griddepcontrol" not in loaded.code["cuda_sm_80.ptx"].decode()
    assert main(["compile", pt2, "--target", "cuda", "--gpu-arch", "sm_70", "-o", out, "-q"]) == 2


_GPU, _WHY = runtime.available()


@pytest.mark.skipif(not _GPU, reason=f"needs a CUDA GPU ({_WHY})")
@pytest.mark.parametrize("name", ["block-float", "block-w4a16-g128", "model-w4a16-g128"])
def test_on_gpu(name):
    model, inputs, recipe, c = compiled_case(name)
    expect = reference(model, inputs, recipe, c)
    got = c(*inputs)
    assert rel_err(got.numpy(), expect[0]) <= 1e-4
    if torch.cuda.is_available():
        got = c(*[x.cuda() for x in inputs])
        assert got.is_cuda and rel_err(got.cpu().numpy(), expect[0]) <= 1e-4


@pytest.mark.parametrize("name", ["decode-gqa-float", "decode-gqa-f16-cache-w4a16-g128", "sdpa-gqa-decode-float"])
def test_gqa_cache_is_read_per_kv_head(name):
    """repeat_kv after the cache's concatenation (a broadcast collapsed into the heads):
    cuda-collapse-gathers lets the gather fuse into attention, so no launch writes the
    rep-fold V cache ([b, kv_heads, rep, positions, d]) for attention to read back."""
    _, inputs, _, c = compiled_case(name)
    plan = c.manifest["cuda"]["plan"]
    cache_elems = inputs[1][0].numel()  # one layer's cache, kv_heads of them
    assert not any(b["kind"] == "temp" and int(np.prod(b["shape"])) >= cache_elems for b in plan["buffers"]), \
        [b["shape"] for b in plan["buffers"] if b["kind"] == "temp"]


def test_f16_cache_is_read_in_place():
    """A decode step whose KV caches are f16 inputs: the concatenation's gather widens them
    (cuda-concat-to-generic absorbs the `.float()`), so no launch writes an f32 copy of a
    cache; attention's split kernel reads the f16 cache argument itself."""
    _, inputs, _, c = compiled_case("decode-f16-cache-w4a16-g128")
    plan = c.manifest["cuda"]["plan"]
    kernels_run = [k for L in plan["launches"] for k in [L["kernel"], *L.get("fused", [])]]
    assert not any("_ew_extf_elementwise" in k for k in kernels_run), kernels_run  # a widening launch
    cache_bytes = inputs[1].numel() * 4
    assert not any(b["elem"] == "f32" and b["bytes"] >= cache_bytes for b in plan["buffers"] if b["kind"] == "temp")
