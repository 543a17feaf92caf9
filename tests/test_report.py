"""`llmlab run`: the tour trains the notes' model, reports measured numbers, and reuses models."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from llmlab.cli import main
from llmlab.config import preset
from llmlab.report import run_tour
from llmlab.sections import Tour
from tests.conftest import TINY_TRAIN, TINY_VARIANTS


def test_tour_writes_a_report_with_the_measured_numbers(tmp_path, corpus_file, capsys):
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
    assert preset("notes").model == replace(tour_model_config(config), vocab_size=preset("notes").model.vocab_size)

    # the command reuses the model it finds (same settings) and prints where the report is
    weights = (tour.notes_dir / "model.safetensors").stat().st_mtime_ns
    code = main(["run", "--out", str(tmp_path / "tour"), "--quick", "--data", str(corpus_file), "--minutes", "0.04",
                 "--json"])  # fmt: skip
    captured = capsys.readouterr()
    assert code == 0 and json.loads(captured.out)["report"] == str(tmp_path / "tour" / "report.html")
    assert "reusing" in captured.err
    assert (tour.notes_dir / "model.safetensors").stat().st_mtime_ns == weights


def tour_model_config(config: dict):
    from llmlab.config import ModelConfig, from_dict

    return from_dict(ModelConfig, config["model"])


def test_tour_models_are_reused_only_when_trained_with_the_same_settings(tmp_path, corpus_file):
    logs: list[str] = []
    tour = Tour(tmp_path, quick=True, data=str(corpus_file), log=logs.append, progress=False)
    cfg = replace(TINY_TRAIN, max_steps=3, eval_interval=3)
    first, _ = tour.trained("m", TINY_VARIANTS["notes"], cfg, str(corpus_file))
    weights = (first / "model.safetensors").read_bytes()
    tour.trained("m", TINY_VARIANTS["notes"], cfg, str(corpus_file))
    assert logs == [f"reusing {first} (pass --retrain to train it again)"] and tour.reused == ["m"]
    from llmlab.report import render

    assert "training excluded: the models m were reused from an earlier tour" in render(tour)  # its time is not theirs
    assert (first / "model.safetensors").read_bytes() == weights
    logs.clear()
    tour.trained("m", TINY_VARIANTS["notes"], replace(cfg, seed=7), str(corpus_file))  # other settings: retrain
    assert logs == [] and (first / "model.safetensors").read_bytes() != weights
    tour.retrain = True
    tour.trained("m", TINY_VARIANTS["notes"], replace(cfg, seed=7), str(corpus_file))
    assert logs == []


def test_generation_section_shows_each_sampling_setting_as_a_transform_of_softmax(trained_run):
    """Reference: torch.softmax of the model's last logits, and scipy's entropy for H(p)."""
    import numpy as np
    import torch
    from scipy.stats import entropy

    from llmlab.run_dir import load_run
    from llmlab.sections.generation import SETTINGS, distributions, prompts

    run = load_run(trained_run)
    prompt = prompts(run.tokenizer)[0]
    header, rows = distributions(run, prompt, shown=3)
    by_name = {r[0]: r for r in rows}
    assert len(rows) == len(SETTINGS) and header[-2:] == ("tokens with p > 0", "H(p), nats")
    greedy = by_name["greedy (T = 0)"]
    assert greedy[1:5] == ("1.000", "0.000", "0.000", "1") and greedy[-1] == "0.000"
    with torch.no_grad():
        p = torch.softmax(run.model(torch.tensor([run.tokenizer.encode(prompt)]))[0, -1].double(), -1).numpy()
    softmax_row = by_name["T = 1: softmax(logits)"]
    np.testing.assert_allclose([float(x) for x in softmax_row[1:4]], np.sort(p)[::-1][:3], atol=6e-4)
    assert float(softmax_row[-1]) == pytest.approx(entropy(p), abs=6e-4)
    assert by_name["top-k 3"][4] == "3"
    assert float(by_name["T = 0.5"][-1]) < float(softmax_row[-1]) < float(by_name["T = 1.5"][-1])


def test_run_never_replaces_a_users_run_or_files_where_a_tour_model_goes(tmp_path, trained_run, corpus_file, capsys):
    import shutil

    out = tmp_path / "tour"
    shutil.copytree(trained_run, out / "notes")  # a user's run, trained with `llmlab train`
    before = {p.name: p.read_bytes() for p in (out / "notes").iterdir() if p.is_file()}
    (out / "draft").mkdir()
    (out / "draft" / "mine.txt").write_text("keep me")
    code = main(["run", "--out", str(out), "--quick", "--data", str(corpus_file), "--minutes", "0.04"])
    err = capsys.readouterr().err.strip().splitlines()
    refusal = f"llmlab: error: {out / 'notes'} holds something the tour did not make; move it or choose another --out"
    assert code == 2 and err == [refusal]
    assert {p.name: p.read_bytes() for p in (out / "notes").iterdir() if p.is_file()} == before
    shutil.rmtree(out / "notes")
    tour = Tour(out, quick=True, data=str(corpus_file), log=lambda _: None, progress=False)
    from llmlab.errors import UserError

    with pytest.raises(UserError, match="holds something the tour did not make"):
        tour.trained("draft", TINY_VARIANTS["notes"], replace(TINY_TRAIN, max_steps=2), str(corpus_file))
    assert (out / "draft" / "mine.txt").read_text() == "keep me"


@pytest.mark.parametrize("mine", ["report.html", "tour.json", "draft/notes.txt", "bios/config.json",
                                  "entropy/notes.txt", "knowledge"])  # fmt: skip
def test_run_refuses_before_training_to_replace_a_users_report_or_files(tmp_path, corpus_file, capsys, mine):
    """report.html and tour.json are replaced only if an earlier tour wrote them, and a model's or
    a figure's folder only if it holds what the tour writes; the refusal comes before any training
    (a foreign draft/ or bios/ was refused only when its section came, minutes in; report.html and
    tour.json were overwritten)."""
    out = tmp_path / "tour"
    path = out / mine
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("{}" if mine.endswith(".json") else "mine")
    code = main(["run", "--out", str(out), "--quick", "--data", str(corpus_file), "--minutes", "0.04"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "move it or choose another --out" in err[0], err
    assert path.read_text() == ("{}" if mine.endswith(".json") else "mine")
    assert not (out / "notes").exists()  # nothing trained


def test_the_tours_own_report_and_tour_json_are_recognised(tmp_path):
    """What `run_tour` writes passes `check_out` again (so a second tour may replace it)."""
    from llmlab.report import render
    from llmlab.sections import check_out

    tour = Tour(tmp_path, quick=True, data="stdlib", log=lambda _: None, progress=False)
    (tmp_path / "report.html").write_text(render(tour))
    (tmp_path / "tour.json").write_text(json.dumps(tour.to_json()))
    (tmp_path / "entropy").mkdir()
    (tmp_path / "entropy" / "reliability.png").write_bytes(b"\x89PNG")
    check_out(tmp_path)
