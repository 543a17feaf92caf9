"""`llmlab knowledge locate|neurons|edit|eval` on a tiny bios model: --json, files written, bad input."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llmlab import bios
from llmlab.run_dir import load_run
from tests.conftest import run_cli


def digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}  # fmt: skip


def a_fact(run: Path, attribute: str = "birth_city", new: str = "Denver") -> tuple[str, str, str]:
    person = bios.world_of(load_run(run).meta["data"]).people[0]
    target = new if person.facts[attribute] != new else "Boston"
    return bios.prompt(person, attribute), person.name, target


def test_locate_prints_the_peaks_and_writes_heat_maps(capsys, bios_run, tmp_path):
    prompt, subject, _ = a_fact(bios_run)
    person = bios.world_of(load_run(bios_run).meta["data"]).person(subject)
    argv = ["knowledge", "locate", str(bios_run), "--prompt", prompt, "--subject", subject, "--target",
            person.facts["birth_city"], "--samples", "2", "--out", str(tmp_path / "maps")]  # fmt: skip
    code, out, _ = run_cli(capsys, *argv, "--json")
    result = json.loads(out)
    assert code == 0 and set(result["peaks"]) == {"resid", "mlp", "attn"}
    assert 0 <= result["p_corrupt"] <= 1 and 0 <= result["p_clean"] <= 1
    assert len(result["restored"]["mlp"]) == len(result["tokens"])
    assert all(Path(p).read_bytes().startswith(b"\x89PNG") for p in result["plots"])
    code, out, _ = run_cli(capsys, *argv)
    assert code == 0 and "peak, mlp" in out and "heat maps:" in out


def test_locate_facts_averages_the_traces_by_token_role(capsys, bios_run, tmp_path):
    """--facts N: the mean indirect effect per role and layer, each role's value within the range of
    effects a probability difference can have, heat maps written; a non-bios run is refused."""
    argv = ["knowledge", "locate", str(bios_run), "--facts", "4", "--samples", "2", "--out", str(tmp_path / "avg")]
    code, out, _ = run_cli(capsys, *argv, "--json")
    result = json.loads(out)
    assert code == 0 and result["facts"] == 4 and result["roles"][2] == "last subject token"
    for kind in ("resid", "mlp", "attn"):
        grid = result["effects"][kind]
        assert len(grid) == 6 and all(len(row) == 2 for row in grid)
        assert all(-1 <= x <= 1 for row in grid for x in row if x is not None)
        assert result["peaks"][kind]["role"] in result["roles"]
    assert all(Path(p).read_bytes().startswith(b"\x89PNG") for p in result["plots"])
    code, out, _ = run_cli(capsys, *argv[:-1], str(tmp_path / "avg2"))
    assert code == 0 and "last subject token" in out and "peak, mlp" in out


def test_neurons_lists_the_most_active_memories_of_every_layer(capsys, bios_run):
    code, out, _ = run_cli(capsys, "knowledge", "neurons", str(bios_run), "--prompt", "Anya was born in", "--top", "2",
                           "--json")  # fmt: skip
    layers = json.loads(out)["layers"]
    assert code == 0 and len(layers) == 2 and all(len(ms) == 2 for ms in layers)
    assert layers[0][0]["activation"] >= layers[0][1]["activation"]


def test_edit_writes_a_new_run_and_leaves_the_source_untouched(capsys, bios_run, tmp_path):
    before = digest(bios_run)
    prompt, subject, target = a_fact(bios_run)
    out = tmp_path / "runs" / "edited"  # its folder is made, as train's and score's are
    code, stdout, _ = run_cli(capsys, "knowledge", "edit", str(bios_run), "--method", "rome", "--prompt", prompt,
                              "--subject", subject, "--target", target, "--out", str(out), "--json")  # fmt: skip
    report = json.loads(stdout)
    assert code == 0 and report["run"] == str(out) and report["layers"] == [0]
    assert {"reliability", "generalisation", "locality", "seconds", "p_target_after"} <= set(report)
    assert digest(bios_run) == before
    old, new = load_file(bios_run / "model.safetensors"), load_file(out / "model.safetensors")
    assert [k for k in old if not torch.equal(old[k], new[k])] == ["blocks.0.mlp.w2.weight"]
    edits = [json.loads(line) for line in (out / "knowledge" / "edits.jsonl").read_text().splitlines()]
    assert edits == [{"method": "rome", "layers": [0], "prompt": prompt, "subject": subject, "target": target,
                      "batch": 1}]  # fmt: skip
    config = json.loads((out / "config.json").read_text())
    assert config["edited_from"] == str(bios_run) and config["data"].startswith("bios:")
    assert list((out / "knowledge").glob("keys_l0_*.safetensors"))  # C, cached with the edited run
    from llmlab.run_dir import DIR_MODE, FILE_MODE  # the usual permissions, not mkdtemp's and mkstemp's 0700/0600

    assert all(p.stat().st_mode & 0o777 == (DIR_MODE if p.is_dir() else FILE_MODE) for p in [out, *out.rglob("*")])
    code, stdout, _ = run_cli(capsys, "knowledge", "eval", str(out), "--json")
    scored = json.loads(stdout)
    assert code == 0 and scored["edits"] == 1
    assert scored["reliability"] == pytest.approx(report["reliability"])
    assert scored["locality"] == pytest.approx(report["locality"])


def test_eval_of_a_chained_edit_scores_each_edit_on_the_neighbours_it_was_scored_on(capsys, bios_run, tmp_path,
                                                                                      monkeypatch):  # fmt: skip
    """Edit A, then B on A's run: eval of the second run draws B's neighbours as `edit` drew them
    (with A in the history, a shared draw over both moved them)."""
    from llmlab.knowledge import scores

    world = bios.world_of(load_run(bios_run).meta["data"])
    a, b = world.people[0], world.people[1]
    neighbours = []
    real = scores.score_case
    monkeypatch.setattr(scores, "score_case", lambda m, t, case, bef: neighbours.append(case.neighbours) or real(
        m, t, case, bef))  # fmt: skip
    for person, source, out in ((a, bios_run, tmp_path / "one"), (b, tmp_path / "one", tmp_path / "two")):
        code, _, err = run_cli(capsys, "knowledge", "edit", str(source), "--method", "rome", "--prompt",
                               bios.prompt(person, "major"), "--subject", person.name, "--target", "Art", "--out",
                               str(out), "--json")  # fmt: skip
        assert code == 0, err
    b_by_edit = neighbours[-1]
    code, _, _ = run_cli(capsys, "knowledge", "eval", str(tmp_path / "two"), "--json")
    assert code == 0 and neighbours[-1] == b_by_edit and neighbours[-2] == neighbours[0]  # B's, then A's


def test_batch_edits_from_a_file_with_memit(capsys, bios_run, tmp_path, monkeypatch):
    world = bios.world_of(load_run(bios_run).meta["data"])
    lines = [
        json.dumps({"prompt": bios.prompt(p, "major"), "subject": p.name, "target": "Art"}) for p in world.people[:3]
    ]
    (tmp_path / "edits.jsonl").write_text("\n".join(lines) + "\n\n")
    from llmlab.knowledge import scores

    neighbours = []  # each scoring's neighbours, as `edit` and then `eval` draw them
    real = scores.score_case
    monkeypatch.setattr(scores, "score_case", lambda m, t, case, b: neighbours.append(case.neighbours) or real(
        m, t, case, b))  # fmt: skip
    code, stdout, _ = run_cli(capsys, "knowledge", "edit", str(bios_run), "--method", "memit", "--requests",
                              str(tmp_path / "edits.jsonl"), "--layer", "0", "--layer", "1", "--out",
                              str(tmp_path / "m"), "--json")  # fmt: skip
    report = json.loads(stdout)
    assert code == 0 and report["edits"] == 3 and report["layers"] == [0, 1]
    assert len((tmp_path / "m" / "knowledge" / "edits.jsonl").read_text().splitlines()) == 3
    code, stdout, _ = run_cli(capsys, "knowledge", "eval", str(tmp_path / "m"), "--json")
    scored = json.loads(stdout)
    assert len(neighbours) == 6 and neighbours[3:] == neighbours[:3]  # eval drew others for the 2nd and 3rd fact
    assert code == 0 and {k: scored[k] for k in ("reliability", "generalisation", "locality")} == {
        k: report[k] for k in ("reliability", "generalisation", "locality")}  # fmt: skip


def test_eval_reports_extraction_accuracy_and_edit_scores(capsys, bios_run):
    code, stdout, _ = run_cli(capsys, "knowledge", "eval", str(bios_run), "--json")
    acc = json.loads(stdout)
    assert code == 0 and set(acc["qa_heldout"]) == {"all", *bios.ATTRIBUTES}
    assert 0 <= acc["completion"]["all"] <= 1
    code, stdout, _ = run_cli(capsys, "knowledge", "eval", str(bios_run), "--method", "ft-l", "--edits", "3",
                              "--mode", "sequential", "--set", "steps=2", "--json")  # fmt: skip
    report = json.loads(stdout)
    assert code == 0 and report["edits"] == 3 and report["mode"] == "sequential"
    for key in ("reliability", "generalisation", "locality", "fluency", "seconds_per_edit"):
        assert report[key] is not None
    prompt, subject, target = a_fact(bios_run)  # one fact given on the command line is the one edited
    code, stdout, _ = run_cli(capsys, "knowledge", "eval", str(bios_run), "--method", "ft-l", "--prompt", prompt,
                              "--subject", subject, "--target", target, "--set", "steps=2", "--json")  # fmt: skip
    assert code == 0 and json.loads(stdout)["edits"] == 1


def bad_inputs(run: Path, tmp: Path) -> list[tuple[list[str], str]]:
    prompt, subject, target = a_fact(run)
    (tmp / "notjson.jsonl").write_text('{"prompt": "{} was born in", "subject": "A", "target": "B"}\nnot json\n')
    (tmp / "fields.jsonl").write_text('{"prompt": "{} was born in", "subject": "A"}\n')
    (tmp / "empty.jsonl").write_text("\n")
    (tmp / "exists").mkdir()
    (tmp / "afile").write_text("")
    edit = ["knowledge", "edit", str(run), "--method", "rome", "--out", str(tmp / "new")]
    fact = ["--prompt", prompt, "--subject", subject, "--target", target]
    loc = ["knowledge", "locate", str(run), "--out", str(tmp / "maps")]
    evaluate = ["knowledge", "eval", str(run), "--method", "rome"]
    return [
        (
            [*loc, "--prompt", prompt.format(subject), "--subject", "Nobody Here", "--target", target],
            "the subject 'Nobody Here' does not occur in the prompt",
        ),
        ([*loc, "--prompt", "was born in", "--subject", subject, "--target", target], "is not a template"),
        ([*loc, "--prompt", prompt, "--subject", subject, "--target", " "], "tokenizes to nothing"),
        ([*loc, "--prompt", prompt, "--subject", subject], "locate needs --target (or --facts N on a bios run)"),
        ([*loc, "--facts", "0"], "--facts must be at least 1"),
        ([*loc, "--facts", "3", "--prompt", prompt], "give either --facts N or --prompt/--subject/--target"),
        ([*edit, "--prompt", prompt, "--subject", subject, "--target", ""], "the target '' tokenizes to nothing"),
        ([*edit, "--requests", str(tmp / "notjson.jsonl")], "notjson.jsonl line 2 is not JSON"),
        ([*edit, "--requests", str(tmp / "fields.jsonl")], "line 1 must be an object with exactly the string fields"),
        ([*edit, "--requests", str(tmp / "empty.jsonl")], "empty.jsonl is empty"),
        ([*edit, "--requests", str(tmp / "missing.jsonl")], "does not exist"),
        ([*edit, "--requests", str(tmp / "empty.jsonl"), *fact], "not both"),
        ([*edit, "--prompt", prompt], "an edit needs --subject, --target"),
        (
            ["knowledge", "edit", str(run), "--method", "roam", *fact, "--out", str(tmp / "n")],
            "unknown editing method 'roam'",
        ),
        ([*edit, *fact, "--layer", "7"], "layer 7 does not exist"),
        ([*edit, *fact, "--set", "colour=red"], "unknown edit parameter 'colour'"),
        ([*edit, *fact, "--set", "steps=many"], "steps='many'"),
        (["knowledge", "edit", str(run), "--method", "rome", *fact, "--out", str(tmp / "exists")], "already exists"),
        (["knowledge", "edit", str(run), "--method", "rome", *fact, "--out", str(run)], "already exists"),
        ([*edit[:5], *fact, "--out", str(run / "sub")], "inside the source run"),
        ([*edit[:5], *fact, "--out", str(tmp / "afile" / "x")], "afile is a file, so"),
        (["knowledge", "eval", str(run), "--method", "rome", "--mode", "parallel"], "unknown mode 'parallel'"),
        (["knowledge", "eval", str(run), "--method", "memit", "--edits", "0"], "--edits must be at least 1"),
        ([*evaluate, "--requests", str(tmp / "fields.jsonl")], "line 1 must be an object"),
        (["knowledge", "eval", str(run), "--requests", str(tmp / "fields.jsonl")], "--requests applies to edits"),
        (["knowledge", "eval", str(run), "--mode", "batch", "--edits", "2"], "--edits applies to edits; add --method"),
        (["knowledge", "eval", str(run), "--set", "foo=1"], "--set applies to edits; add --method"),
        (["knowledge", "eval", str(run), *fact], "--prompt applies to edits; add --method"),
        ([*evaluate, "--prompt", prompt], "an edit needs --subject, --target"),
        ([*evaluate, "--edits", "100000"], "attributes = "),
        (["knowledge", "eval", str(tmp / "nope")], "does not exist"),
        (["knowledge", "neurons", str(run), "--prompt", ""], "the prompt is empty"),
        (["knowledge"], "choose an action"),
    ]


def test_every_bad_input_is_one_line_exit_2_and_the_source_run_is_untouched(capsys, bios_run, tmp_path):
    before = digest(bios_run)
    for argv, message in bad_inputs(bios_run, tmp_path):
        code, _, err = run_cli(capsys, *argv)
        assert code == 2, (argv, err)
        assert err.startswith("llmlab: error: ") and err.count("\n") == 1, (argv, err)
        assert message in err, (argv, err)
    assert digest(bios_run) == before
    assert not (tmp_path / "new").exists() and not (tmp_path / "maps").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary run left behind


def test_editing_a_run_with_a_corrupt_token_cache_is_one_line(capsys, bios_run, tmp_path):
    """C is estimated from the train split: ids past the vocabulary were an IndexError in the embedding."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(bios_run, run)
    train = run / "data" / "train.bin"
    train.write_bytes(b"\xff" * train.stat().st_size)
    prompt, subject, target = a_fact(bios_run)
    code, _, err = run_cli(capsys, "knowledge", "edit", str(run), "--method", "rome", "--prompt", prompt,
                           "--subject", subject, "--target", target, "--out", str(tmp_path / "e"))  # fmt: skip
    assert code == 2 and err.count("\n") == 1 and "train.bin holds token id 65535" in err
    assert f"`llmlab train --out {run} --resume` rebuilds it" in err and not (tmp_path / "e").exists()
    (run / "train_state.pt").unlink()  # an edited run, say: nothing to resume
    code, _, err = run_cli(capsys, "knowledge", "edit", str(run), "--method", "rome", "--prompt", prompt,
                           "--subject", subject, "--target", target, "--out", str(tmp_path / "e"))  # fmt: skip
    assert code == 2 and "has no train_state.pt to rebuild it with: restore the folder from a copy" in err


@pytest.mark.parametrize("command", ["edit", "eval"])
def test_edit_help_names_every_edit_parameter(capsys, command):
    """The --set help is written by hand (building the parser never imports torch); it must name
    every field of EditParams that --set accepts."""
    from dataclasses import fields

    from llmlab.cli import main
    from llmlab.knowledge.edit import EditParams

    with pytest.raises(SystemExit):
        main(["knowledge", command, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    names = [f.name for f in fields(EditParams) if f.name != "layers"]
    assert all(name in text for name in names), [n for n in names if n not in text]
