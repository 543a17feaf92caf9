"""The FFN as a key-value memory (notes §2.3): which memories does a prompt read, and what do they write?

Geva et al. 2021, "Transformer Feed-Forward Layers Are Key-Value Memories" (arXiv 2012.14913).
An FFN layer is

    FFN(x) = f(x · W₁ + b₁) · W₂ + b₂ = Σ_i m_i · v_i + b₂,      m = f(x · W₁ + b₁)   [F]

a sum over F memories: row i of W₁ is a key k_i that the input x is matched against, the
coefficient m_i (the model's `mlp.hook_post`, [B, S, F]) says how strongly it fires, and
column i of W₂ (`mlp.w2.weight[:, i]`, [H]) is its value v_i, added to the residual stream
in proportion to m_i. A value's meaning is read off the vocabulary it promotes, the top of
E · v_i with E the output embedding (`unembed.weight`, [V, H]); like Geva et al., this
projection skips the final norm.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from llmlab.errors import UserError
from llmlab.model import GPT
from llmlab.sampling import encode_prompt
from llmlab.tokenizer import Tokenizer


@dataclass(frozen=True)
class Memory:
    layer: int
    neuron: int  # i: row i of W₁ (the key) and column i of W₂ (the value)
    activation: float  # m_i at the position read
    promotes: list[str]  # the tokens with the largest E · v_i, most promoted first
    scores: list[float]  # those logits E · v_i

    def to_json(self) -> dict:
        return asdict(self)


def value_logits(model: GPT, layer: int, neurons: torch.Tensor) -> torch.Tensor:
    """E · v_i for each neuron: [len(neurons), V]."""
    values = model.blocks[layer].mlp.w2.weight[:, neurons]  # [H, n]
    return (model.unembed.weight @ values).T  # [n, V]


@torch.no_grad()
def top_memories(model: GPT, tokenizer: Tokenizer, prompt: str, position: int = -1, k: int = 5,
                 top_tokens: int = 5) -> list[list[Memory]]:  # fmt: skip
    """The k most active FFN neurons (largest m_i) of every layer at token `position` of the
    prompt, each with the tokens its value vector promotes. Returns one list per layer."""
    ids = encode_prompt(tokenizer, prompt, model.cfg.block_size)  # non-empty, UTF-8, within the context
    if not -len(ids) <= position < len(ids):
        raise UserError(f"position {position} is outside the prompt's {len(ids)} tokens")
    if k < 1 or top_tokens < 1:
        raise UserError(f"k (--top) and top_tokens (--tokens) must be at least 1, got {k} and {top_tokens}")
    device = next(model.parameters()).device
    names = [f"blocks.{layer}.mlp.hook_post" for layer in range(model.cfg.n_layers)]
    _, cache = model.run_with_cache(torch.tensor([ids], device=device), names=names)
    out = []
    for layer, name in enumerate(names):
        m = cache[name][0, position]  # [F]
        act, neurons = m.topk(min(k, m.numel()))  # [k]
        scores, tokens = value_logits(model, layer, neurons).topk(min(top_tokens, tokenizer.vocab_size), dim=-1)
        out.append([
            Memory(layer, int(n), float(a), [tokenizer.decode([int(t)]) for t in tok], s.tolist())
            for n, a, tok, s in zip(neurons, act, tokens, scores, strict=True)
        ])  # fmt: skip
    return out


def memories_json(prompt: str, position: int, layers: list[list[Memory]]) -> dict:
    """What `knowledge neurons --json` prints (and the web app's memory table shows)."""
    return {"prompt": prompt, "position": position, "layers": [[m.to_json() for m in ms] for ms in layers]}
