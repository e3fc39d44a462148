"""Composition: the schema and the shipped sweeps in Hydra's ConfigStore, ftx's
resolvers, where conf/, sweeps/ and datasets/ live, and the run directory's stamp."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from ftx.config.schema import Config


def register_configs() -> None:
    """Put the schema in Hydra's ConfigStore as ``ftx_schema`` (config.yaml extends it),
    and every sweeps/NAME.yaml as option NAME of the group ``sweep``."""
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    schema = OmegaConf.structured(Config)
    OmegaConf.set_struct(schema.objective.reward_weights, False)  # names are the user's reward parts
    OmegaConf.set_struct(schema.data.chat_template_kwargs, False)  # names are the template's variables
    store.store(name="ftx_schema", node=schema)
    # sweeps/ stays a top-level folder (it is not a part of the experiment tree), so its
    # files join the config tree here rather than through a search path, which would
    # make every folder beside them a config group.
    for path in sweep_files():
        store.store(group="sweep", name=path.stem, node=OmegaConf.load(path), package="_global_")


def sweep_files() -> list[Path]:
    """The shipped sweep specs, sweeps/*.yaml."""
    return sorted((project_root() / "sweeps").glob("*.yaml"))


def compose_config(overrides: list[str], with_hydra: bool = False) -> DictConfig:
    """The config `ftx train <overrides>` would run, composed without Hydra's runner
    (for commands that read a run, and for tests); ``with_hydra`` keeps the ``hydra``
    node (sweeper, launcher)."""
    from hydra import compose, initialize_config_dir

    register_configs()
    register_resolvers()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose(config_name="config", overrides=overrides, return_hydra_config=with_hydra)


def project_root() -> Path:
    """Where conf/, sweeps/ and datasets/ live: inside the package when installed from
    a wheel (they are force-included as ftx/conf, ftx/sweeps, ftx/datasets), else the checkout."""
    package = Path(__file__).resolve().parent.parent
    return package if (package / "conf").is_dir() else package.parent


def config_dir() -> Path:
    return project_root() / "conf"


def _resolve_asset(relative: str) -> str:
    return str(project_root() / relative)


def register_resolvers() -> None:
    """``${ftx_asset:datasets/x.jsonl}`` names a file shipped with ftx;
    ``${ftx_basename:a/b/model}`` gives ``model`` (run names from paths);
    ``${ftx_run_stamp:}`` the run directory's stamp (:func:`run_stamp`)."""
    resolvers = {"ftx_asset": _resolve_asset, "ftx_basename": lambda path: Path(str(path)).name}
    for name, resolver in resolvers.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, resolver)
    if not OmegaConf.has_resolver("ftx_run_stamp"):
        OmegaConf.register_new_resolver("ftx_run_stamp", run_stamp, use_cache=True)


def run_stamp() -> str:
    """``DATE/TIME``; in a SLURM batch job ``slurm-JOBID`` (array: ``JOBID_TASK``), which
    a requeued job keeps: the same command then finds its run directory and resumes;
    under torchrun ``torchrun-RUNID``, the rendezvous id every rank shares (the ranks
    start at slightly different times, so a timestamp could split them)."""
    if os.environ.get("TORCHELASTIC_RUN_ID") not in (None, "", "none"):
        return f"torchrun-{os.environ['TORCHELASTIC_RUN_ID']}"
    job = os.environ.get("SLURM_ARRAY_JOB_ID") or os.environ.get("SLURM_JOB_ID")
    interactive = os.environ.get("SLURM_JOB_NAME") in ("bash", "interactive")
    if job and not interactive:
        task = os.environ.get("SLURM_ARRAY_TASK_ID")
        return f"slurm-{job}_{task}" if os.environ.get("SLURM_ARRAY_JOB_ID") and task else f"slurm-{job}"
    from datetime import datetime

    return datetime.now().strftime("%Y-%m-%d/%H-%M-%S")


def as_container(value: Any) -> Any:
    """Plain Python value of a config node (lists and dicts resolved)."""
    if isinstance(value, DictConfig | ListConfig):
        return OmegaConf.to_container(value, resolve=True)
    return value
