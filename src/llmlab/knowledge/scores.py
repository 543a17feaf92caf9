"""Scores of an edit (notes §2.3), as KnowEdit (arXiv 2401.01286) and CounterFact (arXiv 2202.05262) define them.

For an answer o = (o_1 … o_T) after a prompt, teacher-forced (the prompt and the right o_<j in
context), the token accuracy is acc = (1/T) Σ_j [argmax p(· | prompt, o_<j) = o_j].

    reliability      acc of the new answer on the edited prompt (edit success)
    generalisation   acc of the new answer on paraphrases of the prompt
    locality         the fraction of answer tokens whose argmax did not change, on prompts about
                     other people and about the same person's other attributes (KnowEdit's
                     comparison of post-edit with pre-edit predictions)
    portability      acc of the answer implied by the edit on a derived fact: a new employer
                     brings a new work city
    fluency          CounterFact's n-gram entropy of generated text,
                     (1/2) · (2/3 · H₂ + 4/3 · H₃),  H_n = −Σ f(g) log₂ f(g) over the n-grams g

Extraction accuracy (Allen-Zhu & Li, arXiv 2309.14316) is exact match: every answer token is
the argmax, i.e. greedy decoding writes the answer.

`evaluate` edits and scores in memory (single edits, sequential, or one batch); `edit_run` and
`evaluate_run` do the same for run directories (what `llmlab knowledge edit|eval` call), and
`write_edited_run` writes an edited model as a new run, never touching the source.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
import tempfile
from collections import Counter
from collections.abc import Callable, Collection, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from llmlab import bios
from llmlab.data import read_splits
from llmlab.errors import UserError
from llmlab.knowledge import Fact, answer_logprob, edit, encode_all, teacher_forced
from llmlab.model import GPT
from llmlab.run_dir import DIR_MODE, Run, check_makeable, config_json, load_run, save_weights, write_json, write_text
from llmlab.sampling import SamplingConfig, generate_batch
from llmlab.tokenizer import Tokenizer


def token_accuracy(logits: Tensor, target: Sequence[int]) -> float:
    """acc = (1/T) Σ_j [argmax logits_j = o_j]. logits [T, V]. (Counted, then divided in Python: a
    float32 mean would print 4/5 as 0.800000011920929.)"""
    return int((logits.argmax(-1) == torch.tensor(list(target))).sum()) / len(target)


def exact_match(logits: Tensor, target: Sequence[int]) -> bool:
    return bool((logits.argmax(-1) == torch.tensor(list(target))).all())


def agreement(before: Sequence[int], after: Sequence[int]) -> float:
    """The fraction of positions where two argmax sequences agree (locality)."""
    return sum(a == b for a, b in zip(before, after, strict=True)) / len(before)


def n_gram_entropy(text: str, ns: Sequence[int] = (2, 3), weights: Sequence[float] = (2 / 3, 4 / 3)) -> float:
    """Mean over n of w_n · H_n, H_n the entropy in bits of the text's word n-gram frequencies."""
    words = re.findall(r"\w+|[^\w\s]", text)
    out = []
    for n, w in zip(ns, weights, strict=True):
        counts = Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
        total = sum(counts.values())
        out.append(w * -sum(c / total * math.log2(c / total) for c in counts.values()) if total else 0.0)
    return sum(out) / len(out)


@dataclass
class EditCase:
    request: Fact  # the edit: prompt, subject, new answer
    paraphrases: list[Fact] = field(default_factory=list)  # same question, other words; the new answer
    neighbours: list[Fact] = field(default_factory=list)  # answers that must not change
    portability: list[Fact] = field(default_factory=list)  # answers the edit implies
    label: str = ""  # what kind of fact, e.g. the bios attribute, for a breakdown of the scores


@dataclass
class CaseScores:
    reliability: float
    generalisation: float | None
    locality: float | None
    portability: float | None


def argmaxes(model: GPT, tokenizer: Tokenizer, facts: Sequence[Fact]) -> list[list[int]]:
    """The model's teacher-forced argmax at each answer position of each fact."""
    if not facts:
        return []
    encoded = encode_all(tokenizer, facts, model.cfg.block_size)
    return [x.argmax(-1).tolist() for x in teacher_forced(model, encoded)]


def accuracies(model: GPT, tokenizer: Tokenizer, facts: Sequence[Fact]) -> list[float]:
    if not facts:
        return []
    encoded = encode_all(tokenizer, facts, model.cfg.block_size)
    return [token_accuracy(x, e.target) for x, e in zip(teacher_forced(model, encoded), encoded, strict=True)]


def score_case(model: GPT, tokenizer: Tokenizer, case: EditCase, before: list[list[int]]) -> CaseScores:
    """Scores of one case on the edited model; `before` is `argmaxes` of its neighbours pre-edit."""
    acc = accuracies(model, tokenizer, [case.request, *case.paraphrases, *case.portability])
    after = argmaxes(model, tokenizer, case.neighbours)
    n_para = len(case.paraphrases)
    return CaseScores(
        reliability=acc[0],
        generalisation=_mean(acc[1 : 1 + n_para]),
        locality=_mean([agreement(b, a) for b, a in zip(before, after, strict=True)]),
        portability=_mean(acc[1 + n_para :]),
    )


def summarise(scores: Sequence[CaseScores]) -> dict[str, float | None]:
    """Each score's mean over the cases that have it."""
    keys = asdict(scores[0]) if scores else {}
    return {k: _mean([v for s in scores if (v := getattr(s, k)) is not None]) for k in keys}


def fluency(model: GPT, tokenizer: Tokenizer, prompts: Sequence[str], new_tokens: int = 40, seed: int = 0) -> float:
    """Mean n-gram entropy of sampled continuations (top-k 5) of the prompts."""
    texts = generate_batch(model, tokenizer, list(prompts), new_tokens, SamplingConfig(1.0, top_k=5), seed=seed)
    return sum(n_gram_entropy(p + t) for p, t in zip(prompts, texts, strict=True)) / len(texts)


def _mean(xs: Sequence[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


# --- the bios world: edit cases and extraction accuracy -------------------------------------------


def bios_case(world: bios.World, person: bios.Person, attribute: str, new: str, rng: random.Random,
              neighbours: int = 5, edited: Collection[tuple[str, str]] = ()) -> EditCase:  # fmt: skip
    """Edit `attribute` of `person` to `new` with the first template as the prompt; paraphrases are
    the other templates and, if the model was trained on questions, the question; neighbours are
    that attribute of other people and this person's other attributes, none of them a fact in
    `edited` ((name, attribute) pairs edited along with this one, which are meant to change); an
    employer edit carries the new employer's city (portability)."""
    fact = Fact(bios.prompt(person, attribute), person.name, new)
    paraphrases = [Fact(bios.prompt(person, attribute, t), person.name, new)
                   for t in range(1, len(bios.TEMPLATES[attribute]))]  # fmt: skip
    if world.questions:
        paraphrases.append(Fact(bios.question_prompt(attribute), person.name, new))
    candidates = [p for p in world.people if p is not person and (p.name, attribute) not in edited]
    others = rng.sample(candidates, min(neighbours, len(candidates)))
    near = [Fact(bios.prompt(o, attribute), o.name, o.facts[attribute]) for o in others]
    derived = {"employer": "work_city"}
    near += [Fact(bios.prompt(person, a), person.name, person.facts[a]) for a in bios.ATTRIBUTES
             if a != attribute and a != derived.get(attribute) and (person.name, a) not in edited]  # fmt: skip
    portability = []
    if attribute == "employer":
        city = bios.COMPANY_CITY[new]
        portability = [Fact(bios.prompt(person, "work_city"), person.name, city)]
        if world.questions:
            portability.append(Fact(bios.question_prompt("work_city"), person.name, city))
    return EditCase(fact, paraphrases, near, portability, attribute)


def random_cases(world: bios.World, n: int, seed: int = 0) -> list[EditCase]:
    """n edits of distinct (person, attribute) pairs to a different value of the same pool."""
    rng = random.Random(f"edits-{seed}")
    pairs = rng.sample([(p, a) for p in world.people for a in bios.BASE_ATTRIBUTES],
                       min(n, len(world.people) * len(bios.BASE_ATTRIBUTES)))  # fmt: skip
    edited = {(person.name, attribute) for person, attribute in pairs}
    cases = []
    for person, attribute in pairs:
        new = rng.choice([v for v in _pool(attribute, rng) if v != person.facts[attribute]])
        cases.append(bios_case(world, person, attribute, new, rng, edited=edited))
    return cases


def _pool(attribute: str, rng: random.Random) -> Sequence[str]:
    if attribute == "birth_date":  # 16,800 dates: a sample is enough to draw from
        return rng.sample(bios.values("birth_date"), 50)
    return bios.values(attribute)


def cases_for(world: bios.World | None, facts: Sequence[Fact], seed: int = 0) -> list[EditCase]:
    """The cases of edits made together, their neighbours drawn by one RNG seeded with `seed` (so
    `knowledge edit` and `knowledge eval` of its run score the same neighbours), none of them one
    of these facts."""
    rng = random.Random(seed)
    edited = {(f.subject, attribute) for f in facts if (attribute := _bios_attribute(world, f)) is not None}
    return [case_for(world, f, rng, edited) for f in facts]


def case_for(world: bios.World | None, fact: Fact, rng: random.Random,
             edited: Collection[tuple[str, str]] = ()) -> EditCase:  # fmt: skip
    """The full case when the fact is a bios template about a person of the world, else the bare request."""
    attribute = _bios_attribute(world, fact)
    if world is None or attribute is None:
        return EditCase(fact)
    person = world.person(fact.subject)
    case = bios_case(world, person, attribute, fact.target, rng, edited=edited)
    prompts = [bios.prompt(person, attribute, t) for t in range(len(bios.TEMPLATES[attribute]))]
    prompts += [bios.question_prompt(attribute)] if world.questions else []
    paraphrases = [Fact(p, fact.subject, fact.target) for p in prompts if p != fact.prompt]
    return EditCase(fact, paraphrases, case.neighbours, case.portability, attribute)


def _bios_attribute(world: bios.World | None, fact: Fact) -> str | None:
    """The attribute a fact's prompt asks about, when it is a template about a person of the world."""
    person = world.person(fact.subject) if world is not None else None
    if person is None:
        return None
    for attribute in bios.ATTRIBUTES:
        if fact.prompt in (bios.prompt(person, attribute, t) for t in range(len(bios.TEMPLATES[attribute]))):
            return attribute
    return None


def extraction_accuracy(model: GPT, tokenizer: Tokenizer, world: bios.World) -> dict[str, dict[str, float]]:
    """Exact-match accuracy per attribute: QA on the training half and on the held-out half, and
    completion of the first biography template ("{} was born in") for everyone."""
    groups = {
        "qa_heldout": [(p, a, Fact(bios.question_prompt(a), p.name, p.facts[a]))
                       for p in world.test_people for a in bios.ATTRIBUTES],
        "qa_train": [(p, a, Fact(bios.question_prompt(a), p.name, p.facts[a]))
                     for p in world.train_people for a in bios.ATTRIBUTES],
        "completion": [(p, a, Fact(bios.prompt(p, a), p.name, p.facts[a]))
                       for p in world.people for a in bios.ATTRIBUTES],
    }  # fmt: skip
    out = {}
    for group, rows in groups.items():
        encoded = encode_all(tokenizer, [f for _, _, f in rows], model.cfg.block_size)
        hits = [exact_match(x, e.target) for x, e in zip(teacher_forced(model, encoded), encoded, strict=True)]
        per = {a: _mean([float(h) for (_, b, _), h in zip(rows, hits, strict=True) if b == a]) for a in bios.ATTRIBUTES}
        out[group] = {"all": sum(hits) / len(hits), **per}
    return out


# --- editing and scoring in one go ---------------------------------------------------------------


def evaluate(model: GPT, tokenizer: Tokenizer, cases: Sequence[EditCase], method: str, params: edit.EditParams,
             stats: Callable[[int], Tensor], mode: str = "single", contexts: Sequence[str] = (),
             fluency_tokens: int = 40) -> dict[str, Any]:  # fmt: skip
    """Edit and score. mode single: each edit alone on the original model (undone after scoring);
    sequential: one after the other, scored after the last; batch: all in one call of the editor.
    The model is restored at the end. `params` must come from `edit.resolve_params`."""
    if mode not in MODES:
        raise UserError(f"unknown mode {mode!r} (choose from: {', '.join(MODES)})")
    requests = [edit.prepare(tokenizer, c.request, contexts, model.cfg.block_size) for c in cases]
    before = [argmaxes(model, tokenizer, c.neighbours) for c in cases]
    prompts = [c.request.text() for c in cases]
    # before as after: in single mode each prompt is continued alone, else all in one batch (its
    # samples depend on the batch: `generate_batch` draws for all rows from one generator)
    groups = [[text] for text in prompts] if mode == "single" else [prompts]
    fluency_before = sum(fluency(model, tokenizer, g, fluency_tokens) for g in groups) / len(groups)
    saved = edit.snapshot(model, params.layers or ())
    seconds, scores, after = 0.0, [], []
    try:
        if mode == "single":
            for case, req, b, text in zip(cases, requests, before, prompts, strict=True):
                seconds += edit.apply_edits(model, method, [req], stats, params).seconds
                scores.append(score_case(model, tokenizer, case, b))
                after.append(fluency(model, tokenizer, [text], fluency_tokens))
                edit.restore(model, saved)
        else:
            chunks = [[r] for r in requests] if mode == "sequential" else [list(requests)]
            seconds = sum(edit.apply_edits(model, method, chunk, stats, params).seconds for chunk in chunks)
            scores = [score_case(model, tokenizer, c, b) for c, b in zip(cases, before, strict=True)]
            after = [fluency(model, tokenizer, prompts, fluency_tokens)]
    finally:
        edit.restore(model, saved)
    labels = sorted({c.label for c in cases if c.label})
    by_label = {k: summarise([s for s, c in zip(scores, cases, strict=True) if c.label == k]) for k in labels}
    return {
        "method": method, "mode": mode, "edits": len(cases), "layers": list(params.layers or ()),
        "site": None if method == "ft-l" else params.site,
        **summarise(scores), "fluency_before": fluency_before, "fluency": sum(after) / len(after),
        "seconds_per_edit": seconds / len(cases), "by_label": by_label,
    }  # fmt: skip


MODES = ("single", "sequential", "batch")


# --- run directories -------------------------------------------------------------------------------


def _train_tokens(run: Run) -> np.ndarray | None:
    folder = run.path / "data"
    if not (folder / "meta.json").is_file():
        return None
    return read_splits(folder, run.model_cfg.vocab_size, checked=("train",)).train


def prepare_edits(
    run: Run, method: str, params: edit.EditParams | None, stats: edit.KeyStatistics | None = None
) -> tuple[edit.EditParams, edit.KeyStatistics, list[str]]:
    """Resolved parameters, the key statistics C (estimated now unless ft-l, or taken from `stats`
    where it holds them for the same number of tokens) and the context prefixes."""
    params = edit.resolve_params(run.model, method, params)
    tokens = _train_tokens(run)
    if stats is None or stats.n_tokens != params.stats_tokens:
        stats = edit.KeyStatistics(run.model, tokens, params.stats_tokens, read_dirs=[run.path])
    if method != "ft-l":
        stats.ensure(params.layers or ())
    contexts = edit.context_prefixes(run.tokenizer, tokens, params.contexts) if tokens is not None else []
    return params, stats, contexts


def edit_run(source: str | Path, out: str | Path, method: str, facts: Sequence[Fact], params: edit.EditParams | None,
             device: str = "cpu") -> dict[str, Any]:  # fmt: skip
    """Edit the model of run `source`, score the edits, and write the edited run to `out` (a new folder)."""
    edit.check_method(method)
    out = Path(out)
    if out.exists():
        raise UserError(f"{out} already exists; choose a new --out (the source run is never overwritten)")
    check_makeable(out)
    if Path(source).resolve() in out.resolve().parents:
        raise UserError(f"--out {out} is inside the source run {source}; write the edited run somewhere else")
    run = load_run(source, device)
    report, params, stats = edit_and_score(run, method, facts, params)
    out.parent.mkdir(parents=True, exist_ok=True)  # as train and score make theirs
    write_edited_run(run, out, method, params, facts, stats if method != "ft-l" else None)
    return {"run": str(out), "source": str(run.path), **report}


def edit_and_score(run: Run, method: str, facts: Sequence[Fact], params: edit.EditParams | None,
                   stats: edit.KeyStatistics | None = None,
                   ) -> tuple[dict[str, Any], edit.EditParams, edit.KeyStatistics]:  # fmt: skip
    """Edit `run.model` in place and score the edits (what `knowledge edit` reports, without
    writing a run): → (report, the resolved parameters, the key statistics used). `stats` may
    hold C from earlier calls; it is valid only for the weights it was estimated on, so a caller
    that keeps it must undo each edit (as the web app does)."""
    world = bios.world_of(run.meta.get("data", ""))
    cases = cases_for(world, facts)
    encode_all(run.tokenizer, [f for c in cases for f in (c.request, *c.paraphrases, *c.neighbours)],
               run.model.cfg.block_size)  # bad input fails here, before any work  # fmt: skip
    earlier = stats.seconds if stats is not None else 0.0  # what a kept `stats` had spent estimating
    params, kept, contexts = prepare_edits(run, method, params, stats)
    earlier, stats = (earlier if kept is stats else 0.0), kept
    requests = [edit.prepare(run.tokenizer, c.request, contexts, run.model.cfg.block_size) for c in cases]
    before = [argmaxes(run.model, run.tokenizer, c.neighbours) for c in cases]
    p_before = _probabilities(run.model, run.tokenizer, facts)
    result = edit.apply_edits(run.model, method, requests, stats, params)
    scores = [score_case(run.model, run.tokenizer, c, b) for c, b in zip(cases, before, strict=True)]
    report = {  # FT-L fine-tunes W₂ towards the answer: it has no site
        "method": method, "site": None if method == "ft-l" else params.site, "layers": list(params.layers or ()),
        "edits": len(facts), "seconds": result.seconds, "stats_seconds": stats.seconds - earlier,
        "p_target_before": _mean(p_before),
        "p_target_after": _mean(_probabilities(run.model, run.tokenizer, facts)), **summarise(scores),
    }  # fmt: skip
    return report, params, stats


def write_edited_run(run: Run, out: Path, method: str, params: edit.EditParams, facts: Sequence[Fact],
                     stats: edit.KeyStatistics | None) -> None:  # fmt: skip
    """A new run directory: the source's config, tokenizer and token cache, the edited weights, the
    edits so far (knowledge/edits.jsonl) and the key statistics. Written to a temporary folder and
    renamed into place, so `out` is complete or absent; the source is only read."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    os.chmod(tmp, DIR_MODE)  # mkdtemp makes 0700
    try:
        if (run.path / "data").is_dir():
            shutil.copytree(run.path / "data", tmp / "data")
        if (run.path / "knowledge").is_dir():
            shutil.copytree(run.path / "knowledge", tmp / "knowledge")
        old = tmp / "knowledge" / "edits.jsonl"
        earlier = [line for line in old.read_text(encoding="utf-8").splitlines() if line] if old.exists() else []
        batch = 1 + max((json.loads(line).get("batch", 0) for line in earlier), default=0)  # this `edit` call
        history = [{"method": method, "layers": list(params.layers or ()), **asdict(f), "batch": batch}
                   for f in facts]  # fmt: skip
        lines = earlier + list(map(json.dumps, history))
        write_text(old, "\n".join(lines) + "\n")
        write_text(tmp / "tokenizer.json", run.tokenizer.to_json())
        write_json(tmp / "config.json", config_json(run.model_cfg, run.train_cfg, **{**run.meta,
                   "edited_from": str(run.path), "edit_params": {**asdict(params), "method": method}}))  # fmt: skip
        save_weights(tmp / "model.safetensors", run.model)
        if stats is not None:
            stats.save(tmp)
        os.rename(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def evaluate_run(path: str | Path, method: str | None, facts: Sequence[Fact] | None, n_edits: int | None = None,
                 mode: str = "single", seed: int = 0, params: edit.EditParams | None = None,
                 device: str = "cpu") -> dict[str, Any]:  # fmt: skip
    """Without a method: extraction accuracy of a bios run, or the scores of an edited run's edits
    against its source. With one: edit (the given facts, or `n_edits` random bios edits: by default
    100, or every fact of a smaller world) and score."""
    run = load_run(path, device)
    world = bios.world_of(run.meta.get("data", ""))
    if method is None:
        if facts:
            raise UserError("--requests needs --method to say how to make the edits")
        if "edited_from" in run.meta:
            return _score_edited(run, world)
        if world is None:
            raise UserError(f"{run.path} was not trained on bios data; give --method and --requests to edit it")
        return {"run": str(run.path), "data": run.meta["data"], **extraction_accuracy(run.model, run.tokenizer, world)}
    if n_edits is not None and n_edits < 1:
        raise UserError(f"--edits must be at least 1, got {n_edits}")
    if world is None and not facts:
        raise UserError(f"{run.path} was not trained on bios data, so there are no random edits; give --requests")
    if not facts:
        pairs = len(world.people) * len(bios.BASE_ATTRIBUTES)
        if n_edits is not None and n_edits > pairs:
            raise UserError(f"--edits {n_edits}: {run.path} knows {len(world.people)} people × "
                            f"{len(bios.BASE_ATTRIBUTES)} attributes = {pairs} facts to edit")  # fmt: skip
        n_edits = min(100, pairs) if n_edits is None else n_edits
    cases = cases_for(world, facts, seed) if facts else random_cases(world, n_edits, seed)
    if mode not in MODES:
        raise UserError(f"unknown mode {mode!r} (choose from: {', '.join(MODES)})")
    params, stats, contexts = prepare_edits(run, method, params)
    report = evaluate(run.model, run.tokenizer, cases, method, params, stats, mode, contexts)
    return {"run": str(run.path), **report, "stats_seconds": stats.seconds}


def _score_edited(run: Run, world: bios.World | None) -> dict[str, Any]:
    source = load_run(run.meta["edited_from"], next(run.model.parameters()).device)
    batches: dict[int, list[Fact]] = {}  # one per `knowledge edit` call, in order (0: written before batches)
    for e in map(json.loads, _lines(run.path)):
        batches.setdefault(e.get("batch", 0), []).append(Fact(e["prompt"], e["subject"], e["target"]))
    facts = [f for batch in batches.values() for f in batch]
    cases = [c for batch in batches.values() for c in cases_for(world, batch)]  # as each call drew them
    before = [argmaxes(source.model, source.tokenizer, c.neighbours) for c in cases]
    scores = [score_case(run.model, run.tokenizer, c, b) for c, b in zip(cases, before, strict=True)]
    return {"run": str(run.path), "source": str(source.path), "edits": len(facts), **summarise(scores)}


def _lines(path: Path) -> list[str]:
    return [line for line in (path / "knowledge" / "edits.jsonl").read_text(encoding="utf-8").splitlines() if line]


def _probabilities(model: GPT, tokenizer: Tokenizer, facts: Sequence[Fact]) -> list[float]:
    encoded = encode_all(tokenizer, facts, model.cfg.block_size)
    return [answer_logprob(x, e.target).exp().item() for x, e in zip(teacher_forced(model, encoded), encoded,
                                                                        strict=True)]  # fmt: skip
