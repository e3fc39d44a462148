"""Preference pairs whose rejected answers are a model's own mistakes (on-policy).

    python scripts/make_onpolicy_prefs.py RUN_OR_MODEL_DIR --out prefs/   # e.g. the SFT run DPO starts from

For every json_extract message the chosen answer is the correct ticket; the
rejected one is the model's greedy answer when it scores below 1 on json_fields
(a field wrong, broken JSON), else one of the synthetic mistakes of
make_json_prefs.py. DPO on such pairs pushes down what the policy actually gets
wrong, rather than mistakes it never makes (Rafailov et al. 2023 §6 note the
off-policy gap; Xu et al. 2024 "Is DPO superior to PPO" find on-policy pairs
decisive). Prints how many rejected answers are the model's own.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

from make_json_prefs import REJECTIONS

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("target", help="an ftx run directory or a model directory")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--train", type=int, default=2000)
    parser.add_argument("--eval", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from ftx.cli import load_target
    from ftx.data.formats import Example
    from ftx.data.tokenized import renderer_for
    from ftx.evaluation import generate, resolve_metric

    model, tokenizer, cfg = load_target(args.target, ["data=json_extract"])
    metric = resolve_metric(cfg.data)
    renderer = renderer_for(cfg, tokenizer)
    rng = random.Random(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    for split, count in (("train", args.train), ("eval", args.eval)):
        rows = [json.loads(line) for line in (ROOT / f"datasets/json_extract/{split}.jsonl").read_text().splitlines()]
        rows = rows[:count]
        prompts = [renderer.encode_prompt(Example("", prompt=row["prompt"], completion="")) for row in rows]
        answers = generate(model, tokenizer, prompts, cfg.data.max_new_tokens)
        own = 0
        with open(args.out / f"{split}.jsonl", "w") as f:
            for row, answer in zip(rows, answers, strict=True):
                if metric(answer, row["completion"]) < 1.0 and answer.strip() != row["completion"].strip():
                    rejected, own = answer, own + 1
                else:
                    rejected = rng.choice(REJECTIONS)(json.loads(row["completion"]), rng)
                f.write(json.dumps({"prompt": row["prompt"], "chosen": row["completion"], "rejected": rejected}) + "\n")
        print(f"{split}: {len(rows)} pairs, {own} with the model's own mistake as the rejected answer")


if __name__ == "__main__":
    main()
