"""Fixtures for the knowledge tests: a tiny bios model trained once, and random models with a
character tokenizer, on which formulas are checked exactly."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from llmlab.model import GPT
from llmlab.tokenizer import CharTokenizer
from tests.conftest import TINY_TRAIN, TINY_VARIANTS

CHARS = " .?:ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz{}"


def random_model(name: str = "nanogpt-shakespeare-char", seed: int = 0, sharp: bool = True,
                 **overrides) -> tuple[GPT, CharTokenizer]:  # fmt: skip
    """An untrained model of the tiny config with a character tokenizer over CHARS. `sharp`
    scales the (tied) embeddings by 25: at their initial std of 0.02 the logits span a fraction of
    a nat, so no input could make any output likely, and edits or noise could not show."""
    tokenizer = CharTokenizer.train(CHARS)
    torch.manual_seed(seed)
    cfg = replace(TINY_VARIANTS[name], vocab_size=tokenizer.vocab_size, block_size=48, **overrides)
    model = GPT(cfg).eval()
    if sharp:
        with torch.no_grad():
            model.embed.weight.mul_(25)
    return model, tokenizer


@pytest.fixture(scope="session")
def bios_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny GPT-2-style model trained for a few steps on the biographies of 12 people; read-only."""
    from llmlab.train import train

    out = tmp_path_factory.mktemp("runs") / "bios"
    cfg = replace(TINY_VARIANTS["nanogpt-shakespeare-char"], block_size=64)
    train_cfg = replace(TINY_TRAIN, tokenizer="bpe", bpe_vocab=300, max_steps=30, eval_interval=30)
    train(cfg, train_cfg, "bios:people=12,augment=multi+fullname", out, progress=False)
    return out
