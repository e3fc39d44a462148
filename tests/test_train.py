"""End-to-end runs of every method on a tiny model: files written, parameters
changed (or not), metrics recorded, artefacts that load without ftx."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from conftest import read_metrics, tiny_overrides

from ftx.config import compose_config
from ftx.train import train

METHODS = ["full", "lora", "qlora", "dora"]


class Snapshot(L.Callback):
    """Parameters at fit start and end, and logits of the trained model on a fixed input."""

    def on_fit_start(self, trainer, module):
        self.before = {n: p.detach().clone() for n, p in module.model.named_parameters()}
        self.trainable = {n for n, p in module.model.named_parameters() if p.requires_grad}

    def on_fit_end(self, trainer, module):
        self.after = {n: p.detach().clone() for n, p in module.model.named_parameters()}
        module.model.eval()
        with torch.no_grad():
            self.logits = module.model(input_ids=PROBE).logits
        module.model.train()


PROBE = torch.tensor([[5, 17, 42, 99, 7, 3, 250, 11]])


def run(method: str, tiny_model_dir, tiny_data, run_dir, extra=()):
    cfg = compose_config([*tiny_overrides(tiny_model_dir, tiny_data, run_dir), f"method={method}", *extra])
    snapshot = Snapshot()
    record = train(cfg, callbacks=[snapshot])
    return record, snapshot


@pytest.mark.parametrize("method", METHODS)
def test_method_trains_and_records(method, tiny_model_dir, tiny_data, tmp_path):
    record, snap = run(method, tiny_model_dir, tiny_data, tmp_path)

    adapter = method != "full"
    artefact = tmp_path / ("adapter" if adapter else "model")
    expected = ["adapter_config.json", "adapter_model.safetensors"] if adapter else ["config.json", "model.safetensors"]
    for name in [*expected, "tokenizer.json"]:
        assert (artefact / name).is_file(), f"{artefact / name} missing"
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()

    assert snap.trainable, "nothing was trainable"
    for name, before in snap.before.items():
        changed = not torch.equal(before, snap.after[name])
        if name in snap.trainable:
            assert changed, f"trainable {name} did not change"
        else:
            assert not changed, f"frozen {name} changed"
    if adapter:
        assert all("lora_" in n for n in snap.trainable), "only adapter weights should train"
    else:
        assert snap.trainable == set(snap.before)

    metrics = read_metrics(tmp_path)
    assert metrics["status"] == "completed"
    assert metrics["method"] == method
    assert metrics["quant"] == {"qlora": "nf4"}.get(method, "none")
    for key in ("total", "trainable"):
        assert metrics["params"][key] > 0
    assert (metrics["params"]["trainable"] < metrics["params"]["total"]) == adapter
    for section, key in [
        ("quality", "eval_loss"),
        ("quality", "base_eval_loss"),
        ("quality", "task_score"),
        ("quality", "base_task_score"),
        ("memory", "peak_bytes"),
        ("throughput", "tokens_per_s"),
        ("time", "train_s"),
    ]:
        value = metrics[section][key]
        assert isinstance(value, int | float) and math.isfinite(value), f"{section}.{key}={value}"
    assert metrics["memory"]["peak_bytes"] > 0 and metrics["memory"]["device"] == "cpu"
    assert metrics["train"]["steps"] == 3


@pytest.mark.parametrize("method", ["lora", "qlora"])
@pytest.mark.parametrize("output_head", [False, True])
def test_adapter_round_trip_through_plain_peft(method, output_head, tiny_model_dir, tiny_data, tmp_path):
    """The saved adapter, loaded with transformers + peft alone, gives the trained logits
    (QLoRA: on the same 4-bit base, quantized the same way)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    extra = [f"method.adapt_output_head={str(output_head).lower()}"]
    _, snap = run(method, tiny_model_dir, tiny_data, tmp_path, extra)
    assert (tmp_path / "adapter" / "adapter_model.safetensors").stat().st_size < 200_000  # no embedding copy
    quant = None
    if method == "qlora":
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, quantization_config=quant)
    for module in base.modules():  # same 4-bit kernel as in training (see _keep_4bit_layers_trainable)
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    with torch.no_grad():
        base_logits = base(input_ids=PROBE).logits
        logits = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()(input_ids=PROBE).logits
    torch.testing.assert_close(logits, snap.logits, rtol=0, atol=1e-6)
    assert not torch.allclose(base_logits, logits, atol=1e-4), "the adapter changed nothing"


def test_full_model_loads_with_plain_transformers(tiny_model_dir, tiny_data, tmp_path):
    from transformers import AutoModelForCausalLM

    _, snap = run("full", tiny_model_dir, tiny_data, tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "model").eval()
    with torch.no_grad():
        logits = loaded(input_ids=PROBE).logits
    torch.testing.assert_close(logits, snap.logits, rtol=0, atol=1e-6)


def test_seeded_lora_losses_are_pinned(tiny_model_dir, tiny_data, tmp_path):
    """A regression test: the same seed gives the same numbers, to 1e-4."""
    record, _ = run("lora", tiny_model_dir, tiny_data, tmp_path)
    got = (record["quality"]["base_eval_loss"], record["quality"]["eval_loss"], record["train"]["final_loss"])
    torch.testing.assert_close(torch.tensor(got), torch.tensor(PINNED_LORA), rtol=0, atol=1e-4)


# base eval loss, eval loss after 3 steps, last training loss (torch 2.13 CPU, seed 42).
# Re-pinned 2026-11-30 when ftx's EpochSampler replaced RandomSampler (a new batch
# order by design: the last batch, and with it the last training loss, changed).
PINNED_LORA = (5.670176, 5.665206, 5.679943)


def test_dropout_is_active_during_training(tiny_model_dir, tiny_data, tmp_path):
    """from_pretrained returns eval mode; ftx must train with dropout on."""

    class Modes(L.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            self.dropout_training = [m.training for m in module.modules() if isinstance(m, torch.nn.Dropout)]

    modes = Modes()
    cfg = compose_config(
        ["method=lora", "method.dropout=0.1", *tiny_overrides(tiny_model_dir, tiny_data, tmp_path, steps=1)]
    )
    train(cfg, callbacks=[modes])
    assert modes.dropout_training and all(modes.dropout_training)


@pytest.mark.parametrize(
    "extra",
    [
        ["method=lora", "quant=int8"],
        ["method=qlora", "quant=fp4", "quant.double_quant=false"],
        ["method=lora", "trainer.precision=bf16-mixed", "model.gradient_checkpointing=true"],
        ["method=qlora", "model.gradient_checkpointing=true"],
        ["method=full", "model.gradient_checkpointing=true", "optim.scheduler=linear"],
        [
            "method=lora",
            "method.use_rslora=true",
            "trainer.accumulate_grad_batches=2",
            "method.target_modules=[q_proj,v_proj]",
        ],
        ["method=full", "optim.name=adamw_8bit"],
    ],
    ids=["lora-int8", "qlora-fp4", "lora-bf16-ckpt", "qlora-ckpt", "full-ckpt", "rslora-accum-qv", "full-adamw8bit"],
)
def test_variants_train(extra, tiny_model_dir, tiny_data, tmp_path):
    cfg = compose_config([*tiny_overrides(tiny_model_dir, tiny_data, tmp_path), *extra])
    snapshot = Snapshot()
    record = train(cfg, callbacks=[snapshot])
    assert record["status"] == "completed"
    assert all(not torch.equal(snapshot.before[n], snapshot.after[n]) for n in snapshot.trainable)
    if "method.target_modules=[q_proj,v_proj]" in extra:
        assert {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in snapshot.trainable} == {"q_proj", "v_proj"}


def test_parameter_counts_are_logical_under_4bit(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from ftx.models import count_parameters, load_model

    plain = count_parameters(AutoModelForCausalLM.from_pretrained(tiny_model_dir))["total"]
    for method in ("lora", "qlora"):
        cfg = compose_config(["model=hf", f"model.name_or_path={tiny_model_dir}", f"method={method}", "method.r=4"])
        counts = count_parameters(load_model(cfg, str(tiny_model_dir)))
        adapter = counts["trainable"]
        assert counts["total"] == plain + adapter, method


def _has_avx512_bf16() -> bool:
    from bitsandbytes.functional import has_avx512bf16

    return bool(has_avx512bf16())


@pytest.mark.skipif(
    not _has_avx512_bf16(),
    reason="this CPU has no AVX512-BF16: bitsandbytes never repacks 4-bit weights here, "
    "so the test would pass with or without ftx's fix (_keep_4bit_layers_trainable)",
)
def test_qlora_gradients_are_unchanged_by_an_eval_pass_before_training(tiny_model_dir):
    """bitsandbytes repacks 4-bit weights for inference on CPUs with AVX512-BF16,
    after which backward through them is wrong; ftx must train on what it evaluated."""
    from ftx.models import load_model

    cfg = compose_config(
        ["model=hf", f"model.name_or_path={tiny_model_dir}", "method=qlora", "method.r=4", "method.dropout=0"]
    )
    grads = []
    for evaluate_first in (False, True):
        torch.manual_seed(0)
        model = load_model(cfg, str(tiny_model_dir))
        if evaluate_first:
            model.eval()
            with torch.no_grad():
                model(input_ids=PROBE)
            model.train()
        model(input_ids=PROBE, labels=PROBE).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-5, atol=1e-7, msg=name)
