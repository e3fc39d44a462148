"""Prompts for the objectives that sample (RLOO, GRPO): the prompts of any data
with prompts tokenized as generation will continue them, and batches of them
left-padded. A preference pair contributes its prompt, with the chosen response as
the reference that task metrics and reward functions compare against."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig

from ftx.data import Example, Preference
from ftx.data.tokenized import SplitStats, TokenizedSplit, encode_prompts, renderer_for


def prompt_examples(records: list) -> list[Example]:
    """Examples whose prompts the policy completes: SFT examples as they are, the
    chosen side of preference pairs."""
    return [r.as_examples()[0] if isinstance(r, Preference) else r for r in records]


def tokenize_prompts(cfg: DictConfig, tokenizer, examples: list[Example]) -> TokenizedSplit:
    """Prompt token ids (what generation continues from) with their examples; a prompt
    longer than data.max_length keeps its end."""
    examples, prompts = encode_prompts(renderer_for(cfg, tokenizer), examples, cfg.data.on_error)
    rows, over_length, longest = [], [], 0
    for example, ids in zip(examples, prompts, strict=True):
        longest = max(longest, len(ids))
        if len(ids) > cfg.data.max_length:
            over_length.append(example.source)
            ids = ids[-cfg.data.max_length :]  # keep the end: generation continues from it
        rows.append({"input_ids": ids, "example": example})
    tokens = sum(len(row["input_ids"]) for row in rows)
    stats = SplitStats(len(rows), tokens, 0, len(over_length), 0, longest, len(rows), over_length[:20])
    return TokenizedSplit(rows, stats)


def collate_prompts(pad_token_id: int, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Left-padded prompts (generation continues from the right edge) and their examples."""
    import torch

    longest = max(len(row["input_ids"]) for row in rows)
    input_ids = torch.full((len(rows), longest), pad_token_id)
    attention_mask = torch.zeros((len(rows), longest), dtype=torch.long)
    for i, row in enumerate(rows):
        n = len(row["input_ids"])
        input_ids[i, longest - n :] = torch.tensor(row["input_ids"])
        attention_mask[i, longest - n :] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "examples": [row["example"] for row in rows]}


def make_prompt_loader(cfg: DictConfig, tokenizer, examples: list[Example], shuffle: bool):
    """Batches of ``trainer.batch_size`` prompts (each sampled k times in a step)."""
    import functools

    from ftx.data.sampling import batches

    collate = functools.partial(collate_prompts, tokenizer.pad_token_id)
    prompts = tokenize_prompts(cfg, tokenizer, examples)
    return batches(prompts, cfg.trainer.batch_size, shuffle, collate, cfg.seed, cfg.data.num_workers)


def prompt_loaders(cfg: DictConfig, tokenizer, splits) -> tuple[Any, Any]:
    """Train (shuffled) and held-out prompt loaders of any ``Splits`` with prompts."""
    return (
        make_prompt_loader(cfg, tokenizer, prompt_examples(splits.train), shuffle=True),
        make_prompt_loader(cfg, tokenizer, prompt_examples(splits.eval), shuffle=False),
    )
