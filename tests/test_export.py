"""Using a result: merged export against base+adapter, eval and generate commands,
metrics by name, and forgetting."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
from conftest import ftx_main, tiny_overrides
from omegaconf import OmegaConf

from ftx.config import compose_config
from ftx.evaluation import before_after, perplexity
from ftx.metrics import resolve_metric
from ftx.runs import export_run, load_run
from ftx.train import train

PROBE = torch.tensor([[5, 17, 42, 99, 7, 3, 250, 11]])


def trained_run(method, tiny_model_dir, tiny_data, run_dir, extra=()):
    """A finished run directory, laid out as `ftx train` leaves it."""
    overrides = [*tiny_overrides(tiny_model_dir, tiny_data, run_dir), f"method={method}", "optim.lr=1e-2", *extra]
    cfg = compose_config(overrides)
    train(cfg)  # saves .hydra/config.yaml; ftx export re-composes from Hydra's overrides.yaml
    OmegaConf.save(OmegaConf.create(overrides), run_dir / ".hydra" / "overrides.yaml")
    return run_dir


@pytest.mark.parametrize(
    ("method", "extra"),
    [("lora", []), ("lora", ["method.adapt_output_head=true"]), ("qlora", [])],
    ids=["lora", "lora-tied-head", "qlora"],
)
def test_merged_export_matches_base_plus_adapter(method, extra, tiny_model_dir, tiny_data, tmp_path):
    from transformers import AutoModelForCausalLM

    run = trained_run(method, tiny_model_dir, tiny_data, tmp_path / "run", extra)
    adapted, _ = load_run(run)  # base (4-bit for QLoRA) + adapter, as trained
    out = export_run(run, tmp_path / "export")
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    assert "method `" + method + "`" in (out / "README.md").read_text()
    merged = AutoModelForCausalLM.from_pretrained(out).eval()  # plain transformers, no peft
    assert not any("lora" in n for n, _ in merged.named_parameters())
    with torch.no_grad():
        expected, got = adapted(input_ids=PROBE).logits, merged(input_ids=PROBE).logits
    if method == "lora":
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    else:
        # The merge itself is exact: against the dequantized base + unmerged adapter.
        from peft import PeftModel
        from transformers import BitsAndBytesConfig

        nf4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)
        base4 = AutoModelForCausalLM.from_pretrained(tiny_model_dir, quantization_config=nf4).eval()
        dequantized = AutoModelForCausalLM.from_pretrained(tiny_model_dir, quantization_config=nf4).dequantize()
        with torch.no_grad():
            kernel_gap = (base4(input_ids=PROBE).logits - dequantized(input_ids=PROBE).logits).abs().max().item()
            unmerged = PeftModel.from_pretrained(dequantized, run / "adapter").eval()(input_ids=PROBE).logits
        torch.testing.assert_close(got, unmerged, rtol=0, atol=1e-5)
        # Against the 4-bit forward it was trained with, the gap is bitsandbytes' own:
        # its CPU NF4 kernel rounds block scales to bf16, which the base alone shows.
        assert (got - expected).abs().max().item() <= 2 * kernel_gap + 1e-5
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    with torch.no_grad():
        assert not torch.allclose(base(input_ids=PROBE).logits, got, atol=1e-3), "the merge changed nothing"


def test_export_loads_in_a_process_without_ftx(tiny_model_dir, tiny_data, tmp_path):
    run = trained_run("lora", tiny_model_dir, tiny_data, tmp_path / "run")
    out = export_run(run, tmp_path / "export")
    adapter_out = export_run(run, tmp_path / "adapter", adapter_only=True)
    assert (adapter_out / "adapter_config.json").is_file() and (adapter_out / "README.md").is_file()
    probe = (
        "import sys, transformers; "
        f"m = transformers.AutoModelForCausalLM.from_pretrained({str(out)!r}); "
        f"t = transformers.AutoTokenizer.from_pretrained({str(out)!r}); "
        "assert not any(k.startswith('ftx') for k in sys.modules); print(m.config.model_type)"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 0 and done.stdout.strip() == "llama", done.stderr
    from transformers import AutoTokenizer

    from ftx.data.tokenized import renderer_for
    from ftx.runs import run_config

    trained = renderer_for(run_config(run), AutoTokenizer.from_pretrained(run / "adapter")).chat_template
    assert AutoTokenizer.from_pretrained(out).chat_template == trained  # what training rendered with
    with pytest.raises(FileExistsError):
        export_run(run, tmp_path / "export")


def test_eval_and_generate_commands(tiny_model_dir, tiny_data, tmp_path):
    run = trained_run("lora", tiny_model_dir, tiny_data, tmp_path / "run")
    recorded = json.loads((run / "metrics.json").read_text())["quality"]
    out = ftx_main("eval", str(run))
    assert out.returncode == 0, out.stderr
    scores = json.loads(out.stdout)["quality"]
    assert scores["eval_loss"] == pytest.approx(recorded["eval_loss"], abs=1e-5)
    assert scores["general_ppl"] == pytest.approx(recorded["general_ppl"], rel=1e-5)
    out = ftx_main("generate", str(run), "--prompt", "Cancel my order of 2 kettles.", "--max-new-tokens", "5")
    assert out.returncode == 0 and "Cancel my order" not in out.stdout and out.stdout.strip(), out.stderr
    both = ftx_main("generate", str(run), "--prompt", "2 kettles.", "--prompt", "3 mugs.", "--json")
    lines = [json.loads(line) for line in both.stdout.splitlines()]
    assert [line["prompt"] for line in lines] == ["2 kettles.", "3 mugs."] and all("answer" in x for x in lines)
    # A run Hydra did not start (paths.output_dir=, the Python API) loads from the config ftx saved.
    (run / ".hydra" / "overrides.yaml").unlink()
    out = ftx_main("eval", str(run), "data.general_text=null")
    assert out.returncode == 0, out.stderr
    saved = json.loads(out.stdout)["quality"]
    assert saved["eval_loss"] == pytest.approx(recorded["eval_loss"], abs=1e-5) and "general_ppl" not in saved
    refused = ftx_main("eval", str(run), "data=json_extract")
    assert refused.returncode == 2 and "only value overrides apply: set data.KEY=VALUE" in refused.stderr
    base = ftx_main(
        "eval",
        str(tiny_model_dir),
        f"data.eval_file={tiny_data['eval']}",
        f"data.train_file={tiny_data['train']}",
        "data.eval_examples=2",
        "data.general_max_tokens=64",
    )
    assert base.returncode == 0, base.stderr
    assert json.loads(base.stdout)["quality"]["eval_loss"] == pytest.approx(recorded["base_eval_loss"], abs=1e-5)


def metric(name, **data):
    return resolve_metric(OmegaConf.create({"task_metric": name, "regex": None, "json_schema": None} | data))


def test_metrics_by_name(tmp_path):
    assert metric("exact_match")(" {} ", "{}") == 1.0
    assert metric("contains")("the answer is 42.", "42") == 1.0 and metric("contains")("41", "42") == 0.0
    assert metric("json_valid")('{"a": 1}', "") == 1.0 and metric("json_valid")("{a: 1}", "") == 0.0
    assert metric("regex", regex=r"\d{3}-\d{4}")(" 555-1234 ", "") == 1.0
    assert metric("regex", regex=r"\d{3}-\d{4}")("call 555-1234", "") == 0.0
    schema = tmp_path / "schema.json"
    schema.write_text(
        json.dumps({"type": "object", "required": ["intent"], "properties": {"quantity": {"type": "integer"}}})
    )
    by_schema = metric("json_schema", json_schema=str(schema))
    assert by_schema('{"intent": "refund", "quantity": 2}', "") == 1.0
    assert by_schema('{"intent": "refund", "quantity": "two"}', "") == 0.0
    assert by_schema('{"quantity": 2}', "") == 0.0
    assert metric("json:dumps") is json.dumps  # any importable callable


def test_forgetting_is_the_relative_change_in_general_perplexity(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    quality = before_after({"eval_loss": 2.0, "general_ppl": 10.0}, {"eval_loss": 1.0, "general_ppl": 12.5})
    assert quality == {
        "base_eval_loss": 2.0,
        "base_general_ppl": 10.0,
        "eval_loss": 1.0,
        "general_ppl": 12.5,
        "forgetting": pytest.approx(0.25),
    }
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    text = "Cancel my order of two kettles. " * 8
    ids = torch.tensor([tokenizer(text)["input_ids"]])
    with torch.no_grad():
        expected = math.exp(model(input_ids=ids, labels=ids).loss.item())
    assert perplexity(model, tokenizer, text, chunk=ids.shape[1], max_tokens=10_000) == pytest.approx(
        expected, rel=1e-5
    )
