"""The pipeline for one run: check → data → base → plan → model → score base →
fit → score result → save → record. Returns the run record (metrics.json's content).

Everything that can be wrong with the config or the data is found before the
model loads. Whatever happens after the run directory exists, metrics.json says
how it ended: ``completed``, ``pruned`` (predicted over ``plan.budget_gb``: no
weights were loaded) or ``failed`` with the error.
"""

from __future__ import annotations

import logging
import math
import sys
import time
import traceback
from dataclasses import asdict
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ftx.config import validate
from ftx.data import load_splits, require_kind
from ftx.memory.plan import OverBudget
from ftx.objectives import DATA_KIND
from ftx.tracking import close_failed_run, write_metrics

log = logging.getLogger(__name__)


class RunPruned(Exception):
    """Raised by a callback (a sweep's pruner) to end a run early on purpose: the
    record says ``pruned`` with the step reached, and train() returns normally."""

    def __init__(self, step: int, value: float, peak_bytes: float | None) -> None:
        super().__init__(f"pruned at step {step} (validation value {value:.4g})")
        self.step, self.peak_bytes = step, peak_bytes


def train(cfg: DictConfig, callbacks: list | None = None) -> dict[str, Any]:
    """Run one experiment; ``callbacks`` are extra Lightning callbacks (tests, tools,
    a sweep's pruning). Raises what failed it, after recording it; a pruned run returns."""
    run_dir = Path(cfg.paths.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_run_config(cfg, run_dir)
    record: dict[str, Any] = {
        "method": cfg.method.name,
        "objective": cfg.objective.name,
        "model": cfg.model.name,
        "quant": cfg.quant.name,
        "precision": cfg.trainer.precision,
        "seed": cfg.seed,
        "run_name": cfg.run_name,
        "status": "running",
    }
    try:
        validate(cfg)
        splits = load_splits(cfg)
        require_kind(splits, DATA_KIND[cfg.objective.name], cfg.objective.name, cfg.data.train_file)
        record.update(_fit(cfg, run_dir, splits, callbacks or []))
        record["status"] = "completed"
    except OverBudget as over:
        record.update(status="pruned", reason=str(over), memory={"predicted_bytes": over.plan.peak_bytes})
        log.warning("run %s pruned: %s", run_dir, over)
        close_failed_run(exit_code=0)
        return record
    except RunPruned as pruned:
        record.update(status="pruned", reason=str(pruned), train={"steps": pruned.step})
        if pruned.peak_bytes is not None:
            record["memory"] = {"peak_bytes": int(pruned.peak_bytes)}
        close_failed_run(exit_code=0)
    except BaseException as error:
        from ftx.faults import Preempted

        # stopped: on a signal, with a checkpoint the same command resumes from
        record["status"] = "stopped" if isinstance(error, Preempted) else "failed"
        record["error"] = f"{type(error).__name__}: {error}"
        record.update(getattr(error, "record", {}))  # what a failure measured (memory at an OOM)
        record["traceback"] = traceback.format_exc(limit=8)
        close_failed_run()
        raise
    finally:
        if is_rank_zero():
            write_metrics(run_dir, record)
    log.info("run %s %s: %s", run_dir, record["status"], _summary(record))
    return record


def save_run_config(cfg: DictConfig, run_dir: Path) -> None:
    """RUN/.hydra/config.yaml, which ftx eval/generate/export and a reward run's users
    read: Hydra writes it when the run directory is its own; a run given another
    (paths.output_dir=DIR, the Python API, a pipeline stage) gets the resolved config."""
    saved = run_dir / ".hydra" / "config.yaml"
    if not saved.is_file() and is_rank_zero():
        saved.parent.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(cfg, saved, resolve=True)


def _fit(cfg: DictConfig, run_dir: Path, splits, callbacks: list) -> dict[str, Any]:
    import lightning as L
    from lightning.pytorch.plugins.environments import SLURMEnvironment

    from ftx import objectives
    from ftx.data.sampling import EpochSampler
    from ftx.evaluation import before_after, figures
    from ftx.faults import Preemption, ResumeState, check_resumable, fingerprint, resume_path
    from ftx.memory import PeakMemory, device_of
    from ftx.models import count_parameters, load_model, load_tokenizer, resolve_base, save_artefact
    from ftx.objectives.meter import RunMeter
    from ftx.tracking import finish_logger, make_logger, start_logger

    base = resolve_base(cfg)
    tokenizer = load_tokenizer(cfg, base)
    # Seeded after the base exists: building ftx's own base (the first run only)
    # draws from the same generators, and the fine-tune must not depend on whether
    # the base was cached (it did: task score 0.60 on the first run, 0.69 after).
    L.seed_everything(cfg.seed, workers=True, verbose=False)

    objective = objectives.load(cfg.objective.name)
    # Tokenized (or read from the cache) before the weights load: a template that
    # cannot be rendered stops the run here.
    train_loader, eval_loader = objective.loaders(cfg, tokenizer, splits)
    train_stats = _chosen_side(train_loader.dataset.stats)
    if train_stats.truncated:
        log.warning(
            "%d of %d training examples are longer than data.max_length=%d (longest %d) and were truncated",
            train_stats.truncated,
            train_stats.examples,
            cfg.data.max_length,
            train_stats.longest,
        )
    if train_stats.untrained:
        more = train_stats.untrained - len(train_stats.untrained_at)
        log.warning(
            "%d training example(s) have no trained token left after truncation to data.max_length=%d: %s%s",
            train_stats.untrained,
            cfg.data.max_length,
            ", ".join(train_stats.untrained_at),
            f" and {more} more" if more > 0 else "",
        )

    checkpoint_dir = run_dir / "checkpoints"
    resume = resume_path(cfg.trainer.resume, checkpoint_dir, run_dir)
    if resume:
        check_resumable(resume, cfg, strict=cfg.trainer.resume == "auto")
        log.info("resuming from %s", resume)

    import peft  # noqa: F401  (its import, ~70 MB on CPU, is library code: keep it out of the peak)

    # The logger's own process state (a W&B run's threads and buffers) is the
    # framework's, like imports: started before the baseline, out of the peak.
    logger = start_logger(make_logger(cfg, run_dir))
    memory = PeakMemory(device_of(cfg.trainer.accelerator))
    memory.start()  # baseline before weights: the peak counts the model's own memory
    predicted, calibration = _predict(cfg, base, train_loader.dataset, memory, objective.HEAD, tokenizer.pad_token_id)
    model = load_model(cfg, base, memory.device, head=objective.HEAD, pad_token_id=tokenizer.pad_token_id)
    params = count_parameters(model)
    log.info(
        "parameters: %d total, %d trainable (%.2f%%)",
        params["total"],
        params["trainable"],
        100 * params["trainable"] / params["total"],
    )

    # Only rank 0 evaluates, saves and records; the other ranks of a DDP run train.
    rank_zero = is_rank_zero()
    before = objective.evaluate(cfg, model, tokenizer, splits) if rank_zero else {}
    log.info("base: %s", figures(before))
    memory.release()  # what scoring freed is not kept under training's peak

    module = objective.Module(model, cfg)
    meter = RunMeter(memory)
    requeue = cfg.trainer.slurm_requeue and SLURMEnvironment.detect()
    preemption = Preemption(checkpoint_dir, handle_sigusr1=not requeue)
    sampler = train_loader.sampler if isinstance(train_loader.sampler, EpochSampler) else None
    trainer = L.Trainer(
        accelerator=cfg.trainer.accelerator,
        devices=cfg.trainer.devices,
        num_nodes=cfg.trainer.num_nodes,
        strategy=_strategy(cfg, model),
        # In a SLURM job Lightning would requeue on SIGUSR1 by default: only when asked.
        plugins=[SLURMEnvironment(auto_requeue=cfg.trainer.slurm_requeue)] if SLURMEnvironment.detect() else None,
        use_distributed_sampler=False,  # ftx's EpochSampler shards and resumes the order itself
        precision=cfg.trainer.precision,
        max_steps=cfg.trainer.max_steps,
        max_epochs=cfg.trainer.max_epochs,
        accumulate_grad_batches=cfg.trainer.accumulate_grad_batches,
        gradient_clip_val=cfg.trainer.gradient_clip_val or None,
        val_check_interval=min(cfg.trainer.val_check_interval, len(train_loader)),
        check_val_every_n_epoch=None if cfg.trainer.val_check_interval < len(train_loader) else 1,
        limit_val_batches=cfg.trainer.limit_val_batches,
        num_sanity_val_steps=0,
        log_every_n_steps=cfg.trainer.log_every_n_steps,
        enable_progress_bar=_progress_bar(cfg.trainer.progress_bar),
        enable_model_summary=False,
        deterministic=cfg.trainer.deterministic,
        logger=logger,
        callbacks=[
            meter,
            ResumeState(sampler, cfg.trainer.batch_size, fingerprint(cfg)),
            preemption,
            *_checkpointing(cfg, checkpoint_dir),
            *callbacks,
        ],
        enable_checkpointing=cfg.trainer.save_checkpoints,
        default_root_dir=run_dir,
    )
    started = time.perf_counter()
    try:
        trainer.fit(module, train_loader, eval_loader, ckpt_path=resume, weights_only=True)
    except BaseException as error:
        explained = _explained(error, trainer, preemption, memory, predicted)
        if explained is error:
            raise
        raise explained from error
    train_s = time.perf_counter() - started
    if not rank_zero:
        return {}

    after = objective.evaluate(cfg, model, tokenizer, splits)
    log.info("fine-tuned: %s", figures(after))
    artefact = save_artefact(model, tokenizer, run_dir, adapter=cfg.method.adapter is not None)

    quality = before_after(before, after)
    result = {
        "params": params | {"trainable_share": params["trainable"] / params["total"]},
        "quality": quality,
        "memory": memory.peak() | _predicted_record(predicted, calibration),
        "throughput": {"tokens_per_s": meter.tokens_per_s, "tokens": meter.tokens},
        "time": {"train_s": train_s},
        "train": {
            "steps": trainer.global_step,
            "final_loss": float(trainer.callback_metrics.get("train.loss", math.nan)),
            "resumed_from": resume,
            "skipped_steps": module.skipped_steps,
        },
        "data": {"format": splits.format, "skipped": splits.skipped, "packing": cfg.data.packing}
        | {k: v for k, v in asdict(train_stats).items() if k not in ("over_length", "untrained_at", "refused")}
        | {"refused": len(train_stats.refused)},  # rows the chat template refused, skipped (data.on_error=skip)
        "base_model": base,
        "artefact": str(artefact.relative_to(run_dir)),
        "artefact_bytes": sum(f.stat().st_size for f in artefact.rglob("*") if f.is_file()),
    }
    finish_logger(logger, result, artefact if cfg.logger.log_artifact else None)
    return result


def _predict(cfg: DictConfig, base: str, dataset, memory, head: str, pad_token_id: int):
    """(the planner's prediction, the calibration that measured its runtime overhead).
    The prediction is None for an architecture the planner cannot read, unless a
    budget needs it; the calibration None where it does not apply (ftx.calibration).
    Raises OverBudget when over ``plan.budget_gb``, before the run's weights load."""
    from ftx import calibration
    from ftx.data.tokenized import most_trained
    from ftx.memory.plan import fits_budget

    lengths, trained = _sequence_lengths(dataset), most_trained(dataset.rows)
    try:
        fits, predicted = fits_budget(cfg, base, lengths, trained=trained)
    except (AttributeError, KeyError, TypeError, ValueError) as error:
        if cfg.plan.budget_gb is not None:
            raise
        log.warning("no memory prediction for this model (%s: %s)", type(error).__name__, error)
        return None, None
    measured = None
    if fits and calibration.applies(cfg, memory, head):  # the tensors alone may not fit: nothing to measure
        measured = calibration.calibrate(cfg, base, dataset.rows, pad_token_id, memory, trained)
        fits, predicted = fits_budget(cfg, base, lengths, measured.as_overhead(), trained)
    log.info("predicted peak memory %.1f MiB (%s)", predicted.peak_bytes / 2**20, predicted.peak_phase)
    if not fits:
        raise OverBudget(predicted)
    return predicted, measured


def _predicted_record(predicted, calibration=None) -> dict[str, Any]:
    if predicted is None:
        return {"predicted_bytes": None}
    return {
        "predicted_bytes": predicted.peak_bytes,
        "predicted": {item.key: item.at_peak for item in predicted.items},
    } | ({"calibration": calibration.record()} if calibration is not None else {})


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


def is_rank_zero() -> bool:
    """True outside distributed runs and in their rank 0 (RANK, LOCAL_RANK or SLURM_PROCID)."""
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    return getattr(rank_zero_only, "rank", 0) == 0


def _explained(error: BaseException, trainer, preemption, memory, predicted) -> BaseException:
    """The error a failed fit reports: preemption (with its checkpoint) and
    out-of-memory (beside the planner's estimate) get their own message."""
    from ftx.faults import OutOfMemory, Preempted, is_out_of_memory

    if preemption.saved is not None:
        return Preempted(
            f"{preemption.signal} at step {trainer.global_step}: saved {preemption.saved}; "
            "run the same command (same run directory) to resume",
            preemption.signal,
            str(preemption.saved),
        )
    if is_out_of_memory(error):
        peak = memory.peak()
        estimate = predicted.peak_bytes if predicted is not None else None
        said = f"; the planner predicted {estimate / 2**30:.2f} GiB for this run" if estimate else ""
        oom = OutOfMemory(
            f"out of memory on {peak['device']} at step {trainer.global_step} (peak {peak['peak_bytes'] / 2**30:.2f} "
            f"GiB so far{said}). Lower trainer.batch_size or data.max_length, set "
            "model.gradient_checkpointing=true, or use method=qlora; ftx plan shows what fits."
        )
        oom.record = {"memory": peak | {"predicted_bytes": estimate}}
        return oom
    return error


def _sequence_lengths(dataset) -> list[int]:
    """Token lengths of the training sequences (both sides of preference pairs).
    The planner models an SFT step; for pairs (2B sequences a step, and DPO's
    reference pass) its prediction is a lower bound."""
    from ftx.data.tokenized import training_sequences

    return [len(sequence["input_ids"]) for sequence in training_sequences(dataset.rows)]


def _chosen_side(stats):
    """Data statistics of a split; of its chosen responses for preference pairs."""
    return stats["chosen"] if isinstance(stats, dict) else stats


def _progress_bar(setting: bool | None) -> bool:
    """null: a bar in a terminal, nothing in CI logs."""
    return sys.stderr.isatty() if setting is None else setting


def _summary(record: dict[str, Any]) -> str:
    quality = record.get("quality", {})
    return ", ".join(f"{k}={v:.4g}" for k, v in quality.items())
