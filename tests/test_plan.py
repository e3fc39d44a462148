"""The planner (ftx plan): known values, breakdowns that add up, predictions
against measured peaks, family configs without network, budgets that prune."""

from __future__ import annotations

import json
import sys
import time

import pytest
from conftest import ftx_cli, read_metrics, tiny_overrides

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
# On CPU the measured peak is RSS above the pre-load baseline; for the tiny model
# that is almost all runtime overhead (plan.cpu_overhead_mb, calibrated on these
# runs: 59-76 MiB cold), so the tolerance is that constant's spread, not the
# formula's accuracy (scripts/bench_memory.py checks that on a larger model).
CPU_TINY_TOLERANCE = 0.25


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
    # 4-bit Linears + the rest upcast to fp32 by prepare_model_for_kbit_training + fp32 adapters
    expected = linears * 0.515869 + (2 * 32000 * 4096 + 65 * 4096) * 4 + qlora.params_trainable * 4
    assert qlora_weights == pytest.approx(expected, rel=1e-3)
    assert 3.3e9 < linears * 0.515869 < 3.5e9
    assert qlora.artefact_bytes == qlora.params_trainable * 4  # fp32 adapter
    assert qlora.peak_bytes < full.peak_bytes / 3


def test_plan_for_a_large_family_is_fast_and_says_plainly_it_does_not_fit():
    started = time.perf_counter()
    done = ftx_cli("plan", "model=llama31_70b", "method=full", "plan.budget_gb=24", timeout=120)
    assert time.perf_counter() - started < 60, "planning must not load or download weights"
    assert done.returncode == 1, done.stderr
    verdict = next(line for line in done.stdout.splitlines() if line.startswith("does not fit"))
    assert "llama31-70b full fine-tune needs" in verdict and "budget 24 GB" in verdict
    assert "method=qlora" in verdict  # what comes closest, said as a command


def test_plan_that_fits_suggests_nothing_and_json_is_complete():
    done = ftx_cli("plan", "model=llama31_8b", "method=qlora", "trainer=gpu", "--json", timeout=120)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["fits"] is True and result["method"] == "qlora"
    assert sum(item["at_peak"] for item in result["items"]) == result["peak_bytes"]
    for key in ("params_trainable", "artefact_bytes", "tokens", "flops", "train_s", "cost_usd", "hosted_usd"):
        assert result[key], key


def test_compare_prints_every_method():
    done = ftx_cli("plan", "--compare", "model=llama31_8b", "trainer=gpu", timeout=180)
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


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_prediction_against_measured_peak_on_the_tiny_model(method, tiny_model_dir, tiny_data, tmp_path):
    """In a fresh process, as `ftx train` runs: the measured peak includes the
    runtime's own first-use memory, which the CPU overhead term stands for."""
    overrides = [*tiny_overrides(tiny_model_dir, tiny_data, tmp_path), f"method={method}"]
    done = ftx_cli("train", *overrides, "trainer.save_checkpoints=false")
    assert done.returncode == 0, done.stderr[-2000:]
    memory = read_metrics(tmp_path)["memory"]
    assert sum(memory["predicted"].values()) == memory["predicted_bytes"]
    error = (memory["predicted_bytes"] - memory["peak_bytes"]) / memory["peak_bytes"]
    assert abs(error) < CPU_TINY_TOLERANCE, f"{method}: predicted {memory['predicted_bytes']}, measured {memory}"


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
