"""Optuna sweeps as Hydra multiruns: the shipped sweep specs compose, the override
grammar maps to Optuna distributions, and tiny sweeps (a few steps per trial) prune,
resume, run two workers on one storage, record failures, retry killed trials and
give a Pareto front."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import optuna
import pytest
from conftest import ftx_main, tiny_overrides
from hydra.core.utils import JobStatus
from omegaconf import OmegaConf, open_dict
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

from ftx.config import ConfigError, SweeperConfig, compose_config, project_root, sweep_files, validate
from ftx.sweep import check_settings, open_study, run_sweep, search_space

SWEEPS = [path.stem for path in sweep_files()]
# Validation at every step, so a pruner has something to judge from step 1.
FAST = ["trainer.val_check_interval=1", "data.eval_examples=2", "data.max_new_tokens=4"]


def sweep_overrides(tiny_model_dir, tiny_data, sweep_dir: Path, steps: int = 3) -> list[str]:
    overrides = tiny_overrides(tiny_model_dir, tiny_data, sweep_dir, steps=steps)
    return [*(o for o in overrides if not o.startswith("paths.")), *FAST, f"hydra.sweep.dir={sweep_dir}"]


def load(sweep_dir: Path, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{sweep_dir / 'optuna.db'}")


def run_dirs(sweep_dir: Path) -> list[Path]:
    runs = [p for p in sweep_dir.iterdir() if (p / "metrics.json").is_file()]
    return sorted(runs, key=lambda p: int(p.name.split("-")[0]))


def record(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


# ------------------------------------------------------------------ specs, no training


@pytest.mark.parametrize("name", SWEEPS)
def test_shipped_sweep_composes_and_validates(name, tiny_model_dir, tiny_data, tmp_path):
    cfg = compose_config([f"sweep={name}", *tiny_overrides(tiny_model_dir, tiny_data, tmp_path)], with_hydra=True)
    assert cfg.hydra.sweeper._target_.endswith("FtxOptunaSweeper")
    assert cfg.hydra.sweeper.study_name == name
    space = check_settings(cfg.hydra.sweeper)  # distributions, sampler and pruner instantiate
    assert space.distributions
    validate(cfg)
    assert (project_root() / "sweeps" / f"{name}.yaml").read_text().startswith("# @package _global_\n# ftx sweep")


def test_slurm_launcher_preset_composes():
    cfg = compose_config(["hydra/launcher=slurm"], with_hydra=True)
    assert cfg.hydra.launcher._target_.endswith("SlurmLauncher")
    assert (cfg.hydra.launcher.gpus_per_node, cfg.hydra.launcher.signal_delay_s) == (1, 120)


def test_override_grammar_maps_to_optuna_distributions():
    params = OmegaConf.create(
        {
            "method.r": "choice(4, 8, 16)",
            "optim.lr": "tag(log, interval(1e-4, 1e-2))",
            "optim": {"warmup_ratio": "interval(0, 0.2)"},  # as hydra.sweeper.params.optim.warmup_ratio=... nests
            "trainer.batch_size": "range(4, 17, 4)",
            "method.dropout": "range(0.0, 0.2, 0.05)",
            "trainer.max_steps": "tag(log, int(interval(10, 1000)))",
            "seed": "7",
        }
    )
    space = search_space(params, ["method=lora,qlora", "method.r=32", "optim.name=adamw"])
    d = space.distributions
    assert d["method"] == CategoricalDistribution(["lora", "qlora"])
    assert "method.r" not in d  # a plain value on the command line fixes a key of the spec
    assert d["optim.lr"] == FloatDistribution(1e-4, 1e-2, log=True)
    assert d["optim.warmup_ratio"] == FloatDistribution(0.0, 0.2)
    assert d["trainer.batch_size"] == IntDistribution(4, 16, step=4)  # Hydra's range excludes its end
    assert d["method.dropout"] == FloatDistribution(0.0, 0.15, step=0.05)
    assert d["trainer.max_steps"] == IntDistribution(10, 1000, log=True)
    assert space.fixed == ["seed=7", "method.r=32", "optim.name=adamw"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"pruner": {"_target_": "optuna.pruners.MedianPruner"}}, "does not prune multi-objective"),
        ({"directions": ["maximize"]}, "one direction"),
        ({"params": {}}, "Nothing to search"),
        ({"sampler": {"_target_": "optuna.samplers.GridSampler"}, "params": {"lr": "interval(0.1, 1)"}}, "GridSampler"),
    ],
)
def test_bad_sweep_specs_are_refused(change, message):
    spec = {
        "objectives": ["quality.task_score", "memory.peak_bytes"],
        "directions": ["maximize", "minimize"],
        "params": {"method.r": "choice(4, 8)"},
    }
    settings = OmegaConf.merge(OmegaConf.structured(SweeperConfig), spec | change)
    with pytest.raises(ConfigError, match=message):
        check_settings(settings)


def test_several_devices_in_a_multirun_need_a_spawning_strategy(monkeypatch):
    monkeypatch.setattr("ftx.config.checks._in_multirun", lambda cfg: True)
    with pytest.raises(ConfigError, match="ddp_spawn"):
        validate(compose_config(["trainer.devices=2"]))
    with pytest.raises(ConfigError, match="ddp_spawn"):
        validate(compose_config(["trainer.strategy=ddp", "trainer.devices=2"]))
    validate(compose_config(["trainer.devices=2", "trainer.strategy=ddp_spawn"]))
    validate(compose_config(["trainer.devices=1"]))


def test_a_sweep_with_ddp_is_refused_before_any_trial(tmp_path):
    out = ftx_main("sweep", "lora_rank_lr", "trainer.strategy=ddp", "trainer.devices=2", f"hydra.sweep.dir={tmp_path}")
    assert out.returncode != 0 and "ddp_spawn" in out.stderr
    assert not list(tmp_path.glob("*/metrics.json")) and not (tmp_path / "optuna.db").exists()


def test_sweep_list_and_unknown_name():
    out = ftx_main("sweep", "--list")
    assert out.returncode == 0
    assert all(name in out.stdout for name in ("lora_rank_lr", "quality_vs_vram", "methods_grid"))
    out = ftx_main("sweep", "no_such_sweep")
    assert out.returncode == 2 and "lora_rank_lr" in out.stderr


# -------------------------------------------------- the sweep loop, with a fake launcher


def fake_settings(tmp_path: Path, **change) -> tuple:
    settings = OmegaConf.merge(
        OmegaConf.structured(SweeperConfig),
        {
            "study_name": "fake",
            "n_trials": 3,
            "objectives": ["quality.eval_loss"],
            "directions": ["minimize"],
            "params": {"method.r": "choice(4, 8, 16)"},
            "sampler": {"_target_": "optuna.samplers.RandomSampler", "seed": 0},
            "heartbeat_interval": 1,
            "grace_period": 2,
        },
        change,
    )
    config = compose_config([])  # the default experiment, which the sweeper validates
    with open_dict(config):
        config.hydra = {"sweep": {"dir": str(tmp_path)}, "launcher": {}, "sweeper": settings}
    return settings, config


class FakeLauncher:
    """Returns a JobReturn-like result per job without training: eval loss = 1 / r."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path, self.launched = tmp_path, []

    def __call__(self, jobs: list[list[str]], first: int) -> list:
        self.launched += jobs
        results = []
        for job in jobs:
            r = int(next(o for o in job if o.startswith("method.r=")).split("=")[1])
            hydra_cfg = OmegaConf.create({"hydra": {"runtime": {"output_dir": str(self.tmp_path / str(first))}}})
            value = {"status": "completed", "quality": {"eval_loss": 1 / r}, "memory": {"peak_bytes": r * 2**20}}
            results.append(SimpleNamespace(status=JobStatus.COMPLETED, return_value=value, hydra_cfg=hydra_cfg))
        return results


def test_resume_adds_only_missing_trials(tmp_path):
    launcher = FakeLauncher(tmp_path)
    settings, config = fake_settings(tmp_path)
    study = run_sweep(settings, config, [], launcher)
    assert len(launcher.launched) == 3 and len(study.trials) == 3
    run_sweep(settings, config, [], launcher)  # done already: nothing runs
    assert len(launcher.launched) == 3
    settings.n_trials = 5
    study = run_sweep(settings, config, [], launcher)
    assert len(launcher.launched) == 5 and [t.number for t in study.trials] == [0, 1, 2, 3, 4]
    best = (tmp_path / "best.txt").read_text()
    assert f"ftx train method.r={study.best_trial.params['method.r']}" in best


def test_a_journal_file_is_a_storage_too(tmp_path):
    launcher = FakeLauncher(tmp_path)
    settings, config = fake_settings(tmp_path, storage=f"journal:{tmp_path / 'journal.log'}", n_trials=2)
    run_sweep(settings, config, [], launcher)
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(tmp_path / "journal.log")))
    assert len(optuna.load_study(study_name="fake", storage=storage).trials) == 2


def test_killed_workers_trial_is_failed_and_retried_with_its_parameters(tmp_path):
    settings, config = fake_settings(tmp_path, n_trials=1)
    study = open_study(settings, tmp_path, check_settings(settings))
    orphan = study.ask({"method.r": CategoricalDistribution([4, 8, 16])})
    study._storage.record_heartbeat(orphan._trial_id)  # its worker beat once, then was killed
    time.sleep(3)  # > grace_period
    launcher = FakeLauncher(tmp_path)
    study = run_sweep(settings, config, [], launcher)
    states = [t.state for t in study.trials]
    assert states == [TrialState.FAIL, TrialState.COMPLETE]
    retry = study.trials[1]
    assert optuna.storages.RetryHeartbeatStaleTrialCallback.retried_trial_number(retry) == 0
    assert retry.params == orphan.params and len(launcher.launched) == 1


def test_a_lost_job_is_failed_and_its_parameters_run_again(tmp_path):
    class KilledOnce(FakeLauncher):
        def __call__(self, jobs, first):
            if not self.launched:
                self.launched.append("killed")
                raise RuntimeError("A worker process managed by the executor was unexpectedly terminated.")
            return super().__call__(jobs, first)

    settings, config = fake_settings(tmp_path, n_trials=2)
    study = run_sweep(settings, config, [], KilledOnce(tmp_path))
    assert [t.state for t in study.trials] == [TrialState.FAIL, TrialState.COMPLETE, TrialState.COMPLETE]
    assert "unexpectedly terminated" in study.trials[0].user_attrs["error"]
    assert study.trials[1].user_attrs["retry_of"] == 0 and study.trials[1].params == study.trials[0].params


def test_a_trial_stopped_by_a_signal_waits_and_runs_again_under_its_number(tmp_path):
    """Preempted (its own SIGTERM, a SLURM preemption): not a failure. The trial goes
    back to WAITING with its parameters, and the next ask runs it again under the
    same number, so its run resumes from the checkpoint in the same directory."""
    from ftx.faults import Preempted

    class PreemptsOnce(FakeLauncher):
        def __call__(self, jobs, first):
            if not self.launched:
                self.launched += jobs
                error = Preempted("SIGTERM at step 7: saved x/checkpoints/last.ckpt", "SIGTERM", "x")
                return [SimpleNamespace(status=JobStatus.FAILED, _return_value=error, hydra_cfg=None)]
            return super().__call__(jobs, first)

    settings, config = fake_settings(tmp_path, n_trials=2)
    launcher = PreemptsOnce(tmp_path)
    study = run_sweep(settings, config, [], launcher)
    assert [t.number for t in study.trials] == [0, 1]
    assert all(t.state == TrialState.COMPLETE for t in study.trials)
    assert launcher.launched[0] == launcher.launched[1]  # the same parameters and trial number again
    assert "sweep_trial.number=0" in launcher.launched[1]
    assert study.trials[0].user_attrs["stopped"].startswith("SIGTERM at step 7")


def test_an_orphan_whose_run_stopped_is_resumed_not_failed(tmp_path):
    """A driver killed before recording its stopped trial (scancel past KillWait): the
    next sweep finds the trial RUNNING with a stale heartbeat, but its run directory
    says it stopped with a checkpoint, so it is paused and resumed, not failed."""
    settings, config = fake_settings(tmp_path, n_trials=1)
    study = open_study(settings, tmp_path, check_settings(settings))
    orphan = study.ask({"method.r": CategoricalDistribution([4, 8, 16])})
    study._storage.record_heartbeat(orphan._trial_id)
    run_dir = tmp_path / "0-tiny-lora-none"
    run_dir.mkdir()
    (run_dir / "metrics.json").write_text(json.dumps({"status": "stopped", "error": "Preempted: SIGTERM at step 3"}))
    time.sleep(3)  # > grace_period: the heartbeat is stale
    launcher = FakeLauncher(tmp_path)
    study = run_sweep(settings, config, [], launcher)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE]  # the same trial, resumed: nothing failed
    assert study.trials[0].params == orphan.params and "sweep_trial.number=0" in launcher.launched[0]


def test_memory_budget_makes_big_trials_infeasible(tmp_path):
    # eval loss 1/r favours the largest rank; the budget (10 MiB, peak = r MiB) forbids r=16
    launcher = FakeLauncher(tmp_path)
    settings, config = fake_settings(
        tmp_path,
        n_trials=6,
        memory_budget_mib=10,
        sampler={"_target_": "optuna.samplers.TPESampler", "seed": 0, "n_startup_trials": 3},
    )
    study = run_sweep(settings, config, [], launcher)
    assert {t.params["method.r"] for t in study.trials} >= {16}
    assert study.best_trial.params["method.r"] == 8


# ---------------------------------------------------------------- real tiny sweeps


def optuna_multirun(study: str, n_trials: int, *overrides: str) -> subprocess.CompletedProcess:
    """`ftx train -m` with ftx's sweeper, the space given on the command line."""
    sweeper = ["hydra/sweeper=ftx_optuna", f"hydra.sweeper.study_name={study}", f"hydra.sweeper.n_trials={n_trials}"]
    return ftx_main("train", "-m", *sweeper, *overrides)


def test_single_objective_sweep_prunes_a_lagging_trial_and_resumes(tiny_model_dir, tiny_data, tmp_path):
    args = [
        "lora_rank_lr",
        *sweep_overrides(tiny_model_dir, tiny_data, tmp_path, steps=4),
        "optim.lr=choice(0.02,1e-9)",
        "hydra.sweeper.n_trials=2",
        "hydra.sweeper.enqueue=[{optim.lr:0.02},{optim.lr:1e-9}]",  # a learner first, then one that cannot learn
        "hydra.sweeper.objectives=[quality.eval_loss]",
        "hydra.sweeper.directions=[minimize]",
        "hydra.sweeper.pruner.n_startup_trials=1",
        "hydra.sweeper.pruner.n_warmup_steps=0",
    ]
    out = ftx_main("sweep", *args)
    assert out.returncode == 0, out.stderr[-3000:]
    study = load(tmp_path, "lora_rank_lr")
    assert [t.state for t in study.trials] == [TrialState.COMPLETE, TrialState.PRUNED]
    runs = run_dirs(tmp_path)
    assert [r.name.split("-")[0] for r in runs] == ["0", "1"]  # run directory = trial number
    first, pruned = record(runs[0]), record(runs[1])
    assert first["status"] == "completed" and first["train"]["steps"] == 4
    assert pruned["status"] == "pruned" and pruned["train"]["steps"] < 4  # it really stopped early
    assert not (runs[1] / "adapter").exists()
    assert len(study.trials[0].intermediate_values) == 4  # one value per validation, through the storage
    with sqlite3.connect(tmp_path / "optuna.db") as db:  # each trial's job beat its heartbeat
        assert db.execute("select count(distinct trial_id) from trial_heartbeats").fetchone() == (2,)
    assert "trial 2/2 done (#1, pruned)" in out.stdout + out.stderr
    best = (tmp_path / "best.txt").read_text()
    assert "ftx train sweep=lora_rank_lr" in best and "optim.lr=0.02" in best
    csv = (tmp_path / "trials.csv").read_text()
    assert "pruned" in csv and "sweep_trial.number" in csv.splitlines()[0]

    again = ftx_main("sweep", *args, "hydra.sweeper.n_trials=3")  # resume: one more trial, none repeated
    assert again.returncode == 0, again.stderr[-3000:]
    study = load(tmp_path, "lora_rank_lr")
    assert [t.number for t in study.trials] == [0, 1, 2] and study.trials[2].state != TrialState.FAIL
    assert len(run_dirs(tmp_path)) == 3


def test_multi_objective_sweep_writes_a_pareto_front(tiny_model_dir, tiny_data, tmp_path):
    grid = ["optim.lr=choice(0.003)", "hydra.sweeper.n_trials=3"]  # methods only: 3 trials
    out = ftx_main("sweep", "methods_grid", *sweep_overrides(tiny_model_dir, tiny_data, tmp_path, steps=2), *grid)
    assert out.returncode == 0, out.stderr[-3000:]
    study = load(tmp_path, "methods_grid")
    assert len(study.trials) == 3 and all(t.state == TrialState.COMPLETE for t in study.trials)
    assert {t.params["method"] for t in study.trials} == {"full", "lora", "qlora"}
    best = OmegaConf.load(tmp_path / "best.yaml")
    assert {b.number for b in best.best} == {t.number for t in study.best_trials}
    assert all(set(b["values"]) == {"quality.task_score", "memory.peak_bytes"} for b in best.best)
    assert (tmp_path / "pareto.png").is_file() and "★" in (tmp_path / "report.md").read_text()


def test_two_joblib_workers_on_one_storage_lose_no_trial(tiny_model_dir, tiny_data, tmp_path):
    out = optuna_multirun(
        "parallel",
        4,
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=2",
        "method.r=choice(2,4,8)",
        "optim.lr=tag(log,interval(1e-3,3e-2))",
        *sweep_overrides(tiny_model_dir, tiny_data, tmp_path, steps=2),
    )
    assert out.returncode == 0, out.stderr[-3000:]
    study = load(tmp_path, "parallel")
    assert [t.number for t in study.trials] == [0, 1, 2, 3]
    assert all(t.state == TrialState.COMPLETE for t in study.trials)
    runs = run_dirs(tmp_path)
    assert len(runs) == 4 and len({record(r)["quality"]["eval_loss"] for r in runs}) == 4
    assert {Path(t.user_attrs["run_dir"]) for t in study.trials} == set(runs)


def test_a_raising_trial_is_recorded_and_the_sweep_goes_on(tiny_model_dir, tiny_data, tmp_path):
    out = optuna_multirun(
        "faults",
        2,
        "hydra.sweeper.enqueue=[{optim.lr:1e30},{optim.lr:0.003}]",  # the first diverges: non-finite loss
        "optim.lr=choice(1e30,0.003)",
        "trainer.gradient_clip_val=0",
        *sweep_overrides(tiny_model_dir, tiny_data, tmp_path, steps=3),
    )
    assert out.returncode == 0, out.stderr[-3000:]
    study = load(tmp_path, "faults")
    assert [t.state for t in study.trials] == [TrialState.FAIL, TrialState.COMPLETE]
    assert "non-finite" in study.trials[0].user_attrs["error"]
    failed = record(run_dirs(tmp_path)[0])
    assert failed["status"] == "failed" and "FloatingPointError" in failed["error"]


@pytest.mark.slow
def test_pruning_benchmark_runs_and_prints_its_table(tiny_model_dir, tiny_data, tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            str(project_root() / "scripts" / "bench_pruning.py"),
            "--quick",
            "--out",
            str(tmp_path),
            "--",
            *(o for o in tiny_overrides(tiny_model_dir, tiny_data, tmp_path) if not o.startswith("paths.")),
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "| pruner | trials | pruned | training steps | best quality.eval_loss |" in out.stdout
    assert "| median |" in out.stdout and "| none |" in out.stdout
