"""Every config in conf/ composes and validates, and the CLI composes fast."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import ftx_main, tiny_overrides
from omegaconf import OmegaConf

from ftx.config import ConfigError, compose_config, config_dir, validate

GROUPS = sorted(p.name for p in config_dir().iterdir() if p.is_dir() and p.name != "hydra")
OPTIONS = [(group, f.stem) for group in GROUPS for f in sorted((config_dir() / group).glob("*.yaml"))]
# Options that only make sense together with another choice.
PARTNERS = {
    ("quant", "nf4"): ["method=qlora"],
    ("quant", "fp4"): ["method=qlora"],
    ("quant", "int8"): ["method=lora"],
    ("objective", "rloo"): ["objective.reward_functions=[json_valid]"],  # or a reward model, or method=rlhf
}


def test_every_group_has_options():
    assert {"model", "method", "quant", "objective", "data", "trainer", "logger"} <= set(GROUPS)


@pytest.mark.parametrize(("group", "option"), OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_option_composes_and_validates(group, option, tiny_model_dir, tiny_data, tmp_path):
    overrides = tiny_overrides(tiny_model_dir, tiny_data, tmp_path)
    if group == "model" and option != "hf":
        overrides = [o for o in overrides if not o.startswith("model")]
    if group == "trainer" and option == "gpu":
        pytest.skip("validated for the GPU in test_gpu_trainer_preset")
    cfg = compose_config([*overrides, *PARTNERS.get((group, option), []), f"{group}={option}"])
    # Family presets (arch facts, hub id) plan without their weights; training them
    # needs the weights (test_family_preset_without_weights_fails_early).
    validate(cfg, check_sources=cfg.model.arch is None)
    resolved = OmegaConf.to_container(cfg[group], resolve=True)  # every interpolation resolves
    assert resolved


def test_family_preset_without_weights_fails_early():
    from huggingface_hub import try_to_load_from_cache

    cfg = compose_config(["model=llama31_8b"])
    if isinstance(try_to_load_from_cache(cfg.model.name_or_path, "config.json"), str):
        pytest.skip("the weights are in this machine's Hugging Face cache")
    with pytest.raises(ConfigError, match="model.name_or_path=meta-llama/Llama-3.1-8B: .*local Hugging Face cache"):
        validate(cfg)


def test_gpu_trainer_preset_composes(tiny_model_dir, tiny_data, tmp_path):
    cfg = compose_config(
        [*tiny_overrides(tiny_model_dir, tiny_data, tmp_path), "trainer=gpu", "optim.name=paged_adamw_8bit"]
    )
    validate(cfg)
    assert cfg.trainer.precision == "bf16-mixed"


def test_default_config_is_lora_on_the_ftx_base():
    cfg = compose_config([])
    assert cfg.method.name == "lora" and cfg.quant.name == "none"
    assert cfg.model.pretrain is not None and cfg.model.name_or_path is None
    validate(cfg)


def test_qlora_selects_nf4_with_double_quant_and_cli_can_override():
    cfg = compose_config(["method=qlora"])
    assert (cfg.quant.bits, cfg.quant.quant_type, cfg.quant.double_quant) == (4, "nf4", True)
    assert compose_config(["method=qlora", "quant=fp4"]).quant.quant_type == "fp4"


def test_values_are_overridable():
    cfg = compose_config(
        [
            "method.r=32",
            "method.alpha=64",
            "method.use_rslora=true",
            "optim.lr=2e-4",
            "method.target_modules=[q_proj,v_proj]",
        ]
    )
    assert (cfg.method.r, cfg.method.alpha, cfg.method.use_rslora, cfg.optim.lr) == (32, 64.0, True, 2e-4)
    assert list(cfg.method.target_modules) == ["q_proj", "v_proj"]


def test_unknown_key_is_refused():
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException, match="method.rr"):
        compose_config(["method.rr=3"])


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["method=full", "quant=nf4"], "quant=nf4 .*method=full has no adapter.*method=qlora"),
        (["method=full", "quant=int8"], "quant=int8"),
        (["method=qlora", "quant=none"], "method=qlora trains LoRA on a 4-bit base.*quant=nf4"),
        (["method.r=0"], "method.r=0"),
        (["optim.name=paged_adamw_8bit"], "optim.name=paged_adamw_8bit .*adamw_8bit"),
        (["model=hf", "model.name_or_path=/no/such/model"], "/no/such/model: no such directory"),
        (["model=hf", "model.name_or_path=nobody/nothing-here"], "nobody/nothing-here.*local Hugging Face cache"),
        (["data.train_file=/no/such.jsonl"], "data.train_file: no such file or directory /no/such.jsonl"),
        (["data.format=jsonl"], "data.format=jsonl is not one of: auto, openai_preference, preference, chat"),
        (["data.on_error=ignore"], "data.on_error=ignore is not one of: refuse, skip"),
        (["method.target_modules=qproj"], "target_modules"),
        (["data.eval_batch_size=0"], "data.eval_batch_size=0 must be >= 1"),
        (["objective=grpo", "trainer.cpu_mmap_threshold_mb=64"], "trainer.cpu_mmap_threshold_mb=64 must be 1-32"),
        (["method.init_lora_weights=eva"], "method.init_lora_weights=eva is not one of: true, false, gaussian, pissa"),
        (
            ["objective=dpo", "method.init_lora_weights=pissa"],
            "init_lora_weights=pissa rewrites the base weights, but objective=dpo holds the policy to the base",
        ),
        (["objective=orpo", "method.init_lora_weights=pissa_niter_4", "method.adapter=ia3"], "method.adapter=ia3"),
    ],
)
def test_bad_combinations_name_the_key_and_the_fix(overrides, message):
    with pytest.raises(ConfigError, match=message):
        validate(compose_config(overrides))


def test_cli_help_and_cfg_job_do_not_import_torch():
    out = ftx_main("--help")
    assert out.returncode == 0 and "ftx train" in out.stdout
    probe = (
        "import sys, ftx.cli; ftx.cli.main(['train', '--cfg', 'job']); "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "method:" in out.stdout and "name: lora" in out.stdout


def test_cli_lists_the_options_of_an_unknown_choice():
    out = ftx_main("train", "method=lorra")
    assert out.returncode != 0
    assert "Could not find 'method/lorra'" in out.stderr
    for option in ("full", "lora", "qlora", "dora"):
        assert option in out.stderr


def test_a_base_rewriting_init_is_allowed_where_no_reference_is_held():
    # PiSSA moves the base's principal components into the adapter: fine for SFT and
    # ORPO (no reference), refused for DPO above (its reference is the adapter disabled).
    for objective in ("sft", "orpo"):
        validate(compose_config([f"objective={objective}", "method.init_lora_weights=pissa"]))
