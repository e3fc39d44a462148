"""The checks that run on a composed config before any weights load: each names
the key and the fix. :func:`validate` runs them all."""

from __future__ import annotations

import importlib.util
import math
import os
import re
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf


class ConfigError(ValueError):
    """A composed config that cannot run; the message names the key and the fix."""


def choices() -> dict[str, tuple[Any, ...]]:
    """The values each enumerated key takes. Names of extension points come from
    their registries (objectives, loggers, data formats: one place to add one); the
    rest are the libraries' own names."""
    from ftx.adapters import ADAPTERS
    from ftx.data.formats import FORMATS
    from ftx.objectives import OBJECTIVES
    from ftx.tracking.loggers import LOGGERS

    return {
        "method.adapter": (None, *ADAPTERS.names()),
        "method.bias": ("none", "all", "lora_only"),
        "quant.bits": (4, 8, 16),
        "quant.quant_type": ("nf4", "fp4"),
        "quant.compute_dtype": ("float32", "bfloat16", "float16"),
        "model.dtype": ("float32", "bfloat16", "float16"),
        "model.attn_implementation": ("eager", "sdpa", "flash_attention_2"),
        "objective.name": tuple(OBJECTIVES.names()),
        "objective.aggregation": ("sequence", "token"),
        "objective.reference": ("precomputed", "copy"),
        "data.format": ("auto", *FORMATS),
        "data.on_error": ("refuse", "skip"),
        "optim.name": ("adamw", "adamw_8bit", "paged_adamw_8bit"),
        "optim.scheduler": (
            "linear",
            "cosine",
            "constant",
            "constant_with_warmup",
            "cosine_with_restarts",
            "polynomial",
        ),
        "trainer.precision": ("32-true", "32", "bf16-mixed", "16-mixed", "bf16-true", "16-true", "64-true"),
        "logger.name": tuple(LOGGERS.names()),
        "logger.mode": ("auto", "online", "offline", "disabled"),
    }


def _select(cfg: DictConfig, key: str) -> Any:
    return OmegaConf.select(cfg, key, throw_on_missing=True)


def validate(cfg: DictConfig, check_sources: bool = True) -> None:
    """Check a composed config; raise ConfigError naming the key and the fix.

    Runs before anything heavy is imported or loaded, so a mistake costs a second,
    not a model load. ``check_sources=False`` skips the check that the model and
    tokenizer sources exist here: ``ftx plan`` of a preset that states its
    architecture (``model.arch``) needs neither.
    """
    for check in CHECKS:
        if check_sources or check is not check_sources_exist:
            check(cfg)


def check_choices(cfg: DictConfig) -> None:
    for key, allowed in choices().items():
        value = _select(cfg, key)
        if value not in allowed:
            shown = ", ".join("null" if a is None else str(a) for a in allowed)
            raise ConfigError(f"{key}={value} is not one of: {shown}.")


def check_method(cfg: DictConfig) -> None:
    method, quant = cfg.method, cfg.quant
    if quant.bits != 16 and method.adapter is None:
        raise ConfigError(
            f"quant={quant.name} quantizes the base to {quant.bits} bits, which cannot be "
            f"trained directly (method={method.name} has no adapter). Use method=qlora "
            f"(or method=lora quant={quant.name}), or quant=none for full fine-tuning."
        )
    if method.name == "qlora" and quant.bits != 4:
        raise ConfigError(
            f"method=qlora trains LoRA on a 4-bit base, but quant={quant.name}. "
            "Use quant=nf4 or quant=fp4, or method=lora for a 16/8-bit base."
        )
    if method.adapter is not None and method.r < 1:
        raise ConfigError(f"method.r={method.r} must be >= 1.")
    if not 0.0 <= method.dropout < 1.0:
        raise ConfigError(f"method.dropout={method.dropout} must be in [0, 1).")
    if isinstance(method.target_modules, str) and method.target_modules != "all-linear":
        # PEFT treats a plain string as a regex, which silently matches nothing when
        # mistyped; ask for a list instead.
        raise ConfigError(
            f"method.target_modules={method.target_modules!r}: use all-linear or a list, "
            "e.g. method.target_modules=[q_proj,v_proj]."
        )


def check_adapter(cfg: DictConfig) -> None:
    """The adapter's own settings, and an initialisation that keeps the reference an
    objective holds the policy to (the base with the adapter disabled) the starting model."""
    if cfg.method.adapter is None:
        return
    from ftx.adapters import ADAPTERS
    from ftx.objectives import OBJECTIVES

    adapter, objective = ADAPTERS.load(cfg.method.adapter), cfg.objective
    problem = adapter.check(cfg.method)
    if problem:
        raise ConfigError(problem)
    pulled = not OBJECTIVES.fact(objective.name, "SAMPLES") or objective.beta > 0  # beta 0: no KL to it
    if adapter.rewrites_base(cfg.method) and OBJECTIVES.fact(objective.name, "REFERENCE") and pulled:
        raise ConfigError(
            f"method.init_lora_weights={cfg.method.init_lora_weights} rewrites the base weights, but "
            f"objective={objective.name} holds the policy to the base with the adapter disabled, which would then "
            "not be the starting model. Use method.init_lora_weights=true (or gaussian), or method=full."
        )


def check_steps_and_sizes(cfg: DictConfig) -> None:
    if cfg.trainer.max_steps < 1 and cfg.trainer.max_epochs < 1:
        raise ConfigError("Set trainer.max_steps >= 1 or trainer.max_epochs >= 1.")
    for key in ("trainer.batch_size", "trainer.accumulate_grad_batches", "data.max_length", "data.eval_batch_size"):
        if _select(cfg, key) < 1:
            raise ConfigError(f"{key}={_select(cfg, key)} must be >= 1.")
    if not 1 <= cfg.trainer.cpu_mmap_threshold_mb <= 32:  # glibc refuses more than 32 MiB on 64-bit
        raise ConfigError(f"trainer.cpu_mmap_threshold_mb={cfg.trainer.cpu_mmap_threshold_mb} must be 1-32.")


def check_device_features(cfg: DictConfig) -> None:
    """What the device or an optional package must provide."""
    trainer = cfg.trainer
    if cfg.optim.name == "paged_adamw_8bit" and trainer.accelerator == "cpu":
        raise ConfigError(
            "optim.name=paged_adamw_8bit pages optimizer state through CUDA unified memory, "
            "which a CPU does not have. Use optim.name=adamw_8bit (runs on CPU) or trainer=gpu."
        )
    from ftx.tracking.loggers import LOGGERS

    needs = LOGGERS.fact(cfg.logger.name, "REQUIRES")
    if needs and importlib.util.find_spec(needs) is None:
        raise ConfigError(f"logger={cfg.logger.name} needs the {needs} package: pip install 'ftx[{needs}]'.")
    if trainer.accelerator == "cpu" and trainer.precision == "16-mixed":
        raise ConfigError(
            "trainer.precision=16-mixed needs a GPU (fp16 autocast with loss scaling). "
            "Use trainer.precision=bf16-mixed or 32-true on CPU."
        )


def check_distributed(cfg: DictConfig) -> None:
    trainer = cfg.trainer
    _check_distributed(trainer, _in_multirun(cfg))
    if trainer.on_nonfinite not in ("stop", "skip"):
        raise ConfigError(f"trainer.on_nonfinite={trainer.on_nonfinite}: use stop or skip.")
    if trainer.on_nonfinite == "skip" and _several_devices(trainer.devices, trainer.accelerator):
        raise ConfigError(
            "trainer.on_nonfinite=skip drops a step on one rank only, and the other ranks would wait for it "
            "forever; with several devices use trainer.on_nonfinite=stop."
        )


def check_checkpoints(cfg: DictConfig) -> None:
    trainer = cfg.trainer
    if trainer.resume not in ("auto", "never") and not Path(trainer.resume).is_file():
        raise ConfigError(
            f"trainer.resume={trainer.resume}: no such checkpoint file. Use auto (resume the run directory's "
            "checkpoints/last.ckpt if any), never, or the path of a .ckpt file."
        )
    if trainer.checkpoint_every is not None and trainer.checkpoint_every < 1:
        raise ConfigError(f"trainer.checkpoint_every={trainer.checkpoint_every} must be >= 1 (or null).")


def check_model(cfg: DictConfig) -> None:
    if (cfg.model.name_or_path is None) == (cfg.model.pretrain is None):
        raise ConfigError(
            "Set exactly one of model.name_or_path (a local directory or cached hub id) "
            "and model.pretrain (an ftx-built base); e.g. model.name_or_path=/path/to/model."
        )


def check_sources_exist(cfg: DictConfig) -> None:
    """The model and tokenizer are here (a directory, or a hub id in the local cache)."""
    model = cfg.model
    if model.name_or_path is not None:
        check_model_source(model.name_or_path, model.allow_download, key="model.name_or_path")
    if model.tokenizer is not None:
        check_model_source(model.tokenizer, model.allow_download, key="model.tokenizer")


def check_objective(cfg: DictConfig) -> None:
    """The objective's own settings: those that sample completions are policy-gradient methods."""
    from ftx.objectives import OBJECTIVES

    if OBJECTIVES.fact(cfg.objective.name, "SAMPLES"):
        check_policy_gradient(cfg)


def check_data(cfg: DictConfig) -> None:
    data = cfg.data
    check_task_metric(data)
    for key in ("data.train_file", "data.eval_file"):
        source = _select(cfg, key)
        # A hub dataset name is looked up in the local cache when the data loads.
        missing = source is not None and not Path(source).expanduser().exists()
        if missing and (Path(source).suffix.lower() in DATA_SUFFIXES or not _is_hub_id(source)):
            raise ConfigError(f"{key}: no such file or directory {source}.")
    for key in ("data.json_schema", "data.general_text"):
        path = _select(cfg, key)
        if path is not None and not Path(path).is_file():
            raise ConfigError(f"{key}: no such file {path}.")
    if data.eval_file is None and data.eval_split is None and not 0.0 < data.eval_fraction < 1.0:
        raise ConfigError(
            f"data.eval_fraction={data.eval_fraction} must be in (0, 1) "
            "when data.eval_file and data.eval_split are null."
        )


def check_plan(cfg: DictConfig) -> None:
    plan = cfg.plan
    if not 0.0 < plan.mfu <= 1.0:
        raise ConfigError(f"plan.mfu={plan.mfu} must be in (0, 1]: the share of the GPU's peak FLOP/s reached.")
    if plan.budget_gb is not None and plan.budget_gb <= 0:
        raise ConfigError(f"plan.budget_gb={plan.budget_gb} must be > 0, or null for no budget.")
    if plan.cpu_tflops <= 0:
        raise ConfigError(f"plan.cpu_tflops={plan.cpu_tflops} must be > 0 (the TFLOP/s a CPU run reaches).")


CHECKS = (
    check_choices,
    check_method,
    check_adapter,
    check_steps_and_sizes,
    check_device_features,
    check_distributed,
    check_checkpoints,
    check_model,
    check_sources_exist,
    check_objective,
    check_data,
    check_plan,
)
"""What :func:`validate` runs, in order (choices first: the others read the values)."""

DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".ndjson")


def _check_distributed(trainer: DictConfig, multirun: bool) -> None:
    """Lightning's ``ddp`` (also what ``auto`` picks for several devices) starts the
    other ranks by re-running the command line. For one run that works (Lightning
    pins the run directory); inside a Hydra multirun every rank would re-run the
    whole sweep (pytorch-lightning#11300). Under torchrun or a multi-task SLURM
    job the ranks exist already and nothing is re-run."""
    several = _several_devices(trainer.devices, trainer.accelerator) or trainer.num_nodes > 1
    if trainer.strategy == "fsdp" and trainer.accelerator == "cpu":
        raise ConfigError(
            "trainer.strategy=fsdp needs GPUs (trainer=fsdp); on CPU use trainer=ddp trainer.accelerator=cpu."
        )
    relaunches = trainer.strategy in ("ddp", "fsdp", "deepspeed") or (trainer.strategy == "auto" and several)
    if relaunches and several and multirun and not _ranks_started_outside():
        raise ConfigError(
            f"trainer.strategy={trainer.strategy} with several devices inside a multirun: Lightning would start "
            "the other ranks by re-running the command line, which re-runs the whole sweep in every rank. "
            "Launch each trial as its own job (hydra/launcher=submitit_slurm with tasks_per_node = devices), "
            "use trainer.strategy=ddp_spawn, or one device per trial."
        )


def _in_multirun(cfg: DictConfig) -> bool:
    """A sweeper checks the config with its hydra node; a trial's task gets it without."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    mode = OmegaConf.select(cfg, "hydra.mode", default=None)
    if mode is None and HydraConfig.initialized():
        mode = HydraConfig.get().mode
    return mode in (RunMode.MULTIRUN, "MULTIRUN")


def _ranks_started_outside() -> bool:
    """torchrun, or a SLURM job with one task per device: Lightning launches nothing."""
    return "TORCHELASTIC_RUN_ID" in os.environ or int(os.environ.get("SLURM_NTASKS", "1")) > 1


def _several_devices(devices: Any, accelerator: str) -> bool:
    if isinstance(devices, int):
        return devices > 1 or devices == -1 and accelerator != "cpu"
    if isinstance(devices, str):
        # "2", "0,1", "auto" / "-1" (all visible accelerators; a CPU counts as one)
        if devices.strip() in ("auto", "-1"):
            return accelerator != "cpu"
        parts = [p for p in devices.split(",") if p.strip()]
        return len(parts) > 1 or len(parts) == 1 and "," not in devices and int(parts[0]) > 1
    return len(devices) > 1  # a list of device indices


def check_task_metric(data: DictConfig) -> None:
    from ftx.metrics import SETTINGS, TASK_METRICS

    metric, builtins = data.task_metric, (*TASK_METRICS, *SETTINGS)
    if metric is None or metric in TASK_METRICS:
        return
    if metric in SETTINGS:
        key, example = SETTINGS[metric]
        if not _select(data, key.removeprefix("data.")):
            raise ConfigError(f"data.task_metric={metric} needs {key}, e.g. {key}={example}.")
        return
    check_callable("data.task_metric", metric, builtins)


def check_callable(key: str, name: str, builtins: tuple[str, ...]) -> None:
    """``name`` must be importable as package.module:function (it is not a builtin)."""
    module_name, _, function = name.partition(":")
    if not function:
        raise ConfigError(
            f"{key}={name}: not one of {', '.join(builtins)}, and not a callable named as package.module:function."
        )
    try:
        found = getattr(importlib.import_module(module_name), function, None)
    except ImportError as error:
        raise ConfigError(f"{key}={name}: cannot import {module_name} ({error}).") from None
    if not callable(found):
        raise ConfigError(f"{key}={name}: {module_name} has no function {function}.")


def reward_part(name: str) -> str:
    """A reward function's name in logs and ``objective.reward_weights``: a built-in's
    name, or the function's own for ``package.module:function`` (as TRL logs it)."""
    return name.rpartition(":")[2]


def check_policy_gradient(cfg: DictConfig) -> None:
    """rloo/grpo: settings in range, and a reward to optimize that exists and fits.

    Under method=rlhf the reward model comes from the pipeline's first stage, so it
    may be missing here (a configured one is used instead of training one).
    """
    objective = cfg.objective
    if objective.num_generations < 2:
        raise ConfigError(
            f"objective.num_generations={objective.num_generations}: {objective.name} compares completions of "
            "the same prompt, so it needs at least 2 (4-16 is usual)."
        )
    if objective.temperature <= 0 or not 0 < objective.top_p <= 1:
        raise ConfigError("objective.temperature must be > 0 and objective.top_p in (0, 1] (sampling settings).")
    from ftx.metrics import TASK_METRICS

    for name in objective.reward_functions:
        if name not in TASK_METRICS:  # each scored against the prompt's reference
            check_callable("objective.reward_functions", name, tuple(TASK_METRICS))
    parts = [reward_part(name) for name in objective.reward_functions]
    if len(set(parts)) < len(parts):
        raise ConfigError(
            f"objective.reward_functions={list(objective.reward_functions)}: two reward functions share a name "
            "(logs and objective.reward_weights know each by its function name); rename one."
        )
    if objective.reward_model is not None or cfg.method.name == "rlhf":
        parts.insert(0, "reward_model")
    for name, weight in objective.reward_weights.items():
        if name not in parts:
            raise ConfigError(
                f"objective.reward_weights.{name}: no reward part of that name; the parts are "
                f"{', '.join(parts) or 'none'} (reward_model when objective.reward_model is set or "
                "method=rlhf, and each of objective.reward_functions)."
            )
        if not math.isfinite(weight):
            raise ConfigError(f"objective.reward_weights.{name}={weight} must be a finite number.")
    if objective.reward_model is not None:
        check_reward_model(objective.reward_model)
    elif not objective.reward_functions and cfg.method.name != "rlhf":
        raise ConfigError(
            f"objective={objective.name} needs a reward: set objective.reward_model=RUN_DIR (a run of "
            "ftx train objective=reward) and/or objective.reward_functions=[json_valid], or run the whole "
            "pipeline with method=rlhf."
        )


def check_rlhf(cfg: DictConfig) -> None:
    """method=rlhf: the pipeline's policy stage is rloo or grpo (then :func:`validate`
    checks each stage's config as it starts)."""
    from ftx.objectives import OBJECTIVES

    if not OBJECTIVES.fact(cfg.objective.name, "SAMPLES"):
        raise ConfigError(
            "method=rlhf trains a reward model, then the policy with objective=rloo or grpo, "
            f"not objective={cfg.objective.name}. Use objective=rloo (method=rlhf's default) or objective=grpo."
        )
    if cfg.rlhf.reward_steps < 1:
        raise ConfigError(f"rlhf.reward_steps={cfg.rlhf.reward_steps} must be >= 1.")
    validate(cfg)


def check_reward_model(path_name: str) -> None:
    """A reward run directory or a one-output sequence-classification model, read
    from its config files only (no weights)."""
    import json

    path = Path(path_name).expanduser()
    fix = "Train one with `ftx train objective=reward` and pass its run directory, or set objective.reward_model=null."
    if not path.is_dir():
        raise ConfigError(f"objective.reward_model={path_name}: no such directory. {fix}")
    run_config = path / ".hydra" / "config.yaml"
    if run_config.is_file():
        trained = OmegaConf.load(run_config).objective.name
        if trained != "reward":
            raise ConfigError(
                f"objective.reward_model={path_name} is a run of objective={trained}, not a reward model. {fix}"
            )
        if not (path / "adapter").is_dir() and not (path / "model").is_dir():
            raise ConfigError(
                f"objective.reward_model={path_name}: the run has no adapter/ or model/ (did it complete?)."
            )
        return
    config = path / "config.json"
    if not config.is_file():
        raise ConfigError(f"objective.reward_model={path_name}: neither an ftx run nor a model (no config.json). {fix}")
    model_config = json.loads(config.read_text())
    architectures = model_config.get("architectures") or []
    labels = len(model_config.get("id2label") or {}) or model_config.get("num_labels", 2)
    if not any(a.endswith("ForSequenceClassification") for a in architectures) or labels != 1:
        raise ConfigError(
            f"objective.reward_model={path_name} is {', '.join(architectures) or 'a model'} with {labels} output(s), "
            f"not a reward model (a sequence-classification head with one output). {fix}"
        )


def check_model_source(name_or_path: str, allow_download: bool, key: str) -> None:
    """A model source must be a directory here, or a hub id already in the local cache.

    Checked from the config alone (no weights), so a typo fails in a second.
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if key == "model.name_or_path" and not (path / "config.json").is_file():
            raise ConfigError(f"{key}={name_or_path}: the directory has no config.json.")
        if key == "model.name_or_path" and not any(path.glob("*.safetensors")):
            pickled = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
            found = f" only pickled weights ({', '.join(pickled)})" if pickled else " no weights"
            raise ConfigError(
                f"{key}={name_or_path}: the directory holds{found}. ftx loads weights from safetensors only "
                "(unpickling a .bin can run code). Convert it once where you trust the file: "
                "AutoModelForCausalLM.from_pretrained(DIR).save_pretrained(NEW_DIR) writes safetensors."
            )
        return
    if not _is_hub_id(name_or_path):
        raise ConfigError(f"{key}={name_or_path}: no such directory.")
    if allow_download:
        return
    from huggingface_hub import try_to_load_from_cache

    if not isinstance(try_to_load_from_cache(name_or_path, "config.json"), str):
        raise ConfigError(
            f"{key}={name_or_path}: no such directory, and no such model in the local "
            "Hugging Face cache. Download it once (hf download), point to a local "
            "directory, or set model.allow_download=true."
        )


def _is_hub_id(name: str) -> bool:
    """``name`` or ``org/name``, as the hub spells repository ids (not a path)."""
    return bool(re.fullmatch(r"[\w.-]+(/[\w.-]+)?", name)) and not name.startswith((".", "~"))
