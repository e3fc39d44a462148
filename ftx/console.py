"""What a run prints: each line once, ftx's own lines first, third-party noise kept
out of the console (not out of ``ftx.log``, which keeps every record in full), and
progress that shows without a terminal.

Two things made the console noisy, and both are fixed at their source here:

- **Libraries with handlers of their own.** transformers logs through its own stderr
  handler and does not propagate, so its warnings never reached ``ftx.log``;
  Lightning gives its package logger a handler of its own at import, so its
  lines came out twice (``INFO: GPU available…`` and again through Hydra's handler).
  :func:`route_libraries` removes those handlers: every record goes through the
  root logger's handlers (the console, ``ftx.log``) exactly once. Python warnings
  are captured into logging too (logger ``py.warnings``).
- **Lines that are noise at ftx's level.** :data:`NOISE` lists them, each with why;
  :class:`ConsoleNoise` keeps them off the console only. A warning not listed
  there (a real one) shows.

The console handler and its format are in ``conf/hydra/job_logging/ftx.yaml``.
"""

from __future__ import annotations

import logging
import re
import time
from typing import Any

# (logger name prefix, pattern of the message) of records that are noise on the
# console; ftx.log keeps them.
NOISE: tuple[tuple[str, str], ...] = (
    # Lightning's advertisement for its hosted logger, on every Trainer.
    ("lightning", r"litlogger"),
    # Lightning's device lines: ftx's own start line names the device it trains on.
    ("lightning", r"^(GPU|TPU|HPU) available"),
    ("lightning", r"^`Trainer.fit` stopped: `max_steps=\d+` reached"),
    # PEFT warns whenever the adapter targets a head tied to the embeddings. ftx
    # trains it tied on purpose and unties it when merging (ftx.runs._untie_adapted_head).
    ("py.warnings", r"tie_word_embeddings=True` and a tied layer is part of the adapter"),
    # Deprecations inside the libraries themselves (transformers' own and PEFT's
    # calls, Lightning's use of torch's pytree): nothing a user's config can change.
    ("py.warnings", r"`is_gradient_checkpointing` is deprecated"),
    ("py.warnings", r"isinstance\(treespec, LeafSpec\)` is deprecated"),
    # transformers' load report when the only missing weights are a sequence-classification
    # head: a reward model's new head (trained by objective=reward; a reward run's adapter
    # holds it). A report naming any other weight shows.
    # (Matched without its terminal colours; a terminal over 200 columns adds a Details column.)
    (
        "transformers.modeling_utils",
        r"ForSequenceClassification LOAD REPORT from: [^\n]*\nKey +\| Status +\|[^\n]*\n[-+]+\n"
        r"(?:score\.(?:weight|bias) +\| MISSING +\|[^\n]*\n)+\n",
    ),
)
_NOISE = tuple((prefix, re.compile(pattern)) for prefix, pattern in NOISE)
_COLOURS = re.compile(r"\x1b\[[0-9;]*m")  # what transformers adds when stdout is a terminal


class ConsoleNoise(logging.Filter):
    """Drops the records :data:`NOISE` names (the console handler's filter)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith(tuple(prefix for prefix, _ in _NOISE)):
            return True
        message = _COLOURS.sub("", record.getMessage())
        return not any(record.name.startswith(prefix) and pattern.search(message) for prefix, pattern in _NOISE)


class ConsoleFormat(logging.Formatter):
    """``HH:MM:SS message`` for ftx's information; a warning or error says its level,
    and a library's record its source."""

    def __init__(self) -> None:
        super().__init__(datefmt="%H:%M:%S")

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.name == "py.warnings":  # "path:line: Category: message\n  source line"
            message = message.strip().splitlines()[0]
        if record.exc_info:
            message += "\n" + self.formatException(record.exc_info)
        source = "" if record.name.startswith("ftx") or record.name == "__main__" else f"[{record.name}] "
        level = f"{record.levelname} " if record.levelno >= logging.WARNING else ""
        return f"{self.formatTime(record, self.datefmt)} {level}{source}{message}"


def route_libraries() -> None:
    """Send transformers', Lightning's and Python's warnings through the root logger
    (console and ftx.log, once each), and turn off the load and download progress
    bars of transformers and the Hub (a bar per file, even without a terminal)."""
    import transformers

    transformers.utils.logging.disable_default_handler()
    transformers.utils.logging.enable_propagation()
    transformers.utils.logging.disable_progress_bar()
    from huggingface_hub.utils import disable_progress_bars

    disable_progress_bars()
    import lightning  # noqa: F401  (its handlers exist once it is imported)

    if logging.getLogger().handlers:  # without handlers of ours, Lightning's own stay
        for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
            logger = logging.getLogger(name)
            for handler in list(logger.handlers):
                logger.removeHandler(handler)
            logger.propagate = True
    logging.captureWarnings(True)


def progress_line(trainer: Any, meter: Any, started: float, first_step: int) -> str:
    """step 50/300 · train.loss 1.234 · 1,530 tokens/s · 0:41 elapsed, about 3:25 left
    (the progress-bar metrics are what the objective logs with prog_bar: RL's mean
    reward too; the time left is from this process's own steps)."""
    step, total = trainer.global_step, trainer.max_steps
    elapsed = time.perf_counter() - started
    done = step - first_step  # steps of this process (a resumed run began later)
    left = elapsed / done * (total - step) if done > 0 and total > 0 else None
    # + 0.0: a loss of -0.0 (RLOO's, on-policy) prints as 0
    metrics = ", ".join(f"{name} {float(value) + 0.0:.4g}" for name, value in trainer.progress_bar_metrics.items())
    parts = [f"step {step}/{total}" if total > 0 else f"step {step}", metrics]
    if meter is not None and meter.tokens_per_s:
        parts.append(f"{meter.tokens_per_s:,.0f} tokens/s")
    parts.append(f"{clock(elapsed)} elapsed" + (f", about {clock(left)} left" if left is not None else ""))
    return " · ".join(part for part in parts if part)


def clock(seconds: float) -> str:
    """1:05 (minutes:seconds), 1:02:05 past an hour."""
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


def run_line(cfg: Any, stats: Any) -> str:
    """What a run is about to do, in one line: model, method, objective, data and
    the training schedule (the planner's memory line follows it)."""
    method = cfg.method.name
    if cfg.method.adapter is not None:
        adapter = "" if cfg.method.adapter == method else f"{cfg.method.adapter} "
        method += f" ({adapter}r={cfg.method.r}, alpha={cfg.method.alpha:g})"
    if cfg.quant.name != "none":
        method += f" on a {cfg.quant.name} base"
    t = cfg.trainer
    batch = f"{t.batch_size}" + (f"×{t.accumulate_grad_batches}" if t.accumulate_grad_batches > 1 else "")
    steps = f"{t.max_steps} steps" if t.max_steps > 0 else f"{t.max_epochs} epochs"
    return (
        f"ftx: {cfg.model.name} + {method}, objective {cfg.objective.name}; "
        f"data {cfg.data.name}: {stats.examples:,} examples, {stats.tokens:,} tokens; "
        f"{steps} of batch {batch} on {t.accelerator} ({t.precision}) -> {cfg.paths.output_dir}"
    )


def figures_line(scores: dict[str, Any]) -> str:
    """eval_loss 1.234, task_score 0.5 (numbers to 4 significant digits)."""
    return ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in scores.items())
