"""Sweeps on a real single-node SLURM cluster started on localhost (tests/slurm_cluster.py):
each trial a SLURM job through hydra/launcher=slurm; a trial cancelled with scancel
ends as failed and the sweep ends instead of waiting for it. Every daemon is stopped
afterwards. Skipped where the SLURM daemons are not installed (.ci/run installs them)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import slurm_cluster
from conftest import read_metrics, tiny_overrides

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not slurm_cluster.available(), reason="SLURM (slurmctld, slurmd, munge) not installed as root"),
]

LAUNCHER = [
    "hydra/launcher=slurm",
    "hydra.launcher.partition=debug",
    "hydra.launcher.gpus_per_node=0",
    "hydra.launcher.cpus_per_task=1",
    "hydra.launcher.mem_gb=1",
    "hydra.launcher.timeout_min=20",
]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    running = slurm_cluster.Cluster(tmp_path_factory.mktemp("slurm")).start()
    yield running
    running.stop()
    assert all(proc.poll() is not None for proc in running.procs)


def sweep_command(model_dir: Path, data: dict, sweep_dir: Path, *params: str) -> list[str]:
    swept = ("paths.output_dir", *(p.split("=")[0] + "=" for p in params))
    overrides = [o for o in tiny_overrides(model_dir, data, sweep_dir) if not o.startswith(swept)]
    sweep = [*params, *overrides, *LAUNCHER, f"hydra.sweep.dir={sweep_dir}"]
    return [sys.executable, "-m", "ftx.cli", "train", "-m", *sweep]


def job_states(cluster, sweep_dir: Path, settle_s: float = 60) -> dict[str, str]:
    """SLURM's state of every job the sweep submitted (submitit's folders are named by job id).

    A job's result file is written before slurmd reports the job's end to slurmctld, so a
    job the sweep has already collected may still read RUNNING for a moment: poll until
    every job has left PENDING/RUNNING/COMPLETING, for at most `settle_s` seconds."""
    ids = [p.name for p in (sweep_dir / ".submitit").iterdir() if p.is_dir()]
    deadline = time.monotonic() + settle_s
    while True:
        out = cluster.run("sacct", "-o", "JobID,State,NodeList", "--parsable2", "-j", ",".join(ids)).stdout
        states = dict(line.split("|")[:2] for line in out.splitlines()[1:])
        if not set(states.values()) & {"PENDING", "RUNNING", "COMPLETING"} or time.monotonic() > deadline:
            return states
        time.sleep(1)


def test_a_sweep_runs_each_trial_as_a_slurm_job(cluster, tiny_model_dir, tiny_data, tmp_path):
    command = sweep_command(tiny_model_dir, tiny_data, tmp_path, "method=lora,full")
    done = subprocess.run(command, capture_output=True, text=True, env=cluster.env, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    records = [read_metrics(run.parent) for run in tmp_path.glob("*/metrics.json")]
    assert sorted(r["method"] for r in records) == ["full", "lora"]
    assert all(r["status"] == "completed" for r in records)
    states = job_states(cluster, tmp_path)
    assert len(states) == 2 and set(states.values()) == {"COMPLETED"}, states
    assert (tmp_path / "report.md").is_file()


def test_a_cancelled_trial_stops_and_the_sweep_does_not_hang(cluster, tiny_model_dir, tiny_data, tmp_path):
    command = sweep_command(tiny_model_dir, tiny_data, tmp_path, "trainer.max_steps=3,100000")
    sweep = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cluster.env)
    try:
        deadline = time.monotonic() + 600
        long_run = None
        while time.monotonic() < deadline and sweep.poll() is None:
            long_run = next(iter(tmp_path.glob("1-*/checkpoints/last.ckpt")), None)  # training, checkpointed
            if long_run:
                break
            time.sleep(1)
        if long_run is None:
            sweep.kill()
            pytest.fail(f"the long trial never started training:\n{sweep.communicate()[1][-3000:]}")
        job = next(p.name for p in (tmp_path / ".submitit").iterdir() if p.name.endswith("_1"))
        assert cluster.run("scancel", job).returncode == 0
        out, err = sweep.communicate(timeout=300)  # ends: it does not wait forever on the cancelled job
    finally:
        if sweep.poll() is None:
            sweep.kill()
    assert sweep.returncode != 0  # ftx train -m reports the failed trial
    short, cancelled = read_metrics(next(tmp_path.glob("0-*"))), read_metrics(long_run.parent.parent)
    assert short["status"] == "completed"
    # scancel sends SIGTERM first: the trial saved its checkpoint and says so
    assert cancelled["status"] == "stopped" and "SIGTERM" in cancelled["error"] and "saved" in cancelled["error"]
    assert job_states(cluster, tmp_path)[job] == "CANCELLED"


def test_trainer_slurm_requeues_on_its_signal_and_the_requeued_job_resumes(
    cluster, tiny_model_dir, tiny_data, tmp_path
):
    """sbatch --requeue running `srun ftx train trainer=slurm`: on USR1 Lightning saves a
    checkpoint and requeues the job; the requeued job (same SLURM_JOB_ID) finds its run
    directory and finishes from the checkpoint."""
    overrides = [o for o in tiny_overrides(tiny_model_dir, tiny_data, tmp_path) if not o.startswith("paths.")]
    overrides += ["trainer=slurm", "trainer.accelerator=cpu", "trainer.precision=32-true", "trainer.max_steps=300"]
    overrides += ["trainer.checkpoint_every=20", "trainer.val_check_interval=100", "trainer.batch_size=4"]
    script = tmp_path / "job.sh"
    script.write_text(
        "#!/bin/bash\n"
        f"#SBATCH --requeue\n#SBATCH --output={tmp_path}/job-%j.out\n"
        f"srun {sys.executable} -m ftx.cli train {' '.join(overrides)}\n"
    )
    submitted = cluster.run("sbatch", "--parsable", f"--chdir={tmp_path}", str(script))
    assert submitted.returncode == 0, submitted.stderr
    job = submitted.stdout.strip()
    deadline = time.monotonic() + 300
    while not list(tmp_path.glob(f"outputs/slurm-{job}-*/checkpoints/last.ckpt")):
        assert time.monotonic() < deadline, "the job never checkpointed"
        time.sleep(0.5)
    assert cluster.run("scancel", "--signal=USR1", job).returncode == 0

    (run,) = tmp_path.glob(f"outputs/slurm-{job}-*")
    while True:
        done = (run / "metrics.json").is_file() and read_metrics(run)["status"] == "completed"
        state = cluster.run("scontrol", "-o", "show", "job", job).stdout
        if "Reason=BeginTime" in state:  # SLURM holds a requeued job ~2 minutes: start it now
            cluster.run("scontrol", "update", f"JobId={job}", "StartTime=now")
        if done and "JobState=COMPLETED" in state:
            break
        assert time.monotonic() < deadline + 300, f"no completed resumed run; job: {state}"
        time.sleep(1)
    assert "Restarts=1" in state
    record = read_metrics(run)
    assert record["train"]["steps"] == 300 and record["train"]["resumed_from"] is not None
    assert list(run.glob("hpc_ckpt_*.ckpt")), "Lightning's requeue checkpoint"


def test_slurm_jobs_share_one_postgres_study(cluster, tiny_model_dir, tiny_data, tmp_path):
    """Two trials at a time as SLURM jobs, reporting to one study in PostgreSQL (what
    several nodes share); each trial in the database exactly once, its values those
    of its run's metrics.json, every job COMPLETED."""
    import optuna
    import postgres_server
    from optuna.trial import TrialState

    pytest.importorskip("psycopg2", reason="PostgreSQL storage needs psycopg2 (pip install psycopg2-binary)")
    if postgres_server.why_unavailable():
        pytest.skip(postgres_server.why_unavailable())
    lrs = (0.003, 0.002, 0.001)
    overrides = [o for o in tiny_overrides(tiny_model_dir, tiny_data, tmp_path) if not o.startswith("paths.")]
    with postgres_server.postgres() as url:
        command = [
            *(sys.executable, "-m", "ftx.cli", "sweep", "lora_rank_lr"),
            *overrides,
            *LAUNCHER,
            "hydra.launcher.array_parallelism=2",
            f"hydra.sweep.dir={tmp_path}",
            "hydra.sweeper.storage=${oc.env:FTX_SWEEP_STORAGE}",  # every job reads the URL from its environment
            "hydra.sweeper.study_name=slurm-pg",
            "hydra.sweeper.n_trials=3",
            f"optim.lr=choice({','.join(map(str, lrs))})",
            "hydra.sweeper.enqueue=[" + ",".join(f"{{optim.lr:{lr}}}" for lr in lrs) + "]",
            "hydra.sweeper.pruner=null",
            "hydra.sweeper.objectives=[quality.eval_loss]",
            "hydra.sweeper.directions=[minimize]",
            "data.eval_examples=2",
        ]
        env = cluster.env | {"FTX_SWEEP_STORAGE": url}
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)
        assert done.returncode == 0, done.stderr[-3000:]
        study = optuna.load_study(study_name="slurm-pg", storage=url)
        assert [t.number for t in study.trials] == [0, 1, 2]
        assert all(t.state == TrialState.COMPLETE for t in study.trials)
        assert sorted(t.params["optim.lr"] for t in study.trials) == sorted(lrs)
        for trial in study.trials:
            (run,) = tmp_path.glob(f"{trial.number}-*")
            assert trial.values == [pytest.approx(read_metrics(run)["quality"]["eval_loss"])]
    states = job_states(cluster, tmp_path)
    assert len(states) == 3 and set(states.values()) == {"COMPLETED"}, states
    assert postgres_server.PASSWORD not in done.stdout + done.stderr
    logs = [p for p in (tmp_path / ".submitit").rglob("*") if p.is_file() and p.suffix in (".out", ".err", ".sh")]
    assert logs and not any(postgres_server.PASSWORD.encode() in p.read_bytes() for p in logs)
