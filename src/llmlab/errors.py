"""Errors that reach the user as one line.

The library never prints and never exits. It raises `UserError` (or a subclass) with a message
that quotes the offending value; `llmlab.cli.main` turns it into `llmlab: error: <message>` and
exit code 2. Anything else is a bug and keeps its traceback.
"""

import re


class UserError(Exception):
    """Bad input: a missing file, an unknown preset, an invalid sampling value, ..."""


class ConfigError(UserError, ValueError):
    """An unknown config key, a value of the wrong type, or an impossible combination."""


class RunDirError(UserError):
    """A run directory that is missing, incomplete or corrupt."""


class TrainingDiverged(UserError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


def quoted(text: str, limit: int = 60) -> str:
    """`repr(text)` for a message, its middle cut to "…" past `limit` characters of text, so that
    a long prompt quoted in an error still leaves one readable line."""
    if len(text) <= limit:
        return repr(text)
    half = limit // 2
    return f"{text[:half]!r}…{text[-half:]!r} ({len(text):,} characters)"


def reason(e: BaseException, limit: int = 240) -> str:
    """`Type: first line of the message` of an exception from a library, for a one-line error:
    without ANSI codes (torch bolds its messages with them), cut at `limit` characters with an
    ellipsis."""
    lines = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip().splitlines()
    first = lines[0] if lines else ""
    return f"{type(e).__name__}: {first if len(first) <= limit else first[: limit - 1] + '…'}"
