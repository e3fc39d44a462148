"""Reward model: one score per sequence, trained on preference pairs.

Loss: Bradley-Terry, -log σ(r(x, y_chosen) − r(x, y_rejected) − m), the reward
model objective of RLHF (Christiano et al. 2017; Ouyang et al. 2022, eq. 1), with
the optional margin m of Llama 2 (Touvron et al. 2023, §3.2.2) as a constant
(``objective.margin``). The model is a sequence-classification head with one
output on a causal LM (the score read at the last non-pad token) or on an encoder
(its pooled first token); under LoRA/QLoRA the head trains in full beside the
adapters (PEFT's SEQ_CLS task keeps it in ``modules_to_save``).

Quality: ``pair_accuracy`` (share of held-out pairs scored chosen > rejected;
0.5 is chance), ``reward_margin`` (mean score difference) and the held-out loss.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from ftx.data.tokenized import make_pair_loader, pair_loaders
from ftx.evaluation import inference
from ftx.objectives.base import PairModule

KIND = "preference"
"""The data it learns from: sft, preference or prompts (:func:`ftx.data.require_kind`)."""
HEAD = "reward"


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin: float = 0.0) -> torch.Tensor:
    """Mean −log σ(chosen − rejected − margin) over pairs (see the module docstring)."""
    return -F.logsigmoid(chosen - rejected - margin).mean()


loaders = pair_loaders


def scores(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) scores of a pair batch (chosen rows first)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    return logits.squeeze(-1).float().chunk(2)


def pair_metrics(chosen: torch.Tensor, rejected: torch.Tensor, margin: float) -> dict[str, torch.Tensor]:
    return {
        "loss": bradley_terry_loss(chosen, rejected, margin),
        "pair_accuracy": (chosen > rejected).float().mean(),
        "reward_margin": (chosen - rejected).mean(),
    }


def evaluate(cfg: DictConfig, model, tokenizer, splits) -> dict[str, Any]:
    """Held-out loss, pair accuracy and mean margin over every held-out pair."""
    device = next(model.parameters()).device
    chosen, rejected = [], []
    with inference(model):
        for batch in make_pair_loader(cfg, tokenizer, splits.eval, shuffle=False):
            c, r = scores(model, {k: v.to(device) for k, v in batch.items()})
            chosen.append(c)
            rejected.append(r)
    values = pair_metrics(torch.cat(chosen), torch.cat(rejected), cfg.objective.margin)
    return {"eval_loss": values["loss"].item()} | {k: v.item() for k, v in values.items() if k != "loss"}


class Module(PairModule):
    def __init__(self, model: torch.nn.Module, cfg: DictConfig) -> None:
        super().__init__(model, cfg)
        self.margin = cfg.objective.margin

    def step(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return pair_metrics(*scores(self.model, batch), self.margin)
