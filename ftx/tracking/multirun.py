"""Hydra callback for multiruns and sweeps: a progress line per finished trial, and
at the end the local report (report.md, trials.csv, pareto.png, report.html) in the
sweep directory plus, with a logger that has one (W&B, MLflow), a report run holding
the trials table and the quality-versus-memory plot, so methods compare in one
dashboard.

Registered in conf/config.yaml under hydra.callbacks; Hydra imports this module at
every start, so it imports nothing heavy at module level.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger(__name__)


class MultirunReport(Callback):
    def __init__(self) -> None:
        self.finished = 0

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        if HydraConfig.get().mode != RunMode.MULTIRUN:
            return
        if str(config.hydra.sweeper.get("_target_", "")).endswith("FtxOptunaSweeper"):
            return  # ftx's sweeper says it, with the trials to go and the time left (ftx.sweep.Progress)
        self.finished += 1
        status = job_return.status.name.lower()
        if status == "completed" and isinstance(job_return.return_value, dict):
            status = job_return.return_value["status"]  # the run record's: a sweep's trial may be pruned
        log.info("trial %d done (#%s, %s): %s", self.finished, HydraConfig.get().job.num, status, config.run_name)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from ftx.tracking.report import write_report

        sweep_dir = Path(config.hydra.sweep.dir)
        try:
            out, table = write_report([sweep_dir], sweep_dir)
        except FileNotFoundError as error:
            log.warning("no report: %s", error)
            return
        log.info("report: %s (in a browser: %s)\n%s", out / "report.md", out / "report.html", table)
        from ftx.tracking.loggers import LOGGERS

        report = getattr(LOGGERS.load(config.logger.name), "report", None)
        if report is not None:  # the logger's own report run (W&B, MLflow)
            report(sweep_dir, config)
