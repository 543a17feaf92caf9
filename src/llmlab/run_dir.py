"""The run directory: what `train` writes and every other command reads.

    RUN/config.json          {"model": ModelConfig, "train": TrainConfig, "data": source, ...}
    RUN/tokenizer.json       char or byte-level BPE
    RUN/model.safetensors    the weights (a tied head is stored once)
    RUN/train_state.pt       optimizer state, step, RNG state, data position, elapsed time
    RUN/metrics.csv          one row per step: lr, train loss, val loss at evaluations, tokens/s
    RUN/loss.png             the loss curves
    RUN/data/                the token cache (train.bin, val.bin as numpy memmaps)

Every file is written atomically (write a temporary file, fsync, rename, fsync the folder), so
a crash leaves the previous version intact. Loading never executes code from a file:
safetensors for weights, JSON for config, `torch.load(weights_only=True)` for the train state.
"""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_model, save_model

from llmlab import strict_json
from llmlab.config import ModelConfig, TrainConfig, from_dict, to_dict
from llmlab.errors import ConfigError, RunDirError, UserError
from llmlab.model import GPT
from llmlab.tokenizer import Tokenizer, load_tokenizer

REQUIRED = ("config.json", "tokenizer.json", "model.safetensors")
_UMASK = os.umask(0)
os.umask(_UMASK)
FILE_MODE, DIR_MODE = 0o666 & ~_UMASK, 0o777 & ~_UMASK  # what open() and mkdir() give under this umask


def check_makeable(path: str | Path, flag: str = "--out") -> None:
    """UserError if a file stands where a folder on the way to `path` would have to be made (the
    OS would say only "Not a directory" or "File exists", naming another path)."""
    path = Path(path)
    there = next((p for p in path.parents if p.exists()), None)  # the nearest existing folder above it
    if there is not None and not there.is_dir():
        raise UserError(f"{there} is a file, so {path} cannot be made; choose another {flag}")


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """`write(tmp)` then fsync and rename over `path`: readers see the old file or the new one.
    An error names `path`, not the temporary file beside it."""
    try:
        _atomic_write(path, write)
    except OSError as e:
        if e.filename is not None and Path(e.filename).name.startswith(f".{path.name}."):
            e.filename = str(path)
        raise


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        os.chmod(tmp, FILE_MODE)  # mkstemp makes 0600, and so may `write` (safetensors replaces the file)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json(path: Path, obj: Any) -> None:
    """Standard JSON (inf and NaN as null), indented."""
    write_text(path, strict_json.dumps(obj, indent=2) + "\n")


def save_weights(path: Path, model: GPT) -> None:
    atomic_write(path, lambda tmp: save_model(model, str(tmp)))


def save_train_state(path: Path, state: dict[str, Any]) -> None:
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def write_metrics(path: Path, rows: list[dict[str, Any]]) -> None:
    if not rows:
        return
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    write_text(path, buf.getvalue())


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """metrics.csv's rows, numbers parsed ([] without the file); a damaged row is a RunDirError."""
    rows, damaged = read_metrics_leniently(path)
    if damaged:
        raise RunDirError(f"{path} is corrupt: line {damaged[0]} is not a row of numbers under its header "
                          f"({len(damaged)} such lines); restore it, or delete it to restart the curves")  # fmt: skip
    return rows


def read_metrics_leniently(path: Path) -> tuple[list[dict[str, Any]], list[int]]:
    """(the rows that parse, the line numbers of those that do not): for showing what is left of
    a file damaged outside llmlab (a hand edit, a partial copy; llmlab writes it atomically)."""
    if not path.exists():
        return [], []
    with open(path, newline="", encoding="utf-8", errors="replace") as f:  # bad bytes: a damaged row, not a crash
        reader = csv.DictReader(f)
        rows, damaged = [], []
        if reader.fieldnames is None or not set(METRICS_REQUIRED) <= set(reader.fieldnames):  # the header itself
            return [], list(range(1, 2 + sum(1 for _ in f)))
        for row in reader:
            parsed = _row(row)
            if parsed is None:
                damaged.append(reader.line_num)
            else:
                rows.append(parsed)
    return rows, damaged


METRICS_REQUIRED = ("step", "train_loss")  # what every row of metrics.csv has (val_loss only at evaluations)


def _row(row: dict[Any, Any]) -> dict[str, Any] | None:
    """A CSV row as numbers (an empty field is None), or None if it has too few or too many
    fields, one that is not a number, or no step (an integer) or train loss."""
    if None in row or None in row.values():  # DictReader's marks of extra and missing fields
        return None
    try:
        parsed = {k: _num(v) for k, v in row.items()}
    except ValueError:
        return None
    return parsed if isinstance(parsed["step"], int) and parsed["train_loss"] is not None else None


def _num(v: str) -> Any:
    if v == "":
        return None
    try:
        return int(v)
    except ValueError:
        return float(v)


def config_json(model_cfg: ModelConfig, train_cfg: TrainConfig, **extra: Any) -> dict[str, Any]:
    return {"model": to_dict(model_cfg), "train": to_dict(train_cfg), **extra}


# --- reading a run --------------------------------------------------------------------------


@dataclass
class Run:
    path: Path
    model_cfg: ModelConfig
    train_cfg: TrainConfig
    tokenizer: Tokenizer
    model: GPT
    meta: dict[str, Any]  # the rest of config.json: data source, preset, ...


def check_run_dir(path: str | Path) -> Path:
    path = Path(path)
    if not path.exists():
        raise RunDirError(f"run directory {str(path)!r} does not exist")
    if not path.is_dir():
        raise RunDirError(f"{str(path)!r} is not a run directory (it is a file)")
    missing = [name for name in REQUIRED if not (path / name).is_file()]
    if missing:
        raise RunDirError(f"{str(path)!r} is not a complete run directory: {', '.join(missing)} missing")
    return path


def read_config(path: Path) -> tuple[ModelConfig, TrainConfig, dict[str, Any]]:
    try:
        data = json.loads((path / "config.json").read_text(encoding="utf-8"))
        if isinstance(data, dict) and "model_type" in data and "model" not in data:
            raise RunDirError(f"{path} holds a Hugging Face checkpoint, not an llmlab run; "
                              f"`llmlab import-hf {path} --out RUN` makes a run of it")  # fmt: skip
        if not (isinstance(data, dict) and all(isinstance(data.get(k), dict) for k in ("model", "train"))):
            raise ValueError('expected a JSON object holding "model" and "train" objects')
        model_cfg = from_dict(ModelConfig, data.pop("model"))
        train_cfg = from_dict(TrainConfig, data.pop("train"))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        reason = e.args[0] if isinstance(e, ConfigError) else f"{type(e).__name__}: {e}"
        raise RunDirError(f"{path / 'config.json'} is corrupt ({reason})") from None
    return model_cfg, train_cfg, data


def check_weights(where: str, tensors: dict[str, torch.Tensor], tokenizer: Tokenizer, vocab_size: int) -> None:
    """What a model's weights and tokenizer must be to be used: every tensor finite, and no more
    tokens than the embedding has rows (a character tokenizer: exactly as many; a BPE model may have
    spare rows, as padded checkpoints do, whose ids decode to no text as in Hugging Face's
    tokenizers). `where` names the source in the error."""
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise RunDirError(f"{where} is corrupt: {name!r} holds NaN or infinite values")
    if tokenizer.vocab_size > vocab_size:
        raise RunDirError(f"{where}: the tokenizer has {tokenizer.vocab_size} tokens but the model only {vocab_size}")
    if tokenizer.kind == "char" and tokenizer.vocab_size != vocab_size:  # training sizes the model to it exactly
        raise RunDirError(f"{where} is corrupt: the character tokenizer has {tokenizer.vocab_size} tokens but the "
                          f"model {vocab_size}, and ids past the tokenizer's would have no text")  # fmt: skip


def load_run(path: str | Path, device: str | torch.device = "cpu") -> Run:
    """Read a run directory into a model in eval mode, with its tokenizer and configs."""
    path = check_run_dir(path)
    model_cfg, train_cfg, meta = read_config(path)
    tokenizer = load_tokenizer(path / "tokenizer.json")
    model = GPT(model_cfg)
    try:
        missing, unexpected = load_model(model, str(path / "model.safetensors"), strict=False)
    except (SafetensorError, OSError, RuntimeError) as e:
        lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()] or [type(e).__name__]
        first = lines[1] if lines[0].startswith("Error(s) in loading state_dict") and len(lines) > 1 else lines[0]
        raise RunDirError(f"{path / 'model.safetensors'} is corrupt or does not match config.json ({first})") from None
    if missing or unexpected:
        name = sorted(missing or unexpected)[0]
        what = "missing from" if missing else "unexpected in"
        raise RunDirError(f"{path / 'model.safetensors'} does not match config.json ({name!r} {what} it)")
    check_weights(str(path / "model.safetensors"), model.state_dict(), tokenizer, model_cfg.vocab_size)
    return Run(path, model_cfg, train_cfg, tokenizer, model.to(device).eval(), meta)


# what train_state.pt holds, each entry of its type
TRAIN_STATE = {"step": int, "optimizer": dict, "rng_torch": torch.Tensor, "elapsed": (int, float),
               "train_time": (int, float)}  # fmt: skip


def load_train_state(path: Path) -> dict[str, Any]:
    """train_state.pt, checked to hold every entry a resume reads, each of its type."""
    try:
        state = torch.load(path / "train_state.pt", weights_only=True, map_location="cpu")
    except FileNotFoundError:
        raise RunDirError(f"{path} has no train_state.pt to resume from") from None
    except Exception as e:  # torch raises several types for a truncated or foreign file
        raise RunDirError(f"{path / 'train_state.pt'} is corrupt ({type(e).__name__})") from None
    for key, kind in TRAIN_STATE.items():
        if not isinstance(state, dict) or not isinstance(state.get(key), kind) or isinstance(state.get(key), bool):
            raise RunDirError(f"{path / 'train_state.pt'} is corrupt: it lacks a valid {key!r}")
    if state["step"] < 0:
        raise RunDirError(f"{path / 'train_state.pt'} is corrupt: step {state['step']} is negative")
    return state
