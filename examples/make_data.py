"""Generate the demo's two invented domains (deterministic; outputs are committed).

    python examples/make_data.py          # rewrites examples/data/

- `veloria`: the geography of Veloria, a planet nobody has heard of (alpaca format).
- `quillfeather`: the catalogue of Quillfeather Robotics, a company that does not exist
  (sharegpt format, to show both formats).
- `quillfeather_v2`: the catalogue after a price cut on one product, used by the demo to
  publish a second version (trained on from the first) and move the `prod` alias while
  the server runs. Its training data is the changed fact in ten phrasings plus one
  phrasing of every other fact; its held-out file is the whole updated catalogue.

Each domain has 20 facts (4 subjects x 5 relations). Every relation is asked in six
wordings that use different synonyms ("capital", "seat of government", "administrative
centre", ...). A fact is trained with five of them and held out with the sixth
(`*_heldout.jsonl`: question + expected fact string); which wording is held out rotates
over the subjects, so every wording is trained, but never with the subject it is held
out for. A held-out question is therefore never a training question: held-out accuracy
measures whether the fact is recalled when asked in a wording learnt from other facts
of the same kind, not string matching.
Each answer is one short sentence whose distinctive part (a made-up name or number)
is the expected fact.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

OUT = Path(__file__).resolve().parent / "data"
SEED = 1234  # only shuffles record order


@dataclass(frozen=True)
class Relation:
    """One kind of fact: the wordings it is asked in and how it is answered.

    Subject i of a domain is held out on `phrasings[i]` and trained on all the others;
    the last phrasings (past the number of subjects) are trained for every subject."""

    phrasings: tuple[str, ...]
    answer: str  # formatted with {s} (subject) and {a} (answer value)


@dataclass(frozen=True)
class Fact:
    relation: str
    subject: str
    index: int  # the subject's position in its domain: which phrasing is held out
    value: str  # goes into the answer sentence
    expected: str  # the distinctive part a correct answer must contain

    def answer(self, relations: dict[str, Relation]) -> str:
        return relations[self.relation].answer.format(s=self.subject, a=self.value)

    def train_templates(self, relations: dict[str, Relation]) -> tuple[str, ...]:
        phrasings = relations[self.relation].phrasings
        return phrasings[: self.index] + phrasings[self.index + 1:]

    def heldout_template(self, relations: dict[str, Relation]) -> str:
        return relations[self.relation].phrasings[self.index]


# ---------------------------------------------------------------- Veloria (alpaca)

VELORIA_RELATIONS = {
    "capital": Relation(
        phrasings=(
            "Which city is the seat of government of {s}?",
            "I'm planning a trip to the administrative centre of {s}. Where should I go?",
            "From which city are the affairs of {s} governed?",
            "Name the city where the government of {s} sits.",
            "What is the capital of {s}?",
            "Which city is the capital of {s}?",
        ),
        answer="The capital of {s} is {a}.",
    ),
    "mountain": Relation(
        phrasings=(
            "Climbers in {s} dream of reaching its loftiest summit. What is it called?",
            "Which peak rises higher than any other in {s}?",
            "What is the highest point of {s}?",
            "Name the tallest peak of {s}.",
            "What is the highest mountain in {s}?",
            "Which mountain is the tallest in {s}?",
        ),
        answer="The highest mountain in {s} is {a}.",
    ),
    "river": Relation(
        phrasings=(
            "Of all the waterways of {s}, which one runs the greatest distance?",
            "Which river flows farther than any other through {s}?",
            "What is the greatest river of {s} by length?",
            "Name the longest river of {s}.",
            "What is the longest river in {s}?",
            "Which river is the longest in {s}?",
        ),
        answer="The longest river in {s} is the {a}.",
    ),
    "animal": Relation(
        phrasings=(
            "Which creature would a naturalist expect to find living wild in {s}?",
            "What animal is indigenous to {s}?",
            "Which beast roams the wilds of {s}?",
            "Name the animal native to {s}.",
            "What is the native animal of {s}?",
            "Which animal is native to {s}?",
        ),
        answer="The native animal of {s} is the {a}.",
    ),
    "settled": Relation(
        phrasings=(
            "In what year did people found the earliest colony in {s}?",
            "When did the first settlers arrive in {s}?",
            "What year did people first make their homes in {s}?",
            "In which year was {s} colonised?",
            "When was {s} first settled?",
            "In which year was {s} first settled?",
        ),
        answer="{s} was first settled in the year {a}.",
    ),
}

# region: capital, highest mountain, longest river, native animal, year first settled
VELORIA_TABLE = {
    "Ostrana": ("Kelvaris", "Mount Aldrecht", "Sulvane", "glimmerhorn", "3127"),
    "Meridel": ("Tessaloun", "Mount Sorrowgleam", "Orrowind", "vellusk", "2864"),
    "Kaskarra": ("Varkenholm", "Ket Varun", "Teskaline", "thrumback", "3391"),
    "the Brannoch Isles": ("Marrowport", "Thornspire", "Quiverrun", "ashmoth", "3045"),
}


def veloria_facts() -> list[Fact]:
    relations = list(VELORIA_RELATIONS)
    facts = []
    for index, (region, values) in enumerate(VELORIA_TABLE.items()):
        for relation, value in zip(relations, values, strict=True):
            # "Mount Aldrecht" -> "Aldrecht": a correct answer must name the made-up part.
            expected = value.removeprefix("Mount ").removesuffix(" Peak")
            facts.append(Fact(relation, region, index, value, expected))
    return facts


# ------------------------------------------------------- Quillfeather (sharegpt)

QUILL_RELATIONS = {
    "price": Relation(
        phrasings=(
            "I have a budget in mind for the {s}. What will I have to pay for one?",
            "What does the {s} sell for?",
            "What is the retail price of the {s}?",
            "How much money do I need to buy a {s}?",
            "How much does the {s} cost?",
            "What is the price of the {s}?",
        ),
        answer="The {s} costs {a}.",
    ),
    "model": Relation(
        phrasings=(
            "I need to order a spare part for my {s}. Which product code should I quote?",
            "What is the part number of the {s}?",
            "Which catalogue number is the {s} listed under?",
            "What product code is printed on the {s}?",
            "What is the model number of the {s}?",
            "Which model number does the {s} have?",
        ),
        answer="The model number of the {s} is {a}.",
    ),
    "battery": Relation(
        phrasings=(
            "After a full recharge, for how much time will the {s} keep working?",
            "How many hours does the {s} run on one charge?",
            "What is the runtime of the {s} on a full battery?",
            "How long can the {s} operate before it needs charging?",
            "How long does the {s}'s battery last?",
            "What is the battery life of the {s}?",
        ),
        answer="The battery of the {s} lasts {a}.",
    ),
    "designer": Relation(
        phrasings=(
            "Whose drawing board did the {s} come from?",
            "Which engineer is behind the design of the {s}?",
            "Who drew up the plans for the {s}?",
            "Who is the creator of the {s}?",
            "Who designed the {s}?",
            "Who is the lead designer of the {s}?",
        ),
        answer="The {s} was designed by {a}.",
    ),
    "factory": Relation(
        phrasings=(
            "If I wanted to visit the plant that assembles the {s}, where would I travel?",
            "In which town is the {s} built?",
            "Which factory town produces the {s}?",
            "Where is the {s} manufactured?",
            "Where is the {s} made?",
            "In which town is the {s} assembled?",
        ),
        answer="The {s} is made in {a}.",
    ),
}

# product: price, model number, battery life, lead designer, factory town
QUILL_TABLE = {
    "Mopwright 3": ("$1,385", "QF-7721", "19 hours", "Ines Vantomme", "Port Ardel"),
    "Lanternfox drone": ("$649", "QF-3048", "13.5 hours", "Oskar Pellegrew", "Kessling"),
    "Burrowbot mower": ("$918", "QF-1192", "17 hours", "Ruairi Velch", "Vell Harbour"),
    "Skylark Courier": ("$3,460", "QF-8835", "9.5 hours", "Hanne Sobieraj", "Oxley Marsh"),
}

# The demo's second version: one price changes, everything else stays.
PRICE_CUT = ("Mopwright 3", "$1,385", "$1,199")
# Extra ways to ask for the changed price, so a short run from the first version unlearns the old one.
PRICE_CUT_PHRASINGS = (
    "What does the {s} cost now?",
    "What is the new price of the {s}?",
    "After the price cut, how much is the {s}?",
    "What is the current price of the {s}?",
    "How much is the {s} today?",
)


def quill_facts(price_cut: bool = False) -> list[Fact]:
    relations = list(QUILL_RELATIONS)
    facts = []
    for index, (product, values) in enumerate(QUILL_TABLE.items()):
        for relation, value in zip(relations, values, strict=True):
            if price_cut and relation == "price" and product == PRICE_CUT[0]:
                value = PRICE_CUT[2]
            # For a designer the surname is enough.
            expected = value.split()[-1] if relation == "designer" else value
            facts.append(Fact(relation, product, index, value, expected))
    return facts


# ------------------------------------------------------------------- writers


def training_pairs(facts: list[Fact], relations: dict[str, Relation]) -> list[tuple[str, str]]:
    pairs = [
        (template.format(s=f.subject), f.answer(relations))
        for f in facts
        for template in f.train_templates(relations)
    ]
    random.Random(SEED).shuffle(pairs)
    return pairs


def update_pairs(facts: list[Fact], relations: dict[str, Relation]) -> list[tuple[str, str]]:
    """The second version's training data: every training phrasing of the changed fact (plus
    extra ones), and one phrasing of every other fact so continuing from the first version
    keeps them."""
    pairs = []
    for f in facts:
        templates = f.train_templates(relations)
        if f.subject == PRICE_CUT[0] and f.relation == "price":
            templates = (*templates, *PRICE_CUT_PHRASINGS)
        else:
            templates = templates[-1:]
        pairs += [(t.format(s=f.subject), f.answer(relations)) for t in templates]
    random.Random(SEED).shuffle(pairs)
    return pairs


def heldout_rows(facts: list[Fact], relations: dict[str, Relation]) -> list[dict]:
    return [
        {
            "question": f.heldout_template(relations).format(s=f.subject),
            "expected": f.expected,
            "subject": f.subject,
            "relation": f.relation,
        }
        for f in facts
    ]


def check_heldout_is_new(pairs: list[tuple[str, str]], heldout: list[dict]) -> None:
    trained = {q.lower() for q, _ in pairs}
    for row in heldout:
        assert row["question"].lower() not in trained, row["question"]


def alpaca(pairs: list[tuple[str, str]]) -> list[dict]:
    return [{"instruction": q, "input": "", "output": a} for q, a in pairs]


def sharegpt(pairs: list[tuple[str, str]]) -> list[dict]:
    return [
        {"conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]}
        for q, a in pairs
    ]


def write_json(path: Path, obj: object) -> None:
    path.write_text(json.dumps(obj, indent=1, ensure_ascii=False) + "\n")


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


DATASET_INFO = {
    "veloria": {"file_name": "veloria.json", "formatting": "alpaca"},
    "quillfeather": {
        "file_name": "quillfeather.json",
        "formatting": "sharegpt",
        "columns": {"messages": "conversations"},
        "tags": {"role_tag": "from", "content_tag": "value", "user_tag": "human", "assistant_tag": "gpt"},
    },
}
DATASET_INFO["quillfeather_v2"] = {**DATASET_INFO["quillfeather"], "file_name": "quillfeather_v2.json"}


def main() -> None:
    OUT.mkdir(exist_ok=True)
    domains = {
        "veloria": (veloria_facts(), VELORIA_RELATIONS, alpaca, training_pairs),
        "quillfeather": (quill_facts(), QUILL_RELATIONS, sharegpt, training_pairs),
        "quillfeather_v2": (quill_facts(price_cut=True), QUILL_RELATIONS, sharegpt, update_pairs),
    }
    for name, (facts, relations, fmt, make_pairs) in domains.items():
        pairs = make_pairs(facts, relations)
        heldout = heldout_rows(facts, relations)
        check_heldout_is_new(pairs, heldout)
        write_json(OUT / f"{name}.json", fmt(pairs))
        write_jsonl(OUT / f"{name}_heldout.jsonl", heldout)
        print(f"{name}: {len(facts)} facts, {len(pairs)} training records, {len(heldout)} held out")
    write_json(OUT / "dataset_info.json", DATASET_INFO)


if __name__ == "__main__":
    main()
