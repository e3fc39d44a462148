"""ORPO: the loss and every trainable parameter's gradient agree with TRL's
ORPOTrainer on a fixed batch; a run trains the adapters and records its figures."""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import read_metrics
from safetensors.torch import load_file
from test_objectives import TOLERANCE, perturb_adapters, preference_overrides, trl_args
from test_train import Snapshot
from transformers import AutoModelForCausalLM, AutoTokenizer

from ftx.config import compose_config
from ftx.data import load_splits
from ftx.data.tokenized import make_pair_loader
from ftx.models import load_model
from ftx.objectives import orpo
from ftx.train import train

BETA = 0.3


def trl_batch(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """ftx's pair batch (B chosen rows, then B rejected) in TRL's ORPO columns.

    TRL's tokenize_row prepends the BOS whenever the prompt lacks it (this
    tokenizer's BOS is its EOS, which ftx's rendering leaves out) and truncates
    the answer only, so its own ids differ from ftx's: TRL's loss is fed ftx's
    tokens, and both sides see the same ids, masks and labels."""
    half = batch["input_ids"].shape[0] // 2
    sides = {"chosen": slice(None, half), "rejected": slice(half, None)}
    return {
        f"{side}_{key}": batch[key][rows]
        for side, rows in sides.items()
        for key in ("input_ids", "attention_mask", "labels")
    }


def trl_loss(trainer, model, batch: dict[str, torch.Tensor], completion_only: bool) -> torch.Tensor:
    """TRL's ORPO loss on ``batch``. Its NLL spans every chosen token (prompt too):
    ftx's with completion_only=false, compared whole (compute_loss). With
    completion_only=true it is TRL's odds-ratio term (concatenated_forward,
    odds_ratio_loss) plus the chosen answers' NLL as transformers computes it."""
    if not completion_only:
        return trainer.compute_loss(model, trl_batch(batch))
    chosen_logps, rejected_logps, *_ = trainer.concatenated_forward(model, trl_batch(batch))
    losses = trainer.odds_ratio_loss(chosen_logps, rejected_logps)[0]
    half = batch["input_ids"].shape[0] // 2
    nll = model(**{k: v[:half] for k, v in batch.items()}, use_cache=False).loss
    return nll - losses.mean()


def gradients(model, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return grads


def first_pairs(cfg, tokenizer) -> tuple:
    """The splits and the first batch of held-out pairs, in order, as ORPO loads them."""
    splits = load_splits(cfg)
    return splits, next(iter(orpo.loaders(cfg, tokenizer, splits)[1]))


@pytest.fixture(scope="module")
def confident_model_dir(tiny_model_dir, tiny_data, tmp_path_factory) -> Path:
    """The tiny model after a few steps of plain next-token training on the first
    held-out pairs: at random weights every response's P (mean per-token
    probability) is about 1/vocabulary, log(1 − P) ≈ 0 and the odds ratio is the
    probability ratio; here P is far from 0, so the log(1 − P) terms weigh in."""
    out = tmp_path_factory.mktemp("confident")
    cfg = compose_config(preference_overrides(tiny_model_dir, tiny_data, out / "run", "orpo"))
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    _, batch = first_pairs(cfg, tokenizer)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-2)
    for _ in range(10):
        optimizer.zero_grad()
        model(**batch, use_cache=False).loss.backward()
        optimizer.step()
    model.save_pretrained(out / "model")
    tokenizer.save_pretrained(out / "model")
    return out / "model"


@pytest.mark.parametrize("completion_only", [False, True])
@pytest.mark.parametrize("method", ["lora", "full"])
def test_orpo_loss_and_gradients_match_trl_orpo_trainer(
    method, completion_only, confident_model_dir, tiny_data, tmp_path
):
    from datasets import Dataset
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    overrides = preference_overrides(confident_model_dir, tiny_data, tmp_path, "orpo", f"method={method}")
    cfg = compose_config([*overrides, f"objective.beta={BETA}", f"objective.completion_only={completion_only}"])
    tokenizer = AutoTokenizer.from_pretrained(confident_model_dir)
    model = load_model(cfg, str(confident_model_dir)).eval()
    module = orpo.Module(model, cfg)
    splits, batch = first_pairs(cfg, tokenizer)
    # The odds compare the answers: the pairs are tokenized with the answers labelled
    # whatever completion_only says (it sets the NLL's span only).
    answers = compose_config([*overrides, "objective.completion_only=true"])
    assert torch.equal(batch["labels"], next(iter(make_pair_loader(answers, tokenizer, splits.eval, False)))["labels"])

    pairs = splits.eval[: batch["input_ids"].shape[0] // 2]
    trainer = ORPOTrainer(
        model=model,
        args=trl_args(ORPOConfig, tmp_path, beta=BETA),
        train_dataset=Dataset.from_list(
            [{"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected} for p in pairs]
        ),
        processing_class=tokenizer,
    )
    if method == "lora":
        perturb_adapters(model)  # LoRA B starts at zero, and with it every gradient of A
    model.eval()
    ours = module.step(batch)
    our_grads = gradients(model, ours["loss"])
    theirs = trl_loss(trainer, model, batch, completion_only)
    torch.testing.assert_close(ours["loss"], theirs, **TOLERANCE)
    their_grads = gradients(model, theirs)
    assert our_grads.keys() == their_grads.keys() and (method == "full" or all("lora_" in n for n in our_grads))
    for name, grad in our_grads.items():
        torch.testing.assert_close(grad, their_grads[name], **TOLERANCE, msg=lambda m, name=name: f"{name}: {m}")
    assert any(grad.abs().max() > 1e-4 for grad in our_grads.values())

    with torch.no_grad():
        _, figures = trainer.get_batch_loss_metrics(model, trl_batch(batch))  # TRL's figures of the same batch
    expected = {
        "rewards_chosen": "rewards/chosen",
        "rewards_rejected": "rewards/rejected",
        "rewards_margin": "rewards/margins",
        "rewards_accuracy": "rewards/accuracies",
        "logps_chosen": "logps/chosen",
        "logps_rejected": "logps/rejected",
        "log_odds_ratio": "log_odds_ratio",
        "log_odds_chosen": "log_odds_chosen",
        **({} if completion_only else {"nll_loss": "nll_loss"}),
    }
    for ours_name, trl_name in expected.items():
        assert ours[ours_name].item() == pytest.approx(figures[trl_name], abs=1e-5), ours_name
    assert abs(ours["log_odds_chosen"].item()) > 1e-3  # the pairs' odds differ: the term has teeth
    assert ours["logps_chosen"].item() > -4  # P > 0.018 (1/300 at random weights): log(1 − P) weighs in


def test_log1mexp_is_exact_where_the_naive_form_is_not():
    """log(1 − P) of a response the model is sure of (log P ≈ 0) stays finite and
    exact in float32, as in TRL; the naive form gives −inf at log P = −1e-9."""
    x = torch.tensor([-1e-9, -1e-4, -0.5, -math.log(2), -0.7, -20.0])
    exact = torch.log(-torch.expm1(x.double()))
    torch.testing.assert_close(orpo.log1mexp(x).double(), exact, rtol=1e-6, atol=0)
    assert torch.log(1 - torch.exp(x[0])).isinf()


class LastMetrics(L.Callback):
    """What the run logged last, by name."""

    def on_fit_end(self, trainer, module):
        self.logged = set(trainer.callback_metrics)


@pytest.mark.parametrize("completion_only", [True, False])
def test_orpo_run_trains_the_adapters(completion_only, tiny_model_dir, tiny_data, tmp_path):
    overrides = preference_overrides(
        tiny_model_dir, tiny_data, tmp_path, "orpo", f"objective.completion_only={completion_only}"
    )
    snapshot, last = Snapshot(), LastMetrics()
    record = train(compose_config(overrides), callbacks=[snapshot, last])
    saved = read_metrics(tmp_path)
    assert record["status"] == saved["status"] == "completed" and saved["objective"] == "orpo"
    changed = {n for n in snapshot.before if not torch.equal(snapshot.before[n], snapshot.after[n])}
    assert changed == snapshot.trainable and all("lora_" in n for n in changed)
    adapter = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    trained_b = [t for n, t in adapter.items() if "lora_B" in n]
    assert trained_b and all(t.abs().max() > 0 for t in trained_b)  # B starts at zero: every one moved
    assert {"pair_accuracy", "base_pair_accuracy", "task_score"} <= saved["quality"].keys()
    assert 0 <= saved["quality"]["pair_accuracy"] <= 1
    for name in ("loss", "nll_loss", "log_odds_ratio", "log_odds_chosen", "rewards_margin", "rewards_accuracy"):
        assert {f"train.{name}", f"val.{name}"} <= last.logged, name
