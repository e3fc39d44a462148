"""The pipeline for one run: check → data → base → plan → model → score base →
fit → score result → save → record. Returns the run record (metrics.json's content).

Everything that can be wrong with the config or the data is found before the
model loads. Whatever happens after the run directory exists, metrics.json says
how it ended: ``completed``, ``pruned`` (predicted over ``plan.budget_gb``: no
weights were loaded) or ``failed`` with the error.
"""

from __future__ import annotations

import logging
import traceback
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ftx.config import validate
from ftx.data import load_splits, require_kind
from ftx.memory.plan import OverBudget
from ftx.objectives import OBJECTIVES
from ftx.tracking import close_failed_run, run_record, write_metrics

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
    from ftx.console import route_libraries
    from ftx.trainer import is_rank_zero

    route_libraries()
    run_dir = Path(cfg.paths.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_run_config(cfg, run_dir)
    record = run_record(cfg)
    try:
        record.update(_run(cfg, run_dir, callbacks or []))
        record["status"] = "completed"
    except OverBudget as over:
        record.update(status="pruned", reason=str(over), memory={"predicted_bytes": over.plan.peak_bytes})
        log.warning("run %s pruned: %s", run_dir, over)
        close_failed_run("pruned")
        return record
    except RunPruned as pruned:
        record.update(status="pruned", reason=str(pruned), train={"steps": pruned.step})
        if pruned.peak_bytes is not None:
            record["memory"] = {"peak_bytes": int(pruned.peak_bytes)}
        close_failed_run("pruned")
    except BaseException as error:
        from ftx.faults import Preempted

        # stopped: on a signal, with a checkpoint the same command resumes from
        record["status"] = "stopped" if isinstance(error, Preempted) else "failed"
        record["error"] = f"{type(error).__name__}: {error}"
        record.update(getattr(error, "record", {}))  # what a failure measured (memory at an OOM)
        record["traceback"] = traceback.format_exc(limit=8)
        close_failed_run(record["status"])
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
    from ftx.trainer import is_rank_zero

    saved = run_dir / ".hydra" / "config.yaml"
    if not saved.is_file() and is_rank_zero():
        saved.parent.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(cfg, saved, resolve=True)


def _run(cfg: DictConfig, run_dir: Path, callbacks: list) -> dict[str, Any]:
    """The stages, in order; what the record adds (empty on ranks other than 0)."""
    import lightning as L

    from ftx.calibration import predict_run
    from ftx.console import run_line
    from ftx.data.tokenized import warn_truncation
    from ftx.evaluation import before_after
    from ftx.faults import find_resume
    from ftx.models import load_model, load_tokenizer, resolve_base, save_artefact
    from ftx.tracking import artefact_record, finish_logger, result_record
    from ftx.trainer import fit, is_rank_zero

    validate(cfg)  # check
    splits = load_splits(cfg)  # data
    require_kind(splits, OBJECTIVES.fact(cfg.objective.name, "KIND"), cfg.objective.name, cfg.data.train_file)
    objective = OBJECTIVES.load(cfg.objective.name)
    base = resolve_base(cfg)  # base (built the first time for ftx's own)
    tokenizer = load_tokenizer(cfg, base)
    # Seeded after the base exists: building ftx's own base (the first run only)
    # draws from the same generators, and the fine-tune must not depend on whether
    # the base was cached (it did: task score 0.60 on the first run, 0.69 after).
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    # Tokenized (or read from the cache) before the weights load: a template that
    # cannot be rendered stops the run here.
    loaders = objective.loaders(cfg, tokenizer, splits)
    stats = loaders[0].dataset.summary()
    log.info(run_line(cfg, stats))
    warn_truncation(stats, cfg.data.max_length)
    resume = find_resume(cfg, run_dir)

    logger, memory = _start_measuring(cfg, run_dir)
    head, pad = objective.HEAD, tokenizer.pad_token_id
    predicted, calibration = predict_run(cfg, base, loaders[0].dataset, memory, head, pad)  # plan
    model = load_model(cfg, base, memory.device, head=head, pad_token_id=pad)  # model
    params = _parameters(model)
    rank_zero = is_rank_zero()  # only rank 0 scores, saves and records; the other ranks of DDP train
    before = _score("base", objective, cfg, model, tokenizer, splits) if rank_zero else {}  # score base
    memory.release()  # what scoring freed is not kept under training's peak
    module = objective.Module(model, cfg)
    fitted = fit(cfg, module, loaders, run_dir, memory, predicted, resume, logger, callbacks)  # fit
    if not rank_zero:
        return {}
    after = _score("fine-tuned", objective, cfg, model, tokenizer, splits)  # score
    artefact = save_artefact(model, tokenizer, run_dir, adapter=cfg.method.adapter is not None)  # save
    result = result_record(  # record
        cfg,
        params=params,
        quality=before_after(before, after),
        memory=memory,
        predicted=predicted,
        calibration=calibration,
        fitted=fitted,
        module=module,
        resume=resume,
        splits=splits,
        stats=stats,
        base=base,
    ) | artefact_record(artefact, run_dir)
    finish_logger(logger, cfg, result, artefact if cfg.logger.log_artifact else None)
    return result


def _start_measuring(cfg: DictConfig, run_dir: Path):
    """(the run's logger, its PeakMemory started): what the framework itself holds in
    the process (peft's import, ~70 MB on CPU; a W&B run's threads and buffers) is
    there before the baseline, so the peak counts the run's own memory."""
    import peft  # noqa: F401

    from ftx.memory import PeakMemory, device_of
    from ftx.tracking import start_logger
    from ftx.tracking.loggers import make_logger

    logger = start_logger(cfg, make_logger(cfg, run_dir))
    memory = PeakMemory(device_of(cfg.trainer.accelerator), cfg.trainer.cpu_mmap_threshold_mb)
    memory.start()  # baseline before weights: the peak counts the model's own memory
    return logger, memory


def _parameters(model) -> dict[str, int]:
    from ftx.models import count_parameters

    params = count_parameters(model)
    log.info(
        "parameters: %s total, %s trainable (%.2f%%)",
        f"{params['total']:,}",
        f"{params['trainable']:,}",
        100 * params["trainable"] / params["total"],
    )
    return params


def _score(which: str, objective, cfg: DictConfig, model, tokenizer, splits) -> dict[str, Any]:
    """The objective's quality figures of ``model`` now, logged as ``which``."""
    from ftx.console import figures_line
    from ftx.evaluation import figures

    scores = objective.evaluate(cfg, model, tokenizer, splits)
    log.info("%s: %s", which, figures_line(figures(scores)))
    return scores


def _summary(record: dict[str, Any]) -> str:
    quality = record.get("quality", {})
    return ", ".join(f"{k}={v:.4g}" for k, v in quality.items())
