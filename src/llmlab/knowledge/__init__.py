"""Knowledge storage and editing (notes §2.3): locate a fact, read the FFN as memory, edit it, score it.

A fact is a subject, a prompt about it and an answer, (s, r, o) written as text:
`Fact("{} was born in", "Anya Briar Forger", "Denver")`. Everything here is built on the hook
points of `llmlab.model` (`model.hooks`, `model.run_with_cache`):

    patching.py   activation patching and causal tracing (Meng et al. 2022, arXiv 2202.05262)
    keyvalue.py   the FFN as a key-value memory (Geva et al. 2021, arXiv 2012.14913)
    edit.py       FT-L, ROME and MEMIT (arXiv 2012.00363, 2202.05262, 2210.07229)
    scores.py     reliability, generalisation, locality, portability, fluency (KnowEdit, arXiv 2401.01286)

This module holds what they share: turning a fact into token ids with the subject's positions
and the answer's tokens, and the teacher-forced logits of answers.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from llmlab.data import read_text_file
from llmlab.errors import UserError, quoted
from llmlab.model import GPT
from llmlab.tokenizer import Tokenizer


@dataclass(frozen=True)
class Fact:
    """prompt: a template with one `{}` where the subject goes ("{} was born in"), or a text that
    contains the subject (EasyEdit's style). target: the answer, which follows after one space."""

    prompt: str
    subject: str
    target: str

    def text(self) -> str:
        """The prompt with the subject in place."""
        return fill(self.prompt, self.subject)[0]


@dataclass(frozen=True)
class Encoded:
    ids: list[int]  # the prompt's tokens
    subject: range  # the subject's token positions in ids
    target: list[int]  # the answer's tokens, which follow ids

    @property
    def subject_last(self) -> int:
        return self.subject[-1]

    @property
    def inputs(self) -> list[int]:
        """What the model reads to predict every answer token: ids + target[:-1]."""
        return self.ids + self.target[:-1]

    @property
    def answer_positions(self) -> range:
        """Positions of `inputs` whose next-token logits predict target[0], target[1], ..."""
        return range(len(self.ids) - 1, len(self.ids) - 1 + len(self.target))


def fill(prompt: str, subject: str) -> tuple[str, int]:
    """The prompt text and the character offset of the subject in it."""
    if not subject.strip():
        raise UserError(f"the subject is empty (got {quoted(subject)})")
    if "{}" in prompt:
        if prompt.count("{}") > 1:
            raise UserError(f"the prompt template {quoted(prompt)} has more than one {{}}")
        return prompt.replace("{}", subject), prompt.index("{}")
    if subject not in prompt:
        raise UserError(
            f"the subject {quoted(subject)} does not occur in the prompt {quoted(prompt)}, and the prompt is not a "
            "template (write {} where the subject goes)"
        )
    return prompt, prompt.index(subject)


def encode(tokenizer: Tokenizer, fact: Fact, prefix: str = "", block_size: int | None = None) -> Encoded:
    """Token ids of `prefix + prompt`, the subject's token span, and the target's tokens.

    The subject's span is found from the encodings of the text before it and up to its end, so it
    is exact for any tokenizer that does not merge tokens across the subject's edges.
    """
    text, start = fill(fact.prompt, fact.subject)
    text, start = prefix + text, len(prefix) + start
    end = start + len(fact.subject)
    upto, ids = tokenizer.encode(text[:end]), tokenizer.encode(text)
    # byte-level BPE glues a space to the word after it: " Forger" is one token, so the subject
    # may begin one space early
    for cut in (text[:start], text[:start].rstrip(" ")):
        before = tokenizer.encode(cut)
        if upto[: len(before)] == before and ids[: len(upto)] == upto and len(upto) > len(before):
            break
    else:
        raise UserError(f"the subject {quoted(fact.subject)} does not form whole tokens in {quoted(text)}")
    sep = "" if text[-1:].isspace() or fact.target[:1].isspace() else " "
    full = tokenizer.encode(text + sep + fact.target)
    if full[: len(ids)] != ids:
        raise UserError(f"the target {quoted(fact.target)} merges with the end of the prompt {quoted(text)} "
                        "into one token")  # fmt: skip
    target = full[len(ids) :]
    if not fact.target.strip() or not target:
        raise UserError(f"the target {quoted(fact.target)} tokenizes to nothing")
    if block_size is not None and len(ids) + len(target) - 1 > block_size:
        raise UserError(f"the prompt and target are {len(ids) + len(target) - 1} tokens, over the context of "
                        f"{block_size}")  # fmt: skip
    return Encoded(ids, range(len(before), len(upto)), target)


def encode_all(tokenizer: Tokenizer, facts: Sequence[Fact], block_size: int | None = None) -> list[Encoded]:
    return [encode(tokenizer, f, block_size=block_size) for f in facts]


def pad(rows: Sequence[list[int]]) -> Tensor:
    """Right-padded batch [B, S]. A causal model's logits at a position never see later ones,
    so padding on the right changes nothing that is read."""
    width = max(len(r) for r in rows)
    return torch.tensor([r + [0] * (width - len(r)) for r in rows])  # [B, S]


def answer_logits(logits: Tensor, encoded: Sequence[Encoded]) -> list[Tensor]:
    """From logits [B, S, V] of `pad([e.inputs ...])`, the rows predicting each answer: [T_i, V]."""
    return [logits[i, list(e.answer_positions)] for i, e in enumerate(encoded)]


def teacher_forced(model: GPT, encoded: Sequence[Encoded], batch_size: int = 256) -> list[Tensor]:
    """Logits [T_i, V] that predict each answer token given the prompt and the answer so far."""
    device = next(model.parameters()).device
    out: list[Tensor] = []
    with torch.no_grad():
        for i in range(0, len(encoded), batch_size):
            chunk = encoded[i : i + batch_size]
            logits = model(pad([e.inputs for e in chunk]).to(device))  # [B, S, V]
            out += [x.float().cpu() for x in answer_logits(logits, chunk)]
    return out


def answer_logprob(logits: Tensor, target: Sequence[int]) -> Tensor:
    """log p(answer) = Σ_j log p(t_j | prompt, t_<j). logits [..., T, V] → [...]."""
    logp = torch.log_softmax(logits.float(), dim=-1)  # [..., T, V]
    idx = torch.tensor(list(target), device=logits.device).expand(*logits.shape[:-1])  # [..., T]
    return logp.gather(-1, idx.unsqueeze(-1)).squeeze(-1).sum(-1)


FIELDS = ("prompt", "subject", "target")


def read_requests(path: str | Path) -> list[Fact]:
    """A JSONL file, one edit per line: {"prompt": "{} was born in", "subject": "...", "target": "..."}."""
    facts = []
    for n, line in enumerate(read_text_file(Path(path)).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path} line {n} is not JSON ({e.msg}): {line[:60]!r}") from None
        if not isinstance(obj, dict) or set(obj) != set(FIELDS) or not all(isinstance(obj[k], str) for k in FIELDS):
            raise UserError(f"{path} line {n} must be an object with exactly the string fields prompt, subject, "
                            f"target: {line[:60]!r}")  # fmt: skip
        facts.append(Fact(obj["prompt"], obj["subject"], obj["target"]))
    return facts
