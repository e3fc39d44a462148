"""Bad input stops before any weights load, exits non-zero, names the problem,
and leaves no run directory that looks finished."""

from __future__ import annotations

import subprocess

from conftest import ftx_main, read_metrics, tiny_overrides


def ftx_train(*overrides: str) -> subprocess.CompletedProcess:
    return ftx_main("train", *overrides)


def assert_refused(out: subprocess.CompletedProcess, run_dir, *needles: str) -> None:
    assert out.returncode == 2, out.stderr
    for needle in needles:
        assert needle in out.stderr, out.stderr
    assert "Traceback" not in out.stderr
    metrics = read_metrics(run_dir)
    assert metrics["status"] == "failed" and needles[0] in metrics["error"]
    assert not (run_dir / "adapter").exists() and not (run_dir / "model").exists()
    assert not (run_dir / "checkpoints").exists()


def test_qlora_with_full_fine_tuning_is_refused(tiny_model_dir, tiny_data, tmp_path):
    args = [*tiny_overrides(tiny_model_dir, tiny_data, tmp_path), "method=full", "quant=nf4"]
    args = [a.replace("paths.output_dir", "hydra.run.dir") for a in args]
    assert_refused(ftx_train(*args), tmp_path, "quant=nf4", "method=qlora")


def test_missing_model_path_is_named(tiny_data, tmp_path):
    args = [
        "model=hf",
        "model.name_or_path=/nowhere/llama",
        f"data.train_file={tiny_data['train']}",
        f"hydra.run.dir={tmp_path}",
    ]
    assert_refused(ftx_train(*args), tmp_path, "/nowhere/llama")


def test_bad_data_line_is_named_before_weights_load(tiny_model_dir, tiny_data, tmp_path):
    bad = tmp_path / "bad.jsonl"
    good = tiny_data["train"].read_text().splitlines()
    bad.write_text("\n".join([good[0], '{"prompt": "no completion"}', "not json", good[1]]) + "\n")
    run_dir = tmp_path / "run"
    args = [*tiny_overrides(tiny_model_dir, tiny_data, run_dir), f"data.train_file={bad}"]
    args = [a.replace("paths.output_dir", "hydra.run.dir") for a in args]
    out = ftx_train(*args)
    assert_refused(out, run_dir, f"{bad}:2: missing 'completion'", f"{bad}:3: invalid JSON")
    assert "Loading weights" not in out.stderr
