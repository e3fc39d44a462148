"""Odds Ratio Preference Optimization (Hong et al. 2024, "ORPO: Monolithic
Preference Optimization without Reference Model", arXiv 2403.07691): supervised
fine-tuning and preference alignment in one loss, without a reference model.

Loss (eq. 6): L_SFT + λ·L_OR, with

- L_SFT the chosen responses' negative log-likelihood, the mean over their tokens
  (one mean over the batch's tokens, as TRL computes it);
- L_OR = −log σ(log odds(y_c|x) − log odds(y_r|x)) (eq. 7), odds(y|x) = P(y|x) / (1 − P(y|x)),
  where log P(y|x) is the *mean* per-token log-probability of the response (the
  paper's length-normalised likelihood); log(1 − P) is computed as log1mexp(log P),
  exact where P is close to 0 or 1.

λ is ``objective.beta``, as TRL's ``ORPOConfig`` names it: the weight of the odds
ratio against the NLL. ``objective.completion_only`` chooses the NLL's span: the
chosen response (true: the paper's L_SFT, the likelihood of the chosen answer) or
every token of the chosen sequence, prompt included (false: what TRL's
ORPOTrainer does; the authors' code switches it with ``disable_prompt_loss``).
The odds always compare the responses, so the pairs are tokenized with the
responses labelled either way.

Logged as TRL names them: rewards β·log P of chosen and rejected, their margin,
the share of pairs with a positive margin, the mean log P of each side,
``nll_loss``, ``log_odds_ratio`` (the mean log σ(log odds ratio)) and
``log_odds_chosen`` (the mean log odds ratio). TRL's ``logits/*`` (mean logits)
are left out: here no full logits are ever made (:mod:`ftx.models.head`).
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from ftx.data.render import IGNORE_INDEX
from ftx.data.tokenized import pair_loaders
from ftx.models.head import labelled_logps
from ftx.objectives.base import PairModule, evaluate_pairs

KIND = "preference"
"""The data it learns from: sft, preference or prompts (:func:`ftx.data.require_kind`)."""
HEAD = "causal_lm"


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 − exp(x)) for x ≤ 0, branching at −log 2 as Mächler (2012) shows: each
    branch is exact on its side, the naive form loses everything near 0."""
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def odds_ratio_loss(
    chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, nll: torch.Tensor, beta: float
) -> dict[str, torch.Tensor]:
    """ORPO's loss (eq. 6) and TRL's figures, from the responses' mean per-token
    log-probabilities and the chosen NLL."""
    chosen_logps, rejected_logps = chosen_logps.float(), rejected_logps.float()
    log_odds = (chosen_logps - rejected_logps) - (log1mexp(chosen_logps) - log1mexp(rejected_logps))
    ratio = F.logsigmoid(log_odds)  # −L_OR per pair (eq. 7)
    chosen_rewards, rejected_rewards = beta * chosen_logps.detach(), beta * rejected_logps.detach()
    return {
        "loss": nll - beta * ratio.mean(),
        "nll_loss": nll.detach(),
        "log_odds_ratio": ratio.detach().mean(),
        "log_odds_chosen": log_odds.detach().mean(),
        "rewards_chosen": chosen_rewards.mean(),
        "rewards_rejected": rejected_rewards.mean(),
        "rewards_margin": (chosen_rewards - rejected_rewards).mean(),
        "rewards_accuracy": (chosen_rewards > rejected_rewards).float().mean(),
        "logps_chosen": chosen_logps.detach().mean(),
        "logps_rejected": rejected_logps.detach().mean(),
    }


def response_logps(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], chunk: int, nll_on_prompt: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """(each row's mean log-probability per response token (2B,), the chosen rows'
    mean token NLL), from one forward pass over a pair batch (B chosen, then B
    rejected). ``nll_on_prompt``: the NLL covers every chosen token after the first."""
    labels = batch["labels"]
    half = labels.shape[0] // 2
    scored = batch
    if nll_on_prompt:
        # The chosen rows' prompt tokens become targets too (TRL's NLL labels: the
        # attended input ids); the response mask below still comes from the labels.
        every = torch.where(batch["attention_mask"].bool(), batch["input_ids"], IGNORE_INDEX)
        scored = batch | {"labels": torch.cat([every[:half], labels[half:]])}
    logps, (rows, positions) = labelled_logps(model, scored, chunk)
    response = labels[:, 1:][rows, positions] != IGNORE_INDEX
    sums = logps.new_zeros(labels.shape[0]).index_add(0, rows[response], logps[response])
    counts = torch.bincount(rows[response], minlength=labels.shape[0]).clamp(min=1)
    return sums / counts, -logps[rows < half].mean()


def _responses_labelled(cfg: DictConfig) -> DictConfig:
    """The config pairs are tokenized with: responses labelled, as the odds need,
    whatever ``completion_only`` says (for ORPO it only sets the NLL's span)."""
    if cfg.objective.completion_only:
        return cfg
    cfg = copy.deepcopy(cfg)
    cfg.objective.completion_only = True
    return cfg


def loaders(cfg: DictConfig, tokenizer, splits) -> tuple:
    return pair_loaders(_responses_labelled(cfg), tokenizer, splits)


def evaluate(cfg: DictConfig, model, tokenizer, splits) -> dict[str, Any]:
    """The SFT figures on the chosen responses (held-out loss, task score against
    the chosen response, forgetting), and ``pair_accuracy``: the share of held-out
    pairs where the chosen response has the higher mean log-probability per token
    (the higher odds: what ORPO trains; DPO compares sums)."""
    pair_cfg = _responses_labelled(cfg)
    return evaluate_pairs(cfg, model, tokenizer, splits, lambda *args: response_logps(*args)[0].chunk(2), pair_cfg)


class Module(PairModule):
    def __init__(self, model: torch.nn.Module, cfg: DictConfig) -> None:
        super().__init__(model, cfg)
        self.beta = cfg.objective.beta
        self.nll_on_prompt = not cfg.objective.completion_only

    def step(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        logps, nll = response_logps(self.model, batch, self.logits_chunk, self.nll_on_prompt)
        return odds_ratio_loss(*logps.chunk(2), nll, self.beta)
