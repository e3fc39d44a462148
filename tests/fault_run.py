"""Fault injection for tests: ``python tests/fault_run.py SIGNAL STEP OVERRIDES...``
runs ``ftx train`` with OVERRIDES (composed as the CLI composes them) and sends
itself SIGNAL (KILL, TERM, USR1) when the run reaches optimizer step STEP, or
(STEP = end-of-epoch-N) at the end of epoch N."""

from __future__ import annotations

import os
import signal
import sys

import lightning as L

from ftx.config import compose_config
from ftx.train import train


class SendAt(L.Callback):
    def __init__(self, step: str, signum: int) -> None:
        # STEP, or end-of-epoch-N: after epoch N's last batch, once Lightning's own
        # check after each batch has passed (its epoch-end check acts on it)
        self.epoch_end = int(step.removeprefix("end-of-epoch-")) if step.startswith("end-of-epoch-") else None
        self.step, self.signum = (None if self.epoch_end is not None else int(step)), signum

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.signum)

    def on_train_epoch_end(self, trainer, module) -> None:
        if trainer.current_epoch == self.epoch_end:
            os.kill(os.getpid(), self.signum)


if __name__ == "__main__":
    name, step, *overrides = sys.argv[1:]
    train(compose_config(overrides), callbacks=[SendAt(step, getattr(signal, f"SIG{name}"))])
