"""Errors that reach the user as one line.

The library never prints and never exits. It raises `UserError` (or a subclass) with a message
that quotes the offending value; `llmlab.cli.main` turns it into `llmlab: error: <message>` and
exit code 2. Anything else is a bug and keeps its traceback.
"""


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
