"""The structured-config schema: the single source of ftx's defaults, one dataclass
per config group, each field documented where it is declared.

Each YAML file under ``conf/`` selects or overrides values of these dataclasses;
Hydra validates every value against them (types, unknown keys). What types cannot
express is checked in :mod:`ftx.config.checks`. Dataclasses only: no logic here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING


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
    pairs), dpo (the policy on preference pairs, no reward model), orpo (preference
    pairs, no reference model either: SFT plus an odds-ratio term), rloo or grpo
    (the policy on its own sampled completions, scored by a reward)."""
    completion_only: bool = True
    """Mask prompt tokens out of the loss, so only the answer is learnt (orpo: the
    NLL term's span; false = prompt and answer, as TRL's ORPOTrainer; its odds
    always compare the answers)."""
    margin: float = 0.0
    """reward: Bradley-Terry margin m in -log sigmoid(r_chosen - r_rejected - m)."""
    beta: float = 0.1
    """orpo: the odds-ratio term's weight λ (TRL's beta). dpo, rloo, grpo: strength
    of the pull towards the reference (higher = stay closer); for rloo/grpo the
    weight of the KL penalty (0 = none)."""
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
    eval_batch_size: int = 32
    """Held-out prompts generated at once for the task metric (before and after
    training, ftx eval): generation's memory (its KV cache) grows with it."""
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
    progress_every: int = 25
    """Without a progress bar: a line every this many optimizer steps (step, loss,
    tokens/s, elapsed and remaining time; RL's mean reward); 0 = none."""
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
    cpu_mmap_threshold_mb: int = 4
    """CPU runs: tensors of this size and above get their own memory mapping, handed back to
    the OS when freed (glibc's malloc mmap threshold), so the measured peak (resident memory)
    tracks live tensors. The cost is a page fault per 4 KiB each time such a tensor is made:
    where many mid-size tensors come and go (RL's sampling and scoring at 64 rows) steps run
    slower. objective=rloo|grpo set 32 (glibc's own ceiling, the most it takes): 1.47x faster
    steps on ftx's base, the process's peak RSS 1.51x higher (freed memory kept by malloc for
    reuse). 1-32, process-wide."""


@dataclass
class LoggerConfig:
    """Where metrics stream during training; metrics.json is always written."""

    name: str = "csv"
    """csv, tensorboard, wandb, mlflow or none."""
    project: str = "ftx"
    """W&B project; the MLflow experiment (PROJECT/GROUP for a multirun's trials)."""
    entity: str | None = None
    """W&B entity (team or user)."""
    group: str | None = None
    """W&B group (MLflow: the experiment PROJECT/GROUP); null = the sweep directory's
    name in a multirun."""
    tags: list[str] = field(default_factory=list)
    """W&B tags."""
    mode: str = "auto"
    """W&B mode: auto (WANDB_MODE, else online with a key, else offline), online, offline, disabled."""
    log_artifact: bool = False
    """Upload the trained adapter/ or model/ as an artifact (W&B: type model; MLflow:
    with metrics.json)."""
    tracking_uri: str | None = None
    """MLflow tracking server or store (http://host:5000, sqlite:///mlflow.db, …); null =
    MLFLOW_TRACKING_URI, else MLflow's default (MLflow 3: ./mlflow.db, SQLite)."""


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
    gpu_bandwidth_gbs: float = 3350.0
    """Its memory bandwidth, GB/s (vendor datasheet): RL's sampling reads every weight
    once per generated token, which bounds its time from below."""
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
