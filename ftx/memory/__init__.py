"""Memory: the measured peak of a run (this module) and the planner's prediction
(:mod:`ftx.memory.plan`), both in every run's record (memory.peak_bytes,
memory.predicted_bytes).

What "peak" means:

* CUDA: ``torch.cuda.max_memory_allocated`` since the model started loading: the
  tensors' own bytes, the quantity a planner can predict. The caching allocator's
  ``max_memory_reserved`` is recorded beside it (what nvidia-smi roughly shows).
* CPU: torch allocates through glibc malloc, which tracemalloc does not see, and
  glibc's arenas keep freed blocks mapped, so plain RSS overstates live tensors.
  We fix malloc's mmap threshold (``mallopt(M_MMAP_THRESHOLD, 4 MiB)``,
  ``trainer.cpu_mmap_threshold_mb``, which also stops glibc raising it to 32 MiB)
  so every tensor above 4 MiB is its own
  mapping, returned to the OS when freed; then the kernel's high-water mark of
  resident memory (VmHWM, reset by writing 5 to /proc/self/clear_refs) tracks live
  tensor memory closely (smaller blocks live in malloc's arenas, which are reused,
  so they add fragmentation, not double counting; a lower threshold made training
  steps up to 2x slower in page faults, measured on the default run; RL's sampling
  and scoring at 64 rows make 4-8 MiB tensors by the thousand, and its steps run
  1.47x faster at 32 MiB, with the process's peak RSS 1.51x higher).
  Peak = VmHWM during the run − RSS just before the model
  loads (interpreter and libraries excluded), i.e. weights, gradients, optimizer
  state, activations and buffers.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
from pathlib import Path

log = logging.getLogger(__name__)

_M_MMAP_THRESHOLD = -3  # glibc malloc.h
_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_kib(field: str) -> int:
    for line in _STATUS.read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in {_STATUS}")


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    """The C library when it is glibc (has mallopt and malloc_trim), else None."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


def _set_mmap_threshold(threshold_bytes: int) -> bool:
    libc = _glibc()
    return libc is not None and bool(libc.mallopt(_M_MMAP_THRESHOLD, threshold_bytes))


def _release_free_memory() -> None:
    """Return freed heap memory to the OS before the baseline is read.

    Without this, memory an earlier job of the same process freed (a multirun runs
    its jobs in one process) stays resident in malloc's arenas, counts in the
    baseline, and is then reused by this job: its peak would read low.
    """
    import gc

    gc.collect()
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


def _reset_high_water_mark() -> None:
    """VmHWM back to the current RSS."""
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        log.warning("cannot reset VmHWM: CPU peak memory includes earlier work")


class PeakMemory:
    """Peak memory of the work between ``start()`` and ``peak()`` on one device."""

    def __init__(self, device: str, mmap_threshold_mb: int = 4) -> None:
        """``mmap_threshold_mb``: CPU only, ``trainer.cpu_mmap_threshold_mb``."""
        self.device = device
        self.mmap_threshold_bytes = mmap_threshold_mb * 1024 * 1024
        self.baseline = 0

    def start(self) -> None:
        if self.device == "cuda":
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.baseline = torch.cuda.memory_allocated()
            return
        if not _set_mmap_threshold(self.mmap_threshold_bytes):
            log.warning("could not set malloc's mmap threshold: CPU peak memory will read high")
        _release_free_memory()
        self.baseline = _status_kib("VmRSS") * 1024
        _reset_high_water_mark()

    def release(self) -> None:
        """Return memory the work so far freed (on CPU: malloc's free blocks) before
        the next stage, so that freed-but-kept memory of one stage (the base's
        scoring) does not sit under the next one's peak. The peak so far is kept."""
        if self.device == "cpu":
            _release_free_memory()

    def restart(self) -> None:
        """Start the high-water mark again from now, keeping the baseline: what
        happened in between (a calibration) counts only by what it left resident."""
        if self.device == "cuda":
            import torch

            torch.cuda.reset_peak_memory_stats()
            return
        _release_free_memory()
        _reset_high_water_mark()

    def peak(self) -> dict[str, int | str]:
        """Peak bytes above the baseline taken at ``start()``."""
        if self.device == "cuda":
            import torch

            return {
                "peak_bytes": torch.cuda.max_memory_allocated() - self.baseline,
                "reserved_bytes": torch.cuda.max_memory_reserved(),
                "device": "cuda",
            }
        return {"peak_bytes": _status_kib("VmHWM") * 1024 - self.baseline, "device": "cpu"}


class TensorPeak:
    """Peak bytes of the tensors alive inside a ``with`` block, as torch's own CPU
    allocator accounts them (``torch.profiler`` memory events: every allocation and
    free, in order). This is the quantity the planner's tensor terms predict, and it
    is the same on every machine: no malloc arenas, page sizes or thread stacks in
    it. The profiler slows the work inside (it records every op), so tests and
    benchmarks use this; runs measure resident memory (:class:`PeakMemory`)."""

    def __enter__(self) -> TensorPeak:
        import gc

        from torch.profiler import ProfilerActivity, profile

        # Garbage of earlier work (a previous run's reference cycles) freed inside
        # the block would count as negative: free it first.
        gc.collect()
        self._profile = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
        self._profile.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._profile.__exit__(*exc)
        events = self._profile.profiler.kineto_results.events()
        changes = sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]")
        live = peak = 0
        for _, change in changes:  # allocations positive, frees negative
            live += change
            peak = max(peak, live)
        self.peak_bytes, self.end_bytes = peak, live


def device_of(accelerator: str) -> str:
    """cuda or cpu, for the Lightning accelerator name in the config."""
    if accelerator in ("gpu", "cuda"):
        return "cuda"
    if accelerator == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return "cpu"
