"""Sweeps on a real PostgreSQL server (tests/postgres_server.py): two joblib workers
share one study in it, each trial recorded exactly once; a re-run resumes the study
and one with another search space is refused naming what differs; an unreachable
database is named (password hidden) before anything runs. The URL comes from an
environment variable and its password is written nowhere."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import optuna
import postgres_server
import pytest
from conftest import ftx_main, read_metrics, tiny_overrides
from optuna.trial import TrialState

pytest.importorskip("psycopg2", reason="PostgreSQL storage needs psycopg2 (pip install psycopg2-binary)")
UNAVAILABLE = postgres_server.why_unavailable()
LRS = (0.003, 0.002, 0.001, 0.0005)


@pytest.fixture(scope="module")
def database():
    if UNAVAILABLE:
        pytest.skip(UNAVAILABLE)
    with postgres_server.postgres() as url:
        yield url


def sweep_args(tiny_model_dir, tiny_data, sweep_dir, *extra: str, n_trials=4, lrs=LRS, steps=2, pruner="null"):
    overrides = tiny_overrides(tiny_model_dir, tiny_data, sweep_dir, steps=steps)
    return [
        "lora_rank_lr",
        *(o for o in overrides if not o.startswith("paths.")),
        f"hydra.sweep.dir={sweep_dir}",
        "hydra.sweeper.storage=${oc.env:FTX_SWEEP_STORAGE}",  # the URL, password included, stays in the environment
        f"hydra.sweeper.study_name=pg-{sweep_dir.name}",
        f"hydra.sweeper.n_trials={n_trials}",
        f"optim.lr=choice({','.join(map(str, lrs))})",
        "hydra.sweeper.enqueue=[" + ",".join(f"{{optim.lr:{lr}}}" for lr in lrs) + "]",
        f"hydra.sweeper.pruner={pruner}",
        "hydra.sweeper.objectives=[quality.eval_loss]",
        "hydra.sweeper.directions=[minimize]",
        "data.eval_examples=2",
        "data.max_new_tokens=4",
        *extra,
    ]


def sweep(tiny_model_dir, tiny_data, sweep_dir, url: str, *extra: str, **settings):
    args = sweep_args(tiny_model_dir, tiny_data, sweep_dir, *extra, **settings)
    return ftx_main("sweep", *args, env=os.environ | {"FTX_SWEEP_STORAGE": url})


def start_sweep(tiny_model_dir, tiny_data, sweep_dir, url: str, *extra: str, **settings) -> subprocess.Popen:
    """``ftx sweep`` in a session of its own (its workers too), for a test to kill or
    to pull the database from under it."""
    args = sweep_args(tiny_model_dir, tiny_data, sweep_dir, *extra, **settings)
    return subprocess.Popen(
        [sys.executable, "-m", "ftx.cli", "sweep", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=os.environ | {"FTX_SWEEP_STORAGE": url},
        start_new_session=True,
    )


def wait_for(path_glob: str, root, process: subprocess.Popen, seconds: float = 300) -> None:
    deadline = time.monotonic() + seconds
    while not list(root.glob(path_glob)):
        if process.poll() is not None or time.monotonic() > deadline:
            out, err = process.communicate()
            pytest.fail(f"the sweep ended (or hung) before {path_glob} appeared:\n{err[-3000:]}")
        time.sleep(0.05)


def files_holding(root, text: str) -> list[str]:
    return [str(p) for p in root.rglob("*") if p.is_file() and text.encode() in p.read_bytes()]


def test_two_joblib_workers_share_one_postgres_study(database, tiny_model_dir, tiny_data, tmp_path):
    out = sweep(tiny_model_dir, tiny_data, tmp_path, database, "hydra/launcher=joblib", "hydra.launcher.n_jobs=2")
    assert out.returncode == 0, out.stderr[-3000:]
    study = optuna.load_study(study_name=f"pg-{tmp_path.name}", storage=database)
    assert [t.number for t in study.trials] == [0, 1, 2, 3]  # each trial exactly once
    assert all(t.state == TrialState.COMPLETE for t in study.trials)
    assert sorted(t.params["optim.lr"] for t in study.trials) == sorted(LRS)
    for trial in study.trials:
        (run,) = tmp_path.glob(f"{trial.number}-*")
        assert trial.values == [pytest.approx(read_metrics(run)["quality"]["eval_loss"])]
    assert postgres_server.PASSWORD not in out.stdout + out.stderr  # the log shows the URL with *** for it
    assert "ftx:***@127.0.0.1" in out.stdout + out.stderr
    assert files_holding(tmp_path, postgres_server.PASSWORD) == []  # no config, metrics.json or log holds it


def test_a_rerun_resumes_the_study_and_other_settings_are_refused(database, tiny_model_dir, tiny_data, tmp_path):
    first = sweep(tiny_model_dir, tiny_data, tmp_path, database, n_trials=2)
    assert first.returncode == 0, first.stderr[-3000:]
    again = sweep(tiny_model_dir, tiny_data, tmp_path, database, n_trials=3)  # one more trial
    assert again.returncode == 0, again.stderr[-3000:]
    study = optuna.load_study(study_name=f"pg-{tmp_path.name}", storage=database)
    done = [t.number for t in study.trials if t.state == TrialState.COMPLETE]
    assert done == [0, 1, 2] and "2 of 3 trials done; 1 to run" in again.stdout + again.stderr
    assert [t.state for t in study.trials[3:]] == [TrialState.WAITING]  # the last enqueued lr, not run yet
    other = sweep(tiny_model_dir, tiny_data, tmp_path, database, n_trials=4, lrs=(0.01, 0.02))
    assert other.returncode != 0
    assert "was created with other settings: optim.lr: was CategoricalDistribution" in other.stderr
    after = optuna.load_study(study_name=f"pg-{tmp_path.name}", storage=database)
    assert [(t.number, t.state) for t in after.trials] == [(t.number, t.state) for t in study.trials]  # nothing ran


def test_an_unreachable_database_is_named_with_its_password_hidden(tiny_model_dir, tiny_data, tmp_path):
    port = postgres_server.free_port()  # nothing listens there
    url = f"postgresql+psycopg2://ftx:{postgres_server.PASSWORD}@127.0.0.1:{port}/ftx"
    out = sweep(tiny_model_dir, tiny_data, tmp_path, url)
    assert out.returncode == 2, out.stderr[-3000:]
    assert f"hydra.sweeper.storage=postgresql+psycopg2://ftx:***@127.0.0.1:{port}/ftx: cannot open" in out.stderr
    assert "Start the database, or fix the URL" in out.stderr
    assert postgres_server.PASSWORD not in out.stdout + out.stderr
    assert not list(tmp_path.rglob("metrics.json"))  # no trial ran


MEDIAN = "{_target_:optuna.pruners.MedianPruner,n_startup_trials:1,n_warmup_steps:0}"


def test_a_trial_is_pruned_on_the_reports_of_another_process(database, tiny_model_dir, tiny_data, tmp_path):
    """Pruning goes through the database: the second command's trial is judged against
    the intermediate values the first command's trial (another process) stored."""
    lrs = (0.003, 1e-7)
    settings = {"lrs": lrs, "steps": 6, "pruner": MEDIAN}
    extra = ("trainer.val_check_interval=2",)
    first = sweep(tiny_model_dir, tiny_data, tmp_path, database, *extra, n_trials=1, **settings)
    assert first.returncode == 0, first.stderr[-3000:]
    second = sweep(tiny_model_dir, tiny_data, tmp_path, database, *extra, n_trials=2, **settings)
    assert second.returncode == 0, second.stderr[-3000:]
    study = optuna.load_study(study_name=f"pg-{tmp_path.name}", storage=database)
    good, bad = study.trials
    assert (good.state, good.params["optim.lr"]) == (TrialState.COMPLETE, lrs[0])
    assert sorted(good.intermediate_values) == [2, 4, 6]  # reported by the first command's trial
    assert (bad.state, bad.params["optim.lr"]) == (TrialState.PRUNED, lrs[1])
    assert list(bad.intermediate_values) == [2] and bad.intermediate_values[2] > good.intermediate_values[2]
    (run,) = tmp_path.glob("1-*")
    record = read_metrics(run)
    assert record["status"] == "pruned" and record["train"]["steps"] == 2


def test_a_killed_sweep_fails_its_trial_by_heartbeat_and_reruns_its_parameters(
    database, tiny_model_dir, tiny_data, tmp_path
):
    """SIGKILL to the driver and its workers in the middle of a trial: nothing records
    the trial, so it stays RUNNING until its heartbeat is stale; the same command then
    fails it, runs its parameters again, and the report lists both."""
    settings = {"lrs": (0.003, 0.002), "steps": 120}
    extra = ("hydra.sweeper.heartbeat_interval=1", "hydra.sweeper.grace_period=3", "trainer.checkpoint_every=5")
    process = start_sweep(tiny_model_dir, tiny_data, tmp_path, database, *extra, n_trials=2, **settings)
    try:
        wait_for("0-*/checkpoints/last.ckpt", tmp_path, process)
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    study = optuna.load_study(study_name=f"pg-{tmp_path.name}", storage=database)
    assert [t.state for t in study.trials] == [TrialState.RUNNING, TrialState.WAITING]
    time.sleep(4)  # past the grace period

    again = sweep(tiny_model_dir, tiny_data, tmp_path, database, *extra, n_trials=2, **settings)
    assert again.returncode == 0, again.stderr[-3000:]
    study = optuna.load_study(study_name=f"pg-{tmp_path.name}", storage=database)
    states = [t.state for t in study.trials]
    assert states == [TrialState.FAIL, TrialState.COMPLETE, TrialState.COMPLETE], states
    killed, retry = study.trials[0], study.trials[2]
    assert _retried(retry) == 0
    assert retry.params == killed.params and study.trials[1].params["optim.lr"] == 0.002
    (killed_run,) = tmp_path.glob("0-*")
    assert read_metrics(killed_run)["status"] == "failed"
    assert "heartbeat stopped" in read_metrics(killed_run)["error"]
    report = (tmp_path / "report.md").read_text()
    assert killed_run.name in report and "failed" in report and next(tmp_path.glob("2-*")).name in report


def test_a_database_lost_mid_sweep_ends_it_cleanly_and_the_same_command_resumes(tiny_model_dir, tiny_data, tmp_path):
    """The server stops while a trial trains: the trial ends (it cannot report to the
    pruner: failed, with its record), the sweep stops at once saying what it recorded
    and how to go on, no new trial starts; with the server back, the same command
    completes the study."""
    if UNAVAILABLE:
        pytest.skip(UNAVAILABLE)
    settings = {"lrs": (0.003, 0.002), "steps": 120, "pruner": MEDIAN}
    extra = ("trainer.val_check_interval=5", "hydra.sweeper.heartbeat_interval=1", "hydra.sweeper.grace_period=3")
    with postgres_server.server() as (url, pg_ctl):
        process = start_sweep(tiny_model_dir, tiny_data, tmp_path, url, *extra, n_trials=2, **settings)
        try:
            wait_for("0-*/checkpoints/last.ckpt", tmp_path, process)
            pg_ctl("stop")
            out, err = process.communicate(timeout=180)
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
        assert process.returncode == 2, err[-3000:]
        assert "the study's database stopped answering" in err and "Traceback" not in err
        assert "ftx:***@127.0.0.1" in err and postgres_server.PASSWORD not in out + err
        assert "run the same command: it resumes the study" in err
        (run,) = tmp_path.glob("0-*")  # the running trial ended with its record; no other started
        assert read_metrics(run)["status"] == "failed"
        assert not list(tmp_path.glob("1-*"))

        pg_ctl("start")
        time.sleep(4)  # the trial the sweep could not record: RUNNING, its heartbeat now stale
        again = sweep(tiny_model_dir, tiny_data, tmp_path, url, *extra, n_trials=2, **settings)
        assert again.returncode == 0, again.stderr[-3000:]
        study = optuna.load_study(study_name=f"pg-{tmp_path.name}", storage=url)
        assert study.trials[0].state == TrialState.FAIL  # then re-run with its parameters
        retry = next(t for t in study.trials if _retried(t) == 0)
        assert retry.params == study.trials[0].params and retry.state.is_finished()
        assert sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in study.trials) == 2


def _retried(trial) -> int | None:
    return optuna.storages.RetryHeartbeatStaleTrialCallback.retried_trial_number(trial)
