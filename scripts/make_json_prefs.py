"""Generate the shipped preference set (datasets/json_prefs/*.jsonl) from json_extract.

    python scripts/make_json_prefs.py [--train 1000 --eval 200 --seed 0]
    python scripts/make_json_prefs.py --style compact --out prefs-compact/   # a stated style instead

Each pair keeps a json_extract message as the prompt, its correct ticket as the
chosen response, and a worse response as the rejected one, of four kinds a
reviewer would mark down: a wrong field (intent, product, quantity or urgency,
so the prompt must be read to tell them apart), JSON cut short, the quantity
spelled in words, or a prose answer instead of JSON. The held-out pairs come from
json_extract's held-out messages.

--style compact makes a style preference instead: the same correct ticket on
both sides, chosen written compactly (no spaces: what a ticket system billed
per token asks for), rejected as json_extract (and an SFT model on it) writes
it. Nothing in the SFT data teaches that preference; score it with
data.task_metric=exact_match against the compact tickets.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from make_json_extract import INTENTS, NUMBER_WORDS, PRODUCTS, URGENCY

ROOT = Path(__file__).parents[1]


def wrong_field(ticket: dict, rng: random.Random) -> str:
    field = rng.choice(["intent", "product", "quantity", "urgency"])
    options = {"intent": sorted(INTENTS), "product": PRODUCTS, "quantity": [1, 2, 3, 4, 5], "urgency": sorted(URGENCY)}
    worse = dict(ticket, **{field: rng.choice([o for o in options[field] if o != ticket[field]])})
    return json.dumps(worse)


def cut_short(ticket: dict, rng: random.Random) -> str:
    text = json.dumps(ticket)
    return text[: rng.randint(len(text) // 3, len(text) - 2)]


def spelled_quantity(ticket: dict, rng: random.Random) -> str:
    return json.dumps(dict(ticket, quantity=NUMBER_WORDS[ticket["quantity"] - 1]))


def prose(ticket: dict, rng: random.Random) -> str:
    return (
        f"The customer wants a {ticket['intent']} for {ticket['quantity']} {ticket['product']}(s); "
        f"urgency is {ticket['urgency']}."
    )


REJECTIONS = [wrong_field, wrong_field, cut_short, spelled_quantity, prose]  # subtle ones twice as often


def pairs(rows: list[dict], count: int, rng: random.Random) -> list[dict]:
    out = []
    for row in rows[:count]:
        ticket = json.loads(row["completion"])
        rejected = rng.choice(REJECTIONS)(ticket, rng)
        out.append({"prompt": row["prompt"], "chosen": row["completion"], "rejected": rejected})
    return out


def compact_pairs(rows: list[dict], count: int) -> list[dict]:
    """The correct ticket both ways: compact chosen, json_extract's spacing rejected."""
    out = []
    for row in rows[:count]:
        compact = json.dumps(json.loads(row["completion"]), separators=(",", ":"))
        out.append({"prompt": row["prompt"], "chosen": compact, "rejected": row["completion"]})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=1000)
    parser.add_argument("--eval", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--style", choices=["compact"], help="a style preference instead of mistakes")
    parser.add_argument("--out", type=Path, default=ROOT / "datasets/json_prefs")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    for split, count in (("train", args.train), ("eval", args.eval)):
        source = ROOT / "datasets/json_extract" / f"{split}.jsonl"
        rows = [json.loads(line) for line in source.read_text().splitlines()]
        made = compact_pairs(rows, count) if args.style else pairs(rows, count, rng)
        with open(args.out / f"{split}.jsonl", "w") as f:
            f.writelines(json.dumps(pair) + "\n" for pair in made)
        print(f"wrote {len(made)} pairs to {args.out / f'{split}.jsonl'}")


if __name__ == "__main__":
    main()
