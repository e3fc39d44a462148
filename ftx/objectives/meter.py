"""A Lightning callback that measures what every objective's run records: tokens
per second of the training steps (validation excluded) and peak memory, logged at
the logging interval and read at the end."""

from __future__ import annotations

import time
from typing import Any

import lightning as L

from ftx.memory import PeakMemory


class RunMeter(L.Callback):
    def __init__(self, memory: PeakMemory) -> None:
        self.memory = memory
        self.tokens = 0
        self.step_seconds = 0.0
        self._started = 0.0

    def on_train_batch_start(self, trainer: L.Trainer, module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        self._started = time.perf_counter()

    def on_train_batch_end(
        self, trainer: L.Trainer, module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.step_seconds += time.perf_counter() - self._started
        mask = batch.get("attention_mask")  # absent in packed (padding-free) batches: no pad tokens
        self.tokens += int(mask.sum()) if mask is not None else batch["input_ids"].numel()
        if trainer.global_step % trainer.log_every_n_steps == 0:
            peak = self.memory.peak()
            module.log("memory.peak_bytes", float(peak["peak_bytes"]))
            if "reserved_bytes" in peak:  # CUDA: what the caching allocator holds
                module.log("memory.reserved_bytes", float(peak["reserved_bytes"]))
            module.log("throughput.tokens_per_s", self.tokens_per_s)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.step_seconds if self.step_seconds else 0.0
