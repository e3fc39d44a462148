"""Task metrics on fixture predictions, and the CPU peak-memory measure."""

from __future__ import annotations

import json

import pytest

from ftx.memory import PeakMemory
from ftx.metrics import exact_match, json_fields

REFERENCE = json.dumps({"name": "Ada Lovelace", "age": 36, "city": "London", "job": "mathematician"})


@pytest.mark.parametrize(
    ("prediction", "score"),
    [
        (REFERENCE, 1.0),
        ('{"name": "Ada Lovelace", "age": 36, "city": "Paris", "job": "mathematician"}', 0.75),
        ('{"name": "Ada", "age": "36"}', 0.0),
        ('{"name": "Ada Lovelace", "age": 36', 0.0),
        ('["Ada Lovelace"]', 0.0),
        ("", 0.0),
    ],
)
def test_json_fields(prediction, score):
    assert json_fields(prediction, REFERENCE) == score


def test_exact_match():
    assert exact_match(" yes\n", "yes") == 1.0 and exact_match("no", "yes") == 0.0


def test_cpu_peak_memory_sees_torch_allocations():
    import torch

    meter = PeakMemory("cpu")
    meter.start()
    block = torch.ones(64 * 1024 * 1024 // 4)  # 64 MiB, touched
    del block
    peak = meter.peak()
    assert peak["device"] == "cpu"
    assert 60 * 2**20 <= peak["peak_bytes"] <= 100 * 2**20, peak


def test_cpu_peak_memory_is_not_hidden_by_memory_an_earlier_job_freed():
    """A multirun runs jobs in one process: freed arena memory must not mask the next peak."""
    import torch

    earlier = [torch.ones(256 * 1024 // 4) for _ in range(600)]  # 150 MiB in 256 KiB blocks (malloc arenas)
    del earlier
    meter = PeakMemory("cpu")
    meter.start()
    blocks = [torch.ones(256 * 1024 // 4) for _ in range(400)]  # 100 MiB
    peak = meter.peak()["peak_bytes"]
    del blocks
    assert 90 * 2**20 <= peak <= 140 * 2**20, peak


MAPPED = """
import ctypes, sys, torch
from ftx.memory import PeakMemory, _glibc
class Info(ctypes.Structure):  # glibc's struct mallinfo2
    _fields_ = [(name, ctypes.c_size_t) for name in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
libc = _glibc()
libc.mallinfo2.restype = Info
PeakMemory("cpu", int(sys.argv[1])).start()
before = libc.mallinfo2().hblkhd  # bytes in malloc's own memory mappings
big = torch.ones(24 * 1024 * 1024 // 4)
print((libc.mallinfo2().hblkhd - before) / 2**20)
"""


@pytest.mark.parametrize("threshold_mb, mapped_mib", [(4, 24), (32, 0)])
def test_the_mmap_threshold_decides_whether_a_tensor_is_its_own_mapping(threshold_mb, mapped_mib):
    """PeakMemory's threshold (trainer.cpu_mmap_threshold_mb; train passes it) reaches
    malloc: at 4 MiB a 24 MiB tensor is its own memory mapping (handed back to the OS
    when freed), at 32 it lives in malloc's heap (kept for reuse). In a fresh process: a
    heap with free space of earlier work would serve the tensor from it whatever the
    threshold."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", MAPPED, str(threshold_mb)], capture_output=True, text=True, check=True)
    assert float(done.stdout.split()[-1]) == pytest.approx(mapped_mib, abs=0.1), done.stdout


def test_win_rate_against_the_starting_model_counts_ties_half():
    from ftx.evaluation import PER_EXAMPLE, before_after

    before = {"task_score": 0.5, PER_EXAMPLE: {"task_score": [1.0, 0.0, 0.5, 0.25]}}
    after = {"task_score": 0.625, PER_EXAMPLE: {"task_score": [1.0, 1.0, 0.0, 0.5]}}
    quality = before_after(before, after)
    assert quality["task_score_win_rate"] == (0.5 + 1 + 0 + 1) / 4
    assert quality["base_task_score"] == 0.5 and PER_EXAMPLE not in quality and "base_per_example" not in quality
