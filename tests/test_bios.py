"""Synthetic biographies (Allen-Zhu & Li, arXiv 2309.14316): the world, the augmentations, the data source."""

from __future__ import annotations

import itertools
import re
from collections import Counter

import pytest

from llmlab import bios, data
from llmlab.errors import UserError


def test_the_world_is_a_pure_function_of_people_and_seed():
    a, b = bios.make_world(50, seed=3), bios.make_world(50, seed=3)
    assert a == b
    assert bios.make_world(50, seed=4) != a
    names = [p.name for p in a.people]
    assert len(set(names)) == 50 and all(len(n.split()) == 3 for n in names)


def test_every_person_has_six_attributes_from_the_pools_and_the_employer_fixes_the_work_city():
    world = bios.make_world(300)
    for p in world.people:
        assert set(p.facts) == set(bios.ATTRIBUTES)
        assert p.facts["birth_city"] in bios.CITIES and p.facts["major"] in bios.MAJORS
        assert p.facts["university"] in bios.UNIVERSITIES and p.facts["employer"] in bios.COMPANIES
        assert p.facts["work_city"] == bios.COMPANY_CITY[p.facts["employer"]]
        assert re.fullmatch(r"[A-Z][a-z]+ \d{1,2}, 19[5-9]\d", p.facts["birth_date"])
        assert p.facts["birth_date"] in bios.values("birth_date")
    assert len(world.train_people) == len(world.test_people) == 150
    assert not {p.name for p in world.train_people} & {p.name for p in world.test_people}


def test_a_plain_biography_has_one_sentence_per_attribute_in_order_with_pronouns():
    text = bios.source_text("people=20")
    lines = text.splitlines()
    assert len(lines) == 20 + 3  # one biography per person, then a tail of 12%: 20 · 0.12 / 0.88 ≈ 3
    world = bios.make_world(20)
    assert {" ".join(line.split()[:3]) for line in lines[:20]} == {p.name for p in world.people}
    by_name = {p.name: p for p in world.people}
    for line in lines:
        person = by_name[" ".join(line.split()[:3])]
        sentences = line.split(". ")
        assert len(sentences) == 6
        assert line.count(person.name) == 1  # the rest says He or She
        assert all(s.startswith(person.pronoun + " ") for s in sentences[1:])
        positions = [line.index(person.facts[a]) for a in bios.ATTRIBUTES]
        assert positions == sorted(positions)  # birth date, birth city, ..., work city


def test_augmentations_multiply_permute_and_repeat_the_full_name():
    world = bios.make_world(30)
    text = bios.source_text("people=30,augment=multi+permute+fullname")
    lines = text.splitlines()
    assert len(lines) == 150 + 20  # 150 · 0.12 / 0.88 = 20.5
    counts = Counter(" ".join(line.split()[:3]) for line in lines[:150])
    assert set(counts.values()) == {5}
    for line in lines:
        name = " ".join(line.split()[:3])
        assert line.count(name) == 6  # the full name in every sentence
    orders = set()
    for line in lines:
        person = world.person(" ".join(line.split()[:3]))
        orders.add(tuple(sorted(bios.ATTRIBUTES, key=lambda a, p=person, ln=line: ln.index(p.facts[a]))))
    assert len(orders) > 10  # permuted
    assert len(bios.source_text("people=30,multi=3").splitlines()) == 90 + 12


def test_the_validation_tail_holds_no_persons_only_biography():
    """The last 10% of the tokens (training's validation split) only re-phrase people seen before it."""
    text = bios.source_text("people=50")
    cut = int(len(text) * 0.9)
    seen = {" ".join(line.split()[:3]) for line in text[:cut].splitlines()}
    held_out = {" ".join(line.split()[:3]) for line in text[cut:].splitlines()[1:]}
    assert len(seen) == 50 and held_out <= seen


def test_biographies_are_shuffled_across_people():
    lines = bios.source_text("people=40,augment=multi").splitlines()
    firsts = [" ".join(line.split()[:3]) for line in lines]
    runs = sum(a == b for a, b in itertools.pairwise(firsts))
    assert runs < 20  # not grouped by person (grouped would give 160 equal neighbours)


def test_qa_pairs_cover_the_training_half_only():
    world = bios.make_world(10)
    qa = bios.source_text("people=10,part=qa").splitlines()
    assert len(qa) == 30 + 4
    assert set(qa) == {bios.qa_pair(p, a) for p in world.train_people for a in bios.ATTRIBUTES}
    assert all(p.name not in "\n".join(qa) for p in world.test_people)
    mixed = bios.source_text("people=10,part=mixed").splitlines()
    assert len(mixed) == 10 + 30 + 5
    p = world.people[0]
    assert bios.qa_pair(p, "birth_city") == f"Where was {p.name} born? Answer: {p.facts['birth_city']}."


def test_prompts_are_the_templates_cut_before_the_value():
    p = bios.make_world(5).people[0]
    for a in bios.ATTRIBUTES:
        for t in range(len(bios.TEMPLATES[a])):
            full = bios.sentence(p, a, t, full_name=True)
            assert full == bios.prompt(p, a, t).replace("{}", p.name) + " " + p.facts[a] + "."
    assert bios.question_prompt("birth_city") == "Where was {} born? Answer:"


def test_a_world_of_the_same_people_whatever_the_augmentation():
    plain, qa = bios.world_of("bios:people=40,seed=2,augment=multi"), bios.world_of("bios:people=40,seed=2,part=qa")
    assert plain == qa and not plain.questions and qa.questions
    assert bios.world_of("stdlib") is None and bios.world_of("corpus.txt") is None


def test_the_data_source_takes_its_options_after_a_colon():
    assert data.load_source("bios:people=12,seed=1") == bios.corpus(bios.BiosOptions(people=12, seed=1))
    assert data.load_source("bios") == bios.corpus(bios.BiosOptions())
    assert bios.parse_options("augment=multi").multi == 5
    assert bios.parse_options("augment=multi,multi=2").multi == 2
    with pytest.raises(UserError, match="the stdlib source takes no options"):
        data.load_source("stdlib:x=1")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ("people=1", "people must be between 2 and"),
        ("people=ten", "people must be an integer, got 'ten'"),
        ("colour=red", "unknown option 'colour'"),
        ("augment=shuffle", "unknown augmentation 'shuffle'"),
        ("part=all", "part must be one of bios, qa, mixed, got 'all'"),
        ("multi=0", "multi must be at least 1"),
        ("people", "expected key=value, got 'people'"),
    ],
)
def test_bad_options_are_one_line_errors(options, message):
    with pytest.raises(UserError, match=re.escape(message)):
        data.load_source(f"bios:{options}")
