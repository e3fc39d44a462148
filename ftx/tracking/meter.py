"""A Lightning callback that measures what every objective's run records: training
throughput and peak memory, logged at the logging interval and read at the end.

Throughput is steady-state wall-clock: trained tokens of every batch after the first,
over the time from the end of the first batch to the end of the last, validation
excluded. Data loading, hooks and optimizer steps count (they are part of training);
the first batch (allocations, lazy initialisation) does not. The same definition
serves ``scripts/bench_throughput.py``'s TRL and plain-loop runs, so the figures compare.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

import lightning as L

if TYPE_CHECKING:  # the run's own PeakMemory is handed in: tracking does not import memory
    from ftx.memory import PeakMemory

_progress = logging.getLogger("ftx.progress")


class RunMeter(L.Callback):
    def __init__(self, memory: PeakMemory) -> None:
        self.memory = memory
        self.tokens = 0  # all trained tokens, first batch included
        self.clock = StepClock()
        self._validation_started: float | None = None

    def on_train_batch_start(self, trainer: L.Trainer, module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        self.clock.start()

    def on_train_batch_end(
        self, trainer: L.Trainer, module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        mask = batch.get("attention_mask")  # absent in packed (padding-free) batches: no pad tokens
        tokens = int(mask.sum()) if mask is not None else batch["input_ids"].numel()
        self.tokens += tokens
        self.clock.step(tokens)
        if trainer.global_step % trainer.log_every_n_steps == 0:
            peak = self.memory.peak()
            module.log("memory.peak_bytes", float(peak["peak_bytes"]))
            if "reserved_bytes" in peak:  # CUDA: what the caching allocator holds
                module.log("memory.reserved_bytes", float(peak["reserved_bytes"]))
            module.log("throughput.tokens_per_s", self.tokens_per_s)

    def on_validation_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._validation_started = time.perf_counter()

    def on_validation_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if self._validation_started is not None:
            self.clock.pause(time.perf_counter() - self._validation_started)
            self._validation_started = None

    @property
    def tokens_per_s(self) -> float:
        return self.clock.tokens_per_s


class StepClock:
    """Steady-state tokens/s from step boundaries: ``start()`` before a step (only the
    first one matters), ``step(tokens)`` after each, ``pause(seconds)`` for time that
    is not training (validation). With a single step, that step's own rate."""

    def __init__(self) -> None:
        self.tokens = 0
        self.seconds = 0.0
        self._first: tuple[int, float] | None = None
        self._started: float | None = None
        self._last: float | None = None
        self._paused = 0.0

    def start(self) -> None:
        if self._started is None:
            self._started = time.perf_counter()

    def pause(self, seconds: float) -> None:
        self._paused += seconds

    def step(self, tokens: int) -> None:
        now = time.perf_counter()
        if self._last is None:
            self._first = (tokens, now - (now if self._started is None else self._started))
        else:
            self.tokens += tokens
            self.seconds += now - self._last - self._paused
        self._last, self._paused = now, 0.0

    @property
    def tokens_per_s(self) -> float:
        if self.seconds > 0:
            return self.tokens / self.seconds
        if self._first and self._first[1] > 0:
            return self._first[0] / self._first[1]
        return 0.0


class ProgressLog(L.Callback):
    """Progress without a progress bar (stdout not a terminal: CI, a SLURM log,
    ``nohup``): a line every ``every`` optimizer steps and at the last, from
    :func:`ftx.console.progress_line`."""

    def __init__(self, every: int, meter: RunMeter) -> None:
        self.every, self.meter = every, meter
        self.started, self.first_step, self.logged = 0.0, 0, -1

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self.started, self.first_step = time.perf_counter(), trainer.global_step

    def on_train_batch_end(
        self, trainer: L.Trainer, module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        from ftx.console import progress_line

        step = trainer.global_step  # counts optimizer steps: the same for every micro-batch of one
        if step != self.logged and (step % self.every == 0 or step == trainer.max_steps):
            self.logged = step
            _progress.info(progress_line(trainer, self.meter, self.started, self.first_step))
