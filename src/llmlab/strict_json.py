"""JSON as llmlab prints, serves and writes it: standard JSON, which has no Infinity or NaN.

A float that is inf or NaN (a perplexity beyond the largest float, a loss that diverged) becomes
null. Python's `json` would write the non-standard `Infinity` and `NaN`, which browsers and most
parsers refuse.
"""

from __future__ import annotations

import json
import math
from typing import Any


def finite(obj: Any) -> Any:
    """obj with every float that is inf or NaN replaced by None, in dicts, lists and tuples."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [finite(v) for v in obj]
    return obj


def dumps(obj: Any, indent: int | None = None) -> str:
    """One JSON text; on one line unless `indent` is given."""
    separators = None if indent is not None else (",", ":")
    return json.dumps(finite(obj), ensure_ascii=False, allow_nan=False, indent=indent, separators=separators)
