"""The web app's instruments: a run and a request in, the JSON that the page draws out.

Each instrument calls the same library function as its command and returns the same figures
that the command's `--json` prints (rejection, attention and run_info have no command of their
own), so what the page shows is what the tests check:

    run_info    the run: config, parameter count, tokenizer, loss curve       (`train`'s metrics.csv)
    score       per-token surprisal, entropy, rank, alternatives; totals       `score RUN --text T --json`
    generate    a continuation, each new token with the entropy it was drawn from  `generate --entropy --json`
    generate_stream  the same, a line per token as it is drawn, then generate's answer
    rejection   the next token drawn by rejection sampling from a flatter proposal  `llmlab.rejection`
    attention   softmax(QKᵀ/√D + M) of every head of one layer, [h, S, S]     `hook_pattern`, as `trace` sees it
    trace       every tensor's shape in the notes' letters                     `trace RUN --prompt P --json`
    count       parameters, FLOPs and memory, exact and measured               `count RUN --json`
    locate      causal tracing of one fact: indirect effects [S, L]            `knowledge locate --json`
    neurons     the FFN's most active memories and the tokens they promote     `knowledge neurons --json`
    edit        one fact written by ROME, MEMIT or FT-L, scored, then undone   `knowledge edit --json`

None of them prints or exits; bad input raises `UserError`, which the server answers as one line.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from llmlab.config import to_dict
from llmlab.entropy import entropy_of_probs, perplexity
from llmlab.errors import UserError
from llmlab.run_dir import Run, read_metrics_leniently
from llmlab.sampling import encode_prompt

MAX_ATTENTION_TOKENS = 128  # the page draws h maps of S × S cells
MAX_LOCATE_TOKENS = 48  # causal tracing runs S · L · 3 forward passes of a batch of S · samples


def run_info(run: Run) -> dict[str, Any]:
    """The run's identity and its training curves: train loss every step, val loss at evaluations;
    a step whose loss is not finite (a diverged step) is left out of its curve and counted, and so
    is a line of metrics.csv that does not parse (a file damaged by hand or a partial copy)."""
    rows, damaged = read_metrics_leniently(run.path / "metrics.csv")
    train = [r for r in rows if _is_finite(r.get("train_loss"))]
    val = [r for r in rows if _is_finite(r.get("val_loss"))]
    evaluated = [r for r in rows if r.get("val_loss") is not None]
    best = min((r["val_loss"] for r in val), default=None)
    return {
        "run": run.path.name, "path": str(run.path), "data": run.meta.get("data"),
        "model": to_dict(run.model_cfg), "train": to_dict(run.train_cfg),
        "params": sum(p.numel() for p in run.model.parameters()),
        "tokenizer": {"kind": run.tokenizer.kind, "vocab_size": run.tokenizer.vocab_size},
        "example_fact": _example_fact(run.meta.get("data") or ""),
        "example_edit": _example_edit(run.meta.get("data") or ""),
        "metrics": {
            "step": [r["step"] for r in train], "train_loss": [r["train_loss"] for r in train],
            "val_step": [r["step"] for r in val], "val_loss": [r["val_loss"] for r in val],
            "best_val_loss": best, "best_val_perplexity": None if best is None else perplexity(best),
            "not_finite": len(rows) - len(train) + len(evaluated) - len(val),  # losses left out
            "damaged_lines": damaged,  # line numbers of metrics.csv left out
        },
    }  # fmt: skip


def score(run: Run, text: str, temperature: float = 1.0, top_k: int = 5) -> dict[str, Any]:
    """`llmlab score RUN --text TEXT --json`, less the fields that name the command line's source."""
    from llmlab.score import score_text, token_json

    scored = score_text(run.model, run.tokenizer, text, temperature=temperature, top_k=top_k)
    return {**scored.to_json(), "tokens": [token_json(t) for t in scored.tokens]}


def _generation(run: Run, prompt: str, text: str, ids: Sequence[int], entropies: Sequence[float]) -> dict[str, Any]:
    from llmlab.score import generation_json

    return {"prompt": prompt, "text": text, "token_ids": list(ids), **generation_json(run.tokenizer, ids, entropies)}


def generate_stream(run: Run, prompt: str, max_new_tokens: int = 100, temperature: float = 1.0,
                    top_k: int | None = None, top_p: float | None = None,
                    seed: int = 1337) -> Iterator[dict[str, Any]]:  # fmt: skip
    """One sample of `llmlab generate RUN --entropy --json`, a line per new token as it is drawn,
    {"token_id", "text", "entropy"}, then {"done": {prompt, text, token ids, each token's text and
    entropy}}. The request is checked now; the model runs only as the lines are read (by whoever
    holds the model's lock)."""
    from llmlab.sampling import SamplingConfig, stream_tokens
    from llmlab.score import next_piece

    sampling = SamplingConfig(temperature, top_k, top_p)
    tokens = stream_tokens(run.model, run.tokenizer, prompt, max_new_tokens, sampling, seed=seed)

    def lines() -> Iterator[dict[str, Any]]:
        ids: list[int] = []
        entropies: list[float] = []
        start = 0
        for token, entropy in tokens:
            ids.append(token)
            entropies.append(entropy)
            piece, start = next_piece(run.tokenizer, ids, start, len(ids) - 1)
            yield {"token_id": token, "text": piece, "entropy": entropy}
        yield {"done": _generation(run, prompt, run.tokenizer.decode(ids), ids, entropies)}

    return lines()


@torch.no_grad()
def attention(run: Run, prompt: str, layer: int = 0) -> dict[str, Any]:
    """The attention pattern of every head of one layer on the prompt.

    pattern [h, S, S]: row i is query i's distribution over keys 0 … i; above the diagonal the
    mask M = −∞ makes it exactly 0. `entropy` [h, S] is each row's H in nats, log(i + 1) at most;
    `mean_entropy` [h] its mean over the rows.
    """
    from llmlab.score import token_pieces

    if not 0 <= layer < run.model_cfg.n_layers:
        raise UserError(f"layer must be from 0 to {run.model_cfg.n_layers - 1}, got {layer}")
    ids = encode_prompt(run.tokenizer, prompt, run.model_cfg.block_size)
    if len(ids) > MAX_ATTENTION_TOKENS:
        raise UserError(f"the prompt is {len(ids)} tokens; the attention maps show at most {MAX_ATTENTION_TOKENS} "
                        "(an S × S map per head)")  # fmt: skip
    idx = torch.tensor([ids], device=_device(run))  # [1, S]
    name = f"blocks.{layer}.attn.hook_pattern"
    _, cache = run.model.run_with_cache(idx, names=[name])
    pattern = cache[name][0].float().cpu()  # [h, S, S]
    entropy = entropy_of_probs(pattern)  # [h, S]
    return {
        "layer": layer, "tokens": token_pieces(run.tokenizer, ids), "pattern": pattern.tolist(),
        "entropy": entropy.tolist(), "mean_entropy": entropy.mean(-1).tolist(),  # [h]
    }  # fmt: skip


@torch.no_grad()
def rejection(run: Run, prompt: str, proposal_temperature: float = 2.0, samples: int = 2000, seed: int = 0,
              shown: int = 20) -> dict[str, Any]:  # fmt: skip
    """Rejection sampling (notes §二) of the model's next token after the prompt.

    Target p = softmax(z), proposal q = softmax(z / T_q) (flatter for T_q > 1), envelope
    M = max p/q, the smallest valid one. `samples` draws are accepted; their frequencies should
    be p, and accepted / proposed should be 1/M. Beside the total variation distance of the
    accepted draws from p stands that of as many draws from p itself: the noise of n samples.
    The `shown` most likely tokens are listed.
    """
    from llmlab.rejection import discrete_envelope, rejection_sample_discrete
    from llmlab.score import token_pieces

    if not 0 < proposal_temperature < math.inf:
        raise UserError(f"proposal_temperature must be a positive finite number, got {proposal_temperature}")
    ids = encode_prompt(run.tokenizer, prompt, run.model_cfg.block_size)
    z = run.model(torch.tensor([ids], device=_device(run)))[0, -1].double().cpu()  # [V]
    p, q = z.softmax(-1), (z / proposal_temperature).softmax(-1)  # [V] each
    M = discrete_envelope(p, q)
    if not math.isfinite(M):  # inf, or NaN when z / T_q overflows
        raise UserError(f"q = softmax(z / {proposal_temperature:g}) is 0 where p is not, so no envelope M exists: "
                        "use a flatter proposal (a proposal temperature of 1 or more)")  # fmt: skip
    result = rejection_sample_discrete(p, q, M, samples, torch.Generator().manual_seed(seed))
    generator = torch.Generator().manual_seed(seed + 1)
    direct = torch.multinomial(p, samples, replacement=True, generator=generator)  # the same n drawn from p itself
    freq, freq_direct = (torch.bincount(x, minlength=len(p)).double() / samples for x in (result.samples, direct))
    top = p.argsort(descending=True)[:shown]  # [shown]
    return {
        "prompt": prompt, "proposal_temperature": proposal_temperature, "envelope": M,
        "expected_acceptance": 1 / M, "acceptance_rate": result.acceptance_rate,
        "accepted": result.accepted, "proposed": result.proposed,
        "total_variation": 0.5 * float((freq - p).abs().sum()),  # between the accepted draws and p
        "total_variation_direct": 0.5 * float((freq_direct - p).abs().sum()),  # sampling noise alone, same n
        "tokens": [{"text": token_pieces(run.tokenizer, [int(i)])[0], "id": int(i), "p": float(p[i]),
                    "q": float(q[i]), "frequency": float(freq[i])} for i in top],
    }  # fmt: skip


def trace(run: Run, prompt: str) -> dict[str, Any]:
    """`llmlab trace RUN --prompt PROMPT --json`."""
    from llmlab.trace import trace_report

    ids = encode_prompt(run.tokenizer, prompt, run.model_cfg.block_size)
    return trace_report(run.model, torch.tensor([ids], device=_device(run)), str(run.path))


def count(run: Run) -> dict[str, Any]:
    """`llmlab count RUN --json`: B = the run's batch size, S = its context."""
    from llmlab.accounting import count_report

    return count_report(run.model_cfg, run.train_cfg.batch_size, run.model_cfg.block_size, str(run.path))


def locate(run: Run, prompt: str, subject: str, target: str, noise: float = 3.0, samples: int = 10,
           seed: int = 0) -> dict[str, Any]:  # fmt: skip
    """`llmlab knowledge locate RUN --prompt P --subject S --target T --json`, without the PNGs."""
    from llmlab.knowledge import Fact, encode
    from llmlab.knowledge.patching import causal_trace

    fact = Fact(prompt, subject, target)
    tokens = len(encode(run.tokenizer, fact, block_size=run.model_cfg.block_size).inputs)
    if tokens > MAX_LOCATE_TOKENS:
        raise UserError(f"the fact is {tokens} tokens; the page traces at most {MAX_LOCATE_TOKENS} "
                        "(`llmlab knowledge locate` takes longer ones)")  # fmt: skip
    return causal_trace(run.model, run.tokenizer, fact, noise, samples, seed).to_json()


def neurons(run: Run, prompt: str, position: int = -1, top: int = 5, tokens: int = 5) -> dict[str, Any]:
    """`llmlab knowledge neurons RUN --prompt P --json`: per layer, the `top` largest m_i at `position`."""
    from llmlab.knowledge.keyvalue import memories_json, top_memories

    return memories_json(prompt, position, top_memories(run.model, run.tokenizer, prompt, position, top, tokens))


def edit(run: Run, prompt: str, subject: str, target: str, method: str = "rome", site: str = "subject",
         new_tokens: int = 20, memo: dict[str, Any] | None = None) -> dict[str, Any]:  # fmt: skip
    """`llmlab knowledge edit RUN --method M --set site=S --prompt P --subject S --target T --json`,
    without writing a run: the served model is edited and scored, continues the prompt greedily,
    and is restored (its W₂ matrices copied back), so no other request sees the edit. Adds the
    filled-in prompt ("text") and its `new_tokens`-token greedy continuation "before" and "after".
    `memo` (a dict the caller keeps) holds the key statistics C between calls: the weights they
    come from are the same each time, since every edit is undone."""
    from dataclasses import replace

    from llmlab.knowledge import Fact, encode
    from llmlab.knowledge import edit as edit_lib
    from llmlab.knowledge.scores import edit_and_score
    from llmlab.sampling import SamplingConfig, generate_text

    edit_lib.check_method(method)
    params = edit_lib.resolve_params(run.model, method, replace(edit_lib.DEFAULTS[method], site=site))  # type: ignore[arg-type]
    fact = Fact(prompt, subject, target)
    encode(run.tokenizer, fact, block_size=run.model_cfg.block_size)  # bad input fails before any work
    text = fact.text()
    greedy = SamplingConfig(temperature=0.0)
    before = generate_text(run.model, run.tokenizer, text, new_tokens, greedy).text
    saved = edit_lib.snapshot(run.model, params.layers or ())
    try:
        report, _, stats = edit_and_score(run, method, [fact], params, (memo or {}).get("stats"))
        if memo is not None:
            memo["stats"] = stats
        after = generate_text(run.model, run.tokenizer, text, new_tokens, greedy).text
    finally:
        edit_lib.restore(run.model, saved)
    return {**report, "text": text, "before": before, "after": after}


def _example_edit(data: str) -> dict[str, str] | None:
    """For a bios run, a fact to rewrite: its first person's birth city, moved to another city."""
    from llmlab import bios

    world = bios.world_of(data)
    if world is None:
        return None
    person = world.people[0]
    city = person.facts["birth_city"]
    new = next(c for c in bios.CITIES if c != city)
    return {"prompt": bios.prompt(person, "birth_city"), "subject": person.name, "target": new}


def _example_fact(data: str) -> dict[str, str] | None:
    """For a model trained on bios data (`data` is the run's source), a fact of its world to trace."""
    from llmlab import bios

    world = bios.world_of(data)
    if world is None:
        return None
    person, attribute = world.people[0], bios.BASE_ATTRIBUTES[0]
    return {"prompt": bios.prompt(person, attribute), "subject": person.name, "target": person.facts[attribute]}


def _is_finite(x: Any) -> bool:
    return isinstance(x, int | float) and math.isfinite(x)


def _device(run: Run) -> torch.device:
    return next(run.model.parameters()).device
