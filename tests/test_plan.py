"""The planner (ftx plan): known values, breakdowns that add up, predictions
against measured peaks, family configs without network, budgets that prune."""

from __future__ import annotations

import json
import sys

import pytest
from conftest import ftx_main, read_metrics, tiny_overrides

from ftx.config import compose_config, config_dir, project_root
from ftx.memory.plan import METHODS, fits_budget, plan, plan_overrides, quantized_bytes_per_param
from ftx.train import train

FAMILIES = {  # preset: parameters of the published checkpoint
    "llama31_8b": 8_030_261_248,
    "llama2_7b": 6_738_415_616,
    "mistral_7b": 7_248_023_552,
    "qwen25_7b": 7_615_616_512,
    "llama31_70b": 70_553_706_496,
}
# The planner's tensor terms against torch's own accounting of live tensors (the
# profiler's allocation events), which is the same on every machine.
# Tolerance: the planner's own accuracy on a model this small, where the small
# per-op tensors it rounds away (masks, rotary tables, temporaries) weigh most;
# measured +1% (full) to +5% (LoRA), the same in any test order.
TENSOR_TOLERANCE = 0.10


def test_family_presets_are_the_shipped_model_configs():
    shipped = {path.stem for path in (config_dir() / "model").glob("*.yaml")}
    assert set(FAMILIES) <= shipped


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_family_plans_without_network(family, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    predicted = plan_overrides([f"model={family}", "method=qlora", "trainer=gpu"])
    assert predicted.params_total - predicted.params_trainable == FAMILIES[family]
    assert 0 < predicted.trainable_share < 0.01
    assert sum(item.at_peak for item in predicted.items) == predicted.peak_bytes


def test_llama2_7b_known_values():
    """6.74B parameters; bf16 weights 13.5 GB; NF4 with double quantization 0.516
    byte/param (QLoRA §3: 4.127 bits), so ~3.3 GB for its Linears."""
    full = plan_overrides(["model=llama2_7b", "method=full", "trainer=gpu"])
    assert full.params_total == 6_738_415_616
    weights = {item.key: item.bytes for item in full.items}["weights"]
    assert weights == pytest.approx(13.48e9, rel=0.01)
    assert full.artefact_bytes == weights

    assert quantized_bytes_per_param(compose_config(["method=qlora", "quant.double_quant=false"]).quant, 4096) == 0.5625
    nf4 = compose_config(["method=qlora"]).quant
    assert quantized_bytes_per_param(nf4, 4096) * 8 == pytest.approx(4.127, abs=1e-3)
    qlora = plan_overrides(["model=llama2_7b", "method=qlora", "trainer=gpu"])
    linears = 6_738_415_616 - 2 * 32000 * 4096 - 65 * 4096  # minus embeddings, head, norms
    qlora_weights = {item.key: item.bytes for item in qlora.items}["weights"]
    # 4-bit Linears + the rest in model.dtype (bf16 for llama2_7b; no fp32 upcast) + fp32 adapters
    expected = linears * 0.515869 + (2 * 32000 * 4096 + 65 * 4096) * 2 + qlora.params_trainable * 4
    assert qlora_weights == pytest.approx(expected, rel=1e-3)
    assert 3.3e9 < linears * 0.515869 < 3.5e9
    assert qlora.artefact_bytes == qlora.params_trainable * 4  # fp32 adapter
    assert qlora.peak_bytes < full.peak_bytes / 3


def test_plan_for_a_large_family_loads_nothing_and_says_plainly_it_does_not_fit(monkeypatch):
    """Planning a 70B model reads no weights and no hub: the model is built on the
    meta device (a check that holds on any machine, unlike a time limit)."""
    import huggingface_hub
    import safetensors.torch
    import torch

    def refused(*args, **kwargs):
        raise AssertionError("planning must not load or download weights")

    for owner, name in [(safetensors.torch, "load_file"), (torch, "load"), (huggingface_hub, "hf_hub_download")]:
        monkeypatch.setattr(owner, name, refused)
    monkeypatch.setattr("transformers.PreTrainedModel.from_pretrained", classmethod(refused))
    done = ftx_main("plan", "model=llama31_70b", "method=full", "plan.budget_gb=24")
    assert done.returncode == 1, done.stderr
    verdict = next(line for line in done.stdout.splitlines() if line.startswith("does not fit"))
    assert "llama31-70b full fine-tune needs" in verdict and "budget 24 GB" in verdict
    assert "method=qlora" in verdict  # what comes closest, said as a command


def test_plan_that_fits_suggests_nothing_and_json_is_complete():
    done = ftx_main("plan", "model=llama31_8b", "method=qlora", "trainer=gpu", "--json")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["fits"] is True and result["method"] == "qlora"
    assert sum(item["at_peak"] for item in result["items"]) == result["peak_bytes"]
    for key in ("params_trainable", "artefact_bytes", "tokens", "flops", "train_s", "cost_usd", "hosted_usd"):
        assert result[key], key


def test_compare_prints_every_method():
    done = ftx_main("plan", "--compare", "model=llama31_8b", "trainer=gpu")
    assert done.returncode == 0, done.stderr
    rows = [line for line in done.stdout.splitlines() if line.startswith("| ") and "method" not in line]
    assert [row.split("|")[1].split()[0] for row in rows] == list(METHODS)
    assert "peak memory" in done.stdout and "trainable %" in done.stdout and "cost" in done.stdout


def test_breakdown_adds_up_for_every_method_and_setting(tiny_model_dir, tiny_data, tmp_path):
    settings = [[], ["model.gradient_checkpointing=true"], ["trainer.precision=bf16-mixed"], ["optim.name=adamw_8bit"]]
    for extra in settings:
        for method in METHODS:
            cfg = compose_config([*tiny_overrides(tiny_model_dir, tiny_data, tmp_path), f"method={method}", *extra])
            predicted = plan(cfg)
            assert sum(item.at_peak for item in predicted.items) == predicted.peak_bytes > 0
            assert all(0 <= item.at_peak <= item.bytes for item in predicted.items)


def test_gradient_checkpointing_and_8bit_states_predict_less(tiny_model_dir, tiny_data, tmp_path):
    overrides = [*tiny_overrides(tiny_model_dir, tiny_data, tmp_path), "method=full", "trainer.batch_size=16"]

    def item(extra, key):
        return {i.key: i.bytes for i in plan(compose_config([*overrides, *extra])).items}[key]

    assert item(["model.gradient_checkpointing=true"], "activations") < item([], "activations")
    assert item(["optim.name=adamw_8bit"], "optimizer_states") < item([], "optimizer_states")


@pytest.mark.parametrize("method", METHODS)
def test_planned_tensors_match_torchs_own_accounting(method, tiny_model_dir, tiny_data, tmp_path):
    """The whole run (loading, scoring the base, training, scoring, saving) under
    torch's profiler: its peak of live tensor bytes is the planner's prediction
    without the runtime overhead (which is measured per run, not planned)."""
    from ftx.memory import TensorPeak

    overrides = [
        *tiny_overrides(tiny_model_dir, tiny_data, tmp_path),
        f"method={method}",
        "trainer.save_checkpoints=false",
    ]
    with TensorPeak() as measured:
        record = train(compose_config(overrides))
    memory = record["memory"]
    assert sum(memory["predicted"].values()) == memory["predicted_bytes"]
    tensors = memory["predicted_bytes"] - memory["predicted"]["overhead"]
    error = (tensors - measured.peak_bytes) / measured.peak_bytes
    assert abs(error) < TENSOR_TOLERANCE, (
        f"{method}: planned {tensors} B of tensors, torch counted {measured.peak_bytes}"
    )


PREFERENCES = ["objective=dpo", "data=json_prefs", "data.eval_examples=2"]  # the shipped pairs


@pytest.mark.parametrize(
    ("method", "extra"), [("lora", []), ("qlora", []), ("lora", PREFERENCES)], ids=["lora", "qlora", "dpo"]
)
def test_a_cpu_run_measures_its_runtime_overhead_before_loading_weights(
    method, extra, tiny_model_dir, tiny_data, tmp_path
):
    """Without plan.cpu_overhead_mb, the run trains copies of its base cut to 1 and 2
    layers and predicts with what they measured; the planned tensor terms of each
    copy are the planner's own, and a stated overhead replaces the measurement.
    (DPO: the copies train on the pairs' longest sides.)"""
    from ftx.calibration import DEPTHS
    from ftx.memory.plan import tensor_bytes, token_lengths
    from ftx.models import truncated_config

    overrides = [o for o in tiny_overrides(tiny_model_dir, tiny_data, tmp_path) if not o.startswith("plan.")]
    if extra:
        overrides = [o for o in overrides if not o.startswith(("data.train_file", "data.eval_file"))] + extra
    cfg = compose_config([*overrides, f"method={method}", "trainer.save_checkpoints=false"])
    calibrated = train(cfg)
    memory = calibrated["memory"]
    calibration = memory["calibration"]
    assert set(calibration["measured_bytes"]) == {str(d) for d in DEPTHS}
    assert memory["predicted"]["overhead"] == calibration["overhead_bytes"]
    assert calibration["overhead_bytes"] == calibration["fixed_bytes"] + 2 * calibration["per_layer_bytes"]  # 2 layers
    assert sum(memory["predicted"].values()) == memory["predicted_bytes"]
    lengths, estimated, _ = token_lengths(cfg, str(tiny_model_dir))
    assert not estimated and calibration["seq_len"] == max(lengths)  # the planned batch: the longest
    for depth in DEPTHS:
        config = truncated_config(cfg, str(tiny_model_dir), depth)
        assert config.num_hidden_layers == depth
        planned = tensor_bytes(cfg, config, calibration["seq_len"], calibration["trained_tokens"])
        assert calibration["planned_bytes"][str(depth)] == planned
        assert calibration["measured_bytes"][str(depth)] > 0

    stated = [*overrides, f"method={method}", "plan.cpu_overhead_mb=10", f"paths.output_dir={tmp_path / 'stated'}"]
    stated = compose_config(stated)
    record = train(stated)
    assert "calibration" not in record["memory"] and record["memory"]["predicted"]["overhead"] == 10 * 2**20
    # The calibration's training leaves the run's random state alone: the same numbers.
    assert record["train"]["final_loss"] == calibrated["train"]["final_loss"]
    assert record["quality"]["eval_loss"] == calibrated["quality"]["eval_loss"]


def test_trainable_count_is_what_peft_trains(tiny_model_dir, tiny_data, tmp_path):
    from ftx.models import count_parameters, load_model

    for method, extra in [("lora", []), ("dora", ["method.target_modules=[q_proj,v_proj]"]), ("full", [])]:
        cfg = compose_config([*tiny_overrides(tiny_model_dir, tiny_data, tmp_path), f"method={method}", *extra])
        counted = count_parameters(load_model(cfg, str(tiny_model_dir)))
        predicted = plan(cfg)
        assert (predicted.params_total, predicted.params_trainable) == (counted["total"], counted["trainable"])


def test_budget_prunes_before_loading_weights(tiny_model_dir, tiny_data, tmp_path):
    cfg = compose_config([*tiny_overrides(tiny_model_dir, tiny_data, tmp_path), "plan.budget_gb=0.001"])
    fits, predicted = fits_budget(cfg)
    assert not fits and predicted.peak_bytes > 1e6
    record = train(cfg)
    assert record["status"] == "pruned" and "does not fit" in record["reason"]
    assert read_metrics(tmp_path)["memory"]["predicted_bytes"] == predicted.peak_bytes
    assert not (tmp_path / "adapter").exists()
    assert fits_budget(compose_config([*tiny_overrides(tiny_model_dir, tiny_data, tmp_path), "plan.budget_gb=80"]))[0]


@pytest.mark.slow
def test_bench_script_prints_its_table_on_cpu(tmp_path):
    import subprocess

    script = project_root() / "scripts" / "bench_memory.py"
    args = ["--device", "cpu", "--methods", "lora", "--hidden", "64", "--layers", "1", "--vocab", "512", "--batch", "2"]
    command = [sys.executable, str(script), *args, "--steps", "1"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "| method | quant | precision | predicted MiB | measured MiB | error |" in done.stdout
    assert "| lora | none | 32-true |" in done.stdout


def test_an_rl_plan_counts_its_sampling(tiny_model_dir, tiny_data, tmp_path):
    """RLOO/GRPO time covers generating k completions per prompt (a forward per new
    token, at least the weights read once per token on a GPU), the reference's
    log-probabilities and the update over prompt + completion, k rows per prompt."""
    base = [*tiny_overrides(tiny_model_dir, tiny_data, tmp_path, steps=10), "trainer.batch_size=2"]
    rl = [*base, "objective=grpo", "objective.reward_functions=[json_valid]", "data.max_new_tokens=16"]

    def planned(*extra):
        return plan(compose_config([*rl, *extra]))

    four, eight = planned("objective.num_generations=4"), planned("objective.num_generations=8")
    assert four.generated_tokens == 10 * 2 * 4 * 16  # steps × prompts × k × max_new_tokens
    assert eight.generated_tokens == 2 * four.generated_tokens
    assert eight.flops == pytest.approx(2 * four.flops)  # every term scales with the completions
    assert four.flops > 3 * plan(compose_config(base)).flops / 2  # not the prompts' update alone
    weights = next(i.bytes for i in four.items if i.key == "weights")
    slow_memory = planned("objective.num_generations=4", "plan.gpu_bandwidth_gbs=0.001")
    assert slow_memory.train_s >= 10 * 16 * weights / 1e6  # decoding reads the weights once per token
    assert slow_memory.flops == four.flops and four.train_s < slow_memory.train_s
    longer = planned("objective.num_generations=4", "data.max_new_tokens=32")
    assert longer.generated_tokens == 2 * four.generated_tokens and longer.flops > four.flops
    from ftx.memory.plan import describe

    assert "of which sampling: 1,280 completion tokens generated" in describe(four)
    assert plan(compose_config(base)).generated_tokens == 0 and "sampling" not in describe(plan(compose_config(base)))
