"""``logger=csv``: Lightning's CSVLogger, RUN/csv/version_N/metrics.csv."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

REQUIRES = None


def make(cfg: DictConfig, run_dir: Path):
    from lightning.pytorch.loggers import CSVLogger

    return CSVLogger(save_dir=run_dir, name="csv")
