"""Does a reward model read the message, or only recognise likely answers?

    python scripts/probe_reward_model.py REWARD_RUN_OR_MODEL [--examples 100]

For each held-out json_extract message, the correct ticket is scored against
every ticket that differs from it in one field (each other value that field
takes in the training data: 14 other products, 4 other quantities, ...). A
field is "read" on a message when the correct ticket outscores all of them.
Held-out pair accuracy cannot tell the two apart: a reward model that has only
learnt which answers its training pairs rejected (the SFT model's favourite
wrong product, say) ranks those pairs well and still rewards any confident
guess, which is what a policy then exploits (reward hacking). Chance is
1 / (number of values). Prints one row per field.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def variants(ticket: dict, values: dict[str, list]) -> dict[str, list[dict]]:
    """Per field, the ticket with that field set to each of its other values."""
    return {
        field: [dict(ticket, **{field: value}) for value in options if value != ticket[field]]
        for field, options in values.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("reward_model", help="a run of ftx train objective=reward, or a one-output HF classifier")
    parser.add_argument("--examples", type=int, default=100)
    args = parser.parse_args()

    from ftx.config import compose_config
    from ftx.data import Example
    from ftx.objectives.rewards import Reward

    overrides = ["objective=grpo", f"objective.reward_model={args.reward_model}", "objective.reward_functions=[]"]
    reward = Reward(compose_config(overrides), "cpu")  # only its reward model is used
    data = ROOT / "datasets" / "json_extract"
    tickets = [json.loads(json.loads(line)["completion"]) for line in (data / "train.jsonl").open()]
    values = {field: sorted({t[field] for t in tickets}, key=str) for field in tickets[0]}
    rows = [json.loads(line) for line in (data / "eval.jsonl").read_text().splitlines()[: args.examples]]
    read = dict.fromkeys(values, 0)
    for row in rows:
        ticket = json.loads(row["completion"])
        others = variants(ticket, values)
        answers = [json.dumps(ticket)] + [json.dumps(other) for field in values for other in others[field]]
        scores = reward.score([Example("probe", prompt=row["prompt"], completion="")] * len(answers), answers)
        start = 1  # one reward-model pass per message: the ticket, then each field's variants in turn
        for field in values:
            read[field] += bool((scores[0] > scores[start : start + len(others[field])]).all())
            start += len(others[field])
    print(f"{'field':<10} {'values':>6} {'chance':>7} {'read':>6}   ({len(rows)} held-out messages)")
    for field, options in values.items():
        print(f"{field:<10} {len(options):>6} {1 / len(options):>7.2f} {read[field] / len(rows):>6.2f}")


if __name__ == "__main__":
    main()
