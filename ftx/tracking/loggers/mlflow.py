"""``logger=mlflow``: one MLflow run per job, the composed config as its params
(flattened to dotted names), every metric under the names of metrics.json, the
artefact and metrics.json as artifacts (``logger.log_artifact``), a failed run
marked FAILED (a stopped one KILLED). The trials of a multirun share an experiment,
``PROJECT/GROUP`` (``logger.group``, else the sweep directory's name), which also
gets a report run with the trials table and the sweep's report files.

Where: ``logger.tracking_uri``, else ``MLFLOW_TRACKING_URI``, else MLflow 3's
default store, ``mlflow.db`` (SQLite) in the working directory (MLflow 3.17 refuses
to start a new ``./mlruns`` file store). Never a network wait unless one is configured.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

REQUIRES = "mlflow"

MAX_PARAM = 6000
"""MLflow's longest param value (characters); longer values are cut, marked with …."""

STATUS = {"failed": "FAILED", "stopped": "KILLED", "pruned": "FINISHED", "completed": "FINISHED"}
"""An ftx run's status as MLflow's run status (a pruned run ended as asked)."""


def tracking_uri(cfg: DictConfig) -> str:
    # Resolved here, not by mlflow.get_tracking_uri(): that one fixes its default on
    # first use, in whatever directory the process was in then.
    default = f"sqlite:///{Path('mlflow.db').resolve()}"
    return cfg.logger.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or default


def experiment_name(cfg: DictConfig, group: str | None) -> str:
    return f"{cfg.logger.project}/{group}" if group else cfg.logger.project


def make(cfg: DictConfig, run_dir: Path):
    from lightning.pytorch.loggers import MLFlowLogger

    from ftx.tracking import multirun_group

    logger = MLFlowLogger(
        experiment_name=experiment_name(cfg, cfg.logger.group or multirun_group()),
        run_name=cfg.run_name,
        tracking_uri=tracking_uri(cfg),
        tags={"ftx.run_dir": str(run_dir), "ftx.status": "running"} | {f"ftx.tag.{t}": "true" for t in cfg.logger.tags},
    )
    log_params(logger.experiment, logger.run_id, OmegaConf.to_container(cfg, resolve=True))
    return logger


def log_params(client, run_id: str, config: dict[str, Any]) -> None:
    """The config as params, ``model.name_or_path`` style, 100 per call (MLflow's batch limit)."""
    from mlflow.entities import Param

    from ftx.tracking import flatten

    params = [Param(key, _shown(value)) for key, value in flatten(config).items()]
    for start in range(0, len(params), 100):
        client.log_batch(run_id, params=params[start : start + 100])


def _shown(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, list | dict) else str(value)
    return text if len(text) <= MAX_PARAM else text[: MAX_PARAM - 1] + "…"


def log_record(logger, numbers: dict[str, float], result: dict[str, Any]) -> None:
    """The record's numbers at the run's last step: MLflow shows a metric's value at
    its highest step, so these win over what the meter streamed during training
    (``memory.peak_bytes`` is both)."""
    logger.log_metrics(numbers, step=result["train"]["steps"])


def finish(logger, cfg: DictConfig, result: dict[str, Any], artefact: Path | None) -> None:
    """The artefact and metrics.json as artifacts when given; the run FINISHED."""
    from ftx.tracking import run_record, strict_json

    client, run_id = logger.experiment, logger.run_id
    if artefact is not None:
        client.log_artifacts(run_id, str(artefact), artifact_path=artefact.name)
        record = run_record(cfg) | result | {"status": "completed"}  # what metrics.json holds
        client.log_dict(run_id, strict_json(record), "metrics.json")
    _end(client, run_id, "completed")


def fail(logger, status: str) -> None:
    """A job that ended early: its run FAILED (a failure), KILLED (stopped) or FINISHED (pruned)."""
    _end(logger.experiment, logger.run_id, status)


def _end(client, run_id: str, status: str) -> None:
    client.set_tag(run_id, "ftx.status", status)
    client.set_terminated(run_id, STATUS[status])


def report(sweep_dir: Path, config: DictConfig) -> None:
    """A run ``report-SWEEP`` in the trials' experiment: the trials table (trials.json)
    and the sweep's report.md, trials.csv, pareto.png and report.html as artifacts."""
    from mlflow import MlflowClient

    from ftx.tracking.report import COLUMNS, choose_objective, find_runs, pareto_front, read_trial

    client = MlflowClient(tracking_uri(config))
    name = experiment_name(config, config.logger.group or sweep_dir.name)
    experiment = client.get_experiment_by_name(name)
    experiment_id = experiment.experiment_id if experiment else client.create_experiment(name)
    run = client.create_run(experiment_id, run_name=f"report-{sweep_dir.name}", tags={"ftx.job_type": "report"})
    try:
        rows = [read_trial(path) for path in find_runs([sweep_dir])]
        front = pareto_front(rows, choose_objective(rows))
        table = {key: [row.get(key) for row in rows] for key in COLUMNS} | {"pareto": [r["run"] in front for r in rows]}
        client.log_table(run.info.run_id, data=table, artifact_file="trials.json")
        for name in ("report.md", "trials.csv", "pareto.png", "report.html"):
            if (sweep_dir / name).is_file():
                client.log_artifact(run.info.run_id, str(sweep_dir / name))
    except BaseException:
        client.set_terminated(run.info.run_id, "FAILED")
        raise
    client.set_terminated(run.info.run_id, "FINISHED")
