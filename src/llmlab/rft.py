"""Best-of-N and rejection-sampling fine-tuning (notes §二): rejection sampling with a verifier.

Draw a completion y ~ π(·|x) from the model and keep it if the verifier accepts it: this is the
rejection sampler of `llmlab.rejection` with target p(y) = π(y|x)·1[y correct] / Z, proposal
q = π and envelope M = 1/Z, for then p/(M·q) = 1[y correct]. The kept completions are therefore
exact draws from the model conditioned on being right, and the acceptance rate estimates
Z = P(correct | x), the model's sampled pass@1.

    best-of-N   draw N completions, return the one a scoring function ranks highest
                (Stiennon et al. 2020, arXiv 2009.01325; Nakano et al. 2021, arXiv 2112.09332)
    RFT         for each training prompt draw N completions, keep those the verifier accepts,
                fine-tune on the kept ones, repeat (Zelikman et al. 2022, STaR, arXiv 2203.14465;
                Touvron et al. 2023, Llama 2 §3.2.3, arXiv 2307.09288; Yuan et al. 2023,
                arXiv 2308.01825)

Every round reports its acceptance rate and the held-out pass@1 with a Wilson 95% interval
(Wilson 1927): p̂ ± z·√(p̂(1−p̂)/n + z²/4n²), centred at (p̂ + z²/2n), divided by 1 + z²/n.
Fine-tuning is `llmlab.train.train(init_from=...)` on a text file of the kept samples.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from llmlab.errors import UserError
from llmlab.model import GPT
from llmlab.run_dir import Run, load_run, write_json
from llmlab.sampling import SamplingConfig, generate_batch
from llmlab.tasks import Example, Task, Verifier
from llmlab.tokenizer import Tokenizer

Z95 = 1.959963984540054  # the 97.5% quantile of the standard normal
SAMPLE = SamplingConfig()  # temperature 1: the model's own distribution
GREEDY = SamplingConfig(temperature=0.0)


def wilson_interval(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion k/n."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (0.0 if k == 0 else centre - half), (1.0 if k == n else centre + half)  # exact ends, no rounding


# --- sampling and verifying ------------------------------------------------------------------


def completions(model: GPT, tokenizer: Tokenizer, prompts: Sequence[str], n: int, max_new_tokens: int,
                cfg: SamplingConfig, seed: int) -> list[list[str]]:  # fmt: skip
    """n completions of each prompt, each cut at its first newline → [len(prompts)][n].

    All n·len(prompts) rows are decoded as batches (rows of equal prompt length together)."""
    texts = generate_batch(model, tokenizer, [p for p in prompts for _ in range(n)], max_new_tokens, cfg, seed)
    cut = [t.split("\n", 1)[0] for t in texts]
    return [cut[i * n : (i + 1) * n] for i in range(len(prompts))]


def verify(verifier: Verifier, example: Example, completion: str) -> tuple[bool, str | None]:
    """(accepted, error). A verifier that raises, or returns something other than a bool,
    rejects the sample and the error is reported; it never stops the run."""
    try:
        result = verifier(example.prompt, completion, example.answer)
    except (Exception, SystemExit) as e:  # sys.exit() in a verifier ended the run silently; Ctrl-C still stops it
        return False, f"{type(e).__name__}: {e}"
    if not isinstance(result, bool | np.bool_):
        return False, f"the verifier returned {result!r}, not a bool"
    return bool(result), None


@dataclass
class Verdicts:
    """The outcome of verifying a set of completions."""

    accepted: list[tuple[Example, str]] = field(default_factory=list)
    drawn: int = 0
    errors: int = 0
    first_error: str | None = None

    def add(self, example: Example, completion: str, ok: bool, error: str | None) -> None:
        self.drawn += 1
        if ok:
            self.accepted.append((example, completion))
        if error is not None:
            self.errors += 1
            self.first_error = self.first_error or f"{error} (prompt {example.prompt!r})"

    @property
    def rate(self) -> float:
        return len(self.accepted) / self.drawn if self.drawn else float("nan")


def rejection_step(model: GPT, tokenizer: Tokenizer, examples: Sequence[Example], verifier: Verifier, n: int,
                   max_new_tokens: int, cfg: SamplingConfig, seed: int) -> Verdicts:  # fmt: skip
    """Draw n completions per example and keep those the verifier accepts."""
    verdicts = Verdicts()
    drawn = completions(model, tokenizer, [e.prompt for e in examples], n, max_new_tokens, cfg, seed)
    for example, ys in zip(examples, drawn, strict=True):
        for y in ys:
            verdicts.add(example, y, *verify(verifier, example, y))
    return verdicts


# --- best-of-N --------------------------------------------------------------------------------


@dataclass
class BestOfN:
    best: str
    best_score: float
    completions: list[str]
    scores: list[float]


def select_best(ys: Sequence[str], score: Callable[[str], float]) -> BestOfN:
    """The highest-scoring completion (the first of equals)."""
    scores = [float(score(y)) for y in ys]
    i = int(np.argmax(scores))
    return BestOfN(ys[i], scores[i], list(ys), scores)


def best_of_n(model: GPT, tokenizer: Tokenizer, prompt: str, n: int, score: Callable[[str], float],
              max_new_tokens: int = 32, cfg: SamplingConfig = SAMPLE, seed: int = 0) -> BestOfN:  # fmt: skip
    """Draw n completions of `prompt` and return the one `score` ranks highest."""
    if n < 1:
        raise UserError(f"best-of-N needs N >= 1, got {n}")
    return select_best(completions(model, tokenizer, [prompt], n, max_new_tokens, cfg, seed)[0], score)


# --- evaluation -----------------------------------------------------------------------------


@dataclass
class Accuracy:
    """Held-out accuracy: the share of prompts whose (selected) completion the verifier accepts."""

    correct: int
    total: int
    errors: int  # samples whose verifier raised (counted as wrong)

    @property
    def rate(self) -> float:
        return self.correct / self.total

    @property
    def ci95(self) -> tuple[float, float]:
        return wilson_interval(self.correct, self.total)

    def to_json(self) -> dict[str, Any]:
        lo, hi = self.ci95
        return {"rate": self.rate, "ci95": [lo, hi], "correct": self.correct, "total": self.total,
                "verifier_errors": self.errors}  # fmt: skip


def pass_at_1(model: GPT, tokenizer: Tokenizer, task: Task, verifier: Verifier, cfg: SamplingConfig,
              seed: int) -> Accuracy:  # fmt: skip
    """One completion per held-out prompt, drawn with `cfg`; the share the verifier accepts."""
    v = rejection_step(model, tokenizer, task.heldout, verifier, 1, task.max_new_tokens, cfg, seed)
    return Accuracy(len(v.accepted), v.drawn, v.errors)


def best_of_n_accuracy(model: GPT, tokenizer: Tokenizer, task: Task, verifier: Verifier, n: int,
                       cfg: SamplingConfig, seed: int) -> Accuracy:  # fmt: skip
    """Best-of-N on the held-out prompts with the verifier as the scoring function (1 right,
    0 wrong): a prompt counts as solved if its selected completion is right."""
    drawn = completions(model, tokenizer, [e.prompt for e in task.heldout], n, task.max_new_tokens, cfg, seed)
    correct, errors = 0, 0
    for example, ys in zip(task.heldout, drawn, strict=True):
        verdicts = [verify(verifier, example, y) for y in ys]
        errors += sum(err is not None for _, err in verdicts)
        by_completion = dict(zip(ys, (float(ok) for ok, _ in verdicts), strict=False))
        correct += select_best(ys, by_completion.__getitem__).best_score == 1.0
    return Accuracy(correct, len(task.heldout), errors)


# --- the RFT loop -----------------------------------------------------------------------------


@dataclass
class RoundResult:
    round: int
    drawn: int
    kept: int
    acceptance_rate: float
    verifier_errors: int
    first_error: str | None
    heldout: dict[str, Any]  # Accuracy.to_json() after this round's fine-tuning
    run_dir: str
    train_loss: float


@dataclass
class RFTResult:
    out: str
    task: str
    verifier: str
    samples: int
    baseline: dict[str, Any]  # held-out Accuracy.to_json() of the starting model
    rounds: list[RoundResult]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class RFTConfig:
    samples: int = 8  # N completions per training prompt
    rounds: int = 1
    prompts: int | None = None  # training prompts sampled per round (default: all)
    steps: int = 300  # fine-tuning steps per round
    lr: float = 1e-3
    sampling: SamplingConfig = SAMPLE  # how completions are drawn (temperature 1)
    eval_sampling: SamplingConfig = SAMPLE  # pass@1: one sample per held-out prompt, same temperature
    seed: int = 0


def rft(run: str | Path, task: Task, verifier: Verifier, verifier_name: str, out: str | Path,
        cfg: RFTConfig = RFTConfig(), log: Callable[[str], None] = lambda _: None) -> RFTResult:  # fmt: skip
    """Rejection-sampling fine-tuning of the run in `run`; writes round runs under OUT/rounds/
    and the last round's model into OUT itself, so OUT is a run directory."""
    out = Path(out)
    _check_args(Path(run), out, cfg)
    current = load_run(run)
    baseline = pass_at_1(current.model, current.tokenizer, task, verifier, cfg.eval_sampling, cfg.seed)
    log(f"round 0: held-out pass@1 {format_accuracy(baseline.to_json())}")
    result = RFTResult(str(out), task.name, verifier_name, cfg.samples, baseline.to_json(), [])
    for r in range(1, cfg.rounds + 1):
        round_result, current = rft_round(current, task, verifier, out / "rounds" / f"round-{r}", r, cfg, log)
        result.rounds.append(round_result)
    _publish(Path(result.rounds[-1].run_dir), out)
    write_json(out / "rft.json", result.to_json())
    return result


def rft_round(run: Run, task: Task, verifier: Verifier, round_dir: Path, r: int, cfg: RFTConfig,
              log: Callable[[str], None]) -> tuple[RoundResult, Run]:  # fmt: skip
    """Sample, keep what the verifier accepts, fine-tune on it, measure held-out pass@1."""
    from llmlab.train import train

    rng = random.Random(cfg.seed * 1000 + r)
    prompts = rng.sample(task.train, min(cfg.prompts or len(task.train), len(task.train)))
    v = rejection_step(run.model, run.tokenizer, prompts, verifier, cfg.samples, task.max_new_tokens, cfg.sampling,
                       cfg.seed + r)  # fmt: skip
    log(f"round {r}: kept {len(v.accepted):,} of {v.drawn:,} samples ({v.rate:.1%})"
        + (f"; {v.errors} verifier errors, first: {v.first_error}" if v.errors else ""))  # fmt: skip
    if not v.accepted:
        why = f"; {v.errors} verifier errors, first: {v.first_error}" if v.errors else ""
        raise UserError(f"round {r} kept no sample (0 of {v.drawn} passed the verifier{why}), so there is nothing "
                        "to fine-tune on; draw more --samples, or start from a stronger model")  # fmt: skip
    data = round_dir.parent / f"kept-{r}.txt"
    data.parent.mkdir(parents=True, exist_ok=True)
    data.write_text(kept_text(v.accepted, run.model_cfg.block_size, rng), encoding="utf-8")
    train_cfg = replace(run.train_cfg, max_steps=cfg.steps, max_minutes=None, lr=cfg.lr, min_lr=cfg.lr / 10,
                        warmup_steps=min(20, cfg.steps // 10), eval_interval=cfg.steps, eval_iters=5,
                        seed=cfg.seed + r)  # fmt: skip
    trained = train(run.model_cfg, train_cfg, str(data), round_dir, init_from=str(run.path), progress=False,
                    final_eval_tokens=1 << 14, extra={"rft_round": r})  # fmt: skip
    tuned = load_run(round_dir)
    held = pass_at_1(tuned.model, tuned.tokenizer, task, verifier, cfg.eval_sampling, cfg.seed)
    log(f"round {r}: held-out pass@1 {format_accuracy(held.to_json())}")
    result = RoundResult(r, v.drawn, len(v.accepted), v.rate, v.errors, v.first_error, held.to_json(),
                         str(round_dir), trained.train_loss)  # fmt: skip
    return result, tuned


def kept_text(kept: Sequence[tuple[Example, str]], block_size: int, rng: random.Random) -> str:
    """The kept samples as training text, "prompt + completion" per line, shuffled. Repeated
    (whole epochs) until both splits of `train` hold a full context window."""
    lines = [f"{e.prompt}{y}\n" for e, y in kept]
    rng.shuffle(lines)
    text = "".join(lines)
    copies = math.ceil(20 * (block_size + 1) / max(1, len(text)))  # val = the last 10% ≥ 2 windows
    return text * max(1, copies)


def _check_args(run: Path, out: Path, cfg: RFTConfig) -> None:
    if cfg.samples < 1 or cfg.rounds < 1 or cfg.steps < 1:
        raise UserError(f"--samples, --rounds and --steps must be at least 1, got {cfg.samples}, {cfg.rounds}, "
                        f"{cfg.steps}")  # fmt: skip
    if cfg.prompts is not None and cfg.prompts < 1:
        raise UserError(f"--prompts must be at least 1, got {cfg.prompts}")
    if not 0 < cfg.lr < math.inf:  # also NaN; checked before round 0 samples, not at its fine-tuning
        raise UserError(f"--lr must be a positive finite number, got {cfg.lr}")
    if out.resolve() == run.resolve():
        raise UserError(f"--out {str(out)!r} is the source run; RFT writes a new run and never overwrites its source")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--out {str(out)!r} already exists and is not empty; choose a new directory")


def _publish(last: Path, out: Path) -> None:
    """Copy the last round's run files into OUT, each written atomically."""
    import shutil

    from llmlab.run_dir import atomic_write

    for name in ("config.json", "tokenizer.json", "model.safetensors", "summary.json", "metrics.csv", "loss.png"):
        if (last / name).exists():
            atomic_write(out / name, lambda tmp, src=last / name: shutil.copyfile(src, tmp))


def format_accuracy(h: dict[str, Any]) -> str:
    """0.312 (95% CI 0.272–0.355, 156/500), and ", 12 verifier errors" where the verifier failed
    on some samples (each counted as rejected)."""
    lo, hi = h["ci95"]
    errors = f", {h['verifier_errors']:,} verifier errors" if h.get("verifier_errors") else ""
    return f"{h['rate']:.3f} (95% CI {lo:.3f}–{hi:.3f}, {h['correct']}/{h['total']}){errors}"
