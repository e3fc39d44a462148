"""Preference pairs whose rejected answers are a model's own mistakes (on-policy).

    python scripts/make_onpolicy_prefs.py RUN_OR_MODEL_DIR --out prefs/   # e.g. the SFT run DPO starts from
    python scripts/make_onpolicy_prefs.py RUN_OR_MODEL_DIR --out prefs/ --samples 8   # both sides sampled

For every json_extract message the chosen answer is the correct ticket; the
rejected one is the model's greedy answer when it scores below 1 on json_fields
(a field wrong, broken JSON), else one of the synthetic mistakes of
make_json_prefs.py. DPO on such pairs pushes down what the policy actually gets
wrong, rather than mistakes it never makes (Rafailov et al. 2023 §6 note the
off-policy gap; Xu et al. 2024 "Is DPO superior to PPO" find on-policy pairs
decisive).

With --samples K the model also samples K answers per message (--temperature):
the chosen answer is then its own correct answer when it found one (greedy
first), the reference otherwise; the rejected one its worst non-empty answer (greedy
first among equals). Both sides on-policy is Iterative RPO's recipe (Pang et al.
2024, "Iterative Reasoning Preference Optimization"): rerun it on the DPO model
for another round. Prints how many answers on each side are the model's own.
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


def choose_pair(reference: str, own: list[str], scores: list[float], rng: random.Random) -> tuple[str, str]:
    """(chosen, rejected) from the model's own answers (greedy first) and their scores:
    its first fully correct answer, else the reference; its worst non-empty answer
    (the first among equals) when that is wrong, else a synthetic mistake."""
    chosen = next((answer for answer, score in zip(own, scores, strict=True) if score == 1.0), reference)
    # An empty answer (EOS at once) is a mistake, but preference data refuses empty sides.
    wrong = [i for i, answer in enumerate(own) if scores[i] < 1.0 and answer.strip() not in ("", reference.strip())]
    if wrong:
        return chosen, own[min(wrong, key=scores.__getitem__)]
    return chosen, rng.choice(REJECTIONS)(json.loads(reference), rng)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("target", help="an ftx run directory or a model directory")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--train", type=int, default=2000)
    parser.add_argument("--eval", type=int, default=200)
    parser.add_argument("--samples", type=int, default=0, help="sampled answers per message (0: greedy only)")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    import torch

    from ftx.cli import load_target
    from ftx.data.formats import Example
    from ftx.data.tokenized import renderer_for
    from ftx.evaluation import generate, stop_ids
    from ftx.metrics import resolve_metric

    model, tokenizer, cfg = load_target(args.target, ["data=json_extract"])
    metric = resolve_metric(cfg.data)
    renderer = renderer_for(cfg, tokenizer)
    stops = stop_ids(model, renderer)
    rng = random.Random(args.seed)
    torch.manual_seed(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    for split, count in (("train", args.train), ("eval", args.eval)):
        rows = [json.loads(line) for line in (ROOT / f"datasets/json_extract/{split}.jsonl").read_text().splitlines()]
        rows = rows[:count]
        prompts = [renderer.encode_prompt(Example("", prompt=row["prompt"], completion="")) for row in rows]
        answers = [[answer] for answer in generate(model, tokenizer, prompts, cfg.data.max_new_tokens, stops)]
        if args.samples:
            sampled = generate(
                model, tokenizer, prompts, cfg.data.max_new_tokens, stops, 32, args.samples, args.temperature
            )
            for i, own in enumerate(answers):
                own.extend(sampled[i * args.samples : (i + 1) * args.samples])
        own_chosen = own_rejected = 0
        with open(args.out / f"{split}.jsonl", "w") as f:
            for row, own in zip(rows, answers, strict=True):
                scores = [metric(answer, row["completion"]) for answer in own]
                chosen, rejected = choose_pair(row["completion"], own, scores, rng)
                own_chosen += chosen in own
                own_rejected += rejected in own
                f.write(json.dumps({"prompt": row["prompt"], "chosen": chosen, "rejected": rejected}) + "\n")
        print(
            f"{split}: {len(rows)} pairs; the model's own answer is the rejected one in {own_rejected}"
            + (f", the chosen one in {own_chosen}" if args.samples else "")
        )


if __name__ == "__main__":
    main()
