"""The optimizer step alone: llmlab's AdamW (fused: one kernel per parameter group, no temporaries)
against `torch.optim.AdamW`'s default, on a CPU the per-tensor loop, which transformers' Trainer
used by default before torch 2.8 (`adamw_torch`; since, `adamw_torch_fused`) and which issue 7
measured; each over its own model's gradients, the two taking turns in one process.

    python -m benchmarks.bench_adamw [--shape 124M] [--reps 7] [--bf16 | --clip]

Prints the median seconds of `optimizer.step()` and the page faults one step takes. The loop
computes √v, then the division, for every parameter into a new tensor: at GPT-2 124M about 185,000
fresh 4 KB pages a step, each a page fault, where the fused kernel allocates nothing. `--bf16`
takes the gradients from a bf16-autocast backward instead of an fp32 one (on a CPU without bf16
instructions that backward is emulated and slow; the steps it feeds are not). Issue 7 measured
transformers' step at 570 ms under bf16 autocast against 200 ms in fp32; here, in one process,
the loop takes the same 0.5-0.75 s and the same page faults after either backward (0.74-0.98 s against
0.54-0.57 s when each ran in a fresh process), and the fused step 0.07-0.10 s. `--clip` times the
step with gradient clipping instead: `llmlab.train.clip_and_step` against `clip_grad_norm_` then
the same fused step.
"""

from __future__ import annotations

import argparse
import copy
import resource
from collections.abc import Callable

import torch
import torch.nn.functional as F

from benchmarks.common import at_least_one, interleaved_medians
from benchmarks.shapes import model_pair
from llmlab.config import TrainConfig
from llmlab.train import clip_and_step, make_optimizer

SEQ = 16  # the step's cost does not depend on the batch that made the gradients; a short one is cheap


def page_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def stepper(model: torch.nn.Module, optimizer: torch.optim.Optimizer, logits_of: Callable, vocab: int,
            bf16: bool) -> Callable[[], None]:  # fmt: skip
    """Fills the gradients once (a forward and backward on random tokens), then returns a function
    that takes one optimizer step over them; the gradients stay, so every call does the same work."""
    model.train()
    g = torch.Generator().manual_seed(0)
    x, y = (torch.randint(0, vocab, (1, SEQ), generator=g) for _ in range(2))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        logits = logits_of(x)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1))
    loss.backward()
    optimizer.step()  # the first step allocates the moments
    return optimizer.step


def bench(shape: str = "124M", reps: int = 7, bf16: bool = False) -> tuple[float, float, int, int]:
    """Median seconds of one step (llmlab's AdamW, torch.optim.AdamW's default) and page faults per step."""
    ours, hf = model_pair(shape)
    cfg = TrainConfig()
    V = ours.cfg.vocab_size
    ours_step = stepper(ours, make_optimizer(ours, cfg), ours, V, bf16)
    hf_opt = torch.optim.AdamW(hf.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=0.1)
    hf_step = stepper(hf, hf_opt, lambda t: hf(t).logits, V, bf16)
    faults = []
    for step in (ours_step, hf_step):
        before = page_faults()
        step()
        faults.append(page_faults() - before)
    ours_s, hf_s = interleaved_medians([ours_step, hf_step], reps)
    return ours_s, hf_s, faults[0], faults[1]


def bench_clip(shape: str = "124M", reps: int = 7) -> tuple[float, float]:
    """Median seconds of a clipped step, llmlab's `clip_and_step` (the clip's scale handed to the
    fused kernel) against `clip_grad_norm_` then the same fused step, each on its own copy of the
    model and gradients, in turns. Once clipped, the gradients stay under the clip, and both still
    read (and `clip_grad_norm_` rewrites) every one of them each call."""
    ours, _ = model_pair(shape)
    other = copy.deepcopy(ours)
    cfg = TrainConfig()
    V = ours.cfg.vocab_size
    fused_opt, plain_opt = make_optimizer(ours, cfg), make_optimizer(other, cfg)
    for model, optimizer in ((ours, fused_opt), (other, plain_opt)):
        stepper(model, optimizer, model, V, bf16=False)  # the gradients, and the moments

    def clip_inside() -> None:
        clip_and_step(fused_opt, cfg.grad_clip)

    def clip_then_step() -> None:
        torch.nn.utils.clip_grad_norm_(other.parameters(), cfg.grad_clip)
        plain_opt.step()

    inside_s, then_s = interleaved_medians([clip_inside, clip_then_step], reps)
    return inside_s, then_s


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="124M", choices=["tiny", "124M"])
    p.add_argument("--reps", type=at_least_one, default=7)
    p.add_argument("--bf16", action="store_true", help="gradients from a bf16-autocast backward")
    p.add_argument("--clip", action="store_true", help="the clipped step: clip_and_step against clip_grad_norm_")
    args = p.parse_args(argv)
    if args.clip:
        inside_s, then_s = bench_clip(args.shape, args.reps)
        print(f"{args.shape}: clip_and_step {inside_s * 1e3:.0f} ms, clip_grad_norm_ then the fused step "
              f"{then_s * 1e3:.0f} ms: {then_s / inside_s:.2f}x")  # fmt: skip
        return
    ours_s, hf_s, ours_f, hf_f = bench(args.shape, args.reps, args.bf16)
    grads = "bf16-autocast" if args.bf16 else "fp32"
    print(f"{args.shape}, {grads} gradients: llmlab's fused AdamW {ours_s * 1e3:.0f} ms a step "
          f"({ours_f:,} page faults), torch.optim.AdamW's default {hf_s * 1e3:.0f} ms ({hf_f:,} page faults): "
          f"{hf_s / ours_s:.1f}x")  # fmt: skip


if __name__ == "__main__":
    main()
