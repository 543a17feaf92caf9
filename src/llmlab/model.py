"""The decoder-only Transformer of the notes (§2.1), readable top to bottom.

Legend (notes §2.2): B batch, S sequence, H hidden (d_model), V vocabulary, h heads,
D = H/h the width of one head (the notes write H for it too), F the FFN width, L layers,
P the number of positions already in the KV cache, T = P + S the keys a query can see.

    idx [B,S] ─ embed (×√H) ─(+)─ positions ─► x [B,S,H] ─ L × Block ─ ln_final ─ unembed ─► logits [B,S,V]
                                   sinusoidal | learned   (or RoPE, applied to Q and K inside attention)

The notes' preset is the original Transformer's decoder: sinusoidal positions, masked multi-head
self-attention, a ReLU FFN, residual + LayerNorm after each sub-layer ("Add & Norm"), and an
output layer that shares the embedding's weights; softmax turns logits into probabilities
(`entropy.py`). The variants (learned positions, RoPE, GELU, SwiGLU, pre-norm, RMSNorm) are
the ones GPT-2 and Llama use, each chosen by a config string.

References: Vaswani et al. 2017 (arXiv 1706.03762); Radford et al. 2019 (GPT-2); Su et al. 2021
(RoPE, arXiv 2104.09864); Shazeer 2020 (SwiGLU, arXiv 2002.05202); Zhang & Sennrich 2019
(RMSNorm, arXiv 1910.07467); Ainslie et al. 2023 (grouped-query attention, arXiv 2305.13245).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llmlab import gelu, tying
from llmlab.config import ModelConfig
from llmlab.hooks import HookedModule, HookPoint
from llmlab.matvec import Linear


class Dropout(nn.Dropout):
    """`nn.Dropout`, returning its input directly when it is the identity (eval mode or p = 0)."""

    def __call__(self, x: Tensor) -> Tensor:
        return super().__call__(x) if self.training and self.p > 0 else x


# --- positions ------------------------------------------------------------------------------


def sinusoidal_table(n_positions: int, d_model: int) -> Tensor:
    """PE(pos, 2i) = sin(pos / 10000^(2i/H)),  PE(pos, 2i+1) = cos(pos / 10000^(2i/H)).

    Returns: [n_positions, H]
    """
    pos = torch.arange(n_positions, dtype=torch.float64)[:, None]  # [S, 1]
    two_i = torch.arange(0, d_model, 2, dtype=torch.float64)  # [H/2]
    angle = pos / 10000 ** (two_i / d_model)  # [S, H/2]
    table = torch.zeros(n_positions, d_model, dtype=torch.float64)
    table[:, 0::2] = torch.sin(angle)
    table[:, 1::2] = torch.cos(angle[:, : d_model // 2])
    return table.float()


class SinusoidalPositions(nn.Module):
    """The fixed table above, kept as a non-persistent buffer: it is not a parameter."""

    def __init__(self, n_positions: int, d_model: int) -> None:
        super().__init__()
        self.register_buffer("table", sinusoidal_table(n_positions, d_model), persistent=False)

    def forward(self, pos: Tensor) -> Tensor:  # [S] → [S, H]
        return self.table[pos]


POSITIONS = {"sinusoidal": SinusoidalPositions, "learned": nn.Embedding}


def rope_tables(n_positions: int, d_head: int, base: float) -> tuple[Tensor, Tensor]:
    """RoPE rotates each pair (x_i, x_{i+D/2}) of a query or key by angle pos · base^(-2i/D).

    Returns: cos, sin, each [n_positions, D/2]
    """
    inv_freq = base ** (-torch.arange(0, d_head, 2, dtype=torch.float64) / d_head)  # [D/2]
    angle = torch.arange(n_positions, dtype=torch.float64)[:, None] * inv_freq  # [S, D/2]
    return torch.cos(angle).float(), torch.sin(angle).float()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x [B, h, S, D] with cos, sin [S, D/2] → x rotated, [B, h, S, D] ("rotate half" layout)."""
    x1, x2 = x.chunk(2, dim=-1)  # [B, h, S, D/2] each
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


# --- normalisation --------------------------------------------------------------------------


class LayerNorm(nn.LayerNorm):
    """LayerNorm(x) = (x − mean) / √(var + ε) · γ + β over H; `hook_normalized` sees the output."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg.d_model, eps=cfg.norm_eps, bias=cfg.bias)
        self.hook_normalized = HookPoint()

    def forward(self, x: Tensor) -> Tensor:
        return self.hook_normalized(F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps))


class RMSNorm(nn.RMSNorm):
    """RMSNorm(x) = x / √(mean(x²) + ε) · γ over H: LayerNorm without centring or bias."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg.d_model, eps=cfg.norm_eps)
        self.hook_normalized = HookPoint()

    def forward(self, x: Tensor) -> Tensor:
        return self.hook_normalized(F.rms_norm(x, self.normalized_shape, self.weight, self.eps))


NORMS = {"layernorm": LayerNorm, "rmsnorm": RMSNorm}


# --- attention ------------------------------------------------------------------------------


class KVCache:
    """Keys and values of every layer, pre-allocated, for incremental decoding.

    k, v: [L, B, h_kv, S_max, D]. The first `pos` positions are filled; rolling back (as
    speculative decoding does on a rejection) is lowering `pos`. Attention reads only the
    filled ones, so `mask` is None; a cache whose reads must keep one shape
    (`llmlab.static_decode.StaticKVCache`) hands out all of them and sets `mask` instead.
    """

    mask: Tensor | None = None  # [S, T] bool, True where a new query may see a key; None: every key returned

    def __init__(self, cfg: ModelConfig, batch: int, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32, max_len: int | None = None) -> None:  # fmt: skip
        length = cfg.block_size if max_len is None else max_len
        if not 1 <= length <= cfg.block_size:  # positions past the context have no embedding, sinusoid or angle
            raise ValueError(f"a KV cache holds 1 to {cfg.block_size} positions (the model's context), not {length}")
        shape = (cfg.n_layers, batch, cfg.kv_heads, length, cfg.d_head)
        # Only the filled positions are ever read, so the memory is not zeroed (for GPT-2 at its full
        # context that would be 75 MB of writes before the first token).
        self.k = torch.empty(shape, device=device, dtype=dtype)
        self.v = torch.empty(shape, device=device, dtype=dtype)
        self.layers = [(self.k[i], self.v[i]) for i in range(cfg.n_layers)]  # views, each [B, h_kv, S_max, D]
        self.pos = 0

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    @property
    def batch(self) -> int:
        return self.k.shape[1]

    def positions(self, S: int, device: torch.device) -> Tensor:
        """The positions [S] of S new tokens, which follow the `pos` filled ones."""
        return torch.arange(self.pos, self.pos + S, device=device)

    def advance(self, S: int) -> None:
        """S more positions are filled (the model calls this after its layers have appended)."""
        self.pos += S

    def append(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store k, v [B, h_kv, S, D] after the filled part; return all keys and values [B, h_kv, T, D]."""
        keys, values = self.layers[layer]  # made once: indexing costs more than copying a token in
        S = k.shape[2]
        keys.narrow(2, self.pos, S).copy_(k)
        values.narrow(2, self.pos, S).copy_(v)
        return keys.narrow(2, 0, self.pos + S), values.narrow(2, 0, self.pos + S)

    def truncate(self, length: int) -> None:
        """Keep the first `length` positions (0 ≤ length ≤ pos): the later ones are forgotten."""
        if not 0 <= length <= self.pos:
            raise ValueError(f"a cache holding {self.pos} positions truncates to 0 … {self.pos}, not {length}")
        self.pos = length


def causal_mask(S: int, T: int, device: torch.device | str = "cpu") -> Tensor:
    """M [S, T]: 0 where query i may see key j (j ≤ i + T − S), −∞ above that diagonal.

    With no cache T = S and M is the notes' "upper triangle of −inf, lower triangle of 0".
    """
    allowed = torch.ones(S, T, dtype=torch.bool, device=device).tril(diagonal=T - S)
    return torch.zeros(S, T, device=device).masked_fill(~allowed, float("-inf"))


def additive(mask: Tensor) -> Tensor:
    """A bool mask [S, T] (True: may see) as the notes' M: 0 where True, −∞ where False."""
    return torch.zeros(mask.shape, device=mask.device).masked_fill(~mask, float("-inf"))


class CausalSelfAttention(nn.Module):
    """Masked multi-head self-attention (notes §2.1):

        Attention(Q, K, V) = softmax(QKᵀ / √D + M) · V,     M[i, j] = −∞ for j > i, else 0
        MultiHead(x) = [head_1, …, head_h] · W^O,          head_i = Attention(x W^Q_i, x W^K_i, x W^V_i)

    Each W^Q_i is [H, D], so the h heads together are one [H, h·D] = [H, H] matrix, not the
    [h·H, h·H] the notes write in §2.2. With grouped-query attention h_kv < h heads of K and V
    are each shared by h / h_kv query heads. Two paths compute the same thing: "explicit" spells
    out the formula (and is used whenever a hook looks at the scores or the pattern), "sdpa" is
    PyTorch's fused `scaled_dot_product_attention`.
    """

    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.cfg, self.layer = cfg, layer
        h, h_kv, D = cfg.n_heads, cfg.kv_heads, cfg.d_head
        self.qkv = Linear(cfg.d_model, (h + 2 * h_kv) * D, bias=cfg.bias)  # [W^Q W^K W^V]
        self.out = Linear(h * D, cfg.d_model, bias=cfg.bias)  # W^O
        self.attn_dropout = Dropout(cfg.dropout)
        self.hook_q, self.hook_k, self.hook_v = HookPoint(), HookPoint(), HookPoint()  # [B, S, h, D]
        self.hook_attn_scores, self.hook_pattern = HookPoint(), HookPoint()  # [B, h, S, T]
        self.hook_z = HookPoint()  # [B, S, h, D]: each head's output, before W^O

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor] | None = None,
                cache: KVCache | None = None) -> Tensor:  # fmt: skip
        """x [B, S, H] → [B, S, H]."""
        B, S, _ = x.shape
        h, h_kv, D = self.cfg.n_heads, self.cfg.kv_heads, self.cfg.d_head
        q, k, v = self.qkv(x).split([h * D, h_kv * D, h_kv * D], dim=-1)
        q = self.hook_q(q.view(B, S, h, D)).transpose(1, 2)  # [B, h, S, D]
        k = self.hook_k(k.view(B, S, h_kv, D)).transpose(1, 2)  # [B, h_kv, S, D]
        v = self.hook_v(v.view(B, S, h_kv, D)).transpose(1, 2)  # [B, h_kv, S, D]
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        mask = None  # [S, T] bool from a cache that returns unwritten keys too; None: causal over T = P + S
        if cache is not None:
            k, v = cache.append(self.layer, k, v)  # [B, h_kv, T, D]
            mask = cache.mask
        if self.hook_attn_scores.is_hooked() or self.hook_pattern.is_hooked():
            z = self.explicit(q, k, v, mask)
        else:
            z = ATTENTION[self.cfg.attention](self, q, k, v, mask)  # [B, h, S, D]
        z = self.hook_z(z.transpose(1, 2))  # [B, S, h, D]
        return self.out(z.reshape(B, S, h * D))  # [B, S, H]

    def explicit(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
        """softmax(QKᵀ/√D + M)·V, written out. q [B, h, S, D], k, v [B, h_kv, T, D] → [B, h, S, D].
        M is the causal mask, or −∞ where the bool `mask` [S, T] is False."""
        groups = self.cfg.n_heads // self.cfg.kv_heads
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)  # [B, h, T, D]
        S, T = q.shape[2], k.shape[2]
        M = causal_mask(S, T, q.device) if mask is None else additive(mask)  # [S, T]
        scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])  # [B, h, S, T]
        scores = self.hook_attn_scores(scores + M)  # [B, h, S, T]
        pattern = self.hook_pattern(scores.softmax(dim=-1))  # [B, h, S, T], rows sum to 1
        return self.attn_dropout(pattern) @ v  # [B, h, S, D]

    def sdpa(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
        """The same through PyTorch's fused kernel; the causal mask is passed only when it is
        needed. bf16 training on a CPU attends in fp32 where that is faster (`attends_in_fp32`)."""
        if attends_in_fp32(q):  # with autocast off, which would cast them back: it runs SDPA in bf16
            with torch.autocast(q.device.type, enabled=False):
                return self.sdpa(q.float(), k.float(), v.float(), mask).to(q.dtype)
        S, T = q.shape[2], k.shape[2]
        causal = mask is None and S == T and S > 1
        if mask is None and not (S == 1 or S == T):
            mask = causal_mask(S, T, q.device).to(q.dtype)
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal,
            dropout_p=self.cfg.dropout if self.training else 0.0,
            enable_gqa=self.cfg.kv_heads != self.cfg.n_heads,
        )  # fmt: skip


FP32_ATTENTION_BELOW = 16_384  # S·D under which bf16 CPU training attends in fp32; see attends_in_fp32


def attends_in_fp32(q: Tensor) -> bool:
    """Whether `sdpa` casts a bf16 q [B, h, S, D] (and k, v) to fp32: on a CPU, with a gradient
    to compute, and S·D below `FP32_ATTENTION_BELOW`.

    PyTorch's CPU flash-attention backward in bf16 costs about 70 µs more per (batch, head) than
    in fp32, and the cast up and down costs less than that below S·D = 16,384 (forward + backward
    on a 2-core Sapphire Rapids, torch 2.13, bf16 against the fp32 route: [12, 4, 64, 32] 3.5
    against 0.9 ms, the tiny training shape; [4, 12, 128, 64] 8.0 against 4.1; [1, 12, 512, 32]
    7.2 against 5.8; at [1, 12, 256, 64], GPT-2 at S = 256, 3.3 against 3.4, and at [8, 12, 256,
    64] 24 against 28, so bf16 stays; `python -m benchmarks.bench_attention` times these shapes).
    Inference stays in 16 bits: the bf16 forward alone is faster."""
    return (q.device.type == "cpu" and q.dtype == torch.bfloat16 and q.requires_grad
            and q.shape[-2] * q.shape[-1] < FP32_ATTENTION_BELOW)  # fmt: skip


ATTENTION = {"explicit": CausalSelfAttention.explicit, "sdpa": CausalSelfAttention.sdpa}


# --- feed-forward network -------------------------------------------------------------------


class MLP(nn.Module):
    """The position-wise FFN (notes §2.1): up to F, a non-linearity, back down to H.

        relu / gelu:  FFN(x) = act(x·W₁ + b₁)·W₂ + b₂
        swiglu:       FFN(x) = (SiLU(x·W₁) ⊙ x·W₃)·W₂

    `hook_pre` [B, S, F] is the input of the non-linearity, `hook_post` [B, S, F] what W₂ reads:
    the "keys" of the FFN's key-value memory view (Geva et al. 2021).
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.w1 = Linear(cfg.d_model, cfg.ff_width, bias=cfg.bias)  # [H → F]
        self.w3 = Linear(cfg.d_model, cfg.ff_width, bias=cfg.bias) if cfg.activation == "swiglu" else None
        self.w2 = Linear(cfg.ff_width, cfg.d_model, bias=cfg.bias)  # [F → H]
        self.hook_pre, self.hook_post = HookPoint(), HookPoint()

    def forward(self, x: Tensor) -> Tensor:
        """x [B, S, H] → [B, S, H]."""
        pre = self.hook_pre(self.w1(x))  # [B, S, F]
        act = ACTIVATIONS[self.cfg.activation](pre)  # [B, S, F]
        if self.w3 is not None:
            act = act * self.w3(x)  # [B, S, F]
        return self.w2(self.hook_post(act))  # [B, S, H]


ACTIVATIONS = {
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_tanh": gelu.gelu_tanh,  # GPT-2's "gelu_new": F.gelu(x, approximate="tanh")
    "swiglu": F.silu,
}


# --- the block ------------------------------------------------------------------------------


class Block(nn.Module):
    """One decoder layer: attention, then FFN, each with a residual connection and a norm.

        post-norm (the notes; Vaswani 2017)        pre-norm (GPT-2, Llama)
        x ─┬─ attn ─(+)─ ln1 ─┬─ mlp ─(+)─ ln2 ─►   x ─┬─ ln1 ─ attn ─(+)─┬─ ln2 ─ mlp ─(+)─►
           └─────────┘         └────────┘              └────────────────┘  └───────────────┘

    Hooks (TransformerLens' names): `hook_resid_pre` is x, `hook_attn_out` and `hook_mlp_out`
    are the sub-layer outputs [B, S, H]. In pre-norm, `hook_resid_mid` = x + attn_out and
    `hook_resid_post` = resid_mid + mlp_out, as in TransformerLens. In post-norm the residual
    stream is normalised after each addition, so `hook_resid_mid` = LN₁(x + attn_out) and
    `hook_resid_post` = LN₂(resid_mid + mlp_out): each sees the stream the next sub-layer reads.
    """

    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.pre_norm = cfg.norm_placement == "pre"
        self.ln1, self.ln2 = NORMS[cfg.norm](cfg), NORMS[cfg.norm](cfg)
        self.attn = CausalSelfAttention(cfg, layer)
        self.mlp = MLP(cfg)
        self.drop = Dropout(cfg.dropout)
        self.hook_resid_pre, self.hook_resid_mid, self.hook_resid_post = HookPoint(), HookPoint(), HookPoint()
        self.hook_attn_out, self.hook_mlp_out = HookPoint(), HookPoint()

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor] | None = None,
                cache: KVCache | None = None) -> Tensor:  # fmt: skip
        """x [B, S, H] → [B, S, H]."""
        x = self.hook_resid_pre(x)
        if self.pre_norm:
            x = self.hook_resid_mid(x + self.drop(self.hook_attn_out(self.attn(self.ln1(x), rope, cache))))
            return self.hook_resid_post(x + self.drop(self.hook_mlp_out(self.mlp(self.ln2(x)))))
        x = self.hook_resid_mid(self.ln1(x + self.drop(self.hook_attn_out(self.attn(x, rope, cache)))))
        return self.hook_resid_post(self.ln2(x + self.drop(self.hook_mlp_out(self.mlp(x)))))


# --- the model ------------------------------------------------------------------------------


class OutputLayer(Linear):
    """logits = h·Wᵀ, W [V, H]; while training a tied model, through `tying.TiedGradient`."""

    def forward(self, x: Tensor, tie: tying.TiedGradient | None = None) -> Tensor:
        return super().forward(x) if tie is None else tie.head(x, self.weight)


class GPT(HookedModule):
    """Decoder-only language model: `forward(idx [B, S]) → logits [B, S, V]`, always.

    The loss is a separate pure function (`llmlab.entropy.cross_entropy`). With `cache`, idx
    holds only the new tokens and their positions continue from `cache.pos`.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)  # W_E [V, H]
        self.embed_scale = math.sqrt(cfg.d_model) if cfg.embed_scale else 1.0
        self.pos_embed = POSITIONS[cfg.positions](cfg.block_size, cfg.d_model) if cfg.positions != "rope" else None
        if cfg.positions == "rope":
            cos, sin = rope_tables(cfg.block_size, cfg.d_head, cfg.rope_base)
            self.register_buffer("rope_cos", cos, persistent=False)  # [S_max, D/2]
            self.register_buffer("rope_sin", sin, persistent=False)
        self.hook_embed = HookPoint()  # [B, S, H]
        self.hook_pos_embed = HookPoint() if self.pos_embed is not None else None  # [B, S, H]
        self.drop = Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, layer) for layer in range(cfg.n_layers))
        self.ln_final = NORMS[cfg.norm](cfg) if cfg.final_norm else nn.Identity()
        self.unembed = OutputLayer(cfg.d_model, cfg.vocab_size, bias=False)  # [H → V]
        if cfg.tie_embeddings:
            self.unembed.weight = self.embed.weight  # one Parameter, counted once
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith(("attn.out.weight", "mlp.w2.weight")):  # GPT-2: scale by 1/√(2L)
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layers))
        self.name_hook_points()

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear | nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, idx: Tensor, cache: KVCache | None = None) -> Tensor:
        """idx [B, S] token ids → logits [B, S, V]."""
        B, S = idx.shape
        P = cache.pos if cache is not None else 0
        limit = cache.max_len if cache is not None else self.cfg.block_size
        if limit < P + S:
            raise ValueError(f"{P + S} positions exceed the context of {limit}")
        if cache is not None and cache.batch != B:
            raise ValueError(f"the KV cache holds a batch of {cache.batch} sequences, the input has {B}")
        tie = tying.TiedGradient() if self._tied_training() else None  # one gradient for W_E; see tying.py
        x = self.embed(idx) if tie is None else tie.lookup(idx, self.embed.weight)  # [B, S, H]
        x = self.hook_embed(x * self.embed_scale if self.embed_scale != 1.0 else x)
        pos = cache.positions(S, idx.device) if cache is not None else torch.arange(S, device=idx.device)  # [S]
        if self.pos_embed is not None:
            x = x + self.hook_pos_embed(self.pos_embed(pos).expand(B, S, -1))  # [B, S, H]
        rope = (self.rope_cos[pos], self.rope_sin[pos]) if self.pos_embed is None else None
        x = self.drop(x)
        for block in self.blocks:
            x = block(x, rope, cache)  # [B, S, H]
        if cache is not None:
            cache.advance(S)
        return self.unembed(self.ln_final(x), tie)  # [B, S, V]

    def _tied_training(self) -> bool:
        return (
            self.cfg.tie_embeddings and self.training and torch.is_grad_enabled()
            and self.embed.weight.requires_grad and self.embed.weight.numel() >= tying.MIN_ELEMENTS
            and not torch.compiler.is_compiling()
        )  # fmt: skip

    def num_params(self) -> int:
        """Parameters, each counted once: a tied head shares the embedding's, and the
        sinusoidal table and RoPE angles are buffers, not parameters."""
        return sum(p.numel() for p in self.parameters())
