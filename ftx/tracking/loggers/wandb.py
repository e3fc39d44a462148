"""``logger=wandb``: one W&B run per job, the composed config as its config, the
trials of a multirun in one group; offline unless credentials exist (``logger.mode``)."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

REQUIRES = None


def make(cfg: DictConfig, run_dir: Path):
    from lightning.pytorch.loggers import WandbLogger

    from ftx.tracking import multirun_group, wandb_mode

    return WandbLogger(
        project=cfg.logger.project,
        entity=cfg.logger.entity,
        group=cfg.logger.group or multirun_group(),
        tags=list(cfg.logger.tags),
        name=cfg.run_name,
        save_dir=str(run_dir),
        mode=wandb_mode(cfg.logger.mode),
        config=OmegaConf.to_container(cfg, resolve=True),
    )
