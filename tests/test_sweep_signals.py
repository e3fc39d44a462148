"""A sweep stops when it is told to and resumes what it stopped: SIGTERM, SIGINT
and SIGUSR1 to a running ``ftx sweep`` (one trial at a time, and two joblib
workers) stop the running trials at their next batch with a checkpoint, start no
new trial and exit non-zero; the same command then resumes the stopped trials
first, from their checkpoints (the weights an uninterrupted trial reaches), and
runs every other trial exactly once."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import torch
from conftest import ftx_main, read_metrics, tiny_overrides
from optuna.trial import TrialState
from safetensors.torch import load_file

STEPS = 240  # a ~15 s window (2 workers, 2 cores) in which both are training; at 60 a worker that started
# a few seconds late under load found the other one finished. A checkpoint every 5 steps shows it has begun
LRS = (0.003, 0.002, 0.001)


def sweep_args(tiny_model_dir, tiny_data, sweep_dir: Path, n_trials: int = 3, *extra: str) -> list[str]:
    overrides = tiny_overrides(tiny_model_dir, tiny_data, sweep_dir, steps=STEPS)
    return [
        "lora_rank_lr",
        *(o for o in overrides if not o.startswith("paths.")),
        f"hydra.sweep.dir={sweep_dir}",
        f"hydra.sweeper.n_trials={n_trials}",
        f"optim.lr=choice({','.join(map(str, LRS))})",
        "hydra.sweeper.enqueue=[" + ",".join(f"{{optim.lr:{lr}}}" for lr in LRS) + "]",
        "hydra.sweeper.pruner=null",
        "hydra.sweeper.objectives=[quality.eval_loss]",
        "hydra.sweeper.directions=[minimize]",
        "trainer.checkpoint_every=5",
        "trainer.val_check_interval=30",
        "data.eval_examples=2",
        "data.max_new_tokens=4",
        *extra,
    ]


def study_of(sweep_dir: Path) -> optuna.Study:
    return optuna.load_study(study_name="lora_rank_lr", storage=f"sqlite:///{sweep_dir / 'optuna.db'}")


def trial_dir(sweep_dir: Path, number: int) -> Path:
    found = list(sweep_dir.glob(f"{number}-*"))
    assert len(found) == 1, found
    return found[0]


def adapter(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "adapter" / "adapter_model.safetensors")


def signal_mid_trials(args: list[str], sweep_dir: Path, trials: tuple[int, ...], signum: int):
    """Start ``ftx sweep`` in a process of its own, signal it once each of ``trials``
    is training (its first checkpoint written), and wait for it to end."""
    process = subprocess.Popen(
        [sys.executable, "-m", "ftx.cli", "sweep", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 300
    try:
        while not all(list(sweep_dir.glob(f"{n}-*/checkpoints/last.ckpt")) for n in trials):
            if process.poll() is not None or time.monotonic() > deadline:
                out, err = process.communicate()
                pytest.fail(f"the sweep ended (or hung) before trials {trials} were training:\n{err[-3000:]}")
            time.sleep(0.02)
        sent = time.monotonic()
        process.send_signal(signum)
        out, err = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    return process.returncode, out + err, time.monotonic() - sent


@pytest.fixture(scope="module")
def uninterrupted(tiny_model_dir, tiny_data, tmp_path_factory) -> Path:
    """The same sweep's first two trials, never signalled."""
    sweep_dir = tmp_path_factory.mktemp("uninterrupted")
    done = ftx_main("sweep", *sweep_args(tiny_model_dir, tiny_data, sweep_dir, n_trials=2))
    assert done.returncode == 0, done.stderr[-3000:]
    return sweep_dir


def assert_never_started(trials, sweep_dir: Path) -> None:
    """Enqueued trials wait in the study from its start; these never ran."""
    for trial in trials:
        assert trial.state == TrialState.WAITING and "stopped" not in trial.user_attrs
        assert not list(sweep_dir.glob(f"{trial.number}-*"))


def assert_resumed_to_the_uninterrupted_weights(sweep_dir: Path, number: int, reference: Path) -> None:
    record = read_metrics(trial_dir(sweep_dir, number))
    assert record["status"] == "completed" and record["train"]["steps"] == STEPS
    assert record["train"]["resumed_from"].endswith("last.ckpt")  # it went on from its checkpoint
    got, want = adapter(trial_dir(sweep_dir, number)), adapter(trial_dir(reference, number))
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want), "the resumed trial's weights differ"


@pytest.mark.parametrize("name", ["TERM", "INT", "USR1"])
def test_a_signalled_sweep_stops_and_the_same_command_resumes_it(
    name, tiny_model_dir, tiny_data, tmp_path, uninterrupted
):
    signum = getattr(signal, f"SIG{name}")
    args = sweep_args(tiny_model_dir, tiny_data, tmp_path)
    code, output, seconds = signal_mid_trials(args, tmp_path, (1,), signum)

    assert code == 128 + signum, output[-3000:]
    assert seconds < 30, f"the sweep took {seconds:.0f} s to stop"
    study = study_of(tmp_path)
    assert [t.state for t in study.trials[:2]] == [TrialState.COMPLETE, TrialState.WAITING]
    assert_never_started(study.trials[2:], tmp_path)  # no trial after the signal
    stopped = study.trials[1]
    assert f"SIG{name} at step" in stopped.user_attrs["stopped"]
    assert (trial_dir(tmp_path, 1) / "checkpoints" / "last.ckpt").is_file()
    assert read_metrics(trial_dir(tmp_path, 1))["status"] == "stopped"
    assert "trial 1 paused" in output and "resume: ftx train" in output
    assert "0 of 3 trials done; 3 to run, 1 at a time; about" in output  # the time, up front (planner)
    assert "trial 1/3 done (#0, complete); about" in output  # then measured
    first_record = (trial_dir(tmp_path, 0) / "metrics.json").read_text()

    again = ftx_main("sweep", *args)
    assert again.returncode == 0, again.stderr[-3000:]
    study = study_of(tmp_path)
    assert [t.number for t in study.trials] == [0, 1, 2]  # the stopped trial kept its number
    assert all(t.state == TrialState.COMPLETE for t in study.trials)
    assert study.trials[1].params == {"optim.lr": LRS[1]}
    assert (trial_dir(tmp_path, 0) / "metrics.json").read_text() == first_record  # trial 0 ran once
    assert_resumed_to_the_uninterrupted_weights(tmp_path, 1, uninterrupted)


def test_two_joblib_workers_both_stop_and_resume(tiny_model_dir, tiny_data, tmp_path, uninterrupted):
    args = sweep_args(tiny_model_dir, tiny_data, tmp_path, 3, "hydra/launcher=joblib", "hydra.launcher.n_jobs=2")
    code, output, seconds = signal_mid_trials(args, tmp_path, (0, 1), signal.SIGTERM)

    assert code == 128 + signal.SIGTERM, output[-3000:]
    assert seconds < 30, f"the sweep took {seconds:.0f} s to stop"
    study = study_of(tmp_path)
    assert [t.state for t in study.trials[:2]] == [TrialState.WAITING, TrialState.WAITING]
    assert all("stopped" in t.user_attrs for t in study.trials[:2])
    assert_never_started(study.trials[2:], tmp_path)
    for number in (0, 1):  # each worker heard of the stop through the sweep's stop file
        assert read_metrics(trial_dir(tmp_path, number))["status"] == "stopped"

    again = ftx_main("sweep", *args)
    assert again.returncode == 0, again.stderr[-3000:]
    study = study_of(tmp_path)
    assert [t.number for t in study.trials] == [0, 1, 2]
    assert all(t.state == TrialState.COMPLETE for t in study.trials)
    for number in (0, 1):
        assert_resumed_to_the_uninterrupted_weights(tmp_path, number, uninterrupted)


def test_sweep_plan_prints_the_trials_memory_and_time_without_training(tiny_model_dir, tiny_data, tmp_path):
    overrides = [
        o for o in tiny_overrides(tiny_model_dir, tiny_data, tmp_path) if not o.startswith(("paths.", "method.r"))
    ]
    out = ftx_main("sweep", "lora_rank_lr", "--plan", *overrides, f"hydra.sweep.dir={tmp_path}")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "sweep lora_rank_lr: 20 trials, 0 finished, 20 to run, 1 at a time, on cpu" in out.stdout
    rows = [line.split() for line in out.stdout.splitlines() if line.startswith("  ") and line.split()[0].isdigit()]
    assert [int(row[0]) for row in rows] == [4, 8, 16, 32, 64]  # one row per rank, the planner's figures beside
    units = {"B": 1, "kB": 1e3, "MB": 1e6, "GB": 1e9}
    peaks = [float(row[2]) * units[row[3]] for row in rows]
    assert peaks == sorted(peaks) and peaks[0] < peaks[-1]  # memory grows with the rank
    assert "total: about" in out.stdout
    assert not (tmp_path / "optuna.db").exists() and not list(tmp_path.glob("0-*"))  # nothing ran
