"""The runtime overhead of a CPU run, measured by the run before its weights load.

On CUDA the measured peak is torch's own count of tensor bytes
(``max_memory_allocated``), which the planner predicts term by term. On CPU it is
resident memory, which holds more than tensors: the runtime's first-use memory
(OpenMP and oneDNN thread pools and scratch, kernels' code and caches, modules
imported on first use) and what glibc malloc keeps of freed blocks under its mmap
threshold, which grows with the sizes the run allocates (batch, length, width).
None of it is the same on two machines, or for two shapes on one, so no constant
stands for it (a fixed 60 MiB read +62% on one machine, and -33% for the default
run on another).

Each run measures it instead. After its baseline, it trains copies of its own base
cut to 1 and then 2 decoder layers, with the run's method, quantization, precision
and optimizer, six steps each on batches of its own data from the shortest to the
longest (LENGTHS), and takes for each what resident memory rose above the baseline
minus the planner's tensor terms for that copy: ``overhead(d) = a + b·d``. ``a`` is
what any step of this run costs besides tensors, ``b`` what one more layer adds
(malloc's retention grows with the blocks a layer allocates); extrapolated to the
base's depth it is the prediction's overhead term. As the planner's tensor terms are
linear in depth, the resulting prediction is the straight line through the two
measured peaks (3·peak(2) − 2·peak(1) for 4 layers): the planner's terms give the
breakdown, the measurement the total. The step is the next-token loss, the one the
planner models, whatever the objective: the overhead is of the kernels, not of the
objective's own tensors.

Costs: loading two shallow copies and twelve steps of at most two layers, before
the run loads its weights (about 4 s on the default model, 2 cores). Skipped on CUDA,
when ``plan.cpu_overhead_mb`` is set (an override), for reward heads (the planner
models a language model's step) and in multi-process runs.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import time
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig

from ftx.memory import PeakMemory
from ftx.memory.plan import Overhead, tensor_bytes

log = logging.getLogger(__name__)

DEPTHS = (1, 2)
LENGTHS = (1.0, 0.0, 0.5, 0.75, 0.25, 1.0)
"""One optimizer step per entry, on a batch of sequences at that quantile of the
training lengths (1.0: the longest, the batch the planner plans for). malloc's
retention grows with the variety of sizes a run allocates, which a real run meets
over hundreds of steps; the spread meets it in six, and the longest batch last
shows the peak on top of it. A run of fewer steps calibrates on as many (a 2-step
run meets two sizes, not six: measured +16% over its peak with all six)."""


@dataclass
class Calibration:
    overhead_bytes: int
    """Extrapolated to the base's depth: the prediction's overhead term."""
    fixed_bytes: int
    """a: the overhead of a step of this run at any depth."""
    per_layer_bytes: int
    """b: what one decoder layer adds beyond its tensors (0 when not measurable)."""
    measured: dict[int, int]
    """depth -> resident peak above the baseline, bytes."""
    planned: dict[int, int]
    """depth -> the planner's tensor terms for that copy, bytes."""
    seq_len: int
    """Length of the longest batch (the planned one), tokens."""
    trained_tokens: int | None
    """The most trained tokens of one sequence (what the chunked head computes logits for)."""
    seconds: float

    def as_overhead(self) -> Overhead:
        return Overhead(
            self.overhead_bytes,
            f"measured: {self.fixed_bytes / 2**20:.1f} MiB + {self.per_layer_bytes / 2**20:.1f} MiB/layer "
            "(calibration on 1 and 2 layers)",
        )

    def record(self) -> dict[str, Any]:
        return {
            "overhead_bytes": self.overhead_bytes,
            "fixed_bytes": self.fixed_bytes,
            "per_layer_bytes": self.per_layer_bytes,
            "measured_bytes": {str(d): v for d, v in self.measured.items()},
            "planned_bytes": {str(d): v for d, v in self.planned.items()},
            "seq_len": self.seq_len,
            "trained_tokens": self.trained_tokens,
            "seconds": self.seconds,
        }


def applies(cfg: DictConfig, memory: PeakMemory, head: str) -> bool:
    """Whether this run measures its overhead (else the configured one is used)."""
    single = cfg.trainer.devices in (1, "1") and cfg.trainer.num_nodes == 1
    return memory.device == "cpu" and cfg.plan.cpu_overhead_mb is None and head == "causal_lm" and single


def calibrate(
    cfg: DictConfig, base: str, dataset, pad_token_id: int, memory: PeakMemory, trained: int | None
) -> Calibration:
    """Measure the overhead (see the module's docstring); ``dataset`` is the training
    set (a tokenized split or a pair split: its ``sequences()``), ``trained`` the most
    trained tokens of one (ftx.data.tokenized.most_trained), ``memory`` the run's
    started peak (its baseline is kept, its high-water mark restarted after)."""
    from ftx.memory.plan import transformers_config
    from ftx.models import truncated_config

    started = time.perf_counter()
    batches, seq = calibration_batches(cfg, dataset, pad_token_id)
    depth = transformers_config(cfg, base).num_hidden_layers
    measured, planned = {}, {}
    for layers in (d for d in DEPTHS if d <= depth):
        config = truncated_config(cfg, base, layers)
        memory.restart()
        with _random_state_kept():  # the run's seeded weights and batches do not depend on this
            _train_steps(cfg, base, config, batches)
        measured[layers] = int(memory.peak()["peak_bytes"])
        planned[layers] = tensor_bytes(cfg, config, seq, trained)
    memory.restart()
    residual = {d: measured[d] - planned[d] for d in measured}
    per_layer = max(0, residual[2] - residual[1]) if 2 in residual else 0
    fixed = max(0, residual[1] - per_layer)
    result = Calibration(
        overhead_bytes=fixed + per_layer * depth,
        fixed_bytes=fixed,
        per_layer_bytes=per_layer,
        measured=measured,
        planned=planned,
        seq_len=seq,
        trained_tokens=trained,
        seconds=time.perf_counter() - started,
    )
    log.info(
        "runtime overhead on cpu: %.1f MiB + %.1f MiB/layer (measured on 1 and 2 layers in %.1f s)",
        fixed / 2**20,
        per_layer / 2**20,
        result.seconds,
    )
    return result


def calibration_batches(cfg: DictConfig, dataset, pad_token_id: int) -> tuple[list[dict], int]:
    """The batches of LENGTHS (each repeated for gradient accumulation), and the
    longest length. Sequences are the training rows (either side of a preference
    pair; a prompt row trains on itself), ``trainer.batch_size`` of them, collated as
    training collates them."""
    from ftx.data.tokenized import Collator
    from ftx.memory.plan import training_steps

    sequences = [s if "labels" in s else {**s, "labels": s["input_ids"]} for s in dataset.sequences()]
    ordered = sorted(sequences, key=lambda s: len(s["input_ids"]))
    size = min(cfg.trainer.batch_size, len(ordered))
    collate = Collator(pad_token_id, packed=cfg.data.packing)
    batches = []
    for quantile in LENGTHS[: max(1, int(training_steps(cfg.trainer, len(dataset))))]:
        end = size + round(quantile * (len(ordered) - size))  # the batch_size sequences up to that quantile
        batches += [collate(ordered[end - size : end])] * cfg.trainer.accumulate_grad_batches
    return batches, len(ordered[-1]["input_ids"])


def _train_steps(cfg: DictConfig, base: str, config, batches: list[dict]) -> None:
    """Optimizer steps on ``batches`` of the base built from ``config`` (cut to fewer
    layers), as the run will train."""
    import lightning as L
    from torch.utils.data import DataLoader

    from ftx.models import load_model
    from ftx.objectives import sft

    with _quiet():
        # cut to fewer layers on purpose: transformers' report of the unused ones is not news
        model = load_model(cfg, base, "cpu", config=config)
        module = sft.Module(model, cfg)
        trainer = L.Trainer(
            accelerator="cpu",
            devices=1,
            precision=cfg.trainer.precision,
            max_steps=len(batches) // cfg.trainer.accumulate_grad_batches,
            accumulate_grad_batches=cfg.trainer.accumulate_grad_batches,
            gradient_clip_val=cfg.trainer.gradient_clip_val or None,
            limit_val_batches=0,
            num_sanity_val_steps=0,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        trainer.fit(module, DataLoader(batches, batch_size=None))  # batch_size=None: as collated
    del trainer, module, model
    gc.collect()


@contextlib.contextmanager
def _random_state_kept():
    """Python's, NumPy's and torch's random state as they were (Lightning seeds all three)."""
    import random

    import numpy as np
    import torch

    python, numpy = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        yield
    random.setstate(python)
    np.random.set_state(numpy)


@contextlib.contextmanager
def _quiet():
    """Lightning's start-up lines and warnings belong to the run's own Trainer, not
    this one (which has no validation loop on purpose)."""
    import warnings

    # transformers.modeling_utils above WARNING turns on its tensor-parallel check, whose
    # warning (layers "not sharded", on a CPU without tensor parallelism) is silenced too
    names = ("lightning.pytorch", "lightning.fabric", "transformers.modeling_utils", "transformers.distributed")
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="You defined a `validation_step` but have no `val_dataloader`")
            # said once, by the run's own Trainer, where srun is installed (a SLURM login node)
            warnings.filterwarnings("ignore", message="The `srun` command is available on your system")
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def predict_run(cfg: DictConfig, base: str, dataset, memory: PeakMemory, head: str, pad_token_id: int):
    """(the planner's prediction for this run's training set, the calibration that
    measured its runtime overhead). The prediction is None for an architecture the
    planner cannot read, unless a budget needs it; the calibration None where it does
    not apply (:func:`applies`). Raises OverBudget when over ``plan.budget_gb``,
    before the run's weights load."""
    from ftx.data.tokenized import most_trained
    from ftx.memory.plan import OverBudget, fits_budget

    sequences = dataset.sequences()
    # Pairs train 2B sequences a step (and DPO adds a reference pass): the planner
    # models an SFT step over these lengths, a lower bound for them.
    lengths, trained = [len(s["input_ids"]) for s in sequences], most_trained(sequences)
    try:
        fits, predicted = fits_budget(cfg, base, lengths, trained=trained)
    except (AttributeError, KeyError, TypeError, ValueError) as error:
        if cfg.plan.budget_gb is not None:
            raise
        log.warning("no memory prediction for this model (%s: %s)", type(error).__name__, error)
        return None, None
    measured = None
    if fits and applies(cfg, memory, head):  # the tensors alone may not fit: nothing to measure
        measured = calibrate(cfg, base, dataset, pad_token_id, memory, trained)
        fits, predicted = fits_budget(cfg, base, lengths, measured.as_overhead(), trained)
    log.info("predicted peak memory %.1f MiB (%s)", predicted.peak_bytes / 2**20, predicted.peak_phase)
    if not fits:
        raise OverBudget(predicted)
    return predicted, measured
