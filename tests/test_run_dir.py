"""The run directory: atomic writes, save → load round trips, and clear errors on bad files."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from llmlab.config import TrainConfig
from llmlab.errors import RunDirError
from llmlab.model import GPT
from llmlab.run_dir import atomic_write, config_json, load_run, save_weights, write_json, write_text
from llmlab.tokenizer import CharTokenizer
from tests.conftest import TINY_VARIANTS


def save_run(path: Path, name: str) -> GPT:
    tok = CharTokenizer.train("abcdefghijklmnopqrstuvwxyz0123456789 \n.,:;()[]=+-*/#'\"_!?")
    cfg = replace(TINY_VARIANTS[name], vocab_size=tok.vocab_size)
    torch.manual_seed(1)
    model = GPT(cfg).eval()
    save_weights(path / "model.safetensors", model)
    write_text(path / "tokenizer.json", tok.to_json())
    write_json(path / "config.json", config_json(cfg, TrainConfig()))
    return model


@pytest.mark.parametrize("name", list(TINY_VARIANTS))
def test_save_then_load_gives_identical_logits(tmp_path, name):
    model = save_run(tmp_path, name)
    run = load_run(tmp_path)
    idx = torch.randint(0, model.cfg.vocab_size, (2, 10))
    assert torch.equal(run.model(idx), model(idx))
    assert run.model_cfg == model.cfg
    if model.cfg.tie_embeddings:
        assert run.model.unembed.weight is run.model.embed.weight


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "f.txt"
    path.write_text("old")

    def crash(tmp: Path) -> None:
        tmp.write_text("half-writ")
        raise OSError("disk full")

    with pytest.raises(OSError):
        atomic_write(path, crash)
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.txt"]  # no temporary file left behind


def corrupt(path: Path, how: str) -> None:
    if how == "missing model":
        (path / "model.safetensors").unlink()
    elif how == "truncated weights":
        data = (path / "model.safetensors").read_bytes()
        (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    elif how == "garbage weights":
        (path / "model.safetensors").write_bytes(b"\x00" * 64)
    elif how == "config not json":
        (path / "config.json").write_text("{not json")
    elif how == "config unknown key":
        cfg = json.loads((path / "config.json").read_text())
        cfg["model"]["colour"] = "blue"
        (path / "config.json").write_text(json.dumps(cfg))
    elif how == "config shape mismatch":
        cfg = json.loads((path / "config.json").read_text())
        cfg["model"]["d_model"] = 64
        (path / "config.json").write_text(json.dumps(cfg))
    elif how == "tokenizer garbage":
        (path / "tokenizer.json").write_text("\x00\x01")
    elif how == "tokenizer too small":  # ids past "ab" would have no character to decode to
        (path / "tokenizer.json").write_text(json.dumps({"type": "char", "vocab": "ab"}))


@pytest.mark.parametrize(
    ("how", "message"),
    [
        ("missing model", "not a complete run directory: model.safetensors missing"),
        ("truncated weights", "model.safetensors is corrupt"),
        ("garbage weights", "model.safetensors is corrupt"),
        ("config not json", "config.json is corrupt"),
        ("config unknown key", "config.json is corrupt .*unknown config key 'colour'"),
        ("config shape mismatch", "does not match config.json"),
        ("tokenizer garbage", "not a valid tokenizer file"),
        ("tokenizer too small", "is corrupt: the character tokenizer has 2 tokens but the model 57"),
    ],
)
def test_a_damaged_run_directory_is_a_one_line_error(tmp_path, how, message):
    save_run(tmp_path, "notes")
    corrupt(tmp_path, how)
    with pytest.raises(RunDirError, match=message) as e:
        load_run(tmp_path)
    assert "\n" not in str(e.value)


def test_missing_and_non_directory_runs(tmp_path):
    with pytest.raises(RunDirError, match="does not exist"):
        load_run(tmp_path / "nope")
    (tmp_path / "file").write_text("x")
    with pytest.raises(RunDirError, match="it is a file"):
        load_run(tmp_path / "file")


def test_corrupt_train_state_is_reported_on_resume(trained_run, tmp_path):
    from llmlab.run_dir import load_train_state

    copy = tmp_path / "copy"
    shutil.copytree(trained_run, copy)
    (copy / "train_state.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(RunDirError, match="train_state.pt is corrupt"):
        load_train_state(copy)


def test_a_run_is_written_with_the_usual_permissions(trained_run):
    """Reference: what open() and mkdir() give under this process's umask (0644/0755 under 022);
    mkstemp's 0600, and safetensors' own temporary file, must not leak into the run."""
    from llmlab.run_dir import DIR_MODE, FILE_MODE

    for path in [trained_run, *trained_run.rglob("*")]:
        assert path.stat().st_mode & 0o777 == (DIR_MODE if path.is_dir() else FILE_MODE), path
