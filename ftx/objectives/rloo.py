"""REINFORCE Leave-One-Out (Ahmadian et al. 2024, "Back to Basics", §3.2; the
estimator of Kool et al. 2019): k completions of each prompt, each completion's
baseline the mean reward of the other k − 1, so no value model is needed.

Reward: the completion's score minus β times its KL to the reference, estimated
by the summed log-ratio Σ_t (log π − log π_ref) over its tokens (the paper's
sequence-level penalty, as TRL's RLOOTrainer applies it; this estimate can be
negative, unlike GRPO's k3).

Advantage: A_i = R_i − mean_{j≠i} R_j, the same for the whole completion.

Loss (per sequence, TRL's variant): −min(ρA, clip(ρ, 1 − ε, 1 + ε)·A), ρ =
π(y|x)/π_old(y|x) from the summed completion log-probabilities, averaged over
completions. The paper's plain REINFORCE is this with ρ = 1: one optimisation pass
per batch of samples (π_old = π, detached), as here and in TRL by default.
Advantages are not further normalized (TRL's ``normalize_advantages=False``).
"""

from __future__ import annotations

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


def kl_penalized_rewards(
    rewards: torch.Tensor, logps: torch.Tensor, ref_logps: torch.Tensor, mask: torch.Tensor, beta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(r − β·Σ_t (log π − log π_ref), per-token log-ratio) (Ahmadian et al. 2024, §2)."""
    log_ratio = (logps - ref_logps) * mask
    return rewards - beta * log_ratio.sum(1), log_ratio


def leave_one_out_advantages(rewards: torch.Tensor, k: int) -> torch.Tensor:
    """r_i − mean of the other k − 1 rewards of its group (Kool et al. 2019; RLOO eq. 4)."""
    grouped = rewards.view(-1, k)
    baseline = (grouped.sum(1, keepdim=True) - grouped) / (k - 1)
    return (grouped - baseline).view(-1)


def rloo_loss(
    logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, epsilon: float
) -> torch.Tensor:
    """Mean over completions of −min(ρA, clip(ρ, 1−ε, 1+ε)A), ρ = exp(Σ_t logp − old),
    from per-token ``logps`` (B, T) and the sampling policy's summed ``old_logps``
    (B,) (TRL's RLOOTrainer loss)."""
    ratio = torch.exp((logps * mask).sum(1) - old_logps)
    clipped = torch.clamp(ratio, 1 - epsilon, 1 + epsilon)
    return -torch.min(ratio * advantages, clipped * advantages).mean()


class Module(PolicyGradientModule):
    def loss_terms(
        self, logps: torch.Tensor, ref_logps: torch.Tensor, rewards: torch.Tensor, mask: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        settings = self.settings
        penalized, log_ratio = kl_penalized_rewards(rewards, logps.detach(), ref_logps, mask, settings.beta)
        advantages = leave_one_out_advantages(penalized, settings.num_generations)
        return {
            "loss": rloo_loss(logps, (logps.detach() * mask).sum(1), advantages, mask, settings.epsilon),
            "kl": log_ratio.sum() / mask.sum().clamp(min=1),
        }
