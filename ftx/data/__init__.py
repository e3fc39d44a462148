"""Data: read prompt/completion JSONL → validate every line → split → tokenize with
the prompt masked out of the loss → collate padded batches.

Reading and validating need no tokenizer and no torch, so ``ftx train`` checks the
data before any weights load and names the file and line of every problem.
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from omegaconf import DictConfig

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

IGNORE_INDEX = -100  # the label value torch's cross-entropy skips


class DataError(ValueError):
    """Bad data; the message lists file:line and reason for every problem found."""


@dataclass
class Example:
    prompt: str
    completion: str
    source: str
    """file:line the example came from."""


def read_jsonl(path: str | Path) -> list[Example]:
    """Read and validate a prompt/completion JSONL file; report every bad line."""
    path = Path(path)
    examples, problems = [], []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            where = f"{path}:{number}"
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                problems.append(f"{where}: invalid JSON ({error.msg} at column {error.colno})")
                continue
            line_problems = _row_problems(row)
            problems.extend(f"{where}: {problem}" for problem in line_problems)
            if not line_problems:
                examples.append(Example(row["prompt"], row["completion"], where))
    if problems:
        shown = "\n  ".join(problems[:20])
        more = f"\n  … and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise DataError(f"{len(problems)} problem(s) in {path}:\n  {shown}{more}")
    if not examples:
        raise DataError(f"{path}: no examples.")
    return examples


def _row_problems(row: object) -> list[str]:
    if not isinstance(row, dict):
        return [f"expected an object, got {type(row).__name__}"]
    problems = []
    for key in ("prompt", "completion"):
        if key not in row:
            problems.append(f"missing {key!r}")
        elif not isinstance(row[key], str):
            problems.append(f"{key!r} must be a string, got {type(row[key]).__name__}")
        elif not row[key].strip():
            problems.append(f"{key!r} is empty")
    return problems


def load_splits(cfg: DictConfig) -> tuple[list[Example], list[Example]]:
    """Train and held-out examples, validated."""
    train = read_jsonl(cfg.data.train_file)
    if cfg.data.eval_file is not None:
        return train, read_jsonl(cfg.data.eval_file)
    shuffled = train[:]
    random.Random(cfg.data.split_seed).shuffle(shuffled)
    n_eval = max(1, round(len(shuffled) * cfg.data.eval_fraction))
    return shuffled[n_eval:], shuffled[:n_eval]


def render_prompt(template: str, prompt: str) -> str:
    return template.format(prompt=prompt)


def encode_prompt(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """Token ids of a rendered prompt, with BOS where the tokenizer has its own.

    Used for training and generation alike so both see identical prompts.
    """
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if tokenizer.bos_token_id is not None and tokenizer.bos_token_id != tokenizer.eos_token_id:
        ids = [tokenizer.bos_token_id] + ids
    return ids


class TokenizedDataset:
    """Examples tokenized as prompt + completion + EOS, labels masked on the prompt."""

    def __init__(
        self,
        examples: list[Example],
        tokenizer: PreTrainedTokenizerBase,
        template: str,
        max_length: int,
        completion_only: bool,
    ) -> None:
        self.rows = []
        truncated = 0
        for example in examples:
            prompt_ids = encode_prompt(tokenizer, render_prompt(template, example.prompt))
            answer_ids = tokenizer(example.completion, add_special_tokens=False)["input_ids"]
            answer_ids = answer_ids + [tokenizer.eos_token_id]
            input_ids = (prompt_ids + answer_ids)[:max_length]
            truncated += len(prompt_ids) + len(answer_ids) > max_length
            masked = [IGNORE_INDEX] * len(prompt_ids) if completion_only else prompt_ids
            labels = (masked + answer_ids)[:max_length]
            self.rows.append({"input_ids": input_ids, "labels": labels})
        if truncated:
            log.warning("%d of %d examples truncated to data.max_length=%d", truncated, len(examples), max_length)
        self.truncated = truncated

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        return self.rows[index]


def make_loader(cfg: DictConfig, tokenizer: PreTrainedTokenizerBase, examples: list[Example], shuffle: bool):
    """A DataLoader of tokenized, padded batches of ``examples``."""
    from torch.utils.data import DataLoader

    dataset = TokenizedDataset(
        examples, tokenizer, cfg.data.prompt_template, cfg.data.max_length, cfg.objective.completion_only
    )
    return DataLoader(
        dataset,
        batch_size=cfg.trainer.batch_size,
        shuffle=shuffle,
        collate_fn=collator(tokenizer),
        num_workers=cfg.data.num_workers,
    )


def collator(tokenizer: PreTrainedTokenizerBase):
    """Right-pad input_ids with pad, labels with IGNORE_INDEX; build attention_mask."""
    from transformers import DataCollatorForSeq2Seq

    return DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX, return_tensors="pt")
