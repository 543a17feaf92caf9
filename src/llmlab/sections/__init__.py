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
