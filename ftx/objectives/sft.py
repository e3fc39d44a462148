"""Supervised fine-tuning as a LightningModule.

Loss: next-token cross-entropy over the completion tokens (prompt tokens carry
label -100 when ``objective.completion_only``), the objective of instruction
tuning (Ouyang et al. 2022, §3.5; Wei et al. 2021). The transformers model computes
it with labels shifted inside the model; this module only wires the loop.

With an adapter, only trainable tensors go into checkpoints: the frozen (possibly
4-bit) base is reloaded from its source on resume, not copied into every file.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from omegaconf import DictConfig


class SFTModule(L.LightningModule):
    def __init__(self, model: torch.nn.Module, optim: DictConfig, adapter: bool) -> None:
        super().__init__()
        self.model = model
        self.optim = optim
        self.adapter = adapter
        # Checkpoints of adapter runs hold trainable tensors only (see on_save_checkpoint).
        self.strict_loading = not adapter

    def forward(self, **batch: torch.Tensor) -> Any:
        return self.model(**batch)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        # No KV cache while training: it is never read, and with one transformers
        # stops deriving per-example masks from the position ids of packed rows.
        loss = self.model(**batch, use_cache=False).loss
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite training loss {loss.item()} at step {self.global_step}")
        self.log("train.loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        loss = self.model(**batch, use_cache=False).loss
        self.log("val.loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])

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


def make_optimizer(optim: DictConfig, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """AdamW (Loshchilov & Hutter 2019): torch's, or bitsandbytes' 8-bit / paged
    variants (Dettmers et al. 2022), which store both moments in 8 bits."""
    kwargs = {"lr": optim.lr, "weight_decay": optim.weight_decay, "betas": tuple(optim.betas), "eps": optim.eps}
    if optim.name == "adamw":
        return torch.optim.AdamW(params, **kwargs)
    import bitsandbytes as bnb

    optimizer_class = {"adamw_8bit": bnb.optim.AdamW8bit, "paged_adamw_8bit": bnb.optim.PagedAdamW8bit}[optim.name]
    return optimizer_class(params, **kwargs)
