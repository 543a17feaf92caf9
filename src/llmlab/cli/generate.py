"""`llmlab generate`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from llmlab.errors import UserError


def run(args: argparse.Namespace) -> None:
    """Continue a prompt with a trained model (greedy, temperature, top-k, top-p)."""
    from llmlab.run_dir import load_run
    from llmlab.sampling import SamplingConfig, generate_text
    from llmlab.train import pick_device

    sampling = SamplingConfig(args.temperature, args.top_k, args.top_p)
    if args.max_new_tokens < 0 or args.num_samples < 1:
        raise UserError("--max-new-tokens must be >= 0 and --num-samples >= 1")
    prompt = _read_prompt(args)
    loaded = load_run(args.run, pick_device(args.device or "cpu"))
    samples = []
    for i in range(args.num_samples):
        if not args.json:
            print(("\n---\n" if i else "") + prompt, end="", flush=True)
        stream = None if args.json else (lambda piece: print(piece, end="", flush=True))
        g = generate_text(loaded.model, loaded.tokenizer, prompt, args.max_new_tokens, sampling,
                          seed=args.seed + i, stop=args.stop, use_cache=not args.no_cache, on_text=stream)  # fmt: skip
        samples.append({"text": g.text, "token_ids": g.token_ids})
    if args.json:
        print(json.dumps({"prompt": prompt, **samples[0], "samples": samples}, ensure_ascii=False))
    else:
        print()


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
    p.add_argument("--max-new-tokens", type=int, default=200, metavar="N")
    p.add_argument("--temperature", type=float, default=1.0, metavar="T", help="0 = greedy (default: 1)")
    p.add_argument("--top-k", type=int, metavar="K")
    p.add_argument("--top-p", type=float, metavar="P")
    p.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop before this text (repeatable)")
    p.add_argument("--num-samples", type=int, default=1, metavar="N")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--no-cache", action="store_true", help="recompute the whole prefix every step")
    p.add_argument("--device", help="cpu (default), cuda, mps")
