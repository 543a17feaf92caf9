"""The matrix view of the model (notes §2.2), traced: every tensor of a real forward pass, in the
notes' letters, module by module, read from the hook points.

    [B, S] ids ─ embedding ─► [B, S, H] ─ L × (attention: Q, K, V [B, h, S, D], scores and mask
    [B, h, S, S], output [B, S, H]; FFN [B, S, F] → [B, S, H]) ─ output layer ─► logits [B, S, V]

Letters: B batch, S sequence, H hidden, V vocabulary, h heads, F FFN width, D = H/h the width of
one head, h_kv the heads of K and V (h_kv = h unless grouped-query attention). Without a KV cache
each query sees S keys, so scores are [B, h, S, S]. Hook tensors follow TransformerLens's layout:
Q, K, V and the per-head outputs are [B, S, h, D]; attention works on their transpose [B, h, S, D].

Where the notes write multi-head weights as [h·H, h·H] and Q as [B, S, h, H], each head really has
D = H/h columns: W^Q of all heads together is [H, h·D] = [H, H], and Q is [B, S, h, D]. The trace
prints both, and says so on the rows where they differ.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

BSH, BSF = ("B", "S", "H"), ("B", "S", "F")

# hook name (after "blocks.{l}.") → (the notes' letters of the real tensor, what the notes write, a remark)
HOOKS: dict[str, tuple[tuple[str, ...], str, str]] = {
    "hook_embed": (BSH, "[B,S,V]·W = [B,S,H]", "ids index the table W_E [V,H]: a lookup, not a product"),
    "hook_pos_embed": (BSH, "[B,S,H]", "added to the token embedding"),
    "hook_resid_pre": (BSH, "[B,S,H]", "the block's input"),
    "ln1.hook_normalized": (BSH, "[B,S,H]", "norm keeps the shape"),
    "attn.hook_q": (("B", "S", "h", "D"), "[B,S,h,H]", "each head is D = H/h wide, not H; attention uses [B,h,S,D]"),
    "attn.hook_k": (("B", "S", "h_kv", "D"), "[B,S,h,H]", "h_kv heads of D = H/h; attention uses [B,h_kv,S,D]"),
    "attn.hook_v": (("B", "S", "h_kv", "D"), "[B,S,h,H]", "h_kv heads of D = H/h; attention uses [B,h_kv,S,D]"),
    "attn.hook_attn_scores": (("B", "h", "S", "S"), "[B,h,S,S]", "QKᵀ/√D + M"),
    "attn.hook_pattern": (("B", "h", "S", "S"), "[B,h,S,S]", "softmax over the last axis"),
    "attn.hook_z": (("B", "S", "h", "D"), "[B,h,S,H]", "softmax(·)·V per head, D = H/h wide"),
    "hook_attn_out": (BSH, "[B,h,S,H]·[h·H,H] = [B,S,H]", "heads concatenated to [B,S,h·D] = [B,S,H], times W^O [H,H]"),
    "hook_resid_mid": (BSH, "[B,S,H]", "residual + attention (post-norm: after LN₁)"),
    "ln2.hook_normalized": (BSH, "[B,S,H]", "norm keeps the shape"),
    "mlp.hook_pre": (BSF, "[B,S,H]·[H,F] = [B,S,F]", "before the non-linearity"),
    "mlp.hook_post": (BSF, "ReLU([B,S,H]·[H,F])", "after it (SwiGLU: times the gate)"),
    "hook_mlp_out": (BSH, "·[F,H] = [B,S,H]", "back to H"),
    "hook_resid_post": (BSH, "[B,S,H]", "the block's output (post-norm: after LN₂)"),
    "ln_final.hook_normalized": (BSH, "[B,S,H]", "final norm"),
}  # fmt: skip


@dataclass(frozen=True)
class TraceRow:
    name: str  # hook name, or "input", "mask", "logits"
    letters: tuple[str, ...]  # the real shape in the notes' letters
    shape: tuple[int, ...]  # the real shape
    notes: str  # what the notes (§2.2) write for this tensor
    remark: str
    matches: bool  # the real shape equals the letters evaluated for this model

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def letter_values(cfg: Any, batch: int, seq: int) -> dict[str, int]:
    """The value of each letter for a model config and an input of B×S tokens."""
    return {
        "B": batch, "S": seq, "H": cfg.d_model, "V": cfg.vocab_size, "h": cfg.n_heads,
        "h_kv": cfg.kv_heads, "D": cfg.d_head, "F": cfg.ff_width, "L": cfg.n_layers,
    }  # fmt: skip


def _row(name: str, letters: tuple[str, ...], shape: tuple[int, ...], notes: str, remark: str,
         values: dict[str, int]) -> TraceRow:  # fmt: skip
    return TraceRow(name, letters, shape, notes, remark, tuple(values[k] for k in letters) == shape)


def trace(model: Any, idx: Any) -> list[TraceRow]:
    """Run `model(idx)` with every hook point recording its tensor's shape, in the order they fire.

    Hooking the scores makes attention take its explicit path (same math as the fused kernel),
    so the [B, h, S, S] scores and pattern exist to be seen.
    """
    import torch

    from llmlab.model import causal_mask

    seen: list[tuple[str, tuple[int, ...]]] = []
    with torch.no_grad(), model.hooks([(lambda name: True, lambda x, hook: seen.append((hook.name, tuple(x.shape))))]):
        logits = model(idx)  # [B, S, V]
    B, S = idx.shape
    values = letter_values(model.cfg, B, S)
    rows = [
        _row("input", ("B", "S"), tuple(idx.shape), "[B,S,V] one-hot", "token ids: one integer per position", values)
    ]
    for name, shape in seen:
        letters, notes, remark = HOOKS[_suffix(name)]
        rows.append(_row(name, letters, shape, notes, remark, values))
        if name.endswith("hook_attn_scores"):
            mask = tuple(causal_mask(S, S).shape)
            rows.append(_row(name.replace("hook_attn_scores", "mask"), ("S", "S"), mask, "[S,S]: 0 below, −∞ above",
                             "added to every [B,h] slice of the scores (broadcast)", values))  # fmt: skip
    tied = " shares W_E (tied)" if model.cfg.tie_embeddings else ""
    rows.append(_row("logits", ("B", "S", "V"), tuple(logits.shape), "[B,S,H]·[H,V] = [B,S,V]",
                     "the output layer" + tied, values))  # fmt: skip
    return rows


def trace_report(model: Any, idx: Any, source: str) -> dict[str, Any]:
    """Everything `trace --json` prints (and the web app shows): the letters' values, every row, the weights."""
    rows = trace(model, idx)
    B, S = idx.shape
    return {
        "source": source, "letters": letter_values(model.cfg, B, S), "all_match": all(r.matches for r in rows),
        "rows": [r.to_json() for r in rows], "weights": [vars(w) for w in weight_rows(model.cfg)],
    }  # fmt: skip


def _suffix(name: str) -> str:
    parts = name.split(".")
    return ".".join(parts[2:]) if parts[0] == "blocks" else name


@dataclass(frozen=True)
class WeightRow:
    name: str
    shape: tuple[int, ...]  # as stored: nn.Linear keeps [out, in] and computes x·Wᵀ
    math: str  # the matrix of the formula, in letters
    notes: str  # what the notes write
    remark: str


def weight_rows(cfg: Any) -> list[WeightRow]:
    """The weights of one block and the embeddings: real shapes beside the notes' [h·H, h·H]."""
    from llmlab.accounting import param_shapes

    shapes = param_shapes(cfg)
    H, h, kv, D, F = cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.d_head, cfg.ff_width
    qkv = f"[H, (h+2h_kv)·D] = [{H}, {(h + 2 * kv) * D}]"
    rows = [
        WeightRow("embed.weight", shapes["embed.weight"], "W_E [V, H]", "W [V, H]", "a lookup table"),
        WeightRow("blocks.0.attn.qkv.weight", shapes["blocks.0.attn.qkv.weight"], qkv,
                  "W^Q, W^K, W^V: [h·H, h·H] each",
                  f"per head W^Q_i is [H, D] = [{H}, {D}]; all h heads together [H, h·D] = [{H}, {h * D}], "
                  f"not [h·H, h·H] = [{h * H}, {h * H}]" + (f"; K and V have h_kv={kv} heads" if kv != h else "")),
        WeightRow("blocks.0.attn.out.weight", shapes["blocks.0.attn.out.weight"], f"W^O [h·D, H] = [{h * D}, {H}]",
                  "W^o [h·H, H]", f"h·D = H = {H}, not h·H = {h * H}"),
        WeightRow("blocks.0.mlp.w1.weight", shapes["blocks.0.mlp.w1.weight"], f"W₁ [H, F] = [{H}, {F}]", "[H, F]",
                  "as the notes" + ("; SwiGLU adds W₃ [H, F]" if cfg.activation == "swiglu" else "")),
        WeightRow("blocks.0.mlp.w2.weight", shapes["blocks.0.mlp.w2.weight"], f"W₂ [F, H] = [{F}, {H}]", "[F, H]",
                  "as the notes"),
    ]  # fmt: skip
    if cfg.tie_embeddings:
        rows.append(WeightRow("unembed.weight", shapes["embed.weight"], "W_Eᵀ [H, V]", "[H, V]",
                              "tied: the embedding's own Parameter, counted once"))  # fmt: skip
    else:
        rows.append(WeightRow("unembed.weight", shapes["unembed.weight"], "[H, V]", "[H, V]", "its own matrix"))
    return rows


def format_shape(letters: tuple[str, ...], shape: tuple[int, ...]) -> str:
    return f"[{', '.join(letters)}] = [{', '.join(map(str, shape))}]"
