"""LoRA (Hu et al. 2021): a frozen Linear W gains a trainable low-rank update
(alpha/r)·B·A, A: r×d_in, B: d_out×r, B starting at zero. Its PEFT options: DoRA
(Liu et al. 2024, ``method.use_dora``: W's direction and a trained magnitude vector
of d_out), rsLoRA (Kalantari 2023, ``method.use_rslora``: scale alpha/sqrt(r)), and
``method.init_lora_weights``.
"""

from __future__ import annotations

import re
from typing import Any

from omegaconf import DictConfig

PEFT_TYPE = "LORA"

INITS = (True, False, "gaussian", "pissa", "pissa_niter_<n>", "olora", "orthogonal")
"""``method.init_lora_weights`` values PEFT takes without further config: true (Kaiming
A, zero B), false (random B: not a no-op, for debugging), gaussian, PiSSA (Meng et al.
2024; pissa_niter_<n>: with n fast-SVD iterations), OLoRA, orthogonal. (EVA, CorDA
and LoftQ need data-driven configs of their own that ftx does not pass.)"""

BASE_REWRITING_INITS = ("pissa", "olora")
"""Initialisations that move the base weights (PiSSA puts W's principal components
in the adapter and subtracts them from W; OLoRA its QR factors): with them, the
adapter disabled is not the starting model."""


def check(method: DictConfig) -> str | None:
    """What is wrong with the adapter's own settings (None: nothing)."""
    init = method.init_lora_weights
    known = isinstance(init, bool) or init in INITS or isinstance(init, str) and re.fullmatch(r"pissa_niter_\d+", init)
    if not known:
        shown = ", ".join(str(i).lower() if isinstance(i, bool) else i for i in INITS)
        return f"method.init_lora_weights={init} is not one of: {shown}."
    return None


def peft_config(method: DictConfig, targets: Any, task_type: str):
    from peft import LoraConfig

    return LoraConfig(
        task_type=task_type,
        r=method.r,
        lora_alpha=method.alpha,
        lora_dropout=method.dropout,
        target_modules=targets,
        use_rslora=method.use_rslora,
        use_dora=method.use_dora,
        bias=method.bias,
        init_lora_weights=method.init_lora_weights,
    )


def tensors(method: DictConfig, lin) -> list[int]:
    """A (r × d_in), B (d_out × r); DoRA's magnitude (d_out)."""
    return [method.r * lin.d_in, method.r * lin.d_out] + ([lin.d_out] if method.use_dora else [])


def cast_numels(method: DictConfig, lin) -> int:
    """A and B feed matmuls (the magnitude only scales)."""
    return method.r * (lin.d_in + lin.d_out)


def saved_per_token(method: DictConfig, lin, matmul_bytes: int) -> float:
    """The rank-r intermediate A·x; DoRA also keeps the base and LoRA outputs it rescales."""
    return matmul_bytes * method.r + (2 * matmul_bytes * lin.d_out if method.use_dora else 0)


def temporaries(method: DictConfig, targets: list) -> float:
    """DoRA forms the dense B·A and W + B·A of a target (fp32) to take their norm."""
    if not method.use_dora or not targets:
        return 0
    return max(lin.d_in * lin.d_out for lin in targets) * 4 * 2


def flops_per_token(method: DictConfig, targets: list) -> float:
    """6 per adapter parameter (forward, input and weight gradients); DoRA with
    dropout runs each target's base matmul again on the dropped input (forward +
    input gradient: 4 per base weight)."""
    added = 6 * sum(sum(tensors(method, lin)) for lin in targets)
    if method.use_dora and method.dropout > 0:
        added += 4 * sum(lin.d_in * lin.d_out for lin in targets)
    return added


def rewrites_base(method: DictConfig) -> bool:
    init = method.init_lora_weights
    return isinstance(init, str) and init.startswith(BASE_REWRITING_INITS)


def note(method: DictConfig) -> str:
    """What the planner's layer temporaries include for it."""
    return ", DoRA's dense B·A" if method.use_dora else ""
