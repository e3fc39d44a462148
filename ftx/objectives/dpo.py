"""Direct Preference Optimization (Rafailov et al. 2023): the policy learns from
preference pairs directly, without a reward model or sampling.

Loss (sigmoid variant, eq. 7): −log σ(β·[(log π(y_c|x) − log π_ref(y_c|x)) −
(log π(y_r|x) − log π_ref(y_r|x))]), log-probabilities summed over the response
tokens. β (``objective.beta``) sets how far the policy may move from the
reference: larger β, closer to it.

The reference is the starting policy, kept frozen:
- with an adapter (LoRA, QLoRA, DoRA): the same model with the adapter disabled,
  so no second copy is held (PEFT's ``disable_adapter``, as TRL does);
- under full fine-tuning: a frozen copy (``objective.reference=copy``), or the
  reference log-probabilities of every training pair computed once before
  training (``objective.reference=precomputed``: no copy in memory, one extra
  pass over the data).

With ``objective.sft_weight`` = α > 0 the loss adds α × the chosen responses'
mean token negative log-likelihood: RPO (Pang et al. 2024, "Iterative Reasoning
Preference Optimization", eq. 3), which keeps the chosen likelihood from falling
while the margin grows (TRL: ``loss_type=["sigmoid", "sft"]``, ``loss_weights=[1, α]``).

Logged as TRL names them: implicit rewards β·(log π − log π_ref) of chosen and
rejected, their margin and the share of pairs with a positive margin.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from ftx.data.render import IGNORE_INDEX
from ftx.data.tokenized import pair_loaders
from ftx.models.head import sequence_logps
from ftx.objectives.base import PairModule, evaluate_pairs

KIND = "preference"
"""The data it learns from: sft, preference or prompts (:func:`ftx.data.require_kind`)."""
HEAD = "causal_lm"
REFERENCE = True
"""It holds the policy to its starting model (with an adapter: the adapter disabled)."""


def dpo_sigmoid_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
) -> dict[str, torch.Tensor]:
    """DPO's sigmoid loss (Rafailov et al. 2023, eq. 7) and its implicit rewards."""
    chosen_rewards = beta * (chosen_logps - ref_chosen_logps)
    rejected_rewards = beta * (rejected_logps - ref_rejected_logps)
    margins = chosen_rewards - rejected_rewards
    return {
        "loss": -F.logsigmoid(margins).mean(),
        "rewards_chosen": chosen_rewards.mean(),
        "rewards_rejected": rejected_rewards.mean(),
        "rewards_margin": margins.mean(),
        "rewards_accuracy": (margins > 0).float().mean(),
    }


def sft_term(chosen_logps: torch.Tensor, chosen_tokens: torch.Tensor) -> torch.Tensor:
    """Mean negative log-likelihood per chosen response token (RPO's added term)."""
    return -chosen_logps.sum() / chosen_tokens.sum().clamp(min=1)


loaders = pair_loaders


def evaluate(cfg: DictConfig, model, tokenizer, splits) -> dict[str, Any]:
    """The SFT figures on the chosen responses (held-out loss, task score against
    the chosen response, forgetting), and ``pair_accuracy``: the share of held-out
    pairs where the policy gives the chosen response the higher log-probability."""
    return evaluate_pairs(cfg, model, tokenizer, splits, lambda *args: sequence_logps(*args).chunk(2))


class Module(PairModule):
    def __init__(self, model: torch.nn.Module, cfg: DictConfig) -> None:
        super().__init__(model, cfg)
        self.beta = cfg.objective.beta
        self.sft_weight = cfg.objective.sft_weight
        self.reference = "adapter" if self.adapter else cfg.objective.reference
        self.frozen = None
        if self.reference == "copy":
            # Held outside the module's children: not trained, not checkpointed.
            self.frozen = [copy.deepcopy(model).eval().requires_grad_(False)]
        self.precomputed: dict[bytes, torch.Tensor] = {}

    def reference_logps(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.reference == "precomputed":
            rows = zip(batch["input_ids"], batch["attention_mask"], strict=True)
            return torch.stack([self.precomputed[_key(ids, mask)] for ids, mask in rows])
        with torch.no_grad():
            if self.reference == "copy":
                return sequence_logps(self.frozen[0], batch, self.logits_chunk)
            with self.model.disable_adapter():
                return sequence_logps(self.model, batch, self.logits_chunk)

    def on_fit_start(self) -> None:
        if self.frozen is not None:
            self.frozen[0].to(self.device)

    def on_train_start(self) -> None:
        if self.reference != "precomputed" or self.precomputed:
            return
        # One pass over the training and held-out pairs with the starting weights,
        # batched in order (not through the sampler: the data order stays the seed's).
        with torch.no_grad():
            for loader in (self.trainer.train_dataloader, *_as_list(self.trainer.val_dataloaders)):
                rows = loader.dataset
                for start in range(0, len(rows), loader.batch_size):
                    batch = loader.collate_fn(
                        [rows[i] for i in range(start, min(start + loader.batch_size, len(rows)))]
                    )
                    batch = {k: v.to(self.device) for k, v in batch.items()}
                    logps = sequence_logps(self.model, batch, self.logits_chunk)
                    for ids, mask, logp in zip(batch["input_ids"], batch["attention_mask"], logps, strict=True):
                        self.precomputed[_key(ids, mask)] = logp

    def step(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        chosen, rejected = sequence_logps(self.model, batch, self.logits_chunk).chunk(2)
        ref_chosen, ref_rejected = self.reference_logps(batch).chunk(2)
        values = dpo_sigmoid_loss(chosen, rejected, ref_chosen, ref_rejected, self.beta)
        if self.sft_weight:
            chosen_tokens = (batch["labels"][:, 1:] != IGNORE_INDEX).sum(-1).chunk(2)[0]
            values["sft_loss"] = sft_term(chosen, chosen_tokens)
            values["loss"] = values["loss"] + self.sft_weight * values["sft_loss"]
        return values


def _key(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> bytes:
    """A sequence's identity for precomputed reference log-probs, padding removed
    (the same sequence is padded differently in differently composed batches)."""
    return input_ids[attention_mask.bool()].cpu().numpy().tobytes()


def _as_list(loaders: Any) -> list:
    return loaders if isinstance(loaders, list) else [loaders] if loaders is not None else []
