"""Synthetic biographies: a world of people whose facts a small model can store, locate and edit.

Notes §2.3 (knowledge storage). After Allen-Zhu & Li, "Physics of Language Models, Part 3.1:
Knowledge Storage and Extraction" (arXiv 2309.14316), bioS: N fictional people, each with six
attributes drawn from fixed pools (birth date, birth city, university, major, employer, and the
employer's city, which the employer determines), written as one sentence per attribute from
several templates. Their knowledge augmentations are options:

    multi=K     K biographies per person, each with freshly drawn templates ("multiK")
    permute     the six sentences in a random order ("permute")
    fullname    the full name in every sentence instead of a pronoun ("fullname")

Training holds out the last 10% of a text for validation, so the source ends with a tail of
extra documents (12%: fresh biographies of random people, or repeated QA pairs): the held-out
text re-phrases known facts, and no person's only biography is ever held out.

Everything is a pure function of (options, seed): the world (people and their attributes)
depends only on `people` and `seed`, so a model pretrained on augmented biographies and one
fine-tuned on question–answer pairs of the same world agree on every fact. The first half of
the people (`World.train_people`) may have their QA pairs in training; the second half are
held out, and extraction accuracy is measured on them (the paper's split).

As a `--data` source: `bios` or `bios:key=value,key=value`, keys

    people=N    how many people (default 1000)            seed=S      the world's seed (default 0)
    augment=A   none, or a `+`-joined subset of multi, permute, fullname (e.g. multi+permute)
    multi=K     biographies per person (default 1; 5 when augment names multi)
    part=P      bios (default): biographies only; qa: the QA pairs of the training half only
                (for fine-tuning); mixed: both, shuffled together

Attribute values are single words or short spans ("Denver", "October 2, 1996"), so a fact is
scored exactly: the answer's tokens, teacher-forced, must each be the argmax.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field, replace

from llmlab.errors import UserError

FEMALE = ("Anya", "Clara", "Daria", "Elena", "Fiona", "Greta", "Hana", "Iris", "Jana", "Kira", "Lena", "Mara",
          "Nadia", "Olga", "Petra", "Rosa", "Sara", "Tessa", "Una", "Vera", "Wanda", "Yara", "Zoe", "Alma",
          "Bella", "Cora", "Dina", "Edith", "Flora", "Gina", "Hazel", "Ida", "Julia", "Lila", "Maya", "Nina",
          "Opal", "Paula", "Ruth", "Stella")  # fmt: skip
MALE = ("Aaron", "Boris", "Carl", "David", "Edgar", "Felix", "Gustav", "Hugo", "Ivan", "Jonas", "Karl", "Leon",
        "Marco", "Nils", "Oscar", "Pavel", "Rafael", "Simon", "Tomas", "Victor", "Walter", "Xavier", "Yuri", "Anton",
        "Bruno", "Cyrus", "Dmitri", "Emil", "Frank", "Henry", "Igor", "Jakob", "Lars", "Milo", "Noah", "Otto",
        "Peter", "Ralph", "Stefan", "Theo")  # fmt: skip
MIDDLE = ("Briar", "Quinn", "Sage", "Reed", "Lane", "Blake", "Gray", "Hale", "Jude", "Kai", "Lee", "Rae", "Wren",
          "Shea", "Drew", "Dale", "Glen", "Joy", "Max", "Ray", "Skye", "Wade", "Ash", "Bay", "Cole")  # fmt: skip
LAST = ("Forger", "Adler", "Baker", "Carver", "Dalton", "Ellis", "Fisher", "Garner", "Harper", "Irving", "Jensen",
        "Keller", "Lowell", "Mercer", "Nolan", "Osborn", "Porter", "Quill", "Rhodes", "Sawyer", "Tanner", "Upton",
        "Vance", "Walsh", "Yates", "Zeller", "Archer", "Brody", "Conway", "Dawson", "Emery", "Fowler", "Graves",
        "Hayes", "Ingram", "Jarvis", "Knox", "Larson", "Monroe", "Norris", "Oakley", "Pruitt", "Ramsey", "Stone",
        "Thorne", "Voss", "Whitman", "Young", "Zimmer", "Barlow")  # fmt: skip
CITIES = ("Boston", "Denver", "Austin", "Seattle", "Chicago", "Houston", "Phoenix", "Portland", "Atlanta", "Miami",
          "Dallas", "Detroit", "Memphis", "Nashville", "Tucson", "Fresno", "Omaha", "Raleigh", "Tampa", "Orlando",
          "Cleveland", "Pittsburgh", "Milwaukee", "Sacramento", "Oakland", "Richmond", "Buffalo", "Albany", "Boise",
          "Spokane", "Reno", "Honolulu", "Charlotte", "Louisville", "Baltimore", "Hartford", "Providence",
          "Madison", "Lincoln", "Wichita", "Tulsa", "Savannah", "Knoxville", "Dayton", "Toledo", "Durham",
          "Eugene", "Tacoma")  # fmt: skip
UNIVERSITIES = ("Yale", "Harvard", "Princeton", "Stanford", "MIT", "Caltech", "Cornell", "Duke", "Rice", "Brown",
                "Columbia", "Emory", "Tufts", "Purdue", "Vanderbilt", "Georgetown", "Dartmouth", "Northwestern",
                "Berkeley", "Oxford", "Cambridge", "Baylor", "Rutgers", "Clemson", "Auburn",
                "Tulane", "Villanova", "Fordham", "Brandeis")  # fmt: skip
MAJORS = ("Biology", "Chemistry", "Physics", "Mathematics", "Economics", "History", "Philosophy", "Psychology",
          "Sociology", "Linguistics", "Architecture", "Astronomy", "Geology", "Statistics", "Music", "Nursing",
          "Accounting", "Marketing", "Finance", "Literature", "Anthropology", "Engineering", "Journalism", "Law",
          "Medicine", "Art", "Theology", "Ecology", "Genetics", "Robotics")  # fmt: skip
COMPANIES = ("Acme", "Globex", "Initech", "Umbrella", "Hooli", "Vandelay", "Wonka", "Stark", "Wayne", "Cyberdyne",
             "Soylent", "Tyrell", "Aperture", "Oscorp", "Monarch", "Dunder", "Sterling", "Nakatomi", "Gekko",
             "Prestige", "Virtucon", "Zorg", "Massive", "Pendant", "Duff", "Krusty", "Bluth", "Oceanic", "Dharma",
             "Wernham")  # fmt: skip
COMPANY_CITY = {c: CITIES[(7 * i + 3) % len(CITIES)] for i, c in enumerate(COMPANIES)}  # employer → its city
MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December")  # fmt: skip

ATTRIBUTES = ("birth_date", "birth_city", "university", "major", "employer", "work_city")
BASE_ATTRIBUTES = ATTRIBUTES[:5]  # work_city follows from employer: the derived fact (portability)

# Each template ends with the value, so "{name} <words>" is a prompt and the value its answer.
# {name} is the full name or, in all but a biography's first sentence, a pronoun; {poss} his/her.
TEMPLATES: dict[str, tuple[str, ...]] = {
    "birth_date": ("{name} was born on {value}.", "{name} came into this world on {value}.",
                   "{name} celebrates {poss} birthday on {value}.", "{name} has {poss} birthday on {value}."),
    "birth_city": ("{name} was born in {value}.", "{name} spent {poss} early years in {value}.",
                   "{name} grew up in {value}.", "{name} was brought up in {value}."),
    "university": ("{name} studied at {value}.", "{name} graduated from {value}.",
                   "{name} received {poss} education at {value}.", "{name} attended {value}."),
    "major": ("{name} majored in {value}.", "{name} earned a degree in {value}.",
              "{name} specialized in {value}.", "{name} completed {poss} studies in {value}."),
    "employer": ("{name} worked for {value}.", "{name} was employed by {value}.",
                 "{name} had a job at {value}.", "{name} built a career at {value}."),
    "work_city": ("{name} worked in {value}.", "{name} was based in {value}.",
                  "{name} spent {poss} working life in {value}.", "{name} lived and worked in {value}."),
}  # fmt: skip
QUESTIONS = {
    "birth_date": "What is the birth date of {name}?", "birth_city": "Where was {name} born?",
    "university": "Which university did {name} study at?", "major": "What did {name} major in?",
    "employer": "Which company did {name} work for?", "work_city": "Where did {name} work?",
}  # fmt: skip
ANSWER = " Answer:"  # a question prompt is QUESTIONS[a] + ANSWER; the value follows after a space


@dataclass(frozen=True)
class Person:
    name: str  # "Anya Briar Forger": the subject of every fact about her
    female: bool
    facts: dict[str, str]  # attribute → value, all six

    @property
    def pronoun(self) -> str:
        return "She" if self.female else "He"

    @property
    def possessive(self) -> str:
        return "her" if self.female else "his"


@dataclass(frozen=True)
class World:
    people: tuple[Person, ...]
    seed: int
    questions: bool = field(default=False, compare=False)  # the training text had QA pairs (part qa or mixed)

    @property
    def train_people(self) -> tuple[Person, ...]:
        """The first half: their QA pairs may be trained on."""
        return self.people[: len(self.people) // 2]

    @property
    def test_people(self) -> tuple[Person, ...]:
        """The second half: held out from QA training, where extraction is measured."""
        return self.people[len(self.people) // 2 :]

    def person(self, name: str) -> Person | None:
        return next((p for p in self.people if p.name == name), None)


def make_world(people: int = 1000, seed: int = 0) -> World:
    """N people with distinct full names and six attributes each, a pure function of (N, seed)."""
    check_people(people)
    rng = random.Random(f"bios-world-{seed}")
    names: set[str] = set()
    out = []
    while len(out) < people:
        female = rng.random() < 0.5
        name = f"{rng.choice(FEMALE if female else MALE)} {rng.choice(MIDDLE)} {rng.choice(LAST)}"
        if name in names:
            continue
        names.add(name)
        out.append(Person(name, female, random_facts(rng)))
    return World(tuple(out), seed)


def check_people(people: int) -> None:
    most = (len(FEMALE) + len(MALE)) * len(MIDDLE) * len(LAST) // 2  # keeps rejection sampling of names fast
    if not 2 <= people <= most:
        raise UserError(f"bios: people must be between 2 and {most}, got {people}")


def random_facts(rng: random.Random) -> dict[str, str]:
    employer = rng.choice(COMPANIES)
    return {
        "birth_date": f"{rng.choice(MONTHS)} {rng.randint(1, 28)}, {rng.randint(1950, 1999)}",
        "birth_city": rng.choice(CITIES), "university": rng.choice(UNIVERSITIES), "major": rng.choice(MAJORS),
        "employer": employer, "work_city": COMPANY_CITY[employer],
    }  # fmt: skip


def values(attribute: str) -> tuple[str, ...]:
    """The pool an attribute's value is drawn from (dates: every month, day 1-28 and year)."""
    pools = {"birth_city": CITIES, "university": UNIVERSITIES, "major": MAJORS,
             "employer": COMPANIES, "work_city": tuple(dict.fromkeys(COMPANY_CITY.values()))}  # fmt: skip
    if attribute == "birth_date":
        return tuple(f"{m} {d}, {y}" for m in MONTHS for d in range(1, 29) for y in range(1950, 2000))
    return pools[attribute]


# --- text ------------------------------------------------------------------------------------


def sentence(person: Person, attribute: str, template: int, full_name: bool) -> str:
    name = person.name if full_name else person.pronoun
    return TEMPLATES[attribute][template].format(name=name, poss=person.possessive, value=person.facts[attribute])


def biography(person: Person, rng: random.Random, permute: bool, fullname: bool) -> str:
    """Six sentences, one per attribute, each from a random template; the first names the person."""
    order = list(ATTRIBUTES)
    if permute:
        rng.shuffle(order)
    return " ".join(
        sentence(person, a, rng.randrange(len(TEMPLATES[a])), full_name=fullname or i == 0) for i, a in enumerate(order)
    )


def question(person: Person, attribute: str) -> str:
    """The QA prompt, e.g. "Where was Anya Briar Forger born? Answer:"; its answer is " " + value."""
    return QUESTIONS[attribute].format(name=person.name) + ANSWER


def qa_pair(person: Person, attribute: str) -> str:
    return f"{question(person, attribute)} {person.facts[attribute]}."


@dataclass(frozen=True)
class BiosOptions:
    people: int = 1000
    seed: int = 0
    multi: int = 1
    permute: bool = False
    fullname: bool = False
    part: str = "bios"  # bios | qa | mixed
    spec: str = field(default="bios", compare=False)


TAIL = 0.12  # the share of documents appended after the shuffled ones (module docstring)


def corpus(opts: BiosOptions) -> str:
    """The training text: one document per line, shuffled across people, then a tail of TAIL
    extra documents drawn the same way (fresh biographies of random people, repeated QA pairs).
    Training holds out the last 10% of the text as validation; the tail makes that split a
    re-phrasing of known facts, so that no person's only biography is ever held out."""
    world = make_world(opts.people, opts.seed)
    rng = random.Random(f"bios-text-{opts.seed}-{opts.multi}-{opts.permute}-{opts.fullname}")
    docs = _documents(world, opts, rng, [p for p in world.people for _ in range(opts.multi)])
    rng.shuffle(docs)
    extra = max(1, round(len(docs) * TAIL / (1 - TAIL)))
    tail = _documents(world, opts, rng, rng.choices(world.people, k=extra))
    return "\n".join(docs + rng.sample(tail, extra)) + "\n"


def _documents(world: World, opts: BiosOptions, rng: random.Random, people: list[Person]) -> list[str]:
    """Biographies of `people` and/or the QA pairs of the training half, as `opts.part` says."""
    docs = [biography(p, rng, opts.permute, opts.fullname) for p in people] if opts.part != "qa" else []
    if opts.part != "bios":
        docs += [qa_pair(p, a) for p in world.train_people for a in ATTRIBUTES]
    return docs


# --- the `--data bios:...` option string --------------------------------------------------------

AUGMENTATIONS = ("multi", "permute", "fullname")
PARTS = ("bios", "qa", "mixed")


def parse_options(options: str) -> BiosOptions:
    """`"people=2000,augment=multi+permute"` → BiosOptions; unknown keys and bad values are errors."""
    kv: dict[str, str] = {}
    for item in filter(None, (s.strip() for s in options.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"bios: expected key=value, got {item!r} (e.g. bios:people=500,augment=multi+permute)")
        kv[key.strip()] = value.strip()
    unknown = set(kv) - {"people", "seed", "augment", "multi", "part"}
    if unknown:
        raise UserError(f"bios: unknown option {sorted(unknown)[0]!r} (known: people, seed, augment, multi, part)")
    augment = set() if kv.get("augment", "none") == "none" else set(kv["augment"].split("+"))
    if augment - set(AUGMENTATIONS):
        bad = sorted(augment - set(AUGMENTATIONS))[0]
        raise UserError(f"bios: unknown augmentation {bad!r} (choose none or a +-joined subset of multi, permute, "
                        "fullname)")  # fmt: skip
    part = kv.get("part", "bios")
    if part not in PARTS:
        raise UserError(f"bios: part must be one of {', '.join(PARTS)}, got {part!r}")
    multi = _int(kv, "multi", 5 if "multi" in augment else 1)
    if multi < 1:
        raise UserError(f"bios: multi must be at least 1, got {multi}")
    opts = BiosOptions(_int(kv, "people", 1000), _int(kv, "seed", 0), multi, "permute" in augment,
                       "fullname" in augment, part, spec="bios" + (f":{options}" if options else ""))  # fmt: skip
    check_people(opts.people)
    return opts


def _int(kv: dict[str, str], key: str, default: int) -> int:
    try:
        return int(kv[key]) if key in kv else default
    except ValueError:
        raise UserError(f"bios: {key} must be an integer, got {kv[key]!r}") from None


def source_text(options: str) -> str:
    """The `bios` data source: `options` is what follows `bios:` (empty for the defaults)."""
    return corpus(parse_options(options))


def world_of(data: str) -> World | None:
    """The world a run was trained on, from its `data` spec; None if it is not a bios source."""
    name, _, options = data.partition(":")
    if name != "bios":
        return None
    opts = parse_options(options)
    return replace(make_world(opts.people, opts.seed), questions=opts.part != "bios")


def prompt(person: Person, attribute: str, template: int = 0) -> str:
    """A template's words before the value, with {} for the subject: "{} spent her early years in"."""
    words = TEMPLATES[attribute][template].split(" {value}")[0]
    return words.replace("{poss}", person.possessive).replace("{name}", "{}")


def question_prompt(attribute: str) -> str:
    """The QA prompt with {} for the subject: "Where was {} born? Answer:"."""
    return QUESTIONS[attribute].replace("{name}", "{}") + ANSWER
