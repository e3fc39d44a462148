"""Adapters ``method.adapter`` names, one module per adapter: how PEFT builds it on
a frozen base, and the planner's terms for it (:mod:`ftx.memory.plan` asks the
adapter, so a new one plans with its own numbers or not at all, never LoRA's).

Every adapter module states ``PEFT_TYPE`` (PEFT's name for it) and provides:

- ``peft_config(method, targets, task_type)``: the PEFT config (peft imported inside);
- ``tensors(method, lin)``: numels of the trainable tensors it adds to one Linear;
- ``cast_numels(method, lin)``: of those, the weights autocast casts for its matmuls;
- ``saved_per_token(method, lin, matmul_bytes)``: bytes per token its forward keeps
  for backward on one Linear, beyond the Linear's input;
- ``temporaries(method, targets)``: bytes alive only while one layer runs;
- ``flops_per_token(method, targets)``: training FLOPs per token it adds;
- ``note(method)``: what the planner's layer temporaries line adds for it (may be "");
- ``check(method)``: what is wrong with its settings, or None;
- ``rewrites_base(method)``: whether its initialisation changes the base weights
  (then the base with the adapter disabled is no longer the starting model).

Adding one is adding its module here (and a ``conf/method/NAME.yaml`` selecting it).
Plain Python at import: no torch, no peft.
"""

from __future__ import annotations

from ftx.registry import Registry

ADAPTERS = Registry("ftx.adapters", "adapter", required=("PEFT_TYPE",))
