"""Tracking: offline W&B runs hold the logged metrics, multirun jobs are separate
W&B runs, and the local report is exact."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
from conftest import ftx_main, read_metrics, tiny_overrides

from ftx import tracking
from ftx.config import compose_config
from ftx.tracking import flatten, wandb_mode
from ftx.tracking.loggers import LOGGERS
from ftx.tracking.report import write_report
from ftx.train import train


def wandb_summary(run_dir: Path) -> dict:
    """Read an offline run back with wandb's own reader of the .wandb log."""
    (log,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    out = subprocess.run(
        [str(Path(sys.executable).parent / "wandb"), "leet", "inspect", str(log), "--summary", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


@pytest.fixture
def no_wandb_credentials(monkeypatch, tmp_path):
    for var in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))


def test_wandb_is_offline_without_credentials(no_wandb_credentials, monkeypatch, tmp_path):
    assert wandb_mode("auto") == "offline"
    (tmp_path / "netrc").write_text("machine api.wandb.ai login user password KEY\n")
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    assert wandb_mode("auto") == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert wandb_mode("auto") == "disabled"
    assert wandb_mode("offline") == "offline"


def test_offline_wandb_run_holds_the_run_record(no_wandb_credentials, tiny_model_dir, tiny_data, tmp_path):
    overrides = [o for o in tiny_overrides(tiny_model_dir, tiny_data, tmp_path) if not o.startswith("logger")]
    cfg = compose_config([*overrides, "logger=wandb", "logger.project=ftx-test", "logger.log_artifact=true"])
    train(cfg)
    metrics = read_metrics(tmp_path)
    run = wandb_summary(tmp_path)
    assert run["state"] == "finished" and run["project"] == "ftx-test"
    assert run["summary"]["quality.eval_loss"] == pytest.approx(metrics["quality"]["eval_loss"])
    assert run["summary"]["memory.peak_bytes"] == metrics["memory"]["peak_bytes"]
    assert run["summary"]["params.trainable"] == metrics["params"]["trainable"]
    assert "train.loss" in run["summary"]
    assert run["config"]["method"]["name"] == "lora"  # the composed config


def test_multirun_jobs_are_separate_wandb_runs_with_a_report(no_wandb_credentials, tiny_model_dir, tiny_data, tmp_path):
    overrides = [
        o for o in tiny_overrides(tiny_model_dir, tiny_data, tmp_path) if not o.startswith(("paths.", "logger"))
    ]
    out = ftx_main("train", "-m", "method=full,lora", "logger=wandb", f"hydra.sweep.dir={tmp_path}", *overrides)
    assert out.returncode == 0, out.stderr[-3000:]
    runs = sorted(p for p in tmp_path.iterdir() if p.is_dir() and (p / "metrics.json").is_file())
    assert len(runs) == 2
    summaries = [wandb_summary(run) for run in runs]
    assert summaries[0]["run_id"] != summaries[1]["run_id"]
    assert [s["summary"]["quality.eval_loss"] for s in summaries] == pytest.approx(
        [read_metrics(run)["quality"]["eval_loss"] for run in runs]
    )
    for name in ("report.md", "trials.csv", "pareto.png"):
        assert (tmp_path / name).is_file()
    (report_log,) = tmp_path.glob("wandb/offline-run-*/run-*.wandb")  # the trials table run
    assert report_log.stat().st_size > 0


def write_run(
    root: Path, name: str, method: str, r: int | None, score: float | None, peak: int, status: str = "completed"
):
    run = root / name
    (run / ".hydra").mkdir(parents=True)
    adapter = "null" if method == "full" else "lora"
    (run / ".hydra" / "config.yaml").write_text(f"method:\n  adapter: {adapter}\n  r: {r or 8}\noptim:\n  lr: 0.001\n")
    record = {
        "method": method,
        "quant": "nf4" if method == "qlora" else "none",
        "precision": "32-true",
        "status": status,
        "quality": {"task_score": score, "eval_loss": 1.0 - (score or 0)},
        "memory": {"peak_bytes": peak, "predicted_bytes": None, "device": "cpu"},
        "params": {"trainable": 1000 if method != "full" else 50000},
        "throughput": {"tokens_per_s": 1234.5},
    }
    (run / "metrics.json").write_text(json.dumps(record))


def test_report_table_is_exact(tmp_path):
    mib = 2**20
    write_run(tmp_path, "a-full", "full", None, 0.9, 400 * mib)
    write_run(tmp_path, "b-lora", "lora", 16, 0.8, 200 * mib)
    write_run(tmp_path, "c-lora", "lora", 64, 0.7, 250 * mib)  # dominated by b-lora
    write_run(tmp_path, "d-qlora", "qlora", 16, 0.5, 100 * mib)
    write_run(tmp_path, "e-dora", "dora", 16, None, 300 * mib, status="failed")
    out, table = write_report([tmp_path], tmp_path / "report")
    expected = """\
|  | run | method | quant | precision | r | lr | task score | eval loss | peak MiB | predicted MiB | trainable | tokens/s | status |
|---|---|---|---|---|---|---|---|---|---|---|---|---|---|
| ★ | a-full | full | none | 32-true | – | 0.001 | 0.900 | 0.1000 | 400.0 | – | 50,000 | 1,234 | completed |
| ★ | b-lora | lora | none | 32-true | 16 | 0.001 | 0.800 | 0.2000 | 200.0 | – | 1,000 | 1,234 | completed |
|  | c-lora | lora | none | 32-true | 64 | 0.001 | 0.700 | 0.3000 | 250.0 | – | 1,000 | 1,234 | completed |
| ★ | d-qlora | qlora | nf4 | 32-true | 16 | 0.001 | 0.500 | 0.5000 | 100.0 | – | 1,000 | 1,234 | completed |
|  | e-dora | dora | none | 32-true | 16 | 0.001 | – | 1.0000 | 300.0 | – | 1,000 | 1,234 | failed |"""
    assert table == expected
    assert expected in (out / "report.md").read_text()
    csv_lines = (out / "trials.csv").read_text().splitlines()
    assert csv_lines[0].startswith("run,status,method,quant,precision,method.r,optim.lr,quality.task_score")
    assert [line.split(",")[0] for line in csv_lines[1:]] == ["a-full", "b-lora", "c-lora", "d-qlora", "e-dora"]
    assert [line.rsplit(",", 1)[1] for line in csv_lines[1:]] == ["True", "True", "False", "True", "False"]


def test_pareto_png_is_a_valid_image(tmp_path):
    import matplotlib.image

    write_run(tmp_path, "a", "full", None, 0.9, 400 * 2**20)
    write_run(tmp_path, "b", "lora", 16, 0.8, 200 * 2**20)
    out, _ = write_report([tmp_path], tmp_path)
    png = out / "pareto.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    height, width, _ = matplotlib.image.imread(png).shape
    assert width > 400 and height > 300


def test_report_cli_prints_the_table_and_refuses_empty_paths(tmp_path):
    write_run(tmp_path, "a", "lora", 8, 0.6, 10 * 2**20)
    out = ftx_main("report", str(tmp_path))
    assert out.returncode == 0 and "| ★ | a | lora |" in out.stdout
    empty = tmp_path / "empty"
    empty.mkdir()
    out = ftx_main("report", str(empty))
    assert out.returncode == 2 and "no run directories" in out.stderr


@pytest.mark.parametrize("logger", ["csv", "tensorboard", "none"])
def test_alternative_loggers_write_their_files(logger, tiny_model_dir, tiny_data, tmp_path):
    overrides = [o for o in tiny_overrides(tiny_model_dir, tiny_data, tmp_path, steps=2) if not o.startswith("logger")]
    train(compose_config([*overrides, f"logger={logger}"]))
    assert read_metrics(tmp_path)["status"] == "completed"  # metrics.json whatever the logger
    if logger == "csv":
        header = (tmp_path / "csv" / "version_0" / "metrics.csv").read_text().splitlines()[0].split(",")
        assert {"train.loss", "quality.eval_loss", "memory.peak_bytes"} <= set(header)
    elif logger == "tensorboard":
        assert list((tmp_path / "tensorboard").glob("version_0/events.out.tfevents.*"))
    else:
        assert not (tmp_path / "csv").exists() and not (tmp_path / "wandb").exists()


class FailAtTheEnd(L.Callback):
    def on_train_end(self, *args) -> None:
        raise RuntimeError("failed after training")


def logged_names(logger: str, run_dir: Path, cfg) -> tuple[set[str], str | None]:
    """(the metric names a logger holds for a run, how its run ended: finished, failed
    or None where the logger has no run state), read with the logger's own reader."""
    if logger == "csv":
        (path,) = run_dir.glob("csv/version_*/metrics.csv")
        return set(path.read_text().splitlines()[0].split(",")), None
    if logger == "tensorboard":
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        (events,) = run_dir.glob("tensorboard/version_*")
        return set(EventAccumulator(str(events)).Reload().Tags()["scalars"]), None
    if logger == "wandb":
        run = wandb_summary(run_dir)
        return set(run["summary"]), run["state"]
    if logger == "mlflow":
        import mlflow

        client = mlflow.MlflowClient(cfg.logger.tracking_uri)
        experiment = client.get_experiment_by_name(cfg.logger.project)
        (run,) = client.search_runs([experiment.experiment_id], f"tags.`ftx.run_dir` = '{run_dir}'")
        return set(run.data.metrics), run.info.status.lower()
    if logger == "none":
        assert not [p.name for p in run_dir.iterdir() if p.name in ("csv", "tensorboard", "wandb")]
        return set(), None
    raise AssertionError(f"no reader for logger={logger}: add one here")


@pytest.mark.parametrize("logger", LOGGERS.names())
def test_every_logger_keeps_the_contract(logger, no_wandb_credentials, tiny_model_dir, tiny_data, tmp_path):
    """One run per job under the names of metrics.json, closed when the job ends,
    failed or not (the next job starts its own)."""
    pytest.importorskip(LOGGERS.fact(logger, "REQUIRES") or "ftx")
    extra = [f"logger={logger}", f"logger.project=contract-{logger}"]
    if logger == "mlflow":
        extra.append(f"logger.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}")
    done, failed = tmp_path / "done", tmp_path / "failed"
    base = [o for o in tiny_overrides(tiny_model_dir, tiny_data, done, steps=2) if not o.startswith("logger")]
    cfg = compose_config([*base, *extra])
    train(cfg)
    with pytest.raises(RuntimeError, match="failed after training"):
        train(compose_config([*base, *extra, f"paths.output_dir={failed}"]), callbacks=[FailAtTheEnd()])
    assert not tracking._ACTIVE  # nothing left open for the next job
    names, state = logged_names(logger, done, cfg)
    if logger != "none":
        record = flatten(read_metrics(done))
        assert {"train.loss", "quality.eval_loss", "memory.peak_bytes", "params.trainable"} <= names
        assert {k for k in names if k in record} >= {k for k in record if k.startswith("quality.")}
    assert state in (None, "finished")
    names, state = logged_names(logger, failed, cfg)
    assert read_metrics(failed)["status"] == "failed"
    assert state in (None, "failed"), state  # W&B and MLflow mark the run failed
    if logger != "none":
        assert "train.loss" in names  # what it streamed before failing is kept
