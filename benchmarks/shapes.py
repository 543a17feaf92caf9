"""The two model shapes every benchmark runs at, as Hugging Face GPT-2 configs.

tiny   nanoGPT's Shakespeare-char CPU recipe: 4 layers, 4 heads, 128 wide, block 64, V = 65
124M   GPT-2 small: 12 layers, 12 heads, 768 wide, block 1024, V = 50257
"""

from __future__ import annotations

from typing import Any

import torch

SHAPES: dict[str, dict[str, Any]] = {
    "tiny": dict(vocab_size=65, n_positions=64, n_embd=128, n_layer=4, n_head=4),
    "124M": dict(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12),
}
TRAIN_BATCH = {"tiny": (12, 64), "124M": (1, 256)}  # (B, S) per training step
# nanoGPT's per-GPU batch for GPT-2 124M (its config/train_gpt2.py): on a GPU a B=1 S=256 step is
# a few hundred kernel launches with little work in each, so `--device cuda` times this one too.
GPU_BATCH = (12, 1024)


def model_pair(shape: str, seed: int = 0, min_positions: int = 0) -> tuple[Any, Any]:
    """(llmlab GPT, transformers GPT2LMHeadModel) with the same random weights, dropout off.
    `min_positions` widens the context (decoding 16 + 128 tokens needs more than tiny's 64)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from llmlab.hf import from_hf_model

    torch.manual_seed(seed)
    dims = SHAPES[shape] | {"n_positions": max(SHAPES[shape]["n_positions"], min_positions)}
    cfg = GPT2Config(**dims, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=None, eos_token_id=None)
    hf = GPT2LMHeadModel(cfg)
    ours = from_hf_model(hf)
    return ours, hf
