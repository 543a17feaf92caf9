"""Sampling: logits → probabilities → the next token, and autoregressive generation.

The last step of the notes' model (§2.1) is a softmax over the vocabulary; "pick the most likely
token, append it to the input, repeat" is greedy decoding. The transforms below reshape that
distribution and are the only implementation of each, shared by plain generation and by
speculative decoding:

    temperature  p ∝ exp(logits / T); T → 0 is greedy (argmax), T = 1 the model's own distribution
    top-k        keep the k most likely tokens
    top-p        keep the smallest set of most likely tokens whose probability reaches p (nucleus)

Both keep every token tied with the last one kept: which of equally likely tokens survives is then
not an accident of the sort (transformers' TopPLogitsWarper keeps some of a tie and not others).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from llmlab import static_decode
from llmlab.entropy import entropy_of_probs
from llmlab.errors import UserError
from llmlab.hooks import direct_attributes
from llmlab.model import GPT, KVCache
from llmlab.tokenizer import Tokenizer, decode_stream


@dataclass(frozen=True)
class SamplingConfig:
    temperature: float = 1.0  # 0 = greedy
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.temperature < math.inf:  # also rejects NaN
            raise UserError(f"temperature must be a finite number >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise UserError(f"top_k must be at least 1, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise UserError(f"top_p must be in (0, 1], got {self.top_p}")


def apply_temperature(logits: Tensor, temperature: float) -> Tensor:
    """(logits − max) / T. logits [..., V] → [..., V]; T = 0 is handled by `probs_from_logits`.

    Shifting by the maximum leaves softmax unchanged and keeps a tiny T from overflowing every
    logit to ±∞ (NaN probabilities): the most likely token stays at 0, the others go to −∞.
    """
    if temperature == 1.0:  # nothing to divide, nothing to overflow
        return logits
    return (logits - logits.amax(-1, keepdim=True)) / max(temperature, torch.finfo(logits.dtype).tiny)


def top_k_filter(logits: Tensor, k: int) -> Tensor:
    """Set all but the k largest logits (and any tied with the k-th) to −∞. logits [..., V] → [..., V]."""
    k = min(k, logits.shape[-1])
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]  # [..., 1]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: Tensor, p: float) -> Tensor:
    """Keep the smallest prefix of tokens, by falling probability, whose mass reaches p, and the
    tokens tied with its last.

    So a token is dropped exactly when the mass of the tokens strictly more likely than it already
    reaches p; the most likely token is always kept. logits [..., V] → [..., V].
    """
    if p >= 1:  # everything: the float32 running sum can reach 1 before the last tokens
        return logits
    sorted_logits = torch.sort(logits, dim=-1, descending=True).values  # [..., V]
    mass = sorted_logits.softmax(dim=-1).cumsum(dim=-1)  # [..., V], never decreasing
    kept = (mass[..., :-1] < p).sum(dim=-1, keepdim=True) + 1  # [..., 1]: the prefix up to the token reaching p
    last = sorted_logits.gather(-1, kept - 1)  # [..., 1], the smallest logit kept
    return logits.masked_fill(logits < last, float("-inf"))


NUMPY_ARGMAX_FROM = 1024  # values a row: below this Tensor.argmax is the faster (bench_argmax's [1, 65] row)


def argmax(x: Tensor) -> Tensor:
    """`x.argmax(-1)`: the index of each row's largest value, the first of a tie (a NaN counts as
    the largest). x [..., V] → [...] int64.

    On the CPU, rows of float32 or float64 from `NUMPY_ARGMAX_FROM` values on go through NumPy's
    argmax, which finds the same index faster: for one row of GPT-2's 50,257 logits 11.7-12.8
    against 130-152 µs (2-core Xeon model 167, torch 2.13, three runs of `python -m
    benchmarks.bench_argmax`), and greedy decoding takes two a token.
    """
    cpu_float = x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64)
    if cpu_float and x.dim() and x.shape[-1] >= NUMPY_ARGMAX_FROM:
        return torch.from_numpy(np.asarray(x.detach().numpy().argmax(-1)))
    return x.argmax(-1)


def probs_from_logits(logits: Tensor, cfg: SamplingConfig) -> Tensor:
    """The distribution actually sampled from. logits [..., V] → probs [..., V], rows sum to 1.

    Temperature 0 gives a one-hot at the argmax, so greedy decoding is sampling too.
    """
    logits = logits.float()
    if cfg.temperature == 0:
        return torch.zeros_like(logits).scatter_(-1, argmax(logits).unsqueeze(-1), 1.0)
    logits = apply_temperature(logits, cfg.temperature)
    if cfg.top_k is not None:
        logits = top_k_filter(logits, cfg.top_k)
    if cfg.top_p is not None:
        logits = top_p_filter(logits, cfg.top_p)
    return logits.softmax(dim=-1)


def sample(probs: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """One draw per row. probs [B, V] → ids [B]."""
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


# --- generation -----------------------------------------------------------------------------


@torch.inference_mode()  # no autograd bookkeeping: 1.13× no_grad's tokens/s at the tiny shape (bench_inference_mode)
def generate_ids(model: GPT, idx: Tensor, max_new_tokens: int, cfg: SamplingConfig = SamplingConfig(),
                 generator: torch.Generator | None = None, use_cache: bool = True,
                 cuda_graph: bool = False) -> Iterator[tuple[Tensor, Tensor]]:  # fmt: skip
    """Yield the next token of every row and the distribution it was drawn from, one step at a
    time. idx [B, S₀] → yields (ids [B], probs [B, V]).

    With the KV cache each step feeds only the newest token. Once the context of S tokens is
    full, every step re-reads the last S tokens (a sliding window, as nanoGPT does), because
    absolute positions shift and the cache no longer applies. With `cuda_graph=True` the cached
    steps on CUDA replay one captured CUDA graph (`llmlab.static_decode`, where it says when),
    the same computation without a launch per kernel. It runs under
    `torch.inference_mode`, so the tensors it yields, and the activations hooks see while it
    runs, are inference tensors: `.clone()` one outside to change it in place or to use it with
    autograd; a hook cannot take gradients (run the model under `no_grad` yourself for that).
    """
    B, S0 = idx.shape
    S_max = model.cfg.block_size
    # The tokens so far, filled as we go: [B, S₀ + new], or, for a generation longer than the
    # context, a buffer of two contexts whose last S_max tokens move to its front when it is full
    # (a step never reads further back), so that memory does not grow with max_new_tokens.
    capacity = min(S0 + max_new_tokens, max(S0, S_max) + S_max)
    tokens = torch.empty(B, capacity, dtype=idx.dtype, device=idx.device)  # [B, capacity]
    tokens[:, :S0] = idx
    length = total = S0  # tokens in the buffer; tokens so far (prompt and new)
    cache, graphed = None, None
    graph = use_cache and cuda_graph and static_decode.graphable(model, idx, max_new_tokens)
    if use_cache:  # sized to what this call can fill, not the whole context
        kind = static_decode.StaticKVCache if graph else KVCache
        cache = kind(model.cfg, B, idx.device, _dtype(model), max_len=min(S_max, S0 + max_new_tokens))
    with direct_attributes(model):  # a fifth of a small model's time per token; see there
        for _ in range(max_new_tokens):
            if graph and cache is not None and cache.pos > 0 and total <= cache.max_len:  # one new token a step
                assert isinstance(cache, static_decode.StaticKVCache)
                graphed = graphed or static_decode.GraphedStep(model, cache)  # captured at the first step
                logits = graphed.step(tokens[:, length - 1])  # [B, V]
            elif cache is not None and total <= S_max:  # then the buffer holds every token: length == total
                logits = model(tokens[:, cache.pos : length], cache=cache)[:, -1]  # [B, V]
            else:
                logits = model(tokens[:, max(0, length - S_max) : length])[:, -1]  # [B, V]
            probs = probs_from_logits(logits, cfg)  # [B, V]
            nxt = argmax(probs) if cfg.temperature == 0 else sample(probs, generator)  # [B]: greedy needs no draw
            if length == capacity:  # the window to the front; it starts at capacity − S_max ≥ S_max: no overlap
                tokens[:, :S_max] = tokens[:, length - S_max : length]
                length = S_max
            tokens[:, length] = nxt
            length += 1
            total += 1
            yield nxt, probs


def _dtype(model: GPT) -> torch.dtype:
    return next(model.parameters()).dtype


def encode_prompt(tokenizer: Tokenizer, prompt: str, block_size: int) -> list[int]:
    """Checked encoding: non-empty, valid UTF-8, and within the context."""
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError:
        raise UserError("the prompt is not valid UTF-8") from None
    if not prompt:
        raise UserError("the prompt is empty (give at least one character, e.g. a newline)")
    ids = tokenizer.encode(prompt)
    if len(ids) > block_size:
        raise UserError(f"the prompt is {len(ids)} tokens long, but the model's context is {block_size}")
    return ids


Steps = Callable[[Tensor, "torch.Generator | None"], Iterator[tuple[Tensor, Tensor]]]  # idx [B, S₀] → (ids, probs)


@dataclass
class Generation:
    prompt: str
    text: str  # the continuation, without the prompt
    token_ids: list[int]  # the continuation's ids
    entropies: list[float]  # H(p) in nats of the distribution each token was drawn from (notes §一)


def stream_tokens(model: GPT, tokenizer: Tokenizer, prompt: str, max_new_tokens: int = 200,
                  cfg: SamplingConfig = SamplingConfig(), seed: int | None = None, use_cache: bool = True,
                  steps: Steps | None = None) -> Iterator[tuple[int, float]]:  # fmt: skip
    """The new tokens of one continuation of `prompt` as they are drawn: (token id, entropy in
    nats of the distribution it was drawn from). The prompt is checked now, before the first
    token; `generate_text` assembles the same steps into text."""
    ids = encode_prompt(tokenizer, prompt, model.cfg.block_size)
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    idx = torch.tensor([ids], device=device)
    stream = steps(idx, generator) if steps else generate_ids(model, idx, max_new_tokens, cfg, generator, use_cache)
    return ((int(nxt[0]), float(entropy_of_probs(probs[0]))) for nxt, probs in stream)  # −Σ p log p


def generate_text(model: GPT, tokenizer: Tokenizer, prompt: str, max_new_tokens: int = 200,
                  cfg: SamplingConfig = SamplingConfig(), seed: int | None = None,
                  stop: Sequence[str] = (), use_cache: bool = True,
                  on_text: Callable[[str], None] | None = None, steps: Steps | None = None) -> Generation:  # fmt: skip
    """Continue `prompt`. Stops after `max_new_tokens` or at the first stop string (which is
    not included in the text, nor are the tokens drawn after the one that completes the text:
    `token_ids` and `entropies` hold the tokens that produced `text`; with BPE the last of them
    may also hold the stop string's first characters). `on_text(piece)` receives the text as it
    is produced, for streaming.
    `steps(idx, generator)`, if given, replaces plain decoding's `generate_ids` as the source of
    (ids, probs) steps (speculative decoding passes its own)."""
    if "" in stop:
        raise ValueError("a stop string needs some text to stop before; got an empty one")
    tokens = stream_tokens(model, tokenizer, prompt, max_new_tokens, cfg, seed, use_cache, steps)
    out: list[int] = []
    entropies: list[float] = []
    text, emitted, shown = "", 0, 0
    hold = max((len(s) - 1 for s in stop), default=0)  # a tail that may still grow into a stop string
    for token, entropy in tokens:
        out.append(token)
        entropies.append(entropy)
        piece, emitted = decode_stream(tokenizer, out, emitted)
        text += piece
        hit = _first_stop(text, stop)
        if hit is not None:
            text = text[:hit]
            break
        shown = _emit(on_text, text, shown, len(text) - hold)
    else:
        text = tokenizer.decode(out)  # flush a trailing partial character, if any
        hit = _first_stop(text, stop)
        text = text if hit is None else text[:hit]
    _emit(on_text, text, shown, len(text))
    if hit is not None:  # drop the tokens that hold only the stop string
        while out and tokenizer.decode(out[:-1]).startswith(text):  # (not by length: a partial character is "�")
            out.pop()
            entropies.pop()
    return Generation(prompt, text, out, entropies)


def _first_stop(text: str, stop: Sequence[str]) -> int | None:
    return min((i for s in stop if (i := text.find(s)) >= 0), default=None)


def _emit(on_text: Callable[[str], None] | None, text: str, shown: int, upto: int) -> int:
    if on_text is not None and upto > shown:
        on_text(text[shown:upto])
    return max(shown, upto)


def generate_batch(model: GPT, tokenizer: Tokenizer, prompts: Sequence[str], max_new_tokens: int = 200,
                   cfg: SamplingConfig = SamplingConfig(), seed: int | None = None) -> list[str]:  # fmt: skip
    """Continue many prompts. Prompts of equal token length run together as one batch [B, S₀],
    so no padding (and no position shift) is ever needed. Returns the continuations in order.
    One generator seeded with `seed` draws for all of them, so a prompt's continuation depends on
    the prompts it is batched with; `generate_text` with the same seed gives one alone."""
    encoded = [encode_prompt(tokenizer, p, model.cfg.block_size) for p in prompts]
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    results: list[str] = [""] * len(prompts)
    for length in sorted({len(e) for e in encoded}):
        rows = [i for i, e in enumerate(encoded) if len(e) == length]
        idx = torch.tensor([encoded[i] for i in rows], device=device)  # [B, S₀]
        steps = [nxt for nxt, _ in generate_ids(model, idx, max_new_tokens, cfg, generator)]
        new = torch.stack(steps, dim=1) if steps else idx[:, :0]  # [B, max_new_tokens]
        for row, ids in zip(rows, new.tolist(), strict=True):
            results[row] = tokenizer.decode(ids)
    return results
