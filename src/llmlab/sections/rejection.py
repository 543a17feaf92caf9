"""Tour section for notes §二 (rejection sampling): lossless speculative decoding.

A one-layer draft, trained in the tour on the same data with the notes' model's tokenizer,
proposes γ tokens; the notes' model accepts each with probability min(1, p/q) and corrects the
first rejection from the residual max(0, p − q). Measured side by side with plain decoding of
the same model: acceptance rate, tokens per target call against (1 − α^(γ+1))/(1 − α), the
speedup, and a proof of exactness that fits in a line: at temperature 0 the output equals greedy
decoding token for token.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace

import torch

from llmlab.config import preset
from llmlab.model import GPT
from llmlab.run_dir import load_run
from llmlab.sampling import SamplingConfig, encode_prompt, generate_ids
from llmlab.sections import Section, Tour, html_table
from llmlab.sections.generation import prompts
from llmlab.speculative import SpeculativeStats, side_by_side, speculative_ids

GAMMA = 4


def section(tour: Tour) -> Section:
    with one_thread():
        return _section(tour)


def _section(tour: Tour) -> Section:
    target = load_run(tour.notes_dir)
    draft_cfg = replace(target.model_cfg, n_layers=1, d_model=64, n_heads=2, d_ff=None)
    steps = 150 if tour.quick else 500  # counted in steps, so that a busy machine gets the same draft
    train_cfg = replace(preset("notes").train, max_steps=steps, max_minutes=0.2 if tour.quick else 0.6, lr=3e-3,
                        min_lr=3e-4, warmup_steps=20, eval_interval=steps, eval_iters=5, batch_size=16)  # fmt: skip
    tour.log(f"a 1-layer, 64-wide draft for speculative decoding, {steps} steps ...")
    draft_dir, draft_summary = tour.trained("draft", draft_cfg, train_cfg, tour.data,
                                            tokenizer_from=str(tour.notes_dir))  # fmt: skip
    draft = load_run(draft_dir)
    ids = [encode_prompt(target.tokenizer, p, target.model_cfg.block_size) for p in prompts(target.tokenizer)]
    n = target.model_cfg.block_size - max(len(i) for i in ids)  # fill the context: no sliding window
    f = measure(target.model, draft.model, ids, n, repeats=1 if tour.quick else 3)
    tour.log(f"speculative decoding: α = {f['acceptance_rate']:.3f}, {f['tokens_per_target_call']:.2f} tokens per "
             f"target call, speedup {f['speedup']:.2f}×, greedy-exact: {f['greedy_equal']}")  # fmt: skip
    rows = [
        ("draft", f"1 layer, H = 64: {draft_summary['params']:,} parameters, val loss {draft_summary['val_loss']:.3f} "
                  f"(target: {tour.notes_summary['val_loss']:.3f})"),
        ("acceptance rate α (temperature 1)", f"{f['acceptance_rate']:.3f} of the {f['proposed']:,} draft tokens "
                                               "judged (up to each round's first rejection)"),
        ("tokens per target call", f"{f['tokens_per_target_call']:.2f} measured; (1 − α^(γᵣ+1))/(1 − α) = "
                                   f"{f['expected_tokens_per_target_call']:.2f} (γᵣ = {GAMMA}, fewer in last rounds)"),
        ("decoding speed", f"{f['tokens_per_second']:,.0f} tokens/s speculative, "
                           f"{f['plain_tokens_per_second']:,.0f} plain (median of {f['repeats']}, one thread)"),
        ("speedup", f"{f['speedup']:.2f}×"),
        ("temperature 0 equals greedy decoding", "yes, token for token" if f["greedy_equal"] else "NO"),
    ]  # fmt: skip
    body = (
        "<p>Speculative decoding is rejection sampling with envelope M = 1 per token: the draft proposes "
        f"γ = {GAMMA} tokens x ~ q, the target keeps each with probability min(1, p(x)/q(x)) and replaces the "
        "first rejected one by a draw from norm(max(0, p − q)), so every token follows p exactly "
        "(arXiv 2211.17192, 2302.01318). One target forward scores all γ drafts.</p>"
        + html_table(rows)
        + "<p>On a CPU a model this small costs per operation, not per multiply: the 1-layer draft's forward "
        "is a sizeable fraction of the target's, and scoring γ + 1 tokens costs more than one. The speedup "
        "grows with the target's size; <code>benchmarks/bench_speculative.py</code> measures a larger pair.</p>"
    )  # fmt: skip
    return Section("Rejection sampling: speculative decoding (notes §二)", body, f)


@contextmanager
def one_thread() -> Iterator[None]:
    """Models this small are chains of tiny operations (a 1-layer draft's training step, a batch-1
    decoding step): a second thread only adds synchronisation, and on a busy machine a lot of it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@torch.no_grad()
def measure(target: GPT, draft: GPT, prompt_ids: list[list[int]], n: int, repeats: int) -> dict[str, float]:
    """Plain and speculative decoding of the same prompts at temperature 1, timed side by side."""
    cfg, stats = SamplingConfig(), SpeculativeStats(GAMMA)
    plain_rates, spec_rates = [], []
    for rep in range(repeats):
        plain, spec = side_by_side(target, draft, prompt_ids, n, GAMMA, cfg, torch.Generator().manual_seed(rep), stats)
        plain_rates.append(plain)
        spec_rates.append(spec)
    greedy = SamplingConfig(0.0)
    equal = all(
        [int(t) for t, _ in generate_ids(target, torch.tensor([ids]), n, greedy)]
        == [int(t) for t, _ in speculative_ids(target, draft, torch.tensor([ids]), n, GAMMA, greedy)]
        for ids in prompt_ids
    )
    plain, spec = statistics.median(plain_rates), statistics.median(spec_rates)
    return {**stats.to_json(), "tokens_per_second": spec, "plain_tokens_per_second": plain, "speedup": spec / plain,
            "repeats": repeats, "greedy_equal": equal}  # fmt: skip
