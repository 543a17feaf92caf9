"""Decoding tokens/s, batch 1, greedy, KV cache, a 16-token prompt and 128 new tokens: llmlab's
generate against transformers' `generate` on the same weights and dtype; optionally llmlab with
16-bit or packed fp32 copies of its matrices (`llmlab.matvec.weights_in`) against transformers in
fp32, with llmlab in fp32 timed in the same turns. The tiny shape's context is widened from 64 to 144
positions so that neither side slides a window."""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass

import torch

from benchmarks.common import interleaved_medians, sync
from benchmarks.shapes import model_pair
from llmlab import matvec
from llmlab.matvec import weights_in
from llmlab.model import KVCache
from llmlab.sampling import SamplingConfig, generate_ids

PROMPT, NEW = 16, 128


@dataclass
class Decoding:
    ours: float  # tokens/s, llmlab (with 16-bit weights if asked)
    peer: float  # tokens/s, transformers
    agree: int  # how many leading tokens the two decoders agree on: NEW when they are the same
    probe_s: float | None = None  # median seconds of the probe, timed in the same turns
    ours_fp32: float | None = None  # tokens/s of llmlab in fp32, in the same turns, when `weights` was given
    copy_logits: LogitAgreement | None = None  # the copies' next-token logits against fp32's, when given
    copy_s: float | None = None  # seconds `weights_in` took to make the copies (before timing), when given


@dataclass
class LogitAgreement:
    """16-bit weights against fp32 on the same tokens: the prompt and fp32's greedy continuation,
    fed one at a time through the KV cache as decoding does (so every product is a one-row one)."""

    top1: float  # the fraction of positions whose most likely next token is the same
    max_abs: float  # the largest |logit₁₆ − logit₃₂| over all positions and tokens
    scale: float  # the standard deviation of fp32's logits, for scale


def stepwise_logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """ids [1, S] → next-token logits [S, V], each position fed alone through the KV cache."""
    cache = KVCache(model.cfg, 1, ids.device, torch.float32, max_len=ids.shape[1])
    with torch.inference_mode():
        return torch.cat([model(ids[:, i : i + 1], cache=cache)[0] for i in range(ids.shape[1])])


def agreement(fp32: torch.Tensor, half: torch.Tensor) -> LogitAgreement:
    """fp32, half [S, V] logits → how closely they agree."""
    top1 = (fp32.argmax(-1) == half.argmax(-1)).float().mean().item()
    return LogitAgreement(top1, (half - fp32).abs().max().item(), fp32.std().item())


def prompt(model: torch.nn.Module, device: str) -> torch.Tensor:
    """The benchmark's prompt [1, PROMPT]: random token ids, the same every run."""
    return torch.randint(0, model.cfg.vocab_size, (1, PROMPT), generator=torch.Generator().manual_seed(1)).to(device)


def decoder(model: torch.nn.Module, idx: torch.Tensor, cuda_graph: bool = False) -> Callable[[], torch.Tensor]:
    """A call that decodes NEW greedy tokens after `idx` with llmlab's `generate_ids` and waits
    for the device: as users call it (generate_ids enters inference_mode itself)."""

    def run() -> torch.Tensor:
        out = torch.stack([t for t, _ in generate_ids(model, idx, NEW, SamplingConfig(0.0), cuda_graph=cuda_graph)], 1)
        sync(idx.device)
        return out

    return run


def bench(
    shape: str,
    reps: int = 5,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    probe: Callable[[], object] | None = None,
    weights: torch.dtype | None = None,
) -> Decoding:
    """llmlab against transformers at `shape`; `probe()` (a ceiling's measurement) takes its turn
    too, if given. `weights` (torch.float16, torch.bfloat16, or torch.float32 for packed fp32)
    decodes llmlab's side with copies of its matrices, made once before timing (how long that took
    is returned too), and times a plain fp32 copy of it beside."""
    ours, hf = model_pair(shape, min_positions=PROMPT + NEW)
    ours.to(device, dtype)
    hf.to(device, dtype)
    hf.generation_config.pad_token_id = hf.generation_config.eos_token_id = None
    idx = prompt(ours, device)

    def hf_run() -> torch.Tensor:
        with torch.inference_mode():  # generate's own no_grad is slower on small models: the peer gets the better
            out = hf.generate(idx, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, use_cache=True)
        sync(idx.device)
        return out[:, PROMPT:]

    fp32_model = copy.deepcopy(ours) if weights is not None else None  # the baseline; `ours` gets the copies
    copy_logits = copy_s = None
    with ExitStack() as stack:
        sides = [decoder(ours, idx), hf_run]
        if fp32_model is not None:
            sides.append(decoder(fp32_model, idx))
            t0 = time.perf_counter()
            stack.enter_context(weights_in(ours, weights))
            copy_s = time.perf_counter() - t0
        differ = (sides[0]() != hf_run())[0].nonzero()
        seconds = interleaved_medians(sides + ([probe] if probe else []), reps)
        if fp32_model is not None:
            ids = torch.cat([idx, sides[2]()], 1)  # [1, PROMPT + NEW]: fp32's own greedy tokens
            copy_logits = agreement(stepwise_logits(fp32_model, ids), stepwise_logits(ours, ids))
    return Decoding(
        ours=NEW / seconds[0],
        peer=NEW / seconds[1],
        agree=int(differ[0]) if len(differ) else NEW,
        probe_s=seconds[-1] if probe else None,
        ours_fp32=NEW / seconds[2] if weights is not None else None,
        copy_logits=copy_logits,
        copy_s=copy_s,
    )


def bench_graph(shape: str, reps: int = 5, device: str = "cuda") -> tuple[float, float, bool]:
    """llmlab's greedy tokens/s with its CUDA graph (`generate_ids(..., cuda_graph=True)`,
    `llmlab.static_decode`) and with eager steps, in turns; and whether both took the same tokens."""
    model, _ = model_pair(shape, min_positions=PROMPT + NEW)
    model.to(device).eval()
    idx = prompt(model, device)
    sides = [decoder(model, idx, cuda_graph=True), decoder(model, idx)]
    same = torch.equal(sides[0](), sides[1]())
    graphed, eager = interleaved_medians(sides, reps)
    return NEW / graphed, NEW / eager, same


def describe(a: LogitAgreement) -> str:
    return (f"next-token logits against fp32's on the same {PROMPT + NEW} tokens: the same top token at "
            f"{a.top1:.1%} of positions, |Δ| ≤ {a.max_abs:.3f} (their spread σ = {a.scale:.2f})")  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    """One shape's decoding row alone: `python -m benchmarks.bench_decode --shape tiny` (make bench runs all)."""
    import argparse

    from benchmarks.common import Row, at_least_one, markdown_table

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="tiny", choices=["tiny", "124M"])
    p.add_argument("--reps", type=at_least_one, default=5, help="repetitions (the median is reported)")
    p.add_argument("--weights", choices=["float16", "bfloat16", "packed"],
                   help="llmlab with 16-bit copies of its matrices, or fp32 ones packed for oneDNN")  # fmt: skip
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = p.parse_args(argv)
    if args.weights == "packed" and (args.device != "cpu" or not matvec.ONEDNN):
        p.error("--weights packed is for the CPU, with PyTorch built with oneDNN")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    weights = torch.float32 if args.weights == "packed" else getattr(torch, args.weights) if args.weights else None
    d = bench(args.shape, reps=args.reps, device=args.device, weights=weights)
    same = "same tokens" if d.agree == NEW else f"the first {d.agree} of {NEW} tokens the same"
    note = same + (f"; llmlab fp32 in the same turns {d.ours_fp32:.1f} tokens/s" if d.ours_fp32 else "")
    note += f"; copies made in {d.copy_s:.2f} s, before timing; {describe(d.copy_logits)}" if d.copy_logits else ""
    name = f"greedy decoding, {args.shape}, B=1" + (f", {args.weights} weights" if weights else ", fp32")
    print(markdown_table([Row(name, d.ours, d.peer, "tokens/s", "–", note)]))


if __name__ == "__main__":
    main()
