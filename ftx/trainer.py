"""The Lightning Trainer of one run: its strategy and precision, the callbacks every
run has (the meter, the resume state, preemption, checkpointing), and the fit, whose
failures come out explained (:func:`ftx.faults.explain`)."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig


@dataclass
class Fitted:
    """What the fit leaves for the record."""

    trainer: Any
    """The Lightning Trainer (global_step, callback_metrics)."""
    meter: Any
    """The run's :class:`ftx.tracking.meter.RunMeter` (tokens/s, tokens)."""
    seconds: float
    """Wall-clock of trainer.fit."""


def fit(cfg: DictConfig, module, loaders: tuple, run_dir: Path, memory, predicted, resume, logger, callbacks) -> Fitted:
    """Train ``module`` on ``loaders`` (train, held-out), from ``resume`` when set.
    ``memory`` is the run's started PeakMemory, ``predicted`` the planner's Plan (or
    None), ``callbacks`` extra Lightning callbacks (tests, a sweep's pruning)."""
    from ftx.faults import explain
    from ftx.tracking.meter import RunMeter

    train_loader, eval_loader = loaders
    meter = RunMeter(memory)
    trainer, preemption = build(cfg, module.model, train_loader, run_dir, logger, meter, callbacks)
    started = time.perf_counter()
    try:
        trainer.fit(module, train_loader, eval_loader, ckpt_path=resume, weights_only=True)
    except BaseException as error:
        explained = explain(error, trainer, preemption, memory, predicted)
        if explained is error:
            raise
        raise explained from error
    return Fitted(trainer, meter, time.perf_counter() - started)


def build(cfg: DictConfig, model, train_loader, run_dir: Path, logger, meter, callbacks: list):
    """(the Trainer, its Preemption callback). Callbacks run in this order: the meter
    (its clock brackets the others' work), the resume state, preemption,
    checkpointing, the progress lines (without a bar), then ``callbacks``."""
    import lightning as L
    from lightning.pytorch.plugins.environments import SLURMEnvironment

    from ftx.data.sampling import EpochSampler
    from ftx.faults import Preemption, ResumeState, fingerprint
    from ftx.tracking.meter import ProgressLog

    settings, batches = cfg.trainer, len(train_loader)
    checkpoint_dir = run_dir / "checkpoints"
    requeue = settings.slurm_requeue and SLURMEnvironment.detect()
    preemption = Preemption(checkpoint_dir, handle_sigusr1=not requeue)
    sampler = train_loader.sampler if isinstance(train_loader.sampler, EpochSampler) else None
    bar = _progress_bar(settings.progress_bar)
    lines = [ProgressLog(settings.progress_every, meter)] if not bar and settings.progress_every > 0 else []
    trainer = L.Trainer(
        accelerator=settings.accelerator,
        devices=settings.devices,
        num_nodes=settings.num_nodes,
        strategy=_strategy(cfg, model),
        # In a SLURM job Lightning would requeue on SIGUSR1 by default: only when asked.
        plugins=[SLURMEnvironment(auto_requeue=settings.slurm_requeue)] if SLURMEnvironment.detect() else None,
        use_distributed_sampler=False,  # ftx's EpochSampler shards and resumes the order itself
        precision=settings.precision,
        max_steps=settings.max_steps,
        max_epochs=settings.max_epochs,
        accumulate_grad_batches=settings.accumulate_grad_batches,
        gradient_clip_val=settings.gradient_clip_val or None,
        val_check_interval=min(settings.val_check_interval, batches),
        check_val_every_n_epoch=None if settings.val_check_interval < batches else 1,
        limit_val_batches=settings.limit_val_batches,
        num_sanity_val_steps=0,
        log_every_n_steps=settings.log_every_n_steps,
        enable_progress_bar=bar,
        enable_model_summary=False,
        deterministic=settings.deterministic,
        logger=logger,
        callbacks=[
            meter,
            ResumeState(sampler, settings.batch_size, fingerprint(cfg)),
            preemption,
            *_checkpointing(cfg, checkpoint_dir),
            *lines,
            *callbacks,
        ],
        enable_checkpointing=settings.save_checkpoints,
        default_root_dir=run_dir,
    )
    return trainer, preemption


def _checkpointing(cfg: DictConfig, checkpoint_dir: Path) -> list:
    """checkpoints/last.ckpt every ``trainer.checkpoint_every`` steps (what a restart
    resumes from) and the latest step-numbered one."""
    if not cfg.trainer.save_checkpoints:
        return []
    from lightning.pytorch.callbacks import ModelCheckpoint

    return [
        ModelCheckpoint(
            dirpath=checkpoint_dir,
            filename="step{step}",
            auto_insert_metric_name=False,
            every_n_train_steps=cfg.trainer.checkpoint_every or cfg.trainer.val_check_interval,
            save_top_k=1,
            save_last=True,
        )
    ]


def _strategy(cfg: DictConfig, model):
    """The Lightning strategy: the configured name, except FSDP, which needs its unit
    of sharding (the model's decoder layer) and, with adapters, the original
    parameters (frozen and trainable ones in one flat shard)."""
    if cfg.trainer.strategy != "fsdp":
        return cfg.trainer.strategy
    from lightning.pytorch.strategies import FSDPStrategy

    unit_names = set(getattr(_base(model), "_no_split_modules", None) or [])
    layers = {type(m) for m in model.modules() if type(m).__name__ in unit_names}
    return FSDPStrategy(auto_wrap_policy=layers or None, use_orig_params=True, state_dict_type="full")


def _base(model):
    """The transformers model under a PEFT wrapper."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _progress_bar(setting: bool | None) -> bool:
    """null: a bar in a terminal, nothing in CI logs."""
    return sys.stderr.isatty() if setting is None else setting


def is_rank_zero() -> bool:
    """True outside distributed runs and in their rank 0 (RANK, LOCAL_RANK or SLURM_PROCID)."""
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    return getattr(rank_zero_only, "rank", 0) == 0
