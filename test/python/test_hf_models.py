"""Hugging Face transformers architectures, built from small random configs (no hub):
causal LMs with w4a16-g128, mixtures of experts (Mixtral, Qwen2/3-MoE, OLMoE, Phi-MoE,
GraniteMoE, GLM-4-MoE), encoders (BERT with a padding mask, ViT) with w8a16; each quantizes
every projection (nn.Linear, GPT-2's Conv1D `x @ W`, experts, ViT's patch convolution) and
matches the float64 model holding the artifact's decoded weights."""

import copy

import numpy as np
import pytest
import torch

from oracles import float64_out, rel_err
import qcc
from qcc.reference import dequantized_weights, load_into_torch

T = pytest.importorskip("transformers", reason="transformers comes with the dev extra: pip install -e '.[dev]'")

VOCAB = 320
COMMON = dict(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
              num_attention_heads=4, max_position_embeddings=64)
CONFIGS = {
    "llama": lambda: T.LlamaConfig(num_key_value_heads=2, **COMMON),         # GQA, RMSNorm, SwiGLU
    "qwen2": lambda: T.Qwen2Config(num_key_value_heads=2, **COMMON),         # q/k/v biases
    "gemma": lambda: T.GemmaConfig(num_key_value_heads=1, head_dim=32, **COMMON),  # tied head, GeGLU
    "phi3": lambda: T.Phi3Config(num_key_value_heads=4, pad_token_id=0, **COMMON),  # fused qkv, gate_up
    "gpt2": lambda: T.GPT2Config(vocab_size=VOCAB, n_embd=128, n_layer=2, n_head=4, n_positions=64),  # Conv1D
    # a bool causal-mask buffer, multi-query attention
    "gpt_bigcode": lambda: T.GPTBigCodeConfig(vocab_size=VOCAB, n_embd=128, n_layer=2, n_head=4, n_positions=64),
    "opt": lambda: T.OPTConfig(vocab_size=VOCAB, hidden_size=128, ffn_dim=256, num_hidden_layers=2,
                               num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=128),
}


def GEMMA2():
    return T.Gemma2Config(num_key_value_heads=2, head_dim=32, **COMMON)


class Logits(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, ids):
        return self.model(input_ids=ids, use_cache=False).logits


def projections(model):
    """Weight names of the layers a recipe must quantize: nn.Linear and transformers' Conv1D."""
    from transformers.pytorch_utils import Conv1D

    return sorted(f"{n}.weight" for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, Conv1D)))


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_hf_model_w4a16_matches_dequantized_reference(arch):
    torch.manual_seed(0)
    model = Logits(T.AutoModelForCausalLM.from_config(CONFIGS[arch]()).eval()).eval()
    ids = torch.randint(0, VOCAB, (1, 12), generator=torch.Generator().manual_seed(1))
    compiled = qcc.compile(model, (ids,), target="cpu", quant="w4a16-g128")
    assert sorted(layer["weight"] for layer in compiled.manifest["layers"]) == projections(model)

    reference = copy.deepcopy(model).double()
    load_into_torch(reference, dequantized_weights(compiled))  # per module: unties a tied head
    with torch.no_grad():
        expect = reference(ids).numpy()
        float_out = copy.deepcopy(model).double()(ids).numpy()
    assert rel_err(compiled(ids).numpy(), expect) <= 1e-4
    assert rel_err(float_out, expect) > 1e-3  # quantization really happened


class Encoded(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, *args):
        if len(args) == 1:
            return self.model(pixel_values=args[0]).last_hidden_state
        return self.model(input_ids=args[0], attention_mask=args[1]).last_hidden_state


ENCODERS = {
    # padded batch: the attention mask's -inf columns
    "bert": lambda: T.BertModel(T.BertConfig(vocab_size=VOCAB, hidden_size=128, num_hidden_layers=2,
                                             num_attention_heads=4, intermediate_size=256,
                                             max_position_embeddings=64), add_pooling_layer=False),
    # a convolution patch embedding (quantized: 128 rows of 3 * 8 * 8)
    "vit": lambda: T.ViTModel(T.ViTConfig(hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                                          intermediate_size=256, image_size=32, patch_size=8), add_pooling_layer=False),
}


@pytest.mark.parametrize("arch", sorted(ENCODERS))
def test_hf_encoder_w8a16_matches_dequantized_reference(arch):
    torch.manual_seed(0)
    model = Encoded(ENCODERS[arch]().eval()).eval()
    if arch == "vit":
        args = (torch.randn(1, 3, 32, 32),)
    else:
        mask = torch.ones(2, 12, dtype=torch.long)
        mask[1, 8:] = 0
        args = (torch.randint(3, VOCAB, (2, 12)), mask)
    compiled = qcc.compile(model, args, target="cpu", quant="w8a16")
    convs = ["model.embeddings.patch_embeddings.projection.weight"] if arch == "vit" else []
    assert sorted(layer["weight"] for layer in compiled.manifest["layers"]) == sorted(projections(model) + convs)
    assert compiled.remarks == []
    reference = copy.deepcopy(model).double()
    load_into_torch(reference, dequantized_weights(compiled))
    with torch.no_grad():
        expect = reference(*(a.double() if a.is_floating_point() else a for a in args)).numpy()
    assert rel_err(compiled(*args).numpy(), expect) <= 1e-4


def test_hf_static_cache_decoder_keeps_its_cache():
    """transformers' ExecuTorch export (a static KV cache in buffers that forward() updates,
    `cache_position` an input; any prompt length): the artifact keeps the caches as state,
    updated in place; a prompt, then token by token, matches the module holding the decoded
    weights."""
    from transformers.integrations.executorch import TorchExportableModuleForDecoderOnlyLM

    torch.manual_seed(0)
    model = T.AutoModelForCausalLM.from_config(CONFIGS["llama"]()).eval()
    model.generation_config.cache_implementation = "static"
    model.generation_config.cache_config = {"batch_size": 1, "max_cache_len": 16}
    seq = torch.export.Dim("seq", min=1, max=8)
    exported = TorchExportableModuleForDecoderOnlyLM(model, batch_size=1, max_cache_len=16).export(
        input_ids=torch.tensor([[1, 2, 3]]), cache_position=torch.arange(3),
        dynamic_shapes={"input_ids": {1: seq}, "cache_position": {0: seq}})
    compiled = qcc.compile(exported, target="cpu", quant="w4a16-g128")
    in_place = {o["name"] for o in compiled.manifest["outputs"] if o.get("in_place")}
    assert in_place == {f"{kv}_cache_{i}" for kv in ("key", "value") for i in range(2)}

    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, value in dequantized_weights(compiled).items():  # "model.<module>.weight" in the export
            modules[name[len("model."):].rsplit(".", 1)[0]].weight.copy_(torch.from_numpy(value))
    reference = TorchExportableModuleForDecoderOnlyLM(model, batch_size=1, max_cache_len=16).model
    steps = [(torch.tensor([[5, 9, 11, 3]]), torch.arange(4))] + [(None, torch.tensor([t])) for t in range(4, 8)]
    for ids, pos in steps:
        ids = ids if ids is not None else torch.tensor([[token]])
        with torch.no_grad():
            expect = reference(input_ids=ids, cache_position=pos).numpy()
        assert rel_err(compiled(ids, pos).numpy(), expect) <= 1e-4, int(pos[0])
        token = int(expect[0, -1].argmax())
    cache = compiled.state["key_cache_0"]
    assert cache[0, :, :8].any() and not cache[0, :, 8:].any()


def logits_on_decoded_weights(model, compiled, ids):
    """float64 logits of `model` holding the artifact's decoded weights (any parameter, the
    experts' 3-D ones too), its experts as batched_mm (transformers' grouped_mm takes no float64
    on the CPU)."""
    reference = copy.deepcopy(model).double()
    if reference.model.config._experts_implementation not in ("batched_mm", None):
        reference.model.set_experts_implementation("batched_mm")
    load_into_torch(reference, dequantized_weights(compiled))
    with torch.no_grad():
        return reference(ids).numpy()


def assert_experts_on_gathered_gemv(compiled):
    """Every expert weight quantized, each on the gathered GEMV, nothing left float."""
    experts = [layer["weight"] for layer in compiled.manifest["layers"] if "experts" in layer]
    kernels = compiled.manifest["cpu"]["kernels"]
    assert experts and all(kernels[w]["variant"] == "gathered gemv" for w in experts)
    assert compiled.remarks == []


def test_hf_mixture_of_experts():
    """Mixtral with transformers' batched_mm experts (each token's experts gathered, then a
    batched matmul): every weight is quantized, the experts' 3-D ones as E * N rows gathered
    per token, and the output matches float64 on the decoded weights."""
    cfg = dict(num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, **COMMON)
    ids = torch.randint(0, VOCAB, (1, 12), generator=torch.Generator().manual_seed(2))
    torch.manual_seed(0)
    model = Logits(T.AutoModelForCausalLM.from_config(T.MixtralConfig(**cfg), experts_implementation="batched_mm")
                   .eval()).eval()
    compiled = qcc.compile(model, (ids,), target="cpu", quant="w4a16-g128")
    experts = [layer["weight"] for layer in compiled.manifest["layers"] if "experts" in layer]
    assert len(compiled.manifest["layers"]) == 2 * 5 + 1 + len(experts) and len(experts) == 4
    assert compiled.remarks == []
    assert rel_err(compiled(ids).numpy(), logits_on_decoded_weights(model, compiled, ids)) <= 1e-4


@pytest.mark.parametrize("recipe,reference_kernels", [("w8a8", ""), ("w4a4", ""), ("w8a8-static", ""),
                                                      ("w4a4", "reference"), ("w8a8-static", "reference")])
def test_hf_mixture_of_experts_quantizes_expert_activations(recipe, reference_kernels, monkeypatch):
    """The experts' products quantize their rows too (each token's row for the up projections,
    each (token, expert) row for the down projections): the output equals a float32 fake-quant
    copy (decoded weights; every linear's input and every expert's row through the format's
    numpy reference), not the weight-only one.  Per tensor, a linear's scale is its calibrated
    absmax / 127 and an experts' weight's the largest over the rows of all its experts (from
    calibration's statistics, keyed `weight#expert`).  Their integer products run on the gathered
    integer kernel, or (QCC_CPU_KERNELS=reference) on the reference lowering."""
    from transformers.integrations import moe

    from qcc.calibration import linear_input_stats
    from qcc.dialects.formats import activation
    from qcc.frontend import export_module
    from qcc.recipes import get_recipe

    afmt = activation.ACT_FORMATS[get_recipe(recipe).act_format]
    cfg = dict(num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, **COMMON)
    ids = torch.randint(0, VOCAB, (1, 12), generator=torch.Generator().manual_seed(2))
    calibration = [(torch.randint(0, VOCAB, (1, 12), generator=torch.Generator().manual_seed(s)),) for s in (3, 4)]
    torch.manual_seed(0)
    model = Logits(T.AutoModelForCausalLM.from_config(T.MixtralConfig(**cfg), experts_implementation="batched_mm")
                   .eval()).eval()
    if reference_kernels:
        monkeypatch.setenv("QCC_CPU_KERNELS", reference_kernels)
    compiled = qcc.compile(model, (ids,), target="cpu", quant=recipe, calibration=calibration)
    assert [r.split(": ")[1] for r in compiled.remarks] == [f"the experts' rows are quantized ({afmt.key()})"]
    kernels = compiled.manifest["cpu"].get("kernels", {})
    experts = sorted(layer["weight"] for layer in compiled.manifest["layers"] if "experts" in layer)
    assert len(experts) == 4
    if reference_kernels != "reference":  # the integer path's gathered kernel, else the reference lowering
        assert all(kernels[w]["variant"] == "gathered int" for w in experts)
    scales = {}  # per tensor: {weight: [1, 1] scale}
    if not afmt.dynamic:
        stats = linear_input_stats(export_module(model, (ids,)), calibration, want=("absmax",))
        for key, st in stats.items():
            name = key.partition("#")[0]
            scales[name] = max(scales.get(name, 0.0), float(st.tensor_absmax))
        scales = {name: activation.static_scale(absmax, afmt) for name, absmax in scales.items()}

    def fake_quant(x, weight):
        rows = x.detach().reshape(-1, x.shape[-1]).numpy()
        return torch.from_numpy(activation.fake_quant_act(rows, afmt, scales.get(weight))).reshape(x.shape)

    ref = copy.deepcopy(model)
    load_into_torch(ref, dequantized_weights(compiled))
    with torch.no_grad():
        weight_only = ref(ids).numpy()
    modules = dict(ref.named_modules())
    for layer in compiled.manifest["layers"]:
        if "experts" not in layer:
            modules[layer["weight"].rsplit(".", 1)[0]].register_forward_pre_hook(
                lambda m, a, w=layer["weight"]: (fake_quant(a[0], w),))
    # transformers calls each layer's experts' products in order: gate_up_proj, then down_proj
    order = iter(sorted(experts, key=lambda w: (int(w.split("layers.")[1].split(".")[0]), "down" in w)))
    batched = moe._batched_linear
    monkeypatch.setattr(moe, "_batched_linear", lambda x, w, *a, **k: batched(fake_quant(x, next(order)), w, *a, **k))
    with torch.no_grad():
        expect = ref(ids).numpy()
    got = compiled(ids).numpy()
    assert rel_err(got, expect) <= 1e-4
    assert rel_err(weight_only, expect) > 20 * rel_err(got, expect)


def deepseek(config_class):
    """A small DeepSeek-V2 / V3: a dense first layer, 4 routed experts (top 2), low-rank q and kv."""
    return config_class(num_key_value_heads=4, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=128,
                        first_k_dense_replace=1, n_group=1, topk_group=1, q_lora_rank=128, kv_lora_rank=128,
                        qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=32, **COMMON)


MOE_CONFIGS = {
    "qwen2_moe": lambda: T.Qwen2MoeConfig(num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
                                          moe_intermediate_size=128, shared_expert_intermediate_size=128, **COMMON),
    "qwen3_moe": lambda: T.Qwen3MoeConfig(num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
                                          moe_intermediate_size=128, **COMMON),
    "olmoe": lambda: T.OlmoeConfig(num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, **COMMON),
    # its router masks the top expert with scatter (decomposed by the frontend)
    "phimoe": lambda: T.PhimoeConfig(num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, **COMMON),
    "granitemoe": lambda: T.GraniteMoeConfig(num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                                             **COMMON),
    # a dense first layer, a shared expert, group-limited routing (topk(sorted=False), scatter)
    "glm4_moe": lambda: T.Glm4MoeConfig(num_key_value_heads=2, n_routed_experts=4, num_experts_per_tok=2,
                                        moe_intermediate_size=128, n_shared_experts=1, first_k_dense_replace=1,
                                        n_group=1, topk_group=1, **COMMON),
    # experts stored [E, K, N] (`is_transposed`), biases, gate and up interleaved
    "gpt_oss": lambda: T.GptOssConfig(num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                                      head_dim=32, **COMMON),
    # multi-head latent attention (low-rank q and kv projections), sigmoid router with a bias
    "deepseek_v3": lambda: deepseek(T.DeepseekV3Config),
}


@pytest.mark.parametrize("arch", sorted(MOE_CONFIGS))
def test_hf_mixture_of_experts_architectures(arch):
    """Other routers and expert layouts in the batched_mm form: every expert weight quantized
    and run on the gathered GEMV, output equal to float64 on the decoded weights."""
    ids = torch.randint(0, VOCAB, (1, 10), generator=torch.Generator().manual_seed(2))
    torch.manual_seed(0)
    model = Logits(T.AutoModelForCausalLM.from_config(MOE_CONFIGS[arch](), experts_implementation="batched_mm")
                   .eval()).eval()
    compiled = qcc.compile(model, (ids,), target="cpu", quant="w4a16-g128")
    assert_experts_on_gathered_gemv(compiled)
    assert rel_err(compiled(ids).numpy(), logits_on_decoded_weights(model, compiled, ids)) <= 1e-4


@pytest.mark.parametrize("arch", ["gpt_oss", "mixtral"])
def test_hf_grouped_mm_experts(arch):
    """transformers' default experts form, grouped_mm (rows sorted by expert, histc counts,
    offsets): the frontend makes each grouped product a gather of the rows' expert weights,
    so the experts are quantized along K and run on the gathered GEMV as in the batched_mm
    form; gpt-oss's [E, K, N] experts are stored [E, N, K] and reported `transposed`."""
    ids = torch.randint(0, VOCAB, (1, 10), generator=torch.Generator().manual_seed(3))
    torch.manual_seed(0)
    config = MOE_CONFIGS["gpt_oss"]() if arch == "gpt_oss" else T.MixtralConfig(
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, **COMMON)
    model = Logits(T.AutoModelForCausalLM.from_config(config).eval()).eval()
    assert model.model.config._experts_implementation == "grouped_mm"
    compiled = qcc.compile(model, (ids,), target="cpu", quant="w4a16-g128")
    experts = {layer["weight"]: layer for layer in compiled.manifest["layers"] if "experts" in layer}
    params = dict(model.named_parameters())
    for name, layer in experts.items():  # E * N rows of K: the groups run along the reduction
        e, *shape = params[name].shape
        n, k = shape[::-1] if arch == "gpt_oss" else shape
        assert layer["shape"] == [e * n, k] and layer.get("transposed", False) == (arch == "gpt_oss")
    kernels = compiled.manifest["cpu"]["kernels"]
    assert len(experts) == 4 and all(kernels[w]["variant"] == "gathered gemv" for w in experts)
    assert compiled.remarks == []
    assert rel_err(compiled(ids).numpy(), logits_on_decoded_weights(model, compiled, ids)) <= 1e-4


COMPLEX_ROPE = {
    # complex rotary embeddings; experts as one batched product over all tokens ([E, K, N] weights)
    "llama4": lambda: T.Llama4TextConfig(num_key_value_heads=2, num_local_experts=4, **COMMON),
    # complex rotary embeddings, multi-head latent attention, grouped_mm experts
    "deepseek_v2": lambda: deepseek(T.DeepseekV2Config),
}


@pytest.mark.parametrize("arch", sorted(COMPLEX_ROPE))
def test_hf_complex_rope_models(arch):
    """Models whose rotary embedding multiplies complex numbers (the frontend's real pairs),
    every weight quantized, experts on the gathered GEMV, output equal to float64 on the
    decoded weights."""
    ids = torch.randint(0, VOCAB, (1, 10), generator=torch.Generator().manual_seed(4))
    torch.manual_seed(0)
    model = Logits(T.AutoModelForCausalLM.from_config(COMPLEX_ROPE[arch]()).eval()).eval()
    compiled = qcc.compile(model, (ids,), target="cpu", quant="w4a16-g128")
    assert_experts_on_gathered_gemv(compiled)
    assert rel_err(compiled(ids).numpy(), logits_on_decoded_weights(model, compiled, ids)) <= 1e-4


@pytest.mark.parametrize("arch,passes,remark", [
    # the embedding times a 0-d scale, norms scaling by (1 + w), a tied head
    ("gemma", "fuse-rotation{online=writers}", "fuse-rotation: rotated a 128-channel residual stream"),
    ("gemma", "reorder-channels", "reorder-channels: permuted a 128-channel residual stream"),
    # per-head q / k norms are not residual streams (no remark about them)
    ("qwen3", "fuse-rotation{online=writers}", "fuse-rotation: rotated a 128-channel residual stream"),
    # LayerNorm streams, rotated by a Q keeping the all-ones vector: Cohere's (no bias, parallel
    # attention and MLP, a tied head behind a logit scale); GPT-2's (Conv1D readers with biases,
    # position embeddings, a tied head); Falcon's (readers without biases: the norms' b W^T
    # become new ones); Nemotron's (relu^2 before the down projection: an online Hadamard there)
    ("cohere", "fuse-rotation", "fuse-rotation: rotated a 128-channel residual stream (random Hadamard times "
                                "the reflection keeping LayerNorm's all-ones vector): 1 embedding(s), 11 readers"),
    ("gpt2", "fuse-rotation", "fuse-rotation: rotated a 128-channel residual stream (random Hadamard times the "
                              "reflection keeping LayerNorm's all-ones vector): 2 embedding(s), 5 readers, 4 writers, "
                              "5 norm scales absorbed, 5 norm biases moved into the readers, 2 online"),
    ("falcon", "fuse-rotation", "fuse-rotation: rotated a 128-channel residual stream (random Hadamard times the "
                                "reflection keeping LayerNorm's all-ones vector): 1 embedding(s), 5 readers, 4 writers, "
                                "3 norm scales absorbed, 3 norm biases moved into the readers, 2 online"),
    ("nemotron", "fuse-rotation", "fuse-rotation: rotated a 128-channel residual stream (random Hadamard times "
                                  "the reflection keeping LayerNorm's all-ones vector): 1 embedding(s), 9 readers, "
                                  "4 writers, 5 norm scales absorbed, 5 norm biases moved into the readers, 2 online"),
    ("gpt2", "reorder-channels", "reorder-channels: permuted a 128-channel residual stream"),
    # norms after each sublayer write the stream (Gemma 2's, Gemma 3's, OLMo 2's): a Hadamard
    # transform after each (the signs of Q = D H folded into its scale); q / k norms are no seeds
    ("gemma2", "fuse-rotation", "fuse-rotation: rotated a 128-channel residual stream (random Hadamard): "
                                "1 embedding(s), 11 readers, 0 writers, 5 norm scales absorbed, 6 online Hadamard "
                                "transform(s) (4 on the stream after the norms writing to it)"),
    ("gemma3", "fuse-rotation{rotation=hadamard}", "fuse-rotation: rotated a 128-channel residual stream (hadamard)"),
    ("olmo2", "fuse-rotation", "fuse-rotation: rotated a 128-channel residual stream (random Hadamard): "
                               "1 embedding(s), 11 readers, 0 writers, 1 norm scales absorbed, 6 online"),
    ("gemma2", "reorder-channels", "reorder-channels: residual stream left not permuted: 4 product(s) by a norm "
                                   "scale added to it"),
    # a mixture of experts: the gathered experts' weights [E, N, K] read and write the stream
    # (columns W_e diag(g) Q, rows Q^T W_e); the routing weights and the sum over the chosen
    # experts commute with Q; reorder-channels permutes the experts' weights with the stream
    ("mixtral", "fuse-rotation", "fuse-rotation: rotated a 128-channel residual stream (random Hadamard): 1 "
                                 "embedding(s), 9 readers, 2 writers, 2 reading and 2 writing experts' weights"),
    ("mixtral", "reorder-channels", "reorder-channels: permuted a 128-channel residual stream"),
    # Llama 4: each expert reads every token (repeated rows scaled by the router's scores) through
    # unsqueeze + permute, and writes through a permute of its [T, N, 1] products; the q / k norm
    # after the rotary embeddings (read by attention alone) is no stream's and gets no remark
    ("llama4", "fuse-rotation", "fuse-rotation: rotated a 128-channel residual stream (random Hadamard): 1 "
                                "embedding(s), 13 readers, 4 writers, 2 reading and 2 writing experts' weights"),
    # gpt-oss: each chosen expert's output bias b[e] (a [E, hidden] table gathered by expert) is added
    # to the stream: its rows rotate, b_e Q
    ("gpt_oss", "fuse-rotation", "fuse-rotation: rotated a 128-channel residual stream (random Hadamard): 1 "
                                 "embedding(s), 9 readers, 2 writers, 2 reading and 2 writing experts' weights"),
    ("gpt_oss", "reorder-channels", "reorder-channels: permuted a 128-channel residual stream"),
    # an embedding LayerNorm: the stream is a norm's output, which no weight can rotate
    ("bloom", "fuse-rotation", "fuse-rotation: residual stream left unrotated"),
    ("cohere", "smooth-channels", "smooth-channels: left 2 linear layer(s) unsmoothed"),
])
def test_hf_transforms_keep_the_float_function(arch, passes, remark):
    """The issue's transforms on other architectures, before quantization: the float function
    unchanged, and each remark says what was done or why not."""
    configs = {"gemma": CONFIGS["gemma"], "gpt2": CONFIGS["gpt2"], "gemma2": GEMMA2,
               "gemma3": lambda: T.Gemma3TextConfig(num_key_value_heads=2, head_dim=32, **COMMON),
               "olmo2": lambda: T.Olmo2Config(num_key_value_heads=2, **COMMON),
               "mixtral": lambda: T.MixtralConfig(num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                                                  **COMMON),
               "qwen3": lambda: T.Qwen3Config(num_key_value_heads=2, head_dim=32, **COMMON),
               "cohere": lambda: T.CohereConfig(num_key_value_heads=2, **COMMON),
               "nemotron": lambda: T.NemotronConfig(num_key_value_heads=2, **COMMON),
               "falcon": lambda: T.FalconConfig(vocab_size=VOCAB, hidden_size=128, num_hidden_layers=2,
                                                num_attention_heads=4),
               "bloom": lambda: T.BloomConfig(vocab_size=VOCAB, hidden_size=128, n_layer=2, n_head=4),
               "llama4": lambda: T.Llama4TextConfig(num_key_value_heads=2, num_local_experts=4, **COMMON),
               "gpt_oss": lambda: T.GptOssConfig(num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                                                 head_dim=32, **COMMON)}
    torch.manual_seed(0)
    model = Logits(T.AutoModelForCausalLM.from_config(configs[arch]()).eval()).eval()
    ids = torch.randint(0, VOCAB, (1, 12), generator=torch.Generator().manual_seed(5))
    calibration = [(torch.randint(0, VOCAB, (1, 12), generator=torch.Generator().manual_seed(s)),) for s in (6, 7)]
    compiled = qcc.compile(model, (ids,), target="cpu", quant={"passes": [passes]}, calibration=calibration)
    assert [r for r in compiled.remarks if r.startswith(passes.split("{")[0])][0].startswith(remark)
    if arch in ("mixtral", "gpt_oss"):  # torch's grouped_mm takes no float64: the same experts as batched matmuls
        model = copy.deepcopy(model)
        model.model.set_experts_implementation("batched_mm")
    assert rel_err(compiled(ids).numpy(), float64_out(model, (ids,))) <= 1e-4



def test_architecture_sweep_tool(capsys):
    """tools/hf_sweep.py (the wide net over transformers' architectures) runs and reports."""
    from qcc.tools import hf_sweep

    assert hf_sweep.main(["gpt2", "mixtral", "--quant", "w8a16"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[:2] for line in lines] == [["gpt2", "OK"], ["mixtral", "OK"]]
    # quantized activations: the oracle fake-quantizes every linear's input and the experts' rows
    assert hf_sweep.main(["mixtral", "--quant", "w8a8"]) == 0
    assert capsys.readouterr().out.split()[:2] == ["mixtral", "OK"]
    with pytest.raises(SystemExit):  # a rotation is no format numerics: --transform checks it
        hf_sweep.main(["mixtral", "--quant", "w8a8-had"])
    capsys.readouterr()
    # wav2vec2 on the GPU: its graph holds literal index tensors (dense_resource constants),
    # which the CUDA host plan could not read
    assert hf_sweep.main(["wav2vec2", "--target", "cuda", "--quant", "w8a16"]) == 0
    capsys.readouterr()
    # float-preserving transforms on T5: an encoder and a decoder stream sharing one embedding
    # table (rotated by one Q; permuted by one permutation), the decoder's head read through
    # a d_model^-0.5 scale
    assert hf_sweep.main(["t5", "--transform", "fuse-rotation"]) == 0
    assert hf_sweep.main(["t5", "--transform", "reorder-channels"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[:2] for line in lines] == [["t5", "OK"], ["t5", "OK"]]
    assert "fuse-rotation: rotated a 128-channel residual stream" in lines[0]
    assert "reorder-channels: permuted a 128-channel residual stream (and 1 sharing its embedding table)" in lines[1]


def _layer_outputs(session, ep, calibration):
    """{weight: the linear's output on the calibration rows} as the calibration program sees the
    session's function (its view of the rewrites so far), with any `:norm_bias` added."""
    from qcc.calibration import session_stats

    stats = session_stats(session, want=("samples",), sample_rows=0)
    out = {}
    for key, st in stats.items():
        name, _, expert = key.partition("#")  # calibration.expert_key: an expert's rows
        w = np.asarray(session.params[name], np.float64)
        if name.endswith("lm_head.weight"):
            continue
        out[key] = st.samples @ (w[int(expert)] if expert else w).T + (
            np.asarray(session.params[f"{name}:norm_bias"], np.float64) if f"{name}:norm_bias" in session.params
            else 0.0)
    return out


@pytest.mark.parametrize("arch", ["gemma2", "llama-layernorm", "mixtral"])
def test_rotation_keeps_the_calibration_program_in_step(arch):
    """After fuse-rotation, the calibration program (the exported model with the session's view:
    new parameter values, Hadamards after the norms that write the stream, the LayerNorm biases
    as reader biases) gives each linear layer inputs whose products equal the original model's
    (the stream's writers': up to the rotation): the rotation moves activations, not outputs.  Later passes (GPTQ, static scales, AWQ,
    reorder-channels) calibrate on those inputs."""
    import models
    from qcc import pipelines
    from qcc.context import make_context
    from qcc.frontend import export_module, import_program
    from qcc.pipeline import Session, run_pipeline

    torch.manual_seed(0)
    if arch in ("gemma2", "mixtral"):  # mixtral: the experts' rows (their down projections' after an online H)
        config = GEMMA2() if arch == "gemma2" else T.MixtralConfig(num_key_value_heads=2, num_local_experts=4,
                                                                   num_experts_per_tok=2, **COMMON)
        kw = {"experts_implementation": "batched_mm"} if arch == "mixtral" else {}
        model = Logits(T.AutoModelForCausalLM.from_config(config, **kw).eval()).eval()
        make = lambda s: (torch.randint(0, VOCAB, (1, 12), generator=torch.Generator().manual_seed(s)),)
    else:
        model = models.LlamaModel(vocab=64, hidden=64, layers=2, heads=4, ffn=96, max_seq=16, norm="layer").eval()
        make = lambda s: model.example_inputs(batch=1, seq=12, seed=s)
    calibration = [make(s) for s in (1, 2)]
    ep = export_module(model, make(0))
    prog = import_program(ep, make_context())
    session = Session(prog.params, {"exported_program": ep, "calibration": calibration})
    run_pipeline(prog.module, pipelines.IMPORT, session, "import")
    before = _layer_outputs(session, ep, calibration)
    run_pipeline(prog.module, ["fuse-rotation"], session, "transform")
    assert any("rotated" in r for r in session.remarks), session.remarks
    after = _layer_outputs(session, ep, calibration)
    assert sorted(after) == sorted(before) and len(before) >= 14
    assert arch != "mixtral" or any("experts.down_proj#" in name for name in before)
    for name in before:  # the stream's writers' outputs are rotated: equal up to an orthogonal map
        writer = arch != "gemma2" and name.split("#")[0].endswith(("o_proj.weight", "down_proj.weight",
                                                                   "experts.down_proj"))
        a, b = (after[name] @ after[name].T, before[name] @ before[name].T) if writer else (after[name], before[name])
        assert rel_err(a, b) <= 1e-5, name


def test_hf_gemma2_rotated_w8a8_matches_rotated_oracle():
    """Gemma 2 (norms after each sublayer) with w8a8 and fuse-rotation equals PyTorch in float64
    running the rotated model: decoded weights, the absorbed norms' w = 0 (Gemma's 1 + w), the
    norms after each sublayer keeping the artifact's sign-folded scales followed by a Hadamard,
    a Hadamard before each down projection, every linear input fake-quantized per token."""
    from qcc import hadamard
    from qcc.dialects.formats import activation

    torch.manual_seed(0)
    model = Logits(T.AutoModelForCausalLM.from_config(GEMMA2()).eval()).eval()
    ids = torch.randint(0, VOCAB, (1, 12), generator=torch.Generator().manual_seed(3))
    compiled = qcc.compile(model, (ids,), target="cpu",
                           quant={"weight_format": "int8_sym_channel", "act_format": "int8_sym_token",
                                  "passes": ["fuse-rotation"]})
    oracle = copy.deepcopy(model).double()
    decoded = dequantized_weights(compiled)
    with torch.no_grad():
        for name, p in oracle.named_parameters():
            if name.endswith("embed_tokens.weight"):  # tied: the table is the float rotated copy
                p.copy_(torch.from_numpy(np.asarray(compiled.weights["model.lm_head.weight"])))
            elif name in decoded:
                p.copy_(torch.from_numpy(decoded[name]))
            elif name in compiled.weights:
                p.copy_(torch.from_numpy(np.asarray(compiled.weights[name])))
            else:
                assert "norm" in name, name
                p.zero_()
    oracle.model.lm_head.weight = torch.nn.Parameter(torch.from_numpy(decoded["model.lm_head.weight"]).double())
    fmt = activation.parse_act_format("int8_sym_token")

    def had(t):
        return torch.from_numpy(hadamard.fast_transform(t.numpy()))

    def fake_quant(t):
        rows = t.numpy().reshape(-1, t.shape[-1]).astype(np.float32)
        return torch.from_numpy(activation.fake_quant_act(rows, fmt, None).astype(np.float64)).reshape(t.shape)

    for name, module in oracle.named_modules():
        if name.endswith(("post_attention_layernorm", "post_feedforward_layernorm")):
            module.register_forward_hook(lambda m, args, y: had(y))
        if isinstance(module, torch.nn.Linear):
            if name.endswith("down_proj"):
                module.register_forward_pre_hook(lambda m, args: (had(args[0]),))
            module.register_forward_pre_hook(lambda m, args: (fake_quant(args[0]),))
    with torch.no_grad():
        expect = oracle(ids).numpy()
    assert rel_err(compiled(ids).numpy(), expect) <= 1e-5
    assert rel_err(float64_out(model, (ids,)), expect) > 1e-3  # it was quantized
