"""``logger=wandb``: one W&B run per job, the composed config as its config, the
trials of a multirun in one group (and a report run with the trials table and the
quality-versus-memory scatter); offline unless credentials exist (``logger.mode``)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

REQUIRES = None

log = logging.getLogger(__name__)


def make(cfg: DictConfig, run_dir: Path):
    import wandb
    from lightning.pytorch.loggers import WandbLogger

    from ftx.tracking import multirun_group, wandb_mode

    logger = WandbLogger(
        project=cfg.logger.project,
        entity=cfg.logger.entity,
        group=cfg.logger.group or multirun_group(),
        tags=list(cfg.logger.tags),
        name=cfg.run_name,
        save_dir=str(run_dir),
        mode=wandb_mode(cfg.logger.mode),
        config=OmegaConf.to_container(cfg, resolve=True),
        # W&B's own lines (banner, history sparklines, sync hints) stay off the
        # console: ftx says where the run is and how to sync it (finish).
        settings=wandb.Settings(silent=True),
    )
    # Lightning passes anonymous=None, which W&B warns about on every run.
    logger._wandb_init.pop("anonymous", None)
    return logger


def finish(logger, cfg: DictConfig, result: dict[str, Any], artefact: Path | None) -> None:
    """The artefact as a W&B artifact (type model) when given; the run finished."""
    run = logger.experiment
    if artefact is not None:
        import wandb

        model = wandb.Artifact(name=f"{run.name}-{artefact.name}".replace("/", "-"), type="model")
        model.add_dir(str(artefact))
        run.log_artifact(model)
    offline = run.settings.mode == "offline"
    run.finish()
    if offline:
        log.info("W&B run saved offline; upload it with: wandb sync %s", Path(run.dir).parent)
    else:
        log.info("W&B run: %s", run.url)


def report(sweep_dir: Path, config: DictConfig) -> None:
    """One W&B run (job_type=report, grouped with the trials) with the trials table,
    a quality-versus-peak-memory scatter and the sweep's report.html."""
    import wandb

    from ftx.tracking import wandb_mode
    from ftx.tracking.report import COLUMNS, choose_objective, find_runs, pareto_front, read_trial

    rows = [read_trial(run) for run in find_runs([sweep_dir])]
    objective = choose_objective(rows)
    front = pareto_front(rows, objective)
    table = wandb.Table(columns=[*COLUMNS, "pareto"])
    for row in rows:
        table.add_data(*[row.get(k) for k in COLUMNS], row["run"] in front)
    run = wandb.init(
        project=config.logger.project,
        entity=config.logger.entity,
        group=config.logger.group or sweep_dir.name,
        job_type="report",
        name=f"report-{sweep_dir.name}",
        dir=str(sweep_dir),
        mode=wandb_mode(config.logger.mode),
        tags=list(config.logger.tags),
        settings=wandb.Settings(silent=True),
    )
    page = sweep_dir / "report.html"  # the sweep's own page (scatter, sortable table, config diffs)
    try:
        run.log(
            ({"report_page": wandb.Html(page.read_text())} if page.is_file() else {})
            | {
                "trials": table,
                "quality_vs_memory": wandb.plot.scatter(
                    table, "memory.peak_bytes", objective.key, title=f"{objective.key} against peak memory"
                ),
            }
        )
    finally:
        run.finish()
