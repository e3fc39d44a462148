"""Predicted against measured peak memory, per method, on a Llama built from config.

    python scripts/bench_memory.py                      # GPU: hidden 1024, 8 layers, bf16-mixed
    python scripts/bench_memory.py --device cpu --hidden 256 --layers 4 --vocab 8192 --batch 16 --steps 20

Builds a randomly initialised Llama of the given shape (no download; the tokenizer
is trained on the shipped data, the model's vocabulary may be larger), then runs
``ftx train`` for each method in a fresh process, as a user would, and prints a
markdown table of ``memory.predicted_bytes`` against ``memory.peak_bytes`` from
each run's metrics.json. Extra arguments are passed to every run as overrides.

The prediction is for a run's longest batch; on CPU give enough steps to meet it
(a run of 2 random batches rarely does, and then reads below its prediction).
Results: docs/MEMORY.md, "Accuracy".
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "datasets" / "json_extract"


def build_model(out: Path, hidden: int, layers: int, vocab: int) -> Path:
    from ftx.models.pretrain import random_llama

    return random_llama(
        out,
        (DATA / "train.jsonl").read_text().splitlines()[:400],
        tokenizer_vocab=min(vocab, 512),
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=hidden * 8 // 3 // 64 * 64,  # Llama's SwiGLU width, rounded to 64
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 64),
        num_key_value_heads=max(1, hidden // 256),  # grouped-query attention, as in Llama 3
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )


def run(method: str, model_dir: Path, run_dir: Path, args: argparse.Namespace) -> dict:
    device = ["trainer=gpu"] if args.device == "cuda" else ["trainer=cpu"]
    overrides = [
        "model=hf",
        f"model.name_or_path={model_dir}",
        f"method={method}",
        *device,
        f"paths.output_dir={run_dir}",
        f"trainer.max_steps={args.steps}",
        f"trainer.batch_size={args.batch}",
        "trainer.val_check_interval=1000",
        "trainer.limit_val_batches=1",
        "trainer.save_checkpoints=false",
        "trainer.progress_bar=false",
        "data.eval_examples=4",
        "data.max_new_tokens=8",
        "data.general_text=null",
        "logger=none",
        *args.overrides,
    ]
    done = subprocess.run(
        [sys.executable, "-m", "ftx.cli", "train", *overrides], capture_output=True, text=True, timeout=3600
    )
    if done.returncode != 0:
        raise RuntimeError(f"{method} failed:\n{done.stderr[-3000:]}")
    return json.loads((run_dir / "metrics.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--methods", default="full,lora,qlora,dora")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("overrides", nargs="*", help="passed to every run, e.g. model.gradient_checkpointing=true")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_model(Path(tmp) / "model", args.hidden, args.layers, args.vocab)
        rows = [
            "| method | quant | precision | predicted MiB | measured MiB | error |",
            "|---|---|---|---|---|---|",
        ]
        print(
            f"Llama hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}, batch {args.batch}, "
            f"{args.steps} steps on {args.device} {' '.join(args.overrides)}",
            flush=True,
        )
        for method in args.methods.split(","):
            metrics = run(method, model_dir, Path(tmp) / method, args)
            predicted, measured = metrics["memory"]["predicted_bytes"], metrics["memory"]["peak_bytes"]
            rows.append(
                f"| {method} | {metrics['quant']} | {metrics['precision']} | {predicted / 2**20:.1f} | "
                f"{measured / 2**20:.1f} | {100 * (predicted - measured) / measured:+.1f}% |"
            )
            print(rows[-1], flush=True)
        print("\n".join(rows))


if __name__ == "__main__":
    main()
