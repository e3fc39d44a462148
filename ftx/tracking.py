"""Tracking: the run record (metrics.json) and the Lightning loggers that stream
metrics during training. Metric names are the dotted keys of DESIGN.md."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

METRICS_FILE = "metrics.json"


def write_metrics(run_dir: Path, record: dict[str, Any]) -> Path:
    """Write metrics.json atomically: a reader never sees half a record."""
    path = run_dir / METRICS_FILE
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(_strict_json(record), indent=2, sort_keys=True, allow_nan=False) + "\n")
    os.replace(tmp, path)
    return path


def _strict_json(value: Any) -> Any:
    """NaN/inf become null (JSON has no such numbers); paths become strings."""
    if isinstance(value, dict):
        return {str(k): _strict_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_strict_json(v) for v in value]
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


def make_logger(cfg: DictConfig, run_dir: Path):
    """The Lightning logger for ``cfg.logger`` (False for none)."""
    name = cfg.logger.name
    if name == "none":
        return False
    if name == "csv":
        from lightning.pytorch.loggers import CSVLogger

        return CSVLogger(save_dir=run_dir, name="csv")
    if name == "tensorboard":
        from lightning.pytorch.loggers import TensorBoardLogger

        return TensorBoardLogger(save_dir=run_dir, name="tensorboard")
    from lightning.pytorch.loggers import WandbLogger

    logger = WandbLogger(
        project=cfg.logger.project,
        entity=cfg.logger.entity,
        group=cfg.logger.group,
        tags=list(cfg.logger.tags),
        name=cfg.run_name,
        save_dir=str(run_dir),
        mode=wandb_mode(cfg.logger.mode),
        config=OmegaConf.to_container(cfg, resolve=True),
    )
    return logger


def wandb_mode(mode: str) -> str:
    """auto = online only when credentials exist; never prompt, never block."""
    if mode != "auto":
        return mode
    has_key = (
        bool(os.environ.get("WANDB_API_KEY"))
        or (Path.home() / ".netrc").is_file()
        and ("api.wandb.ai" in (Path.home() / ".netrc").read_text())
    )
    return "online" if has_key else "offline"


def log_final(logger: Any, record: dict[str, Any]) -> None:
    """Send the run record's numbers to the streaming logger under dotted names."""
    if not logger:
        return
    numbers = {k: v for k, v in flatten(record).items() if isinstance(v, int | float) and not isinstance(v, bool)}
    logger.log_metrics(numbers)
    logger.save()
    if hasattr(logger, "experiment") and hasattr(logger.experiment, "finish"):
        logger.experiment.finish()  # multirun jobs must never share a W&B run
