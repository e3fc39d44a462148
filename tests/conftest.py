"""Fixtures: a tiny Llama and tokenizer built in-process, tiny data, and config
composition against the real conf/ tree. Nothing here reaches a network."""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import logging
import os
import subprocess
import sys
import traceback
from pathlib import Path

import pytest

from ftx.config import project_root

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")

SHIPPED = project_root() / "datasets" / "json_extract"


def script_module(name: str):
    """A module of scripts/ (they import each other by bare name, so scripts/ joins sys.path)."""
    scripts = str(project_root() / "scripts")
    if scripts not in sys.path:
        sys.path.insert(0, scripts)
    return importlib.import_module(name)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A 2-layer Llama (hidden 64) with a BPE tokenizer trained on the shipped data."""
    from ftx.models.pretrain import random_llama

    out = tmp_path_factory.mktemp("tiny-llama")
    texts = [line for line in (SHIPPED / "train.jsonl").read_text().splitlines()[:400]]
    random_llama(
        out,
        texts,
        tokenizer_vocab=300,
        hidden_size=64,  # bitsandbytes 4-bit CPU kernels need rows >= blocksize 64
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,  # like ftx's own base: the output head is the embedding
    )
    return out


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> dict[str, Path]:
    """24 train and 8 eval examples from the shipped dataset."""
    out = tmp_path_factory.mktemp("data")
    files = {}
    for split, count in (("train", 24), ("eval", 8)):
        lines = (SHIPPED / f"{split}.jsonl").read_text().splitlines()[:count]
        files[split] = out / f"{split}.jsonl"
        files[split].write_text("\n".join(lines) + "\n")
    return files


def tiny_overrides(model_dir: Path, data: dict[str, Path], run_dir: Path, steps: int = 3) -> list[str]:
    """Overrides that make any method run in seconds on the tiny fixtures."""
    return [
        "model=hf",
        f"model.name_or_path={model_dir}",
        f"data.train_file={data['train']}",
        f"data.eval_file={data['eval']}",
        "data.eval_examples=4",
        "data.max_new_tokens=8",
        "data.general_max_tokens=256",
        f"paths.output_dir={run_dir}",
        f"trainer.max_steps={steps}",
        "trainer.batch_size=4",
        "trainer.val_check_interval=2",
        "trainer.limit_val_batches=1",
        "trainer.log_every_n_steps=1",
        "trainer.progress_bar=false",
        "logger=none",
        "method.r=4",
        "method.alpha=8",
        # A stated CPU runtime overhead: no calibration before each of the suite's
        # ~70 runs (test_plan.py tests the calibration itself).
        "plan.cpu_overhead_mb=0",
    ]


def read_metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def ftx_cli(*args: str, timeout: int = 600, **kwargs) -> subprocess.CompletedProcess:
    """Run the `ftx` command in a fresh process, as a user would. For tests whose
    subject is the process (signals, DDP ranks, start-up, imports); the rest use
    :func:`ftx_main`, which saves the ~10 s of importing torch and its stack again."""
    return subprocess.run(
        [sys.executable, "-m", "ftx.cli", *args], capture_output=True, text=True, timeout=timeout, **kwargs
    )


def as_process(command: list[str], call) -> subprocess.CompletedProcess:
    """``call()`` in this process, returned as a subprocess would be: the exit code
    (SystemExit's; 1 for an uncaught exception, its traceback on stderr) and the
    captured stdout and stderr."""
    stdout, stderr, code = io.StringIO(), io.StringIO(), 0
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        try:
            call()
        except SystemExit as done:
            code = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
            if not isinstance(done.code, int | None):
                print(done.code, file=sys.stderr)
        except Exception:
            traceback.print_exc()
            code = 1
    return subprocess.CompletedProcess(command, code, stdout.getvalue(), stderr.getvalue())


def script_main(name: str, *args: str) -> subprocess.CompletedProcess:
    """Run ``scripts/NAME.py ARGS`` in this process (its ``main()`` reads sys.argv), as
    :func:`ftx_main` runs the CLI; sys.argv restored."""
    module = script_module(name)
    saved_argv = list(sys.argv)
    sys.argv[:] = [f"{name}.py", *args]
    try:
        return as_process([name, *args], module.main)
    finally:
        sys.argv[:] = saved_argv


def ftx_main(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run ``ftx ARGS`` in this process through ``ftx.cli.main``, as the console script
    does, and return what a subprocess would (:func:`as_process`). ``env`` replaces
    the environment for the call, ``cwd`` the working directory; sys.argv, Hydra's
    global state, the logging handlers a run adds and warnings' routing are restored."""
    from hydra.core.global_hydra import GlobalHydra

    from ftx.cli import main

    saved_argv, saved_env, saved_cwd = list(sys.argv), dict(os.environ), os.getcwd()
    root = logging.getLogger()
    saved_handlers, saved_level = list(root.handlers), root.level
    try:
        if env is not None:
            os.environ.clear()
            os.environ.update(env)
        if cwd is not None:
            os.chdir(cwd)
        return as_process(["ftx", *args], lambda: main(list(args)))
    finally:
        sys.argv[:] = saved_argv
        os.environ.clear()
        os.environ.update(saved_env)
        os.chdir(saved_cwd)
        GlobalHydra.instance().clear()
        for handler in [h for h in root.handlers if h not in saved_handlers]:
            root.removeHandler(handler)
            handler.close()
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)
        # The run routed Python warnings into logging (ftx.console.route_libraries);
        # hand warnings.showwarning back to the one this test had (pytest's recorder),
        # or the next call's captureWarnings(True) would keep a stale one and log nothing.
        logging.captureWarnings(False)
