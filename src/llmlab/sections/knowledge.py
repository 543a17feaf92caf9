"""Tour section for notes §2.3 (knowledge storage): where a fact lives, and how to change it.

A small GPT-2-style model is trained in the tour on synthetic biographies (Allen-Zhu & Li,
arXiv 2309.14316) with their augmentations, plus question–answer pairs of half the people. Then,
on that model: it answers questions; causal tracing (arXiv 2202.05262) shows which hidden states
carry one fact; the FFN's most active memories at the subject are read as key-value pairs
(arXiv 2012.14913); ROME rewrites the fact; and KnowEdit's scores (arXiv 2401.01286) over random
single edits show what changed (the edited fact, its paraphrases) and what did not (other people,
the person's other facts). The same edits are then made at each layer in turn, beside the layer
the trace points to: whether locating a fact tells where to edit it (Hase et al., arXiv 2301.04213,
found it does not on GPT-J) is measured, not assumed.
"""

from __future__ import annotations

import html
import random
from dataclasses import replace
from pathlib import Path

from llmlab import bios
from llmlab.config import preset
from llmlab.knowledge import Fact
from llmlab.knowledge import edit as ed
from llmlab.knowledge import scores as sc
from llmlab.knowledge.keyvalue import top_memories
from llmlab.knowledge.patching import Trace, causal_trace, plot_trace
from llmlab.run_dir import Run, load_run
from llmlab.sampling import SamplingConfig, generate_text
from llmlab.sections import Section, Tour, html_img, html_table

EDITS = {True: 5, False: 20}  # random single ROME edits scored, by quick


def config(quick: bool) -> tuple[str, object, object]:
    """(data, model config, train config) of the tour's bios model."""
    people = 40 if quick else 100
    data = f"bios:people={people},augment=multi+permute+fullname,part=mixed"
    p = preset("nanogpt-shakespeare-char")
    model_cfg = replace(p.model, block_size=128, n_layers=2 if quick else 4, d_model=64 if quick else 128)
    train_cfg = replace(p.train, tokenizer="bpe", batch_size=16, max_steps=600 if quick else 1500, lr=2e-3,
                        min_lr=2e-4, warmup_steps=50, eval_interval=300, eval_iters=5,
                        max_minutes=0.3 if quick else 1.6)  # fmt: skip
    return data, model_cfg, train_cfg


def section(tour: Tour) -> Section:
    data, model_cfg, train_cfg = config(tour.quick)
    tour.log(f"a bios model on {data!r}, {train_cfg.max_steps} steps or {train_cfg.max_minutes} minutes ...")
    run_dir, summary = tour.trained("bios", model_cfg, train_cfg, data)
    run = load_run(run_dir)
    world = bios.world_of(data)
    acc = sc.extraction_accuracy(run.model, run.tokenizer, world)
    person = world.train_people[0]
    answers = _answers(run, person)
    fact = Fact(bios.prompt(person, "birth_city"), person.name, person.facts["birth_city"])
    trace = causal_trace(run.model, run.tokenizer, fact, samples=5 if tour.quick else 10)
    maps = plot_trace(trace, tour.out / "knowledge", fact.target)
    memories = top_memories(run.model, run.tokenizer, fact.text().split(person.name)[0] + person.name, k=1)
    peaks = trace.to_json()["peaks"]
    # the trace picks the site: ROME's (the subject's last token) if the MLPs matter most there, as in
    # GPT-2; else the positions that predict the answer, where a small model looks facts up. The layer
    # is ROME's default, the middle one; `by_layer` then edits at every layer
    site = "subject" if peaks["mlp"]["subject_last"] else "answer"
    params, stats, prompts = sc.prepare_edits(run, "rome", replace(ed.DEFAULTS["rome"], site=site,
                                                                  stats_tokens=20_000))  # fmt: skip
    new = next(c for c in bios.CITIES if c != person.facts["birth_city"])
    edit_demo = _edit_demo(run, world, person, new, params, stats, prompts)
    cases = sc.random_cases(world, EDITS[tour.quick])
    scores = sc.evaluate(run.model, run.tokenizer, cases, "rome", params, stats, "single", prompts)
    layers = by_layer(run, cases, params, stats, prompts, scores)
    tour.log(f"bios model: completion {acc['completion']['all']:.1%}, QA train {acc['qa_train']['all']:.1%}, "
             f"QA held-out {acc['qa_heldout']['all']:.1%}; trace peak (mlp) layer {peaks['mlp']['layer']} "
             f"token {peaks['mlp']['token_text']!r}; ROME reliability {scores['reliability']:.0%}, generalisation "
             f"{scores['generalisation']:.0%}, locality {scores['locality']:.0%} at layer {params.layers[0]}; "
             f"by layer: {_layers_line(layers)}")  # fmt: skip
    figures = {"train": summary, "data": data, "accuracy": acc, "trace": {k: v for k, v in trace.to_json().items()
               if k != "restored"}, "edit": edit_demo, "rome": scores, "rome_by_layer": layers}  # fmt: skip
    body = _html(summary, data, acc, answers, trace, maps, memories, edit_demo, scores, layers)
    return Section("Knowledge: where a fact lives and how to edit it (notes §2.3)", body, figures)


SCORES = ("reliability", "generalisation", "locality", "portability")


def by_layer(run: Run, cases: list[sc.EditCase], params: ed.EditParams, stats: ed.KeyStatistics,
             prompts: list[str], measured: dict) -> list[dict]:  # fmt: skip
    """ROME's scores over the same `cases` with the edit at each layer in turn, [{layer, reliability,
    generalisation, locality, portability, fluency}]; `measured` holds those at `params.layers`."""
    rows = []
    for layer in range(run.model.cfg.n_layers):
        if params.layers == (layer,):
            scores = measured
        else:
            at = ed.resolve_params(run.model, "rome", replace(params, layers=(layer,)))  # evaluate reads C_layer
            scores = sc.evaluate(run.model, run.tokenizer, cases, "rome", at, stats, "single", prompts)
        rows.append({"layer": layer, **{k: scores[k] for k in (*SCORES, "fluency")}})
    return rows


def _layers_line(layers: list[dict]) -> str:
    """Each layer's reliability/generalisation/locality in one line, as in `0: 100/92/59%, 1: …`."""
    return ", ".join(f"{r['layer']}: " + "/".join(f"{100 * r[k]:.0f}" for k in SCORES[:3]) + "%" for r in layers)


def _answers(run: Run, person: bios.Person) -> list[tuple[str, str, str]]:
    out = []
    for attribute in ("birth_city", "employer", "major"):
        q = bios.question(person, attribute)
        text = generate_text(run.model, run.tokenizer, q, 8, SamplingConfig(0.0), stop=["."]).text
        out.append((q, text.strip(), person.facts[attribute]))
    return out


def _edit_demo(run: Run, world: bios.World, person: bios.Person, new: str, params: ed.EditParams,
               stats: ed.KeyStatistics, prompts: list[str]) -> dict:  # fmt: skip
    case = sc.bios_case(world, person, "birth_city", new, random.Random(0))
    req = ed.prepare(run.tokenizer, case.request, prompts, run.model.cfg.block_size)
    probe = [case.request, case.paraphrases[0], case.paraphrases[-1], case.neighbours[0], case.neighbours[-1]]
    before = [_greedy(run, f) for f in probe]
    saved = ed.snapshot(run.model, params.layers or ())
    result = ed.apply_edits(run.model, "rome", [req], stats, params)
    after = [_greedy(run, f) for f in probe]
    ed.restore(run.model, saved)
    return {"layer": result.layers[0], "site": params.site, "seconds": result.seconds, "new": new,
            "rows": [(f.text(), b, a) for f, b, a in zip(probe, before, after, strict=True)]}  # fmt: skip


def _greedy(run: Run, fact: Fact) -> str:
    return generate_text(run.model, run.tokenizer, fact.text(), 6, SamplingConfig(0.0), stop=[".", "?"]).text.strip()


def _where(trace: Trace) -> str:
    token = trace.peak("mlp")[0]
    if token == trace.subject[-1]:
        return ("The MLPs matter most at the subject's last token: the fact is recalled there and moved to the "
                "last token by attention, as ROME found in GPT-2.")  # fmt: skip
    if token in trace.subject:
        return (f"The MLPs matter most at the subject's token {trace.tokens[token]!r}, not its last: this model "
                "has not learnt to gather the name before looking the fact up.")  # fmt: skip
    if token == len(trace.tokens) - 1:
        return (
            "The MLPs matter most at the prompt's last token, not at the subject's last token as in GPT-2 "
            "(ROME §2): this small model gathers the name's tokens with attention and looks the fact up at the "
            "last position."
        )
    return f"The MLPs matter most at token {token} ({trace.tokens[token]!r})."


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{x:.1%}"


def _html(summary: dict, data: str, acc: dict, answers: list, trace: Trace, maps: list[Path], memories: list,
          demo: dict, scores: dict, layers: list[dict]) -> str:  # fmt: skip
    acc_rows = [(g, _pct(acc[g]["all"]), *(_pct(acc[g][a]) for a in bios.ATTRIBUTES))
                for g in ("completion", "qa_train", "qa_heldout")]  # fmt: skip
    peaks = "; ".join(f"{k} at layer {v['layer']}, token {v['token_text']!r} ({v['effect']:+.3f})"
                      for k, v in trace.to_json()["peaks"].items())  # fmt: skip
    neurons = [(str(m.layer), str(m.neuron), f"{m.activation:.2f}", " ".join(repr(t) for t in m.promotes))
               for ms in memories for m in ms]  # fmt: skip
    return (
        f"<p>Data <code>{html.escape(data)}</code>: each person's six facts in 5 biographies, sentences "
        "permuted, the full name in every sentence, plus the question–answer pairs of the first half of the "
        f"people. GPT-2 style, {summary['params']:,} parameters, {summary['steps']:,} steps in "
        f"{summary['elapsed_seconds']:.0f} s, val loss {summary['val_loss']:.3f}.</p>"
        '<p>Exact-match accuracy (every answer token the argmax): completion of "… was born in" and the '
        "like for everyone; questions for the half whose QA pairs were trained on, and for the held-out half.</p>"
        + html_table(acc_rows, ("", "all", *bios.ATTRIBUTES))
        + html_table(answers, ("question", "the model (greedy)", "truth"))
        + f"<h3>Causal tracing</h3><p>{html.escape(''.join(trace.tokens))!r} → p* = {trace.p_clean:.3f} "
        f"clean, p₀ = {trace.p_corrupt:.3f} with noise of std {trace.noise_std:.2f} (3σ) on the subject's "
        f"embeddings. Largest indirect effects: {html.escape(peaks)}. "
        + _where(trace)
        + "</p>"
        + "".join(html_img(p, p.stem) for p in maps)
        + "<h3>The FFN as memory: the most active neuron of each layer at the subject's last token</h3>"
        + html_table(neurons, ("layer", "neuron", "m_i", "E·v_i promotes"))
        + f"<h3>ROME: birth city → {html.escape(demo['new'])}</h3><p>Key k* read at the "
        + (
            "subject's last token, as in ROME"
            if demo["site"] == "subject"
            else "positions that predict the answer (the prompt's last token, then each answer token but the "
            "last), where this model looks facts up; ROME reads it at the subject's last token, where GPT-2's traces "
            "peak"
        )
        + f"; layer {demo['layer']}, {demo['seconds']:.2f} s.</p>"
        + html_table(demo["rows"], ("prompt", "before (greedy)", "after"))
        + f"<p>Over {scores['edits']} random single edits, each on the original model: reliability "
        f"{_pct(scores['reliability'])}, generalisation {_pct(scores['generalisation'])}, locality "
        f"{_pct(scores['locality'])}, portability {_pct(scores['portability'])} (of the employer edits: a new "
        "employer brings its city); "
        "fluency (n-gram entropy) "
        f"{scores['fluency']:.2f} after, {scores['fluency_before']:.2f} before; {scores['seconds_per_edit']:.2f} s "
        "per edit.</p>" + _layers_html(layers, trace.peak("mlp")[1], demo["layer"], scores["edits"])
    )


def _layers_html(layers: list[dict], peak: int, default: int, edits: int) -> str:
    """The by-layer table, the trace's MLP peak and the default layer marked, and what it shows."""

    def mark(layer: int) -> str:
        return " ".join(m for m, at in (("trace peak (mlp)", peak), ("default (middle)", default)) if at == layer)

    rows = [(str(r["layer"]), *(_pct(r[k]) for k in SCORES), f"{r['fluency']:.2f}", mark(r["layer"])) for r in layers]
    best = max(layers, key=lambda r: (r["reliability"] + r["generalisation"] + r["locality"], -r["layer"]))
    verdict = ("the layer the trace points to also edits best" if best["layer"] == peak else
               f"the trace points to layer {peak}, but layer {best['layer']} edits best, as Hase et al. (arXiv "
               "2301.04213) found on GPT-J: where tracing localises a fact does not tell where to edit it")  # fmt: skip
    return (
        f"<h3>ROME at each layer</h3><p>The same {edits} edits, made at each layer in turn. By the sum of "
        f"reliability, generalisation and locality, {verdict}.</p>"
        + html_table(rows, ("layer", *SCORES, "fluency", ""))
    )
