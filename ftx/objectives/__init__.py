"""Objectives: one LightningModule per file, each readable on its own.

Every objective module states at its top, as literals (read without importing it:
:mod:`ftx.registry`):

- ``KIND``: the data it learns from: ``sft``, ``preference`` or ``prompts`` (any
  data with prompts, which the policy completes);
- ``HEAD``: ``causal_lm`` (a language model) or ``reward`` (one score per sequence);
- ``SAMPLES`` (optional): true when it samples completions and scores them with a
  reward (its ``objective.reward_*`` settings are then checked);
- ``REFERENCE`` (optional): true when it holds the policy to the starting model
  (with an adapter: the adapter disabled), so an adapter initialisation that
  rewrites the base weights is refused;

and provides the same few names, so the run pipeline (``ftx.train``) reads the same
for all of them:

- ``loaders(cfg, tokenizer, splits)``: train and held-out DataLoaders;
- ``evaluate(cfg, model, tokenizer, splits)``: the quality figures measured before
  and after training (``quality.*``);
- ``Module(model, cfg)``: the LightningModule.

Adding an objective is adding its module here and ``conf/objective/NAME.yaml``.
This file imports no torch: which data an objective learns from is checked before
anything heavy loads.
"""

from __future__ import annotations

from types import ModuleType

from ftx.registry import Registry

OBJECTIVES = Registry("ftx.objectives", "objective", required=("KIND", "HEAD"), optional=("SAMPLES", "REFERENCE"))


def load(name: str) -> ModuleType:
    return OBJECTIVES.load(name)
