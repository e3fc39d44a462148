"""Fault injection for tests: ``python tests/fault_run.py SIGNAL STEP OVERRIDES...``
runs ``ftx train`` with OVERRIDES (composed as the CLI composes them) and sends
itself SIGNAL (KILL, TERM, USR1) when the run reaches optimizer step STEP."""

from __future__ import annotations

import os
import signal
import sys

import lightning as L

from ftx.config import compose_config
from ftx.train import train


class SendAt(L.Callback):
    def __init__(self, step: int, signum: int) -> None:
        self.step, self.signum = step, signum

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.signum)


if __name__ == "__main__":
    name, step, *overrides = sys.argv[1:]
    train(compose_config(overrides), callbacks=[SendAt(int(step), getattr(signal, f"SIG{name}"))])
