"""Speculative against plain decoding of the same target, side by side in one run (notes §二).

The documented pair, both trained on `stdlib`, the draft with the target's tokenizer. The target
is 101 MB of fp32 weights, more than this machine's 32 MB L3 cache, so that a plain step is bound
by memory, which is where speculative decoding can pay. On the shared 2-core machine of
2026-12-01 the target got 752 steps in 25 minutes (val loss 1.494), the draft 3,343 steps in
3 minutes (val loss 1.595):

    llmlab train --data stdlib --out runs/bench/target-l8 --preset notes --set n_layers=8 \
        --set d_model=512 --set n_heads=8 --set block_size=128 --set eval_interval=100 --max-minutes 25
    llmlab train --data stdlib --out runs/bench/draft-l8 --tokenizer-from runs/bench/target-l8 \
        --preset notes --set n_layers=2 --set d_model=128 --set n_heads=4 --set block_size=128 \
        --set eval_interval=500 --max-steps 100000 --max-minutes 3
    python -m benchmarks.bench_speculative --gamma 6

Each repetition decodes the same prompts at temperature 1, batch 1, KV cache, first plainly and
then speculatively, so that a load on the machine hits both alike; the speedup is the median
over repetitions of (speculative tokens/s) / (plain tokens/s). Decoding fills the context
(no sliding window), so every token of both runs is one cached step.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
from collections.abc import Callable

import torch

from benchmarks.common import at_least_one, interleaved_medians
from llmlab.errors import UserError
from llmlab.model import GPT, KVCache
from llmlab.run_dir import Run, load_run
from llmlab.sampling import SamplingConfig, encode_prompt
from llmlab.speculative import SpeculativeStats, check_same_tokenizer, side_by_side

PROMPTS = ("def ", "class ", "import ", "    return ", "if __name__")
CALL_CONTEXT = 64  # cached tokens before the timed single calls (fewer where the context is shorter)


def one_repetition(target: GPT, draft: GPT, prompts: list[list[int]], n: int, gamma: int, seed: int,
                   stats: SpeculativeStats) -> tuple[float, float]:  # fmt: skip
    """(plain tokens/s, speculative tokens/s) over all prompts."""
    g = torch.Generator().manual_seed(seed)
    return side_by_side(target, draft, prompts, n, gamma, SamplingConfig(1.0), g, stats)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--target", default="runs/bench/target-l8")
    p.add_argument("--draft", default="runs/bench/draft-l8")
    p.add_argument("--gamma", type=at_least_one, default=4)
    p.add_argument("--repeats", type=at_least_one, default=5)
    p.add_argument("--new-tokens", type=at_least_one, default=100)
    p.add_argument(
        "--prompt",
        action="append",
        dest="prompts",
        metavar="TEXT",
        help="a prompt to decode from (repeatable; default: " + ", ".join(map(repr, PROMPTS)) + ")",
    )
    p.add_argument("--threads", type=at_least_one, help="torch threads (default: torch's own choice)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:  # a missing pair (see the recipe above), a mismatched one or a short context: one line
        target, draft = load_run(args.target), load_run(args.draft)
        check_same_tokenizer(target, draft)
        context = min(target.model_cfg.block_size, draft.model_cfg.block_size)
        prompts = [encode_prompt(target.tokenizer, text, context) for text in args.prompts or PROMPTS]
    except UserError as e:
        p.error(str(e))
    n = min(args.new_tokens, context - max(map(len, prompts)))
    if n < 1:
        p.error(f"the prompts fill the pair's context of {context} tokens; there is no room to decode")
    one_repetition(target.model, draft.model, prompts[:1], 8, args.gamma, 0, SpeculativeStats(args.gamma))  # warm-up
    stats, rates = SpeculativeStats(args.gamma), []
    for rep in range(args.repeats):
        rates.append(one_repetition(target.model, draft.model, prompts, n, args.gamma, rep, stats))
    plain = statistics.median(r[0] for r in rates)
    spec = statistics.median(r[1] for r in rates)
    speedup = statistics.median(s / q for q, s in rates)
    alpha = stats.acceptance_rate
    print(
        "| target | draft | γ | acceptance α | tokens/target call (formula) | plain tok/s | speculative tok/s "
        f"| speedup (median of {args.repeats}) | threads | load avg |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    print(
        f"| {describe(target)} | {describe(draft)} | {args.gamma} | {alpha:.3f} | {stats.tokens_per_target_call:.2f} "
        f"({stats.expected_tokens_per_target_call:.2f}) | {plain:,.0f} | {spec:,.0f} | {speedup:.2f}× "
        f"| {torch.get_num_threads()} | {os.getloadavg()[0]:.1f} |"
    )
    print(f"\n{n} new tokens × {len(prompts)} prompts per repetition, temperature 1, batch 1, KV cache.")
    cached = min(CALL_CONTEXT, context - args.gamma - 1)  # tokens already in the cache before the timed calls
    if cached >= 1:
        one, many = call_seconds(target.model, [1, args.gamma + 1], context=cached)
        (draft_one,) = call_seconds(draft.model, [1], context=cached)
        print(f"one cached target call after {cached} tokens: {one * 1e3:.2f} ms for 1 token, {many * 1e3:.2f} ms "
              f"for γ + 1 = {args.gamma + 1} ({many / one:.2f}×); a draft call {draft_one * 1e3:.2f} ms "
              f"({draft_one / one:.2f}× the target's)")  # fmt: skip
    else:
        print(f"call costs not timed: γ + 1 = {args.gamma + 1} tokens leave no room in the context of {context}")
    print("command: python -m benchmarks.bench_speculative " + " ".join(shlex.quote(a) for a in sys.argv[1:]))


@torch.inference_mode()
def call_seconds(model: GPT, lengths: list[int], context: int, reps: int = 15) -> list[float]:
    """Median seconds of one cached forward call of each length, after `context` cached tokens:
    what verifying γ + 1 drafts costs against one plain step (the calls take turns)."""
    cache = KVCache(model.cfg, 1, max_len=context + max(lengths))
    model(torch.zeros(1, context, dtype=torch.long), cache=cache)

    def call(n: int) -> Callable[[], object]:
        def run() -> None:
            cache.truncate(context)
            model(torch.zeros(1, n, dtype=torch.long), cache=cache)

        return run

    return interleaved_medians([call(n) for n in lengths], reps)


def describe(run: Run) -> str:
    c = run.model_cfg
    try:
        loss = f"val loss {json.loads((run.path / 'summary.json').read_text())['val_loss']:.3f}"
    except (OSError, ValueError, KeyError, TypeError):
        loss = "no summary.json"  # imported, or trained before summaries
    return f"L={c.n_layers} H={c.d_model}, {run.model.num_params() / 1e6:.2f}M params, {loss}"


if __name__ == "__main__":
    main()
