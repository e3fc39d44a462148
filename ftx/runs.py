"""A finished run directory outside training: its config, its trained model
(reloaded for ``ftx eval``, ``generate``, a reward model's users), and its export:
the adapter merged into the base, written as a plain Hugging Face model directory
with a model card.

QLoRA's adapter was trained against the *quantized* base: the merge therefore
dequantizes the 4-bit (or 8-bit) weights exactly as the forward pass did, then adds
the LoRA update, so the exported model reproduces base-4bit + adapter, not the
original full-precision base + adapter.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from omegaconf import DictConfig, OmegaConf

from ftx.tracking import METRICS_FILE

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


def run_config(run_dir: Path) -> DictConfig:
    path = run_dir / ".hydra" / "config.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} is not an ftx run directory (no {path.relative_to(run_dir)})")
    return OmegaConf.load(path)


def load_run(
    run_dir: Path, merged: bool = False, device: str = "cpu"
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The trained model of a run (base + adapter, or full weights), in eval mode,
    on ``device``: a causal LM, or for a reward run its one-output scoring model.

    ``merged``: fold the adapter into dequantized base weights (for export).
    """
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    from ftx.models import quantization_config
    from ftx.objectives import OBJECTIVES

    cfg = run_config(run_dir)
    scores = OBJECTIVES.fact(cfg.objective.name, "HEAD") == "reward"
    auto_class = AutoModelForSequenceClassification if scores else AutoModelForCausalLM
    if (run_dir / "model").is_dir():
        model = auto_class.from_pretrained(run_dir / "model", device_map={"": device}, use_safetensors=True)
        return model.eval(), AutoTokenizer.from_pretrained(run_dir / "model")
    adapter = run_dir / "adapter"
    if not adapter.is_dir():
        raise FileNotFoundError(f"{run_dir} has neither model/ nor adapter/: did the run complete?")
    from peft import PeftModel

    tokenizer = AutoTokenizer.from_pretrained(adapter)
    # A reward model's head is new on the base: one output, reading the last non-pad token.
    head = {"num_labels": 1, "pad_token_id": tokenizer.pad_token_id} if auto_class is not AutoModelForCausalLM else {}
    base_path = json.loads((run_dir / METRICS_FILE).read_text())["base_model"]
    quant = quantization_config(cfg)
    base = auto_class.from_pretrained(
        base_path,
        **head,
        quantization_config=quant,
        dtype=_dtype(cfg),
        device_map={"": device},
        use_safetensors=True,
    )
    if merged and quant is not None:
        base = base.dequantize(dtype=_dtype(cfg))
    if merged:
        _untie_adapted_head(base, adapter)
    if not (adapter / "adapter_model.safetensors").is_file():
        raise FileNotFoundError(f"{adapter}: no adapter_model.safetensors (ftx loads no pickled weights)")
    model = PeftModel.from_pretrained(base, adapter)
    if merged:
        model = model.merge_and_unload()
    return model.eval(), tokenizer


def _untie_adapted_head(model: PreTrainedModel, adapter: Path) -> None:
    """Give an adapted output head its own weights before merging.

    When the head shares its weight with the input embeddings (tied, as in ftx's
    base) and the adapter targets it, merging would add the head's LoRA update to
    the embeddings too, and the exported model would read its inputs through the
    wrong embeddings. The merged model therefore saves both, untied.
    """
    import torch
    from peft import PeftConfig

    head, embeddings = model.get_output_embeddings(), model.get_input_embeddings()
    if head is None or head.weight is not embeddings.weight:
        return
    head_name = next(name for name, module in model.named_modules() if module is head).rsplit(".", 1)[-1]
    targets = PeftConfig.from_pretrained(adapter).target_modules
    if head_name in (targets or ()):
        head.weight = torch.nn.Parameter(head.weight.detach().clone())
        model.config.tie_word_embeddings = False


def completed_record(run_dir: Path) -> dict:
    """The run's metrics.json, refusing a run that did not complete: its artefact may be partial or absent."""
    record = json.loads((run_dir / METRICS_FILE).read_text())
    if record.get("status") != "completed":
        raise ValueError(f"{run_dir}: status is {record.get('status')!r}, not completed; nothing to export")
    return record


def export_run(run_dir: Path, out_dir: Path, adapter_only: bool = False) -> Path:
    """Write a directory that loads with plain transformers (or peft, adapter_only)."""
    import shutil

    record = completed_record(run_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir} exists and is not empty")
    if adapter_only:
        source = run_dir / record["artefact"]
        shutil.copytree(source, out_dir, dirs_exist_ok=True)
    else:
        from ftx.data.tokenized import renderer_for

        model, tokenizer = load_run(run_dir, merged=True)
        # The template the run trained with (data.chat_template, the tokenizer's, or
        # ftx's default), so a server's apply_chat_template renders as training did.
        tokenizer.chat_template = renderer_for(run_config(run_dir), tokenizer).chat_template
        model.config.use_cache = True
        model.save_pretrained(out_dir)
        tokenizer.save_pretrained(out_dir)
    (out_dir / "README.md").write_text(model_card(run_dir, record, adapter_only))
    return out_dir


MERGED_NOTE = "The LoRA update is merged into the base weights (dequantized first where the base was quantized)."


def model_card(run_dir: Path, record: dict, adapter_only: bool) -> str:
    config = OmegaConf.to_yaml(run_config(run_dir))
    quality = "\n".join(f"| {k} | {v:.4g} |" for k, v in sorted(record.get("quality", {}).items()) if v is not None)
    how = (
        "PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(BASE), THIS_DIR)"
        if adapter_only
        else "AutoModelForCausalLM.from_pretrained(THIS_DIR)"
    )
    return f"""---
library_name: {"peft" if adapter_only else "transformers"}
base_model: {record.get("base_model")}
tags: [ftx, {record.get("method")}]
---
# {record.get("run_name", run_dir.name)}

Fine-tuned with ftx: method `{record.get("method")}`, quantization `{record.get("quant")}`,
objective `{record.get("objective")}`, seed {record.get("seed")}. Load with `{how}`.
{"" if adapter_only else MERGED_NOTE}

| metric | value |
|---|---|
{quality}

Peak training memory: {record.get("memory", {}).get("peak_bytes")} bytes ({record.get("memory", {}).get("device")}).

## Config

```yaml
{config}```
"""


def _dtype(cfg: DictConfig):
    import torch

    return getattr(torch, cfg.model.dtype)
