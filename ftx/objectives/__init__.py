"""Objectives: one LightningModule per file, each readable on its own.

Every objective module provides the same few names, so the run pipeline
(``ftx.train``) reads the same for all of them:

- ``HEAD``: ``causal_lm`` (a language model) or ``reward`` (one score per sequence);
- ``loaders(cfg, tokenizer, splits)``: train and held-out DataLoaders;
- ``evaluate(cfg, model, tokenizer, splits)``: the quality figures measured before
  and after training (``quality.*``);
- ``Module(model, cfg)``: the LightningModule.

This file imports no torch: which data an objective learns from is checked before
anything heavy loads.
"""

from __future__ import annotations

import importlib
from types import ModuleType

DATA_KIND = {"sft": "sft", "reward": "preference", "dpo": "preference", "rloo": "prompts", "grpo": "prompts"}
"""The kind of data (ftx.data formats) each objective learns from; ``prompts``:
examples or pairs, whose prompts the policy completes (rloo, grpo)."""


def load(name: str) -> ModuleType:
    return importlib.import_module(f"ftx.objectives.{name}")
