"""Scoring a text (notes §一): per token, how surprising it was and how uncertain the model was.

For each token yₜ after the first, from the distribution p_T(· | y<ₜ) = softmax(zₜ / T) that predicted it:

    surprisal   −log p_T(yₜ)             the token's cross-entropy against a one-hot target
    entropy     H(p_T) = −Σ p log p       the model's uncertainty before it saw yₜ
    rank        1 + #{v : p_T(v) > p_T(yₜ)} (GLTR's rank, Gehrmann et al. 2019, arXiv 1906.04043)
    alternatives  the k most likely tokens of p_T and their probabilities

The first token is context only: nothing predicts it. Texts longer than the context of S tokens
are scored in sliding windows of S tokens that advance by `stride` (default S/2): every
prediction is made once, and each one after the first window sees at least S − stride tokens of
context (the last window is aligned to the end of the text, so it may see more).

Renderers: `render_terminal` (ANSI background colours with a legend), `html_heatmap` and
`render_html` (a self-contained page with the alternatives on hover), `render_generation` for
text produced by `llmlab.sampling.generate_text`.
"""

from __future__ import annotations

import html
import math
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from llmlab.entropy import check_temperature, entropy_of_log_probs, log_probs, nats_to_bits, perplexity
from llmlab.errors import UserError
from llmlab.model import GPT
from llmlab.tokenizer import Tokenizer

Scale = tuple[float, float]  # (lo, hi) of a colour scale, in nats
LOGITS_PER_BATCH = 1 << 23  # logits (S·V per window) per forward pass when scoring many windows: 32 MiB
MAX_KEPT_LOGITS = 1 << 28  # keep_logits holds [m, V] in memory: at most 1 GiB of float32
MIN_TEMPERATURE = 0.01  # z / T stays ≤ ~10⁴ for logits of ~10², where float32 still orders and sums them exactly


def default_stride(context: int) -> int:
    return max(1, context // 2)


@dataclass(frozen=True)
class Alternative:
    text: str
    id: int
    prob: float


@dataclass(frozen=True)
class TokenScore:
    text: str
    id: int
    surprisal: float | None = None  # nats; None for the first token, which nothing predicts
    entropy: float | None = None  # nats, of the distribution that predicted this token
    prob: float | None = None  # p_T(token)
    rank: int | None = None  # 1 = the model's top choice
    alternatives: list[Alternative] = field(default_factory=list)


def token_json(t: TokenScore) -> dict[str, Any]:
    """One token of `score --json` (and of the web app's score)."""
    return {
        "text": t.text, "id": t.id, "surprisal": t.surprisal, "entropy": t.entropy, "prob": t.prob, "rank": t.rank,
        "alternatives": [{"text": a.text, "id": a.id, "prob": a.prob} for a in t.alternatives],
    }  # fmt: skip


@dataclass
class Scores:
    """Per-prediction tensors of `score_ids`: m = len(ids) − 1 predictions, k alternatives."""

    surprisal: Tensor  # [m]
    entropy: Tensor  # [m]
    rank: Tensor  # [m]
    top_probs: Tensor  # [m, k]
    top_ids: Tensor  # [m, k]
    windows: int
    logits: Tensor | None = None  # [m, V], z / T, kept for calibration


@dataclass
class ScoredText:
    tokens: list[TokenScore]
    temperature: float
    context: int  # S
    stride: int
    windows: int
    logits: Tensor | None = None  # [m, V] logits / T of the predictions, when asked for
    targets: Tensor | None = None  # [m] the predicted ids (tokens 1 … m)

    def to_json(self) -> dict[str, Any]:
        """The figures of `score --json` that do not name the command line's source."""
        return {
            "temperature": self.temperature, "context": self.context, "stride": self.stride,
            "windows": self.windows, "totals": self.totals(),
        }  # fmt: skip

    def totals(self) -> dict[str, Any]:
        """Cross-entropy, perplexity, entropy and LM-Polygraph's sequence scores, in nats."""
        scored = self.tokens[1:]
        s = torch.tensor([t.surprisal for t in scored], dtype=torch.float64)  # [m]
        h = torch.tensor([t.entropy for t in scored], dtype=torch.float64)  # [m]
        worst = int(h.argmax()) + 1
        return {
            "tokens": len(self.tokens), "scored": len(scored), "mean_surprisal": float(s.mean()),
            "bits_per_token": float(nats_to_bits(float(s.mean()))), "perplexity": perplexity(float(s.mean())),
            "sequence_nll": float(s.sum()), "mean_entropy": float(h.mean()), "max_entropy": float(h.max()),
            "max_entropy_at": worst, "top1_accuracy": sum(t.rank == 1 for t in scored) / len(scored),
        }  # fmt: skip


def plan_windows(n: int, context: int, stride: int) -> list[tuple[int, int]]:
    """Windows over n token ids: (start, keep) pairs. Window ids[start : start + S] predicts
    ids[start + 1 : start + S + 1]; its predictions from offset `keep` on are the new ones."""
    if not 1 <= stride <= context:
        raise UserError(f"the stride must be between 1 and the context ({context}), got {stride}")
    m = n - 1  # predictions
    if m <= context:
        return [(0, 0)]
    plan, done = [(0, 0)], context  # tokens 1 … done are scored
    while done < m:
        start = min(done + stride - context, m - context)
        plan.append((start, done - start))
        done = start + context
    return plan


@torch.no_grad()
def score_ids(model: GPT, ids: Sequence[int], temperature: float = 1.0, stride: int | None = None, top_k: int = 5,
              keep_logits: bool = False) -> Scores:  # fmt: skip
    """Score the predictions of ids[1:] with sliding windows. The windows run in batches [W, S]."""
    check_temperature(temperature)
    if temperature < MIN_TEMPERATURE:
        raise UserError(f"scoring takes a temperature of at least {MIN_TEMPERATURE}, got {temperature}: below "
                        "it, logits / T exceed float32's range and precision")  # fmt: skip
    S, V = model.cfg.block_size, model.cfg.vocab_size
    stride = default_stride(S) if stride is None else stride
    if len(ids) < 2:
        raise UserError("nothing to score: the text is a single token (scoring needs at least two)")
    if keep_logits and (len(ids) - 1) * V > MAX_KEPT_LOGITS:
        raise UserError(f"{len(ids) - 1:,} predictions × {V:,} logits is too much to keep for calibration; "
                        f"score at most {MAX_KEPT_LOGITS // V:,} tokens")  # fmt: skip
    device = next(model.parameters()).device
    tokens = torch.tensor(list(ids), device=device)  # [n]
    plan = plan_windows(len(ids), S, stride)
    width = min(S, len(ids) - 1)
    per_batch = max(1, LOGITS_PER_BATCH // (width * V))
    parts: list[tuple[Tensor, ...]] = []
    for b in range(0, len(plan), per_batch):
        chunk = plan[b : b + per_batch]
        x = torch.stack([tokens[s : s + width] for s, _ in chunk])  # [W, S]
        logits = model(x).float()  # [W, S, V]
        z = torch.cat([logits[w, keep:] for w, (_, keep) in enumerate(chunk)])  # [m_b, V]
        y = torch.cat([tokens[s + 1 + keep : s + 1 + width] for s, keep in chunk])  # [m_b]
        parts.append(_stats(z, y, temperature, top_k, keep_logits))
    cols = [torch.cat(c).cpu() if c[0] is not None else None for c in zip(*parts, strict=True)]
    return Scores(*cols[:5], windows=len(plan), logits=cols[5])


def _stats(z: Tensor, y: Tensor, temperature: float, top_k: int, keep_logits: bool) -> tuple[Tensor | None, ...]:
    """(surprisal [m], entropy [m], rank [m], top probs [m, k], top ids [m, k], logits / T or None)."""
    logp = log_probs(z, temperature)  # [m, V]
    target = logp.gather(-1, y[:, None])  # [m, 1]
    top = torch.topk(logp, min(top_k, logp.shape[-1]), dim=-1)
    entropy = entropy_of_log_probs(logp)  # [m]
    rank = (logp > target).sum(-1) + 1  # [m]
    kept = z / temperature if keep_logits else None
    return -target.squeeze(-1), entropy, rank, top.values.exp(), top.indices, kept


def token_pieces(tokenizer: Tokenizer, ids: Sequence[int]) -> list[str]:
    """The text of each token, such that "".join(pieces) == tokenizer.decode(ids). A byte-level token
    that ends inside a multi-byte character gets "" and the token completing it gets the character."""
    pieces, start = [], 0
    for i in range(len(ids)):
        piece, start = next_piece(tokenizer, ids, start, i)
        pieces.append(piece)
    return pieces


def next_piece(tokenizer: Tokenizer, ids: Sequence[int], start: int, i: int) -> tuple[str, int]:
    """(the text of token i, where the next piece starts), the pieces before it ending at `start`:
    `token_pieces` one token at a time, for text that arrives as it is generated."""
    text = tokenizer.decode(ids[start : i + 1])
    if text.endswith("\ufffd") and i - start < 3:  # a UTF-8 character spans at most 4 bytes
        return "", start
    return text, i + 1


def score_tokens(model: GPT, tokenizer: Tokenizer, ids: Sequence[int], temperature: float = 1.0,
                 stride: int | None = None, top_k: int = 5, keep_logits: bool = False) -> ScoredText:  # fmt: skip
    """Score token ids: every token's text, surprisal, entropy, rank and top-k alternatives."""
    stride = default_stride(model.cfg.block_size) if stride is None else stride
    sc = score_ids(model, ids, temperature, stride, top_k, keep_logits)
    pieces = token_pieces(tokenizer, ids)
    vocab = _piece_cache(tokenizer, sc.top_ids)
    tokens = [TokenScore(pieces[0], int(ids[0]))]
    rows = zip(sc.surprisal.tolist(), sc.entropy.tolist(), sc.rank.tolist(), sc.top_probs.tolist(),
               sc.top_ids.tolist(), strict=True)  # fmt: skip
    for i, (s, h, r, probs, alt_ids) in enumerate(rows, start=1):
        alts = [Alternative(vocab[a], a, p) for p, a in zip(probs, alt_ids, strict=True)]
        tokens.append(TokenScore(pieces[i], int(ids[i]), s, h, math.exp(-s), r, alts))
    targets = torch.as_tensor(list(ids[1:])) if keep_logits else None
    return ScoredText(tokens, temperature, model.cfg.block_size, stride, sc.windows, sc.logits, targets)


def _piece_cache(tokenizer: Tokenizer, ids: Tensor) -> dict[int, str]:
    return {i: tokenizer.decode([i]) for i in ids.unique().tolist()}


def score_text(model: GPT, tokenizer: Tokenizer, text: str, temperature: float = 1.0, stride: int | None = None,
               top_k: int = 5, keep_logits: bool = False) -> ScoredText:  # fmt: skip
    """Encode `text` and score it. Empty text and single-token text are errors."""
    if not text:
        raise UserError("the text is empty: nothing to score")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a command-line argument that was not UTF-8 arrives as surrogate escapes
        raise UserError("the text is not valid UTF-8") from None
    ids = tokenizer.encode(text)
    if len(ids) < 2:
        raise UserError(f"the text {text!r} is a single token: nothing to score (scoring needs at least two tokens)")
    return score_tokens(model, tokenizer, ids, temperature, stride, top_k, keep_logits)


# --- rendering -------------------------------------------------------------------------------

# xterm-256 background colours, cool to hot, and their CSS equivalents (the xterm 6×6×6 cube)
PALETTE = [194, 193, 229, 223, 217, 210, 203]
CSS = ["#d7ffd7", "#d7ffaf", "#ffffaf", "#ffd7af", "#ffafaf", "#ff8787", "#ff5f5f"]
UNITS = {"entropy": "entropy H(p), nats", "surprisal": "surprisal −log p, nats"}


def scale_of(values: Sequence[float | None]) -> Scale:
    """The default colour scale: 0 up to the largest value, rounded up to a multiple of 0.5."""
    top = max((v for v in values if v is not None), default=1.0)
    return 0.0, max(0.5, math.ceil(top * 2) / 2)


def levels(values: Sequence[float | None], scale: Scale) -> list[int | None]:
    """The palette index of each value: equal-width steps from scale[0] to scale[1]; None stays None."""
    lo, hi = scale
    if not hi > lo:
        raise UserError(f"a colour scale needs lo < hi, got {scale}")
    n = len(PALETTE)
    return [None if v is None else min(n - 1, max(0, int((v - lo) / (hi - lo) * n))) for v in values]


def _check_kind(kind: str) -> str:
    if kind not in UNITS:
        raise UserError(f"colour by 'entropy' or 'surprisal', not {kind!r}")
    return kind


def render_terminal(pieces: Sequence[str], values: Sequence[float | None], kind: str,
                    scale: Scale | None = None) -> str:  # fmt: skip
    """The text with each token on an ANSI 256-colour background by `kind` (None = uncoloured),
    then a legend line. A newline token shows as a coloured space before the line break."""
    _check_kind(kind)
    scale = scale or scale_of(values)
    out = []
    for piece, level in zip(pieces, levels(values, scale), strict=True):
        if level is None:
            out.append(piece)
            continue
        lines = piece.split("\n")
        for j, line in enumerate(lines):
            out.append(_ansi(line, level) if line else "")
            if j < len(lines) - 1:
                out.append(_ansi(" ", level) + "\n")
    return "".join(out) + "\n" + legend_terminal(kind, scale)


def _ansi(text: str, level: int) -> str:
    return f"\x1b[48;5;{PALETTE[level]};38;5;16m{text}\x1b[0m"


def legend_terminal(kind: str, scale: Scale) -> str:
    edges = _edges(scale)
    swatches = " ".join(_ansi(f" {edges[i]:.2g}–{edges[i + 1]:.2g} ", i) for i in range(len(PALETTE)))
    return f"{UNITS[kind]}: {swatches}"


def _edges(scale: Scale) -> list[float]:
    lo, hi = scale
    return [lo + (hi - lo) * i / len(PALETTE) for i in range(len(PALETTE) + 1)]


def visible(piece: str) -> str:
    """A token's text with whitespace made visible, for tables and tooltips; any other control
    character (a carriage return would move the terminal's cursor back over the row) as its
    escape, \r or \x00. The empty text is ∅."""
    shown = piece.replace(" ", "␣").replace("\n", "⏎").replace("\t", "⇥")
    shown = "".join(repr(c)[1:-1] if unicodedata.category(c) == "Cc" else c for c in shown)
    return shown or "∅"


def token_table(scored: ScoredText) -> str:
    """One line per token: position, text, id, surprisal, entropy, p, rank and the alternatives."""
    lines = [
        f"{'pos':>5}  {'token':<10} {'id':>5}  {'surprisal':>9}  {'entropy':>7}  {'p':>6}  {'rank':>4}  alternatives"
    ]
    for i, t in enumerate(scored.tokens):
        if t.surprisal is None:
            lines.append(f"{i:>5}  {visible(t.text):<10} {t.id:>5}  {'(context: nothing predicts it)':>32}")
            continue
        alts = ", ".join(f"{visible(a.text)} {a.prob:.3f}" for a in t.alternatives)
        lines.append(f"{i:>5}  {visible(t.text):<10} {t.id:>5}  {t.surprisal:>9.3f}  {t.entropy:>7.3f}  "
                     f"{t.prob:>6.3f}  {t.rank:>4}  {alts}")  # fmt: skip
    return "\n".join(lines)


HEATMAP_CSS = """
.hm { white-space: pre-wrap; font: 13px/1.6 ui-monospace, monospace; background: #fff; padding: .8rem; }
.hm .t { position: relative; border-radius: 2px; }
.hm .t .tip { display: none; position: absolute; left: 0; top: 1.5em; z-index: 10; white-space: pre;
  background: #222; color: #eee; padding: .4rem .6rem; border-radius: 4px; font-size: 12px; }
.hm .t:hover { outline: 1px solid #333; } .hm .t:hover .tip { display: block; }
.hm .nl { color: #999; } .legend span { padding: 0 .5rem; font: 12px ui-monospace, monospace; }
"""


def html_heatmap(pieces: Sequence[str], values: Sequence[float | None], kind: str,
                 tips: Sequence[str | None] | None = None, scale: Scale | None = None,
                 legend: bool = True) -> str:  # fmt: skip
    """An HTML fragment (with its own <style>): the tokens on coloured backgrounds, `tips[i]` shown
    on hover, and a legend. A newline token shows as a coloured ⏎ before the line break."""
    _check_kind(kind)
    scale = scale or scale_of(values)
    tips = tips or [None] * len(pieces)
    spans = []
    for piece, level, tip in zip(pieces, levels(values, scale), tips, strict=True):
        text = html.escape(piece).replace("\n", '<span class="nl">⏎</span>\n')
        if level is None:
            spans.append(text)
            continue
        tip_html = f'<span class="tip">{html.escape(tip)}</span>' if tip else ""
        spans.append(f'<span class="t" style="background:{CSS[level]}">{text}{tip_html}</span>')
    heat = f'<style>{HEATMAP_CSS}</style><div class="hm">{"".join(spans)}</div>'
    return heat + (html_legend(kind, scale) if legend else "")


def html_legend(kind: str, scale: Scale) -> str:
    edges = _edges(scale)
    swatches = "".join(
        f'<span style="background:{c}">{edges[i]:.2g}–{edges[i + 1]:.2g}</span>' for i, c in enumerate(CSS)
    )
    return f'<p class="legend">{html.escape(UNITS[kind])}: {swatches}</p>'


def tooltip(t: TokenScore) -> str | None:
    if t.surprisal is None:
        return None
    head = (f"{visible(t.text)}  id {t.id}\nsurprisal {t.surprisal:.3f} nats  p {t.prob:.3f}  rank {t.rank}\n"
            f"entropy {t.entropy:.3f} nats\nalternatives:")  # fmt: skip
    return head + "".join(f"\n  {a.prob:6.3f}  {visible(a.text)}" for a in t.alternatives)


def render_html(scored: ScoredText, kind: str = "entropy", title: str = "llmlab score") -> str:
    """A self-contained page: the heat map, the alternatives on hover, and the totals."""
    values = [getattr(t, _check_kind(kind)) for t in scored.tokens]
    body = html_heatmap([t.text for t in scored.tokens], values, kind, [tooltip(t) for t in scored.tokens])
    totals = "".join(f"<tr><td>{TOTAL_LABELS[k]}</td><td>{_fmt(v)}</td></tr>" for k, v in scored.totals().items())
    note = (f"Temperature {scored.temperature:g}; context {scored.context} tokens, {scored.windows} window(s) "
            f"advancing by {scored.stride}. Hover a token for its alternatives.")  # fmt: skip
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body {{ font: 15px/1.5 system-ui, sans-serif; max-width: 64rem; margin: 2rem auto; padding: 0 1rem; }}
td {{ padding: .1rem .8rem; border-bottom: 1px solid #ddd; }}</style></head><body>
<h1>{html.escape(title)}</h1><p>{html.escape(note)}</p>{body}<table>{totals}</table>
</body></html>
"""


TOTAL_LABELS = {
    "tokens": "tokens", "scored": "tokens scored (the first is context only)",
    "mean_surprisal": "cross-entropy, nats/token", "bits_per_token": "bits/token", "perplexity": "perplexity",
    "sequence_nll": "−log P(text), nats", "mean_entropy": "mean entropy, nats", "max_entropy": "max entropy, nats",
    "max_entropy_at": "max entropy at token", "top1_accuracy": "top-1 accuracy",
}  # fmt: skip


def _fmt(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, float) else html.escape(str(v))


def render_generation(tokenizer: Tokenizer, prompt: str, token_ids: Sequence[int], entropies: Sequence[float],
                      color: bool = True) -> str:  # fmt: skip
    """A generation (`sampling.Generation`): the prompt plain, then each new token coloured by the
    entropy of the distribution it was drawn from, and the legend. Without colour, one line per token."""
    pieces = token_pieces(tokenizer, token_ids)
    if color:
        return render_terminal([prompt, *pieces], [None, *entropies], "entropy")
    rows = "\n".join(
        f"{i:>5}  {visible(p):<12} {h:.3f}" for i, (p, h) in enumerate(zip(pieces, entropies, strict=True))
    )
    return f"{prompt}{''.join(pieces)}\n{'pos':>5}  {'token':<12} entropy (nats)\n{rows}"


def generation_json(tokenizer: Tokenizer, token_ids: Sequence[int], entropies: Sequence[float]) -> dict[str, Any]:
    """The fields `generate --entropy --json` adds to each sample."""
    return {
        "token_texts": token_pieces(tokenizer, token_ids), "entropies": list(entropies),
        "mean_entropy": sum(entropies) / len(entropies) if entropies else None,
        "max_entropy": max(entropies, default=None),
    }  # fmt: skip
