"""Edit scores (KnowEdit, arXiv 2401.01286; CounterFact, arXiv 2202.05262), computed by hand on stub models."""

from __future__ import annotations

import math
import random
from dataclasses import replace

import pytest
import torch
from scipy.stats import entropy

from llmlab import bios
from llmlab.errors import UserError
from llmlab.knowledge import Fact
from llmlab.knowledge import edit as ed
from llmlab.knowledge import scores as sc
from llmlab.model import GPT
from llmlab.tokenizer import CharTokenizer
from tests.conftest import TINY

TOK = CharTokenizer.train(" abcdefg")  # ' '=0, a=1, ..., g=7


class Successor(GPT):
    """Predicts token id + 1 (mod V) after every token, with certainty."""

    def forward(self, idx, cache=None):
        return 20.0 * torch.nn.functional.one_hot((idx + self.shift) % 8, 8).float()

    shift = 1


def stub(shift: int = 1) -> GPT:
    model = Successor(replace(TINY, vocab_size=8))
    model.shift = shift
    return model


def test_token_accuracy_by_hand():
    """The prompt "ab c" and the answer " ef", tokens ' ', 'e', 'f'. After 'c' the stub says 'd'
    (wrong), after ' ' it says 'a' (wrong), after 'e' it says 'f' (right): 1/3."""
    fact = Fact("{} c", "ab", "ef")
    assert sc.accuracies(stub(), TOK, [fact]) == [pytest.approx(1 / 3)]
    assert sc.argmaxes(stub(), TOK, [fact]) == [[TOK.encode("d")[0], TOK.encode("a")[0], TOK.encode("f")[0]]]
    assert sc.accuracies(stub(), TOK, [Fact("{} c", "ab", "d")]) == [0.0]  # " d": after 'c' comes 'd', not ' '
    assert sc.accuracies(stub(), TOK, [Fact("{} c ", "ab", "a")]) == [1.0]  # the prompt ends in a space: "a" after " "


def test_locality_compares_argmaxes_before_and_after():
    """Neighbour "{} c" + " ef": argmaxes d, a, f under shift 1 and e, b, g under shift 2: no agreement;
    the same model agrees with itself everywhere."""
    case = sc.EditCase(Fact("{} c ", "ab", "a"), neighbours=[Fact("{} c", "ab", "ef")])
    before = sc.argmaxes(stub(1), TOK, case.neighbours)
    assert sc.score_case(stub(1), TOK, case, before).locality == 1.0
    assert sc.score_case(stub(2), TOK, case, before).locality == 0.0
    assert sc.agreement([1, 2, 3, 4], [1, 0, 3, 0]) == 0.5


def test_score_case_and_summary():
    case = sc.EditCase(
        Fact("{} c ", "ab", "a"),  # right: after ' ' comes 'a'
        paraphrases=[Fact("{} c", "ab", "ef"), Fact("{} ", "ab", "a")],  # 1/3 and 1
        portability=[Fact("{} ", "ab", "b")],  # wrong
    )
    s = sc.score_case(stub(), TOK, case, [])
    assert (s.reliability, s.generalisation, s.locality, s.portability) == (1.0, pytest.approx(2 / 3), None, 0.0)
    summary = sc.summarise([s, sc.CaseScores(0.0, None, 0.5, None)])
    assert summary == {"reliability": 0.5, "generalisation": pytest.approx(2 / 3), "locality": 0.5,
                       "portability": 0.0}  # fmt: skip


def test_n_gram_entropy_by_hand_and_against_scipy():
    """For "a b a b": bigrams ab, ba, ab → H₂ = H(2/3, 1/3); trigrams aba, bab → H₃ = 1 bit;
    score = (2/3 · H₂ + 4/3 · H₃) / 2."""
    h2, h3 = entropy([2, 1], base=2), entropy([1, 1], base=2)
    assert sc.n_gram_entropy("a b a b") == pytest.approx((2 / 3 * h2 + 4 / 3 * h3) / 2)
    text = "the cat sat on the mat . the cat ran"
    words = text.split()
    tri = [tuple(words[i : i + 3]) for i in range(len(words) - 2)]
    bi = [tuple(words[i : i + 2]) for i in range(len(words) - 1)]
    counts = [list({g: bi.count(g) for g in bi}.values()), list({g: tri.count(g) for g in tri}.values())]
    want = (2 / 3 * entropy(counts[0], base=2) + 4 / 3 * entropy(counts[1], base=2)) / 2
    assert sc.n_gram_entropy(text) == pytest.approx(want)
    assert sc.n_gram_entropy("same same same same") == pytest.approx(0.0)
    assert sc.n_gram_entropy("one") == 0.0
    assert math.isclose(sc.n_gram_entropy("a, b!"), sc.n_gram_entropy("a , b !"))


def test_bios_cases_have_paraphrases_neighbours_and_the_derived_fact():
    world = bios.world_of("bios:people=20,part=mixed")  # trained on questions too
    person = world.people[0]
    new = next(c for c in bios.COMPANIES if c != person.facts["employer"])
    case = sc.bios_case(world, person, "employer", new, random.Random(0))
    assert case.request == Fact("{} worked for", person.name, new)
    assert len(case.paraphrases) == 4 and all(f.target == new and f.subject == person.name for f in case.paraphrases)
    assert case.paraphrases[-1].prompt == "Which company did {} work for? Answer:"
    no_questions = sc.bios_case(bios.world_of("bios:people=20"), person, "employer", new, random.Random(0))
    assert no_questions.paraphrases == case.paraphrases[:3] and len(no_questions.portability) == 1
    others = [f for f in case.neighbours if f.subject != person.name]
    same = [f for f in case.neighbours if f.subject == person.name]
    assert len(others) == 5 and all(world.person(f.subject).facts["employer"] == f.target for f in others)
    assert {f.target for f in same} == {person.facts[a] for a in ("birth_date", "birth_city", "university", "major")}
    assert case.portability == [Fact("{} worked in", person.name, bios.COMPANY_CITY[new]),
                                Fact("Where did {} work? Answer:", person.name, bios.COMPANY_CITY[new])]  # fmt: skip
    assert sc.bios_case(world, person, "major", "Art", random.Random(0)).portability == []


def test_random_cases_change_distinct_facts_to_new_values():
    world = bios.make_world(30)
    cases = sc.random_cases(world, 40, seed=1)
    pairs = [(c.request.subject, c.request.prompt) for c in cases]
    assert len(set(pairs)) == 40
    for c in cases:
        person = world.person(c.request.subject)
        attribute = next(a for a in bios.BASE_ATTRIBUTES if bios.prompt(person, a) == c.request.prompt)
        assert c.request.target != person.facts[attribute] and c.request.target in bios.values(attribute)
    assert [c.request for c in sc.random_cases(world, 40, seed=1)] == [c.request for c in cases]


def test_facts_edited_together_are_not_each_others_neighbours():
    """Locality asks whether facts that were not edited kept their answers; a fact edited in the
    same batch is meant to change. Reference: the set of edited (person, attribute) pairs."""
    world = bios.make_world(12)
    facts = [Fact(bios.prompt(p, a), p.name, "Boston") for p in world.people[:6] for a in ("birth_city", "major")]
    edited = {(p.name, a) for p in world.people[:6] for a in ("birth_city", "major")}

    def attribute(f):
        return next(a for a in bios.ATTRIBUTES if bios.prompt(world.person(f.subject), a) == f.prompt)

    assert {(c.request.subject, attribute(c.request)) for c in sc.cases_for(world, facts)} == edited
    for cases in (sc.cases_for(world, facts), sc.random_cases(world, 40, seed=2)):
        together = {(c.request.subject, attribute(c.request)) for c in cases}
        for c in cases:
            assert c.neighbours and not {(n.subject, attribute(n)) for n in c.neighbours} & together
    alone = sc.cases_for(world, facts[:1])[0]  # one edit: the same neighbours as case_for draws
    assert alone == sc.case_for(world, facts[0], random.Random(0))


def test_scores_of_whole_counts_are_exact_fractions():
    """4 of 5 answer tokens right is 0.8, not float32's 0.800000011920929."""
    logits = torch.nn.functional.one_hot(torch.tensor([1, 2, 3, 4, 0]), 8).float()
    assert sc.token_accuracy(logits, [1, 2, 3, 4, 5]) == 0.8


def test_case_for_recognises_a_bios_fact_in_any_template():
    world = bios.world_of("bios:people=10,part=qa")
    person = world.people[3]
    fact = Fact(bios.prompt(person, "birth_city", 2), person.name, "Boston")
    case = sc.case_for(world, fact, random.Random(0))
    assert case.request == fact and len(case.paraphrases) == 4 and len(case.neighbours) == 10
    assert case.paraphrases[-1].prompt == "Where was {} born? Answer:"
    assert fact.prompt not in [p.prompt for p in case.paraphrases]
    assert sc.case_for(world, Fact("{} likes", person.name, "tea"), random.Random(0)) == sc.EditCase(
        Fact("{} likes", person.name, "tea"))  # fmt: skip


def test_evaluate_restores_the_model_in_every_mode():
    from tests.knowledge.conftest import random_model

    model, tok = random_model()
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    cases = [sc.EditCase(Fact("the answer is {}", "qz ", "Q"), neighbours=[Fact("so {} is", "ab", "cd")])]
    params = ed.resolve_params(model, "ft-l", replace(ed.DEFAULTS["ft-l"], steps=3))
    for mode in sc.MODES:
        report = sc.evaluate(model, tok, cases, "ft-l", params, lambda layer: None, mode, fluency_tokens=5)
        assert report["mode"] == mode and report["edits"] == 1 and 0 <= report["locality"] <= 1
        assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters())
    with pytest.raises(UserError, match="unknown mode 'parallel'"):
        sc.evaluate(model, tok, cases, "ft-l", params, lambda layer: None, "parallel")
