"""Supervised fine-tuning as a LightningModule.

Loss: next-token cross-entropy over the trained tokens (completion / assistant
turns; prompt tokens carry label -100 when ``objective.completion_only``), the
objective of instruction tuning (Ouyang et al. 2022, §3.5; Wei et al. 2021). Computed from
the decoder's hidden states in chunks of ``trainer.logits_chunk`` trained tokens
(:mod:`ftx.models.head`): equal to the transformers model's own loss, without its
batch × length × vocabulary logits.
"""

from __future__ import annotations

from typing import Any

import torch
from omegaconf import DictConfig

from ftx.data.tokenized import make_loader
from ftx.evaluation import evaluate as evaluate_examples
from ftx.models.head import causal_lm_loss
from ftx.objectives.base import ObjectiveModule

KIND = "sft"
"""The data it learns from: sft, preference or prompts (:func:`ftx.data.require_kind`)."""
HEAD = "causal_lm"


def loaders(cfg: DictConfig, tokenizer, splits) -> tuple[Any, Any]:
    train = make_loader(cfg, tokenizer, splits.train, shuffle=True, packing=cfg.data.packing)
    return train, make_loader(cfg, tokenizer, splits.eval, shuffle=False)


def evaluate(cfg: DictConfig, model, tokenizer, splits) -> dict[str, Any]:
    return evaluate_examples(cfg, model, tokenizer, splits.eval)


class Module(ObjectiveModule):
    def forward(self, **batch: torch.Tensor) -> Any:
        return self.model(**batch)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor | None:
        # No KV cache while training: it is never read, and with one transformers
        # stops deriving per-example masks from the position ids of packed rows.
        loss = self.checked(causal_lm_loss(self.model, batch, self.logits_chunk))
        if loss is not None:
            self.log("train.loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        loss = causal_lm_loss(self.model, batch, self.logits_chunk)
        self.log("val.loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
