"""Models: resolve the base, load it (quantized with bitsandbytes when asked), apply
the method (full fine-tuning or a PEFT adapter), and save the trained artefact.

Loading order follows QLoRA's recipe: quantize at load time, freeze the base
(input gradients on for gradient checkpointing), then wrap with LoRA. Unlike PEFT's
``prepare_model_for_kbit_training``, the parameters bitsandbytes leaves unquantized
(embeddings, output head, norms: 1.05 B on Llama-3.1-8B) stay in ``model.dtype``
rather than fp32; the adapters are fp32 (PEFT's ``autocast_adapter_dtype``). Full
fine-tuning leaves every parameter trainable.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from omegaconf import DictConfig

from ftx.config import as_container

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)


def resolve_base(cfg: DictConfig) -> str:
    """Path or hub id of the base model, building ftx's own base if configured."""
    if cfg.model.pretrain is not None:
        from ftx.config import PretrainConfig
        from ftx.models.pretrain import ensure_base_model

        settings = PretrainConfig(**as_container(cfg.model.pretrain))
        return str(ensure_base_model(settings, cfg.paths.cache_dir))
    path = Path(cfg.model.name_or_path).expanduser()
    return str(path) if path.is_dir() else cfg.model.name_or_path


def _dtype(name: str):
    import torch

    return getattr(torch, name)


class _OncePerMessage(logging.Filter):
    """bitsandbytes logs the same warning on every int8 matmul; keep the first."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg in self.seen:
            return False
        self.seen.add(record.msg)
        return True


_ONCE_PER_MESSAGE = _OncePerMessage()


def quantization_config(cfg: DictConfig):
    """A transformers BitsAndBytesConfig for ``cfg.quant``, or None."""
    from transformers import BitsAndBytesConfig

    quant = cfg.quant
    if quant.bits == 4:
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=quant.quant_type,
            bnb_4bit_use_double_quant=quant.double_quant,
            bnb_4bit_compute_dtype=_dtype(quant.compute_dtype),
        )
    if quant.bits == 8:
        logging.getLogger("bitsandbytes.autograd._functions").addFilter(_ONCE_PER_MESSAGE)
        return BitsAndBytesConfig(load_in_8bit=True)
    return None


def load_tokenizer(cfg: DictConfig, base: str) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(
        cfg.model.tokenizer or base,
        local_files_only=not cfg.model.allow_download,
        trust_remote_code=cfg.model.trust_remote_code,
    )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(
    cfg: DictConfig,
    base: str,
    device: str = "cpu",
    head: str = "causal_lm",
    pad_token_id: int | None = None,
    config=None,
) -> PreTrainedModel:
    """The base model with ``cfg.method`` applied, in train mode, on ``device``
    (loaded there directly: bitsandbytes quantizes while placing weights).

    ``head``: ``causal_lm``, or ``reward``: a sequence-classification head with one
    output (new, trained in full) on the same backbone, a causal LM or an encoder;
    it reads the score at the last non-pad token, so it needs ``pad_token_id``.
    ``config``: a transformers config to build instead of the base's own (the
    runtime overhead calibration's :func:`truncated_config`: the weights of layers
    it cuts are not read).
    """
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    quant = quantization_config(cfg)
    auto_class, extra = AutoModelForCausalLM, {}
    if head == "reward":
        auto_class, extra = AutoModelForSequenceClassification, {"num_labels": 1, "pad_token_id": pad_token_id}
    if config is not None:
        extra["config"] = config
    model = auto_class.from_pretrained(
        base,
        **extra,
        dtype=_dtype(cfg.model.dtype),
        attn_implementation=cfg.model.attn_implementation,
        quantization_config=quant,
        device_map={"": device},
        local_files_only=not cfg.model.allow_download,
        trust_remote_code=cfg.model.trust_remote_code,
        use_safetensors=True,  # pickled weights (.bin) can run code when loaded: never read
    )
    model.config.use_cache = False  # the KV cache only costs memory in training
    if cfg.method.adapter is None:
        if cfg.model.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model = apply_adapter(cfg, model, quantized=quant is not None, head=head)
    # from_pretrained returns eval mode and Lightning preserves submodule modes:
    # without this, dropout (LoRA's included) would silently stay off.
    model.train()
    return model


def truncated_config(cfg: DictConfig, base: str, layers: int):
    """The base's transformers config cut to its first ``layers`` decoder layers
    (per-layer lists such as ``layer_types`` cut with it)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(
        base, local_files_only=not cfg.model.allow_download, trust_remote_code=cfg.model.trust_remote_code
    )
    depth = config.num_hidden_layers
    config.num_hidden_layers = layers
    for key, value in list(vars(config).items()):
        if isinstance(value, list) and len(value) == depth and key != "architectures":
            setattr(config, key, value[:layers])
    return config


def apply_adapter(cfg: DictConfig, model: PreTrainedModel, quantized: bool, head: str = "causal_lm") -> PreTrainedModel:
    """The base, frozen, with ``method.adapter`` on its targets (:mod:`ftx.adapters`)."""
    from peft import get_peft_model

    from ftx.adapters import ADAPTERS

    method = cfg.method
    checkpointing = cfg.model.gradient_checkpointing
    if quantized:
        _keep_4bit_layers_trainable(model)
        model.requires_grad_(False)  # the base is frozen; its unquantized parameters keep their dtype
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()  # frozen embeddings would cut the graph
    # SEQ_CLS keeps the new score head trainable in full (modules_to_save).
    output_head = method.adapt_output_head and head == "causal_lm"
    targets = _targets(model, as_container(method.target_modules), output_head)
    task_type = "CAUSAL_LM" if head == "causal_lm" else "SEQ_CLS"
    return get_peft_model(model, ADAPTERS.load(method.adapter).peft_config(method, targets, task_type))


def _targets(model: PreTrainedModel, targets: str | list[str], output_head: bool) -> str | list[str]:
    """PEFT's target_modules, plus the output head when asked.

    PEFT's ``all-linear`` means every Linear except the output layer; with the head
    it becomes the explicit list of Linear names (bitsandbytes layers subclass Linear).
    """
    if not output_head:
        return targets
    import torch

    if targets == "all-linear":
        targets = sorted(
            {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
        )
    head = model.get_output_embeddings()
    head_name = next(name for name, m in model.named_modules() if m is head).rsplit(".", 1)[-1]
    return sorted({*targets, head_name})


def _keep_4bit_layers_trainable(model: PreTrainedModel) -> None:
    """Turn off bitsandbytes' CPU inference repacking of 4-bit weights.

    On CPUs with AVX512-BF16, a Linear4bit forward in eval mode without grad (our
    before-training evaluation) repacks its weight for a gemv kernel and keeps it
    packed; later training forwards then run that kernel, which has no autograd, so
    gradients through the frozen 4-bit layers silently go wrong (bitsandbytes 0.50,
    torch warns "gemv_4bit: an autograd kernel was not registered"). Measured here:
    QLoRA's task score on the default experiment rose from 0.33 to 0.625 with this off.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def count_parameters(model: PreTrainedModel) -> dict[str, int]:
    """Total and trainable parameters; 4-bit weights count as their logical size
    (bitsandbytes packs them into a flat buffer of quant_storage elements)."""
    total = trainable = 0
    for param in model.parameters():
        quant_state = getattr(param, "quant_state", None)
        n = quant_state.shape.numel() if quant_state is not None else param.numel()
        total += n
        if param.requires_grad:
            trainable += n
    return {"total": total, "trainable": trainable}


def save_artefact(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, run_dir: Path, adapter: bool) -> Path:
    """Write ``adapter/`` (PEFT format) or ``model/`` (safetensors) with the tokenizer."""
    out = run_dir / ("adapter" if adapter else "model")
    if adapter:
        # Embeddings stay frozen under LoRA; PEFT would still copy them into the
        # adapter when the output head is adapted and tied to them.
        model.save_pretrained(out, save_embedding_layers=False)
    else:
        model.config.use_cache = True  # loaded for inference, where the cache pays
        model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
