"""A run's merged model as one GGUF file, for llama.cpp, Ollama and LM Studio.

The model is the one ``ftx export`` writes for Hugging Face (:func:`ftx.runs.load_run`
with ``merged=True``: for QLoRA the 4-bit base dequantized as training saw it, plus the
adapter), written with ``gguf``, llama.cpp's own writer, under the conventions of
llama.cpp's ``convert_hf_to_gguf.py`` (its ``LlamaModel`` and ``Qwen2Model``):

- architecture: Llama and Mistral are GGUF ``llama`` (llama.cpp converts
  MistralForCausalLM as a Llama and, like it, ignores Mistral's sliding window);
  Qwen2 is ``qwen2``, biases on q/k/v included. Anything else is refused by name.
- tensors: named by ``gguf.get_tensor_name_map`` (``model.layers.0.self_attn.q_proj.weight``
  becomes ``blk.0.attn_q.weight``). A tied head writes no ``output.weight``: llama.cpp
  then reads ``token_embd``, and transformers reads the absence as tied embeddings.
- rotary layout: Hugging Face's Llama rotates dimension i with i + d/2 of each head
  (``rotate_half``), ggml's ``llama`` rope pairs 2i with 2i+1, so the rows of q and k
  are permuted per head (``LlamaModel.permute``; transformers' GGUF loader undoes it).
  Qwen2 runs NeoX-style rope in llama.cpp, Hugging Face's layout: no permutation.
  Llama 3's rope scaling is written as llama.cpp's ``rope_freqs`` factors.
- types: 2-D weights in the chosen type; 1-D tensors (norms, biases) stay f32, which is
  all most ggml kernels take them in. q8_0 falls back to f16 for a tensor whose rows
  are not a multiple of its 32-value blocks, as llama.cpp does.
- tokenizer: byte-level BPE as ``tokenizer.ggml.model = gpt2`` with its tokens, types,
  merges, special ids and BOS/EOS behaviour, and the pre-tokenizer under the name
  llama.cpp knows it by; the chat template is the one the run trained with
  (``data.chat_template``, else the tokenizer's, else ftx's default), so a server
  renders conversations as training did.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Iterator

    import numpy as np
    import torch
    from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

GGUF_TYPES = ("f16", "bf16", "q8_0")
"""``--gguf-type``: f16 and bf16 round each weight (f16 keeps 3 more mantissa bits,
bf16 the full float32 range); q8_0 stores 8-bit values with one f16 scale per 32,
about half the size of f16."""

DEFAULT_GGUF_TYPE = "f16"

ARCHITECTURES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}
"""transformers ``model_type`` -> GGUF architecture, as llama.cpp's converter maps them."""

PERMUTED_QK = {"llama", "mistral"}
"""Model types whose q/k rows llama.cpp permutes to its interleaved rope layout."""

# Split patterns of byte-level BPE pre-tokenizers, by llama.cpp's name for them
# (llama.cpp's convert_hf_to_gguf.py get_vocab_base_pre; the regexes are the models' own tokenizer.json).
SPLIT_PRE_TOKENIZERS = {
    (  # Llama 3
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
        r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
    ): "llama-bpe",
    (  # Qwen2: digits one at a time
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
        r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
    ): "qwen2",
}


CONVERT_INSTEAD = (
    "export with `ftx export RUN --format hf` and convert that directory with llama.cpp's convert_hf_to_gguf.py"
)


def export_gguf(run_dir: Path, out: Path, gguf_type: str = DEFAULT_GGUF_TYPE) -> Path:
    """Write the run's merged model to ``out`` (a ``.gguf`` path, or a directory that
    receives ``model-<type>.gguf``) and return the file's path. Refuses, before loading
    any weights, a run that did not complete, a reward model, an architecture or
    tokenizer llama.cpp's conventions here do not cover, and an existing file."""
    from transformers import AutoConfig, AutoTokenizer

    from ftx.data.tokenized import renderer_for
    from ftx.objectives import OBJECTIVES
    from ftx.runs import completed_record, load_run, run_config

    _check_type(gguf_type)
    _import_gguf()
    record, cfg = completed_record(run_dir), run_config(run_dir)
    if OBJECTIVES.fact(cfg.objective.name, "HEAD") == "reward":
        raise ValueError(
            f"{run_dir} is a reward model (objective=reward): it scores sequences, and GGUF runtimes "
            "generate; export it with `ftx export RUN --format hf` instead."
        )
    weights = run_dir / "model" if (run_dir / "model").is_dir() else Path(record["base_model"])
    check_supported(AutoConfig.from_pretrained(weights))
    _pre_tokenizer_name(AutoTokenizer.from_pretrained(run_dir / record["artefact"]))
    target = out / f"model-{gguf_type}.gguf" if out.suffix != ".gguf" else out
    if target.exists():
        raise FileExistsError(f"{target} exists; remove it or give another --out")
    model, tokenizer = load_run(run_dir, merged=True)
    renderer = renderer_for(cfg, tokenizer)
    if renderer.template_kwargs:
        log.warning(
            "data.chat_template_kwargs=%s are not stored in GGUF: servers render the template without them",
            renderer.template_kwargs,
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    return write_gguf(model, tokenizer, target, gguf_type, renderer.chat_template, name=record["run_name"])


def check_supported(config: PretrainedConfig) -> None:
    """Refuse, naming the architecture or setting, what this writer would get wrong."""
    if config.model_type not in ARCHITECTURES:
        classes = f" ({', '.join(config.architectures)})" if config.architectures else ""
        raise ValueError(
            f"GGUF export covers the llama-family architectures {', '.join(ARCHITECTURES)}; this model is "
            f"{config.model_type!r}{classes}; {CONVERT_INSTEAD}, which knows more architectures."
        )
    rope_type = config.rope_parameters["rope_type"]
    if rope_type not in ("default", "llama3") or (rope_type == "llama3" and config.model_type not in PERMUTED_QK):
        raise ValueError(
            f"{config.model_type} with rope_parameters.rope_type={rope_type!r}: GGUF export writes default RoPE "
            f"and Llama 3's scaling only; {CONVERT_INSTEAD}."
        )
    biased = [name for name in ("attention_bias", "mlp_bias") if getattr(config, name, False)]
    if config.model_type in PERMUTED_QK and biased:
        raise ValueError(f"{config.model_type} with {', '.join(biased)}=true: not written here; {CONVERT_INSTEAD}.")
    if getattr(config, "use_sliding_window", False):
        raise ValueError(f"{config.model_type} with use_sliding_window=true: GGUF's has none; {CONVERT_INSTEAD}.")


def write_gguf(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    path: Path,
    gguf_type: str,
    chat_template: str | dict[str, str] | None,
    name: str,
) -> Path:
    """Write ``model`` and ``tokenizer`` (with ``chat_template``) to ``path``; the file
    appears complete or not at all (written beside it, then renamed)."""
    gguf = _import_gguf()
    _check_type(gguf_type)
    config = model.config
    check_supported(config)
    writer = gguf.GGUFWriter(path=None, arch=ARCHITECTURES[config.model_type])
    n_vocab = model.get_input_embeddings().weight.shape[0]
    _add_hyperparameters(writer, config, n_vocab, name, gguf_type)
    _add_tokenizer(writer, tokenizer, n_vocab, chat_template)
    for tensor_name, data in _tensors(model):
        qtype = _tensor_type(tensor_name, data, gguf_type)
        try:
            writer.add_tensor(tensor_name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
        except gguf.quants.QuantError:  # rows not a whole number of blocks, as llama.cpp: f16 instead
            writer.add_tensor(tensor_name, data.astype("float16"), raw_dtype=gguf.GGMLQuantizationType.F16)
    partial = path.with_name(f".{path.name}.partial")
    try:
        writer.write_header_to_file(path=partial)
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(partial, path)
    except BaseException:
        writer.close()
        partial.unlink(missing_ok=True)
        raise
    return path


def _add_hyperparameters(writer: Any, config: PretrainedConfig, n_vocab: int, name: str, gguf_type: str) -> None:
    """The keys llama.cpp's TextModel.set_gguf_parameters (and LlamaModel's) write."""
    gguf = _import_gguf()
    head_dim = _head_dim(config)
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(n_vocab)
    file_types = {"f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0"}
    writer.add_file_type(gguf.LlamaFileType[file_types[gguf_type]])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _tensors(model: PreTrainedModel) -> Iterator[tuple[str, np.ndarray]]:
    """(GGUF name, float32 array) for every weight, q/k permuted where llama.cpp does,
    the head left out when tied, Llama 3's rope factors added."""
    import torch

    gguf = _import_gguf()
    config = model.config
    arch = next(key for key, value in gguf.MODEL_ARCH_NAMES.items() if value == ARCHITECTURES[config.model_type])
    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    head, embeddings = model.get_output_embeddings(), model.get_input_embeddings()
    head_name = next(name for name, module in model.named_modules() if module is head) + ".weight"
    tied = head.weight.data_ptr() == embeddings.weight.data_ptr()
    heads = {"q_proj": config.num_attention_heads, "k_proj": config.num_key_value_heads}
    for hf_name, tensor in model.state_dict().items():
        if tied and hf_name == head_name:
            continue
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ValueError(f"{hf_name}: no llama.cpp name for it in GGUF's {ARCHITECTURES[config.model_type]}")
        data = tensor.detach().to(device="cpu", dtype=torch.float32)
        projection = hf_name.rsplit(".", 2)[-2]
        if config.model_type in PERMUTED_QK and projection in heads:
            data = _permute(data, heads[projection])
        yield gguf_name, data.contiguous().numpy()
    if config.rope_parameters["rope_type"] == "llama3":
        yield gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", _rope_factors(model).numpy()


def _permute(weights: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's LlamaModel.permute: each head's rows from halves (i, i + d/2) to pairs (2i, 2i+1)."""
    return (
        weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def _rope_factors(model: PreTrainedModel) -> torch.Tensor:
    """Llama 3's rope scaling as llama.cpp stores it: ggml divides each default frequency
    by its factor, so the factors are the default frequencies over the scaled ones the
    model itself computed (transformers' llama3 rope, not a second copy of its formula)."""
    import torch

    config = model.config
    head_dim = _head_dim(config)
    base = config.rope_parameters["rope_theta"]
    default = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    return (default / model.model.rotary_emb.inv_freq.float().cpu()).contiguous()


def _head_dim(config: PretrainedConfig) -> int:
    """A config's explicit head_dim (Mistral Nemo's is not hidden / heads), else hidden / heads."""
    explicit = getattr(config, "head_dim", None)
    return explicit if explicit else config.hidden_size // config.num_attention_heads


def _tensor_type(name: str, data: np.ndarray, gguf_type: str) -> Any:
    """llama.cpp's rule: 1-D tensors and norms in f32, every other weight in the file's type."""
    gguf = _import_gguf()
    if data.ndim <= 1 or name.endswith("_norm.weight") or not name.endswith(".weight"):
        return gguf.GGMLQuantizationType.F32
    return gguf.GGMLQuantizationType[gguf_type.upper()]


def _add_tokenizer(
    writer: Any, tokenizer: PreTrainedTokenizerBase, n_vocab: int, chat_template: str | dict[str, str] | None
) -> None:
    """Vocabulary, merges, special ids, BOS/EOS behaviour and chat template, under the
    ``tokenizer.*`` keys llama.cpp reads (and transformers' GGUF tokenizer rebuilds from)."""
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_tokenizer_name(tokenizer))
    tokens, types = _vocabulary(tokenizer, n_vocab)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    writer.add_token_merges([merge if isinstance(merge, str) else " ".join(merge) for merge in merges])
    for kind in ("bos", "eos", "unk", "pad"):
        token_id = getattr(tokenizer, f"{kind}_token_id")
        if token_id is not None:
            getattr(writer, f"add_{kind}_token_id")(token_id)
    # What the tokenizer does, not what its files claim: does encoding add BOS / EOS?
    probe = tokenizer("a")["input_ids"]
    writer.add_add_bos_token(tokenizer.bos_token_id is not None and probe[0] == tokenizer.bos_token_id)
    writer.add_add_eos_token(tokenizer.eos_token_id is not None and probe[-1] == tokenizer.eos_token_id)
    if isinstance(chat_template, dict):  # named templates, llama.cpp's list form: "default" is the main one
        writer.add_chat_template([{"name": key, "template": value} for key, value in chat_template.items()])
    elif chat_template is not None:
        writer.add_chat_template(chat_template)


def _pre_tokenizer_name(tokenizer: PreTrainedTokenizerBase) -> str:
    """llama.cpp's name (``tokenizer.ggml.pre``) for how the tokenizer splits text before
    BPE; refuses a tokenizer that is not byte-level BPE, or splits in a way not listed."""
    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    model, pre, decoder = backend["model"], backend["pre_tokenizer"] or {}, backend["decoder"] or {}
    if model["type"] != "BPE" or model.get("byte_fallback") or decoder.get("type") != "ByteLevel":
        kind = "BPE with byte fallback (SentencePiece style)" if model["type"] == "BPE" else model["type"]
        raise ValueError(
            f"GGUF export writes byte-level BPE tokenizers (GPT-2, Llama 3, Qwen2 style); this one is {kind}: "
            f"{CONVERT_INSTEAD}."
        )
    if pre.get("type") == "ByteLevel" and pre["use_regex"]:
        return "gpt-2"
    steps = pre["pretokenizers"] if pre.get("type") == "Sequence" else [pre]
    kinds = [step.get("type") for step in steps]
    if kinds == ["Split", "ByteLevel"] and not steps[1]["use_regex"]:
        name = SPLIT_PRE_TOKENIZERS.get(steps[0]["pattern"].get("Regex"))
        if name is not None:
            return name
    raise ValueError(
        f"the tokenizer's pre-tokenizer {json.dumps(pre)} is not one GGUF export knows llama.cpp's name for "
        f"(GPT-2's, or a Split by the regex of {', '.join(SPLIT_PRE_TOKENIZERS.values())}); {CONVERT_INSTEAD}."
    )


def _vocabulary(tokenizer: PreTrainedTokenizerBase, n_vocab: int) -> tuple[list[str], list[int]]:
    """One token per embedding row, typed as llama.cpp's get_vocab_base types them:
    special added tokens CONTROL, other added ones USER_DEFINED, rows without a token
    (a vocabulary padded for speed) ``[PAD<id>]`` UNUSED."""
    gguf = _import_gguf()
    by_id = {index: token for token, index in tokenizer.get_vocab().items()}
    if max(by_id) >= n_vocab:
        raise ValueError(f"the tokenizer has token id {max(by_id)}, the model's embeddings only {n_vocab} rows")
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for index in range(n_vocab):
        if index not in by_id:
            tokens.append(f"[PAD{index}]")
            types.append(gguf.TokenType.UNUSED)
        elif index in added:
            tokens.append(by_id[index])
            types.append(gguf.TokenType.CONTROL if added[index].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[index])
            types.append(gguf.TokenType.NORMAL)
    return tokens, types


def _check_type(gguf_type: str) -> None:
    if gguf_type not in GGUF_TYPES:
        raise ValueError(f"--gguf-type {gguf_type}: choose from {', '.join(GGUF_TYPES)}")


def _import_gguf():
    """The ``gguf`` package (llama.cpp's gguf-py), imported only when a GGUF is written."""
    try:
        import gguf
    except ImportError as error:
        raise ImportError(
            f"GGUF export needs the gguf package (llama.cpp's writer): pip install 'ftx[gguf]' ({error})"
        ) from error
    return gguf
