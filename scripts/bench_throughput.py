"""Training throughput and peak memory of ``ftx train`` against TRL's SFTTrainer and a plain PyTorch loop.

    python scripts/bench_throughput.py                 # Llama hidden 256, 4 layers, seq 256, batch 8, CPU
    python scripts/bench_throughput.py --device cuda --hidden 2048 --layers 16 --vocab 32000 --seq 1024 --batch 4
    python scripts/bench_throughput.py --hidden 64 --layers 2 --seq 32 --batch 2 --steps 3 --rounds 1   # smoke
    python scripts/bench_throughput.py --shape qwen2.5-0.5b --layers 2 --method lora --seq 512 --batch 4 --steps 5
    python scripts/bench_throughput.py --shape llama3.2-1b --device cuda --precision bf16-mixed --method qlora

``--shape`` builds the model from a published config.json (:data:`SHAPES`:
vocabulary, hidden size, SwiGLU width, GQA heads, tied head; random weights,
``--layers`` cuts the depth); ``--method`` is full, lora (r 16, α 32, every
Linear, the same for all three: TRL and the plain loop get it from PEFT) or qlora
(the same on an nf4 base; the plain loop prepares it with PEFT's
``prepare_model_for_kbit_training``, as PEFT's QLoRA recipe does). Each runner
also reports its peak memory, one measure for all: the max RSS of its process on
CPU, ``torch.cuda.max_memory_allocated`` on CUDA; ftx's planner prediction
(``memory.predicted_bytes``) is printed against ftx's own measured peak.

The same randomly initialised Llama (built from config, saved once), the same
token rows (every row exactly ``--seq`` tokens, all trained), the same optimiser
(AdamW, lr 2e-4, cosine schedule with 5% warm-up, gradient clipping at 1.0),
batch, steps, precision and device for all three, each in a fresh process; the
runners are interleaved round by round (their order rotating) so drift in the
machine's speed hits them alike. Each reports steady-state tokens/s with one
definition (``ftx.tracking.meter.StepClock``): tokens of every step after the
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
# From each model's published config.json (Hugging Face Hub, read 2026-12-02).
SHAPES = {
    "qwen2.5-0.5b": {
        "model_type": "qwen2",
        "vocab_size": 151936,
        "hidden_size": 896,
        "intermediate_size": 4864,
        "num_hidden_layers": 24,
        "num_attention_heads": 14,
        "num_key_value_heads": 2,
        "tie_word_embeddings": True,
        "rope_theta": 1000000.0,
        "rms_norm_eps": 1e-6,
    },
    "smollm2-135m": {
        "model_type": "llama",
        "vocab_size": 49152,
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "tie_word_embeddings": True,
        "rope_theta": 100000.0,
        "rms_norm_eps": 1e-5,
    },
    "llama3.2-1b": {
        "model_type": "llama",
        "vocab_size": 128256,
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 64,
        "tie_word_embeddings": True,
        "rope_theta": 500000.0,
        "rms_norm_eps": 1e-5,
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": 32.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    },
}
MIB = 2**20
LORA = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.05, "target_modules": "all-linear"}
TEXTS = ROOT / "datasets" / "general" / "python_docs_heldout.txt"
RUNNERS = ("ftx", "trl", "plain")
LR, WARMUP_RATIO, CLIP = 2.0e-4, 0.05, 1.0


def build(out: Path, args: argparse.Namespace) -> tuple[Path, Path]:
    """The model directory and a jsonl of ``{"text"}`` rows, each at least ``--seq`` tokens."""
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    from ftx.models.pretrain import random_model

    hf_logging.disable_progress_bar()

    texts = [t for t in TEXTS.read_text().split("\n\n") if t.strip()]
    if args.shape:
        shape = dict(SHAPES[args.shape])
        model_type = shape.pop("model_type")
        shape["num_hidden_layers"] = args.layers or shape["num_hidden_layers"]
    else:
        model_type, shape = (
            "llama",
            {
                "vocab_size": args.vocab,
                "hidden_size": args.hidden,
                "intermediate_size": args.hidden * 8 // 3 // 64 * 64 or 64,  # Llama's SwiGLU width, rounded to 64
                "num_hidden_layers": args.layers or 4,
                "num_attention_heads": args.heads or max(1, args.hidden // 64),
                "num_key_value_heads": args.heads or max(1, args.hidden // 64),
                "tie_word_embeddings": False,
            },
        )
    vocab = shape.pop("vocab_size")
    model_dir = random_model(
        out / "model", texts, min(vocab, 2048), model_type, vocab, max_position_embeddings=max(512, args.seq), **shape
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


def run_ftx(model_dir: Path, data: Path, out: Path, args: argparse.Namespace) -> dict:
    """ftx's run in this (fresh) process, as a user runs it: its tokens/s, peak and prediction."""
    from ftx.cli import main as ftx

    run_dir = out / "ftx-run"
    lora = [f"method.r={LORA['r']}", f"method.alpha={LORA['lora_alpha']}", "method.target_modules=all-linear"]
    overrides = [
        "model=hf",
        f"model.name_or_path={model_dir}",
        f"method={args.method}",
        *(lora if args.method != "full" else []),
        *args.ftx,
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
    try:
        ftx(["train", *overrides])
    except SystemExit as done:
        if done.code:
            raise RuntimeError(f"ftx train failed ({done.code})") from None
    metrics = json.loads((run_dir / "metrics.json").read_text())
    if metrics["train"]["steps"] != args.steps:
        raise RuntimeError(f"ftx ran {metrics['train']['steps']} steps, not {args.steps}")
    memory = metrics["memory"]
    return {
        "tokens_per_s": metrics["throughput"]["tokens_per_s"],
        "measured": memory["peak_bytes"],
        "predicted": memory.get("predicted_bytes"),
    }


def worker(kind: str, model_dir: Path, data: Path, result: Path, args: argparse.Namespace) -> None:
    """One measurement, in this (fresh) process: tokens/s and the process's peak."""
    import resource

    import torch

    if kind == "ftx":
        figures = run_ftx(model_dir, data, result.parent, args)
    else:
        figures = {"tokens_per_s": _peer(kind, model_dir, data, result, args)}
    if args.device == "cuda" and kind != "ftx":
        figures["peak"] = torch.cuda.max_memory_allocated()
    elif args.device == "cuda":
        figures["peak"] = figures["measured"]
    else:
        figures["peak"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    result.write_text(json.dumps(figures))


def _peer(kind: str, model_dir: Path, data: Path, result: Path, args: argparse.Namespace) -> float:
    """TRL's SFTTrainer or the plain loop on the same rows, model and method."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from ftx.tracking.meter import StepClock

    torch.manual_seed(0)
    device = torch.device(args.device)
    rows = token_rows(model_dir, data, args.seq)[: args.batch * args.steps]
    quant = None
    if args.method == "qlora":
        quant = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32,
        )
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation="sdpa", quantization_config=quant, device_map=args.device
    )
    model.train()
    peft_config = None
    if args.method != "full":
        from peft import LoraConfig

        peft_config = LoraConfig(task_type="CAUSAL_LM", **LORA)
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
            model=model,
            args=config,
            train_dataset=Dataset.from_dict({"input_ids": rows}),
            callbacks=[Clock()],
            peft_config=peft_config,
        )
        trainer.train()
    else:
        from transformers import get_scheduler

        if peft_config is not None:
            from peft import get_peft_model, prepare_model_for_kbit_training

            if quant is not None:
                model = prepare_model_for_kbit_training(model)
            model = get_peft_model(model, peft_config)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)
        scheduler = get_scheduler("cosine", optimizer, num_warmup_steps=warmup, num_training_steps=args.steps)
        batches = torch.utils.data.DataLoader(torch.tensor(rows), batch_size=args.batch, shuffle=True)
        for step, input_ids in enumerate(batches):
            clock.start()
            input_ids = input_ids.to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                loss = model(input_ids=input_ids, labels=input_ids, use_cache=False).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, CLIP)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if step % 10 == 0:
                loss.item()  # what a loop that logs its loss pays (a device sync)
            if device.type == "cuda":
                torch.cuda.synchronize()
            clock.step(tokens_per_step)
    return clock.tokens_per_s


def measure(kind: str, model_dir: Path, data: Path, out: Path, args: argparse.Namespace) -> dict:
    """One runner's figures, from a fresh process."""
    result = out / f"{kind}.json"
    command = [sys.executable, __file__, "--worker", kind, "--model-dir", str(model_dir), "--data", str(data)]
    command += ["--result", str(result), *_shape_args(args)]
    done = subprocess.run(command, capture_output=True, text=True, env=os.environ | {"WANDB_MODE": "disabled"})
    if done.returncode != 0:
        raise RuntimeError(f"{kind} failed:\n{done.stderr[-3000:]}")
    return json.loads(result.read_text())


def _shape_args(args: argparse.Namespace) -> list[str]:
    names = ("device", "seq", "batch", "steps", "precision", "method")
    return [item for name in names for item in (f"--{name}", str(getattr(args, name)))] + [
        f"--ftx={override}" for override in args.ftx
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=0, help="depth (default: 4, or the shape's own)")
    parser.add_argument("--shape", choices=sorted(SHAPES), help="a published model's config (see SHAPES)")
    parser.add_argument("--method", choices=("full", "lora", "qlora"), default="full")
    parser.add_argument("--ftx", action="append", default=[], help="an extra override for ftx's run (repeatable)")
    parser.add_argument("--heads", type=int, default=0, help="attention heads (default hidden/64)")
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--precision", default="32-true", help="32-true or bf16-mixed")
    parser.add_argument("--runners", default=",".join(RUNNERS))
    parser.add_argument("--worker", choices=RUNNERS, help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.model_dir, args.data, args.result, args)
        return

    runners = args.runners.split(",")
    model = f"{args.shape} ({args.layers or 'all'} layers)" if args.shape else f"Llama hidden {args.hidden}"
    print(
        f"{model}, {args.method}; seq {args.seq}, batch {args.batch}, {args.steps} steps, {args.precision} on "
        f"{args.device}; {args.rounds} rounds, tokens/s (steady state), peak "
        f"({'max_memory_allocated' if args.device == 'cuda' else 'max RSS of the process'})",
        flush=True,
    )
    results: dict[str, list[dict]] = {kind: [] for kind in runners}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir, data = build(Path(tmp), args)
        for round_ in range(args.rounds):
            order = runners[round_ % len(runners) :] + runners[: round_ % len(runners)]
            for kind in order:
                results[kind].append(measure(kind, model_dir, data, Path(tmp), args))
            shown = ", ".join(
                f"{k} {results[k][-1]['tokens_per_s']:.0f} tok/s {results[k][-1]['peak'] / MIB:.0f} MiB"
                for k in runners
            )
            print(f"round {round_ + 1}: {shown}", flush=True)
    rate = {kind: statistics.median(r["tokens_per_s"] for r in values) for kind, values in results.items()}
    peak = {kind: statistics.median(r["peak"] for r in values) for kind, values in results.items()}
    print("\n| runner | tokens/s (median) | peak MiB (median) | runs (tokens/s) |\n|---|---|---|---|")
    for kind in runners:
        runs = ", ".join(f"{r['tokens_per_s']:.0f}" for r in results[kind])
        print(f"| {kind} | {rate[kind]:.0f} | {peak[kind] / MIB:,.0f} | {runs} |")
    if "ftx" in rate:
        for other, target in (("trl", 1.3), ("plain", 0.95)):
            if other in rate:
                ratio = rate["ftx"] / rate[other]
                verdict = "meets" if ratio >= target else "below"
                print(f"ftx / {other}: {ratio:.2f}x ({verdict} the {target}x target)")
        for other in ("trl", "plain"):
            if other in peak:
                print(f"ftx / {other} peak: {peak['ftx'] / peak[other]:.2f}x")
        last = results["ftx"][-1]
        if last.get("predicted"):
            error = last["predicted"] / last["measured"] - 1
            print(
                f"ftx planner: predicted {last['predicted'] / MIB:,.0f} MiB, measured {last['measured'] / MIB:,.0f} "
                f"MiB (metrics.json memory.*, from before the weights load): {error:+.1%}"
            )


if __name__ == "__main__":
    main()
