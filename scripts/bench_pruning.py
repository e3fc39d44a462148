"""Benchmark: what pruning saves. Runs the lora_rank_lr sweep (sweeps/lora_rank_lr.yaml)
twice on the same seeded search space, once with its median pruner and once without,
and prints the training steps each spent and the best quality (held-out loss) each reached.

    python scripts/bench_pruning.py                       # default: 4 trials x 30 steps per arm, on ftx's base
    python scripts/bench_pruning.py --small-base           # a 2-layer, hidden-64 ftx base: ~10x cheaper steps
    python scripts/bench_pruning.py --trials 12 --steps 200
    python scripts/bench_pruning.py --quick -- model=hf model.name_or_path=DIR ...   (a smoke run)

Both arms use the same TPE seed, so they draw the same first trials; after the
pruner stops one, TPE sees a different history and the arms diverge (that is the
point: pruning buys more trials of the budget, not the same trials cheaper).
Result on the project's CPU machine: README.md, "Sweeps".
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import optuna

# A smaller ftx-built base (model/pydoc_tiny.yaml's pretraining, scaled down): built
# once and cached like the default one.
SMALL_BASE = [
    "model.pretrain.hidden_size=64",
    "model.pretrain.intermediate_size=128",
    "model.pretrain.num_layers=2",
    "model.pretrain.num_heads=2",
    "model.pretrain.vocab_size=512",
    "model.pretrain.steps=200",
]


def run_arm(name: str, pruned: bool, options: argparse.Namespace, extra: list[str]) -> dict:
    sweep_dir = Path(options.out) / name
    overrides = [
        f"hydra.sweep.dir={sweep_dir}",
        f"hydra.sweeper.study_name=bench-{name}",
        f"hydra.sweeper.n_trials={options.trials}",
        f"hydra.sweeper.sampler.seed={options.seed}",
        f"hydra.sweeper.sampler.n_startup_trials={options.startup}",
        f"trainer.max_steps={options.steps}",
        f"trainer.val_check_interval={options.val_every}",
        "trainer.save_checkpoints=false",
        "logger=none",
        "data.general_text=null",  # forgetting is not what this compares
        # Quality = held-out loss, with no generated task score: the bench's time goes
        # to training steps, which is what pruning saves.
        "hydra.sweeper.objectives=[quality.eval_loss]",
        "hydra.sweeper.directions=[minimize]",
        "data.task_metric=null",
        f"trainer.batch_size={options.batch_size}",
        "trainer.limit_val_batches=4",
        *(
            [
                f"hydra.sweeper.pruner.n_startup_trials={options.startup}",
                f"hydra.sweeper.pruner.n_warmup_steps={options.warmup}",
            ]
            if pruned
            else ["hydra.sweeper.pruner=null"]
        ),
        *extra,
    ]
    started = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "ftx.cli", "sweep", "lora_rank_lr", *overrides], text=True)
    if out.returncode != 0:
        raise SystemExit(f"{name}: ftx sweep exited with {out.returncode}")
    seconds = time.perf_counter() - started
    storage = f"sqlite:///{(sweep_dir / 'optuna.db').resolve()}"
    study = optuna.load_study(study_name=f"bench-{name}", storage=storage)
    steps = 0
    for trial in study.trials:
        metrics = Path(trial.user_attrs["run_dir"]) / "metrics.json"
        steps += json.loads(metrics.read_text()).get("train", {}).get("steps", 0)  # a failed run has none
    states = [t.state for t in study.trials]
    return {
        "pruner": "median" if pruned else "none",
        "trials": len(study.trials),
        "pruned": states.count(optuna.trial.TrialState.PRUNED),
        "steps": steps,
        "best": study.best_value,
        "seconds": seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=4, help="trials per arm")
    parser.add_argument("--steps", type=int, default=30, help="trainer.max_steps of a trial")
    parser.add_argument("--val-every", type=int, default=5, help="trainer.val_check_interval (pruning checks)")
    parser.add_argument("--startup", type=int, default=1, help="trials before TPE models and before pruning")
    parser.add_argument("--warmup", type=int, default=10, help="steps before a trial can be pruned")
    parser.add_argument("--seed", type=int, default=0, help="TPE seed, the same in both arms")
    parser.add_argument("--batch-size", type=int, default=8, help="trainer.batch_size")
    parser.add_argument("--out", default="multirun/bench_pruning", help="where both sweeps are written")
    parser.add_argument("--small-base", action="store_true", help="pretrain and use a 2-layer, hidden-64 ftx base")
    parser.add_argument("--quick", action="store_true", help="3 trials of 4 steps, eval loss: a smoke run")
    parser.add_argument("overrides", nargs="*", help="after --: extra overrides for every trial")
    options = parser.parse_args()
    if options.quick:
        options.trials, options.steps, options.val_every, options.startup, options.warmup = 3, 4, 1, 1, 0
        options.batch_size = 4
    key = "quality.eval_loss"
    extra = [*(SMALL_BASE if options.small_base else []), *options.overrides]
    rows = [run_arm(name, pruned, options, extra) for name, pruned in (("pruned", True), ("full", False))]
    print(f"\n| pruner | trials | pruned | training steps | best {key} | wall time |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['pruner']} | {row['trials']} | {row['pruned']} | {row['steps']:,} "
            f"| {row['best']:.4g} | {row['seconds']:.0f} s |"
        )
    saved = 1 - rows[0]["steps"] / rows[1]["steps"]
    print(f"\npruning spent {saved:.0%} fewer training steps")


if __name__ == "__main__":
    main()
