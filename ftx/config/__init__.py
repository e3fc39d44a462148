"""ftx's configuration: the schema (:mod:`ftx.config.schema`, dataclasses only: the
single source of defaults and their documentation), the checks that run on a
composed config before any weights load (:mod:`ftx.config.checks`), and composition
(:mod:`ftx.config.compose`: ConfigStore, resolvers, resource paths, run naming).

Imports no torch, transformers, peft or trl: composing and printing a config
(``ftx train --cfg job``) must stay fast.
"""

from ftx.config.checks import (
    CHECKS,
    ConfigError,
    check_callable,
    check_model_source,
    check_policy_gradient,
    check_reward_model,
    check_rlhf,
    check_task_metric,
    choices,
    reward_part,
    validate,
)
from ftx.config.compose import (
    as_container,
    compose_config,
    config_dir,
    project_root,
    register_configs,
    register_resolvers,
    run_stamp,
    sweep_files,
)
from ftx.config.schema import (
    Config,
    DataConfig,
    LoggerConfig,
    MethodConfig,
    ModelConfig,
    ObjectiveConfig,
    OptimConfig,
    PathsConfig,
    PlanConfig,
    PretrainConfig,
    QuantConfig,
    RlhfConfig,
    SweeperConfig,
    SweepTrialConfig,
    TrainerConfig,
)

__all__ = [
    "CHECKS",
    "Config",
    "ConfigError",
    "DataConfig",
    "LoggerConfig",
    "MethodConfig",
    "ModelConfig",
    "ObjectiveConfig",
    "OptimConfig",
    "PathsConfig",
    "PlanConfig",
    "PretrainConfig",
    "QuantConfig",
    "RlhfConfig",
    "SweepTrialConfig",
    "SweeperConfig",
    "TrainerConfig",
    "as_container",
    "check_callable",
    "check_model_source",
    "check_policy_gradient",
    "check_reward_model",
    "check_rlhf",
    "check_task_metric",
    "choices",
    "compose_config",
    "config_dir",
    "project_root",
    "register_configs",
    "register_resolvers",
    "reward_part",
    "run_stamp",
    "sweep_files",
    "validate",
]
