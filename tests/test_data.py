"""Data sources, the train/val split on disk, and deterministic, resumable batches."""

from __future__ import annotations

import numpy as np
import pytest

from llmlab import data
from llmlab.errors import UserError


def test_stdlib_source_is_python_source_without_tests():
    files = data.stdlib_files()
    assert len(files) > 100
    assert not any("test" in p.parts[:-1] for p in files)
    text = data.load_source("stdlib")
    assert "def " in text and "import " in text


def test_file_folder_and_glob_sources(tmp_path):
    (tmp_path / "a.txt").write_text("alpha\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.txt").write_text("beta\n")
    (tmp_path / ".hidden").write_text("\x00")  # hidden files are skipped
    assert data.load_source(str(tmp_path / "a.txt")) == "alpha\n"
    assert data.load_source(str(tmp_path)) == "alpha\n\nbeta\n"
    assert data.load_source(str(tmp_path / "**" / "*.txt")) == "alpha\n\nbeta\n"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "is empty"),
        (b"  \n\n", "is empty"),
        (b"PK\x03\x04\x00\x00binary", "looks binary"),
        (b"caf\xe9 au lait", r"not valid UTF-8 \(byte 0xe9 at offset 3\)"),
    ],
)
def test_bad_data_files_are_clear_errors(tmp_path, content, message):
    path = tmp_path / "bad.txt"
    path.write_bytes(content)
    with pytest.raises(UserError, match=message):
        data.load_source(str(path))


def test_missing_source_names_the_alternatives(tmp_path):
    with pytest.raises(UserError, match="not found .*built-in name: stdlib"):
        data.load_source(str(tmp_path / "nope.txt"))


def test_split_puts_the_last_ten_percent_in_validation(tmp_path):
    ids = np.arange(1000) % 50
    splits = data.write_splits(ids, tmp_path, 0.1, vocab_size=50, block_size=8)
    assert splits.train.dtype == np.uint16
    np.testing.assert_array_equal(splits.train, ids[:900])
    np.testing.assert_array_equal(splits.val, ids[900:])
    assert isinstance(data.read_splits(tmp_path).val, np.memmap)


def test_large_vocabularies_use_32_bit_ids(tmp_path):
    ids = np.array([70000, 1, 2, 3] * 50)
    assert data.write_splits(ids, tmp_path, 0.5, vocab_size=70001, block_size=4).train.dtype == np.uint32


def test_too_little_data_is_an_error(tmp_path):
    with pytest.raises(UserError, match="too small: the val split has 3 tokens"):
        data.write_splits(np.arange(30), tmp_path, 0.1, vocab_size=30, block_size=8)


def test_batches_are_shifted_windows_and_a_pure_function_of_the_step():
    tokens = np.arange(500, dtype=np.uint16)
    x, y = data.train_batch(tokens, 8, 4, seed=1, step=7, micro=0, rank=0, world=1, grad_accum=1)
    assert x.shape == y.shape == (4, 8)
    assert (y == x + 1).all()  # targets are the next tokens
    x2, _ = data.train_batch(tokens, 8, 4, seed=1, step=7, micro=0, rank=0, world=1, grad_accum=1)
    assert (x == x2).all()
    x3, _ = data.train_batch(tokens, 8, 4, seed=1, step=8, micro=0, rank=0, world=1, grad_accum=1)
    assert not (x == x3).all()


def test_two_ranks_draw_exactly_the_rows_of_one_process_with_twice_the_batch():
    tokens = np.arange(10_000, dtype=np.uint16)
    one, _ = data.train_batch(tokens, 8, 6, seed=3, step=5, micro=0, rank=0, world=1, grad_accum=1)
    r0, _ = data.train_batch(tokens, 8, 3, seed=3, step=5, micro=0, rank=0, world=2, grad_accum=1)
    r1, _ = data.train_batch(tokens, 8, 3, seed=3, step=5, micro=0, rank=1, world=2, grad_accum=1)
    assert (one == np.concatenate([r0, r1])).all()
    m0, _ = data.train_batch(tokens, 8, 3, seed=3, step=5, micro=0, rank=0, world=1, grad_accum=2)
    m1, _ = data.train_batch(tokens, 8, 3, seed=3, step=5, micro=1, rank=0, world=1, grad_accum=2)
    assert (one == np.concatenate([m0, m1])).all()  # accumulation draws the same rows too


def test_sequential_batches_cover_the_split_without_overlap():
    tokens = np.arange(101, dtype=np.uint16)
    xs = [x for x, _ in data.sequential_batches(tokens, 10, 3)]
    flat = np.concatenate([x.numpy().ravel() for x in xs])
    np.testing.assert_array_equal(flat, np.arange(100))
