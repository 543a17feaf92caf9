"""Data: text from a named source → token ids on disk → deterministic batches [B, S].

Sources (`--data`):

    stdlib        the running interpreter's standard-library .py sources (tests excluded):
                  real text present on every machine, the embedded default
    bios[:OPTS]   synthetic biographies (`llmlab.bios`), e.g. bios:people=2000,augment=multi+permute
    PATH          a text file, a folder (every file under it, sorted), or a glob

The last `val_fraction` of the tokens is the validation split (nanoGPT's 90/10), so losses
compare with nanoGPT's. Tokens are cached as numpy memmaps in `RUN/data/`. Batch `step` is a
pure function of (seed, step): resuming at step n continues the data exactly where it was.
"""

from __future__ import annotations

import glob
import json
import sysconfig
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from llmlab import bios
from llmlab.errors import UserError

_STDLIB_SKIP = {"test", "tests", "idlelib", "lib2to3", "site-packages", "dist-packages", "__pycache__"}


def stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.rglob("*.py") if not _STDLIB_SKIP & set(p.relative_to(root).parts[:-1]))


def stdlib_text() -> str:
    """The standard library's sources, one file after another, each headed by its path."""
    root = Path(sysconfig.get_paths()["stdlib"])
    parts = []
    for path in stdlib_files():
        text = path.read_bytes().decode("utf-8", errors="replace")
        parts.append(f"# {path.relative_to(root)}\n{text}\n")
    return "".join(parts)


def _stdlib_source(options: str) -> str:
    if options:
        raise UserError(f"the stdlib source takes no options, got {options!r}")
    return stdlib_text()


# name → text; the function receives what follows "name:" in the spec ("" if nothing)
BUILTIN_SOURCES: dict[str, Callable[[str], str]] = {"stdlib": _stdlib_source, "bios": bios.source_text}


def read_text_file(path: Path) -> str:
    """One text file, checked: it exists, is not empty, is not binary and is valid UTF-8."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"{path} does not exist") from None
    except IsADirectoryError:
        raise UserError(f"{path} is a directory, not a file") from None
    except PermissionError:
        raise UserError(f"{path} cannot be read (permission denied)") from None
    if not raw.strip():
        raise UserError(f"{path} is empty")
    if b"\x00" in raw:
        raise UserError(f"{path} looks binary (it contains NUL bytes), not text")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not valid UTF-8 (byte {raw[e.start]:#04x} at offset {e.start})") from None


def load_source(spec: str) -> str:
    """The text of a data source: a built-in name (with options after a colon), a file, a folder or a glob."""
    name, _, options = spec.partition(":")
    if name in BUILTIN_SOURCES:
        return BUILTIN_SOURCES[name](options)
    path = Path(spec).expanduser()
    if path.is_file():
        return read_text_file(path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and not _hidden(p.relative_to(path)))
        if not files:
            raise UserError(f"folder {spec} holds no files")
        return "\n".join(read_text_file(p) for p in files)
    matches = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
    if matches:
        return "\n".join(read_text_file(p) for p in matches)
    names = ", ".join(BUILTIN_SOURCES)
    raise UserError(f"data source {spec!r} not found (not a file, folder, glob or built-in name: {names})")


def _hidden(rel: Path) -> bool:
    return any(part.startswith(".") for part in rel.parts)


# --- tokens on disk ---------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenSplits:
    train: np.ndarray  # [N_train] token ids (memmap)
    val: np.ndarray  # [N_val]


def write_splits(ids: np.ndarray, folder: Path, val_fraction: float, vocab_size: int,
                 block_size: int) -> TokenSplits:  # fmt: skip
    """Split into train/val (the last `val_fraction` is val) and save both as memmaps."""
    n_val = int(len(ids) * val_fraction)
    train, val = ids[: len(ids) - n_val], ids[len(ids) - n_val :]
    for name, part in (("train", train), ("val", val)):
        if len(part) < block_size + 1:
            raise UserError(
                f"the data is too small: the {name} split has {len(part)} tokens, "
                f"and one sequence needs block_size + 1 = {block_size + 1}"
            )
    dtype = np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.uint32
    folder.mkdir(parents=True, exist_ok=True)
    for name, part in (("train", train), ("val", val)):
        part.astype(dtype).tofile(folder / f"{name}.bin")
    meta = {"dtype": np.dtype(dtype).name, "train_tokens": len(train), "val_tokens": len(val)}
    (folder / "meta.json").write_text(json.dumps(meta))
    return read_splits(folder)


def _rebuild(folder: Path) -> str:
    """What to do about a bad token cache: a trained run's resume tokenizes its data source again."""
    if (folder.parent / "train_state.pt").is_file():
        return f"delete the folder and `llmlab train --out {folder.parent} --resume` rebuilds it from the data source"
    return "this run has no train_state.pt to rebuild it with: restore the folder from a copy"


def read_splits(folder: Path, vocab_size: int | None = None, checked: Sequence[str] = ("train", "val")) -> TokenSplits:
    """The token cache as memmaps, checked: each file holds the number of tokens meta.json says,
    and with `vocab_size` every id of the `checked` splits is below it (one pass over them, which
    is fast beside training on them)."""
    try:
        meta = json.loads((folder / "meta.json").read_text())
        splits = TokenSplits(*(np.memmap(folder / f"{n}.bin", dtype=meta["dtype"], mode="r") for n in ("train", "val")))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"the token cache in {folder} is unreadable ({e}); {_rebuild(folder)}") from None
    for name, part in (("train", splits.train), ("val", splits.val)):
        if len(part) != meta.get(f"{name}_tokens"):
            raise UserError(f"the token cache in {folder} is corrupt: {name}.bin holds {len(part):,} tokens, "
                            f"meta.json says {meta.get(f'{name}_tokens')}; {_rebuild(folder)}")  # fmt: skip
        if vocab_size is not None and name in checked and (top := int(part.max())) >= vocab_size:
            raise UserError(f"the token cache in {folder} is corrupt: {name}.bin holds token id {top}, and the "
                            f"vocabulary has {vocab_size} tokens; {_rebuild(folder)}")  # fmt: skip
    return splits


# --- batches ----------------------------------------------------------------------------------


def get_batch(tokens: np.ndarray, block_size: int, rows: np.ndarray) -> tuple[Tensor, Tensor]:
    """Windows starting at `rows`: x [B, S] and the next tokens y [B, S] (x shifted by one)."""
    x = np.stack([tokens[i : i + block_size] for i in rows]).astype(np.int64)
    y = np.stack([tokens[i + 1 : i + 1 + block_size] for i in rows]).astype(np.int64)
    return torch.from_numpy(x), torch.from_numpy(y)


def batch_starts(n_tokens: int, block_size: int, count: int, seed: int, stream: int, index: int) -> np.ndarray:
    """`count` window starts drawn by an RNG keyed on (seed, stream, index): stateless, resumable."""
    rng = np.random.default_rng([seed, stream, index])
    return rng.integers(0, n_tokens - block_size, size=count)


TRAIN_STREAM, VAL_STREAM = 0, 1


def train_batch(tokens: np.ndarray, block_size: int, batch_size: int, seed: int, step: int,
                micro: int, rank: int, world: int, grad_accum: int) -> tuple[Tensor, Tensor]:  # fmt: skip
    """This process's slice of step `step`'s global batch of B · grad_accum · world windows.

    Slices are micro-step major, then rank: two processes with batch B draw exactly the rows
    that one process with batch 2B draws, which is what makes DDP equal a bigger batch.
    """
    starts = batch_starts(len(tokens), block_size, batch_size * grad_accum * world, seed, TRAIN_STREAM, step)
    first = (micro * world + rank) * batch_size
    return get_batch(tokens, block_size, starts[first : first + batch_size])


def sequential_batches(tokens: np.ndarray, block_size: int, batch_size: int,
                       max_tokens: int | None = None) -> Iterator[tuple[Tensor, Tensor]]:  # fmt: skip
    """Non-overlapping windows covering the split (or its first `max_tokens`), for evaluation."""
    n = len(tokens) - 1 if max_tokens is None else min(len(tokens) - 1, max_tokens)
    starts = np.arange(0, n - block_size + 1, block_size)
    for i in range(0, len(starts), batch_size):
        yield get_batch(tokens, block_size, starts[i : i + batch_size])
