"""Sweep transformers' architectures through qcc: `python -m qcc.tools.hf_sweep [--target cuda]
[--quant w8a16 | --transform PASS] [arch ...]`.

Each architecture is built from a small random config (no hub), compiled, run (CUDA: on the
emulator) and compared with the float64 model holding the artifact's decoded weights (with a
quantized-activation recipe, w8a8 say: the float64 model with every quantized layer's input and
each expert's rows through the format's numpy reference); one line each: OK / BAD (relative error
over 1e-4) / FAIL (qcc's error) / SKIP (the config itself does not build or run in transformers,
or a quantized input the oracle's hooks cannot reach).  `--transform fuse-rotation` (or any float-preserving pass list,
comma-separated) compiles with only those passes, calibrated on two other inputs, compares with
the float64 model itself and prints the pass's first remark: what it rotated, or why not.
The test suite pins a subset (test_hf_models.py); this is the wide net, for a new transformers
release or a new frontend rewrite.  Needs the dev extra.
"""

import argparse
import copy
import sys
import time

import numpy as np

VOCAB = 320


def _architectures(T) -> dict:
    """{name: (config or model builder, input kind)}; kinds: ids (causal LM), enc_ids, pixels,
    audio, s2s (encoder ids + decoder ids), whisper (features + decoder ids)."""
    common = dict(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=64)
    enc = dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256)

    def lm(name, **kw):
        return lambda: T.AutoModelForCausalLM.from_config(getattr(T, name)(**{**common, **kw})), "ids"

    deepseek = dict(num_key_value_heads=4, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=128,
                    first_k_dense_replace=1, n_group=1, topk_group=1, q_lora_rank=128, kv_lora_rank=128,
                    qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=32)
    small = dict(vocab_size=VOCAB, n_positions=64)
    return {
        "llama": lm("LlamaConfig", num_key_value_heads=2),
        "mistral": lm("MistralConfig", num_key_value_heads=2),
        "qwen2": lm("Qwen2Config", num_key_value_heads=2),
        "qwen3": lm("Qwen3Config", num_key_value_heads=2, head_dim=32),
        "gemma": lm("GemmaConfig", num_key_value_heads=1, head_dim=32),
        "gemma2": lm("Gemma2Config", num_key_value_heads=2, head_dim=32),
        "gemma3": lm("Gemma3TextConfig", num_key_value_heads=2, head_dim=32),
        "phi": lm("PhiConfig", num_key_value_heads=4),
        "phi3": lm("Phi3Config", num_key_value_heads=4, pad_token_id=0),
        "stablelm": lm("StableLmConfig", num_key_value_heads=4),
        "starcoder2": lm("Starcoder2Config", num_key_value_heads=2),
        "olmo": lm("OlmoConfig", num_key_value_heads=2),
        "olmo2": lm("Olmo2Config", num_key_value_heads=2),
        "cohere": lm("CohereConfig", num_key_value_heads=2),
        "granite": lm("GraniteConfig", num_key_value_heads=2),
        "smollm3": lm("SmolLM3Config", num_key_value_heads=2, pad_token_id=0),
        "helium": lm("HeliumConfig", num_key_value_heads=2, head_dim=32),
        "glm": lm("GlmConfig", num_key_value_heads=2, pad_token_id=0),
        "glm4": lm("Glm4Config", num_key_value_heads=2, pad_token_id=0),
        "exaone4": lm("Exaone4Config", num_key_value_heads=2),
        "nemotron": lm("NemotronConfig", num_key_value_heads=2),
        "gpt_neox": lm("GPTNeoXConfig"),
        "gpt2": (lambda: T.AutoModelForCausalLM.from_config(T.GPT2Config(n_embd=128, n_layer=2, n_head=4, **small)),
                 "ids"),
        "gpt_bigcode": (lambda: T.AutoModelForCausalLM.from_config(T.GPTBigCodeConfig(n_embd=128, n_layer=2, n_head=4,
                                                                                      **small)), "ids"),
        "gptj": (lambda: T.AutoModelForCausalLM.from_config(T.GPTJConfig(n_embd=128, n_layer=2, n_head=4, rotary_dim=16,
                                                                         **small)), "ids"),
        "codegen": (lambda: T.AutoModelForCausalLM.from_config(T.CodeGenConfig(n_embd=128, n_layer=2, n_head=4,
                                                                               rotary_dim=16, **small)), "ids"),
        "falcon": (lambda: T.AutoModelForCausalLM.from_config(T.FalconConfig(vocab_size=VOCAB, hidden_size=128,
                                                                             num_hidden_layers=2, num_attention_heads=4)),
                   "ids"),
        "bloom": (lambda: T.AutoModelForCausalLM.from_config(T.BloomConfig(vocab_size=VOCAB, hidden_size=128, n_layer=2,
                                                                           n_head=4)), "ids"),
        "mpt": (lambda: T.AutoModelForCausalLM.from_config(T.MptConfig(vocab_size=VOCAB, d_model=128, n_layers=2,
                                                                       n_heads=4, max_seq_len=64)), "ids"),
        "mamba": (lambda: T.AutoModelForCausalLM.from_config(T.MambaConfig(vocab_size=VOCAB, hidden_size=128,
                                                                           num_hidden_layers=2)), "ids"),
        # mixtures of experts (transformers' default grouped_mm experts)
        "mixtral": lm("MixtralConfig", num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2),
        "qwen3_moe": lm("Qwen3MoeConfig", num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
                        moe_intermediate_size=128),
        "gpt_oss": lm("GptOssConfig", num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, head_dim=32),
        "deepseek_v2": lm("DeepseekV2Config", **deepseek),
        "deepseek_v3": lm("DeepseekV3Config", **deepseek),
        "llama4": lm("Llama4TextConfig", num_key_value_heads=2, num_local_experts=4),
        "qwen3_next": lm("Qwen3NextConfig", num_key_value_heads=2),
        "minimax": lm("MiniMaxConfig", num_key_value_heads=2),
        "jamba": lm("JambaConfig", num_key_value_heads=2),
        # encoders, vision, audio
        "bert": (lambda: T.BertModel(T.BertConfig(vocab_size=VOCAB, max_position_embeddings=64, **enc),
                                     add_pooling_layer=False), "enc_ids"),
        "deberta_v2": (lambda: T.DebertaV2Model(T.DebertaV2Config(vocab_size=VOCAB, max_position_embeddings=64, **enc)),
                       "enc_ids"),
        "modernbert": (lambda: T.ModernBertModel(T.ModernBertConfig(vocab_size=VOCAB, pad_token_id=0,
                                                                    max_position_embeddings=64, **enc)), "enc_ids"),
        "t5_encoder": (lambda: T.T5EncoderModel(T.T5Config(vocab_size=VOCAB, d_model=128, d_kv=32, d_ff=256,
                                                           num_layers=2, num_heads=4)), "enc_ids"),
        "vit": (lambda: T.ViTModel(T.ViTConfig(image_size=32, patch_size=8, **enc), add_pooling_layer=False), "pixels"),
        "siglip_vision": (lambda: T.SiglipVisionModel(T.SiglipVisionConfig(image_size=32, patch_size=8, **enc)),
                          "pixels"),
        "swin": (lambda: T.SwinModel(T.SwinConfig(image_size=32, patch_size=4, embed_dim=32, depths=[1, 1],
                                                  num_heads=[2, 4], window_size=4)), "pixels"),
        "convnext": (lambda: T.ConvNextModel(T.ConvNextConfig(hidden_sizes=[32, 64], depths=[1, 1], num_stages=2)),
                     "pixels"),
        "wav2vec2": (lambda: T.Wav2Vec2Model(T.Wav2Vec2Config(conv_dim=(32, 32), conv_stride=(5, 2),
                                                              conv_kernel=(10, 3), num_feat_extract_layers=2,
                                                              num_conv_pos_embeddings=16,
                                                              num_conv_pos_embedding_groups=4, **enc)), "audio"),
        # encoder-decoders
        "t5": (lambda: T.T5ForConditionalGeneration(T.T5Config(vocab_size=VOCAB, d_model=128, d_kv=32, d_ff=256,
                                                               num_layers=2, num_heads=4, decoder_start_token_id=0)),
               "s2s"),
        "bart": (lambda: T.BartForConditionalGeneration(T.BartConfig(
            vocab_size=VOCAB, d_model=128, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
            decoder_attention_heads=4, encoder_ffn_dim=256, decoder_ffn_dim=256, max_position_embeddings=64,
            pad_token_id=1)), "s2s"),
        "whisper": (lambda: T.WhisperForConditionalGeneration(T.WhisperConfig(
            vocab_size=VOCAB, pad_token_id=0, d_model=128, encoder_layers=2, decoder_layers=2,
            encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=256, decoder_ffn_dim=256,
            num_mel_bins=16, max_source_positions=32, max_target_positions=32)), "whisper"),
    }


def _wrapped(model, kind):
    """(a module returning one tensor, its inputs)."""
    import torch

    g = torch.Generator().manual_seed(1)

    class Wrap(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, *args):
            m = self.model
            if kind == "ids":
                return m(input_ids=args[0], use_cache=False).logits
            if kind == "enc_ids":
                return m(input_ids=args[0]).last_hidden_state
            if kind == "pixels":
                return m(pixel_values=args[0]).last_hidden_state
            if kind == "audio":
                return m(input_values=args[0]).last_hidden_state
            if kind == "s2s":
                return m(input_ids=args[0], decoder_input_ids=args[1], use_cache=False).logits
            return m(input_features=args[0], decoder_input_ids=args[1], use_cache=False).logits

    inputs = {"ids": lambda: (torch.randint(3, VOCAB, (1, 12), generator=g),),
              "enc_ids": lambda: (torch.randint(3, VOCAB, (2, 12), generator=g),),
              "pixels": lambda: (torch.randn(1, 3, 32, 32, generator=g),),
              "audio": lambda: (torch.randn(1, 1600, generator=g),),
              "s2s": lambda: (torch.randint(3, VOCAB, (1, 12), generator=g), torch.randint(3, VOCAB, (1, 7), generator=g)),
              "whisper": lambda: (torch.randn(1, 16, 64, generator=g), torch.randint(3, VOCAB, (1, 7), generator=g))}
    return Wrap().eval(), inputs[kind]()


def _reference(wrapped, compiled, inputs):
    """float64 outputs of `wrapped` holding the artifact's decoded weights (experts as
    batched_mm: transformers' grouped_mm takes no float64 on the CPU)."""
    import torch

    from qcc.reference import dequantized_weights, load_into_torch

    ref = copy.deepcopy(wrapped).double()
    if getattr(ref.model.config, "_experts_implementation", None) not in (None, "batched_mm"):
        ref.model.set_experts_implementation("batched_mm")
    load_into_torch(ref, dequantized_weights(compiled))
    with torch.no_grad():
        return ref(*(a.double() if a.is_floating_point() else a for a in inputs)).numpy()


def _act_reference(wrapped, compiled, inputs, act_format, only=None, dtype="float64"):
    """`dtype` outputs of `wrapped` holding the artifact's decoded weights with every quantized
    linear's input, and each batched_mm expert's rows, through the activation format's numpy
    reference (the fake-quant semantics, in float32; Llama 4's experts: the rows of their bmm's
    first operand); None when a quantized layer's input is out of a hook's reach (a convolution
    made a linear over its patches; other experts outside `_batched_linear`)."""
    import torch
    from transformers.integrations import moe

    from qcc.dialects.formats import activation
    from qcc.reference import dequantized_weights, load_into_torch

    fmt = activation.ACT_FORMATS[act_format]

    def fake_quant(x):
        rows = x.detach().float().reshape(-1, x.shape[-1]).numpy()
        return torch.from_numpy(activation.fake_quant_act(rows, fmt)).reshape(x.shape).to(x.dtype)

    ref = copy.deepcopy(wrapped).to(getattr(torch, dtype))
    if getattr(ref.model.config, "_experts_implementation", None) not in (None, "batched_mm"):
        ref.model.set_experts_implementation("batched_mm")
    load_into_torch(ref, dequantized_weights(compiled))
    modules = dict(ref.named_modules())
    experts, hooked, called, calls = False, set(), set(), []
    bmm = torch.bmm
    bmm_x = lambda x, w: (calls.append(1), bmm(fake_quant(x), w))[1]  # noqa: E731
    for layer in compiled.manifest["layers"]:
        if only is not None and layer["weight"] not in only:
            continue
        owner = modules.get(layer["weight"].rsplit(".", 1)[0])
        if "experts" in layer:
            experts = True
            if type(owner).__name__ == "Llama4TextExperts" and owner not in hooked:  # bmm(x [E, T, K], W)
                hooked.add(owner)
                owner.register_forward_pre_hook(lambda m, a: (called.add(m), setattr(torch, "bmm", bmm_x))[0])
                owner.register_forward_hook(lambda m, a, out: setattr(torch, "bmm", bmm))
        elif "conv_shape" in layer or owner is None or isinstance(owner, torch.nn.Embedding):
            return None  # (a router module holding its weight takes the layer's input first, as a Linear does)
        else:
            hooked.add(owner)
            owner.register_forward_pre_hook(lambda m, a: (called.add(m), (fake_quant(a[0]), *a[1:]))[1])
    batched = moe._batched_linear

    def quantized_rows(x, w, *a, **k):
        calls.append(1)
        return batched(fake_quant(x), w, *a, **k)

    moe._batched_linear = quantized_rows
    try:
        with torch.no_grad():
            out = ref(*(a.to(getattr(torch, dtype)) if a.is_floating_point() else a for a in inputs)).numpy()
    finally:
        moe._batched_linear, torch.bmm = batched, bmm
    # a weight used without its module's call (Mamba's dt_proj.weight @ x) is out of reach too
    return None if (experts and not calls) or hooked - called else out


def _float64(wrapped, inputs):
    import torch

    ref = copy.deepcopy(wrapped).double()
    if getattr(ref.model.config, "_experts_implementation", None) not in (None, "batched_mm"):
        ref.model.set_experts_implementation("batched_mm")
    with torch.no_grad():
        return ref(*(a.double() if a.is_floating_point() else a for a in inputs)).numpy()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("archs", nargs="*", help="architectures (default: all)")
    p.add_argument("--target", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--quant", default="w4a16-g128")
    p.add_argument("--transform", help="float-preserving passes to check instead of --quant (e.g. fuse-rotation)")
    args = p.parse_args(argv)
    import torch
    import transformers as T

    import qcc

    if not args.transform:  # the oracle knows the formats' numerics, not other passes' rewrites
        from qcc.recipes import get_recipe

        extra = [p for p in get_recipe(args.quant).passes
                 if p.partition("{")[0] not in ("quantize-weights", "quantize-activations", "dequant-after-gemm")]
        if extra:
            p.error(f"--quant {args.quant} runs {extra}, which the sweep's oracle does not model; "
                    f"check transforms with --transform")
    archs = _architectures(T)
    unknown = set(args.archs) - set(archs)
    if unknown:
        p.error(f"unknown architectures {sorted(unknown)}; choose from {sorted(archs)}")
    bad = 0
    for name in args.archs or archs:
        make, kind = archs[name]
        t0 = time.time()
        try:
            torch.manual_seed(0)
            model, inputs = _wrapped(make().eval(), kind)
            model(*inputs)
        except Exception as e:  # the small config itself does not work in transformers
            print(f"{name:14s} SKIP {type(e).__name__}: {str(e)[:120]}", flush=True)
            continue
        try:
            if args.transform:
                passes = args.transform.split(",")
                calibration = [_wrapped(model.model, kind)[1] for _ in range(2)]
                compiled = qcc.compile(model, inputs, target=args.target, quant={"passes": passes},
                                       calibration=calibration)
            else:
                compiled = qcc.compile(model, inputs, target=args.target, quant=args.quant)
            if args.target == "cuda":
                from qcc.backends.cuda import emulate

                got = emulate.run_compiled(compiled, *inputs)[0]
            else:
                got = compiled(*inputs).numpy()
            act = compiled.manifest.get("recipe", {}).get("act_format") if not args.transform else None
            if args.transform:
                want = _float64(model, inputs)
            elif act:
                want = _act_reference(model, compiled, inputs, act)
                if want is None:
                    print(f"{name:14s} SKIP a quantized layer's input is out of the reference hooks' reach", flush=True)
                    continue
            else:
                want = _reference(model, compiled, inputs)
            err = float(np.linalg.norm(got - want) / np.linalg.norm(want))
            if act and err > 1e-4:  # torch's float32 and float64 paths can differ by more than qcc's float32
                # from either (GPTBigCode's float32 attention, DeepSeek-V2's float64 rotary: ~8e-3 with
                # w8a8, where one path flips an activation code the other does not): the nearer one
                want32 = _act_reference(model, compiled, inputs, act, dtype="float32")
                err = min(err, float(np.linalg.norm(got - want32) / np.linalg.norm(want32)))
            ok = err <= 1e-4
            if args.transform:
                first = next((r for r in compiled.remarks if r.startswith(passes[0].split("{")[0])), "no remark")
                what = first.split(" (at loc")[0]
            else:
                what = f"{len(compiled.manifest['layers'])} quantized, {len(compiled.remarks)} remarks"
            if not ok and act:
                # an activation code that rounds the other way (float32 here, float64 in the oracle,
                # at a rounding boundary) moves its outputs a step: allowed while the distance stays a
                # small part of the activations' own quantization error (as cuda_device_run's cases)
                quant = float(np.linalg.norm(want - _reference(model, compiled, inputs)) / np.linalg.norm(want))
                ok = err <= 0.25 * quant
                what += f", code flips: {err / quant:.2f} of the activations' quantization error {quant:.1e}"
            bad += not ok
            print(f"{name:14s} {'OK ' if ok else 'BAD'} rel err {err:.1e}, {what}, {time.time() - t0:.0f} s",
                  flush=True)
        except Exception as e:
            bad += 1
            print(f"{name:14s} FAIL {type(e).__name__}: {str(e)[:300]}", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
