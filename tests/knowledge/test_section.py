"""The tour's knowledge section: its numbers are the measured ones, and its model is reused."""

from __future__ import annotations

from dataclasses import replace

from llmlab import bios
from llmlab.config import preset
from llmlab.knowledge import edit as ed
from llmlab.knowledge import scores as sc
from llmlab.run_dir import load_run
from llmlab.sections import Tour
from llmlab.sections import knowledge as ks
from tests.conftest import TINY_TRAIN, TINY_VARIANTS


def tiny_config(quick: bool):
    model_cfg = replace(TINY_VARIANTS["nanogpt-shakespeare-char"], block_size=64)
    train_cfg = replace(TINY_TRAIN, tokenizer="bpe", bpe_vocab=300, max_steps=20, eval_interval=20)
    return "bios:people=10,augment=multi+fullname,part=mixed", model_cfg, train_cfg


def test_section_reports_what_it_measured_and_reuses_its_model(tmp_path, monkeypatch):
    monkeypatch.setattr(ks, "config", tiny_config)
    monkeypatch.setattr(ks, "EDITS", {True: 2, False: 2})
    monkeypatch.setitem(ed.DEFAULTS, "rome", replace(ed.DEFAULTS["rome"], steps=3))  # wiring, not quality
    logs: list[str] = []
    tour = Tour(tmp_path, quick=True, data="stdlib", log=logs.append, progress=False)
    section = ks.section(tour)
    f = section.figures
    assert f["rome"]["edits"] == 2 and f["edit"]["layer"] == 0
    assert f"{f['accuracy']['completion']['all']:.1%}" in section.body
    assert f"{f['trace']['p_clean']:.3f}" in section.body and f"{f['rome']['seconds_per_edit']:.2f} s" in section.body
    assert section.body.count("data:image/png;base64,") == 3  # the three heat maps
    assert sorted(p.name for p in (tmp_path / "knowledge").iterdir()) == ["trace_attn.png", "trace_mlp.png",
                                                                          "trace_resid.png"]  # fmt: skip
    assert len(f["edit"]["rows"]) == 5 and f["edit"]["rows"][0][0].endswith(" was born in")
    rows = f["rome_by_layer"]  # the same edits at layers 0 and 1: the default's row is the scores above
    assert [r["layer"] for r in rows] == [0, 1] and rows[0] == {
        "layer": 0,
        **{k: f["rome"][k] for k in (*ks.SCORES, "fluency")},
    }
    assert "<h3>ROME at each layer</h3>" in section.body and f"{rows[1]['locality']:.1%}" in section.body
    assert f"by layer: {ks._layers_line(rows)}" in logs[-1]
    logs.clear()
    ks.section(tour)
    assert any(line.startswith("reusing") for line in logs)
    assert preset("nanogpt-shakespeare-char").model.positions == "learned"  # the section's model family


def test_by_layer_scores_each_layer_as_knowledge_eval_does(bios_run, monkeypatch):
    """Each row is what `knowledge eval RUN --method rome --layer L --edits 2` scores (the same
    cases); the layer already measured is not edited again."""
    run = load_run(bios_run)
    cases = sc.random_cases(bios.world_of(run.meta["data"]), 2)
    fast = replace(ed.DEFAULTS["rome"], steps=3)
    params, stats, prompts = sc.prepare_edits(run, "rome", fast)
    measured = sc.evaluate(run.model, run.tokenizer, cases, "rome", params, stats, "single", prompts)
    edited_at, evaluate = [], sc.evaluate
    monkeypatch.setattr(sc, "evaluate", lambda *a, **k: edited_at.append(a[4].layers) or evaluate(*a, **k))
    rows = ks.by_layer(run, cases, params, stats, prompts, measured)
    assert [r["layer"] for r in rows] == [0, 1] and params.layers == (0,) and edited_at == [(1,)]
    for layer in (0, 1):
        cli = sc.evaluate_run(bios_run, "rome", None, n_edits=2, params=replace(fast, layers=(layer,)))
        assert rows[layer] == {"layer": layer, **{k: cli[k] for k in (*ks.SCORES, "fluency")}}
