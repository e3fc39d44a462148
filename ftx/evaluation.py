"""Evaluation: held-out loss, task metrics on generated completions, and
perplexity on general text (forgetting), measured on the base before training and
on the result after with the same code, and by `ftx eval` on its own."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig

from ftx.data import Example
from ftx.data.render import Renderer
from ftx.data.tokenized import encode_prompts, make_loader, renderer_for
from ftx.metrics import resolve_metric

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


@contextmanager
def inference(model: PreTrainedModel, use_cache: bool = False) -> Iterator[None]:
    """Eval mode and no gradients (and the KV cache on, for generation) for the
    block; the model's training mode and cache setting come back afterwards, also
    when the block raises."""
    import torch

    was_training = model.training
    cached = model.config.use_cache if use_cache else None
    model.eval()
    if use_cache:
        model.config.use_cache = True
    try:
        with torch.no_grad():
            yield
    finally:
        if use_cache:
            model.config.use_cache = cached
        model.train(was_training)


def held_out_loss(model: PreTrainedModel, loader, chunk: int) -> float:
    """Token-weighted mean cross-entropy over every batch of ``loader``, the head
    run on ``chunk`` trained tokens at a time (:mod:`ftx.models.head`)."""
    from ftx.models.head import labelled_logps

    total, tokens = 0.0, 0
    device = next(model.parameters()).device
    with inference(model):
        for batch in loader:
            logps, _ = labelled_logps(model, {key: value.to(device) for key, value in batch.items()}, chunk)
            total -= logps.sum().item()
            tokens += len(logps)
    return total / max(tokens, 1)


def stop_ids(model: PreTrainedModel, renderer: Renderer) -> list[int]:
    """Tokens at which generation stops: the model's own end tokens
    (``generation_config.eos_token_id``, one or a list), the tokenizer's EOS and the
    chat template's end-of-turn token, which Hugging Face's ``generate`` would miss
    where the model's config does not list it."""
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    configured = [configured] if isinstance(configured, int) else list(configured or ())
    return list(dict.fromkeys([*configured, *renderer.stop_ids()]))


def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[list[int]],
    max_new_tokens: int,
    stops: list[int],
    batch_size: int = 32,
    samples: int = 0,
    temperature: float = 1.0,
) -> list[str]:
    """Greedy completions (decoded, special tokens dropped) of prompt token ids, each
    ending at the first of ``stops`` (:func:`stop_ids`); with ``samples`` > 0, that
    many sampled at ``temperature`` per prompt instead, in prompt order."""
    tokenizer.padding_side = "left"  # generation continues from the right edge
    device = next(model.parameters()).device
    sampling = {"do_sample": False}
    if samples:
        sampling = {"do_sample": True, "temperature": temperature, "num_return_sequences": samples}
    outputs = []
    try:
        with inference(model, use_cache=True):
            for start in range(0, len(prompts), batch_size):
                ids = [{"input_ids": p} for p in prompts[start : start + batch_size]]
                enc = tokenizer.pad(ids, return_tensors="pt").to(device)
                generated = model.generate(
                    **enc,
                    max_new_tokens=max_new_tokens,
                    **sampling,
                    pad_token_id=tokenizer.pad_token_id,
                    eos_token_id=stops,
                )
                new_tokens = generated[:, enc["input_ids"].shape[1] :]
                outputs.extend(tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
    finally:
        tokenizer.padding_side = "right"
    return outputs


def task_scores(
    cfg: DictConfig,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: list[Example],
) -> list[float]:
    """``data.task_metric`` of the greedy completion of each of ``examples``, against
    its reference (the completion, or the conversation's last answer)."""
    metric = resolve_metric(cfg.data)
    renderer = renderer_for(cfg, tokenizer)
    examples, prompts = encode_prompts(renderer, examples, cfg.data.on_error)
    stops = stop_ids(model, renderer)
    predictions = generate(model, tokenizer, prompts, cfg.data.max_new_tokens, stops, cfg.data.eval_batch_size)
    scores = [float(metric(p, e.reference())) for p, e in zip(predictions, examples, strict=True)]
    bad = next((s for s in scores if not math.isfinite(s)), None)
    if bad is not None:
        raise ValueError(f"data.task_metric={cfg.data.task_metric} gave {bad}")
    return scores


def perplexity(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    text: str,
    chunk: int,
    max_tokens: int,
    logits_chunk: int = 0,
) -> float:
    """exp(mean next-token loss) over ``text`` cut into ``chunk``-token windows."""
    import torch

    from ftx.models.head import labelled_logps

    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:max_tokens]
    windows = [ids[i : i + chunk] for i in range(0, len(ids) - 1, chunk) if len(ids[i : i + chunk]) > 1]
    device = next(model.parameters()).device
    total, count = 0.0, 0
    with inference(model):
        for window in windows:
            x = torch.tensor([window], device=device)
            total -= labelled_logps(model, {"input_ids": x, "labels": x}, logits_chunk)[0].sum().item()
            count += len(window) - 1
    return math.exp(total / count)


# Per-example figures an evaluation keeps beside its means, for win rates; never recorded.
PER_EXAMPLE = "per_example"


def evaluate(
    cfg: DictConfig, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, examples: list[Example]
) -> dict[str, Any]:
    """Every quality figure the data config defines, for one model state."""
    data = cfg.data
    loader = make_loader(cfg, tokenizer, examples, shuffle=False)
    scores = {"eval_loss": held_out_loss(model, loader, cfg.trainer.logits_chunk)}
    if data.task_metric is not None:
        each = task_scores(cfg, model, tokenizer, examples[: data.eval_examples])
        scores["task_score"] = sum(each) / len(each)
        scores[PER_EXAMPLE] = {"task_score": each}
    if data.general_text is not None:
        text = Path(data.general_text).read_text()
        scores["general_ppl"] = perplexity(
            model, tokenizer, text, data.max_length, data.general_max_tokens, cfg.trainer.logits_chunk
        )
    return scores


def figures(scores: dict[str, Any]) -> dict[str, Any]:
    """An evaluation's figures without its per-example lists."""
    return {k: v for k, v in scores.items() if k != PER_EXAMPLE}


def win_rate(new: list[float], old: list[float]) -> float:
    """Share of examples where ``new`` beats ``old``, ties counting half (as
    pairwise win rates are reported, e.g. AlpacaEval)."""
    wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(new, old, strict=True))
    return wins / len(new)


def before_after(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """quality.* of a run: base_* figures, final ones, forgetting = relative change
    of general-text perplexity (positive = the model got worse at it), and for each
    per-example figure (task score; an RL run's reward) ``X_win_rate``: how often the
    trained model's completion beats the starting model's on the same prompt."""
    quality = {f"base_{k}": v for k, v in figures(before).items()} | figures(after)
    old, new = before.get(PER_EXAMPLE, {}), after.get(PER_EXAMPLE, {})
    for name, values in new.items():
        if len(old.get(name, ())) == len(values) and values:
            quality[f"{name}_win_rate"] = win_rate(values, old[name])
    if "general_ppl" in after:
        quality["forgetting"] = after["general_ppl"] / before["general_ppl"] - 1.0
    return quality
