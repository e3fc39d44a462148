"""ftx's own base model: built from the interpreter's docs, cached, reused."""

from __future__ import annotations

import json
import math

from ftx.config import PretrainConfig
from ftx.models.pretrain import base_model_dir, ensure_base_model, python_docs_corpus

SMALL = PretrainConfig(
    vocab_size=400,
    hidden_size=64,
    intermediate_size=128,
    num_layers=2,
    num_heads=2,
    seq_len=64,
    steps=30,
    batch_size=8,
    lr=3e-3,
)


def test_corpus_is_the_python_documentation():
    docs = python_docs_corpus()
    text = "\n".join(docs)
    assert len(text) > 400_000
    assert 'The "if" statement' in text or "if_stmt" in text


def test_base_is_built_once_learns_and_loads(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = ensure_base_model(SMALL, tmp_path)
    assert path == base_model_dir(SMALL, tmp_path)
    record = json.loads((path / "ftx_pretrain.json").read_text())
    assert record["final_loss"] < math.log(SMALL.vocab_size) - 0.5  # learnt beyond uniform
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    assert ensure_base_model(SMALL, tmp_path) == path
    assert (path / "model.safetensors").stat().st_mtime_ns == stamp  # reused, not rebuilt
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".build-")]

    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert model.config.vocab_size == len(tokenizer) and model.config.hidden_size == 64
    other = PretrainConfig(**{**SMALL.__dict__, "steps": 31})
    assert base_model_dir(other, tmp_path) != path  # any setting change is a new base
