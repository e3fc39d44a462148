"""Generate the shipped json_extract dataset (datasets/json_extract/*.jsonl).

    python scripts/make_json_extract.py [--train 2000 --eval 200 --seed 0]

Each example is a customer message in free text and the JSON object a support
system would file for it: {"intent", "product", "quantity", "urgency"}. The
intent and urgency are paraphrased (never named outright), the quantity is
written in words or digits, and the message wraps them in greetings and filler in
varied order: the model has to read the text, and emit a rigid format that no
base model produces unprompted. Seeded; no eval message appears in train.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

PRODUCTS = [
    "laptop",
    "phone",
    "tablet",
    "camera",
    "printer",
    "monitor",
    "keyboard",
    "speaker",
    "router",
    "charger",
    "headset",
    "blender",
    "toaster",
    "kettle",
    "heater",
]
NUMBER_WORDS = ["one", "two", "three", "four", "five"]

INTENTS = {
    "refund": [
        "I want my money back for the {items}.",
        "Please refund the {items} I bought.",
        "Can I get a refund on the {items}?",
        "I returned the {items}, where is my money?",
    ],
    "replace": [
        "Please send me new {items}, these arrived damaged.",
        "I need a replacement for the {items}.",
        "The {items} came cracked, swap them for working ones.",
        "Could you exchange the {items} for new ones?",
    ],
    "cancel": [
        "Cancel my order of {items}.",
        "I no longer want the {items}, stop the order.",
        "Please do not ship the {items}, I changed my mind.",
        "Call off the order for {items}.",
    ],
    "track": [
        "Where are the {items} I ordered?",
        "My {items} still have not arrived.",
        "What is the delivery status of my {items}?",
        "The {items} were due last week and never came.",
    ],
    "repair": [
        "The {items} stopped working, can you fix them?",
        "My {items} keep turning off, I need them repaired.",
        "Something inside the {items} is broken, please mend it.",
        "Can a technician look at the {items}? They make a strange noise.",
    ],
}
URGENCY = {
    "high": ["This is urgent!", "I need this sorted today.", "Please act immediately.", "ASAP please."],
    "normal": ["", "Thanks.", "Regards.", "Thank you for your help."],
    "low": ["No rush.", "Whenever you have time.", "It can wait a few weeks.", "No hurry at all."],
}
GREETINGS = ["", "Hello,", "Hi there.", "Good morning.", "Dear support,", "Hey,"]


def items(product: str, quantity: int, rng: random.Random) -> str:
    count = rng.choice([str(quantity), NUMBER_WORDS[quantity - 1]])
    return f"{count} {product}{'s' if quantity > 1 else ''}"


def example(rng: random.Random) -> dict[str, str]:
    ticket = {
        "intent": rng.choice(sorted(INTENTS)),
        "product": rng.choice(PRODUCTS),
        "quantity": rng.randint(1, 5),
        "urgency": rng.choice(sorted(URGENCY)),
    }
    body = rng.choice(INTENTS[ticket["intent"]]).format(items=items(ticket["product"], ticket["quantity"], rng))
    urgency = rng.choice(URGENCY[ticket["urgency"]])
    parts = [rng.choice(GREETINGS), *([urgency, body] if rng.random() < 0.3 else [body, urgency])]
    return {"prompt": " ".join(p for p in parts if p), "completion": json.dumps(ticket)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=2000)
    parser.add_argument("--eval", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path(__file__).parents[1] / "datasets/json_extract")
    args = parser.parse_args()

    rng = random.Random(args.seed)
    seen: set[str] = set()
    splits: dict[str, list[dict[str, str]]] = {"train": [], "eval": []}
    for split, count in (("train", args.train), ("eval", args.eval)):
        while len(splits[split]) < count:
            row = example(rng)
            if row["prompt"] in seen:  # no eval message appears in train
                continue
            seen.add(row["prompt"])
            splits[split].append(row)
    args.out.mkdir(parents=True, exist_ok=True)
    for split, rows in splits.items():
        with open(args.out / f"{split}.jsonl", "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
        print(f"wrote {len(rows)} examples to {args.out / f'{split}.jsonl'}")


if __name__ == "__main__":
    main()
