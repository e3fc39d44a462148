"""What the policy-gradient objectives (RLOO, GRPO) share: k sampled completions
per prompt (the prompts: :mod:`ftx.data.prompts`), scored by the run's reward
(:mod:`ftx.objectives.rewards`), the frozen reference they are held to, and the
training step around a loss. ``rloo.py`` and
``grpo.py`` add only where the two methods differ: the advantages and the loss.

One training step, as in TRL's GRPOTrainer and RLOOTrainer with one optimisation
pass per batch of samples (``num_iterations=1``):

1. sample k completions of each prompt with the policy (``objective.temperature``,
   ``objective.top_p``; at most ``data.max_new_tokens``; each cut after its EOS);
2. score each completion: the reward model's score plus every reward function's
   value (TRL sums reward functions with weight 1);
3. log-probabilities of the completion tokens under the policy (with gradient)
   and the reference (the adapter disabled, or a frozen copy under full
   fine-tuning); the "old" policy of the clipped ratio is the policy itself,
   detached, so the ratio is 1 and clipping only matters once samples are reused;
4. the objective's loss from these.

Data: any data with prompts; a preference pair contributes its prompt, with the
chosen response as the reference that task metrics compare against.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import DictConfig

from ftx.data import Example
from ftx.data.prompts import make_prompt_loader, prompt_examples, prompt_loaders
from ftx.data.render import IGNORE_INDEX
from ftx.data.tokenized import renderer_for
from ftx.evaluation import PER_EXAMPLE, inference, stop_ids
from ftx.evaluation import evaluate as evaluate_examples
from ftx.models.head import labelled_logps
from ftx.objectives.base import ObjectiveModule, disable_dropout
from ftx.objectives.rewards import Reward

loaders = prompt_loaders

# ----------------------------------------------------------------------- samples


@dataclass
class Rollout:
    """Completions of a batch of prompts, k per prompt, grouped prompt by prompt."""

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    completion_ids: torch.Tensor
    completion_mask: torch.Tensor
    """1 up to and including the first EOS (TRL's mask)."""
    completions: list[str]
    examples: list[Example]
    """The example of each completion's prompt."""


def sample(
    model,
    tokenizer,
    batch: dict[str, Any],
    k: int,
    objective: DictConfig | None,
    max_new_tokens: int,
    stops: list[int],
) -> Rollout:
    """k sampled completions of each prompt, each ending at the first of ``stops``
    (:func:`ftx.evaluation.stop_ids`); ``objective=None``: one greedy completion."""
    sampling: dict[str, Any] = {"do_sample": False}
    if objective is not None:
        # Drawn by InverseCdfDraw at the end of the logits processors; transformers'
        # own temperature, top-p and top-k (the model's generation_config may set them)
        # are off, so that they apply once.
        draw = InverseCdfDraw(objective.temperature, objective.top_p)
        sampling |= {"logits_processor": [draw], "temperature": None, "top_p": None, "top_k": None}
    # Each prompt k times, grouped (what num_return_sequences=k does, which greedy
    # selection refuses).
    prompt_ids = batch["input_ids"].repeat_interleave(k, 0)
    prompt_mask = batch["attention_mask"].repeat_interleave(k, 0)
    with inference(model, use_cache=True):  # generation reads the cache; training does not
        generated = model.generate(
            input_ids=prompt_ids,
            attention_mask=prompt_mask,
            max_new_tokens=max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=stops,
            **sampling,
        )
    completion_ids = generated[:, prompt_ids.shape[1] :]
    mask = completion_mask(completion_ids, stops)
    return Rollout(
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        completion_ids=completion_ids,
        completion_mask=mask,
        completions=[
            tokenizer.decode(ids[m.bool()], skip_special_tokens=True)
            for ids, m in zip(completion_ids, mask, strict=True)
        ],
        examples=[e for e in batch["examples"] for _ in range(k)],
    )


class InverseCdfDraw:
    """Samples the next token as the last of ``generate``'s logits processors and
    returns scores that are 0 at it and -inf elsewhere, so that greedy selection
    takes it: a logits processor (transformers' ``LogitsProcessor`` interface).

    The distribution is exactly that of transformers' sampling: its own temperature
    and top-p warpers, then a categorical draw from the softmax. The draw inverts
    the cumulative distribution with one uniform number per row (float64), where
    ``torch.multinomial`` draws an exponential number for every vocabulary entry of
    every row: 3.4 ms against 0.6 for 64 rows of a 2,048-token vocabulary on a CPU
    core, 48 times a step in RL's sampling. The random stream differs from
    ``do_sample=True``'s, so the samples do too, not their distribution."""

    def __init__(self, temperature: float, top_p: float) -> None:
        from transformers import TemperatureLogitsWarper, TopPLogitsWarper

        self.warpers = []
        if temperature != 1.0:
            self.warpers.append(TemperatureLogitsWarper(temperature))
        if top_p < 1.0:
            self.warpers.append(TopPLogitsWarper(top_p))

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        for warper in self.warpers:
            scores = warper(input_ids, scores)
        cumulative = torch.softmax(scores.double(), -1).cumsum(-1)
        total = cumulative[:, -1:]
        bad = (~torch.isfinite(total[:, 0])).nonzero()
        if len(bad):  # NaN scores (an overflow), or a row a processor masked whole
            rows = ", ".join(str(int(row)) for row in bad[:5, 0])
            raise FloatingPointError(f"sampling: the next-token scores of row {rows} are not finite")
        uniform = torch.rand(total.shape, dtype=total.dtype, device=total.device) * total
        tokens = torch.searchsorted(cumulative, uniform, right=True).clamp_(max=scores.shape[-1] - 1)
        return torch.full_like(scores, float("-inf")).scatter_(1, tokens, 0.0)


def completion_mask(completion_ids: torch.Tensor, stops: list[int]) -> torch.Tensor:
    """1 on every token up to and including the first stop token (all of a row without one)."""
    is_eos = torch.isin(completion_ids, torch.tensor(stops, device=completion_ids.device))
    length = completion_ids.shape[1]
    first_eos = torch.where(is_eos.any(1), is_eos.int().argmax(1), length)
    return (torch.arange(length, device=completion_ids.device)[None] <= first_eos[:, None]).long()


def completion_logps(model, rollout: Rollout, temperature: float, chunk: int) -> torch.Tensor:
    """log π(token) of each completion token (B, T), from logits scaled by the
    sampling temperature, as TRL scores them; 0 past a completion's end. The head
    runs on ``chunk`` completion tokens at a time (:mod:`ftx.models.head`)."""
    width = rollout.completion_ids.shape[1]
    targets = rollout.completion_ids.masked_fill(rollout.completion_mask == 0, IGNORE_INDEX)
    batch = {
        "input_ids": torch.cat([rollout.prompt_ids, rollout.completion_ids], 1),
        "attention_mask": torch.cat([rollout.prompt_mask, rollout.completion_mask], 1),
        "labels": torch.cat([torch.full_like(rollout.prompt_ids, IGNORE_INDEX), targets], 1),
    }
    logps, (rows, positions) = labelled_logps(model, batch, chunk, temperature)
    out = logps.new_zeros(rollout.completion_ids.shape)
    # Position p of the shifted labels predicts token p + 1: completion token p + 1 - (length - width).
    out[rows, positions + 1 - (batch["input_ids"].shape[1] - width)] = logps
    return out


# -------------------------------------------------------------------- evaluation


def evaluate(cfg: DictConfig, model, tokenizer, splits) -> dict[str, Any]:
    """The SFT figures on the held-out prompts' references (held-out loss, task
    score, forgetting), and ``reward``: the mean reward of greedy completions of
    up to ``data.eval_examples`` held-out prompts."""
    examples = prompt_examples(splits.eval)
    scores = evaluate_examples(cfg, model, tokenizer, examples)
    reward = Reward(cfg, next(model.parameters()).device)
    stops = stop_ids(model, renderer_for(cfg, tokenizer))
    values = []
    for batch in make_prompt_loader(cfg, tokenizer, examples[: cfg.data.eval_examples], shuffle=False):
        batch = {k: v.to(next(model.parameters()).device) if torch.is_tensor(v) else v for k, v in batch.items()}
        values.append(reward(sample(model, tokenizer, batch, 1, None, cfg.data.max_new_tokens, stops))["reward"])
    rewards = torch.cat(values)
    per_example = scores.get(PER_EXAMPLE, {}) | {"reward": rewards.tolist()}
    return scores | {"reward": rewards.mean().item(), PER_EXAMPLE: per_example}


# ------------------------------------------------------------------------ module


class PolicyGradientModule(ObjectiveModule):
    """The training step of RLOO and GRPO around ``loss_terms``, which each defines."""

    def __init__(self, model: torch.nn.Module, cfg: DictConfig) -> None:
        super().__init__(model, cfg)
        self.cfg = cfg
        self.settings = cfg.objective
        disable_dropout(model)  # sampling, policy and reference log-probs must agree
        self.frozen = None
        if not self.adapter:
            # Held outside the module's children: not trained, not checkpointed.
            self.frozen = [copy.deepcopy(model).eval().requires_grad_(False)]
        self.reward: Reward | None = None
        self.tokenizer = None
        self.stops: list[int] = []

    def setup(self, stage: str) -> None:
        from ftx.models import load_tokenizer, resolve_base

        self.tokenizer = load_tokenizer(self.cfg, resolve_base(self.cfg))
        self.stops = stop_ids(self.model, renderer_for(self.cfg, self.tokenizer))

    def on_fit_start(self) -> None:
        if self.frozen is not None:
            self.frozen[0].to(self.device)
        self.reward = Reward(self.cfg, self.device)

    def loss_terms(
        self, logps: torch.Tensor, ref_logps: torch.Tensor, rewards: torch.Tensor, mask: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """{"loss", "kl", …} from per-token log-probs (B, T) and rewards (B,)."""
        raise NotImplementedError

    def reference_logps(self, rollout: Rollout) -> torch.Tensor:
        with torch.no_grad():
            if self.frozen is not None:
                return completion_logps(self.frozen[0], rollout, self.settings.temperature, self.logits_chunk)
            with self.model.disable_adapter():
                return completion_logps(self.model, rollout, self.settings.temperature, self.logits_chunk)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor | None:
        k = self.settings.num_generations
        rollout = sample(self.model, self.tokenizer, batch, k, self.settings, self.cfg.data.max_new_tokens, self.stops)
        rewards = self.reward(rollout)
        logps = completion_logps(self.model, rollout, self.settings.temperature, self.logits_chunk)
        values = self.loss_terms(logps, self.reference_logps(rollout), rewards["reward"], rollout.completion_mask)
        if self.checked(values["loss"]) is None:
            return None
        values |= describe(rewards, rollout)
        self.log_all("train", values, batch_size=len(rollout.completions))
        return values["loss"]

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        rollout = sample(self.model, self.tokenizer, batch, 1, None, self.cfg.data.max_new_tokens, self.stops)
        self.log_all("val", describe(self.reward(rollout), rollout), batch_size=len(rollout.completions))


def describe(rewards: dict[str, torch.Tensor], rollout: Rollout) -> dict[str, torch.Tensor]:
    """Reward mean and spread (and each part's mean), and mean completion length."""
    total = rewards["reward"]
    std = total.std() if total.numel() > 1 else torch.zeros_like(total.mean())
    values = {"reward_mean": total.mean(), "reward_std": std}
    values |= {f"{name}_mean": v.nanmean() for name, v in rewards.items() if name != "reward"}
    return values | {"completion_length": rollout.completion_mask.sum(1).float().mean()}
