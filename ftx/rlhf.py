"""``ftx train method=rlhf``: the RLHF pipeline of InstructGPT (Ouyang et al. 2022,
§3.5) after its supervised step: a reward model trained on preference pairs, then
the policy optimized against it (here with RLOO or GRPO instead of PPO).

Two runs of :func:`ftx.train.train` on configs derived from the one composed:

1. ``RUN/reward/``: objective=reward on the preference data, ``rlhf.reward_steps``
   steps, the same model, method (LoRA settings) and quantization;
2. ``RUN/``: the policy, objective=rloo|grpo with ``objective.reward_model`` set to
   stage 1's run, ``trainer.max_steps`` steps, on the pairs' prompts.

A reward model given in ``objective.reward_model`` skips stage 1. RUN/metrics.json
is the policy's record with ``method: rlhf`` and the reward model's figures under
``reward_model.*``.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from ftx.config import check_rlhf
from ftx.tracking import write_metrics
from ftx.train import train

log = logging.getLogger(__name__)


def train_rlhf(cfg: DictConfig, callbacks: list | None = None) -> dict[str, Any]:
    """Run both stages; returns the policy's record (RUN/metrics.json)."""
    run_dir = Path(cfg.paths.output_dir)
    try:
        check_rlhf(cfg)  # both stages' configs, before either loads a weight
        reward_record = None
        if cfg.objective.reward_model is None:
            reward_cfg = stage_config(cfg, run_dir / "reward", objective="reward", steps=cfg.rlhf.reward_steps)
            log.info("rlhf stage 1: reward model in %s", run_dir / "reward")
            reward_record = train(reward_cfg)
        policy_cfg = stage_config(cfg, run_dir, objective=cfg.objective.name, steps=cfg.trainer.max_steps)
        if reward_record is not None:
            policy_cfg.objective.reward_model = str(run_dir / "reward")
    except BaseException as error:
        # The policy stage has not started: RUN/metrics.json says why (stage 1's own
        # record, when it got that far, is in RUN/reward/).
        record = {"method": "rlhf", "objective": cfg.objective.name, "status": "failed", "stage": "reward"}
        write_metrics(run_dir, record | {"error": f"{type(error).__name__}: {error}"})
        raise
    log.info("rlhf stage 2: policy (%s) against %s", cfg.objective.name, policy_cfg.objective.reward_model)
    record = train(policy_cfg, callbacks)
    record["reward_model"] = {"path": policy_cfg.objective.reward_model}
    if reward_record is not None:
        record["reward_model"] |= reward_record["quality"] | {"steps": reward_record["train"]["steps"]}
    write_metrics(run_dir, record)
    return record


def stage_config(cfg: DictConfig, out_dir: Path, objective: str, steps: int) -> DictConfig:
    """A copy of ``cfg`` for one stage (train() saves it in out_dir/.hydra/ as the run's own)."""
    stage = copy.deepcopy(cfg)
    stage.paths.output_dir = str(out_dir)
    stage.objective.name = objective
    stage.trainer.max_steps = steps
    if objective == "reward":
        stage.run_name = f"{cfg.run_name}-reward"
    return stage
