"""The bundled `json-extract` prompt set: a narrow, deterministic structured-output domain.

Each prompt gives one short English sentence about a person, product, flight, book or event and asks for a JSON
object with named keys; the answer is that object. Outputs are short, formulaic and mostly copied from the prompt:
the kind of narrow domain where the CLLM paper saw its largest gains (Spider text-to-SQL). It is never mixed into
the broad stdlib-code figures.

Generated from fixed word lists with a seeded `random.Random`, so every Python version and machine gets the same
prompts: 2000 records, split by a hash of the prompt id (80% train, 10% validation, 10% test). Quality is scored
without running anything: `score_output` parses the output and compares it with the record.
"""

from __future__ import annotations

import json
import random
import re

from cllm.errors import UserError
from cllm.files import unit_hash
from cllm.records import Prompt

SPLITS = ("train", "validation", "test")
SIZE = 2000
SEED = 20240101
INSTRUCTION = (
    "Convert the record to JSON with the keys {keys}. Answer with the JSON only.\n\n"
    "Example record: {example_sentence}\nJSON:\n{example_answer}\n\nRecord: {sentence}"
)
EXAMPLE_SEED = 7  # one fixed worked example per kind, shown in every prompt of that kind (one-shot)

FIRST = "Maria Tom Aisha Kenji Lena Omar Sofia Ivan Priya Lucas Mei Jonas Amara Diego Hana Victor Nora Elif Samuel Zoe"
LAST = "Lopez Chen Khan Sato Novak Haddad Rossi Petrov Patel Silva Wang Berg Okafor Garcia Kim Dubois Hansen Yilmaz"
CITIES = "Boston Denver Lisbon Osaka Nairobi Toronto Madrid Oslo Lima Seoul Dublin Austin Prague Cairo Perth Vienna"
JOBS = "engineer teacher nurse chef pilot lawyer baker designer farmer dentist writer plumber architect librarian"
BRANDS = "Acme Nordic Zenith Orbit Lumen Vertex Solace Kestrel Tundra Harbor"
PRODUCTS = "kettle backpack lamp headphones blender jacket umbrella keyboard tent bicycle helmet watch"
COLORS = "red blue green black white silver yellow orange purple grey"
LETTERS = "ABCDEFGHJKLMNPRSTUVWXYZ"  # flight codes
AIRLINES = "Skyway Aerolux BlueJet Polaris Condora Meridian"
TITLE_WORDS = "Silent River Glass Garden Winter Letters Iron Crown Paper Moon Hidden Harbor Last Orchard Golden Map"
EVENTS = "concert marathon conference festival exhibition workshop tournament fair"
MONTHS = "January February March April May June July August September October November December"


def _words(text: str) -> list[str]:
    return text.split()


def _pick(rng: random.Random, **word_lists: str) -> dict:
    """One word from each list, drawn in the order given: {key: word}."""
    return {key: rng.choice(_words(words)) for key, words in word_lists.items()}


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


# Each kind: a function drawing the record (and extra words its sentences use) and the sentence templates; the
# template is drawn after the record. Templates name record keys and extras as str.format fields.
def _person(rng: random.Random) -> tuple[dict, dict]:
    record = {
        "name": f"{rng.choice(_words(FIRST))} {rng.choice(_words(LAST))}",
        "age": rng.randint(19, 78),
        "city": rng.choice(_words(CITIES)),
        "job": rng.choice(_words(JOBS)),
    }
    return record, {"a_job": f"{_article(record['job'])} {record['job']}"}


def _product(rng: random.Random) -> tuple[dict, dict]:
    record = _pick(rng, brand=BRANDS, product=PRODUCTS, color=COLORS)
    record.update(price=rng.randint(5, 400), in_stock=rng.random() < 0.5)
    return record, {"stock": "is in stock" if record["in_stock"] else "is sold out"}


def _flight(rng: random.Random) -> tuple[dict, dict]:
    origin, destination = rng.sample(_words(CITIES), 2)
    record = {
        "airline": rng.choice(_words(AIRLINES)),
        "flight": f"{rng.choice(LETTERS)}{rng.choice(LETTERS)}{rng.randint(10, 999)}",
        "from": origin,
        "to": destination,
        "departure": f"{rng.randint(0, 23):02d}:{rng.choice([0, 5, 10, 15, 20, 25, 30, 35, 40, 45, 50, 55]):02d}",
    }
    return record, {}


def _book(rng: random.Random) -> tuple[dict, dict]:
    first, second = rng.sample(_words(TITLE_WORDS), 2)
    record = {
        "title": f"The {first} {second}",
        "author": f"{rng.choice(_words(FIRST))} {rng.choice(_words(LAST))}",
        "year": rng.randint(1850, 2024),
        "pages": rng.randint(90, 900),
    }
    return record, {}


def _event(rng: random.Random) -> tuple[dict, dict]:
    record = _pick(rng, event=EVENTS, city=CITIES, month=MONTHS)
    record.update(day=rng.randint(1, 28), attendees=rng.randint(2, 90) * 100)
    return record, {}


KINDS = {
    "person": (
        _person,
        [
            "{name} is {age} years old, lives in {city} and works as {a_job}.",
            "Meet {name}, {a_job} from {city} who is {age}.",
            "{name} ({age}) has been working as {a_job} in {city} for years.",
        ],
    ),
    "product": (
        _product,
        [
            "The {color} {brand} {product} costs {price} dollars and {stock}.",
            "{brand} sells a {color} {product} for {price} dollars; it {stock}.",
        ],
    ),
    "flight": (
        _flight,
        [
            "{airline} flight {flight} leaves {from} for {to} at {departure}.",
            "At {departure}, flight {flight} of {airline} departs from {from} to {to}.",
        ],
    ),
    "book": (
        _book,
        [
            "{author} wrote {title}, a book of {pages} pages published in {year}.",
            "Published in {year}, {title} by {author} runs to {pages} pages.",
        ],
    ),
    "event": (
        _event,
        [
            "The {city} {event} on {month} {day} expects {attendees} attendees.",
            "About {attendees} people will attend the {event} in {city} on {month} {day}.",
        ],
    ),
}


def draw(kind: str, rng: random.Random) -> tuple[dict, str]:
    """One record of `kind` and a sentence stating it."""
    make, templates = KINDS[kind]
    record, extras = make(rng)
    return record, rng.choice(templates).format(**record, **extras)


def split_of(prompt_id: str) -> str:
    value = unit_hash(prompt_id)
    return "train" if value < 0.8 else "validation" if value < 0.9 else "test"


def generate_all() -> list[Prompt]:
    """All SIZE prompts, in a fixed order; a repeated sentence is generated again, so every text is unique."""
    examples = {kind: draw(kind, random.Random(EXAMPLE_SEED)) for kind in KINDS}
    rng = random.Random(SEED)
    prompts, seen = [], {sentence for _, sentence in examples.values()}
    while len(prompts) < SIZE:
        kind = rng.choice(sorted(KINDS))
        record, sentence = draw(kind, rng)
        if sentence in seen:
            continue
        seen.add(sentence)
        prompt_id = f"json-extract/{len(prompts):04d}-{kind}"
        example_record, example_sentence = examples[kind]
        text = INSTRUCTION.format(
            keys=", ".join(record),
            example_sentence=example_sentence,
            example_answer=json.dumps(example_record, indent=2),
            sentence=sentence,
        )
        answer = json.dumps(record, indent=2)
        prompts.append(Prompt(prompt_id, text, answer, meta={"kind": kind, "record": record}))
    return prompts


def json_extract_prompts(split: str | None = None) -> list[Prompt]:
    """`json-extract:train|validation|test` (all splits when no split is given)."""
    if split is not None and split not in SPLITS:
        raise UserError(f"json-extract has splits {SPLITS}, not {split!r}")
    return [p for p in generate_all() if split is None or split_of(p.id) == split]


def _normal(value):
    return value.strip().lower() if isinstance(value, str) else value


def parse_json_output(text: str) -> dict | None:
    """The first JSON object in a model's output (a ```json fence is allowed), or None."""
    match = re.search(r"\{.*\}", text, flags=re.DOTALL)
    if not match:
        return None
    try:
        value = json.loads(match.group(0))
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


def score_output(text: str, record: dict) -> dict:
    """`valid`: the output holds a JSON object; `exact`: it has exactly the record's keys with equal values
    (strings compared case-insensitively); `fields`: the share of the record's keys whose value is right."""
    parsed = parse_json_output(text)
    if parsed is None:
        return {"valid": False, "exact": False, "fields": 0.0}
    right = sum(_normal(parsed.get(key)) == _normal(value) for key, value in record.items())
    return {"valid": True, "exact": right == len(record) and set(parsed) == set(record), "fields": right / len(record)}
