"""Shared model zoo for tests and benchmarks.

Import with ``test/`` on ``sys.path``::

    from models import MLP, LlamaBlock, LlamaModel, SmallCNN, ZOO

Every model is a plain ``nn.Module`` whose parameters are drawn from a private
``torch.Generator`` seeded by the ``seed`` constructor argument, so building a
model neither depends on nor disturbs the global RNG. Each model has an
``example_inputs(...)`` method returning a tuple of deterministic inputs.

All models export with ``torch.export.export`` and lower through torch-mlir
(``fx.export_and_import(..., output_type="linalg-on-tensors")``). To keep that
true they avoid complex numbers (rotary embedding uses real cos/sin buffers and
``rotate_half`` via slicing + cat), ``F.scaled_dot_product_attention`` (attention
is written out as matmul + additive causal-mask buffer + ``F.softmax``), and
``repeat_interleave`` (GQA uses expand + reshape).

Keep this module import-light: it depends on torch only.
"""

from __future__ import annotations

import math
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "MLP",
    "RMSNorm",
    "LlamaAttention",
    "LlamaMLP",
    "LlamaBlock",
    "LlamaModel",
    "SmallCNN",
    "outlier_llama",
    "ZOO",
]


# ---------------------------------------------------------------------------
# Deterministic init helpers (no global RNG use)
# ---------------------------------------------------------------------------

def _gen(seed: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def _normal_(t: torch.Tensor, g: torch.Generator, std: float, mean: float = 0.0) -> torch.Tensor:
    with torch.no_grad():
        t.copy_(torch.randn(t.shape, generator=g, dtype=t.dtype) * std + mean)
    return t


def _linear(in_f: int, out_f: int, bias: bool, g: torch.Generator, std: float,
            bias_std: float = 0.02) -> nn.Linear:
    lin = torch.nn.utils.skip_init(nn.Linear, in_f, out_f, bias=bias)
    _normal_(lin.weight, g, std)
    if bias:
        _normal_(lin.bias, g, bias_std)
    return lin


def _conv2d(in_c: int, out_c: int, k: int, pad: int, g: torch.Generator,
            bias: bool = True) -> nn.Conv2d:
    conv = torch.nn.utils.skip_init(nn.Conv2d, in_c, out_c, k, padding=pad, bias=bias)
    _normal_(conv.weight, g, math.sqrt(2.0 / (in_c * k * k)))  # He init
    if bias:
        _normal_(conv.bias, g, 0.05)
    return conv


# ---------------------------------------------------------------------------
# 1. MLP
# ---------------------------------------------------------------------------

class MLP(nn.Module):
    """Linear -> GELU -> Linear -> ReLU -> Linear, all with biases.

    Input: float32 ``[batch, in_features]``.
    """

    def __init__(self, in_features: int = 64, hidden: int = 256, out_features: int = 32,
                 seed: int = 0):
        super().__init__()
        g = _gen(seed)
        self.in_features = in_features
        self.fc1 = _linear(in_features, hidden, True, g, 1.0 / math.sqrt(in_features), 0.1)
        self.fc2 = _linear(hidden, hidden, True, g, math.sqrt(2.0 / hidden), 0.1)
        self.fc3 = _linear(hidden, out_features, True, g, math.sqrt(2.0 / hidden), 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)

    def example_inputs(self, batch: int = 4, seed: int = 0) -> Tuple[torch.Tensor]:
        return (torch.randn(batch, self.in_features, generator=_gen(seed + 1000)),)


# ---------------------------------------------------------------------------
# 2. Llama decoder block
# ---------------------------------------------------------------------------

class RMSNorm(nn.Module):
    """x * rsqrt(mean(x^2) + eps) * weight, computed in float32."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(dtype)


def _norm(kind: str, dim: int, eps: float) -> nn.Module:
    """"rms": RMSNorm; "layer": nn.LayerNorm (OPT's, Phi's, GPT-NeoX's pre-norms)."""
    if kind not in ("rms", "layer"):
        raise ValueError(f"norm must be 'rms' or 'layer', got {kind!r}")
    return RMSNorm(dim, eps) if kind == "rms" else nn.LayerNorm(dim, eps)


def _init_norm(norm: nn.Module, g: torch.Generator) -> None:
    """Scale ~ N(1, 0.1), a LayerNorm's bias ~ N(0, 0.1): non-trivial, as in trained models."""
    _normal_(norm.weight, g, 0.1, mean=1.0)
    if getattr(norm, "bias", None) is not None:
        _normal_(norm.bias, g, 0.1)


def _rope_tables(head_dim: int, max_seq: int, base: float = 10000.0):
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    t = torch.arange(max_seq, dtype=torch.float64)
    freqs = torch.outer(t, inv_freq)                 # [max_seq, head_dim/2]
    emb = torch.cat((freqs, freqs), dim=-1)          # [max_seq, head_dim]
    return emb.cos().float(), emb.sin().float()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    x1 = x[..., :half]
    x2 = x[..., half:]
    return torch.cat((-x2, x1), dim=-1)


class LlamaAttention(nn.Module):
    """Causal multi-head attention with RoPE and optional GQA (kv_heads < heads)."""

    def __init__(self, hidden: int, heads: int, kv_heads: Optional[int], max_seq: int,
                 g: torch.Generator):
        super().__init__()
        kv_heads = heads if kv_heads is None else kv_heads
        if hidden % heads != 0:
            raise ValueError(f"hidden={hidden} not divisible by heads={heads}")
        if heads % kv_heads != 0:
            raise ValueError(f"heads={heads} not divisible by kv_heads={kv_heads}")
        self.hidden = hidden
        self.heads = heads
        self.kv_heads = kv_heads
        self.head_dim = hidden // heads
        if self.head_dim % 2 != 0:
            raise ValueError("head_dim must be even for rotary embedding")
        self.n_rep = heads // kv_heads
        self.max_seq = max_seq
        self.scale = 1.0 / math.sqrt(self.head_dim)

        kv_dim = kv_heads * self.head_dim
        # q/k with std 1/sqrt(hidden) so attention scores are O(1) (non-uniform
        # softmax); v/o with ~0.02-scale std so block outputs stay O(1).
        qk_std = 1.0 / math.sqrt(hidden)
        vo_std = 0.5 / math.sqrt(hidden)
        self.q_proj = _linear(hidden, hidden, False, g, qk_std)
        self.k_proj = _linear(hidden, kv_dim, False, g, qk_std)
        self.v_proj = _linear(hidden, kv_dim, False, g, vo_std)
        self.o_proj = _linear(hidden, hidden, False, g, vo_std)

        cos, sin = _rope_tables(self.head_dim, max_seq)
        self.register_buffer("rope_cos", cos)
        self.register_buffer("rope_sin", sin)
        # Additive causal mask: 0 on/below the diagonal, large negative above.
        mask = torch.triu(torch.full((max_seq, max_seq), -1e9, dtype=torch.float32), diagonal=1)
        self.register_buffer("causal_mask", mask)

    def _repeat_kv(self, x: torch.Tensor) -> torch.Tensor:
        if self.n_rep == 1:
            return x
        b, kvh, s, d = x.shape
        return x[:, :, None, :, :].expand(b, kvh, self.n_rep, s, d).reshape(b, kvh * self.n_rep, s, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)

        cos = self.rope_cos[:s]
        sin = self.rope_sin[:s]
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin

        k = self._repeat_kv(k)
        v = self._repeat_kv(v)

        scores = torch.matmul(q, k.transpose(-2, -1)) * self.scale
        scores = scores + self.causal_mask[:s, :s]
        probs = F.softmax(scores.float(), dim=-1).to(q.dtype)
        out = torch.matmul(probs, v)                     # [b, heads, s, head_dim]
        out = out.transpose(1, 2).reshape(b, s, self.hidden)
        return self.o_proj(out)


class LlamaMLP(nn.Module):
    """SwiGLU: down_proj(silu(gate_proj(x)) * up_proj(x))."""

    def __init__(self, hidden: int, ffn: int, g: torch.Generator):
        super().__init__()
        self.gate_proj = _linear(hidden, ffn, False, g, 1.0 / math.sqrt(hidden))
        self.up_proj = _linear(hidden, ffn, False, g, 1.0 / math.sqrt(hidden))
        self.down_proj = _linear(ffn, hidden, False, g, 0.5 / math.sqrt(ffn))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaBlock(nn.Module):
    """One pre-norm Llama decoder block.

    Input/output: float32 hidden states ``[batch, seq, hidden]`` (seq <= max_seq).
    """

    def __init__(self, hidden: int = 256, heads: int = 4, kv_heads: Optional[int] = None,
                 ffn: int = 688, max_seq: int = 64, seed: int = 0, eps: float = 1e-5,
                 _generator: Optional[torch.Generator] = None, norm: str = "rms", post_norms: bool = False):
        super().__init__()
        g = _generator if _generator is not None else _gen(seed)
        self.hidden = hidden
        self.max_seq = max_seq
        self.input_layernorm = _norm(norm, hidden, eps)
        self.self_attn = LlamaAttention(hidden, heads, kv_heads, max_seq, g)
        self.post_attention_layernorm = _norm(norm, hidden, eps)
        self.mlp = LlamaMLP(hidden, ffn, g)
        _init_norm(self.input_layernorm, g)
        _init_norm(self.post_attention_layernorm, g)
        # Gemma 2's norms of each sublayer's output before the residual add
        self.sublayer_norms = nn.ModuleList(_norm(norm, hidden, eps) for _ in range(2 if post_norms else 0))
        for n in self.sublayer_norms:
            _init_norm(n, g)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.self_attn(self.input_layernorm(x))
        x = x + (self.sublayer_norms[0](a) if self.sublayer_norms else a)
        m = self.mlp(self.post_attention_layernorm(x))
        return x + (self.sublayer_norms[1](m) if self.sublayer_norms else m)

    def example_inputs(self, batch: int = 2, seq: int = 16, seed: int = 0) -> Tuple[torch.Tensor]:
        if seq > self.max_seq:
            raise ValueError(f"seq={seq} > max_seq={self.max_seq}")
        return (torch.randn(batch, seq, self.hidden, generator=_gen(seed + 1000)),)


class Conv1D(nn.Module):
    """GPT-2's projection: y = x @ W + b with W [in, out] (the transpose of nn.Linear's)."""

    def __init__(self, in_f: int, out_f: int, g: torch.Generator, std: float):
        super().__init__()
        self.weight = nn.Parameter(_normal_(torch.empty(in_f, out_f), g, std))
        self.bias = nn.Parameter(_normal_(torch.empty(out_f), g, 0.1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape[:-1] + (self.weight.shape[1],)
        return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight).reshape(shape)


class GPT2Block(nn.Module):
    """One GPT-2 block: LayerNorm (with bias), fused qkv and the other projections as Conv1D
    (``x @ W``), causal attention, tanh GELU.  Input/output ``[batch, seq, hidden]``."""

    def __init__(self, hidden: int = 256, heads: int = 4, seed: int = 0):
        super().__init__()
        g = _gen(seed)
        self.hidden, self.heads = hidden, heads
        self.ln_1 = nn.LayerNorm(hidden)
        self.ln_2 = nn.LayerNorm(hidden)
        for ln in (self.ln_1, self.ln_2):
            with torch.no_grad():
                _normal_(ln.weight, g, 0.1, mean=1.0)
                _normal_(ln.bias, g, 0.1)
        std = 1.0 / math.sqrt(hidden)
        self.c_attn = Conv1D(hidden, 3 * hidden, g, std)
        self.c_proj = Conv1D(hidden, hidden, g, std)
        self.c_fc = Conv1D(hidden, 4 * hidden, g, std)
        self.mlp_proj = Conv1D(4 * hidden, hidden, g, 0.5 / math.sqrt(hidden))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, h = x.shape
        d = h // self.heads
        q, k, v = self.c_attn(self.ln_1(x)).split(h, dim=-1)
        q, k, v = (t.reshape(b, s, self.heads, d).transpose(1, 2) for t in (q, k, v))
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.c_proj(att.transpose(1, 2).reshape(b, s, h))
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))

    def example_inputs(self, batch: int = 2, seq: int = 16, seed: int = 0) -> Tuple[torch.Tensor]:
        return (torch.randn(batch, seq, self.hidden, generator=_gen(seed + 1000)),)


# ---------------------------------------------------------------------------
# 3. Llama model
# ---------------------------------------------------------------------------

class LlamaModel(nn.Module):
    """Token embedding -> N LlamaBlocks -> final RMSNorm -> lm_head.

    Input: int64 token ids ``[batch, seq]``; output: float32 logits
    ``[batch, seq, vocab]``.

    ``massive_activations=True`` plants 4 systematic outlier channels
    (``self.outlier_channels``) in the residual stream: the embedding values of
    those channels are ~20x the typical magnitude of the other channels (same
    sign for every token), so they persist through the residual connections.
    ``norm="layer"``: LayerNorms (with biases) instead of RMSNorms; ``post_norms=True``: each
    sublayer's output normalized before the residual add too (Gemma 2, OLMo 2).
    """

    OUTLIER_SCALE = 20.0
    NUM_OUTLIERS = 4

    def __init__(self, vocab: int = 512, hidden: int = 512, layers: int = 2, heads: int = 8,
                 kv_heads: Optional[int] = None, ffn: int = 1376, max_seq: int = 128,
                 seed: int = 0, tie_embeddings: bool = False,
                 massive_activations: bool = False, norm: str = "rms", post_norms: bool = False):
        super().__init__()
        g = _gen(seed)
        self.vocab = vocab
        self.hidden = hidden
        self.max_seq = max_seq
        self.tie_embeddings = tie_embeddings
        self.massive_activations = massive_activations

        self.embed_tokens = torch.nn.utils.skip_init(nn.Embedding, vocab, hidden)
        # Unit-scale embeddings so the residual stream is O(1).
        _normal_(self.embed_tokens.weight, g, 1.0)

        if massive_activations:
            if hidden < self.NUM_OUTLIERS:
                raise ValueError("hidden too small for outlier channels")
            chans = torch.randperm(hidden, generator=g)[: self.NUM_OUTLIERS].sort().values
            self.outlier_channels: Tuple[int, ...] = tuple(int(c) for c in chans)
            with torch.no_grad():
                typical = self.embed_tokens.weight.abs().mean().item()
                signs = torch.tensor([1.0, -1.0, 1.0, -1.0])
                for i, c in enumerate(self.outlier_channels):
                    noise = 1.0 + 0.1 * torch.randn(vocab, generator=g)
                    self.embed_tokens.weight[:, c] = signs[i] * self.OUTLIER_SCALE * typical * noise
        else:
            self.outlier_channels = ()

        self.layers = nn.ModuleList(
            LlamaBlock(hidden, heads, kv_heads, ffn, max_seq, _generator=g, norm=norm, post_norms=post_norms)
            for _ in range(layers)
        )
        self.norm = _norm(norm, hidden, 1e-5)
        _init_norm(self.norm, g)
        if tie_embeddings:
            self.lm_head = torch.nn.utils.skip_init(nn.Linear, hidden, vocab, bias=False)
            self.lm_head.weight = self.embed_tokens.weight
        else:
            self.lm_head = _linear(hidden, vocab, False, g, 1.0 / math.sqrt(hidden))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        for layer in self.layers:
            x = layer(x)
        return self.lm_head(self.norm(x))

    def example_inputs(self, batch: int = 1, seq: int = 16, seed: int = 0) -> Tuple[torch.Tensor]:
        if seq > self.max_seq:
            raise ValueError(f"seq={seq} > max_seq={self.max_seq}")
        ids = torch.randint(0, self.vocab, (batch, seq), generator=_gen(seed + 1000),
                            dtype=torch.int64)
        return (ids,)


def outlier_llama(seed: int = 0) -> LlamaModel:
    """The outlier model of the accuracy report (issue 3): hidden 512, 2 layers, massive activations.

    ffn 1536 is Llama's own SwiGLU width for hidden 512 (int(2 * 4 * 512 / 3) rounded up to
    multiple_of=256): a multiple of 128 (group-quantized formats) and 12 * 2^7, so the down
    projection's online Hadamard is a full one, as in a real Llama.
    """
    return LlamaModel(hidden=512, layers=2, ffn=1536, seed=seed, massive_activations=True).eval()


class GatheredExperts(nn.Module):
    """A mixture of experts' product as transformers' batched_mm experts write it: each row's
    expert weight gathered from W [E, N, K] (negative ids from the end), then a batched matmul.
    Input: x [rows, K] float32, ids [rows] int64."""

    def __init__(self, experts: int, n: int, k: int, seed: int = 0):
        super().__init__()
        self.w = nn.Parameter(torch.randn(experts, n, k, generator=_gen(seed)) / k ** 0.5)

    def forward(self, x, ids):
        return torch.bmm(self.w[ids], x[..., None]).squeeze(-1)


# ---------------------------------------------------------------------------
# 4. Small CNN
# ---------------------------------------------------------------------------

class SmallCNN(nn.Module):
    """conv(3->16) -> BN -> ReLU -> maxpool2 -> conv(16->32) -> ReLU -> GAP -> FC(32->10).

    Input: float32 ``[batch, 3, H, W]``. BatchNorm has non-trivial running
    stats; use in eval mode.
    """

    def __init__(self, seed: int = 0, num_classes: int = 10):
        super().__init__()
        g = _gen(seed)
        self.conv1 = _conv2d(3, 16, 3, 1, g)
        self.bn1 = torch.nn.utils.skip_init(nn.BatchNorm2d, 16)
        with torch.no_grad():
            _normal_(self.bn1.weight, g, 0.1, mean=1.0)
            _normal_(self.bn1.bias, g, 0.1)
            _normal_(self.bn1.running_mean, g, 0.2)
            self.bn1.running_var.copy_(0.5 + torch.rand(16, generator=g))
            self.bn1.num_batches_tracked.zero_()
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = _conv2d(16, 32, 3, 1, g)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fc = _linear(32, num_classes, True, g, 1.0 / math.sqrt(32), 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool1(F.relu(self.bn1(self.conv1(x))))
        x = F.relu(self.conv2(x))
        x = torch.flatten(self.gap(x), 1)
        return self.fc(x)

    def example_inputs(self, batch: int = 2, size: int = 32, seed: int = 0) -> Tuple[torch.Tensor]:
        return (torch.randn(batch, 3, size, size, generator=_gen(seed + 1000)),)


# ---------------------------------------------------------------------------
# 5. Zoo
# ---------------------------------------------------------------------------

def _zoo_mlp(seed: int = 0):
    m = MLP(seed=seed).eval()
    return m, m.example_inputs(batch=4, seed=seed)


def _zoo_llama_block(seed: int = 0):
    m = LlamaBlock(hidden=256, heads=4, ffn=688, max_seq=64, seed=seed).eval()
    return m, m.example_inputs(batch=2, seq=16, seed=seed)


def _zoo_llama_model(seed: int = 0):
    m = LlamaModel(vocab=512, hidden=256, layers=2, heads=4, ffn=688, max_seq=64,
                   seed=seed).eval()
    return m, m.example_inputs(batch=1, seq=16, seed=seed)


def _zoo_gpt2_block(seed: int = 0):
    m = GPT2Block(hidden=128, heads=4, seed=seed).eval()
    return m, m.example_inputs(batch=2, seq=12, seed=seed)


def _zoo_cnn(seed: int = 0):
    m = SmallCNN(seed=seed).eval()
    return m, m.example_inputs(batch=2, size=32, seed=seed)


#: name -> factory(seed=0) returning ``(model.eval(), example_inputs_tuple)``.
ZOO: Dict[str, Callable[..., Tuple[nn.Module, Tuple[torch.Tensor, ...]]]] = {
    "mlp": _zoo_mlp,
    "llama_block": _zoo_llama_block,
    "llama_model": _zoo_llama_model,
    "cnn": _zoo_cnn,
    "gpt2_block": _zoo_gpt2_block,
}
