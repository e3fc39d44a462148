"""Fault tolerance: batch order, exact resume after SIGKILL / SIGTERM / SIGUSR1,
non-finite losses, out-of-memory, DDP on CPU, and safe loading."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import ftx_cli, ftx_main, read_metrics, tiny_overrides
from safetensors.torch import load_file
from torch.utils.data import DistributedSampler

from ftx.config import ConfigError, compose_config, project_root, validate
from ftx.data.sampling import EpochSampler
from ftx.train import train

FAULT_RUN = project_root() / "tests" / "fault_run.py"
# 24 examples in batches of 4: 6 batches an epoch, so 14 steps cross two epoch
# boundaries; a checkpoint every 3 steps; LoRA dropout on (the RNG must be restored).
RESUMABLE = ["trainer.checkpoint_every=3", "trainer.val_check_interval=4", "method.dropout=0.1"]


def resumable(model_dir: Path, data: dict, run_dir: Path) -> list[str]:
    return [*tiny_overrides(model_dir, data, run_dir, steps=14), *RESUMABLE]


def adapter_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "adapter" / "adapter_model.safetensors")


def assert_same_run(resumed: Path, reference: Path) -> None:
    """Bit for bit: every adapter tensor, the final loss and the step count."""
    got, want = adapter_weights(resumed), adapter_weights(reference)
    assert got.keys() == want.keys()
    different = [k for k in want if not torch.equal(got[k], want[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[0]}"
    a, b = read_metrics(resumed), read_metrics(reference)
    assert a["train"]["steps"] == b["train"]["steps"] == 14
    assert a["train"]["final_loss"] == b["train"]["final_loss"]


@pytest.fixture(scope="module")
def uninterrupted(tiny_model_dir, tiny_data, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    done = ftx_main("train", *resumable(tiny_model_dir, tiny_data, run_dir))
    assert done.returncode == 0, done.stderr[-3000:]
    return run_dir


@pytest.mark.parametrize("world", [1, 2, 3])
def test_epoch_sampler_is_distributed_samplers_order(world, monkeypatch):
    for rank in range(world):
        monkeypatch.setattr("ftx.data.sampling._world", lambda rank=rank: (rank, world))
        for epoch in (0, 1):
            ours = EpochSampler(25, seed=7)
            ours.set_epoch(epoch)
            theirs = DistributedSampler(range(25), num_replicas=world, rank=rank, shuffle=True, seed=7)
            theirs.set_epoch(epoch)
            assert list(ours) == list(theirs) and len(ours) == len(theirs)


def test_epoch_sampler_resumes_after_what_was_trained():
    sampler = EpochSampler(10, seed=0)
    sampler.set_epoch(1)
    full = list(sampler)
    sampler.resume(epoch=1, skip=4)
    assert list(sampler) == full[4:] and len(sampler) == 10  # Lightning's epoch length stays whole
    assert list(sampler) == full  # only the resumed pass is shortened


@pytest.mark.slow
def test_run_killed_at_a_random_step_resumes_to_the_same_weights(tiny_model_dir, tiny_data, tmp_path, uninterrupted):
    # A step between checkpoints (every 3), after the first; seeded so that a failure
    # reproduces: FTX_TEST_KILL_SEED=N picks another (the step is in the failure message).
    step = random.Random(int(os.environ.get("FTX_TEST_KILL_SEED", "0"))).randint(4, 13)
    overrides = resumable(tiny_model_dir, tiny_data, tmp_path)
    killed = subprocess.run([sys.executable, str(FAULT_RUN), "KILL", str(step), *overrides], capture_output=True)
    assert killed.returncode == -9, f"not killed at step {step}"
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file() and not (tmp_path / "adapter").exists()

    resumed = ftx_main("train", *overrides)  # the same command
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert read_metrics(tmp_path)["train"]["resumed_from"].endswith("last.ckpt")
    assert_same_run(tmp_path, uninterrupted)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["TERM", "USR1"])
def test_signal_saves_a_checkpoint_and_the_same_command_resumes(
    name, tiny_model_dir, tiny_data, tmp_path, uninterrupted
):
    overrides = resumable(tiny_model_dir, tiny_data, tmp_path)
    stopped = subprocess.run([sys.executable, str(FAULT_RUN), name, "8", *overrides], capture_output=True, text=True)
    assert stopped.returncode != 0
    record = read_metrics(tmp_path)
    assert record["status"] == "stopped" and f"SIG{name} at step" in record["error"] and "resume" in record["error"]
    checkpoint = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] in (8, 9)  # SIGUSR1 is acted on at the next batch boundary
    # adapter checkpoints hold the trainable tensors only, not the frozen base
    assert checkpoint["state_dict"] and all("lora_" in k for k in checkpoint["state_dict"])

    resumed = ftx_main("train", *overrides)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert read_metrics(tmp_path)["status"] == "completed"
    assert_same_run(tmp_path, uninterrupted)


def test_a_signal_at_an_epochs_end_resumes_at_the_next_epoch(tiny_model_dir, tiny_data, tmp_path, uninterrupted):
    """SIGTERM after an epoch's last batch: Lightning 2.6 resumes a checkpoint written
    at the epoch's end, or at the next epoch's first batch, an epoch late (its data
    skipped). The run stops after the next epoch's first batch instead."""
    overrides = resumable(tiny_model_dir, tiny_data, tmp_path)
    stopped = subprocess.run(
        [sys.executable, str(FAULT_RUN), "TERM", "end-of-epoch-0", *overrides], capture_output=True, text=True
    )
    assert stopped.returncode != 0
    checkpoint = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 7 and checkpoint["epoch"] == 1  # 6 batches an epoch
    resumed = ftx_main("train", *overrides)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_run(tmp_path, uninterrupted)


class CorruptBatch(L.Callback):
    """Every label of the batch at ``step`` ignored: a 0/0 mean, a NaN loss."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            batch["labels"][:] = -100


def test_non_finite_loss_stops_the_run_naming_the_step(tiny_model_dir, tiny_data, tmp_path):
    cfg = compose_config(tiny_overrides(tiny_model_dir, tiny_data, tmp_path, steps=5))
    with pytest.raises(FloatingPointError, match="non-finite training loss .* at step 2"):
        train(cfg, callbacks=[CorruptBatch(2)])
    record = read_metrics(tmp_path)
    assert record["status"] == "failed" and "at step 2" in record["error"]
    assert not (tmp_path / "adapter").exists()


def test_non_finite_loss_can_skip_the_step(tiny_model_dir, tiny_data, tmp_path):
    overrides = [*tiny_overrides(tiny_model_dir, tiny_data, tmp_path, steps=5), "trainer.on_nonfinite=skip"]
    record = train(compose_config(overrides), callbacks=[CorruptBatch(2)])
    assert record["status"] == "completed" and record["train"]["skipped_steps"] == 1
    assert all(torch.isfinite(t).all() for t in adapter_weights(tmp_path).values())


class OutOfMemoryAt(L.Callback):
    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        if trainer.global_step == 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")


def test_out_of_memory_is_reported_beside_the_planners_estimate(tiny_model_dir, tiny_data, tmp_path):
    cfg = compose_config(tiny_overrides(tiny_model_dir, tiny_data, tmp_path, steps=3))
    with pytest.raises(Exception, match="out of memory"):
        train(cfg, callbacks=[OutOfMemoryAt()])
    record = read_metrics(tmp_path)
    assert record["status"] == "failed" and record["error"].startswith("OutOfMemory: out of memory on cpu at step 1")
    assert "the planner predicted" in record["error"] and "ftx plan" in record["error"]
    assert record["memory"]["predicted_bytes"] > 0 and record["memory"]["peak_bytes"] > 0


@pytest.mark.slow
def test_ddp_on_two_cpu_processes_matches_one_process_with_the_same_global_batch(tiny_model_dir, tiny_data, tmp_path):
    base = tiny_overrides(tiny_model_dir, tiny_data, tmp_path / "one", steps=6)
    base = [o for o in base if not o.startswith("trainer.batch_size")] + ["method.dropout=0"]
    one = ftx_main("train", *base, "trainer.batch_size=4")
    assert one.returncode == 0, one.stderr[-3000:]
    ddp_dir = tmp_path / "ddp"
    ddp = [o.replace(str(tmp_path / "one"), str(ddp_dir)) for o in base]
    two = ftx_cli(
        "train",
        *ddp,
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "trainer.batch_size=2",
        "trainer.precision=32-true",
        "trainer.max_steps=6",
    )
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = read_metrics(tmp_path / "one"), read_metrics(ddp_dir)
    assert b["status"] == "completed" and b["train"]["steps"] == a["train"]["steps"] == 6
    got, want = adapter_weights(ddp_dir), adapter_weights(tmp_path / "one")
    assert all(want[k].abs().sum() > 0 for k in want if "lora_B" in k)  # trained (lora_B starts at zero)
    for key in want:  # per-rank token means vs one global mean: close, not identical
        torch.testing.assert_close(got[key], want[key], rtol=0.05, atol=2e-3)
    assert abs(a["train"]["final_loss"] - b["train"]["final_loss"]) < 0.05 * abs(a["train"]["final_loss"])


def test_a_multirun_with_lightning_ddp_is_refused_but_one_run_is_not(monkeypatch):
    validate(compose_config(["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2"]))
    monkeypatch.setattr("ftx.config.checks._in_multirun", lambda cfg: True)
    with pytest.raises(ConfigError, match="re-runs the whole sweep in every rank"):
        validate(compose_config(["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2"]))
    monkeypatch.setenv("SLURM_NTASKS", "2")  # the ranks exist already: Lightning launches nothing
    validate(compose_config(["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2"]))


def test_fsdp_needs_gpus():
    with pytest.raises(ConfigError, match="fsdp needs GPUs"):
        validate(compose_config(["trainer=fsdp", "trainer.accelerator=cpu"]))


def test_pickled_weights_are_refused_before_loading(tiny_model_dir, tmp_path):
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    for f in tiny_model_dir.iterdir():
        if f.suffix != ".safetensors":
            (pickled / f.name).write_bytes(f.read_bytes())
    torch.save(load_file(tiny_model_dir / "model.safetensors"), pickled / "pytorch_model.bin")
    with pytest.raises(ConfigError, match=r"only pickled weights \(pytorch_model.bin\).*safetensors only"):
        validate(compose_config(["model=hf", f"model.name_or_path={pickled}"]))


def test_a_checkpoint_holding_objects_is_not_unpickled(tiny_model_dir, tiny_data, tmp_path):
    """Resuming loads checkpoints with weights_only=True: a pickle that would run
    code on load is refused, and nothing runs."""
    marker = tmp_path / "ran"
    (tmp_path / "checkpoints").mkdir(parents=True)
    torch.save({"state_dict": {}, "payload": Payload(str(marker))}, tmp_path / "checkpoints" / "last.ckpt")
    cfg = compose_config(tiny_overrides(tiny_model_dir, tiny_data, tmp_path, steps=2))
    with pytest.raises(Exception, match="Weights only load failed|weights_only"):
        train(cfg)
    assert not marker.exists()


class Payload:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def test_secrets_are_never_written(tiny_model_dir, tiny_data, tmp_path, monkeypatch):
    secrets = {"WANDB_API_KEY": "local-0123456789abcdef0123456789abcdef01234567", "HF_TOKEN": "hf_SecretTokenXyz987"}
    for name, value in secrets.items():
        monkeypatch.setenv(name, value)
    overrides = [o for o in tiny_overrides(tiny_model_dir, tiny_data, tmp_path, steps=2) if o != "logger=none"]
    done = ftx_main("train", *overrides, "logger=wandb", "logger.mode=offline", f"hydra.run.dir={tmp_path}")
    assert done.returncode == 0, done.stderr[-3000:]
    files = [f for f in tmp_path.rglob("*") if f.is_file()]
    assert any(f.name == "metrics.json" for f in files) and any(f.suffix == ".wandb" for f in files)
    assert any(f.suffix == ".ckpt" for f in files) and any(f.name == "config.yaml" for f in files)
    for f in files:
        content = f.read_bytes()
        for name, value in secrets.items():
            assert value.encode() not in content, f"{name} written to {f}"
    assert not any(value in done.stdout + done.stderr for value in secrets.values())


def test_a_checkpoint_of_other_settings_is_not_resumed(tiny_model_dir, tiny_data, tmp_path):
    overrides = tiny_overrides(tiny_model_dir, tiny_data, tmp_path, steps=2)
    assert train(compose_config(overrides))["status"] == "completed"
    with pytest.raises(ConfigError, match=r"other settings \(optim.lr: 0.0002 -> 0.001\).*trainer.resume=never"):
        train(compose_config([*overrides, "optim.lr=1e-3"]))
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()  # the finished run's artefact is kept
    record = train(compose_config([*overrides, "optim.lr=1e-3", "trainer.resume=never"]))
    assert record["status"] == "completed" and record["train"]["resumed_from"] is None


def test_a_slurm_batch_job_names_its_run_directory_by_job_id(tiny_model_dir, tiny_data, tmp_path):
    """So that a requeued job, running the same command, finds its checkpoint."""
    overrides = [o for o in tiny_overrides(tiny_model_dir, tiny_data, tmp_path, steps=1) if "output_dir" not in o]
    env = os.environ | {"SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "train.sh"}
    done = ftx_main("train", *overrides, cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    (run,) = (tmp_path / "outputs").iterdir()
    assert run.name.startswith("slurm-4242-") and (run / "metrics.json").is_file()


@pytest.mark.slow
def test_torchrun_ranks_share_one_run_directory(tiny_model_dir, tiny_data, tmp_path):
    """Ranks started by torchrun (Lightning launches nothing) agree on the run
    directory without being told it: it is named by the rendezvous id."""
    overrides = [o for o in tiny_overrides(tiny_model_dir, tiny_data, tmp_path, steps=4) if "output_dir" not in o]
    overrides = [o for o in overrides if not o.startswith("trainer.batch_size")] + ["trainer.batch_size=2"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    ddp = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.precision=32-true"]
    command = [*torchrun, "-m", "ftx.cli", "train", *overrides, *ddp]
    done = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    (run,) = (tmp_path / "outputs").iterdir()
    assert run.name.startswith("torchrun-")
    record = read_metrics(run)
    assert record["status"] == "completed" and record["train"]["steps"] == 4
