"""Writes the shipped JSON-extraction dataset (train.jsonl, val.jsonl): order messages -> one compact JSON object
with the item, the quantity and the city, as ``job.yaml``'s schema (eval.json_schema) says.

    python training/examples/extract/make_data.py
"""
from __future__ import annotations

import json
import random
from pathlib import Path

SYSTEM = 'Extract the order as JSON: {"item": <singular noun>, "quantity": <integer>, "city": <city>}.'
ITEMS = [("blender", "blenders"), ("tent", "tents"), ("keyboard", "keyboards"), ("lamp", "lamps"),
         ("backpack", "backpacks"), ("camera", "cameras"), ("jacket", "jackets"), ("mattress", "mattresses"),
         ("kettle", "kettles"), ("bicycle", "bicycles"), ("monitor", "monitors"), ("toaster", "toasters"),
         ("umbrella", "umbrellas"), ("guitar", "guitars"), ("printer", "printers"), ("desk chair", "desk chairs")]
CITIES = ["Lyon", "Oslo", "Madrid", "Berlin", "Porto", "Dublin", "Vienna", "Prague", "Turin", "Ghent", "Bergen",
          "Seville", "Krakow", "Leeds", "Zurich", "Malmo"]
WORDS = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 7: "seven", 8: "eight", 9: "nine",
         10: "ten", 12: "twelve", 20: "twenty"}
TEMPLATES = ["Please send {q} {item} to {city}.", "I'd like {q} {item} delivered in {city}.",
             "Could you ship {q} {item} to our office in {city}? Thanks!", "Order: {q} {item}, destination {city}.",
             "We need {q} {item} in {city} by Friday.", "Hi, can I get {q} {item}? Ship to {city} please.",
             "Deliver {q} {item} to the {city} store.", "{city} branch here: please send {q} {item}."]


def rows(rng: random.Random, n: int) -> list[dict]:
    out = []
    for _ in range(n):
        (single, plural), city = rng.choice(ITEMS), rng.choice(CITIES)
        quantity = rng.choice([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 12, 15, 20, 24, 30, 50])
        said = WORDS[quantity] if quantity in WORDS and rng.random() < 0.5 else str(quantity)
        text = rng.choice(TEMPLATES).format(q=said, item=single if quantity == 1 else plural, city=city)
        answer = json.dumps({"item": single, "quantity": quantity, "city": city}, separators=(",", ":"))
        out.append({"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": text},
                                 {"role": "assistant", "content": answer}]})
    return out


def main() -> None:
    here = Path(__file__).parent
    rng = random.Random(11)
    for name, n in (("train.jsonl", 320), ("val.jsonl", 64)):
        (here / name).write_text("".join(json.dumps(r) + "\n" for r in rows(rng, n)))


if __name__ == "__main__":
    main()
