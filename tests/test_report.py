"""`llmlab run`: the tour trains the notes' model, reports measured numbers, and reuses it."""

from __future__ import annotations

import json

from llmlab.cli import main
from llmlab.report import run_tour


def test_tour_writes_a_report_with_the_measured_numbers_and_reuses_its_model(tmp_path, corpus_file):
    logs: list[str] = []
    tour = run_tour(tmp_path / "tour", quick=True, data=str(corpus_file), minutes=0.04, log=logs.append,
                    progress=False)  # fmt: skip
    summary = json.loads((tour.notes_dir / "summary.json").read_text())
    report = tour.report.read_text()
    assert "Training: cross-entropy" in report and "data:image/png;base64," in report
    assert f"{summary['val_loss']:.4f}" in report  # the number in the report is the measured one
    saved = json.loads((tmp_path / "tour" / "tour.json").read_text())
    assert saved["sections"]["Training: cross-entropy (notes §一)"]["val_loss"] == summary["val_loss"]
    samples = saved["sections"]["Generation: softmax and sampling (notes §2.1)"]["samples"]
    assert set(samples) == {"def "} and len(samples["def "]) > 0  # the corpus has no 'c' for "class "
    config = json.loads((tour.notes_dir / "config.json").read_text())
    assert config["model"]["positions"] == "sinusoidal" and config["tour"]["data"] == str(corpus_file)

    weights = (tour.notes_dir / "model.safetensors").stat().st_mtime_ns
    logs.clear()
    run_tour(tmp_path / "tour", quick=True, data=str(corpus_file), minutes=0.04, log=logs.append, progress=False)
    assert any(line.startswith("reusing") for line in logs)
    assert (tour.notes_dir / "model.safetensors").stat().st_mtime_ns == weights
    logs.clear()  # other settings: the stale model is replaced, not reused
    run_tour(tmp_path / "tour", quick=True, data=str(corpus_file), minutes=0.03, log=logs.append, progress=False)
    assert not any(line.startswith("reusing") for line in logs)


def test_run_command_prints_where_the_report_is(capsys, tmp_path, corpus_file):
    code = main(["run", "--out", str(tmp_path / "t"), "--quick", "--data", str(corpus_file), "--minutes", "0.03",
                 "--json"])  # fmt: skip
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and out["report"] == str(tmp_path / "t" / "report.html")
