"""A quiet console: the default pipeline (W&B logger, no terminal) prints what ftx is
about to do, the base scores, progress lines, the final scores and the run
directory, each line once and without the libraries' known noise; ftx.log in the
run directory keeps every record, the noise included."""

from __future__ import annotations

import logging
import re
from collections import Counter

from conftest import ftx_main, read_metrics, tiny_overrides

from ftx.console import NOISE, ConsoleFormat, ConsoleNoise, progress_line

# What the console printed before these were silenced at their source (each seen on
# a default run of 2026-12-02), as the user saw them.
KNOWN_NOISE = (
    "litlogger",  # Lightning's advertisement
    "GPU available",  # Lightning's device lines (printed twice)
    "INFO: ",  # Lightning's own handler, beside Hydra's
    "LOAD REPORT",  # transformers' report of the calibration's deliberately cut models
    "not sharded",  # transformers' tensor-parallel check, on a CPU
    "Loading weights",  # transformers' progress bar per load
    "Writing model shards",
    "wandb:",  # W&B's banner, sparklines and sync hints
    "anonymous setting",
    "tie_word_embeddings",  # PEFT's tied-head warning
    "FutureWarning",
    "is deprecated",
    "validation_step` but have no `val_dataloader",
)


def test_the_default_pipeline_prints_each_line_once_and_no_noise(tiny_model_dir, tiny_data, tmp_path):
    overrides = [
        o
        for o in tiny_overrides(tiny_model_dir, tiny_data, tmp_path, steps=4)
        if not o.startswith(("logger=", "trainer.progress_bar=", "paths.output_dir=", "plan.cpu_overhead_mb"))
    ]
    run_dir = tmp_path / "run"
    # The default logger (W&B, offline) and calibration; stdout is a pipe, not a terminal.
    out = ftx_main("train", *overrides, "trainer.progress_every=2", f"hydra.run.dir={run_dir}")
    assert out.returncode == 0, out.stderr[-3000:]
    assert read_metrics(run_dir)["status"] == "completed"
    printed = [line for line in (out.stdout + out.stderr).splitlines() if line.strip()]

    untimed = [re.sub(r"^\d\d:\d\d:\d\d ", "", line) for line in printed]
    twice = [line for line, count in Counter(untimed).items() if count > 1]
    assert not twice, "\n".join(twice)
    noise = [line for line in printed if any(n in line for n in KNOWN_NOISE)]
    assert not noise, "\n".join(noise)

    text = "\n".join(untimed)
    assert f"ftx: {tiny_model_dir.name} + lora (r=4, alpha=8), objective sft; data json_extract: 24 examples" in text
    assert re.search(r"^predicted peak memory \d", text, re.M)
    assert re.search(r"^base: eval_loss \d", text, re.M)
    line = r"^step (\d)/4 · train\.loss [\d.]+(?:, val\.loss [\d.]+)? · [\d,]+ tokens/s · \d:\d\d elapsed, about"
    progress = re.findall(line, text, re.M)
    assert progress == ["2", "4"]
    assert re.search(r"^fine-tuned: eval_loss \d", text, re.M)
    assert re.search(r"^W&B run saved offline; upload it with: wandb sync .*offline-run-", text, re.M)
    assert f"run {run_dir} completed" in text
    assert re.search(r"^WARNING 3 of 24 training examples are longer than data.max_length=128", text, re.M)  # real
    assert not out.stderr.strip(), out.stderr  # everything went through ftx's console handler

    detail = (run_dir / "ftx.log").read_text()  # the full detail, noise included
    assert "[lightning.pytorch" in detail and "GPU available" in detail
    assert "[py.warnings][WARNING]" in detail and "`is_gradient_checkpointing` is deprecated" in detail
    assert "[ftx.train][INFO] - base: eval_loss" in detail


def _record(name: str, message: str, level: int = logging.WARNING) -> logging.LogRecord:
    return logging.LogRecord(name, level, __file__, 1, message, None, None)


def test_only_the_listed_noise_is_dropped_and_a_real_warning_shows(monkeypatch):
    noise = ConsoleNoise()
    tied = "x.py:1: UserWarning: Model has `tie_word_embeddings=True` and a tied layer is part of the adapter"
    assert not noise.filter(_record("py.warnings", tied))
    assert not noise.filter(_record("lightning.pytorch.utilities.rank_zero", "GPU available: False, used: False"))
    real = "trl/trainer/utils.py:12: UserWarning: the pad token is the eos token: generations will not stop"
    assert noise.filter(_record("py.warnings", real))
    assert noise.filter(_record("lightning.pytorch.utilities.rank_zero", "Epoch 3: loss is nan"))
    assert noise.filter(_record("ftx.train", "GPU available: said by ftx"))  # ftx's own lines always show
    assert all(prefix.startswith(("lightning", "py.warnings", "transformers")) for prefix, _ in NOISE)

    # transformers' own load report (its code writes it here), plain and as a terminal
    # gets it (coloured; a Details column over 200 columns): the new head alone is
    # noise; any other missing weight, or a causal LM's missing head, is not.
    for colour, columns in ((False, 80), (True, 80), (True, 240)):
        report = load_report(monkeypatch, colour, columns)
        written = report("LlamaForSequenceClassification", "score.weight").getMessage()
        assert ("\x1b[31mMISSING" in written) == colour and ("Details" in written) == (columns > 200)
        assert not noise.filter(report("LlamaForSequenceClassification", "score.weight"))
        assert not noise.filter(report("Qwen2ForSequenceClassification", "score.weight", "score.bias"))
        assert noise.filter(report("LlamaForSequenceClassification", "score.weight", "model.norm.weight"))
        assert noise.filter(report("LlamaForSequenceClassification", "model.layers.0.mlp.up_proj.weight"))
        assert noise.filter(report("LlamaForCausalLM", "score.weight"))
        assert noise.filter(report("LlamaForSequenceClassification", "score.weight", unexpected=True))

    shown = ConsoleFormat().format(_record("py.warnings", real + "\n  warnings.warn(msg)\n"))
    assert re.fullmatch(r"\d\d:\d\d:\d\d WARNING \[py\.warnings\] " + re.escape(real), shown)
    assert re.fullmatch(
        r"\d\d:\d\d:\d\d base: x", ConsoleFormat().format(_record("ftx.train", "base: x", logging.INFO))
    )


def load_report(monkeypatch, colour: bool, columns: int):
    """A function (model class name, missing keys) -> the log record transformers'
    ``log_state_dict_report`` writes for such a load, on a terminal of ``columns``."""
    import os

    from transformers.utils import loading_report

    class Stdout:
        def isatty(self) -> bool:
            return colour

    monkeypatch.setattr(loading_report.sys, "stdout", Stdout())
    monkeypatch.setattr(loading_report.shutil, "get_terminal_size", lambda *_: os.terminal_size((columns, 24)))

    def report(model_class: str, *missing: str, unexpected: bool = False) -> logging.LogRecord:
        records = []
        logger = logging.getLogger("transformers.modeling_utils.test")
        logger.addHandler(handler := logging.Handler())
        handler.emit = records.append
        logger.propagate = False
        model = type(model_class, (), {})()
        info = loading_report.LoadStateDictInfo(
            missing_keys=set(missing),
            unexpected_keys={"lm_head.weight"} if unexpected else set(),
            mismatched_keys=set(),
            error_msgs=[],
            conversion_errors={},
            skipped_pp_keys=set(),
        )
        try:
            loading_report.log_state_dict_report(model, "/models/base", True, info, logger=logger)
        finally:
            logger.removeHandler(handler)
        (record,) = records
        record.name = "transformers.modeling_utils"  # as transformers' loader logs it
        return record

    return report


def test_progress_line_states_the_time_left_from_this_process_steps():
    class Trainer:  # what progress_line reads of a Lightning Trainer
        global_step, max_steps = 60, 100
        progress_bar_metrics = {"train.loss": 1.23456, "reward.mean": 0.5, "kl": -0.0}

    class Meter:
        tokens_per_s = 1530.4

    import time

    started = time.perf_counter() - 40.0  # resumed at step 40: 20 steps in 40 s, 40 to go
    line = progress_line(Trainer(), Meter(), started, first_step=40)
    assert re.fullmatch(
        r"step 60/100 · train\.loss 1\.235, reward\.mean 0\.5, kl 0 · 1,530 tokens/s · 0:40 elapsed, about 1:20 left",
        line,
    ), line
