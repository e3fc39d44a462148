"""Hydra Sweeper plugin ``hydra/sweeper=ftx_optuna``: a thin adapter over ftx.sweep.

Hydra imports every module under ``hydra_plugins`` at each start of any Hydra app,
so this one imports only Hydra and ftx's config schema; Optuna, Lightning and the
sweep logic load when a sweep actually runs. ``hydra_plugins`` itself is a
namespace package (no ``__init__.py``), shared with other installed plugins.
"""

from __future__ import annotations

import sys
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.core.plugins import Plugins
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf

from ftx.config import SweeperConfig

ConfigStore.instance().store(group="hydra/sweeper", name="ftx_optuna", node=SweeperConfig, provider="ftx")


class FtxOptunaSweeper(Sweeper):
    """Runs an Optuna study as a Hydra multirun: one job per trial, through the
    configured launcher (basic, joblib, submitit)."""

    def __init__(self, **settings: Any) -> None:
        self.settings: DictConfig = OmegaConf.create(settings)
        self.config: DictConfig | None = None
        self.launcher = None
        self.hydra_context: HydraContext | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config = config
        self.hydra_context = hydra_context
        self.launcher = Plugins.instance().instantiate_launcher(
            config=config, hydra_context=hydra_context, task_function=task_function
        )

    def sweep(self, arguments: list[str]) -> Any:
        from ftx.config import ConfigError
        from ftx.sweep import run_sweep

        assert self.config is not None and self.launcher is not None
        try:
            return run_sweep(self.settings, self.config, arguments, self._launch)
        except ConfigError as error:  # the sweep cannot start: say why, as ftx train does, without a traceback
            print(f"ftx sweep: error: {error}", file=sys.stderr)
            raise SystemExit(2) from None

    def _launch(self, jobs: list[list[str]], initial_job_idx: int) -> Any:
        # Compose every job here first: a bad override fails before anything launches.
        self.validate_batch_is_legal(jobs)
        return self.launcher.launch(jobs, initial_job_idx=initial_job_idx)
