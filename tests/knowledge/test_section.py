"""The tour's knowledge section: its numbers are the measured ones, and its model is reused."""

from __future__ import annotations

from dataclasses import replace

from llmlab.config import preset
from llmlab.knowledge import edit as ed
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
    logs.clear()
    ks.section(tour)
    assert any(line.startswith("reusing") for line in logs)
    assert preset("nanogpt-shakespeare-char").model.positions == "learned"  # the section's model family
