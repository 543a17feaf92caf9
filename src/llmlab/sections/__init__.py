"""The tour's sections: one module per notes section, each a function `section(tour) -> Section`.

`llmlab.report` runs them in order on one `Tour`, which holds the notes' model trained at the
start and trains (or reuses) any other model a section needs with `tour.trained(...)`.
"""

from __future__ import annotations

import base64
import html
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmlab.config import ModelConfig, TrainConfig, to_dict
from llmlab.errors import RunDirError, UserError
from llmlab.run_dir import check_run_dir


@dataclass
class Section:
    title: str
    body: str  # HTML
    figures: dict[str, Any] = field(default_factory=dict)  # the section's numbers, for tour.json


@dataclass
class Tour:
    out: Path
    quick: bool
    data: str  # the text source of the notes' model
    log: Callable[[str], None]
    retrain: bool = False
    progress: bool = True
    notes_dir: Path = Path()  # the notes' model, trained first
    notes_summary: dict[str, Any] = field(default_factory=dict)
    sections: list[Section] = field(default_factory=list)
    seconds: float = 0.0
    reused: list[str] = field(default_factory=list)  # models taken from an earlier tour, not trained in this one

    @property
    def report(self) -> Path:
        return self.out / "report.html"

    def trained(self, name: str, model_cfg: ModelConfig, train_cfg: TrainConfig, data: str,
                tokenizer_from: str | None = None) -> tuple[Path, dict[str, Any]]:  # fmt: skip
        """Train a model into DIR/name, or reuse the finished one there if it was trained with
        the same configs and data. Returns (run directory, its summary.json)."""
        from llmlab.train import train

        run_dir = self.out / name
        key = {"model": to_dict(model_cfg), "train": to_dict(train_cfg), "data": data, "tokenizer_from": tokenizer_from}
        summary = _finished(run_dir, key)
        if summary is not None and not self.retrain:
            self.log(f"reusing {run_dir} (pass --retrain to train it again)")
            self.reused.append(name)
            return run_dir, summary
        _refuse_foreign(run_dir)
        shutil.rmtree(run_dir, ignore_errors=True)  # a tour model of other settings, never a user's run
        result = train(model_cfg, train_cfg, data, run_dir, tokenizer_from=tokenizer_from, progress=self.progress,
                       extra={"tour": key})  # fmt: skip
        return run_dir, result.to_json()

    def to_json(self) -> dict[str, Any]:
        return {
            "report": str(self.report), "model_dir": str(self.notes_dir), "quick": self.quick,
            "seconds": round(self.seconds, 1), "reused": self.reused,
            "sections": {s.title: s.figures for s in self.sections},
        }  # fmt: skip


MODELS = ("notes", "draft", "bios")  # the runs `Tour.trained` writes into --out: the report's, rejection's, knowledge's
FIGURES = ("entropy", "knowledge")  # folders of the PNGs the entropy and knowledge sections draw
REPORT_MARK = "<title>llmlab tour</title>"  # in the head of every report.html the tour writes


def check_out(out: Path) -> None:
    """Raise UserError, before any training, if the tour would replace in `out` anything it did
    not make: a user's run or files where a model goes, a report.html or tour.json that is not
    an earlier tour's, or a figure folder holding anything but PNGs."""
    for name in MODELS:
        _refuse_foreign(out / name)
    _refuse_foreign_file(out / "report.html", lambda text: REPORT_MARK in text[:500])
    _refuse_foreign_file(out / "tour.json", _is_tour_json)
    for name in FIGURES:
        folder = out / name
        if folder.exists() and (not folder.is_dir() or any(p.suffix != ".png" or not p.is_file()
                                                           for p in folder.iterdir())):  # fmt: skip
            raise UserError(f"{folder} holds something the tour did not make; move it or choose another --out")


def _refuse_foreign_file(path: Path, is_ours: Callable[[str], bool]) -> None:
    if not path.exists():
        return
    try:
        if path.is_file() and is_ours(path.read_text(encoding="utf-8")):
            return
    except (OSError, UnicodeDecodeError):
        pass
    raise UserError(f"{path} is not the tour's own; move it or choose another --out")


def _is_tour_json(text: str) -> bool:
    try:
        saved = json.loads(text)
    except ValueError:
        return False
    return isinstance(saved, dict) and {"report", "sections"} <= saved.keys()


def _refuse_foreign(run_dir: Path) -> None:
    """Raise UserError unless `run_dir` is absent, empty or a model an earlier tour trained:
    the tour replaces its own models, never a user's run or files."""
    if not run_dir.exists() or (run_dir.is_dir() and not any(run_dir.iterdir())):
        return
    try:
        config = json.loads((run_dir / "config.json").read_text())
        if isinstance(config, dict) and "tour" in config:
            return
    except (OSError, ValueError):
        pass
    raise UserError(f"{run_dir} holds something the tour did not make; move it or choose another --out")


def _finished(run_dir: Path, key: dict[str, Any]) -> dict[str, Any] | None:
    """summary.json of a finished tour model trained with `key`, else None."""
    try:
        check_run_dir(run_dir)
        if json.loads((run_dir / "config.json").read_text()).get("tour") != key:
            return None
        return json.loads((run_dir / "summary.json").read_text())
    except (RunDirError, OSError, ValueError):
        return None


# --- HTML helpers -----------------------------------------------------------------------------


def html_table(rows: list[tuple[str, str]], header: tuple[str, ...] | None = None) -> str:
    head = "<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>" if header else ""
    cells = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table>{head}{cells}</table>"


def html_img(path: Path, alt: str) -> str:
    """A PNG embedded in the page, so report.html stays self-contained."""
    if not path.exists():
        return ""
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<p><img alt="{html.escape(alt)}" src="data:image/png;base64,{data}"></p>'
