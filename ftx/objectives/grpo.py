"""Group Relative Policy Optimization (Shao et al. 2024, DeepSeekMath §4.1): the
policy samples k completions of each prompt, and each completion's advantage is
its reward standardized within its group, so no value model is needed.

Advantage: A_i = (r_i − mean_group r) / (std_group r + 1e-4), the same A for every
token of completion i (outcome supervision, §4.1.2; std unbiased, 1e-4 as TRL).

Loss per token (eq. 3): −min(ρ·A, clip(ρ, 1 − ε, 1 + ε)·A) + β·KL, ρ = π/π_old,
with the KL to the reference estimated per token by k3 = exp(ref − logp) −
(ref − logp) − 1 (Schulman 2020, "Approximating KL divergence"; unbiased and ≥ 0).
Averaged (``objective.aggregation``):
- ``sequence``: over each completion's tokens, then over completions (the paper,
  TRL's ``loss_type="grpo"``); shorter completions weigh more per token;
- ``token``: over every completion token of the batch (DAPO, Yu et al. 2025, §3.4;
  TRL's default ``loss_type="dapo"``), which removes that length bias.

Departures from the paper: one optimisation pass per batch of samples (π_old = π,
detached: the ratio is 1 and its clip inactive, as in TRL by default); the KL is
added to the loss as in the paper and TRL (RLOO puts it in the reward instead),
unweighted by the ratio (TRL's ``use_bias_correction_kl=False``; TRL's default
weights it, after DeepSeek-V3.2).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ftx.objectives.policy_gradient import PolicyGradientModule, evaluate, loaders

KIND = "prompts"
"""Any data with prompts: the policy completes them (examples, or pairs' prompts)."""
HEAD = "causal_lm"
REFERENCE = True
"""It holds the policy to its starting model (with an adapter: the adapter disabled)."""
SAMPLES = True
"""It samples completions from the policy and scores them with a reward."""

__all__ = ["HEAD", "Module", "evaluate", "loaders"]


def group_advantages(rewards: torch.Tensor, k: int, eps: float = 1e-4) -> torch.Tensor:
    """(r − group mean) / (group std + eps) for rewards grouped k by k (GRPO §4.1.2)."""
    grouped = rewards.view(-1, k)
    mean = grouped.mean(1, keepdim=True)
    std = grouped.std(1, keepdim=True)
    return ((grouped - mean) / (std + eps)).view(-1)


def k3_kl(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """Per-token KL(π‖π_ref) estimate exp(ref − logp) − (ref − logp) − 1 (Schulman 2020, k3)."""
    delta = ref_logps - logps
    return torch.exp(delta) - delta - 1


def clipped_surrogate(
    logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, epsilon: float
) -> torch.Tensor:
    """Per-token −min(ρA, clip(ρ, 1−ε, 1+ε)A), ρ = exp(logp − old) (PPO, Schulman et al. 2017, eq. 7)."""
    ratio = torch.exp(logps - old_logps)
    advantages = advantages.unsqueeze(1)
    return -torch.min(ratio * advantages, torch.clamp(ratio, 1 - epsilon, 1 + epsilon) * advantages)


def sequence_mean(per_token: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over each sequence's tokens, then over sequences (GRPO eq. 3)."""
    return ((per_token * mask).sum(1) / mask.sum(1).clamp(min=1)).mean()


def token_mean(per_token: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over every token of the batch (DAPO, Yu et al. 2025, token-level loss)."""
    return (per_token * mask).sum() / mask.sum().clamp(min=1)


AGGREGATIONS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "sequence": sequence_mean,
    "token": token_mean,
}


def grpo_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    epsilon: float,
    beta: float,
    aggregate: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = sequence_mean,
) -> dict[str, torch.Tensor]:
    """GRPO's clipped surrogate plus β·k3 KL per token, aggregated (module docstring)."""
    mask = mask.to(logps.dtype)
    # Masked (after-EOS) tokens get KL 0: exp() of their arbitrary log-ratios could overflow.
    kl = k3_kl(logps * mask, ref_logps * mask)
    per_token = clipped_surrogate(logps, old_logps, advantages, epsilon) + beta * kl
    return {"loss": aggregate(per_token, mask), "kl": token_mean(kl.detach(), mask)}


class Module(PolicyGradientModule):
    def loss_terms(
        self, logps: torch.Tensor, ref_logps: torch.Tensor, rewards: torch.Tensor, mask: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        settings = self.settings
        advantages = group_advantages(rewards, settings.num_generations)
        return grpo_loss(
            logps,
            logps.detach(),
            ref_logps,
            advantages,
            mask,
            settings.epsilon,
            settings.beta,
            AGGREGATIONS[settings.aggregation],
        )
