"""``logger=wandb``: one W&B run per job, the composed config as its config, the
trials of a multirun in one group (and a report run with the trials table and the
quality-versus-memory scatter); offline unless credentials exist (``logger.mode``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

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


def finish(logger, cfg: DictConfig, result: dict[str, Any], artefact: Path | None) -> None:
    """The artefact as a W&B artifact (type model) when given; the run finished."""
    run = logger.experiment
    if artefact is not None:
        import wandb

        model = wandb.Artifact(name=f"{run.name}-{artefact.name}".replace("/", "-"), type="model")
        model.add_dir(str(artefact))
        run.log_artifact(model)
    run.finish()


def report(sweep_dir: Path, config: DictConfig) -> None:
    """One W&B run (job_type=report, grouped with the trials) with the trials table
    and a quality-versus-peak-memory scatter."""
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
    )
    try:
        run.log(
            {
                "trials": table,
                "quality_vs_memory": wandb.plot.scatter(
                    table, "memory.peak_bytes", objective.key, title=f"{objective.key} against peak memory"
                ),
            }
        )
    finally:
        run.finish()
