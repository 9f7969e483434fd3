"""Benchmark models over the zoo's LlamaModel: a decode step with an explicit KV cache.

`DecodeStep(model, cache_len)` shares `model`'s parameters and computes the
logits of one new token at position `cache_len`, attending over a KV cache
passed as inputs; it returns the logits and the token's keys and values (the
caller appends them).  Everything is static-shaped, so torch.export, qcc,
eager PyTorch and torch.compile all run the same graph.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from models import LlamaModel, _rotate_half

__all__ = ["DecodeStep", "bench_llama"]


def bench_llama(layers: int = 4, hidden: int = 2048, ffn: int = 5632, heads: int = 16,
                vocab: int = 512, max_seq: int = 640, seed: int = 0, kv_heads=None) -> LlamaModel:
    """The Llama-style benchmark model of issue 4 (4 layers, hidden 2048, SwiGLU 5632);
    kv_heads < heads for grouped-query attention."""
    return LlamaModel(vocab=vocab, hidden=hidden, layers=layers, heads=heads, ffn=ffn,
                      max_seq=max_seq, seed=seed, kv_heads=kv_heads).eval()


class DecodeStep(nn.Module):
    """One decode step of `batch` sequences, each one new token attending to its KV cache of
    `cache_len` positions (all at the same position): ids [batch, 1], caches [layers, batch,
    kv_heads, cache_len, head_dim] of `cache_dtype` -> logits and the new keys and values (f32)."""

    def __init__(self, model: LlamaModel, cache_len: int, batch: int = 1, cache_dtype=torch.float32):
        super().__init__()
        self.model = model
        self.cache_len = cache_len
        self.batch = batch
        self.cache_dtype = cache_dtype  # f16: the caches kept in half precision, widened to read
        attn = model.layers[0].self_attn
        if cache_len >= attn.max_seq:
            raise ValueError(f"cache_len={cache_len} needs max_seq > {cache_len}")
        self.kv_heads, self.head_dim = attn.kv_heads, attn.head_dim

    def cache_shape(self) -> tuple:
        return (len(self.model.layers), self.batch, self.kv_heads, self.cache_len, self.head_dim)

    def example_inputs(self, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, self.model.vocab, (self.batch, 1), generator=g)
        return (ids, torch.randn(self.cache_shape(), generator=g).to(self.cache_dtype),
                torch.randn(self.cache_shape(), generator=g).to(self.cache_dtype))

    def dynamic_shapes(self):
        """torch.export's dynamic_shapes for a step compiled for any cache length:
        `qcc.compile(step, inputs, dynamic_shapes=step.dynamic_shapes())`. Dim.DYNAMIC lets
        export infer the range (up to max_seq - 1); a named Dim with explicit bounds fails
        export's constraint solver on repeat_kv's reshape (grouped-query attention)."""
        from torch.export import Dim

        return (None, {3: Dim.DYNAMIC}, {3: Dim.DYNAMIC})

    def forward(self, ids, k_cache, v_cache):
        b = self.batch
        x = self.model.embed_tokens(ids)                       # [b, 1, hidden]
        pos = k_cache.shape[3]  # the new token's position: an int, or symbolic (dynamic_shapes())
        new_k, new_v = [], []
        for i, layer in enumerate(self.model.layers):
            a = layer.self_attn
            h = layer.input_layernorm(x)
            q = a.q_proj(h).view(b, 1, a.heads, a.head_dim).transpose(1, 2)
            k = a.k_proj(h).view(b, 1, a.kv_heads, a.head_dim).transpose(1, 2)
            v = a.v_proj(h).view(b, 1, a.kv_heads, a.head_dim).transpose(1, 2)
            cos, sin = a.rope_cos[pos:pos + 1], a.rope_sin[pos:pos + 1]
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            new_k.append(k)
            new_v.append(v)
            keys = a._repeat_kv(torch.cat([k_cache[i].to(k.dtype), k], dim=2))
            values = a._repeat_kv(torch.cat([v_cache[i].to(v.dtype), v], dim=2))
            scores = torch.matmul(q, keys.transpose(-2, -1)) * a.scale
            probs = F.softmax(scores, dim=-1)
            out = torch.matmul(probs, values).transpose(1, 2).reshape(b, 1, a.hidden)
            x = x + a.o_proj(out)
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        logits = self.model.lm_head(self.model.norm(x))
        return logits, torch.stack(new_k), torch.stack(new_v)
