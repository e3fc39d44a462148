"""Sweeps on a real PostgreSQL server (tests/postgres_server.py): two joblib workers
share one study in it, each trial recorded exactly once; a re-run resumes the study
and one with another search space is refused naming what differs; an unreachable
database is named (password hidden) before anything runs. The URL comes from an
environment variable and its password is written nowhere."""

from __future__ import annotations

import os

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


def sweep(tiny_model_dir, tiny_data, sweep_dir, url: str, *extra: str, n_trials: int = 4, lrs=LRS):
    overrides = [o for o in tiny_overrides(tiny_model_dir, tiny_data, sweep_dir, steps=2) if not o.startswith("paths.")]
    return ftx_main(
        "sweep",
        "lora_rank_lr",
        *overrides,
        f"hydra.sweep.dir={sweep_dir}",
        "hydra.sweeper.storage=${oc.env:FTX_SWEEP_STORAGE}",  # the URL, password included, stays in the environment
        f"hydra.sweeper.study_name=pg-{sweep_dir.name}",
        f"hydra.sweeper.n_trials={n_trials}",
        f"optim.lr=choice({','.join(map(str, lrs))})",
        "hydra.sweeper.enqueue=[" + ",".join(f"{{optim.lr:{lr}}}" for lr in lrs) + "]",
        "hydra.sweeper.pruner=null",
        "hydra.sweeper.objectives=[quality.eval_loss]",
        "hydra.sweeper.directions=[minimize]",
        "data.eval_examples=2",
        "data.max_new_tokens=4",
        *extra,
        env=os.environ | {"FTX_SWEEP_STORAGE": url},
    )


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
