"""Tracking: the run record (metrics.json) and the Lightning loggers that stream
metrics during training. Metric names are the dotted keys of DESIGN.md."""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from omegaconf import DictConfig

METRICS_FILE = "metrics.json"


def write_metrics(run_dir: Path, record: dict[str, Any]) -> Path:
    """Write metrics.json atomically: a reader never sees half a record."""
    path = run_dir / METRICS_FILE
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(strict_json(record), indent=2, sort_keys=True, allow_nan=False) + "\n")
    os.replace(tmp, path)
    return path


def run_record(cfg: DictConfig) -> dict[str, Any]:
    """What a run's record says before anything has run (status ``running``)."""
    return {
        "method": cfg.method.name,
        "objective": cfg.objective.name,
        "model": cfg.model.name,
        "quant": cfg.quant.name,
        "precision": cfg.trainer.precision,
        "seed": cfg.seed,
        "run_name": cfg.run_name,
        "status": "running",
    }


def result_record(
    cfg: DictConfig, *, params, quality, memory, predicted, calibration, fitted, module, resume, splits, stats, base
) -> dict[str, Any]:
    """What a trained run adds to its record: parameter counts, quality (before and
    after), memory (the PeakMemory's peak, the planner's prediction and calibration),
    what the fit measured (:class:`ftx.trainer.Fitted`), the training set's summary
    ``stats`` (:class:`ftx.data.tokenized.SplitStats`) and the data ``splits``."""
    trainer = fitted.trainer
    return {
        "params": params | {"trainable_share": params["trainable"] / params["total"]},
        "quality": quality,
        "memory": memory.peak() | predicted_record(predicted, calibration),
        "throughput": {"tokens_per_s": fitted.meter.tokens_per_s, "tokens": fitted.meter.tokens},
        "time": {"train_s": fitted.seconds},
        "train": {
            "steps": trainer.global_step,
            "final_loss": float(trainer.callback_metrics.get("train.loss", math.nan)),
            "resumed_from": resume,
            "skipped_steps": module.skipped_steps,
        },
        "data": {"format": splits.format, "skipped": splits.skipped, "packing": cfg.data.packing}
        | {k: v for k, v in asdict(stats).items() if k not in ("over_length", "untrained_at", "refused")}
        | {"refused": len(stats.refused)},  # rows the chat template refused, skipped (data.on_error=skip)
        "base_model": base,
    }


def artefact_record(artefact: Path, run_dir: Path) -> dict[str, Any]:
    """Where the trained weights are (relative to the run directory) and their size."""
    return {
        "artefact": str(artefact.relative_to(run_dir)),
        "artefact_bytes": sum(f.stat().st_size for f in artefact.rglob("*") if f.is_file()),
    }


def predicted_record(predicted, calibration=None) -> dict[str, Any]:
    """memory.predicted_bytes and the planner's terms at the peak (and the
    calibration that measured the runtime overhead, where one ran)."""
    if predicted is None:
        return {"predicted_bytes": None}
    return {
        "predicted_bytes": predicted.peak_bytes,
        "predicted": {item.key: item.at_peak for item in predicted.items},
    } | ({"calibration": calibration.record()} if calibration is not None else {})


def strict_json(value: Any) -> Any:
    """NaN/inf become null (JSON has no such numbers); paths become strings."""
    if isinstance(value, dict):
        return {str(k): strict_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [strict_json(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    return str(value)


def flatten(record: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"quality": {"eval_loss": 1}} -> {"quality.eval_loss": 1}."""
    flat = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


_ACTIVE: list[tuple[str, Any]] = []
"""(logger name, logger) of the run in progress (one per process), for close_failed_run."""


def start_logger(cfg: DictConfig, logger: Any) -> Any:
    """Start the logger's run now rather than at its first use (Lightning's fit start),
    so that what it holds in this process is there before the run's memory baseline."""
    _ACTIVE.clear()
    if logger:
        _ACTIVE.append((cfg.logger.name, logger))
    if logger and hasattr(logger, "experiment"):
        logger.experiment  # noqa: B018  (the property starts a W&B or MLflow run; others create a writer)
    return logger


def multirun_group() -> str | None:
    """In a multirun or sweep, the sweep directory's name: its trials share a W&B group
    (an MLflow experiment)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        return Path(HydraConfig.get().sweep.dir).name
    return None


def wandb_mode(mode: str) -> str:
    """auto: WANDB_MODE if set, else online only when credentials for the configured
    host exist, else offline. Never prompts for a key, never waits on a network."""
    if mode != "auto":
        return mode
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    has_key = bool(os.environ.get("WANDB_API_KEY")) or (netrc.is_file() and host in netrc.read_text())
    return "online" if has_key else "offline"


def finish_logger(logger: Any, cfg: DictConfig, result: dict[str, Any], artefact: Path | None = None) -> None:
    """Send the trained run's record (``result``: what train adds) as numbers under
    dotted names, then let the logger attach ``artefact`` (given when
    ``logger.log_artifact``) and close its run as finished: jobs never share a run."""
    if not logger:
        return
    from ftx.tracking.loggers import LOGGERS

    numbers = {k: v for k, v in flatten(result).items() if isinstance(v, int | float) and not isinstance(v, bool)}
    module = LOGGERS.load(cfg.logger.name)
    if hasattr(module, "log_record"):  # a logger that must place them itself (MLflow: at the last step)
        module.log_record(logger, numbers, result)
    else:
        logger.log_metrics(numbers)
    logger.save()  # tensorboard and csv flush here; they need no finish of their own
    if hasattr(module, "finish"):
        module.finish(logger, cfg, result, artefact)
    _ACTIVE.clear()


def close_failed_run(status: str = "failed") -> None:
    """Close the run of a job that ended early (``failed``, ``stopped`` or ``pruned``,
    the record's status) so the next multirun job starts its own: W&B's exit code 1
    for a failure, 0 otherwise; the active logger's ``fail`` (MLflow: FAILED, KILLED)."""
    import sys

    wandb = sys.modules.get("wandb")
    if wandb is not None and wandb.run is not None:
        wandb.finish(exit_code=1 if status == "failed" else 0)
    from ftx.tracking.loggers import LOGGERS

    for name, logger in _ACTIVE:
        fail = getattr(LOGGERS.load(name), "fail", None)
        if fail is not None:
            fail(logger, status)
    _ACTIVE.clear()
