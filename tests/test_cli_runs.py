"""The CLI end to end: multirun, and the default experiment on ftx's own base."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
from conftest import ftx_main, tiny_overrides


def test_multirun_leaves_one_run_directory_per_method(tiny_model_dir, tiny_data, tmp_path):
    overrides = [o for o in tiny_overrides(tiny_model_dir, tiny_data, tmp_path) if not o.startswith("paths.")]
    out = ftx_main(
        "train",
        "-m",
        "method=full,lora,qlora",
        f"hydra.sweep.dir={tmp_path}",
        *overrides,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    runs = sorted(p for p in tmp_path.iterdir() if p.is_dir())
    assert [p.name.split("-")[-2] for p in runs] == ["full", "lora", "qlora"]
    for run in runs:
        metrics = json.loads((run / "metrics.json").read_text())
        assert metrics["status"] == "completed"
        assert (run / ".hydra" / "config.yaml").is_file()
    assert (runs[0] / "model").is_dir() and (runs[1] / "adapter").is_dir() and (runs[2] / "adapter").is_dir()
    report = (tmp_path / "report.md").read_text()  # written by the multirun callback
    assert all(f"| {run.name} |" in report for run in runs)
    assert "trial 3 done" in out.stdout + out.stderr


@pytest.mark.slow
def test_default_experiment_pretrains_its_base_once_then_fine_tunes(tmp_path):
    """`ftx train` as shipped (shortened): builds the pydoc base, fine-tunes on the shipped data."""
    env = os.environ | {"FTX_CACHE_DIR": str(tmp_path / "cache")}
    short = [
        "model.pretrain.steps=4",
        "model.pretrain.hidden_size=64",
        "model.pretrain.num_heads=2",
        "model.pretrain.vocab_size=512",
        "trainer.max_steps=2",
        "data.eval_examples=4",
        "data.max_new_tokens=4",
        "trainer.progress_bar=false",
    ]

    def run(name: str) -> subprocess.CompletedProcess:
        return ftx_main("train", *short, f"hydra.run.dir={tmp_path / name}", env=env)

    first = run("first")
    assert first.returncode == 0, first.stderr[-3000:]
    metrics = json.loads((tmp_path / "first" / "metrics.json").read_text())
    assert metrics["status"] == "completed" and metrics["method"] == "lora" and metrics["model"] == "pydoc-tiny"
    built = [p for p in (tmp_path / "cache" / "models").iterdir() if not p.name.startswith(".")]
    assert len(built) == 1 and (built[0] / "ftx_pretrain.json").is_file()
    assert metrics["base_model"] == str(built[0])
    assert list((tmp_path / "first").glob("wandb/offline-run-*/run-*.wandb"))  # W&B, offline without a key

    second = run("second")
    assert second.returncode == 0, second.stderr[-3000:]
    assert "pretraining ftx base" in first.stdout + first.stderr
    assert "pretraining ftx base" not in second.stdout + second.stderr
    # The same numbers whether the run built its base or found it cached.
    again = json.loads((tmp_path / "second" / "metrics.json").read_text())
    assert again["train"]["final_loss"] == metrics["train"]["final_loss"]
    assert again["quality"]["eval_loss"] == metrics["quality"]["eval_loss"]
