"""Verifiable tasks for rejection-sampling fine-tuning (notes §二): prompts, answers, verifiers.

A task is a list of examples, each a prompt and (optionally) its answer, split into the prompts
that fine-tuning samples on and held-out prompts that pass@1 is measured on. A completion is
the text the model writes after the prompt, up to the first newline. A verifier decides whether
a completion is right; it is any importable function

    verify(prompt: str, completion: str, answer: str | None) -> bool

named on the command line as MODULE:FUNCTION (e.g. `llmlab.tasks:exact_match`).

Built in:

    addition   "67+45=" → "112": 2-digit addition written as text, generated from a seed, with
               an exact-match verifier; 5,000 training prompts, 500 held out. `corpus()` is the
               training prompts with their sums, the text a base model is trained on; briefly
               trained, a small model starts weak. See `llmlab rft --help` for the recipe.

Task files are JSON lines, one example per line: {"prompt": "12+7=", "answer": "19"}. The last
`heldout_fraction` of the lines are held out.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from llmlab.errors import UserError, quoted

Verifier = Callable[[str, str, "str | None"], bool]


@dataclass(frozen=True)
class Example:
    prompt: str
    answer: str | None = None


@dataclass(frozen=True)
class Task:
    name: str
    train: list[Example]  # the prompts rejection sampling draws completions for
    heldout: list[Example]  # the prompts pass@1 is measured on, never trained on
    verifier: str  # the default verifier, MODULE:FUNCTION
    max_new_tokens: int  # room for the longest completion and its newline
    labelled: int | None = None  # how many of `train` the corpus holds with answers (default: all)

    def corpus(self) -> str:
        """The first `labelled` training prompts with their answers, one per line: the text a
        base model is trained on. RFT samples on all training prompts, so with `labelled` below
        len(train) the rest are prompts the model learns only through its own verified answers."""
        sft = self.train[: self.labelled]
        if any(e.answer is None for e in sft):
            raise UserError(f"task {self.name!r} has examples without an answer, so it has no corpus")
        return "".join(f"{e.prompt}{e.answer}\n" for e in sft)


# --- verifiers ------------------------------------------------------------------------------


def exact_match(prompt: str, completion: str, answer: str | None) -> bool:
    """The completion, stripped of surrounding white space, equals the answer."""
    if answer is None:
        raise ValueError("exact_match needs an answer for every example")
    return completion.strip() == answer.strip()


def check_answers(task: Task, verifier: Verifier, name: str) -> None:
    """A UserError, before anything is sampled, if `verifier` compares completions with answers
    (`exact_match`) and some of the task's examples have none: every one of their samples would
    otherwise be a verifier error."""
    if verifier is not exact_match:
        return
    missing = [e for e in task.train + task.heldout if e.answer is None]
    if missing:
        total = len(task.train) + len(task.heldout)
        raise UserError(f'{len(missing)} of the {total} examples of {task.name} have no "answer" (the first: '
                        f'{quoted(missing[0].prompt, 40)}), which {name} compares with; give each line an "answer", '
                        "or a --verifier that needs none")  # fmt: skip


def addition_correct(prompt: str, completion: str, answer: str | None = None) -> bool:
    """Recomputes a + b from a prompt "a+b=", ignoring any stored answer."""
    left, _, _ = prompt.rpartition("=")
    a, plus, b = left.rpartition("+")
    if not plus:
        raise ValueError(f"not an addition prompt: {prompt!r}")
    return completion.strip() == str(int(a) + int(b))


def load_verifier(spec: str) -> Verifier:
    """Import MODULE:FUNCTION. Any failure is a one-line UserError that quotes the spec."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise UserError(f"--verifier must be MODULE:FUNCTION, got {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # ImportError, or anything the module raises while importing
        raise UserError(f"cannot import the verifier's module {module_name!r} ({type(e).__name__}: {e})") from None
    fn = getattr(module, attr, None)
    if fn is None:
        raise UserError(f"module {module_name!r} has no {attr!r} (from --verifier {spec!r})")
    if not callable(fn):
        raise UserError(f"the verifier {spec!r} is not a function (it is a {type(fn).__name__})")
    return fn


# --- the built-in task ----------------------------------------------------------------------


def addition_task(digits: int = 2, n_train: int = 5000, n_heldout: int = 500, labelled: int | None = None,
                  seed: int = 0) -> Task:  # fmt: skip
    """a + b with a, b drawn uniformly from [0, 10^digits); train and held-out pairs are distinct;
    the corpus holds the first `labelled` training pairs (default: all) with their sums."""
    if not 1 <= digits <= 9:
        raise UserError(f"digits must be between 1 and 9, got {digits}")
    space = 10 ** (2 * digits)
    if n_train + n_heldout > space:
        raise UserError(f"{digits}-digit addition has only {space} pairs, fewer than {n_train + n_heldout}")
    rng = np.random.default_rng(seed)
    codes = rng.choice(space, size=n_train + n_heldout, replace=False)
    examples = [Example(f"{c // 10**digits}+{c % 10**digits}=", str(c // 10**digits + c % 10**digits)) for c in codes]
    return Task("addition", examples[:n_train], examples[n_train:], "llmlab.tasks:exact_match", digits + 2, labelled)


BUILTIN_TASKS: dict[str, Callable[[], Task]] = {"addition": addition_task}


# --- task files -----------------------------------------------------------------------------


def load_task_file(path: Path, heldout_fraction: float = 0.2, max_new_tokens: int | None = None) -> Task:
    """A JSON-lines file of {"prompt": ..., "answer": ...}; malformed lines are a UserError."""
    from llmlab.data import read_text_file

    if not 0 < heldout_fraction < 1:  # also NaN
        raise UserError(f"the held-out fraction must be between 0 and 1, got {heldout_fraction}")
    examples = [_parse_line(path, i, line) for i, line in enumerate(read_text_file(path).splitlines(), 1)
                if line.strip()]  # fmt: skip
    n_held = round(len(examples) * heldout_fraction)
    if not 0 < n_held < len(examples):
        raise UserError(f"{path} has {len(examples)} examples: too few to hold out {heldout_fraction:.0%} of them")
    longest = max(len(e.answer or "") for e in examples)
    room = max_new_tokens if max_new_tokens is not None else max(16, 2 * longest + 2)
    return Task(path.name, examples[:-n_held], examples[-n_held:], "llmlab.tasks:exact_match", room)


def _parse_line(path: Path, number: int, line: str) -> Example:
    where = f"{path} line {number}"
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise UserError(f"{where} is not JSON ({e.msg}): {line[:60]!r}") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str) or not obj["prompt"]:
        raise UserError(f'{where} needs a non-empty string "prompt": {line[:60]!r}')
    answer = obj.get("answer")
    if answer is not None and not isinstance(answer, str):
        raise UserError(f'{where}: "answer" must be a string, got {answer!r}')
    unknown = set(obj) - {"prompt", "answer"}
    if unknown:
        raise UserError(f'{where} has an unknown key {sorted(unknown)[0]!r} (expected "prompt" and "answer")')
    return Example(obj["prompt"], answer)


def load_task(spec: str, heldout_fraction: float = 0.2) -> Task:
    """A built-in task by name, or a task file."""
    if spec in BUILTIN_TASKS:
        return BUILTIN_TASKS[spec]()
    path = Path(spec)
    if not path.exists():
        raise UserError(f"task {spec!r} is neither a built-in task ({', '.join(BUILTIN_TASKS)}) nor a file")
    return load_task_file(path, heldout_fraction)
