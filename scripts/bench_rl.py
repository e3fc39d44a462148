"""RL training speed of ftx's loop (``objective=rloo|grpo``) against TRL's RLOOTrainer and GRPOTrainer, on CPU.

    python scripts/bench_rl.py                                   # 16 prompts x 4, 48 new tokens, 20 steps, 3 rounds
    python scripts/bench_rl.py --steps 40 --rounds 5 --json rl.json
    python scripts/bench_rl.py --runners ftx-grpo,trl-grpo --aggregation token   # DAPO's token mean (TRL's default)
    python scripts/bench_rl.py --steps 3 --rounds 1 --prompts 4 --work /tmp/bench_rl   # smoke
    python scripts/bench_rl.py --ftx trainer.cpu_mmap_threshold_mb=4   # exact-peak malloc setting: less RSS, slower

Prepare (once per --work directory, reused after): a reward model trained by ftx
on the shipped preference pairs (``ftx train objective=reward``, --reward-steps
steps) and exported as a Hugging Face LlamaForSequenceClassification
(``ftx export``); both sides score with that same directory.

Then each runner trains, in a fresh process, the same LoRA policy on ftx's own
base (pydoc-tiny: r 16, alpha 32, dropout 0.05 (off: both disable dropout), every
Linear but the output head: ftx's pydoc-tiny default adapts it too, TRL's trainers
refuse a LoRA on lm_head, so ftx runs with method.adapt_output_head=false), with the
same prompts in the same order (ftx's shuffled prompt loader; TRL is handed
them unshuffled; step for step while --steps x --prompts stays within one epoch,
1000 prompts), k completions each (temperature 1, top-p 1, --max-new-tokens,
cut after EOS), the same reward (that model, nothing else), beta (RLOO 0.05,
GRPO 0.04), epsilon 0.2, one optimisation pass per batch of samples, AdamW at
ftx's lr (3e-3) with a cosine schedule and 5% warm-up, gradient clipping at 1,
fp32, no gradient checkpointing, seed 42. GRPO: --aggregation sequence = TRL
``loss_type="grpo"``, token = ``"dapo"``; TRL's KL without the ratio weight
(``use_bias_correction_kl=False``), as ftx. Asserted before TRL trains: its
prompt ids equal ftx's, and the reward model's input ids of its texts equal
ftx's (ftx scores prompt + completion + EOS: TRL's reward tokenizer here
appends the EOS, which TRL's own text path leaves out).

ftx runs its Python API (``ftx.train.train``, what ``ftx train`` runs, with the
overrides printed for each runner) with validation, checkpoints and progress
lines off; its before/after scoring cannot be turned off and is kept small (4
held-out prompts, no general-text perplexity) and outside the timed steps.

Measured in each run, the same way for both: the time at the end of every
optimizer step (ftx: a Lightning ``on_train_batch_end`` callback; TRL: a
``TrainerCallback.on_step_end``). steps/s = (steps - 1) / (last end - first end),
the first step excluded; generated tokens/s = completion tokens sampled (up to and
including EOS: each side's mean completion length x completions) of those steps
over the same time; peak = the max RSS of the runner's process (its own
``ru_maxrss``, read at the end); reward = the mean reward of the batch, averaged
over the first and the last --window steps. Each step is also split into phases
(generate, reward, policy log-probs, reference (and TRL RLOO's "old") log-probs
without grad; the rest is backward, optimizer and overhead) by timing those
functions. Runners are interleaved round by round (their order rotating); the
table shows medians over rounds and the ratio ftx/TRL steps/s against the 1.3x target.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RUNNERS = ("ftx-rloo", "trl-rloo", "ftx-grpo", "trl-grpo")
BETA = {"rloo": 0.05, "grpo": 0.04}
LORA = {"r": 16, "alpha": 32, "dropout": 0.05}
LR, WARMUP_RATIO, CLIP, SEED, EVAL_ROWS = 3.0e-3, 0.05, 1.0, 42, 4
TARGET = 1.3
MIB = 2**20


# --------------------------------------------------------------------- prepare


def prepare(work: Path, reward_steps: int) -> Path:
    """The exported reward model (trained once per work directory) and a small held-out file."""
    work.mkdir(parents=True, exist_ok=True)
    rows = (ROOT / "datasets" / "json_prefs" / "eval.jsonl").read_text().splitlines()[:EVAL_ROWS]
    (work / "eval.jsonl").write_text("\n".join(rows) + "\n")
    exported = work / "reward-hf"
    if (exported / "config.json").is_file():
        return exported
    run = work / "reward"
    train = [*_ftx_cli(), "train", "objective=reward", "data=json_prefs", f"trainer.max_steps={reward_steps}"]
    train += ["trainer.save_checkpoints=false", "trainer.progress_bar=false", "logger=csv", f"hydra.run.dir={run}"]
    for command in (train, [*_ftx_cli(), "export", str(run), "--out", str(exported)]):
        print("prepare:", " ".join(command[2:]), flush=True)
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=_env())
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(command[2:4])} failed:\n{done.stderr[-3000:]}")
    return exported


def _ftx_cli() -> list[str]:
    return [sys.executable, "-m", "ftx.cli"]


def _env() -> dict[str, str]:
    return os.environ | {"WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false"}


def ftx_overrides(objective: str, run_dir: Path, args: argparse.Namespace) -> list[str]:
    """``ftx train`` overrides of an ftx runner (the TRL runner composes them too, for ftx's prompts)."""
    work = args.work.resolve()
    overrides = [
        f"objective={objective}",
        f"objective.reward_model={work / 'reward-hf'}",
        "objective.reward_functions=[]",
        f"objective.num_generations={args.k}",
        f"objective.beta={BETA[objective]}",
        "objective.temperature=1.0",
        "objective.top_p=1.0",
        "objective.epsilon=0.2",
        *([f"objective.aggregation={args.aggregation}"] if objective == "grpo" else []),
        "data=json_prefs",
        f"data.eval_file={work / 'eval.jsonl'}",
        f"data.eval_examples={EVAL_ROWS}",
        "data.general_text=null",
        f"data.max_new_tokens={args.max_new_tokens}",
        "data.max_length=128",
        "method=lora",
        f"method.r={LORA['r']}",
        f"method.alpha={LORA['alpha']}",
        f"method.dropout={LORA['dropout']}",
        "method.target_modules=all-linear",
        "method.adapt_output_head=false",  # pydoc-tiny's default is true; TRL refuses a LoRA on lm_head
        "model.gradient_checkpointing=false",
        f"trainer.max_steps={args.steps}",
        f"trainer.batch_size={args.prompts}",
        f"trainer.val_check_interval={10 * args.steps}",
        "trainer.limit_val_batches=0",
        "trainer.save_checkpoints=false",
        "trainer.progress_bar=false",
        "trainer.progress_every=0",
        f"trainer.gradient_clip_val={CLIP}",
        f"optim.lr={LR}",
        "optim.scheduler=cosine",
        f"optim.warmup_ratio={WARMUP_RATIO}",
        "logger=none",
        f"seed={SEED}",
    ]
    return [*overrides, *args.ftx, f"paths.output_dir={run_dir}"]


# ---------------------------------------------------------------- the runners

PHASES: dict[str, float] = defaultdict(float)
"""Seconds per phase since the last step ended."""


def timed(owner, name: str, label) -> None:
    """Wrap ``owner.name`` so its time adds to PHASES[label()] (label: a string, or a function of nothing)."""
    import torch

    original = getattr(owner, name)

    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        started = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            key = label if isinstance(label, str) else label(torch.is_grad_enabled())
            PHASES[key] += time.perf_counter() - started

    setattr(owner, name, wrapper)


def logps_phase(grad: bool) -> str:
    return "policy logps" if grad else "ref logps"


class Record:
    """Per optimizer step: when it ended, its phases, mean reward and mean completion length."""

    def __init__(self) -> None:
        self.ends: list[float] = []
        self.phases: list[dict[str, float]] = []
        self.reward: dict[int, float] = {}
        self.length: dict[int, float] = {}

    def step_end(self) -> None:
        self.ends.append(time.perf_counter())
        self.phases.append(dict(PHASES))
        PHASES.clear()

    def result(self, rows: int) -> dict:
        import resource

        steps = len(self.ends)
        seconds = self.ends[-1] - self.ends[0] if steps > 1 else float("nan")
        lengths = [self.length.get(i, float("nan")) for i in range(1, steps + 1)]
        rewards = [self.reward.get(i, float("nan")) for i in range(1, steps + 1)]
        tokens = sum(n * rows for n in lengths[1:])
        durations = [b - a for a, b in zip(self.ends, self.ends[1:], strict=False)]
        phases: dict[str, float] = defaultdict(float)
        for step, duration in zip(self.phases[1:], durations, strict=True):
            for name, value in step.items():
                phases[name] += value / len(durations)
            phases["backward, optimizer, rest"] += (duration - sum(step.values())) / len(durations)
        return {
            "steps": steps,
            "steps_per_s": (steps - 1) / seconds,
            "tokens_per_s": tokens / seconds,
            "step_s": durations,
            "phases_s": dict(phases),
            "reward": rewards,
            "completion_length": lengths,
            "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,  # KiB on Linux
        }


def run_ftx(objective: str, out: Path, args: argparse.Namespace) -> dict:
    """ftx's run in this (fresh) process: ``ftx train`` as its Python API, with a timing callback."""
    import lightning as L

    import ftx.objectives.policy_gradient as pg
    from ftx.config.compose import compose_config
    from ftx.objectives.rewards import Reward
    from ftx.train import train

    record = Record()

    class Steps(L.Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
            record.step_end()
            metrics, step = trainer.callback_metrics, len(record.ends)
            if "train.reward_mean" in metrics:
                record.reward[step] = float(metrics["train.reward_mean"])
                record.length[step] = float(metrics["train.completion_length"])

    timed(pg, "sample", "generate")
    timed(pg, "completion_logps", logps_phase)
    timed(Reward, "__call__", "reward")
    cfg = compose_config(ftx_overrides(objective, out / f"{objective}-run", args))
    done = train(cfg, callbacks=[Steps()])
    if done["status"] != "completed" or len(record.ends) != args.steps:
        raise RuntimeError(f"ftx {objective}: {done['status']} after {len(record.ends)} steps: {done.get('error')}")
    return record.result(args.prompts * args.k)


def ftx_prompts(objective: str, out: Path, args: argparse.Namespace):
    """The prompt examples and token ids of ftx's first --steps batches, in its order."""
    from ftx.config.compose import compose_config
    from ftx.data import load_splits
    from ftx.data.prompts import make_prompt_loader, prompt_examples
    from ftx.models import load_tokenizer, resolve_base

    cfg = compose_config(ftx_overrides(objective, out / "unused", args))
    base = resolve_base(cfg)
    tokenizer = load_tokenizer(cfg, base)
    loader = make_prompt_loader(cfg, tokenizer, prompt_examples(load_splits(cfg).train), shuffle=True)
    examples, ids, epoch = [], [], 0
    while len(examples) < args.steps * args.prompts:
        loader.sampler.set_epoch(epoch)
        for batch in loader:
            examples += batch["examples"]
            rows = zip(batch["input_ids"], batch["attention_mask"], strict=True)
            ids += [row[mask.bool()].tolist() for row, mask in rows]
        epoch += 1
    n = args.steps * args.prompts
    return cfg, base, examples[:n], ids[:n]


class EosAppended:
    """The reward model's tokenizer, writing EOS after each text as ftx's renderer
    does (TRL's text path feeds the reward model prompt + completion only)."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer

    def __call__(self, text, **kwargs):
        return self.tokenizer(text=[t + self.tokenizer.eos_token for t in text], **kwargs)

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)


def check_inputs(cfg, tokenizer, reward_tokenizer, texts: list[str], ids: list[list[int]], examples) -> None:
    """TRL's prompt ids and reward-model input ids equal ftx's (asserted)."""
    from ftx.data import Example
    from ftx.data.tokenized import renderer_for

    assert tokenizer(text=texts)["input_ids"] == ids, "TRL's prompt ids differ from ftx's"
    longest = max(len(row) for row in ids) + cfg.data.max_new_tokens + 1
    assert longest <= cfg.data.max_length, "ftx would truncate the reward model's input: raise data.max_length"
    renderer = renderer_for(cfg, reward_tokenizer)
    for example, text in list(zip(examples, texts, strict=True))[:8]:
        for completion in (example.completion, example.completion[:7], ' {"intent": "x'):
            ours = renderer.encode(Example(example.source, prompt=example.prompt, completion=completion), True)[0]
            theirs = EosAppended(reward_tokenizer)(text=[text + completion], add_special_tokens=False)["input_ids"]
            assert theirs[0] == ours, f"reward model inputs differ: {theirs[0]} vs {ours}"


def run_trl(objective: str, out: Path, args: argparse.Namespace) -> dict:
    """TRL's RLOOTrainer or GRPOTrainer in this (fresh) process, on ftx's prompts in ftx's order."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    cfg, base, examples, ids = ftx_prompts(objective, out, args)
    texts = [cfg.data.prompt_template.format(prompt=e.prompt) for e in examples]
    tokenizer = AutoTokenizer.from_pretrained(base)
    reward_dir = str(args.work.resolve() / "reward-hf")
    reward_tokenizer = AutoTokenizer.from_pretrained(reward_dir)
    check_inputs(cfg, tokenizer, reward_tokenizer, texts, ids, examples)
    torch.manual_seed(SEED)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, attn_implementation="sdpa")
    reward_model = AutoModelForSequenceClassification.from_pretrained(reward_dir, dtype=torch.float32).eval()
    peft_config = LoraConfig(
        r=LORA["r"],
        lora_alpha=LORA["alpha"],
        lora_dropout=LORA["dropout"],
        target_modules="all-linear",
        task_type="CAUSAL_LM",
    )
    common = {
        "output_dir": str(out / f"trl-{objective}"),
        "use_cpu": True,
        "bf16": False,
        "per_device_train_batch_size": args.prompts * args.k,  # completions: one generation batch per step
        "gradient_accumulation_steps": 1,
        "num_generations": args.k,
        "num_iterations": 1,
        "max_completion_length": args.max_new_tokens,
        "temperature": 1.0,
        "top_p": 1.0,
        "top_k": 0,
        "beta": BETA[objective],
        "epsilon": 0.2,
        "disable_dropout": True,
        "gradient_checkpointing": False,
        "shuffle_dataset": False,  # ftx's order, as given
        "learning_rate": LR,
        "lr_scheduler_type": "cosine",
        "warmup_steps": round(WARMUP_RATIO * args.steps),
        "weight_decay": 0.0,
        "max_grad_norm": CLIP,
        "max_steps": args.steps,
        "logging_steps": 1,
        "report_to": [],
        "save_strategy": "no",
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
        "seed": SEED,
    }
    if objective == "rloo":
        from trl import RLOOConfig as Config
        from trl import RLOOTrainer as Trainer
    else:
        from trl import GRPOConfig as Config
        from trl import GRPOTrainer as Trainer

        common |= {
            "loss_type": {"sequence": "grpo", "token": "dapo"}[args.aggregation],
            "scale_rewards": "group",
            "use_bias_correction_kl": False,
        }
    record = Record()

    class Steps(TrainerCallback):
        def on_step_end(self, *_, **__) -> None:
            record.step_end()

        def on_log(self, _args, state, control, logs=None, **__) -> None:
            if logs and "reward" in logs:
                record.reward[state.global_step] = logs["reward"]
                record.length[state.global_step] = logs["completions/mean_length"]

    trainer = Trainer(
        model=model,
        reward_funcs=reward_model,
        args=Config(**common),
        train_dataset=Dataset.from_dict({"prompt": texts}),
        processing_class=tokenizer,
        reward_processing_classes=EosAppended(reward_tokenizer),
        callbacks=[Steps()],
        peft_config=peft_config,
    )
    timed(trainer, "_generate", "generate")
    timed(trainer, "_calculate_rewards", "reward")
    timed(trainer, "_get_per_token_logps_and_entropies", logps_phase)
    trainer.train()
    if len(record.ends) != args.steps:
        raise RuntimeError(f"TRL {objective} ran {len(record.ends)} steps, not {args.steps}")
    return record.result(args.prompts * args.k)


def child(kind: str, result: Path, args: argparse.Namespace) -> None:
    side, objective = kind.split("-")
    figures = (run_ftx if side == "ftx" else run_trl)(objective, result.parent, args)
    result.write_text(json.dumps(figures))


def measure(kind: str, round_: int, args: argparse.Namespace) -> dict:
    """One runner's figures, from a fresh process."""
    out = args.work / "runs" / f"{kind}-{round_}"
    out.mkdir(parents=True, exist_ok=True)
    result = out / "result.json"
    command = [sys.executable, __file__, "--child", kind, "--result", str(result), *_shared_args(args)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=_env())
    (out / "stderr.log").write_text(done.stderr)
    if done.returncode != 0:
        raise RuntimeError(f"{kind} failed (log: {out / 'stderr.log'}):\n{done.stderr[-3000:]}")
    return json.loads(result.read_text())


def _shared_args(args: argparse.Namespace) -> list[str]:
    names = ("work", "steps", "prompts", "k", "max_new_tokens", "aggregation")
    shared = [item for name in names for item in (f"--{name.replace('_', '-')}", str(getattr(args, name)))]
    return shared + [item for override in args.ftx for item in ("--ftx", override)]


# ------------------------------------------------------------------------ main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--prompts", type=int, default=16, help="prompts per optimizer step (ftx trainer.batch_size)")
    parser.add_argument("--k", type=int, default=4, help="completions per prompt (num_generations)")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--aggregation", choices=("sequence", "token"), default="sequence", help="GRPO's loss mean")
    parser.add_argument("--window", type=int, default=5, help="steps averaged for the first/last reward")
    parser.add_argument("--reward-steps", type=int, default=60, help="the reward model's training steps (prepare)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench_rl"), help="reward model cache and run dirs")
    parser.add_argument("--runners", default=",".join(RUNNERS))
    parser.add_argument(
        "--ftx", action="append", default=[], metavar="OVERRIDE", help="an extra ftx train override (repeatable)"
    )
    parser.add_argument("--json", type=Path, help="write the per-run results and medians here")
    parser.add_argument("--child", choices=RUNNERS, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.result, args)
        return
    if args.steps < 2:
        parser.error("--steps must be at least 2 (the first step is not timed)")

    runners = args.runners.split(",")
    prepare(args.work, args.reward_steps)
    print(
        f"pydoc-tiny LoRA policy, {args.prompts} prompts x {args.k} completions, <= {args.max_new_tokens} new tokens, "
        f"{args.steps} steps, fp32 on CPU, GRPO aggregation {args.aggregation}; {args.rounds} rounds; steady state "
        "(first step excluded), peak = max RSS of the process",
        flush=True,
    )
    for objective in sorted({kind.split("-")[1] for kind in runners if kind.startswith("ftx")}):
        shown = " ".join(ftx_overrides(objective, Path("RUN"), args))
        print(f"ftx-{objective} runs: ftx train {shown}", flush=True)
    results: dict[str, list[dict]] = {kind: [] for kind in runners}
    for round_ in range(args.rounds):
        order = runners[round_ % len(runners) :] + runners[: round_ % len(runners)]
        for kind in order:
            results[kind].append(measure(kind, round_, args))
        shown = ", ".join(f"{k} {results[k][-1]['steps_per_s']:.3f} steps/s" for k in runners)
        print(f"round {round_ + 1}: {shown}", flush=True)

    window = max(1, min(args.window, args.steps // 2))
    summary = {}
    for kind, runs in results.items():
        summary[kind] = {
            "steps_per_s": statistics.median(r["steps_per_s"] for r in runs),
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in runs),
            "peak": statistics.median(r["peak"] for r in runs),
            "reward_first": statistics.median(statistics.fmean(r["reward"][:window]) for r in runs),
            "reward_last": statistics.median(statistics.fmean(r["reward"][-window:]) for r in runs),
            "completion_length": statistics.median(statistics.fmean(r["completion_length"]) for r in runs),
            "phases_s": {
                name: statistics.median(r["phases_s"].get(name, 0.0) for r in runs)
                for name in dict.fromkeys(name for r in runs for name in r["phases_s"])
            },
        }
    print(
        f"\n| runner | steps/s | gen tokens/s | peak MiB | reward first {window} -> last {window} | mean length "
        "| runs (steps/s) |\n|---|---|---|---|---|---|---|"
    )
    for kind in runners:
        s, runs = summary[kind], ", ".join(f"{r['steps_per_s']:.3f}" for r in results[kind])
        print(
            f"| {kind} | {s['steps_per_s']:.3f} | {s['tokens_per_s']:.0f} | {s['peak'] / MIB:,.0f} "
            f"| {s['reward_first']:.3f} -> {s['reward_last']:.3f} | {s['completion_length']:.1f} | {runs} |"
        )
    print("\nseconds per step (median over rounds, steady state):")
    for kind in runners:
        print(f"  {kind}: " + ", ".join(f"{name} {value:.3f}" for name, value in summary[kind]["phases_s"].items()))
    ratios = {}
    for objective in ("rloo", "grpo"):
        ours, theirs = summary.get(f"ftx-{objective}"), summary.get(f"trl-{objective}")
        if ours and theirs:
            ratios[objective] = ours["steps_per_s"] / theirs["steps_per_s"]
            verdict = "meets" if ratios[objective] >= TARGET else "below"
            peak = ours["peak"] / theirs["peak"]
            print(
                f"ftx / TRL {objective}: {ratios[objective]:.2f}x steps/s ({verdict} the {TARGET}x target), "
                f"{peak:.2f}x peak"
            )
    if args.json:
        settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k not in ("child",)}
        report = {"settings": settings, "runs": results, "summary": summary, "ratios": ratios, "target": TARGET}
        args.json.write_text(json.dumps(report, indent=1))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
