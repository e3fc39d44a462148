"""The fine-tuning guides' "comparison at a glance", measured with ftx: full
fine-tuning, LoRA and QLoRA on the same model, data, steps and learning rate.

    python scripts/bench_methods.py                          # the default experiment, CPU
    python scripts/bench_methods.py --out runs/methods trainer=gpu model=hf model.name_or_path=...
    python scripts/bench_methods.py --methods full,lora,qlora,dora trainer.max_steps=600

One multirun (``ftx train -m method=full,lora,qlora``, each method a trial in the
same sweep directory), then a table per method: trainable parameters, peak memory
(measured and predicted), training time and tokens/s, artefact size, task score
and its share of full fine-tuning's, held-out loss, and forgetting (change of
perplexity on general text the model never trained on). The guides claim LoRA
reaches 95–98% and QLoRA 93–97% of full fine-tuning's quality; the table shows
what ftx measures here, whatever it is. Extra arguments are overrides for every run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

GUIDES = {"full": "100%", "lora": "95–98%", "qlora": "93–97%"}


def run_sweep(methods: list[str], sweep_dir: Path, overrides: list[str]) -> None:
    command = [sys.executable, "-m", "ftx.cli", "train", "-m", f"method={','.join(methods)}"]
    command += [f"hydra.sweep.dir={sweep_dir}", "logger=none", "trainer.progress_bar=false", *overrides]
    print("$ ftx " + " ".join(command[3:]), flush=True)
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"the sweep failed:\n{done.stderr[-4000:]}")


def records(sweep_dir: Path) -> dict[str, dict]:
    from ftx.tracking.report import find_runs

    found = {}
    for run in find_runs([sweep_dir]):
        record = json.loads((run / "metrics.json").read_text())
        found[record["method"]] = record
    return found


def table(methods: list[str], found: dict[str, dict]) -> str:
    full_score = found.get("full", {}).get("quality", {}).get("task_score")
    header = (
        "| method | trainable params | peak MiB | predicted MiB | train s | tokens/s | artefact MiB "
        "| task score (base → tuned) | % of full | guides claim | eval loss | forgetting |"
    )
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for method in methods:
        r = found.get(method)
        if r is None or r.get("status") != "completed":
            status = "missing" if r is None else f"{r.get('status')}: {r.get('error', r.get('reason', ''))[:80]}"
            lines.append(f"| {method} | {status} |" + " |" * (header.count("|") - 3))
            continue
        q, mem = r["quality"], r["memory"]
        score = q.get("task_score")
        share = f"{100 * score / full_score:.0f}%" if score is not None and full_score else "–"
        forgetting = f"ppl ×{1 + q['forgetting']:.1f}" if "forgetting" in q else "–"
        scores = f"{q['base_task_score']:.3f} → {score:.3f}" if score is not None else "–"
        predicted = mem.get("predicted_bytes")
        lines.append(
            f"| {method} | {r['params']['trainable']:,} ({100 * r['params']['trainable_share']:.1f}%) "
            f"| {mem['peak_bytes'] / 2**20:.0f} | {predicted / 2**20 if predicted else float('nan'):.0f} "
            f"| {r['time']['train_s']:.1f} | {r['throughput']['tokens_per_s']:,.0f} "
            f"| {r['artefact_bytes'] / 2**20:.2f} | {scores} | {share} | {GUIDES.get(method, '–')} "
            f"| {q['eval_loss']:.4f} | {forgetting} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default="full,lora,qlora")
    parser.add_argument("--out", type=Path, help="keep the runs here (default: a temporary directory)")
    parser.add_argument("overrides", nargs="*", help="for every run, e.g. trainer.max_steps=600 optim.lr=1e-4")
    args = parser.parse_args()
    methods = args.methods.split(",")

    with tempfile.TemporaryDirectory() as tmp:
        sweep_dir = args.out or Path(tmp) / "methods"
        run_sweep(methods, sweep_dir, args.overrides)
        found = records(sweep_dir)
    print(table(methods, found))


if __name__ == "__main__":
    main()
