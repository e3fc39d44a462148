"""Fault tolerance of a run: exact resume, checkpoints on preemption, and clear ends
for non-finite losses and out-of-memory.

Exact resume: a Lightning checkpoint holds the weights (trainable ones only under
an adapter), optimizer and LR-scheduler state and the loop counters;
:class:`ResumeState` adds what it lacks for the resumed run to be the
uninterrupted one, bit for bit: where the epoch's batch order stood (the
:class:`~ftx.data.sampling.EpochSampler` skips what was trained) and the random
number generators (dropout masks). A run restarted with the same run directory
(``trainer.resume=auto``) continues from ``checkpoints/last.ckpt``.

Preemption: SIGTERM (Lightning stops at the next batch boundary) and SIGUSR1 save
``checkpoints/last.ckpt`` before the run exits, so the same command resumes it.
Under SLURM with ``trainer.slurm_requeue=true`` Lightning's own handler takes
SIGUSR1 instead: it saves a checkpoint and requeues the job.

A sweep is stopped the same way (:func:`stop_on_signals`): SIGTERM, SIGINT or
SIGUSR1 to the sweep's process sets :data:`STOP` and writes a stop file in the
sweep directory; every trial of the sweep, in that process or in a worker or a
SLURM job of its own (the stop file is how they hear of it), checks both at each
batch and stops there as on its own signal, saving its checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from ftx.data.sampling import EpochSampler

log = logging.getLogger(__name__)

LAST = "last.ckpt"


class Preempted(RuntimeError):
    """The run stopped on a signal after saving a checkpoint to resume from."""

    def __init__(self, message: str, signal_name: str = "SIGTERM", checkpoint: str | None = None) -> None:
        super().__init__(message)
        self.signal_name, self.checkpoint = signal_name, checkpoint

    def __reduce__(self):  # a joblib worker or a SLURM job sends it back pickled
        return (Preempted, (str(self), self.signal_name, self.checkpoint))


STOP_SIGNALS = ("SIGTERM", "SIGINT", "SIGUSR1")


class StopRequest:
    """A request to stop this process's work at the next safe point: the name of the
    signal that asked, once one did; ``watch`` adds a stop file another process
    (a sweep's driver) writes."""

    def __init__(self) -> None:
        self.signal: str | None = None
        self.files: list[Path] = []
        self.writes: Path | None = None  # the stop file a sweep's driver writes for its trials
        self.depth = 0  # stop_on_signals blocks open: a request lasts as long as the outermost

    def request(self, name: str) -> None:
        """A signal asked this process to stop (no-op outside a stop_on_signals block)."""
        if self.depth == 0:
            return
        if self.signal is None:
            self.signal = name
            log.warning("%s: stopping at the next batch of each running trial; no new trial starts", name)
        if self.writes is not None and not self.writes.exists():
            self.writes.write_text(name)

    def requested(self) -> str | None:
        if self.signal is None:
            for path in self.files:
                if path.is_file():
                    self.signal = path.read_text().strip() or "SIGTERM"
                    break
        return self.signal


STOP = StopRequest()


@contextlib.contextmanager
def stop_on_signals(stop_file: Path | None = None, write: bool = False) -> Iterator[StopRequest]:
    """While the block runs, SIGTERM, SIGINT and SIGUSR1 request a stop (:data:`STOP`)
    instead of ending the process; ``write``: the signal is also written to
    ``stop_file`` for the processes that watch it (a sweep's trials), else the
    block watches ``stop_file``. Handlers are installed from the main thread only
    (Python's rule); nested blocks keep the outer handlers' effect."""
    previous: dict[int, Any] = {}
    if STOP.depth == 0:
        STOP.signal = None  # a process (a reused joblib worker) may serve several sweeps
    STOP.depth += 1
    writes = STOP.writes
    if stop_file is not None and write:
        STOP.writes = stop_file
    elif stop_file is not None:
        STOP.files.append(stop_file)

    def note(signum: int, frame: Any) -> None:
        STOP.request(signal.Signals(signum).name)

    if threading.current_thread() is threading.main_thread():
        for name in STOP_SIGNALS:
            if hasattr(signal, name):
                signum = getattr(signal, name)
                previous[signum] = signal.signal(signum, note)
    try:
        yield STOP
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if stop_file is not None and stop_file in STOP.files:
            STOP.files.remove(stop_file)
        STOP.writes = writes
        STOP.depth -= 1
        if STOP.depth == 0:
            STOP.signal = None


class OutOfMemory(RuntimeError):
    """Training ran out of device (or host) memory; the message sets the planner's
    estimate beside the measured peak, and ``record`` carries both to metrics.json."""

    record: dict[str, Any]


# What must not change between a run and its resumption: the model, the method, the
# data and the optimisation (trainer.max_steps too: the LR schedule spans it).
RESUME_KEYS = (
    "seed",
    "model",
    "method",
    "quant",
    "objective",
    "data",
    "optim",
    "trainer.batch_size",
    "trainer.accumulate_grad_batches",
    "trainer.precision",
    "trainer.max_steps",
    "trainer.max_epochs",
)


def fingerprint(cfg: DictConfig) -> dict[str, str]:
    """The settings a checkpoint was trained with, as dotted key -> JSON value."""
    from ftx.tracking import flatten

    values = {}
    for key in RESUME_KEYS:
        node = OmegaConf.select(cfg, key)  # resolved in place: interpolations reach the whole config
        values[key] = OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node
    return {key: json.dumps(value, sort_keys=True, default=str) for key, value in flatten(values).items()}


def check_resumable(path: str, cfg: DictConfig, strict: bool) -> None:
    """Before any weights load: a checkpoint trained with other settings is refused
    (``strict``, i.e. found by ``trainer.resume=auto``) or, named explicitly, warned
    about, listing what differs."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    saved = checkpoint.get("callbacks", {}).get(ResumeState.__qualname__, {}).get("fingerprint")
    if saved is None:
        return
    now = fingerprint(cfg)
    changed = [
        f"{k}: {saved.get(k, '(unset)')} -> {now.get(k, '(unset)')}"
        for k in sorted(set(saved) | set(now))
        if saved.get(k) != now.get(k)
    ]
    if not changed:
        return
    listed = "; ".join(changed[:8]) + (f"; … {len(changed) - 8} more" if len(changed) > 8 else "")
    if strict:
        from ftx.config import ConfigError

        raise ConfigError(
            f"{path} was trained with other settings ({listed}). Rerun with the settings it was trained with "
            "to resume it, or start over: trainer.resume=never, or another run directory."
        )
    log.warning("resuming %s with changed settings: %s", path, listed)


class ResumeState(L.Callback):
    def __init__(self, sampler: EpochSampler | None, batch_size: int, settings: dict[str, str]) -> None:
        self.sampler = sampler
        self.batch_size = batch_size
        self.settings = settings
        self._trainer: L.Trainer | None = None
        self._batches = 0  # batches trained in the current epoch
        self._resumed_epoch: int | None = None
        self._rng: dict[str, Any] | None = None

    def setup(self, trainer: L.Trainer, module: L.LightningModule, stage: str) -> None:
        self._trainer = trainer

    def state_dict(self) -> dict[str, Any]:
        epoch = self._trainer.current_epoch if self._trainer is not None else 0
        return {
            "epoch": epoch,
            "batches": self._batches,
            "batch_size": self.batch_size,
            "rng": rng_states(),
            "fingerprint": self.settings,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["batch_size"] != self.batch_size:
            raise ValueError(
                f"the checkpoint was trained with trainer.batch_size={state['batch_size']}, this run has "
                f"{self.batch_size}: resume with the same batch size (or start a new run directory)."
            )
        self._batches, self._resumed_epoch, self._rng = state["batches"], state["epoch"], state["rng"]
        if self.sampler is not None:
            self.sampler.resume(state["epoch"], state["batches"] * self.batch_size)

    def on_train_epoch_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if self._resumed_epoch != trainer.current_epoch:
            self._batches = 0
        self._resumed_epoch = None

    def on_train_batch_start(self, trainer: L.Trainer, module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        if self._rng is not None:  # here, after the data iterator exists: as the interrupted run stood
            set_rng_states(self._rng)
            self._rng = None

    def on_train_batch_end(
        self, trainer: L.Trainer, module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._batches += 1  # before ModelCheckpoint's hook: Lightning runs checkpoint callbacks last


class Preemption(L.Callback):
    """Save ``checkpoints/last.ckpt`` when SIGTERM or SIGUSR1 arrives, then stop.

    A signal stops the run at the start of the next batch, where Lightning's loop
    counters and the sampler's position agree; but not at an epoch's first batch:
    Lightning 2.6 restores a checkpoint written there (or at an epoch's end) as if
    that epoch were over, and the resumed run skipped its data, so the run goes on
    to the second batch. In a single process SIGTERM is taken from Lightning for
    this reason (it acts on SIGTERM at an epoch's end too). Several processes (DDP)
    keep Lightning's SIGTERM handling, which stops every rank together."""

    def __init__(self, checkpoint_dir: Path, handle_sigusr1: bool) -> None:
        self.checkpoint_dir = checkpoint_dir
        self.handle_sigusr1 = handle_sigusr1
        self._signal: str | None = None
        self._previous: dict[int, Any] = {}
        self.saved: Path | None = None  # the checkpoint written on a signal
        self.signal: str | None = None

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        # on_train_start: after Lightning has installed its own handlers (after on_fit_start)
        names = (["SIGUSR1"] if self.handle_sigusr1 else []) + (["SIGTERM"] if trainer.world_size == 1 else [])
        if threading.current_thread() is not threading.main_thread():
            return
        for name in names:
            if hasattr(signal, name):
                signum = getattr(signal, name)
                self._previous[signum] = signal.signal(signum, self._note)

    def on_fit_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._restore()

    def _note(self, signum: int, frame: Any) -> None:
        self._signal = signal.Signals(signum).name
        STOP.request(self._signal)  # a sweep this run is a trial of stops too

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def on_train_batch_start(self, trainer: L.Trainer, module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        # Here, not at the end of the batch before: Lightning has counted that batch as
        # completed, so the checkpoint resumes exactly after it (as with SIGTERM).
        if self._signal is None and STOP.requested() is not None:
            self._signal = STOP.signal  # the sweep this run is a trial of was signalled
        if self._signal is not None and batch_idx == 0 and trainer.num_training_batches > 1:
            return  # see the class's docstring: a checkpoint at an epoch's first batch resumes an epoch late
        if self._signal is not None:
            raise Preempted(f"received {self._signal}", self._signal)

    def on_exception(self, trainer: L.Trainer, module: L.LightningModule, exception: BaseException) -> None:
        """Save where the run stands (Lightning re-raises the exception afterwards);
        Ctrl-C saves too."""
        self._restore()
        if not isinstance(exception, (SIGTERMException, Preempted, KeyboardInterrupt)):
            return
        self.saved = self.checkpoint_dir / LAST
        trainer.save_checkpoint(self.saved)
        self.signal = self._signal or ("SIGINT" if isinstance(exception, KeyboardInterrupt) else "SIGTERM")
        log.warning("%s at step %d: saved %s; the same command resumes", self.signal, trainer.global_step, self.saved)


def resume_path(resume: str, checkpoint_dir: Path, run_dir: Path) -> str | None:
    """The checkpoint ``trainer.resume`` names: ``auto`` = the newest of
    ``checkpoints/last.ckpt`` and the ``hpc_ckpt_N.ckpt`` Lightning's SLURM requeue
    writes in the run directory, if any; ``never`` = none; else the path given."""
    if resume == "never":
        return None
    if resume == "auto":
        found = [p for p in [checkpoint_dir / LAST, *run_dir.glob("hpc_ckpt_*.ckpt")] if p.is_file()]
        return str(max(found, key=lambda p: p.stat().st_mtime)) if found else None
    return resume  # a path: validate() has checked that it exists


def rng_states() -> dict[str, Any]:
    """Every RNG a training step may draw from, as plain Python and tensors (loadable
    with ``torch.load(weights_only=True)``)."""
    import numpy as np

    kind, keys, pos, has_gauss, cached = np.random.get_state()
    python = random.getstate()
    states = {
        "torch": torch.get_rng_state(),
        "python": [python[0], list(python[1]), python[2]],
        "numpy": [kind, keys.tolist(), pos, has_gauss, cached],
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    import numpy as np

    torch.set_rng_state(states["torch"])
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def is_out_of_memory(error: BaseException) -> bool:
    """CUDA's OutOfMemoryError, or the CPU allocator's failure."""
    if isinstance(error, torch.OutOfMemoryError):
        return True
    return isinstance(error, RuntimeError) and "can't allocate memory" in str(error)


def find_resume(cfg: DictConfig, run_dir: Path) -> str | None:
    """The checkpoint this run resumes from (``trainer.resume``), checked against the
    config it was written under; None to start over."""
    resume = resume_path(cfg.trainer.resume, run_dir / "checkpoints", run_dir)
    if resume:
        check_resumable(resume, cfg, strict=cfg.trainer.resume == "auto")
        log.info("resuming from %s", resume)
    return resume


def explain(error: BaseException, trainer, preemption: Preemption, memory, predicted) -> BaseException:
    """The error a failed fit reports: preemption (with its checkpoint) and
    out-of-memory (beside the planner's estimate) get their own message."""
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
