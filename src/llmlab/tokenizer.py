"""Tokenizers: text ↔ token ids, the one-hot rows of the notes' [B, S, V] input (§2.2).

Two kinds, both saved as `tokenizer.json` in the run directory:

    char  one id per distinct character of the training text (nanoGPT's shakespeare_char);
          a character it has never seen is an error, not a silent <unk>
    bpe   byte-level BPE (GPT-2's scheme) trained locally with Hugging Face `tokenizers`; every
          string, in any script, round-trips exactly because the base alphabet is the 256 bytes
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Protocol

import numpy as np
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from llmlab.errors import RunDirError, UserError


class Tokenizer(Protocol):
    kind: str

    @property
    def vocab_size(self) -> int: ...
    def encode(self, text: str) -> list[int]: ...
    def encode_array(self, text: str) -> np.ndarray: ...
    def decode(self, ids: Iterable[int]) -> str: ...
    def to_json(self) -> str: ...


class CharTokenizer:
    kind = "char"

    def __init__(self, chars: str) -> None:
        self.chars = chars
        self.codepoints = np.array([ord(c) for c in chars], dtype=np.uint32)  # sorted
        self.index = {c: i for i, c in enumerate(chars)}

    @classmethod
    def train(cls, text: str) -> CharTokenizer:
        return cls("".join(sorted(set(text))))

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> list[int]:
        return self.encode_array(text).tolist()

    def encode_array(self, text: str) -> np.ndarray:
        """Vectorised: UTF-32 code points looked up by binary search in the sorted vocabulary."""
        cps = np.frombuffer(text.encode("utf-32-le", errors="surrogatepass"), dtype=np.uint32)
        ids = np.searchsorted(self.codepoints, cps)
        ids_in = np.minimum(ids, len(self.codepoints) - 1)
        unknown = self.codepoints[ids_in] != cps
        if unknown.any():
            ch = chr(int(cps[np.argmax(unknown)]))
            raise UserError(f"character {ch!r} (U+{ord(ch):04X}) is not in this character tokenizer's vocabulary")
        return ids.astype(np.int64)

    def decode(self, ids: Iterable[int]) -> str:
        return "".join(self.chars[i] for i in ids)

    def to_json(self) -> str:
        return json.dumps({"type": "char", "vocab": self.chars}, ensure_ascii=False)


class BPETokenizer:
    kind = "bpe"

    def __init__(self, tok: HFTokenizer) -> None:
        self.tok = tok

    @classmethod
    def train(cls, text: str, vocab_size: int) -> BPETokenizer:
        tok = HFTokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, min_frequency=2, show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        )  # fmt: skip
        tok.train_from_iterator(_chunks(text), trainer=trainer)
        return cls(tok)

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text).ids

    def encode_array(self, text: str) -> np.ndarray:
        batch = self.tok.encode_batch(list(_chunks(text)))  # parallel in Rust
        return np.fromiter((i for enc in batch for i in enc.ids), dtype=np.int64)

    def decode(self, ids: Iterable[int]) -> str:
        return self.tok.decode(list(ids))

    def to_json(self) -> str:
        return self.tok.to_str()


# A newline between two non-space characters always ends a pre-token in GPT-2's split pattern,
# so cutting the text there changes no token: chunked encoding equals whole-text encoding.
_SAFE_CUT = re.compile(r"(?<=\S\n)(?=\S)")


def _chunks(text: str, chunk_chars: int = 1 << 16) -> Iterable[str]:
    """Pieces of about `chunk_chars` characters, cut only where a cut cannot change a token."""
    start = 0
    while start < len(text):
        cut = _SAFE_CUT.search(text, start + chunk_chars) if start + chunk_chars < len(text) else None
        end = cut.start() if cut else len(text)
        yield text[start:end]
        start = end


def train_tokenizer(kind: str, text: str, vocab_size: int = 2048) -> Tokenizer:
    if kind == "char":
        return CharTokenizer.train(text)
    if kind == "bpe":
        return BPETokenizer.train(text, vocab_size)
    raise UserError(f"unknown tokenizer {kind!r} (choose from: char, bpe)")


def tokenizer_from_json(data: str) -> Tokenizer:
    obj = json.loads(data)
    if obj.get("type") == "char":
        return CharTokenizer(obj["vocab"])
    return BPETokenizer(HFTokenizer.from_str(data))


def load_tokenizer(path: str | Path) -> Tokenizer:
    path = Path(path)
    try:
        return tokenizer_from_json(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RunDirError(f"{path} does not exist") from None
    except Exception as e:  # tokenizers raises a bare Exception on a malformed file
        detail = " ".join(str(e).split())[:120] or type(e).__name__
        raise RunDirError(f"{path} is not a valid tokenizer file ({detail})") from None


def decode_stream(tokenizer: Tokenizer, ids: list[int], emitted: int) -> tuple[str, int]:
    """The text that `ids` add after the first `emitted` characters, held back while it ends in
    an incomplete UTF-8 sequence (a byte-level token can hold half a character).

    Returns: (new text, total characters emitted so far)
    """
    text = tokenizer.decode(ids)
    if text.endswith("\ufffd"):
        return "", emitted
    return text[emitted:], len(text)
