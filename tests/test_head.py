"""The chunked output head (ftx.models.head) against Hugging Face's full-logits
forward: the same loss, log-probs and gradients of every trainable parameter, for
tied and untied heads, with and without an adapter, on the head too."""

from __future__ import annotations

import pytest
import torch

from ftx.models.head import IGNORE_INDEX, causal_lm_loss, labelled_logps, sequence_logps

TOLERANCE = {"atol": 1e-5, "rtol": 1e-5}


def tiny_model(tied: bool, adapter: str | None):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=301,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=tied,
    )
    model = LlamaForCausalLM(config)
    if adapter is not None:
        targets = ["q_proj", "v_proj", "down_proj"] + (["lm_head"] if adapter == "lora+head" else [])
        lora = LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False)
        model = get_peft_model(model, lora)
    return model.train()


def batch_of(vocab: int = 301) -> dict[str, torch.Tensor]:
    """Three rows, one right-padded; prompts and padding unlabelled."""
    torch.manual_seed(1)
    input_ids = torch.randint(0, vocab, (3, 17))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[2, 11:] = 0
    labels = input_ids.clone()
    labels[:, :6] = IGNORE_INDEX
    labels[attention_mask == 0] = IGNORE_INDEX
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def grads(model, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad()
    loss.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("adapter", [None, "lora", "lora+head"])
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_chunked_loss_and_gradients_equal_the_full_logits_path(tied, adapter):
    model = tiny_model(tied, adapter)
    batch = batch_of()
    theirs = model(**batch, use_cache=False).loss
    expected = grads(model, theirs)
    for chunk in (1, 7, 4096):  # one token a chunk, chunks that do not divide the count, one chunk
        ours = causal_lm_loss(model, batch, chunk)
        torch.testing.assert_close(ours, theirs, **TOLERANCE)
        got = grads(model, ours)
        assert got.keys() == expected.keys() and len(got) > 0
        for name in expected:
            torch.testing.assert_close(got[name], expected[name], **TOLERANCE, msg=name)


@pytest.mark.parametrize("adapter", [None, "lora", "lora+head"])
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_losses_weighting_each_token_differently_get_the_full_logits_gradients(tied, adapter):
    """DPO's sigmoid of sequence sums and GRPO's per-token advantages weight each
    token's log-prob differently: the gradient kept per token (frozen head) and the
    checkpointed chunks (trained head) must give the same gradients as the full
    logits for such a loss too."""
    model = tiny_model(tied, adapter)
    batch = batch_of()
    weights = torch.tensor([1.5, -0.7, 0.3])

    def loss(chunk: int) -> torch.Tensor:
        sums = sequence_logps(model, batch, chunk)
        logps, (rows, _) = labelled_logps(model, batch, chunk, temperature=0.8)
        return -torch.nn.functional.logsigmoid(weights * sums).sum() - (weights[rows] * logps.exp()).mean()

    expected = grads(model, loss(0))
    for chunk in (1, 7, 4096):
        got = grads(model, loss(chunk))
        assert got.keys() == expected.keys() and len(got) > 0
        for name in expected:
            torch.testing.assert_close(got[name], expected[name], **TOLERANCE, msg=name)


@pytest.mark.parametrize(
    ("adapter", "per_token", "runs"),
    [("lora", True, 1), ("lora", False, 1), (None, False, 1), ("lora+head", False, 1), (None, True, 2)],
    ids=["frozen-head-logps", "frozen-head-loss", "full-loss", "head-adapter-loss", "full-logps-recomputed"],
)
def test_the_head_runs_once_per_chunk_where_the_gradient_allows(adapter, per_token, runs):
    """A frozen head, or a trained head under the mean cross-entropy, takes its
    gradient in the forward pass: one head matmul per chunk in forward and
    backward together, as the full-logits path; only per-token log-probs through a
    trained head are recomputed (checkpointing)."""
    model = tiny_model(tied=False, adapter=adapter)
    base = model.get_base_model() if adapter else model
    calls = []
    base.lm_head.register_forward_hook(lambda *_: calls.append(1))
    batch = batch_of()
    out = sequence_logps(model, batch, 7).sum() if per_token else causal_lm_loss(model, batch, 7)
    out.backward()
    chunks = -(-int((batch["labels"][:, 1:] != IGNORE_INDEX).sum()) // 7)
    assert len(calls) == runs * chunks


def test_sequence_and_token_logps_equal_the_full_logits_path():
    model = tiny_model(tied=True, adapter="lora").eval()
    batch = batch_of()
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        labels = batch["labels"][:, 1:]
        mask = labels != IGNORE_INDEX
        full = torch.log_softmax(logits.float() / 0.7, -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
        logps, where = labelled_logps(model, batch, chunk=5, temperature=0.7)
        torch.testing.assert_close(logps, full[mask], **TOLERANCE)
        assert torch.equal(where[0], mask.nonzero()[:, 0]) and torch.equal(where[1], mask.nonzero()[:, 1])
        per_row = torch.log_softmax(logits.float(), -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0] * mask
        torch.testing.assert_close(sequence_logps(model, batch, 5), per_row.sum(-1), **TOLERANCE)
        torch.testing.assert_close(sequence_logps(model, batch, 0), per_row.sum(-1), **TOLERANCE)


def test_packed_rows_keep_their_position_ids():
    """Padding-free packing: one row, position ids restarting per example."""
    model = tiny_model(tied=False, adapter=None)
    batch = batch_of()
    packed = {
        "input_ids": batch["input_ids"][:2].reshape(1, -1),
        "labels": batch["labels"][:2].reshape(1, -1),
        "position_ids": torch.arange(17).repeat(2)[None],
    }
    packed["labels"][0, 17] = IGNORE_INDEX  # no example's first token a target of the one before
    theirs = model(**packed, use_cache=False).loss
    torch.testing.assert_close(causal_lm_loss(model, packed, 8), theirs, **TOLERANCE)


# ---------------------------------------------------------------- 4-bit bases


def qlora_model(tiny_model_dir, tmp_path, *extra: str):
    from conftest import tiny_overrides

    from ftx.config import compose_config
    from ftx.models import load_model

    cfg = compose_config(
        [*tiny_overrides(tiny_model_dir, {"train": "x", "eval": "x"}, tmp_path), "method=qlora", *extra]
    )
    return load_model(cfg, str(tiny_model_dir))


def test_a_4bit_base_keeps_its_unquantized_parameters_in_the_model_dtype(tiny_model_dir, tmp_path):
    """PEFT's prepare_model_for_kbit_training would upcast them to fp32 (1.05 B
    parameters on Llama-3.1-8B); the adapters are fp32."""
    model = qlora_model(tiny_model_dir, tmp_path, "model.dtype=bfloat16", "quant.compute_dtype=bfloat16")
    dtypes = {name: p.dtype for name, p in model.named_parameters() if p.dtype != torch.uint8}
    assert dtypes["base_model.model.model.embed_tokens.weight"] == torch.bfloat16
    assert dtypes["base_model.model.model.norm.weight"] == torch.bfloat16
    assert {d for n, d in dtypes.items() if "lora_" in n} == {torch.float32}
    assert all(not p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)


def test_4bit_gradients_equal_the_dequantized_models(tiny_model_dir, tmp_path):
    """The LoRA gradients through frozen 4-bit Linears equal those through the same
    Linears dequantized (the weights a 4-bit layer computes with), in the model's
    own full-logits forward and the chunked head, with gradient checkpointing."""
    import bitsandbytes as bnb

    model = qlora_model(tiny_model_dir, tmp_path, "model.gradient_checkpointing=true", "method.dropout=0")
    batch = batch_of(vocab=300)
    expected_loss = causal_lm_loss(model, batch, 7)
    expected = grads(model, expected_loss)
    assert all(g.abs().sum() > 0 for name, g in expected.items() if "lora_B" in name)
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers
    originals = {}
    for layer in layers:
        weight = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state).to(torch.float32)
        originals[layer] = layer.forward
        layer.forward = lambda x, w=weight, b=layer.bias: torch.nn.functional.linear(x, w, b)
    try:
        dequantized = causal_lm_loss(model, batch, 0)
        torch.testing.assert_close(dequantized, expected_loss, **TOLERANCE)
        for name, grad in grads(model, dequantized).items():
            torch.testing.assert_close(grad, expected[name], **TOLERANCE)
    finally:
        for layer, forward in originals.items():
            layer.forward = forward
