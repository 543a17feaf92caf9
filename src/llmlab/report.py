"""`llmlab run`: the tour. One section per notes section, on models trained in the tour itself.

    DIR/notes/        the notes' model (preset `notes`) trained on the data, a normal run directory
    DIR/<name>/       any other model a section trains (reused by later tours)
    DIR/report.html   every section's measured numbers and pictures, self-contained
    DIR/tour.json     the same numbers, machine-readable

A later tour reuses every model trained with the same settings (`retrain=True` trains again).
Each section is a module in `llmlab.sections`; `SECTIONS` lists them in the notes' order.
"""

from __future__ import annotations

import html
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from llmlab.config import preset
from llmlab.run_dir import write_json, write_text
from llmlab.sections import (
    REPORT_MARK,
    Section,
    Tour,
    accounting,
    check_out,
    entropy,
    generation,
    knowledge,
    rejection,
    training,
)

SECTIONS: list[Callable[[Tour], Section]] = [
    training.section,
    entropy.section,
    rejection.section,
    generation.section,
    accounting.section,
    knowledge.section,
]


def run_tour(out: Path, quick: bool = False, data: str = "stdlib", minutes: float | None = None,
             retrain: bool = False, log: Callable[[str], None] = lambda _: None,
             progress: bool = True) -> Tour:  # fmt: skip
    """Train (or reuse) the notes' model, run every section, write report.html and tour.json."""
    t0 = time.perf_counter()
    check_out(out)  # a user's files where the tour writes: refused now, not after minutes of training
    tour = Tour(out, quick, data, log, retrain, progress)
    minutes = minutes if minutes is not None else (0.6 if quick else 4.0)
    p = preset("notes")
    train_cfg = replace(p.train, max_steps=100_000, max_minutes=minutes, eval_interval=250)
    log(f"the notes' model (preset 'notes') on {data!r}, {minutes:g} minutes of training ...")
    tour.notes_dir, tour.notes_summary = tour.trained("notes", p.model, train_cfg, data)
    for make in SECTIONS:
        tour.sections.append(make(tour))
    tour.seconds = time.perf_counter() - t0
    write_text(tour.report, render(tour))
    write_json(out / "tour.json", tour.to_json())
    return tour


def render(tour: Tour) -> str:
    sections = "".join(f"<section><h2>{html.escape(s.title)}</h2>{s.body}</section>" for s in tour.sections)
    timing = f"Tour time: {tour.seconds:.0f} s" + (" (quick)" if tour.quick else "") + _reused(tour)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">{REPORT_MARK}
<style>
body {{ font: 15px/1.5 system-ui, sans-serif; max-width: 60rem; margin: 2rem auto; padding: 0 1rem; }}
table {{ border-collapse: collapse; }}
td, th {{ padding: .2rem .8rem; border-bottom: 1px solid #ddd; text-align: left; }}
pre {{ background: #f6f6f6; padding: .8rem; overflow-x: auto; }} img {{ max-width: 100%; }}
</style></head><body>
<h1>llmlab tour</h1>
<p>The study notes, made real on models trained here. The notes' model:
<code>{html.escape(str(tour.notes_dir))}</code>. {timing}.</p>
{sections}
</body></html>
"""


def _reused(tour: Tour) -> str:
    """The models this tour took from an earlier one: its time does not include their training."""
    if not tour.reused:
        return ""
    names = ", ".join(html.escape(n) for n in tour.reused)
    return f", training excluded: the models {names} were reused from an earlier tour (--retrain trains them again)"
