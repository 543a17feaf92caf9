"""Training: minimise the cross-entropy of the next token (notes §一) with AdamW.

nanoGPT's recipe, as a library function: AdamW with decay and no-decay parameter groups, linear
warmup then cosine decay to `min_lr`, gradient clipping, gradient accumulation, optional bf16
autocast and `torch.compile`. Evaluation every `eval_interval` steps writes an atomic checkpoint;
`resume=True` continues so that the losses equal those of an uninterrupted run. Under torchrun
each process trains on its slice of the global batch with DistributedDataParallel and rank 0
alone writes.
"""

from __future__ import annotations

import math
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from llmlab import data as data_lib
from llmlab.accounting import cached_peak, count_params, mfu, train_step_flops
from llmlab.config import ModelConfig, TrainConfig
from llmlab.entropy import cross_entropy, perplexity
from llmlab.errors import RunDirError, TrainingDiverged, UserError, reason
from llmlab.machine import Dist, agreed, barrier, setup_distributed
from llmlab.model import GPT
from llmlab.run_dir import (
    Run,
    check_makeable,
    check_run_dir,
    config_json,
    load_run,
    load_train_state,
    read_metrics,
    save_train_state,
    save_weights,
    write_json,
    write_metrics,
    write_text,
)  # fmt: skip
from llmlab.tokenizer import Tokenizer, load_tokenizer, train_tokenizer


@dataclass
class TrainResult:
    run_dir: str
    steps: int
    train_loss: float  # mean over the last evaluation interval
    val_loss: float  # over the validation split (its first `val_tokens` tokens)
    val_perplexity: float
    val_tokens: int
    tokens_per_second: float  # training throughput, evaluation excluded
    flops_per_second: float  # exact model FLOPs of the steps (llmlab.accounting) per second of training
    mfu: float | None  # flops_per_second over the cached matmul peak (`llmlab count --peak`); None if unmeasured
    elapsed_seconds: float
    stopped_by: str  # "max_steps", "max_minutes" or "interrupt"
    params: int
    rank: int = 0  # this process's under torchrun (every rank returns its result; rank 0 reports it)
    device: str = "cpu"  # the device type trained on, whose cached peak `mfu` needs

    def to_json(self) -> dict[str, Any]:
        """The run's summary (summary.json, `train --json`): every field but the process's rank and device."""
        return {k: v for k, v in asdict(self).items() if k not in ("rank", "device")}


# --- schedule and optimiser -----------------------------------------------------------------


def lr_at(step: int, progress: float, cfg: TrainConfig) -> float:
    """Linear warmup over `warmup_steps`, then cosine decay from `lr` to `min_lr` as the run's
    progress (steps done / max_steps, or time used / max_minutes if that is further) goes to 1."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / (cfg.warmup_steps + 1)
    warm = cfg.warmup_steps / cfg.max_steps
    ratio = min(1.0, max(0.0, (progress - warm) / (1 - warm))) if warm < 1 else 1.0
    return cfg.min_lr + 0.5 * (1 + math.cos(math.pi * ratio)) * (cfg.lr - cfg.min_lr)


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW; matrices (and embeddings) decay, biases and norm gains do not (nanoGPT). The fused
    kernel updates every parameter in one call (PyTorch's default on CPU is a per-tensor loop)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    fused = all(p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=fused)


def grad_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """The global 2-norm ‖(g₁, …, g_n)‖₂ = √Σᵢ gᵢ·gᵢ of all the gradients, a 0-dim tensor, as
    `nn.utils.clip_grad_norm_` measures it. On CPU each gᵢ·gᵢ of fp32 gradients is one BLAS dot
    product, faster there than `vector_norm` (`python -m benchmarks.bench_adamw --clip` times the
    whole clip and step)."""
    if all(g.device.type == "cpu" and g.dtype == torch.float32 for g in grads):
        flat = [g.reshape(-1) for g in grads]  # [n] views; a copy only for a non-contiguous gradient
        return torch.stack([torch.dot(f, f) for f in flat]).sum().sqrt()
    return nn.utils.get_total_norm(grads)


def clip_and_step(optimizer: torch.optim.Optimizer, max_norm: float) -> None:
    """Scale the gradients by min(1, max_norm / (‖g‖₂ + 1e-6)), as `nn.utils.clip_grad_norm_` does
    (no clipping with max_norm = 0), then take the optimiser's step.

    With a fused AdamW (`make_optimizer`'s) the clip costs one read of the gradients instead of a
    norm pass and a second pass that rewrites every gradient: the scale goes to the kernel as its
    `grad_scale`, the attribute `torch.amp.GradScaler` sets for fused optimisers, by which the
    kernel divides each gradient as it reads it (and leaves the clipped one in .grad). At GPT-2
    124M on 2 cores of a Xeon model 167, clip and step took 132 ms against 196 with
    `clip_grad_norm_` (`python -m benchmarks.bench_adamw --clip`). Other optimisers clip with
    `clip_grad_norm_` before their step."""
    params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    fused = all(group.get("fused") for group in optimizer.param_groups)
    if max_norm <= 0 or not params:
        optimizer.step()
    elif not fused or len({p.device for p in params}) > 1:
        nn.utils.clip_grad_norm_(params, max_norm)
        optimizer.step()
    else:
        norm = grad_norm([p.grad for p in params])
        optimizer.grad_scale = torch.clamp((norm + 1e-6) / max_norm, min=1.0).float()  # type: ignore[attr-defined]
        try:
            optimizer.step()
        finally:
            del optimizer.grad_scale  # type: ignore[attr-defined]


# --- data and run directory -----------------------------------------------------------------


def prepare(out: Path, model_cfg: ModelConfig, train_cfg: TrainConfig, data: str,
            tokenizer_from: str | None, d: Dist, extra: dict[str, Any]) -> tuple[ModelConfig, Tokenizer]:  # fmt: skip
    """Rank 0 trains (or copies) the tokenizer, tokenizes the data and writes config.json."""
    if d.main:
        text = data_lib.load_source(data)
        if tokenizer_from is not None:
            tokenizer = load_tokenizer(check_run_dir(tokenizer_from) / "tokenizer.json")
            train_cfg = replace(train_cfg, tokenizer=tokenizer.kind)  # config.json names the tokenizer it has
        else:
            tokenizer = train_tokenizer(train_cfg.tokenizer, text, train_cfg.bpe_vocab)
        _write_token_cache(out, text, tokenizer, train_cfg.val_fraction, model_cfg.block_size)
        model_cfg = replace(model_cfg, vocab_size=tokenizer.vocab_size)
        write_text(out / "tokenizer.json", tokenizer.to_json())
        write_json(out / "config.json", config_json(model_cfg, train_cfg, data=data, **extra))
    barrier(d)
    tokenizer = load_tokenizer(out / "tokenizer.json")
    return replace(model_cfg, vocab_size=tokenizer.vocab_size), tokenizer


def _write_token_cache(out: Path, text: str, tokenizer: Tokenizer, val_fraction: float,
                       block_size: int) -> data_lib.TokenSplits:  # fmt: skip
    """Tokenize the text into out/data: train and validation splits, as memmaps."""
    ids = tokenizer.encode_array(text)
    return data_lib.write_splits(ids, out / "data", val_fraction, tokenizer.vocab_size, block_size)


def _rebuild_token_cache(run: Run, out: Path, d: Dist) -> None:
    """A resumed run whose data/ folder was deleted tokenizes its data source again (rank 0)."""
    if d.main and not (out / "data").exists():
        source = run.meta.get("data")
        if not isinstance(source, str):
            raise UserError(f"{out} has no token cache (data/) and its config.json names no data source to rebuild it")
        splits = _write_token_cache(out, data_lib.load_source(source), run.tokenizer, run.train_cfg.val_fraction,
                                    run.model_cfg.block_size)  # fmt: skip
        print(f"llmlab: rebuilt the token cache in {out / 'data'} from {source} ({len(splits.train):,} train, "
              f"{len(splits.val):,} validation tokens)", file=sys.stderr)  # fmt: skip
    barrier(d)


def _stopped_before_checkpoint(out: Path) -> bool:
    """What a new run killed before its first checkpoint leaves: a config, but no weights."""
    return (out / "config.json").is_file() and not (out / "model.safetensors").exists()


def check_resumable(out: Path) -> None:
    if _stopped_before_checkpoint(out):
        raise UserError(f"{out} holds a run that stopped before its first checkpoint (killed, say): there is "
                        "nothing to resume; delete it and train again")  # fmt: skip


def _check_fresh(out: Path) -> None:
    """A new run goes into a directory that does not exist yet or is empty, so that a run that
    fails before its first checkpoint can be removed whole (`_remove_unfinished`)."""
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} is a file, not a directory; choose another --out")
    check_makeable(out)
    if _stopped_before_checkpoint(out):
        raise UserError(f"{out} holds a run that stopped before its first checkpoint (killed, say), so there is "
                        "nothing to resume: delete it, or choose another --out")  # fmt: skip
    if (out / "config.json").exists() or (out / "model.safetensors").exists():
        raise UserError(f"{out} already holds a run; pass --resume to continue it, or choose another --out")
    if out.is_dir() and any(out.iterdir()):
        raise UserError(f"{out} is a directory that is not empty; choose another --out")


def _remove_unfinished(out: Path, existed: bool) -> None:
    """Remove what a new run wrote into `out` before it had a checkpoint to resume from."""
    if not (out / "model.safetensors").exists():
        shutil.rmtree(out, ignore_errors=True)
        if existed:  # it was an empty directory of the user's: leave it as it was
            out.mkdir(parents=True, exist_ok=True)


# --- evaluation -----------------------------------------------------------------------------


@torch.no_grad()
def estimate_val_loss(model: GPT, tokens: np.ndarray, cfg: TrainConfig, block_size: int,
                      device: torch.device) -> float:  # fmt: skip
    """Mean loss over `eval_iters` fixed random batches of the validation split."""
    model.eval()
    losses = []
    for i in range(cfg.eval_iters):
        starts = data_lib.batch_starts(len(tokens), block_size, cfg.batch_size, cfg.seed, data_lib.VAL_STREAM, i)
        x, y = data_lib.get_batch(tokens, block_size, starts)
        with _autocast(device, cfg):
            losses.append(cross_entropy(model(x.to(device)), y.to(device)).item())
    model.train()
    return float(np.mean(losses))


@torch.no_grad()
def split_loss(model: GPT, tokens: np.ndarray, block_size: int, device: torch.device,
               max_tokens: int | None = None, batch_size: int = 32) -> tuple[float, int]:  # fmt: skip
    """Mean loss over non-overlapping windows that cover the split. Returns (loss, tokens scored)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for x, y in data_lib.sequential_batches(tokens, block_size, batch_size, max_tokens):
        total += cross_entropy(model(x.to(device)), y.to(device)).item() * y.numel()
        count += y.numel()
    model.train(was_training)
    return total / count, count


def warn_if_bf16_is_emulated(device: torch.device, cfg: TrainConfig) -> str | None:
    """The warning for bf16 autocast on a CPU without bf16 instructions, where it is ~10x slower."""
    from llmlab.accounting import cpu_has_native_bf16

    if cfg.dtype == "bfloat16" and device.type == "cpu" and cpu_has_native_bf16() is False:
        return ("llmlab: warning: this CPU has no bf16 instructions (no AVX512-BF16 or AMX), so bf16 autocast is "
                "emulated and much slower than float32; drop --dtype bfloat16 here")  # fmt: skip
    return None


def compiled_or_eager(forward: Callable[..., Any]) -> Callable[..., Any]:
    """`torch.compile(forward)`, falling back to `forward` itself if the first call fails.

    torch.compile compiles at the first call and may fail there (no C++ compiler, an unsupported
    platform or operator): training then goes on uncompiled after one warning on stderr, since a
    faster path is no reason to stop. An error that the uncompiled forward raises too is raised,
    and so is any error after a first call that succeeded.
    """
    compiled = torch.compile(forward)
    state = {"fn": compiled, "proven": False}

    def call(*args: Any, **kwargs: Any) -> Any:
        if state["proven"]:
            return state["fn"](*args, **kwargs)
        try:
            out = compiled(*args, **kwargs)
        except Exception as e:
            print(f"llmlab: warning: torch.compile failed ({reason(e)}); training continues without it",
                  file=sys.stderr)  # fmt: skip
            state["fn"] = forward
            out = forward(*args, **kwargs)
        state["proven"] = True
        return out

    return call


def _check_unfinished(out: Path, cfg: TrainConfig, state: dict[str, Any]) -> None:
    """A resume with nothing left to do is an error that says how to train further."""
    if state["step"] >= cfg.max_steps:
        done = (
            f"its {cfg.max_steps} steps"
            if state["step"] == cfg.max_steps
            else (f"{state['step']} steps, and --max-steps {cfg.max_steps} asks for no more")
        )
        raise UserError(f"the run in {out} has done {done}; resume with --max-steps above {state['step']} to "
                        "train further")  # fmt: skip
    if cfg.max_minutes and state["elapsed"] >= 60 * cfg.max_minutes:
        raise UserError(f"the run in {out} has used its {cfg.max_minutes:g} minutes; resume with a larger "
                        "--max-minutes to train further")  # fmt: skip


def _autocast(device: torch.device, cfg: TrainConfig) -> Any:
    if cfg.dtype == "bfloat16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


# --- the loop -------------------------------------------------------------------------------


def train(model_cfg: ModelConfig, train_cfg: TrainConfig, data: str, out: str | Path, *,
          resume: bool = False, tokenizer_from: str | None = None, init_from: str | None = None,
          progress: bool = True, final_eval_tokens: int | None = 1 << 18,
          extra: dict[str, Any] | None = None) -> TrainResult:  # fmt: skip
    """Train a model and write its run directory `out`.

    resume:          continue the run in `out`; the configs passed in are then ignored, except
                     `max_steps`, `max_minutes` and `device`
    tokenizer_from:  reuse another run's tokenizer (a draft model must share its target's)
    init_from:       fine-tune: start from another run's weights, model config and tokenizer
                     (`model_cfg` is then ignored), with a fresh optimiser and `train_cfg`
    """
    out = Path(out)
    d = setup_distributed(train_cfg.device)
    if resume:
        check_resumable(out)
        run = load_run(out)
        train_cfg = replace(run.train_cfg, max_steps=train_cfg.max_steps, max_minutes=train_cfg.max_minutes,
                            device=train_cfg.device)  # fmt: skip
        model, model_cfg, state = run.model, run.model_cfg, load_train_state(out)
        _rebuild_token_cache(run, out, d)  # first, so that a finished run gets its cache back too
        _check_unfinished(out, train_cfg, state)
        splits, loop = _start(model, model_cfg, train_cfg, out, d, state)  # first: a state that does not fit is
        if d.main and train_cfg.max_steps != run.train_cfg.max_steps:  # refused before config.json changes
            saved = replace(run.train_cfg, max_steps=train_cfg.max_steps)  # the schedule's length is the run's
            write_json(out / "config.json", config_json(model_cfg, saved, **run.meta))  # from now on (not minutes)
        stopped_by = loop.run(progress)
    else:
        if d.main:
            _check_fresh(out)
        existed = out.exists()
        try:
            model, model_cfg, splits, loop, stopped_by = _fresh(model_cfg, train_cfg, data, out, tokenizer_from,
                                                                init_from, d, extra, progress)  # fmt: skip
        except BaseException:
            if d.main:
                _remove_unfinished(out, existed)
            raise
    val_loss, val_tokens = split_loss(model, splits.val, model_cfg.block_size, d.device, final_eval_tokens)
    flops = loop.tokens_per_second() * flops_per_token(model_cfg)
    result = TrainResult(
        run_dir=str(out), steps=loop.step, train_loss=loop.recent_train_loss(), val_loss=val_loss,
        val_perplexity=perplexity(val_loss), val_tokens=val_tokens, tokens_per_second=loop.tokens_per_second(),
        flops_per_second=flops, mfu=_mfu(flops / d.world, d.device, train_cfg), elapsed_seconds=loop.elapsed(),
        stopped_by=stopped_by, params=model.num_params(), rank=d.rank, device=d.device.type,
    )  # fmt: skip
    if d.main:
        write_json(out / "summary.json", result.to_json())
        plot_losses(loop.rows, out / "loss.png")
    return result


def _fresh(model_cfg: ModelConfig, train_cfg: TrainConfig, data: str, out: Path, tokenizer_from: str | None,
           init_from: str | None, d: Dist, extra: dict[str, Any] | None, progress: bool,
           ) -> tuple[GPT, ModelConfig, data_lib.TokenSplits, _Loop, str]:  # fmt: skip
    """A new run: its tokenizer, data splits, config and model, trained."""
    base = load_run(init_from) if init_from else None
    if base is not None:
        model_cfg, tokenizer_from = base.model_cfg, init_from
        extra = {**(extra or {}), "init_from": str(init_from)}
    model_cfg, _ = prepare(out, model_cfg, train_cfg, data, tokenizer_from, d, extra or {})
    torch.manual_seed(train_cfg.seed)
    if base is None:
        check_fits_in_memory(model_cfg, d.device)  # n_layers=10⁸ hung in GPT(model_cfg) until killed
    model = base.model if base is not None else GPT(model_cfg)
    splits, loop = _start(model, model_cfg, train_cfg, out, d, None)
    return model, model_cfg, splits, loop, loop.run(progress)


def check_fits_in_memory(cfg: ModelConfig, device: torch.device) -> None:
    """UserError if the model cannot be built in this machine's memory: its fp32 weights (4 bytes a
    parameter, made on the CPU before moving to `device`), and on the CPU training's 16 bytes a
    parameter (weights, gradients and AdamW's two moments, notes §2.3). The count is the formula's,
    one layer times n_layers, so that even an absurd size is refused at once."""
    one = count_params(replace(cfg, n_layers=1))
    params = one + (cfg.n_layers - 1) * (count_params(replace(cfg, n_layers=2)) - one)
    need = params * (16 if device.type == "cpu" else 4)
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if need > memory:
        what = "training it on the CPU needs" if device.type == "cpu" else "its fp32 weights alone need"
        raise UserError(f"the model would have {params:,} parameters: {what} {need / 2**30:,.1f} GiB, and this "
                        f"machine has {memory / 2**30:,.1f} GiB")  # fmt: skip


def _start(model: GPT, model_cfg: ModelConfig, train_cfg: TrainConfig, out: Path, d: Dist,
           state: dict[str, Any] | None) -> tuple[data_lib.TokenSplits, _Loop]:  # fmt: skip
    splits = data_lib.read_splits(out / "data", model_cfg.vocab_size)
    if d.main and (warning := warn_if_bf16_is_emulated(d.device, train_cfg)):
        print(warning, file=sys.stderr)
    model.to(d.device).train()
    return splits, _Loop(model, model_cfg, train_cfg, splits, out, d, state)


def flops_per_token(cfg: ModelConfig) -> float:
    """Exact training FLOPs (forward + backward) per token at full context, notes §2.3."""
    return train_step_flops(cfg, 1, cfg.block_size) / cfg.block_size


def _mfu(flops_per_second: float, device: torch.device, cfg: TrainConfig) -> float | None:
    peak = cached_peak(device.type, cfg.dtype)
    return mfu(flops_per_second, peak) if peak else None


class _Loop:
    """The state of one training run: model, optimiser, step, clock and metrics rows."""

    def __init__(self, model: GPT, model_cfg: ModelConfig, cfg: TrainConfig, splits: data_lib.TokenSplits,
                 out: Path, d: Dist, state: dict[str, Any] | None) -> None:  # fmt: skip
        self.model, self.model_cfg, self.cfg, self.splits, self.out, self.d = model, model_cfg, cfg, splits, out, d
        self.optimizer = make_optimizer(model, cfg)
        self.ddp = (
            nn.parallel.DistributedDataParallel(model, device_ids=[d.device] if d.device.type == "cuda" else None)
            if d.world > 1 else None
        )  # fmt: skip
        forward = self.ddp or model
        self.forward = compiled_or_eager(forward) if cfg.compile else forward
        self.step, self.prev_elapsed, self.train_time, self.rows = 0, 0.0, 0.0, []
        self.tokens_per_step = cfg.batch_size * cfg.grad_accum * d.world * model_cfg.block_size
        torch.manual_seed(cfg.seed + d.rank)  # dropout differs per rank, reproducibly
        if state is not None:
            try:  # a train_state.pt of another run, or a hand-edited one, loads but does not fit
                self.optimizer.load_state_dict(state["optimizer"])
                torch.set_rng_state(state["rng_torch"])
            except (ValueError, KeyError, TypeError, RuntimeError) as e:
                raise RunDirError(f"{out / 'train_state.pt'} does not fit this run ({type(e).__name__}); is it "
                                  "another run's?") from None  # fmt: skip
            self.step, self.prev_elapsed, self.train_time = state["step"], state["elapsed"], state["train_time"]
            self.rows = [r for r in read_metrics(out / "metrics.csv") if r["step"] <= self.step]
        self.start = time.perf_counter()

    def elapsed(self) -> float:
        return self.prev_elapsed + time.perf_counter() - self.start

    def progress(self, elapsed: float) -> float:
        p = self.step / self.cfg.max_steps
        return max(p, elapsed / (60 * self.cfg.max_minutes)) if self.cfg.max_minutes else p

    def tokens_per_second(self) -> float:
        """Over every step of the run, resumed sessions too: train_time counts them all (the
        metrics rows may not, where a damaged metrics.csv was deleted)."""
        return self.step * self.tokens_per_step / self.train_time if self.train_time else 0.0

    def recent_train_loss(self) -> float:
        recent = [r["train_loss"] for r in self.rows[-self.cfg.eval_interval :]]
        return float(np.mean(recent)) if recent else float("nan")

    def run(self, progress: bool) -> str:
        bar = tqdm(total=self.cfg.max_steps, initial=self.step, disable=None if progress and self.d.main else True,
                   unit="step", dynamic_ncols=True)  # fmt: skip
        stopped_by, first = "max_steps", self.step
        with bar, _interrupt_flag() as interrupted:
            while self.step < self.cfg.max_steps:
                elapsed, stop = agreed(self.elapsed(), interrupted(), self.d)  # one clock for all ranks
                if stop and self.step > first:  # Ctrl-C: the step it came in is done (and saved below)
                    stopped_by = "interrupt"
                    break
                if self.cfg.max_minutes and elapsed >= 60 * self.cfg.max_minutes and self.step > first:  # ≥ 1 step
                    stopped_by = "max_minutes"
                    break
                loss, lr, seconds = self.train_step(elapsed)
                self.step += 1
                self.rows.append({"step": self.step, "lr": lr, "train_loss": loss, "val_loss": None,
                                  "tokens_per_s": self.tokens_per_step / seconds,
                                  "elapsed_s": round(self.elapsed(), 3)})  # fmt: skip
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{self.tokens_per_step / seconds:,.0f}")
                if self.step % self.cfg.eval_interval == 0 or self.step == self.cfg.max_steps:
                    self.evaluate_and_save()
                    bar.set_postfix(loss=f"{loss:.3f}", val=f"{self.rows[-1]['val_loss']:.3f}")
        if self.rows and self.rows[-1]["val_loss"] is None:
            self.evaluate_and_save()
        elif stopped_by == "max_minutes" and self.step > first and self.d.main:  # the checkpoint is this step's,
            self.save_state(elapsed)  # saved before the clock ran out: its time must say the minutes are spent
        return stopped_by

    def train_step(self, elapsed: float) -> tuple[float, float, float]:
        """One optimiser step over grad_accum micro-batches, at the learning rate of the step and of
        `elapsed` seconds (with max_minutes). Returns (loss, lr, seconds)."""
        t0 = time.perf_counter()
        cfg, S, device = self.cfg, self.model_cfg.block_size, self.d.device
        lr = lr_at(self.step, self.progress(elapsed), cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        loss_sum = torch.zeros((), device=device)
        for micro in range(cfg.grad_accum):
            x, y = data_lib.train_batch(self.splits.train, S, cfg.batch_size, cfg.seed, self.step, micro,
                                        self.d.rank, self.d.world, cfg.grad_accum)  # fmt: skip
            last = micro == cfg.grad_accum - 1
            sync = nullcontext() if self.ddp is None or last else self.ddp.no_sync()  # sync grads once
            with sync, _autocast(device, cfg):
                loss = cross_entropy(self.forward(x.to(device)), y.to(device)) / cfg.grad_accum
            loss.backward()
            loss_sum += loss.detach()
        if self.ddp is not None:  # log the global batch's loss, not this rank's share
            dist.all_reduce(loss_sum)
            loss_sum /= self.d.world
        loss_value = loss_sum.item()
        if not math.isfinite(loss_value):
            raise TrainingDiverged(f"the loss became {loss_value} at step {self.step + 1}; {self._kept()}")
        clip_and_step(self.optimizer, cfg.grad_clip)
        self.optimizer.zero_grad(set_to_none=True)
        seconds = time.perf_counter() - t0
        self.train_time += seconds
        return loss_value, lr, seconds

    def _kept(self) -> str:
        if (self.out / "model.safetensors").exists():
            return f"the last good checkpoint in {self.out} is kept"
        return f"there was no checkpoint yet, so nothing in {self.out} is kept"

    def evaluate_and_save(self) -> None:
        val = estimate_val_loss(self.model, self.splits.val, self.cfg, self.model_cfg.block_size, self.d.device)
        if not math.isfinite(val):
            raise TrainingDiverged(f"the validation loss became {val} at step {self.step}; {self._kept()}")
        self.rows[-1]["val_loss"] = val
        if self.d.main:
            save_weights(self.out / "model.safetensors", self.model)
            self.save_state()
            write_metrics(self.out / "metrics.csv", self.rows)
        barrier(self.d)

    def save_state(self, elapsed: float | None = None) -> None:
        """What a resume needs besides the weights: step, optimiser, random state and clocks (the
        elapsed time agreed by the ranks, if given, else this process's)."""
        state = {"step": self.step, "optimizer": self.optimizer.state_dict(), "rng_torch": torch.get_rng_state(),
                 "elapsed": self.elapsed() if elapsed is None else elapsed, "train_time": self.train_time}  # fmt: skip
        save_train_state(self.out / "train_state.pt", state)


@contextmanager
def _interrupt_flag() -> Iterator[Any]:
    """Ctrl-C finishes the current step, saves a checkpoint and stops, instead of losing work."""
    hit = []
    try:
        previous = signal.signal(signal.SIGINT, lambda *_: hit.append(True))
    except ValueError:  # not the main thread: leave signals alone
        yield lambda: False
        return
    try:
        yield lambda: bool(hit)
    finally:
        signal.signal(signal.SIGINT, previous)


def plot_losses(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not rows:
        return
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    steps = [r["step"] for r in rows]
    ax.plot(steps, [r["train_loss"] for r in rows], lw=0.8, alpha=0.6, label="train (per step)")
    val = [(r["step"], r["val_loss"]) for r in rows if r["val_loss"] is not None]
    if val:
        ax.plot(*zip(*val, strict=True), "o-", lw=1.5, label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
