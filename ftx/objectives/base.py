"""What every objective's LightningModule shares: the optimizer and schedule
(``optim.*``), and checkpoints that hold only trainable tensors under adapters."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from omegaconf import DictConfig


class ObjectiveModule(L.LightningModule):
    def __init__(self, model: torch.nn.Module, cfg: DictConfig) -> None:
        super().__init__()
        self.model = model
        self.optim = cfg.optim
        self.adapter = cfg.method.adapter is not None
        # Checkpoints of adapter runs hold trainable tensors only (see on_save_checkpoint):
        # the frozen (possibly 4-bit) base is reloaded from its source on resume.
        self.strict_loading = not self.adapter
        self.on_nonfinite = cfg.trainer.on_nonfinite
        self.logits_chunk = cfg.trainer.logits_chunk
        self.skipped_steps = 0

    def configure_optimizers(self) -> dict[str, Any]:
        from transformers import get_scheduler

        params = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = make_optimizer(self.optim, params)
        total = int(self.trainer.estimated_stepping_batches)
        warmup = self.optim.warmup_steps or round(self.optim.warmup_ratio * total)
        scheduler = get_scheduler(self.optim.scheduler, optimizer, num_warmup_steps=warmup, num_training_steps=total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.adapter:
            trainable = {f"model.{name}" for name, p in self.model.named_parameters() if p.requires_grad}
            checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}

    def checked(self, loss: torch.Tensor) -> torch.Tensor | None:
        """The loss to train on; a NaN or inf one stops the run naming the step
        (``trainer.on_nonfinite=stop``) or, with ``skip``, returns None: Lightning then
        skips the backward pass and the optimizer step of this batch."""
        if torch.isfinite(loss):
            return loss
        if self.on_nonfinite == "skip":
            self.skipped_steps += 1
            self.log("train.skipped_steps", float(self.skipped_steps))
            return None
        raise FloatingPointError(
            f"non-finite training loss ({loss.item()}) at step {self.global_step}; lower optim.lr, keep "
            "trainer.gradient_clip_val on, or set trainer.on_nonfinite=skip to drop such steps"
        )

    def log_all(self, prefix: str, values: dict[str, torch.Tensor], batch_size: int) -> None:
        """Log ``values`` as ``prefix.name``; the loss and RL's mean reward also in the
        progress bar (and the progress lines without one)."""
        for name, value in values.items():
            shown = name in ("loss", "reward_mean")
            self.log(f"{prefix}.{name}", value, prog_bar=shown, batch_size=batch_size)


class PairModule(ObjectiveModule):
    """An objective on preference pairs: each batch holds B chosen then B rejected
    sequences (:func:`ftx.data.tokenized.make_pair_loader`), and ``step`` turns it
    into the loss and figures, logged per pair. Dropout is off (see :func:`disable_dropout`)."""

    def __init__(self, model: torch.nn.Module, cfg: DictConfig) -> None:
        super().__init__(model, cfg)
        disable_dropout(model)

    def step(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """{"loss": …, figures …} of one batch of pairs."""
        raise NotImplementedError

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor | None:
        values = self.step(batch)
        if self.checked(values["loss"]) is None:
            return None
        self.log_all("train", values, batch_size=batch["input_ids"].shape[0] // 2)
        return values["loss"]

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self.log_all("val", self.step(batch), batch_size=batch["input_ids"].shape[0] // 2)


def evaluate_pairs(cfg: DictConfig, model, tokenizer, splits, logps, pair_cfg: DictConfig | None = None) -> dict:
    """The SFT figures on the chosen responses (held-out loss, task score against the
    chosen response, forgetting), and ``pair_accuracy``: the share of held-out pairs
    whose chosen response scores higher by ``logps(model, batch, chunk)`` (one value
    per sequence). ``pair_cfg``: the config the pairs are tokenized with (default ``cfg``)."""
    from ftx.data.tokenized import make_pair_loader
    from ftx.evaluation import evaluate, inference

    scores = evaluate(cfg, model, tokenizer, [pair.as_examples()[0] for pair in splits.eval])
    device = next(model.parameters()).device
    wins = []
    with inference(model):
        for batch in make_pair_loader(pair_cfg or cfg, tokenizer, splits.eval, shuffle=False):
            chosen, rejected = logps(model, {k: v.to(device) for k, v in batch.items()}, cfg.trainer.logits_chunk)
            wins.append(chosen > rejected)
    return scores | {"pair_accuracy": torch.cat(wins).float().mean().item()}


def make_optimizer(optim: DictConfig, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """AdamW (Loshchilov & Hutter 2019): torch's, or bitsandbytes' 8-bit / paged
    variants (Dettmers et al. 2022), which store both moments in 8 bits."""
    kwargs = {"lr": optim.lr, "weight_decay": optim.weight_decay, "betas": tuple(optim.betas), "eps": optim.eps}
    if optim.name == "adamw":
        return torch.optim.AdamW(params, **kwargs)
    import bitsandbytes as bnb

    optimizer_class = {"adamw_8bit": bnb.optim.AdamW8bit, "paged_adamw_8bit": bnb.optim.PagedAdamW8bit}[optim.name]
    return optimizer_class(params, **kwargs)


def disable_dropout(model: torch.nn.Module) -> None:
    """Preference losses compare log-probabilities of two sequences (and of the
    policy against its reference); dropout noise in one side only biases them, so
    they train without it, as TRL's trainers do by default (``disable_dropout``)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
