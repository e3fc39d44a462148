"""Data: read → detect/declare the format → validate every row → split → render
with a template → tokenize with the loss masked to what should be learnt → (pack)
→ cache → collate.

Reading and validating need no tokenizer and no torch, so ``ftx train`` checks the
data before any weights load and names the file and line of every problem.

- :mod:`ftx.data.sources`: files, saved datasets, the hub cache → located rows
- :mod:`ftx.data.formats`: the formats users bring → :class:`Example` / :class:`Preference`
- :mod:`ftx.data.render`: chat and prompt templates → token ids and labels
- :mod:`ftx.data.tokenized`: truncation, packing, caching, batches, statistics
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass

from omegaconf import DictConfig

from ftx.data.formats import (
    FORMATS,
    SHOWN_PROBLEMS,
    DataError,
    Example,
    Format,
    Preference,
    describe_formats,
    detect_format,
    problems_error,
)
from ftx.data.render import IGNORE_INDEX, Renderer
from ftx.data.sources import BadRow, SourceError, read_rows

__all__ = [
    "IGNORE_INDEX",
    "DataError",
    "Example",
    "Preference",
    "Renderer",
    "Splits",
    "load_records",
    "load_splits",
]

log = logging.getLogger(__name__)


@dataclass
class Records:
    """The valid records of one source, in order."""

    records: list[Example | Preference]
    format: Format
    skipped: int
    """Invalid rows dropped under data.on_error=skip."""


@dataclass
class Splits:
    train: list[Example | Preference]
    eval: list[Example | Preference]
    format: str
    kind: str
    """sft (examples) or preference (pairs)."""
    skipped: int


def load_records(source: str, split: str, format_name: str, on_error: str, shown: int = SHOWN_PROBLEMS) -> Records:
    """Every row of ``source`` parsed in ``format_name`` (``auto``: detected from the
    first row). Invalid rows raise one DataError listing each as location: reason,
    or with ``on_error=skip`` are dropped and counted."""
    fmt = None if format_name == "auto" else FORMATS[format_name]
    records, problems = [], []
    try:
        for where, row in read_rows(source, split):
            if isinstance(row, BadRow):
                problems.append(f"{where}: {row.reason}")
                continue
            if not isinstance(row, dict):
                problems.append(f"{where}: expected an object, got {type(row).__name__}")
                continue
            if fmt is None:
                fmt = detect_format(row)
                if fmt is None:
                    problems.append(
                        f"{where}: cannot tell the format from the keys {sorted(row)}; set data.format to one "
                        f"of: {describe_formats()}"
                    )
                    break
                log.info("%s: format %s (detected from its first row)", source, fmt.name)
            record, row_problems = fmt.parse(row, where)
            problems.extend(f"{where}: {problem}" for problem in row_problems)
            if record is not None:
                records.append(record)
    except (FileNotFoundError, KeyError, UnicodeDecodeError, SourceError) as error:
        raise DataError(str(error).strip("'\"")) from None
    if problems and (on_error == "refuse" or fmt is None):
        raise problems_error(source, problems, shown)
    if problems:
        log.warning("%s: skipped %d invalid row(s) (data.on_error=skip), first: %s", source, len(problems), problems[0])
    if not records:
        raise DataError(f"{source}: no usable rows.")
    return Records(records, fmt, len(problems))


def load_splits(cfg: DictConfig, shown: int = SHOWN_PROBLEMS) -> Splits:
    """Train and held-out records, validated: from ``data.eval_file``, from
    ``data.eval_split`` of the same source, or ``data.eval_fraction`` split off."""
    data = cfg.data
    train = load_records(data.train_file, data.train_split, data.format, data.on_error, shown)
    if data.eval_file is not None or data.eval_split is not None:
        source = data.eval_file if data.eval_file is not None else data.train_file
        held_out = load_records(source, data.eval_split or data.train_split, data.format, data.on_error, shown)
        if held_out.format.kind != train.format.kind:
            raise DataError(
                f"{source} holds {held_out.format.name} data but {data.train_file} holds {train.format.name}: "
                "train and eval data must be the same kind."
            )
        train_records, eval_records = train.records, held_out.records
        skipped = train.skipped + held_out.skipped
    else:
        shuffled = train.records[:]
        random.Random(data.split_seed).shuffle(shuffled)
        n_eval = max(1, round(len(shuffled) * data.eval_fraction))
        if n_eval >= len(shuffled):
            raise DataError(
                f"{data.train_file}: {len(shuffled)} row(s) cannot be split into train and eval "
                f"(data.eval_fraction={data.eval_fraction}); add rows or set data.eval_file."
            )
        train_records, eval_records, skipped = shuffled[n_eval:], shuffled[:n_eval], train.skipped
    return Splits(train_records, eval_records, train.format.name, train.format.kind, skipped)


def require_kind(splits: Splits, kind: str, objective: str, source: str) -> None:
    """Stop when the data is not what the objective learns from (``prompts``: any
    data with prompts, examples or pairs, whose reference answers are kept)."""
    if splits.kind == kind or kind == "prompts" and splits.format != "text":
        return
    wanted = {
        "sft": "prompt/completion, text or conversation data (chat, alpaca, sharegpt)",
        "preference": "preference pairs (prompt/chosen/rejected, or OpenAI's preferred_output form)",
        "prompts": "prompts: prompt/completion, conversation or preference data (not plain text)",
    }[kind]
    raise DataError(
        f"objective={objective} learns from {wanted}, but {source} holds {splits.format} data. "
        "Choose data that fits, or the objective that fits the data."
    )
