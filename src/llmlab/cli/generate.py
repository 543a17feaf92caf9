"""`llmlab generate`."""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext, suppress
from pathlib import Path
from typing import Any

from llmlab.cli.common import print_json, table, use_color
from llmlab.errors import UserError


def run(args: argparse.Namespace) -> None:
    """Continue a prompt with a trained model (greedy, temperature, top-k, top-p; speculative with --draft)."""
    import torch

    from llmlab import matvec
    from llmlab.machine import pick_device
    from llmlab.run_dir import load_run
    from llmlab.sampling import SamplingConfig

    sampling = SamplingConfig(args.temperature, args.top_k, args.top_p)
    if (args.max_new_tokens is not None and args.max_new_tokens < 0) or args.num_samples < 1:
        raise UserError("--max-new-tokens must be >= 0 and --num-samples >= 1")
    if args.draft is None and (args.compare or args.gamma is not None):
        raise UserError("--gamma and --compare are options of speculative decoding: give --draft DRAFT_RUN")
    if args.draft is not None and args.weights != "float32":
        raise UserError("--weights applies to plain decoding: speculative decoding verifies several tokens a call, "
                        "which stay fp32")  # fmt: skip
    if args.no_cache and args.weights != "float32":
        raise UserError("--weights needs the KV cache: without it every step multiplies the whole prefix, in fp32")
    if "" in args.stop:
        raise UserError("--stop needs some text to stop before")
    prompt = _read_prompt(args)
    if args.draft is not None:
        return _speculative(args, prompt, sampling)
    args.max_new_tokens = 200 if args.max_new_tokens is None else args.max_new_tokens
    loaded = load_run(args.run, pick_device(args.device or "cpu"))
    if args.weights == "packed" and not matvec.ONEDNN:
        raise UserError("--weights packed needs PyTorch built with oneDNN (torch.backends.mkldnn); this one is not")
    device = next(loaded.model.parameters()).device
    if args.weights == "packed" and device.type != "cpu":
        raise UserError(f"--weights packed is for decoding on the CPU, not on {device}")
    copies = torch.float32 if args.weights == "packed" else getattr(torch, args.weights)
    with nullcontext() if args.weights == "float32" else matvec.weights_in(loaded.model, copies):
        _plain(args, prompt, sampling, loaded)


def _plain(args: argparse.Namespace, prompt: str, sampling: Any, loaded: Any) -> None:
    """Plain decoding of every sample: streamed, coloured by entropy, or as JSON."""
    from llmlab.sampling import encode_prompt, generate_text

    encode_prompt(loaded.tokenizer, prompt, loaded.model_cfg.block_size)  # a bad prompt fails before it is printed
    samples = []
    for i in range(args.num_samples):
        head = ("\n---\n" if i else "") + prompt
        live = not args.json and not args.entropy  # the entropy view is printed once a sample is complete
        if live:
            print(head, end="", flush=True)
        stream = (lambda piece: print(piece, end="", flush=True)) if live else None
        with line_ended_on_error(live):
            g = generate_text(loaded.model, loaded.tokenizer, prompt, args.max_new_tokens, sampling, seed=args.seed + i,
                              stop=args.stop, use_cache=not args.no_cache, on_text=stream)  # fmt: skip
        samples.append(_sample(args, loaded.tokenizer, g))
        _show_entropy(args, loaded.tokenizer, head, g)
    if args.json:
        print_json({"prompt": prompt, **samples[0], "samples": samples})
    elif not args.entropy:  # end the streamed line
        print()


@contextmanager
def line_ended_on_error(live: bool) -> Iterator[None]:
    """Around a sample streamed to stdout: if it fails (Ctrl-C, out of memory), its line is ended
    first, so that the message on stderr starts a line of its own in the terminal."""
    try:
        yield
    except BaseException:
        if live:
            with suppress(OSError):  # stdout may be the closed pipe that failed
                print(flush=True)
        raise


def _sample(args: argparse.Namespace, tokenizer: Any, g: Any) -> dict[str, Any]:
    """One sample's JSON; --entropy adds each token's text and the entropy it was drawn with."""
    sample = {"text": g.text, "token_ids": g.token_ids}
    if args.entropy:
        from llmlab.score import generation_json

        sample |= generation_json(tokenizer, g.token_ids, g.entropies)
    return sample


def _show_entropy(args: argparse.Namespace, tokenizer: Any, head: str, g: Any) -> None:
    """--entropy in the terminal: the new tokens coloured by H(p) of the distribution each came from."""
    if args.entropy and not args.json:
        from llmlab.score import render_generation

        print(render_generation(tokenizer, head, g.token_ids, g.entropies, color=use_color(args.color)))


def _speculative(args: argparse.Namespace, prompt: str, sampling: Any) -> None:
    """--draft: speculative decoding; with --compare, plain decoding of the same target timed beside it."""
    from llmlab.machine import pick_device
    from llmlab.run_dir import load_run
    from llmlab.sampling import encode_prompt, generate_text
    from llmlab.speculative import check_pair, check_same_tokenizer, speculative_text

    if args.no_cache:
        raise UserError("--no-cache cannot be combined with --draft: speculative decoding rolls back KV caches")
    device = pick_device(args.device or "cpu")
    target, draft = load_run(args.run, device), load_run(args.draft, device)
    check_same_tokenizer(target, draft)
    gamma = 4 if args.gamma is None else args.gamma
    if gamma < 1:
        raise UserError(f"--gamma (draft tokens per round) must be at least 1, got {gamma}")
    used = len(encode_prompt(target.tokenizer, prompt, target.model_cfg.block_size))
    context = min(target.model_cfg.block_size, draft.model_cfg.block_size)
    room = context - used
    if room <= 0 and args.max_new_tokens != 0:
        raise UserError(f"the prompt is {used} tokens and fills the pair's context ({context}, the smaller of the "
                        "target's and the draft's): speculative decoding needs room for new tokens; shorten the "
                        "prompt, or decode plainly (without --draft)")  # fmt: skip
    n = min(200, room) if args.max_new_tokens is None else args.max_new_tokens
    check_pair(target.model, draft.model, gamma, used + n)  # before anything is printed
    if args.compare:  # warm up both paths so that neither timing pays for first-call set-up
        speculative_text(target, draft, prompt, min(n, gamma + 1), gamma, sampling, seed=0)
        generate_text(target.model, target.tokenizer, prompt, min(n, gamma + 1), sampling, seed=0)
    samples, figures = _decode_speculatively(args, target, draft, prompt, n, gamma, sampling)
    if args.json:
        print_json({"prompt": prompt, **samples[0], "samples": samples, **figures})
        return
    print("\n")
    table(_speculative_rows(figures))


def _decode_speculatively(args: argparse.Namespace, target: Any, draft: Any, prompt: str, n: int, gamma: int,
                          sampling: Any) -> tuple[list[dict[str, Any]], dict[str, Any]]:  # fmt: skip
    """Every sample speculatively (streamed unless --json or --compare), and plainly with --compare."""
    from llmlab.sampling import generate_text
    from llmlab.speculative import SpeculativeStats, speculative_text

    live = not (args.json or args.compare or args.entropy)
    stream = (lambda piece: print(piece, end="", flush=True)) if live else None
    total, samples, spec_s, plain_s, spec_tokens, plain_tokens = SpeculativeStats(gamma), [], 0.0, 0.0, 0, 0
    for i in range(args.num_samples):
        head = ("\n---\n" if i else "") + prompt
        if stream:
            print(head, end="", flush=True)
        t0 = time.perf_counter()
        with line_ended_on_error(stream is not None):
            g, stats = speculative_text(target, draft, prompt, n, gamma, sampling, seed=args.seed + i,
                                        stop=args.stop, on_text=stream)  # fmt: skip
        spec_s += time.perf_counter() - t0
        total.add(stats)
        spec_tokens += len(g.token_ids)
        samples.append(_sample(args, target.tokenizer, g))
        if args.entropy:
            _show_entropy(args, target.tokenizer, head, g)
        elif not stream and not args.json:
            print(head + g.text, end="", flush=True)
        if args.compare:
            t0 = time.perf_counter()
            plain = generate_text(target.model, target.tokenizer, prompt, n, sampling, seed=args.seed + i,
                                  stop=args.stop)  # fmt: skip
            plain_s += time.perf_counter() - t0
            plain_tokens += len(plain.token_ids)
    figures = {**total.to_json(), "max_new_tokens": n}
    if args.compare:
        spec_rate, plain_rate = spec_tokens / spec_s, plain_tokens / plain_s
        speedup = spec_rate / plain_rate if plain_rate and spec_rate else None  # none kept (a stop at once): n/a
        figures |= {"tokens_per_second": spec_rate, "plain_tokens_per_second": plain_rate, "speedup": speedup}
    return samples, figures


def _speculative_rows(f: dict[str, Any]) -> list[tuple[str, str]]:
    alpha, per_call, expected = (f[k] for k in ("acceptance_rate", "tokens_per_target_call",
                                                "expected_tokens_per_target_call"))  # fmt: skip
    rows = [
        ("acceptance rate", f"{_num(alpha, '.3f')} ({f['accepted']:,} of {f['proposed']:,} draft tokens)"),
        ("tokens per target call", f"{_num(per_call, '.2f')} (γ = {f['gamma']}; (1 − α^(γᵣ+1))/(1 − α) = "
                                   f"{_num(expected, '.2f')} at the measured α, γᵣ each round's drafts)"),
    ]  # fmt: skip
    if "speedup" in f:
        speedup = "n/a (no token kept)" if f["speedup"] is None else f"{f['speedup']:.2f}×"
        rows.append(("speedup", f"{speedup} ({f['tokens_per_second']:,.0f} tokens/s speculative, "
                                f"{f['plain_tokens_per_second']:,.0f} plain, same target, same call)"))  # fmt: skip
    return rows


def _num(x: float | None, spec: str) -> str:
    return "n/a" if x is None else format(x, spec)


def _read_prompt(args: argparse.Namespace) -> str:
    if args.prompt_file is None:
        return args.prompt
    from llmlab.data import read_text_file

    return read_text_file(Path(args.prompt_file))


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", metavar="RUN", help="a run directory written by `llmlab train`")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", default="\n", help="the text to continue (default: a newline)")
    src.add_argument("--prompt-file", metavar="FILE", help="read the prompt from a UTF-8 file")
    p.add_argument("--max-new-tokens", type=int, metavar="N",
                   help="default: 200; with --draft, 200 or the room left in the context if less")  # fmt: skip
    p.add_argument("--temperature", type=float, default=1.0, metavar="T", help="0 = greedy (default: 1)")
    p.add_argument("--top-k", type=int, metavar="K")
    p.add_argument("--top-p", type=float, metavar="P")
    p.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop before this text (repeatable)")
    p.add_argument("--num-samples", type=int, default=1, metavar="N")
    p.add_argument("--seed", type=int, default=1337,
                   help="seeds the sampling: the same seed, the same text (default: %(default)s)")  # fmt: skip
    p.add_argument("--no-cache", action="store_true", help="recompute the whole prefix every step")
    p.add_argument("--device", help="cpu (default), auto (the first of cuda, mps, cpu), cuda or mps")
    p.add_argument("--weights", choices=["float32", "float16", "bfloat16", "packed"], default="float32",
                   help="multiply each new token by 16-bit copies of the large matrices (half the bytes "
                        "read per token), or by fp32 copies packed in oneDNN's layout (the same numbers, "
                        "read faster, twice the memory); prompt, norms, attention and softmax stay fp32")  # fmt: skip
    p.add_argument("--entropy", action="store_true",
                   help="colour each new token by the entropy H(p) of the distribution it was drawn from (in --json: "
                        "token_texts, entropies, mean_entropy, max_entropy)")  # fmt: skip
    p.add_argument("--color", choices=["auto", "always", "never"], default="auto",
                   help="colours for --entropy (auto: when stdout is a terminal)")  # fmt: skip
    g = p.add_argument_group("speculative decoding (the output follows the target's distribution exactly)")
    g.add_argument("--draft", metavar="DRAFT_RUN", help="a small model with the same tokenizer that proposes tokens")
    g.add_argument("--gamma", type=int, metavar="N", help="draft tokens per target forward (default: 4)")
    g.add_argument("--compare", action="store_true", help="also decode plainly and report the measured speedup")
