"""The output head and its loss in chunks of tokens, never a (batch, length,
vocabulary) tensor of logits.

At real vocabularies (128K-152K tokens) the logits of a batch dominate training
memory: Hugging Face's causal-LM loss upcasts B×T×V logits to fp32 and keeps
their log-softmax and its gradient (2.3 GiB each for 4×512 tokens of Qwen2.5's
151,936). Here the decoder's final hidden states are taken only where a token is
trained (a label that is not -100), and the head and the log-softmax run on
``chunk`` of them at a time, each chunk under activation checkpointing: its logits
exist only while that chunk is computed, once in the forward pass and once more in
the backward pass (one extra head matmul per chunk, as in torchtune's chunked
cross-entropy and TRL's chunked log-probs). Plain PyTorch, so CPU and GPU alike,
and any head module: tied to the embeddings, untied, or wrapped by an adapter.
``chunk`` 0 keeps the model's own full-logits forward.
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


def labelled_logps(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], chunk: int, temperature: float = 1.0
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """log p(label | tokens before it) of every labelled token, in row-major order,
    with its (row, position) in ``batch["labels"][:, 1:]`` (labels predict the
    next token, as in Hugging Face's loss); logits divided by ``temperature``."""
    labels = batch["labels"][:, 1:]
    where = (labels != IGNORE_INDEX).nonzero(as_tuple=True)
    targets = labels[where]
    if chunk <= 0:  # the model's own forward: full logits
        logits = model(**_inputs(batch), use_cache=False).logits[:, :-1][where]
        return _logps(logits, targets, temperature), where
    decoder, head, transform = _parts(model)
    hidden = decoder(**_inputs(batch), use_cache=False).last_hidden_state[:, :-1][where]
    pieces = [
        checkpoint(
            _chunk_logps,
            head,
            transform,
            hidden[i : i + chunk],
            targets[i : i + chunk],
            temperature,
            use_reentrant=False,
        )
        for i in range(0, len(targets), chunk)
    ]
    return (torch.cat(pieces) if pieces else hidden.new_zeros(0)), where


def causal_lm_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor], chunk: int) -> torch.Tensor:
    """Mean next-token cross-entropy over the labelled tokens (Hugging Face's loss)."""
    logps, _ = labelled_logps(model, batch, chunk)
    return -logps.mean()


def sequence_logps(model: torch.nn.Module, batch: dict[str, torch.Tensor], chunk: int) -> torch.Tensor:
    """Sum of log p(token) over each row's labelled tokens (B,)."""
    logps, (rows, _) = labelled_logps(model, batch, chunk)
    return logps.new_zeros(batch["labels"].shape[0]).index_add(0, rows, logps)


def _chunk_logps(
    head: torch.nn.Module, transform: Callable, hidden: torch.Tensor, targets: torch.Tensor, temperature: float
) -> torch.Tensor:
    return _logps(transform(head(hidden)), targets, temperature)


def _logps(logits: torch.Tensor, targets: torch.Tensor, temperature: float) -> torch.Tensor:
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    return -F.cross_entropy(logits, targets, reduction="none")


def _inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if batch.get(k) is not None}
