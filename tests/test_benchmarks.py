"""The benchmark scripts run on a tiny setting and print their tables (their figures
are measured by hand and recorded in docs/BENCHMARKS.md, not asserted here), and
the steady-state throughput clock they share with every run is exact."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from conftest import ftx_main, tiny_overrides

from ftx.config import project_root
from ftx.tracking.meter import StepClock

SCRIPTS = project_root() / "scripts"


def script(name: str, *args: str, timeout: int = 900) -> str:
    done = subprocess.run([sys.executable, str(SCRIPTS / name), *args], capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_step_clock_counts_steps_after_the_first_and_leaves_pauses_out(monkeypatch):
    now = iter([0.0, 2.0, 3.0, 5.0, 9.0])  # start, end of step 1, 2, 3 (after a 1 s pause), 4
    monkeypatch.setattr("ftx.tracking.meter.time.perf_counter", lambda: next(now))
    clock = StepClock()
    clock.start()
    clock.step(100)  # 2 s: warm-up, left out
    assert clock.tokens_per_s == 50.0  # only one step so far: its own rate
    clock.step(100)  # 1 s
    clock.pause(1.0)
    clock.step(100)  # 2 s, 1 of them paused
    clock.step(200)  # 4 s
    assert clock.tokens == 400 and clock.seconds == 6.0
    assert clock.tokens_per_s == pytest.approx(400 / 6)


@pytest.mark.slow
def test_throughput_benchmark_runs_all_three_and_prints_ratios():
    tiny = ("--hidden", "64", "--layers", "1", "--seq", "32", "--batch", "2", "--steps", "3", "--rounds", "1")
    out = script("bench_throughput.py", *tiny)
    assert "| runner | tokens/s (median) | peak MiB (median) | runs (tokens/s) |" in out
    rates = dict(re.findall(r"^\| (ftx|trl|plain) \| (\d+) \|", out, re.M))
    assert set(rates) == {"ftx", "trl", "plain"} and all(int(v) > 0 for v in rates.values())
    assert re.search(r"^ftx / trl: \d+\.\d\dx", out, re.M) and re.search(r"^ftx / plain: \d+\.\d\dx", out, re.M)
    assert re.search(r"^ftx / trl peak: \d+\.\d\dx", out, re.M) and re.search(r"^ftx planner: predicted", out, re.M)


def test_startup_benchmark_times_each_command():
    out = script("bench_startup.py", "--repeat", "1")
    for command in ("ftx --help", "ftx train --help", "ftx train --cfg job", "ftx plan model=llama31_8b"):
        assert re.search(rf"^\| `{re.escape(command)}[^`]*` \| \d+\.\d\d \|", out, re.M), out


def test_train_help_lists_every_group_and_option():
    out = ftx_main("train", "--help")
    assert out.returncode == 0, out.stderr
    assert "method: dora, full, lora, qlora, rlhf" in out.stdout
    assert re.search(r"^trainer: cpu, .*gpu", out.stdout, re.M)
    assert "== Config ==" in out.stdout and "max_steps:" in out.stdout


@pytest.mark.slow
def test_method_comparison_runs_one_sweep_and_tabulates_each_method(tiny_model_dir, tiny_data, tmp_path):
    overrides = tiny_overrides(tiny_model_dir, tiny_data, tmp_path / "unused", steps=2)
    overrides = [o for o in overrides if not o.startswith(("paths.output_dir", "logger="))]
    out = script("bench_methods.py", "--out", str(tmp_path / "methods"), *overrides)
    rows = {m: line for m in ("full", "lora", "qlora") for line in out.splitlines() if line.startswith(f"| {m} |")}
    assert set(rows) == {"full", "lora", "qlora"}, out
    assert "| 100% |" in rows["full"] and "93–97%" in rows["qlora"]
    artefact = {m: float(rows[m].split("|")[7]) for m in rows}  # MiB: full weights against adapters
    assert artefact["lora"] < artefact["full"] / 4
    # each trial wrote its run directory in the one sweep directory
    assert len(list((tmp_path / "methods").glob("*/metrics.json"))) == 3
