"""Training tokens/s of one optimiser step (forward, backward, AdamW): llmlab against transformers'
GPT2LMHeadModel on the same shape, batch, dtype and weights. Each side builds its optimiser the way
its own training loop does: llmlab's `make_optimizer`, and `torch.optim.AdamW(fused=True)` over all
parameters, what transformers' Trainer builds by default with torch >= 2.8 (`adamw_torch_fused`;
before, `adamw_torch`, the per-tensor loop that `benchmarks.bench_adamw` measures)."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext

import torch
import torch.nn.functional as F

from benchmarks.common import interleaved_medians, sync
from benchmarks.shapes import TRAIN_BATCH, model_pair
from llmlab.config import TrainConfig
from llmlab.train import clip_and_step, make_optimizer


def clip_then_step(model, optimizer) -> None:
    """transformers' Trainer: `clip_grad_norm_` (a norm pass, then one that scales every gradient),
    then the optimiser's step."""
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()


def step_fn(model, optimizer, logits_of: Callable, x, y, bf16: bool,
            clip_step: Callable = clip_then_step) -> Callable[[], None]:  # fmt: skip
    def step() -> None:
        ctx = torch.autocast(x.device.type, dtype=torch.bfloat16) if bf16 else nullcontext()
        with ctx:
            logits = logits_of(model, x)
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1))
        loss.backward()
        clip_step(model, optimizer)
        optimizer.zero_grad(set_to_none=True)
        sync(x.device)

    return step


def steps(shape: str, device: str = "cpu", bf16: bool = False, compile: bool = False,
          batch: tuple[int, int] | None = None) -> tuple[Callable[[], None], Callable[[], None], int]:  # fmt: skip
    """(llmlab's step, transformers' step, tokens per step) at `shape`, on the same weights and
    batch: `batch` (B, S), else the shape's own (`TRAIN_BATCH`)."""
    ours, hf = model_pair(shape)
    ours.to(device).train()
    hf.to(device).train()
    B, S = batch or TRAIN_BATCH[shape]
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, ours.cfg.vocab_size, (B, S), generator=g).to(device)
    y = torch.randint(0, ours.cfg.vocab_size, (B, S), generator=g).to(device)
    cfg = TrainConfig()
    forward = torch.compile(ours) if compile else ours
    ours_step = step_fn(ours, make_optimizer(ours, cfg), lambda m, t: forward(t), x, y, bf16,
                        lambda m, opt: clip_and_step(opt, 1.0))  # llmlab's Trainer's clip and step  # fmt: skip
    hf_opt = torch.optim.AdamW(hf.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=0.1,
                               fused=device in ("cpu", "cuda"))  # fmt: skip
    hf_step = step_fn(hf, hf_opt, lambda m, t: m(t).logits, x, y, bf16)
    return ours_step, hf_step, B * S


def bench(shape: str, bf16: bool = False, reps: int = 7, device: str = "cpu", compile: bool = False,
          peer: bool = True, probe: Callable[[], object] | None = None, batch: tuple[int, int] | None = None,
          ) -> tuple[float, float | None, float | None]:  # fmt: skip
    """Median tokens/s (llmlab, transformers) for one training step at `shape`, and the median
    seconds of `probe()` (a ceiling's measurement) timed in the same turns, if given; transformers'
    figure is None with `peer=False` (when only llmlab's is needed)."""
    ours_step, hf_step, tokens = steps(shape, device, bf16, compile, batch)
    fns = [ours_step] + ([hf_step] if peer else []) + ([probe] if probe else [])
    seconds = interleaved_medians(fns, reps, warmup=3 if compile else 2)
    return tokens / seconds[0], tokens / seconds[1] if peer else None, seconds[-1] if probe else None


def main(argv: list[str] | None = None) -> None:
    """One shape's training row alone: `python -m benchmarks.bench_train --shape tiny` (make bench runs all)."""
    import argparse

    from benchmarks.common import Row, at_least_one, markdown_table

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="tiny", choices=list(TRAIN_BATCH))
    p.add_argument("--reps", type=at_least_one, default=7, help="repetitions (the median is reported)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    ours, hf, _ = bench(args.shape, reps=args.reps, device=args.device)
    B, S = TRAIN_BATCH[args.shape]
    print(markdown_table([Row(f"training step, {args.shape}, B={B} S={S}, fp32", ours, hf, "tokens/s", "–")]))


if __name__ == "__main__":
    main()
