"""Rewards of sampled completions (RLOO, GRPO): a reward model's score (an ftx
reward run or a Hugging Face one-output sequence-classification model) and reward
functions in TRL's convention, f(prompts, completions, **kwargs) -> list[float | None]
(the task metrics of :mod:`ftx.metrics`, scored against each prompt's reference, or
``package.module:function``), summed with ``objective.reward_weights``."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from omegaconf import DictConfig

from ftx.config import reward_part
from ftx.data import Example
from ftx.data.tokenized import Collator, renderer_for
from ftx.metrics import TASK_METRICS

if TYPE_CHECKING:
    from ftx.objectives.policy_gradient import Rollout


class Reward:
    """Scores completions: the weighted sum of the reward model's score and each
    reward function's (``objective.reward_weights``, 1 where not named)."""

    def __init__(self, cfg: DictConfig, device: torch.device | str) -> None:
        self.functions = {reward_part(name): reward_function(name) for name in cfg.objective.reward_functions}
        self.weights = dict(cfg.objective.reward_weights)
        self.model = self.renderer = None
        if cfg.objective.reward_model is not None:
            self.model, tokenizer = loaded_reward_model(cfg.objective.reward_model, str(device))
            # The reward model reads prompt + completion rendered as it was trained.
            self.renderer = renderer_for(cfg, tokenizer)
            self.collate = Collator(tokenizer.pad_token_id, packed=False)
        self.max_length = cfg.data.max_length

    def __call__(self, rollout: Rollout) -> dict[str, torch.Tensor]:
        """{"reward": weighted total, "reward.reward_model": …, "reward.<function name>": …}
        (the parts unweighted), one value per completion."""
        device = rollout.completion_ids.device
        parts = {}
        if self.model is not None:
            parts["reward_model"] = self.score(rollout.examples, rollout.completions).to(device)
        prompts = [e.prompt_messages() if e.is_chat else e.prompt for e in rollout.examples]
        completions = [
            [{"role": "assistant", "content": c}] if e.is_chat else c
            for e, c in zip(rollout.examples, rollout.completions, strict=True)
        ]
        references = [e.reference() for e in rollout.examples]
        ids = [row[m.bool()].tolist() for row, m in zip(rollout.completion_ids, rollout.completion_mask, strict=True)]
        for name, function in self.functions.items():
            # TRL's convention: None = no opinion; it counts as 0 in the sum.
            values = function(prompts=prompts, completions=completions, completion_ids=ids, reference=references)
            parts[name] = torch.tensor([float("nan") if v is None else v for v in values], device=device)
        total = torch.stack([self.weights.get(name, 1.0) * v.nan_to_num(0.0) for name, v in parts.items()]).sum(0)
        return {"reward": total} | {f"reward.{name}": v for name, v in parts.items()}

    @torch.no_grad()
    def score(self, examples: list[Example], completions: list[str]) -> torch.Tensor:
        rows = []
        for example, completion in zip(examples, completions, strict=True):
            ids, labels = self.renderer.encode(_completed(example, completion), completion_only=True)
            rows.append({"input_ids": ids[: self.max_length], "labels": labels[: self.max_length]})
        batch = self.collate(rows)
        device = next(self.model.parameters()).device
        logits = self.model(
            input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)
        ).logits
        return logits.squeeze(-1).float()


def _completed(example: Example, completion: str) -> Example:
    """The example with its answer replaced by ``completion``."""
    if example.is_chat:
        answer = {"role": "assistant", "content": completion, "weight": 1}
        return Example(example.source, messages=[*example.prompt_messages(), answer])
    return Example(example.source, prompt=example.prompt, completion=completion)


def reward_function(name: str):
    """A reward function in TRL's convention, f(prompts, completions, **kwargs) ->
    list[float | None]: a built-in task metric scored against each reference, or
    ``package.module:function``."""
    if name in TASK_METRICS:
        metric = TASK_METRICS[name]

        def task_metric(completions: list, reference: list[str], **kwargs: Any) -> list[float]:
            texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
            return [metric(text, ref) for text, ref in zip(texts, reference, strict=True)]

        return task_metric
    import importlib

    module, _, function = name.partition(":")
    return getattr(importlib.import_module(module), function)


_LOADED: dict[tuple, tuple[Any, Any]] = {}


def loaded_reward_model(path: str, device: str):
    """:func:`load_reward_model`, once: a run scores the base, trains and scores the
    result with the same frozen reward model. One is kept (the last loaded), so a
    process running many trials holds one, not one per trial; a directory whose
    weights changed since (a reward stage trained again) is loaded again."""
    root = Path(path).expanduser().resolve()
    weights = [f for d in (root, root / "adapter", root / "model") if d.is_dir() for f in d.iterdir() if f.is_file()]
    key = (str(root), device, max((f.stat().st_mtime_ns for f in weights), default=0))
    if key not in _LOADED:
        _LOADED.clear()
        _LOADED[key] = load_reward_model(path, device)
    return _LOADED[key]


def load_reward_model(path: str, device: str):
    """A reward run (``ftx train objective=reward``) or a Hugging Face one-output
    sequence-classification model, frozen, in eval mode; and its tokenizer."""
    from ftx.models import quantization_config
    from ftx.runs import load_run, run_config

    if (Path(path) / ".hydra" / "config.yaml").is_file():
        # Frozen for the whole run: the adapter is folded into the weights once
        # (unmerged, ftx's LoRA reward model scored 64 completions 1.7x slower; fp32
        # scores agree to 2e-6 relative, a bf16 base rounds the merged weights to bf16).
        # A quantized base stays as it is: merging would dequantize it.
        merged = quantization_config(run_config(Path(path))) is None
        model, tokenizer = load_run(Path(path), merged=merged, device=device)
    else:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        model = AutoModelForSequenceClassification.from_pretrained(
            path, device_map={"": device}, use_safetensors=True
        ).eval()
        tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.requires_grad_(False), tokenizer
