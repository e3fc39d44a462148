"""The structured-config schema: the single source of ftx's defaults, and the checks
that run on a composed config before any weights load.

Each YAML file under ``conf/`` selects or overrides values of these dataclasses;
Hydra validates every value against them (types, unknown keys). Cross-field checks
that types cannot express live in :func:`validate`, which names the key and the fix.

This module imports no torch, transformers, peft or trl: composing and printing a
config (``ftx train --cfg job``) must stay fast.
"""

from __future__ import annotations

import importlib.util
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf

# --------------------------------------------------------------------------- schema


@dataclass
class PretrainConfig:
    """How ftx builds its own small base model when no checkpoint is given.

    The base is a Llama-architecture model pretrained on the Python documentation
    that ships with the interpreter, so the default run fine-tunes a model that
    already knows English and code, offline. Built once, cached by a hash of these
    values under ``paths.cache_dir``.
    """

    corpus: str = "python-docs"
    """Text to pretrain on; ``python-docs`` = pydoc topics + stdlib docstrings."""
    vocab_size: int = 2048
    """Byte-level BPE vocabulary trained on the corpus."""
    hidden_size: int = 192
    """Model width; memory and time grow with its square."""
    intermediate_size: int = 512
    """MLP width."""
    num_layers: int = 4
    """Transformer blocks."""
    num_heads: int = 6
    """Attention heads (head dim = hidden_size / num_heads)."""
    tie_embeddings: bool = True
    """Share input embeddings and output head (fewer parameters, smaller logit range)."""
    seq_len: int = 128
    """Context length used for pretraining and stored as max_position_embeddings x4."""
    steps: int = 600
    """Optimizer steps; ~150 s on 2 CPU cores at the defaults."""
    batch_size: int = 16
    """Sequences per step."""
    lr: float = 3.0e-3
    """Peak AdamW learning rate (cosine decay, 5% warmup)."""
    seed: int = 0
    """Seed for tokenizer-independent randomness (init, batch order)."""


@dataclass
class ModelConfig:
    """The base model: a local directory, a hub id from the local cache, or ftx-built."""

    name: str = MISSING
    """Short name recorded in metrics.json and used in run names."""
    name_or_path: str | None = None
    """Local HF causal-LM directory or hub id; null together with ``pretrain`` = ftx-built."""
    tokenizer: str | None = None
    """Tokenizer directory or hub id; null = same as the model."""
    pretrain: PretrainConfig | None = None
    """Set to build the base with ftx (see PretrainConfig) instead of loading one."""
    dtype: str = "float32"
    """Weight dtype of the frozen/base weights: float32, bfloat16, float16."""
    attn_implementation: str = "sdpa"
    """eager, sdpa or flash_attention_2 (GPU only); sdpa saves activation memory."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward: less memory, ~30% slower."""
    allow_download: bool = False
    """Let transformers reach the hub; off = local paths and the local cache only."""
    trust_remote_code: bool = False
    """Run model code shipped with a checkpoint. Off unless you trust the source."""
    arch: dict[str, Any] | None = None
    """Architecture facts for ``ftx plan`` (transformers config kwargs with model_type),
    so a model plans without its weights; null = read config.json from the source."""


@dataclass
class MethodConfig:
    """How the weights change: all of them, or a low-rank adapter on a frozen base."""

    name: str = MISSING
    """full, lora, qlora or dora."""
    adapter: str | None = "lora"
    """null = full fine-tuning; lora = PEFT LoRA (DoRA and rsLoRA are LoRA options)."""
    r: int = 16
    """LoRA rank: higher can fit more, costs memory and adapter size linearly."""
    alpha: float = 32.0
    """LoRA scale numerator: update scale = alpha/r (alpha/sqrt(r) with rslora)."""
    dropout: float = 0.05
    """Dropout on the LoRA input path."""
    target_modules: Any = "all-linear"
    """Which Linear layers get adapters: all-linear, or a list such as [q_proj, v_proj]."""
    adapt_output_head: bool = False
    """Also put LoRA on the output head (lm_head), which all-linear leaves out: small
    bases whose logit range is too narrow for new outputs need it (ftx's own does)."""
    use_rslora: bool = False
    """Rank-stabilised LoRA (Kalantari 2023): scale alpha/sqrt(r), better at high r."""
    use_dora: bool = False
    """Weight-decomposed LoRA (Liu et al. 2024): slower, often closer to full FT."""
    bias: str = "none"
    """Train biases: none, all or lora_only."""
    init_lora_weights: Any = True
    """PEFT init: true (Kaiming A, zero B), gaussian, pissa, olora …"""


@dataclass
class QuantConfig:
    """bitsandbytes quantization of the frozen base (needs an adapter method)."""

    name: str = "none"
    """none, nf4, fp4 or int8."""
    bits: int = 16
    """4 or 8 for bitsandbytes; 16 = no quantization."""
    quant_type: str = "nf4"
    """4-bit data type: nf4 (QLoRA's NormalFloat) or fp4."""
    double_quant: bool = False
    """Quantize the quantization constants too: ~0.4 bit/param saved (QLoRA paper)."""
    compute_dtype: str = "float32"
    """dtype 4-bit weights are dequantized to for matmuls; bfloat16 on recent GPUs."""


@dataclass
class ObjectiveConfig:
    """What the model is trained to do."""

    name: str = "sft"
    """sft (next-token loss on the answer), reward (a reward model on preference
    pairs), dpo (the policy on preference pairs, no reward model), rloo or grpo
    (the policy on its own sampled completions, scored by a reward)."""
    completion_only: bool = True
    """Mask prompt tokens out of the loss, so only the answer is learnt."""
    margin: float = 0.0
    """reward: Bradley-Terry margin m in -log sigmoid(r_chosen - r_rejected - m)."""
    beta: float = 0.1
    """dpo, rloo, grpo: strength of the pull towards the reference (higher = stay
    closer); for rloo/grpo the weight of the KL penalty (0 = none)."""
    sft_weight: float = 0.0
    """dpo: weight of an added NLL loss on the chosen responses (RPO, Pang et al. 2024);
    0 = plain DPO. Keeps the chosen likelihood from falling as the margin grows."""
    reference: str = "precomputed"
    """dpo under full fine-tuning: precomputed (reference log-probs computed once
    before training, no copy in memory) or copy (a frozen copy of the model).
    With an adapter the reference is always the model with the adapter disabled.
    rloo/grpo under full fine-tuning always hold a frozen copy."""
    num_generations: int = 4
    """rloo/grpo: completions sampled per prompt (k); advantages compare within them.
    Memory and time per step grow linearly with k; length is data.max_new_tokens."""
    temperature: float = 1.0
    """rloo/grpo: sampling temperature (log-probabilities use the same scaling)."""
    top_p: float = 1.0
    """rloo/grpo: nucleus sampling mass; 1 = sample from the whole distribution."""
    epsilon: float = 0.2
    """rloo/grpo: PPO clip range of the probability ratio (1 - eps, 1 + eps)."""
    aggregation: str = "sequence"
    """grpo: how per-token losses average: sequence (over each completion's tokens,
    then over completions: the GRPO paper) or token (over all tokens: DAPO, TRL's default)."""
    reward_model: str | None = None
    """rloo/grpo: a reward run directory (ftx train objective=reward) or a Hugging Face
    sequence-classification model with one output; null = reward functions only."""
    reward_functions: list[str] = field(default_factory=list)
    """rloo/grpo: rewards added to the model's: built-in task metrics (json_valid,
    json_fields, exact_match, contains) scored against the example's reference, or
    package.module:function following TRL's convention (prompts, completions, **kwargs)."""
    reward_weights: dict[str, float] = field(default_factory=dict)
    """rloo/grpo: weight of each part in the summed reward, by name (reward_model and
    each of reward_functions by its function name, e.g. {reward_model: 0.2, json_fields: 2});
    parts not named weigh 1 (TRL's reward_weights). Balances a reward model's scale
    against a checker's."""


@dataclass
class RlhfConfig:
    """method=rlhf: the pipeline that trains a reward model on the preference pairs
    (into RUN/reward/), then the policy (objective=rloo or grpo) against it."""

    reward_steps: int = 100
    """Optimizer steps of the reward-model stage (the policy stage runs trainer.max_steps)."""


@dataclass
class DataConfig:
    """A dataset in one of the supported formats, its held-out split, how it is
    rendered and tokenized, and the task metric scored on generations."""

    name: str = MISSING
    """Short name recorded in metrics.json."""
    train_file: str = MISSING
    """.jsonl, .json, .csv or .parquet file, a save_to_disk directory, or a hub dataset
    name already in the local cache."""
    format: str = "auto"
    """auto (detected from the first row), prompt_completion, text, chat (OpenAI
    messages), alpaca, sharegpt, preference (TRL prompt/chosen/rejected) or
    openai_preference."""
    train_split: str = "train"
    """Split of a saved or hub dataset to train on (ignored for single files)."""
    eval_file: str | None = None
    """Held-out data (same kinds of source); null = eval_split, else eval_fraction."""
    eval_split: str | None = None
    """Held-out split of train_file's dataset (or of eval_file's), e.g. test."""
    eval_fraction: float = 0.1
    """Share of train_file held out when neither eval_file nor eval_split is set."""
    split_seed: int = 0
    """Seed of that split."""
    on_error: str = "refuse"
    """refuse: any invalid row stops the run, every problem listed by file:line;
    skip: invalid rows are dropped and counted (data.skipped in metrics.json)."""
    prompt_template: str = "{prompt}"
    """How a prompt/completion prompt is shown to the model; the completion follows
    it, then EOS. (Conversations use the chat template instead.)"""
    chat_template: str | None = None
    """Jinja chat template for conversations, its text or the path of a .jinja file;
    null = the tokenizer's own, or ftx's default (ftx.data.render.DEFAULT_CHAT_TEMPLATE)
    when it has none."""
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)
    """Extra variables the chat template reads, in training and generation alike
    (Qwen3: {enable_thinking: false}; Llama 3.1: {date_string: "26 Jul 2024"})."""
    max_length: int = 256
    """Tokens per example (per packed row with packing); longer examples are
    truncated, counted and reported."""
    packing: bool = False
    """Pack several examples into each max_length row (padding-free, positions reset
    per example): fewer wasted pad tokens, faster epochs on short examples."""
    cache: bool = True
    """Cache tokenized data under paths.cache_dir (keyed by data, tokenizer,
    templates and settings) so repeated runs and sweep trials skip tokenizing."""
    task_metric: str | None = None
    """Scored on generated completions: exact_match, contains, json_valid, json_fields,
    json_schema, regex, or a callable "package.module:function" (prediction, reference)
    -> float; null = none."""
    regex: str | None = None
    """Pattern a completion must fully match, for task_metric=regex."""
    json_schema: str | None = None
    """JSON Schema file a completion must satisfy, for task_metric=json_schema."""
    general_text: str | None = None
    """Plain-text file of general text; perplexity on it before and after training
    gives quality.forgetting (relative change). null = not measured."""
    general_max_tokens: int = 16384
    """Tokens of general_text scored (in max_length chunks)."""
    eval_examples: int = 64
    """Held-out examples generated and scored before and after training."""
    max_new_tokens: int = 64
    """Generation budget for the task metric."""
    num_workers: int = 0
    """DataLoader worker processes."""


@dataclass
class OptimConfig:
    """Optimizer and learning-rate schedule."""

    name: str = "adamw"
    """adamw (torch); adamw_8bit (bitsandbytes: 4x smaller states, also on CPU) or
    paged_adamw_8bit (CUDA: states page to host memory under pressure)."""
    lr: float = 2.0e-4
    """Peak learning rate; small models and adapters take larger ones."""
    weight_decay: float = 0.0
    """Decoupled weight decay."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """Adam betas."""
    eps: float = 1.0e-8
    """Adam epsilon."""
    scheduler: str = "cosine"
    """transformers schedule name: linear, cosine, constant, constant_with_warmup …"""
    warmup_ratio: float = 0.05
    """Share of the steps spent warming up (ignored when warmup_steps > 0)."""
    warmup_steps: int = 0
    """Warm-up steps; 0 = use warmup_ratio."""


@dataclass
class TrainerConfig:
    """Lightning Trainer settings and the batch geometry."""

    accelerator: str = "cpu"
    """cpu, gpu, auto."""
    devices: Any = 1
    """Devices per node."""
    strategy: str = "auto"
    """Lightning strategy: auto, ddp, ddp_spawn, fsdp … (presets: trainer=ddp, trainer=fsdp)."""
    num_nodes: int = 1
    """Nodes of a multi-node run (under SLURM or torchrun; devices is per node)."""
    precision: str = "32-true"
    """32-true, bf16-mixed, 16-mixed, bf16-true: mixed halves activation memory on GPU."""
    max_steps: int = 200
    """Optimizer steps; -1 = run max_epochs."""
    max_epochs: int = -1
    """Epochs when max_steps is -1."""
    batch_size: int = 16
    """Micro-batch per device: activation memory grows linearly with it."""
    accumulate_grad_batches: int = 1
    """Micro-batches per optimizer step (effective batch = batch_size x this x devices)."""
    gradient_clip_val: float = 1.0
    """Clip the global grad norm; 0 = off."""
    val_check_interval: int = 50
    """Validate every N training batches."""
    limit_val_batches: int = 8
    """Validation batches per check (keeps periodic validation cheap)."""
    log_every_n_steps: int = 10
    """Logging interval in steps."""
    progress_bar: bool | None = None
    """null = on in a terminal, off in CI logs; true or false to force."""
    save_checkpoints: bool = True
    """Write Lightning checkpoints (trainable weights + optimizer) to checkpoints/."""
    checkpoint_every: int | None = None
    """Checkpoint every N optimizer steps (checkpoints/last.ckpt); null = every val_check_interval."""
    resume: str = "auto"
    """auto: continue from RUN_DIR/checkpoints/last.ckpt when it exists (rerun the same command,
    same run directory); never: start over; or a checkpoint path."""
    on_nonfinite: str = "stop"
    """A NaN/inf training loss: stop (status failed, naming the step) or skip (drop that step's update)."""
    slurm_requeue: bool = False
    """Under SLURM: Lightning's auto-requeue (on the job's signal, sbatch --signal=USR1@90, save a
    checkpoint and requeue the job; the requeued run resumes)."""
    deterministic: bool = False
    """Force deterministic kernels (slower)."""
    logits_chunk: int = 256
    """Tokens whose logits (output head + log-softmax) are computed at once, in the loss,
    the held-out loss and every objective's log-probs: memory ~ 12 B × chunk × vocabulary
    (0.15 GB at 256 × 152K), not batch × length × vocabulary. The gradient is taken in the
    same pass, so a smaller chunk costs little speed until the head's matmul gets thin
    (measured on CPU at Qwen2.5's vocabulary: 64 tokens 0.8× the speed of 256-1024).
    0: the model's own full-logits forward (Hugging Face's path)."""


@dataclass
class LoggerConfig:
    """Where metrics stream during training; metrics.json is always written."""

    name: str = "csv"
    """csv, tensorboard, wandb or none."""
    project: str = "ftx"
    """W&B project."""
    entity: str | None = None
    """W&B entity (team or user)."""
    group: str | None = None
    """W&B group."""
    tags: list[str] = field(default_factory=list)
    """W&B tags."""
    mode: str = "auto"
    """W&B mode: auto (WANDB_MODE, else online with a key, else offline), online, offline, disabled."""
    log_artifact: bool = False
    """Upload the trained adapter/ or model/ as a W&B artifact (type model)."""


@dataclass
class PathsConfig:
    """Where ftx reads and writes."""

    output_dir: str = "${hydra:runtime.output_dir}"
    """The run directory (Hydra's; tests and scripts set it directly)."""
    cache_dir: str = "${oc.env:FTX_CACHE_DIR,${oc.env:HOME,.}/.cache/ftx}"
    """Built base models and other reusable artefacts."""


@dataclass
class PlanConfig:
    """What ``ftx plan`` (and every run's ``memory.predicted_bytes``) assumes: the GPU
    to fit on and pay for, the utilisation reached, and the memory budget."""

    gpu: str = "H100-SXM-80GB"
    """GPU the time, cost and fit verdict are for (conf/plan/ holds presets)."""
    gpu_memory_gb: float = 80.0
    """Its memory, GB (1e9 bytes, as vendors quote it)."""
    gpu_tflops: float = 989.0
    """Its dense bf16 tensor-core peak, TFLOP/s (vendor datasheet)."""
    price_per_hour: float = 2.99
    """On-demand price of one such GPU, USD per hour: set your provider's."""
    mfu: float = 0.35
    """Model FLOPs utilisation assumed: achieved / peak FLOP/s (PaLM reached 46%)."""
    cpu_tflops: float = 0.04
    """Training FLOP/s a CPU run reaches, TFLOP/s (achieved, not peak): for the time of
    CPU runs and sweeps before one has been measured. 0.04: ftx's default run on 2 idle
    cores of this project's machine (4.18e12 planned FLOPs, ~3,900 tokens/s: ~100 s);
    about half that with another job on the machine."""
    budget_gb: float | None = None
    """Memory budget, GB: runs predicted above it stop before loading weights (status
    pruned), so sweeps skip them; null = no budget (plan compares to gpu_memory_gb)."""
    cuda_overhead_mb: float = 64.0
    """Allocations besides the model's tensors on CUDA (cuBLAS workspaces), MiB."""
    cpu_overhead_mb: float | None = None
    """The same on CPU, MiB, to assume instead of measuring: null = each run measures
    its own before its weights load (first-use memory of its kernels, malloc's retention
    at its shapes; ftx.calibration), and ``ftx plan`` on CPU leaves the term out."""
    chars_per_token: float = 4.0
    """Token estimate when the tokenizer is not available locally (English BPE)."""
    seq_len: int | None = None
    """Sequence length ``ftx plan`` plans a row at, tokens (data.max_length to plan full
    rows before the data exists): null = the data's longest row (tokenized, or estimated
    from characters; packed rows with data.packing). Runs plan their own rows."""
    hosted_usd_per_mtok: dict[str, float] = field(default_factory=dict)
    """Hosted fine-tuning prices, USD per 1M training tokens, keyed by provider/offer."""


@dataclass
class SweepTrialConfig:
    """Set by ftx's Optuna sweeper on each trial it launches (null outside a sweep), so
    the run, in whatever process the launcher starts it, can find its trial in the
    study's storage: report validation loss, be pruned, send heartbeats."""

    number: int | None = None
    """The trial's number within its study (run directory prefix, report column)."""
    trial_id: int | None = None
    """The trial's id in the Optuna storage."""


@dataclass
class SweeperConfig:
    """ftx's Optuna sweeper, ``hydra/sweeper=ftx_optuna`` (sweeps/*.yaml fill it in).

    Lives under ``hydra.sweeper``; the plugin in hydra_plugins/ftx_optuna_sweeper
    registers it, ftx/sweep.py does the work."""

    _target_: str = "hydra_plugins.ftx_optuna_sweeper.FtxOptunaSweeper"
    _recursive_: bool = False  # sampler and pruner are built when a sweep runs, not when Hydra starts
    study_name: str = "ftx"
    """Optuna study; running again with the same name and storage resumes it."""
    storage: str | None = None
    """Optuna storage: an RDB URL (sqlite:///…, postgresql://…, mysql+pymysql://…) or
    journal:PATH (a journal file, no heartbeat); null = sqlite:///SWEEP_DIR/optuna.db."""
    n_trials: int = 20
    """Finished trials the study should hold: those of earlier runs count, so a re-run
    only adds what is missing."""
    n_jobs: int | None = None
    """Trials asked and launched together; null = the launcher's parallelism
    (hydra.launcher.n_jobs for joblib, array_parallelism for submitit, else 1)."""
    objectives: list[str] = field(default_factory=lambda: ["quality.eval_loss"])
    """Dotted metrics.json keys the study optimizes; two or more give a Pareto front."""
    directions: list[str] = field(default_factory=lambda: ["minimize"])
    """maximize or minimize, one per objective."""
    params: dict[str, Any] = field(default_factory=dict)
    """Search space, key: Hydra override grammar: choice(4,8,16), range(1,9,2),
    interval(1e-4,1e-2), tag(log, interval(...)), int(interval(...)); a plain value fixes it."""
    enqueue: list[dict[str, Any]] = field(default_factory=list)
    """Parameter sets tried first (e.g. the defaults), once per study."""
    sampler: Any = field(default_factory=lambda: {"_target_": "optuna.samplers.TPESampler"})
    """Any Optuna sampler as a _target_ node; GridSampler gets its grid from params."""
    pruner: Any = None
    """An Optuna pruner as a _target_ node (one objective only); null = never prune."""
    prune_on: str = "val.loss"
    """Validation metric reported at every validation for pruning (lower is better;
    negated in a maximize study so that higher is better, like the objective)."""
    memory_budget_mib: float | None = None
    """Trials whose memory.peak_bytes exceed this are infeasible (an Optuna constraint):
    the way to bound memory in a single-objective, pruned study."""
    heartbeat_interval: int = 60
    """Seconds between a running trial's heartbeats (RDB storages)."""
    grace_period: int | None = None
    """Seconds without a heartbeat before a trial counts as killed; null = 2 x interval."""
    max_retry: int = 2
    """Times a killed trial is re-run with the same parameters."""


@dataclass
class Config:
    """One ftx experiment."""

    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    data: DataConfig = field(default_factory=DataConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    plan: PlanConfig = field(default_factory=PlanConfig)
    rlhf: RlhfConfig = field(default_factory=RlhfConfig)
    seed: int = 42
    """Seeds torch, numpy and Python (model init of adapters, data order, dropout)."""
    run_name: str = "${model.name}-${method.name}-${quant.name}"
    """Human-readable run name (loggers, reports)."""
    sweep_trial: SweepTrialConfig = field(default_factory=SweepTrialConfig)
    """Filled in by ftx's sweeper for the trial being run; null fields otherwise."""


def register_configs() -> None:
    """Put the schema in Hydra's ConfigStore as ``ftx_schema`` (config.yaml extends it),
    and every sweeps/NAME.yaml as option NAME of the group ``sweep``."""
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    schema = OmegaConf.structured(Config)
    OmegaConf.set_struct(schema.objective.reward_weights, False)  # names are the user's reward parts
    OmegaConf.set_struct(schema.data.chat_template_kwargs, False)  # names are the template's variables
    store.store(name="ftx_schema", node=schema)
    # sweeps/ stays a top-level folder (it is not a part of the experiment tree), so its
    # files join the config tree here rather than through a search path, which would
    # make every folder beside them a config group.
    for path in sweep_files():
        store.store(group="sweep", name=path.stem, node=OmegaConf.load(path), package="_global_")


def sweep_files() -> list[Path]:
    """The shipped sweep specs, sweeps/*.yaml."""
    return sorted((project_root() / "sweeps").glob("*.yaml"))


def compose_config(overrides: list[str], with_hydra: bool = False) -> DictConfig:
    """The config `ftx train <overrides>` would run, composed without Hydra's runner
    (for commands that read a run, and for tests); ``with_hydra`` keeps the ``hydra``
    node (sweeper, launcher)."""
    from hydra import compose, initialize_config_dir

    register_configs()
    register_resolvers()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose(config_name="config", overrides=overrides, return_hydra_config=with_hydra)


# ----------------------------------------------------------------- resources & paths


def project_root() -> Path:
    """Where conf/, sweeps/ and datasets/ live: inside the package when installed from
    a wheel (they are force-included as ftx/conf, ftx/sweeps, ftx/datasets), else the checkout."""
    package = Path(__file__).resolve().parent
    return package if (package / "conf").is_dir() else package.parent


def config_dir() -> Path:
    return project_root() / "conf"


def _resolve_asset(relative: str) -> str:
    return str(project_root() / relative)


def register_resolvers() -> None:
    """``${ftx_asset:datasets/x.jsonl}`` names a file shipped with ftx;
    ``${ftx_basename:a/b/model}`` gives ``model`` (run names from paths);
    ``${ftx_run_stamp:}`` the run directory's stamp (:func:`run_stamp`)."""
    resolvers = {"ftx_asset": _resolve_asset, "ftx_basename": lambda path: Path(str(path)).name}
    for name, resolver in resolvers.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, resolver)
    if not OmegaConf.has_resolver("ftx_run_stamp"):
        OmegaConf.register_new_resolver("ftx_run_stamp", run_stamp, use_cache=True)


def run_stamp() -> str:
    """``DATE/TIME``; in a SLURM batch job ``slurm-JOBID`` (array: ``JOBID_TASK``), which
    a requeued job keeps: the same command then finds its run directory and resumes;
    under torchrun ``torchrun-RUNID``, the rendezvous id every rank shares (the ranks
    start at slightly different times, so a timestamp could split them)."""
    if os.environ.get("TORCHELASTIC_RUN_ID") not in (None, "", "none"):
        return f"torchrun-{os.environ['TORCHELASTIC_RUN_ID']}"
    job = os.environ.get("SLURM_ARRAY_JOB_ID") or os.environ.get("SLURM_JOB_ID")
    interactive = os.environ.get("SLURM_JOB_NAME") in ("bash", "interactive")
    if job and not interactive:
        task = os.environ.get("SLURM_ARRAY_TASK_ID")
        return f"slurm-{job}_{task}" if os.environ.get("SLURM_ARRAY_JOB_ID") and task else f"slurm-{job}"
    from datetime import datetime

    return datetime.now().strftime("%Y-%m-%d/%H-%M-%S")


# ----------------------------------------------------------------------- validation


class ConfigError(ValueError):
    """A composed config that cannot run; the message names the key and the fix."""


_CHOICES: dict[str, tuple[Any, ...]] = {
    "method.adapter": (None, "lora"),
    "method.bias": ("none", "all", "lora_only"),
    "quant.bits": (4, 8, 16),
    "quant.quant_type": ("nf4", "fp4"),
    "quant.compute_dtype": ("float32", "bfloat16", "float16"),
    "model.dtype": ("float32", "bfloat16", "float16"),
    "model.attn_implementation": ("eager", "sdpa", "flash_attention_2"),
    "objective.name": ("sft", "reward", "dpo", "rloo", "grpo"),
    "objective.aggregation": ("sequence", "token"),
    "objective.reference": ("precomputed", "copy"),
    "data.format": (
        "auto",
        "prompt_completion",
        "text",
        "chat",
        "alpaca",
        "sharegpt",
        "preference",
        "openai_preference",
    ),
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
    "trainer.precision": (
        "32-true",
        "32",
        "bf16-mixed",
        "16-mixed",
        "bf16-true",
        "16-true",
        "64-true",
    ),
    "logger.name": ("csv", "tensorboard", "wandb", "none"),
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
    for key, allowed in _CHOICES.items():
        value = _select(cfg, key)
        if value not in allowed:
            shown = ", ".join("null" if a is None else str(a) for a in allowed)
            raise ConfigError(f"{key}={value} is not one of: {shown}.")

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

    trainer = cfg.trainer
    if trainer.max_steps < 1 and trainer.max_epochs < 1:
        raise ConfigError("Set trainer.max_steps >= 1 or trainer.max_epochs >= 1.")
    for key in ("trainer.batch_size", "trainer.accumulate_grad_batches", "data.max_length"):
        if _select(cfg, key) < 1:
            raise ConfigError(f"{key}={_select(cfg, key)} must be >= 1.")
    if cfg.optim.name == "paged_adamw_8bit" and trainer.accelerator == "cpu":
        raise ConfigError(
            "optim.name=paged_adamw_8bit pages optimizer state through CUDA unified memory, "
            "which a CPU does not have. Use optim.name=adamw_8bit (runs on CPU) or trainer=gpu."
        )
    if cfg.logger.name == "tensorboard" and importlib.util.find_spec("tensorboard") is None:
        raise ConfigError("logger=tensorboard needs the tensorboard package: pip install 'ftx[tensorboard]'.")
    if trainer.accelerator == "cpu" and trainer.precision == "16-mixed":
        raise ConfigError(
            "trainer.precision=16-mixed needs a GPU (fp16 autocast with loss scaling). "
            "Use trainer.precision=bf16-mixed or 32-true on CPU."
        )
    _check_distributed(trainer, _in_multirun(cfg))
    if trainer.on_nonfinite not in ("stop", "skip"):
        raise ConfigError(f"trainer.on_nonfinite={trainer.on_nonfinite}: use stop or skip.")
    if trainer.on_nonfinite == "skip" and _several_devices(trainer.devices, trainer.accelerator):
        raise ConfigError(
            "trainer.on_nonfinite=skip drops a step on one rank only, and the other ranks would wait for it "
            "forever; with several devices use trainer.on_nonfinite=stop."
        )
    if trainer.resume not in ("auto", "never") and not Path(trainer.resume).is_file():
        raise ConfigError(
            f"trainer.resume={trainer.resume}: no such checkpoint file. Use auto (resume the run directory's "
            "checkpoints/last.ckpt if any), never, or the path of a .ckpt file."
        )
    if trainer.checkpoint_every is not None and trainer.checkpoint_every < 1:
        raise ConfigError(f"trainer.checkpoint_every={trainer.checkpoint_every} must be >= 1 (or null).")

    model = cfg.model
    if (model.name_or_path is None) == (model.pretrain is None):
        raise ConfigError(
            "Set exactly one of model.name_or_path (a local directory or cached hub id) "
            "and model.pretrain (an ftx-built base); e.g. model.name_or_path=/path/to/model."
        )
    if model.name_or_path is not None and check_sources:
        check_model_source(model.name_or_path, model.allow_download, key="model.name_or_path")
    if model.tokenizer is not None and check_sources:
        check_model_source(model.tokenizer, model.allow_download, key="model.tokenizer")

    if cfg.objective.name in ("rloo", "grpo"):
        check_policy_gradient(cfg)

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
    plan = cfg.plan
    if not 0.0 < plan.mfu <= 1.0:
        raise ConfigError(f"plan.mfu={plan.mfu} must be in (0, 1]: the share of the GPU's peak FLOP/s reached.")
    if plan.budget_gb is not None and plan.budget_gb <= 0:
        raise ConfigError(f"plan.budget_gb={plan.budget_gb} must be > 0, or null for no budget.")
    if plan.cpu_tflops <= 0:
        raise ConfigError(f"plan.cpu_tflops={plan.cpu_tflops} must be > 0 (the TFLOP/s a CPU run reaches).")


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


BUILTIN_METRICS = ("exact_match", "contains", "json_valid", "json_fields", "json_schema", "regex")


def check_task_metric(data: DictConfig) -> None:
    metric = data.task_metric
    if metric is None or metric in BUILTIN_METRICS and metric not in ("regex", "json_schema"):
        return
    if metric == "regex" and not data.regex:
        raise ConfigError("data.task_metric=regex needs data.regex, e.g. data.regex='\\d+'.")
    if metric == "json_schema" and not data.json_schema:
        raise ConfigError("data.task_metric=json_schema needs data.json_schema=/path/to/schema.json.")
    if metric in BUILTIN_METRICS:
        return
    check_callable("data.task_metric", metric, BUILTIN_METRICS)


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


REWARD_BUILTINS = ("exact_match", "contains", "json_valid", "json_fields")
"""Task metrics usable as reward functions (scored against each prompt's reference)."""


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
    for name in objective.reward_functions:
        if name not in REWARD_BUILTINS:
            check_callable("objective.reward_functions", name, REWARD_BUILTINS)
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
    if cfg.objective.name not in ("rloo", "grpo"):
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


def as_container(value: Any) -> Any:
    """Plain Python value of a config node (lists and dicts resolved)."""
    if isinstance(value, DictConfig | ListConfig):
        return OmegaConf.to_container(value, resolve=True)
    return value
