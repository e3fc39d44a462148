"""Evaluation: held-out loss and task metrics on generated completions, measured
on the base before training and on the result after, with the same code."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import TYPE_CHECKING

from ftx.data import Example, encode_prompt, render_prompt

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


def json_fields(prediction: str, reference: str) -> float:
    """Share of the reference object's fields reproduced exactly; 0 if the
    prediction is not a JSON object. Partial credit shows progress a strict
    exact match would hide."""
    expected = json.loads(reference)
    try:
        predicted = json.loads(prediction)
    except json.JSONDecodeError:
        return 0.0
    if not isinstance(predicted, dict):
        return 0.0
    return sum(predicted.get(key) == value for key, value in expected.items()) / len(expected)


def exact_match(prediction: str, reference: str) -> float:
    """1 when the completion equals the reference, ignoring surrounding whitespace."""
    return float(prediction.strip() == reference.strip())


TASK_METRICS: dict[str, Callable[[str, str], float]] = {
    "json_fields": json_fields,
    "exact_match": exact_match,
}


def held_out_loss(model: PreTrainedModel, loader) -> float:
    """Token-weighted mean cross-entropy over every batch of ``loader``."""
    import torch

    was_training = model.training
    model.eval()
    total, tokens = 0.0, 0
    device = next(model.parameters()).device
    with torch.no_grad():
        for batch in loader:
            batch = {key: value.to(device) for key, value in batch.items()}
            n = int((batch["labels"][:, 1:] != -100).sum())
            total += model(**batch).loss.item() * n
            tokens += n
    model.train(was_training)
    return total / max(tokens, 1)


def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    max_new_tokens: int,
    batch_size: int = 32,
) -> list[str]:
    """Greedy completions (decoded, special tokens dropped) for rendered prompts."""
    import torch

    was_training, use_cache = model.training, model.config.use_cache
    model.eval()
    model.config.use_cache = True
    tokenizer.padding_side = "left"  # generation continues from the right edge
    device = next(model.parameters()).device
    outputs = []
    try:
        with torch.no_grad():
            for start in range(0, len(prompts), batch_size):
                ids = [{"input_ids": encode_prompt(tokenizer, p)} for p in prompts[start : start + batch_size]]
                enc = tokenizer.pad(ids, return_tensors="pt").to(device)
                generated = model.generate(
                    **enc,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    pad_token_id=tokenizer.pad_token_id,
                    eos_token_id=tokenizer.eos_token_id,
                )
                new_tokens = generated[:, enc["input_ids"].shape[1] :]
                outputs.extend(tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
    finally:
        tokenizer.padding_side = "right"
        model.config.use_cache = use_cache
        model.train(was_training)
    return outputs


def task_score(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: list[Example],
    metric: str,
    template: str,
    max_new_tokens: int,
) -> float:
    """Mean of ``metric`` over greedy completions of ``examples``."""
    prompts = [render_prompt(template, example.prompt) for example in examples]
    predictions = generate(model, tokenizer, prompts, max_new_tokens)
    scores = [TASK_METRICS[metric](p, e.completion) for p, e in zip(predictions, examples, strict=True)]
    score = sum(scores) / len(scores)
    if not math.isfinite(score):
        raise ValueError(f"task metric {metric} gave {score}")
    return score
