"""``logger=tensorboard``: event files under RUN/tensorboard/ (``pip install 'ftx[tensorboard]'``)."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

REQUIRES = "tensorboard"


def make(cfg: DictConfig, run_dir: Path):
    from lightning.pytorch.loggers import TensorBoardLogger

    return TensorBoardLogger(save_dir=run_dir, name="tensorboard")
