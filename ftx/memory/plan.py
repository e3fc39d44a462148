"""The planner: peak training memory, trainable share, artefact size, time and cost
of a config, predicted before any weights load.

The model is built on the meta device from its architecture (``model.arch``, the
base's config.json, or ftx's own pretraining settings), so an 8B or 70B plan needs
no download: parameter counts and Linear shapes come from the same transformers
code that trains it. Memory is then counted tensor by tensor, for the way ftx
trains (transformers + PEFT + bitsandbytes under Lightning), in bytes:

* weights: parameters × bytes of their dtype; bitsandbytes 4-bit weights take
  0.5 byte + their block constants (see :func:`quantized_bytes_per_param`).
* gradients and optimizer states: per trainable parameter (see :func:`_optimizer`).
  Mixed-precision Adam is classically 16 bytes/param (2 fp16 weights, 2 fp16 grads,
  12 of fp32 master weights and moments; Rajbhandari et al. 2020, ZeRO §3.1).
  Lightning's autocast keeps fp32 weights (they are the masters) and fp32 grads,
  4 + 4 + 8 = 16 bytes, plus a half-precision copy of every weight a matmul used,
  which autograd keeps until backward (the "mixed-precision weight copies" item).
* activations: what autograd saves per token and layer, counted from the HF Llama
  layer's ops (:func:`_layer_activation_bytes`); the same accounting as Korthikanti
  et al. 2022 ("Reducing Activation Recomputation", §4.1: 34·s·b·h bytes per GPT
  layer in 16 bit), redone for RMSNorm, rotary embeddings, SwiGLU and LoRA paths.
* logits and loss: ftx runs the output head on ``trainer.logits_chunk`` trained
  tokens at a time (:mod:`ftx.models.head`), taking the gradient in the same pass;
  in one chunk its fp32 logits, log-probabilities and their gradient coexist: 12
  bytes per chunk token and vocabulary entry, beside the fp32 hidden states of the
  trained tokens and their gradient (with ``logits_chunk=0``, transformers' full
  logits: 12 bytes per token and entry).

The peak is the larger of two moments: the start of backward (everything saved
for it, plus the loss buffers) and the optimizer step (weights, gradients, states
and the optimizer's temporaries). Each breakdown item says its size and what of
it is live at the predicted peak; the live parts add up to the total.

The measured peak (:class:`ftx.memory.PeakMemory`) counts from just before the
weights load, so the prediction is of the same quantity, plus the runtime's
overhead for what is not a model tensor: on CUDA ``plan.cuda_overhead_mb``
(cuBLAS workspaces); on CPU, where the peak is resident memory, what each run
measures before its weights load (:mod:`ftx.calibration`: first-use memory of the
kernels, malloc's retention at the run's own shapes), or ``plan.cpu_overhead_mb``
when set. ``ftx plan`` runs nothing, so its CPU plans leave that term to the run.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any

from omegaconf import DictConfig

from ftx.config import PretrainConfig, as_container

MIB = 1024**2
GB = 1e9  # GPU memory is quoted in vendors' decimal GB
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
HALF_TRUE = ("bf16-true", "16-true")
METHODS = ("full", "lora", "qlora", "dora")

# bitsandbytes 4-bit: one absmax per 64 weights (Params4bit blocksize); double
# quantization stores those as 8 bit with one fp32 constant per 256 of them
# (Dettmers et al. 2023, QLoRA §3 "Double Quantization": 0.5 → 0.127 bits/param).
BNB_4BIT_BLOCK = 64
BNB_NESTED_BLOCK = 256
# bitsandbytes 8-bit optimizers: tensors under 4096 elements keep fp32 states, the
# rest 8-bit states with one fp32 absmax per 256 (bitsandbytes/optim/optimizer.py).
BNB_OPTIM_MIN_8BIT = 4096
BNB_OPTIM_BLOCK = 256


# ----------------------------------------------------------------------- architecture


@dataclass(frozen=True)
class Linear:
    name: str
    """Module path, e.g. model.layers.0.self_attn.q_proj."""
    d_in: int
    d_out: int
    bias: bool
    head: bool
    """The output head (never quantized; PEFT's all-linear leaves it out)."""

    @property
    def suffix(self) -> str:
        return self.name.rsplit(".", 1)[-1]


@dataclass(frozen=True)
class Architecture:
    """What memory and FLOPs depend on, read from a meta-device model."""

    hidden: int
    layers: int
    heads: int
    head_dim: int
    kv_dim: int
    intermediate: int
    vocab: int
    tied: bool
    total_params: int
    param_numels: tuple[int, ...]
    linears: tuple[Linear, ...]
    layer_linears: tuple[Linear, ...]
    """The first decoder layer's Linears: every layer has the same."""


def transformers_config(cfg: DictConfig, base: str | None = None):
    """The transformers config of the base: ``model.arch``, the built or given base's
    config.json, or ftx's pretraining settings when its base is not built yet."""
    from transformers import AutoConfig

    model = cfg.model
    if model.arch is not None:
        return AutoConfig.for_model(**as_container(model.arch))
    if base is None and model.pretrain is not None:
        from ftx.models.pretrain import base_model_dir, llama_config_kwargs

        settings = PretrainConfig(**as_container(model.pretrain))
        built = base_model_dir(settings, cfg.paths.cache_dir)
        if not (built / "config.json").is_file():
            return AutoConfig.for_model(**llama_config_kwargs(settings, settings.vocab_size))
        base = str(built)
    return AutoConfig.from_pretrained(
        base or model.name_or_path,
        local_files_only=not model.allow_download,
        trust_remote_code=model.trust_remote_code,
    )


def architecture(config) -> Architecture:
    return _architecture(json.dumps(config.to_dict(), sort_keys=True, default=str))


@functools.cache
def _architecture(config_json: str) -> Architecture:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs = json.loads(config_json)
    config = AutoConfig.for_model(**kwargs)
    with torch.device("meta"):  # shapes only: no memory, no weights, no download
        model = AutoModelForCausalLM.from_config(config)
    head = model.get_output_embeddings()
    linears = tuple(
        Linear(name, m.in_features, m.out_features, m.bias is not None, m is head)
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear)
    )
    first_layer = [lin for lin in linears if ".layers.0." in lin.name]
    params = list(model.parameters())  # tied weights once
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return Architecture(
        hidden=config.hidden_size,
        layers=config.num_hidden_layers,
        heads=heads,
        head_dim=head_dim,
        kv_dim=(getattr(config, "num_key_value_heads", None) or heads) * head_dim,
        intermediate=getattr(config, "intermediate_size", None) or 4 * config.hidden_size,  # GPT-2 style: 4h
        vocab=config.vocab_size,
        tied=head.weight is model.get_input_embeddings().weight,
        total_params=sum(p.numel() for p in params),
        param_numels=tuple(p.numel() for p in params),
        linears=linears,
        layer_linears=tuple(first_layer),
    )


def adapter_targets(linears: tuple[Linear, ...], method: DictConfig) -> list[Linear]:
    """The Linears PEFT puts LoRA on: all-linear (all but the output head) or those
    whose name ends in a listed name, plus the head with ``adapt_output_head``."""
    targets = as_container(method.target_modules)
    chosen = [
        lin
        for lin in linears
        if (targets == "all-linear" and not lin.head) or (targets != "all-linear" and lin.suffix in targets)
    ]
    if method.adapt_output_head:
        chosen += [lin for lin in linears if lin.head and lin not in chosen]
    return chosen


def quantized_bytes_per_param(quant: DictConfig, d_in: int) -> float:
    """bitsandbytes storage of one frozen Linear weight.

    4-bit (NF4/FP4): two weights per byte plus the block's absmax, fp32 per 64
    weights, or with double quantization 8 bit per 64 and fp32 per 64·256.
    8-bit (LLM.int8(), Dettmers et al. 2022): one byte plus an fp32 scale per row.
    """
    if quant.bits == 4:
        absmax = 1 / BNB_4BIT_BLOCK + 4 / (BNB_4BIT_BLOCK * BNB_NESTED_BLOCK) if quant.double_quant else 4 / 64
        return 0.5 + absmax
    return 1 + 4 / d_in


# ------------------------------------------------------------------------- the plan


@dataclass
class Item:
    key: str
    """Its metric name under memory.predicted (metrics.json, loggers)."""
    name: str
    bytes: int
    """Its size."""
    at_peak: int
    """What of it is live at the predicted peak (the column that adds up)."""
    note: str = ""


@dataclass
class Plan:
    model: str
    method: str
    quant: str
    precision: str
    device: str
    batch_size: int
    seq_len: int
    """Longest training sequence (tokens): the batch holding it sets the peak."""
    gradient_checkpointing: bool
    params_total: int
    params_trainable: int
    items: list[Item]
    peak_phase: str
    artefact: str
    artefact_bytes: int
    tokens: int
    """Tokens trained on (steps × batch × accumulation × mean length)."""
    tokens_estimated: bool
    """True when counted from characters (no local tokenizer)."""
    flops: float
    gpu: str
    train_s: float
    """Training seconds on one ``gpu`` at ``mfu``."""
    device_train_s: float
    """Training seconds on the run's own device: ``train_s`` on CUDA, FLOPs at
    ``plan.cpu_tflops`` on CPU."""
    cost_usd: float
    mfu: float
    hosted_usd: dict[str, float] = field(default_factory=dict)
    budget_bytes: float | None = None
    budget_label: str = ""
    generated_tokens: int = 0
    """RL: completion tokens sampled (prompts × k × data.max_new_tokens, at most)."""

    @property
    def peak_bytes(self) -> int:
        return sum(item.at_peak for item in self.items)

    @property
    def trainable_share(self) -> float:
        return self.params_trainable / self.params_total

    @property
    def fits(self) -> bool | None:
        return None if self.budget_bytes is None else self.peak_bytes <= self.budget_bytes

    def as_dict(self) -> dict[str, Any]:
        derived = {"peak_bytes": self.peak_bytes, "trainable_share": self.trainable_share, "fits": self.fits}
        return asdict(self) | derived


@dataclass(frozen=True)
class Overhead:
    """The runtime's memory besides the model's tensors, as one plan item."""

    bytes: int
    note: str


def configured_overhead(cfg: DictConfig, device: str) -> Overhead:
    """The overhead a plan assumes without a measurement: ``plan.cuda_overhead_mb``;
    on CPU ``plan.cpu_overhead_mb`` when set, else none (each run measures its own)."""
    if device == "cuda":
        return Overhead(int(cfg.plan.cuda_overhead_mb * MIB), "plan.cuda_overhead_mb")
    if cfg.plan.cpu_overhead_mb is not None:
        return Overhead(int(cfg.plan.cpu_overhead_mb * MIB), "plan.cpu_overhead_mb")
    return Overhead(0, "measured by each CPU run before its weights load (plan.cpu_overhead_mb to assume one)")


def plan(
    cfg: DictConfig,
    base: str | None = None,
    lengths: list[int] | None = None,
    overhead: Overhead | None = None,
    trained: int | None = None,
) -> Plan:
    """Predict a run of ``cfg``. ``base`` is the resolved base directory when known
    (ftx train); ``lengths`` the tokenized training examples' lengths when known;
    ``overhead`` the runtime overhead a run measured (else :func:`configured_overhead`);
    ``trained`` the most trained tokens of one sequence, when known (else all are)."""
    from ftx.memory import device_of

    arch = architecture(transformers_config(cfg, base))
    estimated, seq = False, None
    if lengths is None:  # ftx plan: before (or without) the run's own tokenized rows
        lengths, estimated, tokenized_trained = token_lengths(cfg, base)
        trained = trained if trained is not None else tokenized_trained
        seq = cfg.plan.seq_len
    device = device_of(cfg.trainer.accelerator)  # the device the run will measure on
    seq = seq or max(lengths)
    memory, peak_phase = _memory_items(cfg, arch, device, seq, overhead or configured_overhead(cfg, device), trained)
    weights = next(item.bytes for item in memory if item.key == "weights")
    train = _training_cost(cfg, arch, lengths, weights)
    # The verdict is against the budget, else the GPU's memory; a CPU run without a
    # budget has nothing to be checked against.
    budget_gb = cfg.plan.budget_gb
    if budget_gb is not None:
        budget_label = f"budget {budget_gb:g} GB"
    elif device == "cuda":
        budget_gb, budget_label = cfg.plan.gpu_memory_gb, f"{cfg.plan.gpu} ({cfg.plan.gpu_memory_gb:g} GB)"
    else:
        budget_label = ""
    return Plan(
        model=cfg.model.name,
        method=cfg.method.name,
        quant=cfg.quant.name,
        precision=cfg.trainer.precision,
        device=device,
        batch_size=cfg.trainer.batch_size,
        seq_len=seq,
        gradient_checkpointing=cfg.model.gradient_checkpointing,
        params_total=arch.total_params + _adapter_params(cfg, arch),
        params_trainable=_trainable_params(cfg, arch),
        items=memory,
        peak_phase=peak_phase,
        artefact="adapter" if cfg.method.adapter is not None else "model",
        artefact_bytes=_artefact_bytes(cfg, arch),
        tokens=train["tokens"],
        generated_tokens=train["generated_tokens"],
        tokens_estimated=estimated,
        flops=train["flops"],
        gpu=cfg.plan.gpu,
        train_s=train["seconds"],
        device_train_s=train["seconds"] if device == "cuda" else train["flops"] / (cfg.plan.cpu_tflops * 1e12),
        cost_usd=train["seconds"] / 3600 * cfg.plan.price_per_hour,
        mfu=cfg.plan.mfu,
        hosted_usd={k: train["tokens"] / 1e6 * v for k, v in as_container(cfg.plan.hosted_usd_per_mtok).items()},
        budget_bytes=None if budget_gb is None else budget_gb * GB,
        budget_label=budget_label,
    )


class OverBudget(Exception):
    """A run predicted to need more memory than ``plan.budget_gb``: pruned unrun."""

    def __init__(self, predicted: Plan) -> None:
        super().__init__(verdict(predicted))
        self.plan = predicted


def fits_budget(
    cfg: DictConfig,
    base: str | None = None,
    lengths: list[int] | None = None,
    overhead: Overhead | None = None,
    trained: int | None = None,
) -> tuple[bool, Plan]:
    """(fits, plan) against ``plan.budget_gb``; always fits when there is no budget.
    Sweeps call this to skip trials before training."""
    predicted = plan(cfg, base, lengths, overhead, trained)
    return cfg.plan.budget_gb is None or bool(predicted.fits), predicted


def tensor_bytes(cfg: DictConfig, config, seq: int, trained: int | None = None) -> int:
    """The planned peak of the model's tensors alone (no runtime overhead) for a
    transformers ``config`` trained as ``cfg`` says, at batch × ``seq`` tokens
    (``trained`` of each sequence's trained, when known)."""
    from ftx.memory import device_of

    device = device_of(cfg.trainer.accelerator)
    items, _ = _memory_items(cfg, architecture(config), device, seq, Overhead(0, ""), trained)
    return sum(item.at_peak for item in items)


# --------------------------------------------------------------------------- parameters


def _adapter(cfg: DictConfig):
    """The adapter's module (:mod:`ftx.adapters`), whose terms the planner uses; None
    under full fine-tuning."""
    from ftx.adapters import ADAPTERS

    return None if cfg.method.adapter is None else ADAPTERS.load(cfg.method.adapter)


def _adapter_params(cfg: DictConfig, arch: Architecture) -> int:
    """What the adapter adds to its targets (LoRA: r·(d_in + d_out) each, Hu et al.
    2021; DoRA also a magnitude vector of d_out, Liu et al. 2024)."""
    return sum(_trainable_tensors(cfg, arch)) if cfg.method.adapter is not None else 0


def _trainable_params(cfg: DictConfig, arch: Architecture) -> int:
    return arch.total_params if cfg.method.adapter is None else _adapter_params(cfg, arch)


def _trainable_tensors(cfg: DictConfig, arch: Architecture) -> list[int]:
    adapter = _adapter(cfg)
    if adapter is None:
        return list(arch.param_numels)
    return [numel for lin in adapter_targets(arch.linears, cfg.method) for numel in adapter.tensors(cfg.method, lin)]


def _param_bytes(cfg: DictConfig) -> tuple[int, int]:
    """(bytes of base parameters that are not quantized, bytes of adapter parameters).

    Lightning's *-true precisions cast the whole module; a quantized base keeps its
    other parameters in model.dtype (ftx.models.apply_adapter); PEFT creates adapters in
    fp32 (autocast_adapter_dtype).
    """
    if cfg.trainer.precision in HALF_TRUE:
        return 2, 2
    if cfg.trainer.precision == "64-true":
        return 8, 8
    return DTYPE_BYTES[cfg.model.dtype], 4


def _artefact_bytes(cfg: DictConfig, arch: Architecture) -> int:
    """adapter/: the adapter tensors in their dtype; model/: every weight (tied once)."""
    base_bytes, adapter_bytes = _param_bytes(cfg)
    if cfg.method.adapter is None:
        return arch.total_params * base_bytes
    return _adapter_params(cfg, arch) * adapter_bytes


# ------------------------------------------------------------------------------ memory


# Long on purpose: the breakdown reads as one table, each Item beside the arithmetic
# that prices it, and the phases (forward, start of backward, optimizer step) share its terms.
def _memory_items(
    cfg: DictConfig, arch: Architecture, device: str, seq: int, overhead: Overhead, trained: int | None = None
) -> tuple[list[Item], str]:
    """The breakdown, and the moment of the peak."""
    method, quant, trainer = cfg.method, cfg.quant, cfg.trainer
    full = method.adapter is None
    base_bytes, adapter_bytes = _param_bytes(cfg)
    quantized = [lin for lin in arch.linears if quant.bits != 16 and not lin.head]
    quantized_params = sum(lin.d_in * lin.d_out for lin in quantized)
    weights = (arch.total_params - quantized_params) * base_bytes + _adapter_params(cfg, arch) * adapter_bytes
    weights += sum(lin.d_in * lin.d_out * quantized_bytes_per_param(quant, lin.d_in) for lin in quantized)
    trainable_bytes = base_bytes if full else adapter_bytes
    tensors = _trainable_tensors(cfg, arch)
    grads = sum(tensors) * trainable_bytes
    states, step_temp, states_note = _optimizer(cfg, tensors, trainable_bytes, device)
    mixed = trainer.precision.endswith("-mixed")
    copies = 0
    # autocast casts each fp32 weight a matmul uses to 16 bit; autograd keeps the
    # copy for backward (trainable leaves are also cached for the forward).
    if mixed and base_bytes == 4:
        copies = sum(lin.d_in * lin.d_out for lin in arch.linears if lin not in quantized) * 2
    if mixed and not full and adapter_bytes == 4:  # fp32 adapters, on any base
        adapter = _adapter(cfg)
        copies += sum(adapter.cast_numels(method, lin) for lin in adapter_targets(arch.linears, method)) * 2
    tokens = trainer.batch_size * seq
    activations = _activation_bytes(cfg, arch, seq, device) * trainer.batch_size
    # The loss runs the head on trainer.logits_chunk trained tokens at a time
    # (ftx.models.head): one chunk's logits live, beside the trained rows' hidden
    # states and their gradient (taken in the forward pass).
    chunk = cfg.trainer.logits_chunk
    labelled = trainer.batch_size * min(seq, trained if trained is not None else seq)
    logit_rows = min(chunk, labelled) if chunk > 0 else tokens
    logits = 12 * logit_rows * arch.vocab + (8 * labelled * arch.hidden if chunk > 0 else 0)
    temporaries = _layer_temporaries(cfg, arch, tokens, quantized)

    states_live = 0 if cfg.optim.name == "paged_adamw_8bit" and device == "cuda" else states
    # Lightning zeroes gradients to None after each step: they exist during backward
    # only when micro-batches accumulate into them (the head's comes first).
    head_grad = arch.vocab * arch.hidden * trainable_bytes if full else 0
    grads_in_backward = grads if trainer.accumulate_grad_batches > 1 else head_grad
    backward = copies + activations + max(logits, temporaries) + grads_in_backward
    step = grads + step_temp
    in_backward = backward >= step
    loss_live = logits >= temporaries
    gc = " (gradient checkpointing: layer inputs + one layer)" if cfg.model.gradient_checkpointing else ""
    items = [
        Item("weights", "weights", int(weights), int(weights), _weights_note(cfg, arch, quantized)),
        Item(
            "gradients",
            "gradients",
            int(grads),
            int(grads_in_backward if in_backward else grads),
            f"{sum(tensors):,} trainable × {trainable_bytes} B",
        ),
        Item("optimizer_states", "optimizer states", int(states), int(states_live), states_note),
        Item("optimizer_step", "optimizer step temporaries", int(step_temp), 0 if in_backward else int(step_temp)),
        Item(
            "weight_copies",
            "mixed-precision weight copies",
            int(copies),
            int(copies) if in_backward else 0,
            "16-bit copies of fp32 weights kept for backward" if copies else "",
        ),
        Item(
            "activations",
            "activations",
            int(activations),
            int(activations) if in_backward else 0,
            f"batch {trainer.batch_size} × {seq} tokens, {cfg.model.attn_implementation}{gc}",
        ),
        Item(
            "logits",
            "logits and loss buffers",
            int(logits),
            int(logits) if in_backward and loss_live else 0,
            f"fp32 log-probs + 2 grads: 12 B × {logit_rows:,} tokens × {arch.vocab:,} vocab"
            + (
                f" (trainer.logits_chunk={chunk}; {labelled:,} trained tokens' hidden states and gradients beside)"
                if chunk > 0
                else ""
            ),
        ),
        Item(
            "layer_temporaries",
            "layer temporaries",
            int(temporaries),
            int(temporaries) if in_backward and not loss_live else 0,
            "one layer's backward buffers"
            + (_adapter(cfg).note(method) if not full else "")
            + (", dequantized weight" if quantized else ""),
        ),
        Item("overhead", f"runtime overhead ({device})", overhead.bytes, overhead.bytes, overhead.note),
    ]
    return items, "start of backward" if in_backward else "optimizer step"


def _weights_note(cfg: DictConfig, arch: Architecture, quantized: list[Linear]) -> str:
    base_bytes, adapter_bytes = _param_bytes(cfg)
    adapter = _adapter_params(cfg, arch)
    adapters = f" + {adapter:,} adapter × {adapter_bytes} B" if adapter else ""
    if not quantized:
        return f"{arch.total_params:,} × {base_bytes} B{adapters}"
    per_param = quantized_bytes_per_param(cfg.quant, quantized[0].d_in)
    dq = ", double quant" if cfg.quant.double_quant and cfg.quant.bits == 4 else ""
    return f"{cfg.quant.name}{dq}: {per_param:.3f} B/param on Linears; the rest {base_bytes} B{adapters}"


def _optimizer(cfg: DictConfig, tensors: list[int], param_bytes: int, device: str) -> tuple[float, float, str]:
    """(states, step temporaries, note). AdamW keeps two moments per parameter in the
    parameter's dtype (Loshchilov & Hutter 2019; torch zeros_like). bitsandbytes' 8-bit
    AdamW stores them in 8 bits with block constants (Dettmers et al. 2022, "8-bit
    Optimizers via Block-wise Quantization"); the paged variant keeps them in CUDA
    unified memory, which torch's allocator (the measured peak) does not count.
    torch's AdamW on CUDA runs multi-tensor ("foreach"): the step allocates a copy
    of the second moments (sqrt); on CPU it goes tensor by tensor."""
    name = cfg.optim.name
    if name == "adamw":
        states = 2 * sum(tensors) * param_bytes
        temp = sum(tensors) * param_bytes if device == "cuda" else 2 * max(tensors) * param_bytes
        return states, temp, f"AdamW: 2 × {param_bytes} B per trainable param"
    states = sum(2 * (n * (1 + 4 / BNB_OPTIM_BLOCK) if n >= BNB_OPTIM_MIN_8BIT else 4 * n) for n in tensors)
    note = "8-bit AdamW: 2 × (1 + 4/256) B per param"
    if name == "paged_adamw_8bit":
        note += "; paged: in unified memory, not in the peak"
    return states, 0, note


def _input_groups(layer: tuple[Linear, ...]) -> dict[str, list[Linear]]:
    """Linears of a layer grouped by the tensor they read: q/k/v read the attention
    norm's output, gate/up the MLP norm's; others their own input."""
    shared = {"q_proj": "attention input", "k_proj": "attention input", "v_proj": "attention input"}
    shared |= {"gate_proj": "mlp input", "up_proj": "mlp input"}
    groups: dict[str, list[Linear]] = {}
    for lin in layer:
        groups.setdefault(shared.get(lin.suffix, lin.suffix), []).append(lin)
    return groups


def _activation_bytes(cfg: DictConfig, arch: Architecture, seq: int, device: str) -> float:
    """Bytes autograd saves for backward, per sequence of ``seq`` tokens."""
    per_layer = _layer_activation_bytes(cfg, arch, seq, device)
    residual, _ = _stream_bytes(cfg)
    final = _norm_bytes(cfg, arch) + _saved_inputs(cfg, [h for h in arch.linears if h.head], residual, device)
    if cfg.model.gradient_checkpointing:
        # Non-reentrant checkpointing keeps each layer's input; backward recomputes
        # one layer at a time (Chen et al. 2016, "Training Deep Nets with Sublinear
        # Memory Cost").
        layers = arch.layers * residual * arch.hidden + per_layer
    else:
        layers = arch.layers * per_layer
    # The 4-D attention mask of a padded batch, shared by the layers: bool for sdpa,
    # an additive float mask for eager, none for flash_attention_2 (it unpads).
    mask = {"sdpa": seq, "eager": seq * residual}.get(cfg.model.attn_implementation, 0)
    return seq * (layers + final) + seq * mask


def _stream_bytes(cfg: DictConfig) -> tuple[int, int]:
    """(residual stream bytes, matmul output bytes) per value. The residual stream
    keeps the dtype of the embeddings; autocast makes matmuls 16 bit."""
    residual, _ = _param_bytes(cfg)
    half = cfg.trainer.precision.endswith("-mixed") or cfg.trainer.precision in HALF_TRUE
    return residual, 2 if half else residual


def _norm_bytes(cfg: DictConfig, arch: Architecture) -> float:
    """HF's RMSNorm saves its input upcast to fp32, and the normalized value when
    its weight trains, per token."""
    residual, _ = _stream_bytes(cfg)
    return 4 * arch.hidden + (residual * arch.hidden if cfg.method.adapter is None else 0)


def _saved_inputs(
    cfg: DictConfig, group: list[Linear], x_bytes: int, device: str, already_saved: bool = False
) -> float:
    """Per token: inputs a group of Linears reading one tensor saves for backward.

    A frozen Linear needs only its weight for the input's gradient; a trained one
    (or its LoRA A) keeps the input. Autocast casts the input once per matmul; LoRA
    dropout makes one dropped copy (kept, or its 16-bit cast under autocast) and a
    mask per adapter: bool from CUDA's fused kernel, the input's dtype on CPU
    (torch's unfused dropout multiplies by a noise tensor, aten/native/Dropout.cpp).
    ``already_saved``: the input itself is kept by another op, so only copies count.
    """
    method = cfg.method
    full = method.adapter is None
    targets = {lin.name for lin in adapter_targets(tuple(group), method)} if not full else set()
    needers = [lin for lin in group if full or lin.name in targets]
    if not needers:
        return 0
    _, matmul = _stream_bytes(cfg)
    d_in = group[0].d_in
    cast = matmul * d_in if matmul != x_bytes else 0
    if not full and method.dropout > 0:
        mask = 1 if device == "cuda" else x_bytes
        return len(needers) * d_in * (mask + matmul)
    if cast:
        return len(needers) * cast
    return 0 if already_saved else x_bytes * d_in


def _layer_activation_bytes(cfg: DictConfig, arch: Architecture, seq: int, device: str) -> float:
    """Per token, one decoder layer (HF Llama/Mistral/Qwen2 ops):

    two RMSNorms (see _norm_bytes); attention keeps rotated q and k, v and its
    output (flash/sdpa kernels recompute the scores, sdpa keeps its mask as a float
    bias; eager keeps the fp32 softmax and its 16/32-bit copy, heads × seq each,
    measured with saved_tensors_hooks); the SwiGLU MLP keeps gate, up and
    silu(gate); Linears keep their inputs (see _saved_inputs); each LoRA keeps its
    rank-r intermediate, DoRA also the base and LoRA outputs it rescales.
    """
    method = cfg.method
    residual, matmul = _stream_bytes(cfg)
    h, kv, i = arch.hidden, arch.kv_dim, arch.intermediate
    attention = cfg.model.attn_implementation
    total = 2 * _norm_bytes(cfg, arch)
    # A padded batch carries a mask; with one, transformers' sdpa path (as eager
    # always) repeats k and v to every head before the kernel (use_gqa_in_sdpa), and
    # torch turns the bool mask into a float bias per layer that backward keeps.
    # flash_attention_2 unpads instead. SFT batches are padded: assumed here.
    kv_saved = kv if attention == "flash_attention_2" else h
    total += matmul * (h + 2 * kv_saved)  # q, k, v as the kernel takes them
    if attention == "eager":
        total += arch.heads * seq * (4 + matmul)
    else:  # the kernel's output, which o_proj then reads in place
        total += matmul * h + (seq * matmul if attention == "sdpa" else 0)
    total += 3 * matmul * i
    for name, group in _input_groups(arch.layer_linears).items():
        x_bytes = residual if name in ("attention input", "mlp input") else matmul
        shared = name == "o_proj" and attention != "eager"
        total += _saved_inputs(cfg, group, x_bytes, device, already_saved=shared)
    adapter = _adapter(cfg)
    if adapter is not None:
        total += sum(
            adapter.saved_per_token(method, lin, matmul) for lin in adapter_targets(arch.layer_linears, method)
        )
    return total


def _layer_temporaries(cfg: DictConfig, arch: Architecture, tokens: int, quantized: list[Linear]) -> float:
    """Buffers alive only while one layer runs: its backward's gradients of the MLP
    intermediates; bitsandbytes dequantizes a 4/8-bit weight for every matmul; DoRA
    forms the dense B·A and W + B·A of each target to take their norm."""
    _, matmul = _stream_bytes(cfg)
    temporaries = tokens * matmul * (2 * arch.intermediate + 2 * arch.hidden)
    if quantized:
        compute = DTYPE_BYTES[cfg.quant.compute_dtype] if cfg.quant.bits == 4 else 2
        temporaries += max(lin.d_in * lin.d_out for lin in quantized) * compute
    adapter = _adapter(cfg)
    if adapter is not None:
        temporaries += adapter.temporaries(cfg.method, adapter_targets(arch.linears, cfg.method))
    return temporaries


# ------------------------------------------------------------------------ time and cost


def token_lengths(cfg: DictConfig, base: str | None = None) -> tuple[list[int], bool, int | None]:
    """Lengths of the training examples in tokens, whether they are estimated, and
    the most trained tokens of one (None when estimated: all of them, at most).

    Tokenized exactly as training does when the tokenizer is on this machine;
    otherwise characters / plan.chars_per_token (about 4 for English BPE).
    """
    from ftx.data import Preference, load_splits
    from ftx.data.tokenized import most_trained, tokenize_split

    records = load_splits(cfg).train
    examples = [side for r in records for side in r.as_examples()] if isinstance(records[0], Preference) else records
    tokenizer = _local_tokenizer(cfg, base)
    if tokenizer is not None:
        split = tokenize_split(cfg, tokenizer, examples, packing=cfg.data.packing)
        return [len(row["input_ids"]) for row in split.rows], False, most_trained(split.sequences())
    chars = [_characters(example, cfg.data.prompt_template) for example in examples]
    lengths = [min(cfg.data.max_length, math.ceil(n / cfg.plan.chars_per_token) + 1) for n in chars]
    if cfg.data.packing:  # rows filled to data.max_length, as packing fills them
        full, rest = divmod(sum(lengths), cfg.data.max_length)
        lengths = [cfg.data.max_length] * full + ([rest] if rest else [])
    return lengths, True, None


def _characters(example, prompt_template: str) -> int:
    """Characters a rendered example holds (chat markup counted as ~16 per turn)."""
    if example.is_chat:
        return sum(len(message["content"]) + 16 for message in example.messages)
    return len(prompt_template.format(prompt=example.prompt or "")) + len(example.completion)


def _local_tokenizer(cfg: DictConfig, base: str | None):
    from ftx.models import load_tokenizer

    if base is None and cfg.model.pretrain is not None:
        from ftx.models.pretrain import base_model_dir

        built = base_model_dir(PretrainConfig(**as_container(cfg.model.pretrain)), cfg.paths.cache_dir)
        if not (built / "tokenizer.json").is_file():
            return None
        base = str(built)
    try:
        return load_tokenizer(cfg, base or cfg.model.name_or_path)
    except (OSError, ValueError):  # not on this machine (and downloads are off)
        return None


def training_steps(trainer: DictConfig, sequences: int) -> float:
    """Optimizer steps of a run over ``sequences`` training rows: ``max_steps``, or
    the epochs' batches over the accumulation."""
    if trainer.max_steps > 0:
        return trainer.max_steps
    return trainer.max_epochs * math.ceil(sequences / trainer.batch_size) / trainer.accumulate_grad_batches


def _training_cost(cfg: DictConfig, arch: Architecture, lengths: list[int], weight_bytes: int) -> dict[str, float]:
    """Tokens, FLOPs and seconds of the configured training (for RL, with its
    sampling: :func:`_sampling_cost`).

    FLOPs per token (Kaplan et al. 2020 §2.1; PaLM, Chowdhery et al. 2022, app. B):
    forward 2N over the matmul weights N, backward 4N (input and weight gradients)
    and attention 12·L·d·s for forward + backward. A frozen base skips its weight
    gradients (4N instead of 6N; the adapter adds 6 per adapter parameter);
    gradient checkpointing repeats the forward; DoRA with dropout runs each target's
    base matmul again on the dropped input (forward + input gradient).
    """
    from ftx.objectives import OBJECTIVES

    trainer = cfg.trainer
    mean = sum(lengths) / len(lengths)
    steps = training_steps(trainer, len(lengths))
    if OBJECTIVES.fact(cfg.objective.name, "SAMPLES"):
        reference = bool(OBJECTIVES.fact(cfg.objective.name, "REFERENCE"))
        return _sampling_cost(cfg, arch, steps, mean, weight_bytes, reference)
    tokens = steps * trainer.batch_size * trainer.accumulate_grad_batches * mean
    flops = _update_flops_per_token(cfg, arch, mean) * tokens
    seconds = flops / (cfg.plan.gpu_tflops * 1e12 * cfg.plan.mfu)
    return {"tokens": int(tokens), "flops": flops, "seconds": seconds, "generated_tokens": 0}


def _update_flops_per_token(cfg: DictConfig, arch: Architecture, context: float) -> float:
    """Forward + backward FLOPs per trained token at a mean ``context`` length."""
    method = cfg.method
    matmul = _matmul_params(arch)
    attention = 12 * arch.layers * arch.heads * arch.head_dim * context
    if method.adapter is None:
        per_token = 6 * matmul + attention
    else:
        per_token = (
            4 * matmul + attention + _adapter(cfg).flops_per_token(method, adapter_targets(arch.linears, method))
        )
    if cfg.model.gradient_checkpointing:
        per_token += 2 * matmul + attention / 3
    return per_token


def _matmul_params(arch: Architecture) -> int:
    return sum(lin.d_in * lin.d_out for lin in arch.linears)


def _sampling_cost(
    cfg: DictConfig, arch: Architecture, steps: float, prompt: float, weight_bytes: int, reference: bool
) -> dict:
    """RLOO/GRPO: each step samples k completions of at most data.max_new_tokens for
    every prompt, scores them, and trains on prompt + completion.

    - Generation: a forward per new token with the KV cache (2N + attention over the
      context so far); on a GPU, each decoding step also reads every weight once for
      the whole batch, so its time is at least (weight bytes / plan.gpu_bandwidth_gbs)
      per generated position: the bound that usually decides it.
    - The reference's log-probabilities (``reference``: REFERENCE objectives): a forward per token.
    - The update: forward + backward over prompt + completion, k rows per prompt.
    Completions are counted at their full length (generation stops earlier at the
    end-of-turn token); the reward model's own forward is not counted.
    """
    trainer, k, new = cfg.trainer, cfg.objective.num_generations, cfg.data.max_new_tokens
    prompts = steps * trainer.batch_size * trainer.accumulate_grad_batches
    completions = prompts * k
    context = prompt + new
    forward = 2 * _matmul_params(arch)
    attention_forward = 4 * arch.layers * arch.heads * arch.head_dim  # × context: a third of the 12·L·d·s
    generated = int(completions * new)
    generation = generated * (forward + attention_forward * (prompt + new / 2))
    scoring = completions * context * (forward + attention_forward * context) if reference else 0.0
    update = completions * context * _update_flops_per_token(cfg, arch, context)
    rate = cfg.plan.gpu_tflops * 1e12 * cfg.plan.mfu
    decoding = steps * trainer.accumulate_grad_batches * new * weight_bytes / (cfg.plan.gpu_bandwidth_gbs * 1e9)
    seconds = (update + scoring) / rate + max(generation / rate, decoding)
    flops = generation + scoring + update
    return {"tokens": int(completions * context), "flops": flops, "seconds": seconds, "generated_tokens": generated}


# ----------------------------------------------------------------------------- output


def human_bytes(n: float) -> str:
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.3g} {unit}" if n / size < 100 else f"{n / size:.0f} {unit}"
    return f"{n:.0f} B"


def human_seconds(s: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if s >= size:
            return f"{s / size:.1f} {unit}"
    return f"{s:.1f} s"


def describe(p: Plan) -> str:
    """The text ``ftx plan`` prints for one plan."""
    quant = f" · {p.quant}" if p.quant != "none" else ""
    gc = " · gradient checkpointing" if p.gradient_checkpointing else ""
    lines = [
        f"{p.model} · {p.method}{quant} · {p.precision} · batch {p.batch_size} × {p.seq_len} tokens{gc} "
        f"· on {p.device}",
        f"parameters: {p.params_total:,} total, {p.params_trainable:,} trainable ({100 * p.trainable_share:.2f}%)",
        "",
        f"{'memory':<32} {'size':>10} {'at peak':>10}  note",
    ]
    for item in p.items:
        lines.append(f"{item.name:<32} {human_bytes(item.bytes):>10} {human_bytes(item.at_peak):>10}  {item.note}")
    lines.append(f"{'peak (' + p.peak_phase + ')':<32} {'':>10} {human_bytes(p.peak_bytes):>10}")
    lines += ["", verdict(p), ""]
    lines.append(f"artefact: {p.artefact}/ ≈ {human_bytes(p.artefact_bytes)}")
    estimated = ", estimated from characters" if p.tokens_estimated else ""
    lines.append(
        f"training: {p.tokens:,} tokens{estimated}, {p.flops:.3g} FLOPs → {human_seconds(p.train_s)} on one "
        f"{p.gpu} at {100 * p.mfu:.0f}% MFU, ${p.cost_usd:,.2f}"
    )
    if p.generated_tokens:
        lines.append(
            f"  of which sampling: {p.generated_tokens:,} completion tokens generated (prompts × k × "
            "data.max_new_tokens, at most), each a forward pass; on a GPU bounded by reading the weights "
            "once per token (plan.gpu_bandwidth_gbs)"
        )
    if p.device != "cuda":
        lines.append(f"  here, on the CPU: about {human_seconds(p.device_train_s)} (plan.cpu_tflops)")
    for provider, usd in p.hosted_usd.items():
        lines.append(f"  hosted {provider}: ${usd:,.2f}")
    return "\n".join(lines)


def verdict(p: Plan, alternatives: list[tuple[str, Plan]] | None = None) -> str:
    """One plain sentence: fits or not, against the budget or the GPU."""
    if p.fits is None:
        return (
            f"peak {human_bytes(p.peak_bytes)} on {p.device}: set plan.budget_gb to check a budget, "
            "or trainer=gpu to plan the GPU run"
        )
    share = f"{100 * p.peak_bytes / p.budget_bytes:.0f}%"
    if p.fits:
        return f"fits: {human_bytes(p.peak_bytes)} of {p.budget_label} ({share})"
    what = f"{p.model} {p.method}" + (" fine-tune" if p.method == "full" else "")
    text = f"does not fit: {what} needs {human_bytes(p.peak_bytes)}, {p.budget_label}"
    fitting = [(label, alt) for label, alt in alternatives or [] if alt.fits]
    if fitting:
        text += "; try " + ", or ".join(f"{label} (≈ {human_bytes(alt.peak_bytes)})" for label, alt in fitting[:3])
    elif alternatives:
        label, smallest = min(alternatives, key=lambda pair: pair[1].peak_bytes)
        text += (
            f"; nothing fits at this batch and length: the smallest is {label} at {human_bytes(smallest.peak_bytes)}."
            " Lower trainer.batch_size or data.max_length, or use a larger GPU"
        )
    return text + "."


def compare_table(plans: list[Plan]) -> str:
    """method | peak VRAM | trainable % | artefact | time | cost, as markdown."""
    device = plans[0].device
    rows = [
        f"| method | peak memory ({device}) | fits | trainable % | artefact | time ({plans[0].gpu}) | cost |",
        "|---|---|---|---|---|---|---|",
    ]
    for p in plans:
        fits = {True: "yes", False: "no", None: "–"}[p.fits]
        rows.append(
            f"| {p.method}{' (' + p.quant + ')' if p.quant != 'none' else ''} | {human_bytes(p.peak_bytes)} | {fits} | "
            f"{100 * p.trainable_share:.2f}% | {human_bytes(p.artefact_bytes)} | {human_seconds(p.train_s)} | "
            f"${p.cost_usd:,.2f} |"
        )
    return "\n".join(rows)


def method_overrides(overrides: list[str], method: str, checkpointing: bool | None = None) -> list[str]:
    """The user's overrides with the method (and its quantization) replaced."""
    kept = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") not in ("method", "quant")]
    kept = [*kept, f"method={method}"]
    if checkpointing is not None:
        kept = [o for o in kept if not o.startswith("model.gradient_checkpointing=")]
        kept.append(f"model.gradient_checkpointing={str(checkpointing).lower()}")
    return kept


def plan_overrides(overrides: list[str]) -> Plan:
    from ftx.config import compose_config, validate

    cfg = compose_config(overrides)
    validate(cfg, check_sources=cfg.model.arch is None)  # without arch, config.json must be here
    return plan(cfg)


def alternatives(overrides: list[str], current: Plan) -> list[tuple[str, Plan]]:
    """Smaller settings to suggest when ``current`` does not fit, smallest change first."""
    options = []
    if not current.gradient_checkpointing:
        options.append(("model.gradient_checkpointing=true", method_overrides(overrides, current.method, True)))
    for method in METHODS:
        if method == current.method:
            continue
        for checkpointing in (current.gradient_checkpointing, True):
            label = f"method={method}" + (" model.gradient_checkpointing=true" if checkpointing else "")
            if label not in dict(options):
                options.append((label, method_overrides(overrides, method, checkpointing)))
    plans = [(label, plan_overrides(o)) for label, o in options]
    return sorted(plans, key=lambda pair: (not pair[1].fits, -pair[1].trainable_share, pair[1].peak_bytes))
