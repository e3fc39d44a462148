"""``logger=none``: nothing streams during training (metrics.json is still written)."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

REQUIRES = None


def make(cfg: DictConfig, run_dir: Path):
    return False
