"""`llmlab run`: the tour. One section per notes section, on a model trained in the tour itself.

    DIR/notes/        the notes' model (preset `notes`) trained on the data, a normal run directory
    DIR/report.html   every section's measured numbers and pictures, self-contained
    DIR/tour.json     the same numbers, machine-readable

A later run of the tour reuses the model in DIR/notes (pass `retrain=True` to train again).
Each section is a function `(Tour) -> Section`; the work that builds a notes section adds its
function to `SECTIONS`.
"""

from __future__ import annotations

import base64
import html
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from llmlab.config import preset
from llmlab.errors import RunDirError, UserError
from llmlab.run_dir import check_run_dir, load_run, write_json, write_text
from llmlab.sampling import SamplingConfig, generate_text
from llmlab.tokenizer import Tokenizer
from llmlab.train import train

SAMPLE_PROMPTS = ("def ", "class ", "import ")


@dataclass
class Section:
    title: str
    body: str  # HTML
    figures: dict[str, Any] = field(default_factory=dict)  # the section's numbers, for tour.json


@dataclass
class Tour:
    out: Path
    quick: bool
    model_dir: Path
    train: dict[str, Any]  # summary.json of the notes' model
    log: Callable[[str], None]
    sections: list[Section] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def report(self) -> Path:
        return self.out / "report.html"

    def to_json(self) -> dict[str, Any]:
        return {
            "report": str(self.report), "model_dir": str(self.model_dir), "quick": self.quick,
            "seconds": round(self.seconds, 1),
            "sections": {s.title: s.figures for s in self.sections},
        }  # fmt: skip


def run_tour(out: Path, quick: bool = False, data: str = "stdlib", minutes: float | None = None,
             retrain: bool = False, log: Callable[[str], None] = lambda _: None,
             progress: bool = True) -> Tour:  # fmt: skip
    t0 = time.perf_counter()
    model_dir = out / "notes"
    summary = _trained_summary(model_dir)
    if summary is not None and not retrain:
        log(f"reusing the notes' model in {model_dir} (pass --retrain to train it again)")
    else:
        minutes = minutes if minutes is not None else (0.6 if quick else 4.0)
        log(f"training the notes' model (preset 'notes') on {data!r} for {minutes:g} minutes ...")
        shutil.rmtree(model_dir, ignore_errors=True)  # an unfinished tour model, never a user's run
        p = preset("notes")
        train_cfg = replace(p.train, max_steps=100_000, max_minutes=minutes, eval_interval=250)
        summary = train(p.model, train_cfg, data, model_dir, progress=progress,
                        extra={"preset": "notes", "tour": True}).to_json()  # fmt: skip
    tour = Tour(out, quick, model_dir, summary, log)
    for make in SECTIONS:
        tour.sections.append(make(tour))
    tour.seconds = time.perf_counter() - t0
    write_text(tour.report, render(tour))
    write_json(out / "tour.json", tour.to_json())
    return tour


def _trained_summary(model_dir: Path) -> dict[str, Any] | None:
    """The summary of a finished tour model in `model_dir`, or None if there is none."""
    try:
        check_run_dir(model_dir)
        return json.loads((model_dir / "summary.json").read_text())
    except (RunDirError, OSError, ValueError):
        return None


# --- sections ---------------------------------------------------------------------------------


def section_training(tour: Tour) -> Section:
    s = tour.train
    rows = [
        ("model", "preset notes: sinusoidal positions, ReLU FFN, post-LN, tied output layer"),
        ("parameters", f"{s['params']:,}"),
        ("steps", f"{s['steps']:,} in {s['elapsed_seconds']:.0f} s ({s['stopped_by']})"),
        ("tokens/s", f"{s['tokens_per_second']:,.0f}"),
        ("validation cross-entropy", f"{s['val_loss']:.4f} nats/token on {s['val_tokens']:,} tokens"),
        ("validation perplexity", f"{s['val_perplexity']:.3f}"),
    ]
    tour.log(f"val loss {s['val_loss']:.4f} nats/token, perplexity {s['val_perplexity']:.2f}")
    body = (
        "<p>The training objective is the cross-entropy L = −Σ y log p of the next token "
        "(notes §一), averaged over every position; perplexity is exp(L).</p>"
        + _table(rows) + _img(tour.model_dir / "loss.png", "loss curve")
    )  # fmt: skip
    return Section("Training: cross-entropy (notes §一)", body, dict(s))


def section_samples(tour: Tour) -> Section:
    run = load_run(tour.model_dir)
    n = 150 if tour.quick else 300
    cfg = SamplingConfig(temperature=0.8)
    samples = {p: generate_text(run.model, run.tokenizer, p, n, cfg, seed=i).text
               for i, p in enumerate(_prompts(run.tokenizer))}  # fmt: skip
    for p, text in samples.items():
        tour.log(f"\n--- sample: {p!r} ---\n{p}{text}")
    body = f"<p>Temperature 0.8, KV cache, {n} new tokens per prompt.</p>" + "".join(
        f"<pre><b>{html.escape(p)}</b>{html.escape(t)}</pre>" for p, t in samples.items()
    )
    return Section("Generation: softmax and sampling (notes §2.1)", body, {"samples": samples})


def _prompts(tokenizer: Tokenizer) -> list[str]:
    """The sample prompts this tokenizer can encode (a character model trained on other text
    may lack their letters); a newline, or the first character of the vocabulary, otherwise."""
    ok = [p for p in SAMPLE_PROMPTS if _encodable(tokenizer, p)]
    return ok or (["\n"] if _encodable(tokenizer, "\n") else [tokenizer.decode([0])])


def _encodable(tokenizer: Tokenizer, text: str) -> bool:
    try:
        tokenizer.encode(text)
    except UserError:
        return False
    return True


SECTIONS: list[Callable[[Tour], Section]] = [section_training, section_samples]


# --- HTML -------------------------------------------------------------------------------------


def render(tour: Tour) -> str:
    sections = "".join(f"<section><h2>{html.escape(s.title)}</h2>{s.body}</section>" for s in tour.sections)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>llmlab tour</title>
<style>
body {{ font: 15px/1.5 system-ui, sans-serif; max-width: 60rem; margin: 2rem auto; padding: 0 1rem; }}
table {{ border-collapse: collapse; }} td {{ padding: .2rem .8rem; border-bottom: 1px solid #ddd; }}
pre {{ background: #f6f6f6; padding: .8rem; overflow-x: auto; }} img {{ max-width: 100%; }}
</style></head><body>
<h1>llmlab tour</h1>
<p>The study notes, made real on a model trained here. Model: <code>{html.escape(str(tour.model_dir))}</code>.
Tour time: {tour.seconds:.0f} s{" (quick)" if tour.quick else ""}.</p>
{sections}
</body></html>
"""


def _table(rows: list[tuple[str, str]]) -> str:
    cells = "".join(f"<tr><td>{html.escape(k)}</td><td>{html.escape(v)}</td></tr>" for k, v in rows)
    return f"<table>{cells}</table>"


def _img(path: Path, alt: str) -> str:
    if not path.exists():
        return ""
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<p><img alt="{html.escape(alt)}" src="data:image/png;base64,{data}"></p>'
