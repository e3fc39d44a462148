"""The Lightning loggers ``logger=NAME`` selects, one module per logger (and its
``conf/logger/NAME.yaml``). Each states ``REQUIRES``, the optional package it needs
(None: none beyond ftx's own), and provides ``make(cfg, run_dir)``: the logger, or
False for none. Optional hooks:

- ``log_record(logger, numbers, result)``: log the run record's numbers (default:
  ``logger.log_metrics(numbers)``);
- ``finish(logger, cfg, result, artefact)``: attach the artefact (given when
  ``logger.log_artifact``) and close the run as finished;
- ``fail(logger, status)``: close the run of a job that ended early (failed,
  stopped or pruned);
- ``report(sweep_dir, config)``: a multirun's report run.

Every logger keeps the same contract: one run per job, the metric names of
metrics.json, closed (failed or not) when the job ends
(:func:`ftx.tracking.finish_logger`, :func:`ftx.tracking.close_failed_run`)."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from ftx.registry import Registry

LOGGERS = Registry("ftx.tracking.loggers", "logger", required=("REQUIRES",))


def make_logger(cfg: DictConfig, run_dir: Path):
    """The Lightning logger for ``cfg.logger`` (False for none)."""
    return LOGGERS.load(cfg.logger.name).make(cfg, run_dir)
