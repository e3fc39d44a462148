"""The output head and its loss in chunks of tokens, never a (batch, length,
vocabulary) tensor of logits.

At real vocabularies (128K-152K tokens) the logits of a batch dominate training
memory: Hugging Face's causal-LM loss upcasts B×T×V logits to fp32 and keeps
their log-softmax and its gradient (2.3 GiB each for 4×512 tokens of Qwen2.5's
151,936). Here the decoder's final hidden states are taken only where a token is
trained (a label that is not -100), and the head and the log-softmax run on
``chunk`` of them at a time: a chunk's logits exist only while that chunk is
computed. Plain PyTorch, so CPU and GPU alike, and any head module: tied to the
embeddings, untied, or wrapped by an adapter. ``chunk`` 0 keeps the model's own
full-logits forward.

The gradient is taken in the forward pass where it can be, so that the head runs
once per chunk, as in the full-logits path (Liger-Kernel's fused linear
cross-entropy does the same in Triton):

* a frozen head (LoRA, QLoRA, DoRA: the head is not adapted): each token's
  log-prob depends on its own hidden state only, so d log p / d hidden is one
  vector per token, kept (tokens × hidden, as small as the hidden states) and
  scaled by the incoming gradient in the backward pass: exact for any loss
  built on the log-probs (SFT's mean, DPO's sequence sums, GRPO's weighted
  tokens);
* a trained head under a scalar loss (full fine-tuning, an adapter on the
  head, SFT's mean cross-entropy): the gradients of the hidden states and of
  the head's parameters are accumulated chunk by chunk in the forward pass and
  scaled by the loss's incoming gradient;
* a trained head under per-token log-probs (full fine-tuning under DPO or RL):
  each chunk runs under activation checkpointing, its logits computed once
  more in the backward pass (torchtune's chunked cross-entropy, TRL's chunked
  log-probs).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100


def _parts(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module, Callable[[torch.Tensor], torch.Tensor]]:
    """(decoder, head, the transform the model applies to its logits) of a causal
    LM, or of the one a PEFT model wraps (its adapters stay in place)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = base.config
    softcap = getattr(config, "final_logit_softcapping", None)  # Gemma 2
    scale = getattr(config, "logit_scale", None)  # Cohere
    divisor = getattr(config, "logits_scaling", None)  # Granite

    def transform(logits: torch.Tensor) -> torch.Tensor:
        if scale is not None:
            logits = logits * scale
        if divisor is not None:
            logits = logits / divisor
        if softcap is not None:
            logits = torch.tanh(logits / softcap) * softcap
        return logits

    return base.get_decoder(), base.get_output_embeddings(), transform


def _labelled_hidden(model: torch.nn.Module, batch: dict[str, torch.Tensor]):
    """(final hidden states of the labelled positions, their targets, (row,
    position) of each in ``batch["labels"][:, 1:]``, head, logit transform)."""
    labels = batch["labels"][:, 1:]
    where = (labels != IGNORE_INDEX).nonzero(as_tuple=True)
    decoder, head, transform = _parts(model)
    hidden = decoder(**_inputs(batch), use_cache=False).last_hidden_state[:, :-1][where]
    return hidden, labels[where], where, head, transform


def labelled_logps(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], chunk: int, temperature: float = 1.0
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """log p(label | tokens before it) of every labelled token, in row-major order,
    with its (row, position) in ``batch["labels"][:, 1:]`` (labels predict the
    next token, as in Hugging Face's loss); logits divided by ``temperature``."""
    if chunk <= 0:  # the model's own forward: full logits
        labels = batch["labels"][:, 1:]
        where = (labels != IGNORE_INDEX).nonzero(as_tuple=True)
        logits = model(**_inputs(batch), use_cache=False).logits[:, :-1][where]
        return _logps(logits, labels[where], temperature), where
    hidden, targets, where, head, transform = _labelled_hidden(model, batch)
    step = _HeadStep(head, transform, targets, temperature, chunk)
    if not (torch.is_grad_enabled() and (hidden.requires_grad or step.params)):
        with torch.no_grad():
            return step.logps(hidden), where
    if not step.params:
        return _FrozenHeadLogps.apply(hidden, step), where
    pieces = [
        checkpoint(step.chunk_logps, hidden[i : i + chunk], i, use_reentrant=False)
        for i in range(0, len(targets), chunk)
    ]
    return (torch.cat(pieces) if pieces else hidden.new_zeros(0)), where


def causal_lm_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor], chunk: int) -> torch.Tensor:
    """Mean next-token cross-entropy over the labelled tokens (Hugging Face's loss)."""
    if chunk > 0 and torch.is_grad_enabled():
        hidden, targets, _, head, transform = _labelled_hidden(model, batch)
        step = _HeadStep(head, transform, targets, 1.0, chunk)
        if step.params:
            return _TrainedHeadLoss.apply(hidden, step, *step.params)
        return -_FrozenHeadLogps.apply(hidden, step).mean()
    logps, _ = labelled_logps(model, batch, chunk)
    return -logps.mean()


def sequence_logps(model: torch.nn.Module, batch: dict[str, torch.Tensor], chunk: int) -> torch.Tensor:
    """Sum of log p(token) over each row's labelled tokens (B,)."""
    logps, (rows, _) = labelled_logps(model, batch, chunk)
    return logps.new_zeros(batch["labels"].shape[0]).index_add(0, rows, logps)


class _HeadStep:
    """The head, its logit transform and the targets, applied a chunk at a time."""

    def __init__(self, head, transform, targets: torch.Tensor, temperature: float, chunk: int):
        self.head, self.transform, self.targets = head, transform, targets
        self.temperature, self.chunk = temperature, chunk
        self.params = [p for p in head.parameters() if p.requires_grad]

    def chunk_logps(self, hidden: torch.Tensor, start: int) -> torch.Tensor:
        targets = self.targets[start : start + len(hidden)]
        return _logps(self.transform(self.head(hidden)), targets, self.temperature)

    def logps(self, hidden: torch.Tensor) -> torch.Tensor:
        pieces = [self.chunk_logps(hidden[i : i + self.chunk], i) for i in range(0, len(hidden), self.chunk)]
        return torch.cat(pieces) if pieces else hidden.new_zeros(0, dtype=torch.float32)

    def with_grads(self, hidden: torch.Tensor, scale: float, wrt_params: bool):
        """Per chunk: log-probs, and d(scale · Σ log p)/d hidden and (when
        ``wrt_params``) /d head parameters, summed over the chunks."""
        logps, hidden_grads, param_grads = [], [], []
        for i in range(0, len(hidden), self.chunk):
            with torch.enable_grad():
                piece = hidden[i : i + self.chunk].detach().requires_grad_(True)
                out = self.chunk_logps(piece, i)
                grads = torch.autograd.grad(out.sum() * scale, [piece, *(self.params if wrt_params else [])])
            logps.append(out.detach())
            hidden_grads.append(grads[0])
            if not param_grads:  # the first chunk's gradients are the running sums
                param_grads = list(grads[1:])
            else:
                for total, grad in zip(param_grads, grads[1:], strict=True):
                    total.add_(grad)
        if not logps:
            zeros = [torch.zeros_like(p) for p in self.params] if wrt_params else []
            return hidden.new_zeros(0, dtype=torch.float32), torch.zeros_like(hidden), zeros
        return torch.cat(logps), torch.cat(hidden_grads), param_grads


class _FrozenHeadLogps(torch.autograd.Function):
    """Per-token log-probs through a head without trained parameters: token t's
    log-prob depends on hidden state t alone, so its gradient is one vector per
    token, computed with the log-prob and scaled by the incoming gradient."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, step: _HeadStep) -> torch.Tensor:
        logps, grads, _ = step.with_grads(hidden, 1.0, wrt_params=False)
        ctx.save_for_backward(grads)
        return logps

    @staticmethod
    def backward(ctx, grad_logps: torch.Tensor):
        (grads,) = ctx.saved_tensors
        return grads * grad_logps[:, None].to(grads.dtype), None


class _TrainedHeadLoss(torch.autograd.Function):
    """Mean cross-entropy through a head with trained parameters: the gradients
    of the hidden states and of the head's parameters, accumulated chunk by
    chunk in the forward pass and scaled by the loss's incoming gradient."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, step: _HeadStep, *params: torch.Tensor) -> torch.Tensor:
        count = max(len(hidden), 1)
        logps, hidden_grad, param_grads = step.with_grads(hidden, -1.0 / count, wrt_params=True)
        ctx.save_for_backward(hidden_grad)
        ctx.param_grads = param_grads
        return -logps.sum() / count

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        (hidden_grad,) = ctx.saved_tensors
        param_grads, ctx.param_grads = ctx.param_grads, None
        return hidden_grad * grad_loss.to(hidden_grad.dtype), None, *(g.mul_(grad_loss) for g in param_grads)


def _logps(logits: torch.Tensor, targets: torch.Tensor, temperature: float) -> torch.Tensor:
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    return -F.cross_entropy(logits, targets, reduction="none")


def _inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if batch.get(k) is not None}
