"""Writes the shipped sentiment dataset (train.jsonl, val.jsonl): short product reviews, positive or negative.

    python training/examples/sentiment/make_data.py
"""
from __future__ import annotations

import json
import random
from pathlib import Path

SYSTEM = "Classify the sentiment of the review. Answer with exactly one word: positive or negative."
ITEMS = ["headphones", "coffee maker", "laptop", "running shoes", "novel", "hotel room", "pizza", "phone case",
         "vacuum cleaner", "desk chair", "movie", "backpack", "blender", "tent", "keyboard", "restaurant",
         "jacket", "video game", "mattress", "camera"]
POSITIVE = ["I absolutely love this {x}.", "The {x} works perfectly and exceeded my expectations.",
            "Best {x} I have ever bought, highly recommended!", "This {x} is fantastic value for the money.",
            "Great quality {x}, I would buy it again.", "The {x} arrived early and it is wonderful.",
            "Really impressed with the {x}; it feels premium.", "My whole family enjoys the {x}. Five stars.",
            "The {x} is comfortable, reliable and beautiful.", "Superb {x}. Everything about it is delightful.",
            "What a pleasant surprise, the {x} is excellent.", "I'm thrilled with this {x}, it does the job well."]
NEGATIVE = ["I regret buying this {x}.", "The {x} broke after two days, terrible.",
            "Worst {x} I have ever owned, avoid it.", "This {x} is a complete waste of money.",
            "Poor quality {x}, I want a refund.", "The {x} arrived damaged and support ignored me.",
            "Really disappointed with the {x}; it feels cheap.", "The {x} is uncomfortable and noisy. One star.",
            "Awful {x}. Nothing about it works as advertised.", "The {x} stopped working and smells bad.",
            "What a letdown, the {x} is useless.", "I'm angry about this {x}, it fails constantly."]
EXTRAS = ["", " Shipping was quick.", " I used it for a week.", " Bought it as a gift.", " The color is blue."]


def rows(rng: random.Random, n: int) -> list[dict]:
    out = []
    for _ in range(n):
        label = rng.choice(["positive", "negative"])
        text = rng.choice(POSITIVE if label == "positive" else NEGATIVE).format(x=rng.choice(ITEMS))
        text += rng.choice(EXTRAS)
        out.append({"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": text},
                                 {"role": "assistant", "content": label}]})
    return out


def main() -> None:
    here = Path(__file__).parent
    rng = random.Random(7)
    for name, n in (("train.jsonl", 320), ("val.jsonl", 64)):
        (here / name).write_text("".join(json.dumps(r) + "\n" for r in rows(rng, n)))


if __name__ == "__main__":
    main()
