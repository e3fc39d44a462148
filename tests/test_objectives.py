"""Reward model and DPO: losses agree with TRL's own loss paths on fixed batches,
training changes exactly the trainable parameters, the reference stays put."""

from __future__ import annotations

import json
import random

import pytest
import torch
from conftest import ftx_main, read_metrics, script_main, script_module, tiny_overrides
from test_train import Snapshot
from transformers import AutoTokenizer

from ftx.config import compose_config, project_root
from ftx.data import DataError, load_splits
from ftx.data.tokenized import make_pair_loader
from ftx.models import load_model
from ftx.objectives import dpo, reward
from ftx.train import train

TOLERANCE = {"atol": 1e-5, "rtol": 1e-5}  # float32 on CPU; the same math in another order


def preference_overrides(tiny_model_dir, tiny_data, run_dir, objective, *extra, steps=3):
    overrides = [o for o in tiny_overrides(tiny_model_dir, tiny_data, run_dir, steps) if not o.startswith("data.")]
    return [
        *overrides,
        f"objective={objective}",
        "data.eval_examples=4",
        "data.max_new_tokens=8",
        "data.general_max_tokens=128",
        *extra,
    ]


def fixed_batch(cfg, tokenizer, pairs=4):
    splits = load_splits(cfg)
    return splits, next(iter(make_pair_loader(cfg, tokenizer, splits.train[:pairs], shuffle=False)))


def perturb_adapters(model) -> None:
    """LoRA B starts at zero (policy = reference); move it so the test has teeth."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)


def trl_args(config_class, tmp_path, **kwargs):
    return config_class(
        output_dir=str(tmp_path / "trl"), bf16=False, use_cpu=True, report_to=[], max_length=128, **kwargs
    )


# ---------------------------------------------------------------------- parity


@pytest.mark.parametrize("margin", [0.0, 0.5])
def test_reward_loss_matches_trl_reward_trainer(margin, tiny_model_dir, tiny_data, tmp_path):
    from datasets import Dataset
    from trl import RewardConfig, RewardTrainer

    cfg = compose_config(
        preference_overrides(tiny_model_dir, tiny_data, tmp_path, "reward", f"objective.margin={margin}")
    )
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = load_model(cfg, str(tiny_model_dir), head="reward", pad_token_id=tokenizer.pad_token_id).eval()
    splits, batch = fixed_batch(cfg, tokenizer)
    ours = reward.pair_metrics(*reward.scores(model, batch), margin)

    rows = [{"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected} for p in splits.train[:4]]
    trainer = RewardTrainer(
        model=model,
        args=trl_args(RewardConfig, tmp_path),
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
    )
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    if margin:
        inputs["margin"] = torch.full((batch["input_ids"].shape[0] // 2,), margin)
    theirs = trainer.compute_loss(model, inputs)
    torch.testing.assert_close(ours["loss"], theirs, **TOLERANCE)
    assert ours["pair_accuracy"].item() == trainer._metrics["eval"]["accuracy"][-1]
    assert ours["reward_margin"].item() == pytest.approx(trainer._metrics["eval"]["margin"][-1], abs=1e-6)


@pytest.mark.parametrize(("method", "sft_weight"), [("lora", 0.0), ("full", 0.0), ("lora", 0.7)])
def test_dpo_loss_matches_trl_dpo_trainer(method, sft_weight, tiny_model_dir, tiny_data, tmp_path):
    """sft_weight > 0 (RPO) against TRL's loss_type=[sigmoid, sft], loss_weights=[1, w]."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    cfg = compose_config(
        preference_overrides(
            tiny_model_dir,
            tiny_data,
            tmp_path,
            "dpo",
            f"method={method}",
            "objective.beta=0.3",
            "objective.reference=copy",
            f"objective.sft_weight={sft_weight}",
        )
    )
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = load_model(cfg, str(tiny_model_dir)).eval()
    module = dpo.Module(model, cfg)  # the reference: adapter disabled (lora) or a frozen copy (full)
    splits, batch = fixed_batch(cfg, tokenizer)
    rows = [{"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected} for p in splits.train[:4]]
    trainer = DPOTrainer(
        model=model,
        ref_model=None if method == "lora" else module.frozen[0],
        args=trl_args(DPOConfig, tmp_path, beta=0.3, **rpo_args(sft_weight)),
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
    )
    # Move the policy away from its start (TRL keeps the starting adapter as a
    # frozen "ref" adapter: a fresh one equals ftx's reference, the adapter disabled).
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if method == "full" or ("lora_B" in name and ".default." in name):
                param.add_(torch.randn_like(param) * (0.05 if method == "lora" else 0.01))
    model.eval()
    ours = module.step(batch)
    completion_mask = (batch["labels"] != -100).long()
    inputs = {
        "input_ids": batch["input_ids"],
        "attention_mask": batch["attention_mask"],
        "completion_mask": completion_mask,
    }
    theirs = trainer._compute_loss(model, inputs, return_outputs=False)
    torch.testing.assert_close(ours["loss"], theirs, **TOLERANCE)
    metrics = trainer._metrics["eval"]
    # A margin is β × a difference of sums over every response token: the chunked head's
    # matmuls (trained rows only) and TRL's full-logits ones differ by float32 rounding.
    assert ours["rewards_margin"].item() == pytest.approx(metrics["rewards/margins"][-1], abs=5e-5)
    assert ours["rewards_accuracy"].item() == pytest.approx(metrics["rewards/accuracies"][-1])
    assert ours["loss"].item() != pytest.approx(0.6931, abs=1e-3)  # policy differs from reference


def rpo_args(sft_weight: float) -> dict:
    return {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, sft_weight]} if sft_weight else {}


# -------------------------------------------------------------------- training


def test_reward_model_trains_its_head_and_adapters(tiny_model_dir, tiny_data, tmp_path):
    cfg = compose_config(preference_overrides(tiny_model_dir, tiny_data, tmp_path, "reward"))
    snapshot = Snapshot()
    record = train(cfg, callbacks=[snapshot])
    assert record["status"] == "completed" and record["objective"] == "reward"
    quality = read_metrics(tmp_path)["quality"]
    assert {"base_pair_accuracy", "pair_accuracy", "reward_margin", "eval_loss"} <= quality.keys()
    changed = {n for n in snapshot.before if not torch.equal(snapshot.before[n], snapshot.after[n])}
    assert changed == snapshot.trainable
    assert any("score" in n for n in changed) and any("lora_" in n for n in changed)
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("extra", [["method=lora"], ["method=full", "objective.reference=precomputed"]])
def test_dpo_trains_policy_and_leaves_reference(extra, tiny_model_dir, tiny_data, tmp_path):
    cfg = compose_config(preference_overrides(tiny_model_dir, tiny_data, tmp_path, "dpo", *extra))
    snapshot = Snapshot()
    record = train(cfg, callbacks=[snapshot])
    assert record["status"] == "completed"
    changed = {n for n in snapshot.before if not torch.equal(snapshot.before[n], snapshot.after[n])}
    assert changed == snapshot.trainable
    assert {"pair_accuracy", "base_pair_accuracy", "task_score"} <= record["quality"].keys()


def test_dpo_reference_is_the_base_with_adapter_disabled(tiny_model_dir, tiny_data, tmp_path):
    cfg = compose_config(preference_overrides(tiny_model_dir, tiny_data, tmp_path, "dpo"))
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = load_model(cfg, str(tiny_model_dir)).eval()
    module = dpo.Module(model, cfg)
    _, batch = fixed_batch(cfg, tokenizer)
    before = module.reference_logps(batch)
    perturb_adapters(model)
    torch.testing.assert_close(module.reference_logps(batch), before)  # the reference did not move
    assert not torch.allclose(dpo.sequence_logps(model, batch, 8), before)  # the policy did


def test_objectives_refuse_the_wrong_kind_of_data(tiny_model_dir, tiny_data, tmp_path):
    overrides = [
        *preference_overrides(tiny_model_dir, tiny_data, tmp_path, "dpo"),
        f"data.train_file={tiny_data['train']}",
    ]
    with pytest.raises(DataError, match="objective=dpo learns from preference pairs"):
        train(compose_config([*overrides, "data.format=auto", "data.eval_file=null"]))
    assert read_metrics(tmp_path)["status"] == "failed" and not (tmp_path / "adapter").exists()


def test_dpo_run_is_scored_and_sampled_by_the_cli(tiny_model_dir, tiny_data, tmp_path):
    overrides = preference_overrides(tiny_model_dir, tiny_data, tmp_path, "dpo", steps=2)
    overrides = [o.replace("paths.output_dir", "hydra.run.dir") for o in overrides]
    assert ftx_main("train", *overrides).returncode == 0
    out = ftx_main("eval", str(tmp_path))
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["quality"]["pair_accuracy"] == read_metrics(tmp_path)["quality"]["pair_accuracy"]
    out = ftx_main("generate", str(tmp_path), "--prompt", "Cancel my 2 kettles.", "--max-new-tokens", "4", "--json")
    assert out.returncode == 0 and json.loads(out.stdout)["prompt"] == "Cancel my 2 kettles.", out.stderr


def test_onpolicy_pairs_take_the_models_own_answers(tiny_model_dir, tmp_path):
    """scripts/make_onpolicy_prefs.py: the chosen answer is the model's first correct
    one (else the reference), the rejected its first worst; sampling gives K per message."""
    choose_pair = script_module("make_onpolicy_prefs").choose_pair
    reference = '{"intent": "refund", "product": "kettle", "quantity": 2, "urgency": "low"}'
    right = reference.replace(", ", ",  ")  # the same fields, another spelling
    half = reference.replace("kettle", "toaster").replace("low", "high")
    quarter = reference.replace("kettle", "toaster").replace("low", "high").replace("2", "3")
    rng = random.Random(0)
    assert choose_pair(reference, [half, right, quarter, half], [0.5, 1.0, 0.25, 0.5], rng) == (right, quarter)
    assert choose_pair(reference, [half, quarter, quarter], [0.5, 0.25, 0.25], rng) == (reference, quarter)
    assert choose_pair(reference, [half, " ", quarter], [0.5, 0.0, 0.25], rng) == (reference, quarter)  # not empty
    chosen, rejected = choose_pair(reference, [right, reference], [1.0, 1.0], rng)  # no mistake of its own
    assert chosen == right and rejected not in (right, reference) and rejected.strip()

    out = tmp_path / "prefs"
    args = [str(tiny_model_dir), "--out", str(out), "--train", "3", "--eval", "2", "--samples", "2"]
    done = script_main("make_onpolicy_prefs", *args)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "train: 3 pairs" in done.stdout and "eval: 2 pairs" in done.stdout
    shipped = (project_root() / "datasets" / "json_extract" / "train.jsonl").read_text().splitlines()[:3]
    pairs = [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines()]
    assert [p["prompt"] for p in pairs] == [json.loads(line)["prompt"] for line in shipped]
    assert all(p["chosen"] != p["rejected"] for p in pairs)


def test_compact_style_pairs_differ_only_in_spacing():
    """scripts/make_json_prefs.py --style compact: a style preference, the same ticket both ways."""
    compact_pairs = script_module("make_json_prefs").compact_pairs
    rows = [json.loads(line) for line in (project_root() / "datasets/json_extract/eval.jsonl").open()][:3]
    made = compact_pairs(rows, 2)
    assert [p["prompt"] for p in made] == [r["prompt"] for r in rows[:2]]
    for pair, row in zip(made, rows, strict=False):
        assert pair["rejected"] == row["completion"] and " " in pair["rejected"] and " " not in pair["chosen"]
        assert json.loads(pair["chosen"]) == json.loads(pair["rejected"])
