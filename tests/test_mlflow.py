"""logger=mlflow against a real MLflow tracking server started here (127.0.0.1, a
SQLite backend, a local artifact root), read back through MLflow's own client: the
config as params, the metrics of metrics.json, the artifacts, the run's status;
one run per multirun job with a report run beside them; and MLflow's own local
store when no tracking URI is set."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import lightning as L
import pytest
from conftest import ftx_main, read_metrics, tiny_overrides

from ftx.config import compose_config
from ftx.train import train

mlflow = pytest.importorskip("mlflow", reason="logger=mlflow needs mlflow (pip install 'ftx[mlflow]')")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """An MLflow tracking server on a free localhost port, stopped after the module."""
    root = tmp_path_factory.mktemp("mlflow")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [
        str(Path(sys.executable).parent / "mlflow"),
        "server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
        "--backend-store-uri",
        f"sqlite:///{root / 'mlflow.db'}",
        "--default-artifact-root",
        (root / "artifacts").as_uri(),
        "--no-serve-artifacts",  # clients write artifacts to the root themselves
    ]
    log = (root / "server.log").open("w")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as answer:
                if answer.status == 200:
                    break
        except OSError:
            time.sleep(0.5)
    else:
        process.kill()
        pytest.fail(f"mlflow server did not start:\n{(root / 'server.log').read_text()[-3000:]}")
    yield url
    process.terminate()
    process.wait(timeout=30)
    log.close()


def overrides(tiny_model_dir, tiny_data, run_dir: Path, uri: str | None, *extra: str, steps: int = 2) -> list[str]:
    base = [o for o in tiny_overrides(tiny_model_dir, tiny_data, run_dir, steps=steps) if not o.startswith("logger")]
    return [*base, "logger=mlflow", *([f"logger.tracking_uri={uri}"] if uri else []), *extra]


def only_run(client, experiment: str):
    found = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert len(found) == 1, [r.info.run_name for r in found]
    return found[0]


def test_a_run_holds_its_config_metrics_artifacts_and_status(server, tiny_model_dir, tiny_data, tmp_path):
    cfg = compose_config(
        overrides(tiny_model_dir, tiny_data, tmp_path, server, "logger.project=ftx-one", "logger.log_artifact=true")
    )
    train(cfg)
    record = read_metrics(tmp_path)
    client = mlflow.MlflowClient(server)
    run = only_run(client, "ftx-one")
    assert run.info.status == "FINISHED" and run.info.run_name == cfg.run_name
    assert run.data.tags["ftx.status"] == "completed"
    params = run.data.params
    assert params["method.name"] == "lora" and float(params["optim.lr"]) == cfg.optim.lr
    assert params["model.name_or_path"] == str(tiny_model_dir) and params["trainer.max_steps"] == "2"
    metrics = run.data.metrics
    assert metrics["quality.eval_loss"] == pytest.approx(record["quality"]["eval_loss"])
    assert metrics["memory.peak_bytes"] == record["memory"]["peak_bytes"]
    assert metrics["params.trainable"] == record["params"]["trainable"]
    assert "train.loss" in metrics  # streamed during training, not only at the end
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"adapter", "metrics.json"} <= artifacts
    adapter = {a.path for a in client.list_artifacts(run.info.run_id, "adapter")}
    assert "adapter/adapter_model.safetensors" in adapter
    saved = mlflow.artifacts.load_dict(f"{run.info.artifact_uri}/metrics.json")
    assert saved["status"] == "completed" and saved["quality"] == pytest.approx(record["quality"])


class Explode(L.Callback):
    def on_train_end(self, *args) -> None:
        raise RuntimeError("boom after the last step")


def test_a_failed_run_is_marked_failed(server, tiny_model_dir, tiny_data, tmp_path):
    cfg = compose_config(overrides(tiny_model_dir, tiny_data, tmp_path, server, "logger.project=ftx-failed"))
    with pytest.raises(RuntimeError, match="boom"):
        train(cfg, callbacks=[Explode()])
    assert read_metrics(tmp_path)["status"] == "failed"
    run = only_run(mlflow.MlflowClient(server), "ftx-failed")
    assert run.info.status == "FAILED" and run.data.tags["ftx.status"] == "failed"
    assert "train.loss" in run.data.metrics  # what it logged before failing stays


def test_multirun_jobs_are_separate_runs_in_one_experiment_with_a_report(server, tiny_model_dir, tiny_data, tmp_path):
    args = [o for o in overrides(tiny_model_dir, tiny_data, tmp_path, server) if not o.startswith("paths.")]
    out = ftx_main("train", "-m", "method=full,lora", f"hydra.sweep.dir={tmp_path}", *args)
    assert out.returncode == 0, out.stderr[-3000:]
    client = mlflow.MlflowClient(server)
    experiment = client.get_experiment_by_name(f"ftx/{tmp_path.name}")
    runs = client.search_runs([experiment.experiment_id])
    trials = sorted((r for r in runs if r.data.tags.get("ftx.job_type") != "report"), key=lambda r: r.info.run_name)
    (report,) = [r for r in runs if r.data.tags.get("ftx.job_type") == "report"]
    assert [r.data.params["method.name"] for r in trials] == ["full", "lora"]
    assert all(r.info.status == "FINISHED" for r in runs)
    dirs = {r.data.params["method.name"]: r.data.tags["ftx.run_dir"] for r in trials}
    for trial in trials:
        record = read_metrics(Path(dirs[trial.data.params["method.name"]]))
        assert trial.data.metrics["quality.eval_loss"] == pytest.approx(record["quality"]["eval_loss"])
    artifacts = {a.path for a in client.list_artifacts(report.info.run_id)}
    assert {"trials.json", "report.md", "trials.csv", "pareto.png", "report.html"} <= artifacts


def test_without_a_tracking_uri_it_writes_mlflows_local_default(monkeypatch, tiny_model_dir, tiny_data, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    train(compose_config(overrides(tiny_model_dir, tiny_data, tmp_path / "run", None)))
    assert (tmp_path / "mlflow.db").is_file()  # MLflow 3's default store, in the working directory
    run = only_run(mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}"), "ftx")
    assert run.info.status == "FINISHED" and "quality.eval_loss" in run.data.metrics
