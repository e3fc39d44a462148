"""Training throughput of ``ftx train`` against TRL's SFTTrainer and a plain PyTorch loop.

    python scripts/bench_throughput.py                 # Llama hidden 256, 4 layers, seq 256, batch 8, CPU
    python scripts/bench_throughput.py --device cuda --hidden 2048 --layers 16 --vocab 32000 --seq 1024 --batch 4
    python scripts/bench_throughput.py --hidden 64 --layers 2 --seq 32 --batch 2 --steps 3 --rounds 1   # smoke

The same randomly initialised Llama (built from config, saved once), the same
token rows (every row exactly ``--seq`` tokens, all trained), the same optimiser
(AdamW, lr 2e-4, cosine schedule with 5% warm-up, gradient clipping at 1.0),
batch, steps, precision and device for all three, each in a fresh process; the
runners are interleaved round by round (their order rotating) so drift in the
machine's speed hits them alike. Each reports steady-state tokens/s with one
definition (``ftx.objectives.meter.StepClock``): tokens of every step after the
first, over the time from the end of the first step to the end of the last.
Prints each round, then the medians and the ratios ftx/TRL and ftx/plain.

ftx runs as a user runs it (``python -m ftx.cli train`` with overrides: full fine-
tuning, validation and checkpoints off so that none of the three does extra
work); its figure is metrics.json's ``throughput.tokens_per_s``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TEXTS = ROOT / "datasets" / "general" / "python_docs_heldout.txt"
RUNNERS = ("ftx", "trl", "plain")
LR, WARMUP_RATIO, CLIP = 2.0e-4, 0.05, 1.0


def build(out: Path, args: argparse.Namespace) -> tuple[Path, Path]:
    """The model directory and a jsonl of ``{"text"}`` rows, each at least ``--seq`` tokens."""
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    from ftx.models.pretrain import random_llama

    hf_logging.disable_progress_bar()

    texts = [t for t in TEXTS.read_text().split("\n\n") if t.strip()]
    model_dir = random_llama(
        out / "model",
        texts,
        tokenizer_vocab=min(args.vocab, 2048),
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.hidden * 8 // 3 // 64 * 64 or 64,  # Llama's SwiGLU width, rounded to 64
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads or max(1, args.hidden // 64),
        num_key_value_heads=args.heads or max(1, args.hidden // 64),
        max_position_embeddings=max(512, args.seq),
        tie_word_embeddings=False,
    )
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    stream = " ".join(texts)
    ids = tokenizer(stream)["input_ids"]
    rows, need = [], args.batch * args.steps
    chars = len(stream) * args.seq * 2 // len(ids)  # twice the characters of seq tokens, on average
    for i in range(need):
        start = (i * chars) % max(1, len(stream) - chars)
        rows.append({"text": stream[start : start + chars]})
    data = out / "train.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    token_rows(model_dir, data, args.seq)  # every row long enough
    return model_dir, data


def token_rows(model_dir: Path, data: Path, seq: int) -> list[list[int]]:
    """The rows as ftx tokenizes them (text format: BOS? + text + EOS, truncated to seq)."""
    from transformers import AutoTokenizer

    from ftx.data import load_records
    from ftx.data.render import Renderer

    renderer = Renderer(AutoTokenizer.from_pretrained(model_dir), "{prompt}", None)
    records = load_records(str(data), "train", "text", "refuse").records
    rows = [renderer.encode(example, completion_only=True)[0][:seq] for example in records]
    assert all(len(row) == seq for row in rows), "a text row is shorter than --seq: lengthen the texts"
    return rows


def run_ftx(model_dir: Path, data: Path, out: Path, args: argparse.Namespace) -> float:
    run_dir = out / "ftx-run"
    overrides = [
        "model=hf",
        f"model.name_or_path={model_dir}",
        "method=full",
        "data=custom",
        f"data.train_file={data}",
        "data.format=text",
        "data.eval_fraction=0.05",
        f"data.max_length={args.seq}",
        "data.eval_examples=0",
        "data.general_text=null",
        "data.cache=false",
        f"trainer={'gpu' if args.device == 'cuda' else 'cpu'}",
        f"trainer.precision={args.precision}",
        f"trainer.batch_size={args.batch}",
        f"trainer.max_steps={args.steps}",
        f"trainer.val_check_interval={10 * args.steps}",
        "trainer.limit_val_batches=1",
        "trainer.save_checkpoints=false",
        "trainer.progress_bar=false",
        f"trainer.gradient_clip_val={CLIP}",
        f"optim.lr={LR}",
        f"optim.warmup_ratio={WARMUP_RATIO}",
        "logger=none",
        f"paths.output_dir={run_dir}",
    ]
    done = subprocess.run([sys.executable, "-m", "ftx.cli", "train", *overrides], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"ftx train failed:\n{done.stderr[-3000:]}")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    if metrics["train"]["steps"] != args.steps:
        raise RuntimeError(f"ftx ran {metrics['train']['steps']} steps, not {args.steps}")
    return metrics["throughput"]["tokens_per_s"]


def worker(kind: str, model_dir: Path, data: Path, result: Path, args: argparse.Namespace) -> None:
    """One TRL or plain-loop measurement, in this (fresh) process."""
    import torch
    from transformers import AutoModelForCausalLM

    from ftx.objectives.meter import StepClock

    torch.manual_seed(0)
    device = torch.device(args.device)
    rows = token_rows(model_dir, data, args.seq)[: args.batch * args.steps]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    model.to(device).train()
    clock = StepClock()
    tokens_per_step = args.batch * args.seq
    warmup = round(WARMUP_RATIO * args.steps)
    bf16 = args.precision.startswith("bf16")
    if kind == "trl":
        from datasets import Dataset
        from transformers import TrainerCallback
        from trl import SFTConfig, SFTTrainer

        class Clock(TrainerCallback):
            def on_step_begin(self, *_, **__):
                clock.start()

            def on_step_end(self, *_, **__):
                clock.step(tokens_per_step)

        config = SFTConfig(
            output_dir=str(result.parent / "trl-out"),
            max_steps=args.steps,
            per_device_train_batch_size=args.batch,
            learning_rate=LR,
            lr_scheduler_type="cosine",
            warmup_steps=warmup,
            max_grad_norm=CLIP,
            weight_decay=0.0,
            max_length=args.seq,
            logging_steps=10,
            save_strategy="no",
            report_to="none",
            disable_tqdm=True,
            bf16=bf16,
            use_cpu=args.device == "cpu",
            dataloader_num_workers=0,
            seed=0,
        )
        trainer = SFTTrainer(
            model=model, args=config, train_dataset=Dataset.from_dict({"input_ids": rows}), callbacks=[Clock()]
        )
        trainer.train()
    else:
        from transformers import get_scheduler

        optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
        scheduler = get_scheduler("cosine", optimizer, num_warmup_steps=warmup, num_training_steps=args.steps)
        batches = torch.utils.data.DataLoader(torch.tensor(rows), batch_size=args.batch, shuffle=True)
        for step, input_ids in enumerate(batches):
            clock.start()
            input_ids = input_ids.to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                loss = model(input_ids=input_ids, labels=input_ids, use_cache=False).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if step % 10 == 0:
                loss.item()  # what a loop that logs its loss pays (a device sync)
            if device.type == "cuda":
                torch.cuda.synchronize()
            clock.step(tokens_per_step)
    result.write_text(json.dumps({"tokens_per_s": clock.tokens_per_s}))


def measure(kind: str, model_dir: Path, data: Path, out: Path, args: argparse.Namespace) -> float:
    if kind == "ftx":
        return run_ftx(model_dir, data, out, args)
    result = out / f"{kind}.json"
    command = [sys.executable, __file__, "--worker", kind, "--model-dir", str(model_dir), "--data", str(data)]
    command += ["--result", str(result), *_shape_args(args)]
    done = subprocess.run(command, capture_output=True, text=True, env=os.environ | {"WANDB_MODE": "disabled"})
    if done.returncode != 0:
        raise RuntimeError(f"{kind} failed:\n{done.stderr[-3000:]}")
    return json.loads(result.read_text())["tokens_per_s"]


def _shape_args(args: argparse.Namespace) -> list[str]:
    names = ("device", "seq", "batch", "steps", "precision")
    return [item for name in names for item in (f"--{name}", str(getattr(args, name)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=0, help="attention heads (default hidden/64)")
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--precision", default="32-true", help="32-true or bf16-mixed")
    parser.add_argument("--runners", default=",".join(RUNNERS))
    parser.add_argument("--worker", choices=("trl", "plain"), help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.model_dir, args.data, args.result, args)
        return

    runners = args.runners.split(",")
    print(
        f"Llama hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}; seq {args.seq}, batch {args.batch}, "
        f"{args.steps} steps, {args.precision} on {args.device}; {args.rounds} rounds, tokens/s (steady state)",
        flush=True,
    )
    results: dict[str, list[float]] = {kind: [] for kind in runners}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir, data = build(Path(tmp), args)
        for round_ in range(args.rounds):
            order = runners[round_ % len(runners) :] + runners[: round_ % len(runners)]
            for kind in order:
                results[kind].append(measure(kind, model_dir, data, Path(tmp), args))
            print(f"round {round_ + 1}: " + ", ".join(f"{k} {results[k][-1]:.0f}" for k in runners), flush=True)
    medians = {kind: statistics.median(values) for kind, values in results.items()}
    print("\n| runner | tokens/s (median) | runs |\n|---|---|---|")
    for kind in runners:
        print(f"| {kind} | {medians[kind]:.0f} | {', '.join(f'{v:.0f}' for v in results[kind])} |")
    if "ftx" in medians:
        for other, target in (("trl", 1.3), ("plain", 0.95)):
            if other in medians:
                ratio = medians["ftx"] / medians[other]
                verdict = "meets" if ratio >= target else "below"
                print(f"ftx / {other}: {ratio:.2f}x ({verdict} the {target}x target)")


if __name__ == "__main__":
    main()
