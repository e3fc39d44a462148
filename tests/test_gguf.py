"""GGUF export, verified by reading the file back with transformers' own GGUF loader:
its logits against the merged Hugging Face model, its tokenizer against the run's
(chat template and special tokens included), for trained LoRA and QLoRA runs and for
Mistral- and Qwen2-shaped models written directly; and the refusals."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import SHIPPED, ftx_main, tiny_overrides
from omegaconf import OmegaConf

from ftx.config import compose_config
from ftx.data.tokenized import renderer_for
from ftx.gguf import write_gguf
from ftx.runs import load_run
from ftx.train import train

pytest.importorskip("gguf")

PROBES = torch.tensor([[5, 17, 42, 99, 7, 3, 250, 11, 64, 128], [200, 1, 33, 33, 33, 290, 8, 140, 12, 77]])

# The file holds each weight rounded to its type, nothing else changed. So the logits
# transformers computes from it equal, to float32 accumulation (1e-5, as for the HF
# export; measured: 0.0, bit-identical), those of the merged model with its weights
# rounded the same way (by gguf's own quantize/dequantize): that checks names, q/k layout
# and values exactly. Against the unrounded model the gap is that rounding carried through
# the network, relative to the logits' scale a few times a weight's relative rounding step:
# f16 keeps 11 significant bits (2**-11 ~ 4.9e-4), bf16 8 (2**-8 ~ 3.9e-3), allowed 4
# steps. q8_0 rounds each block of 32 to int8 steps of max|w|/127, half a step being 1/254
# of the block's largest weight, which is ~3x a typical one (the largest |w| of 32 near-normal
# values is ~2.4 sigma, the mean |w| 0.8 sigma): allowed 4 such steps, 12/254. Measured on
# the trained runs (lora / qlora): f16 6.2e-4 / 3.4e-4, bf16 2.6e-3 / 2.6e-3, q8_0 1.3e-2 /
# 6.7e-3 of max|logit|; a wrong q/k layout is ~1 (test_direct_export).
EXACT = 1e-5
ROUNDING_TOLERANCE = {"f16": 4 * 2**-11, "bf16": 4 * 2**-8, "q8_0": 12 / 254}

RUNS = {"lora-untied-head": ("lora", ["method.adapt_output_head=true"]), "qlora": ("qlora", [])}

CONVERSATION = [
    {"role": "system", "content": "Reply with JSON."},
    {"role": "user", "content": "Cancel my order of 12345 kettles, ASAP!"},
    {"role": "assistant", "content": '{"intent": "cancel", "quantity": 12345}'},
]


@pytest.fixture(scope="module")
def exported(tiny_model_dir, tiny_data, tmp_path_factory):
    """exported(run_name, gguf_type) -> (run dir, .gguf path), each run trained once and
    each file written once, through `ftx export --format gguf` as a user would."""
    runs, files = {}, {}

    def get(name: str, gguf_type: str) -> tuple[Path, Path]:
        if name not in runs:
            method, extra = RUNS[name]
            run_dir = tmp_path_factory.mktemp(name)
            overrides = [*tiny_overrides(tiny_model_dir, tiny_data, run_dir), f"method={method}", "optim.lr=1e-2"]
            train(compose_config([*overrides, *extra]))
            runs[name] = run_dir
        if (name, gguf_type) not in files:
            out = runs[name] / "gguf"
            done = ftx_main("export", str(runs[name]), "--format", "gguf", "--gguf-type", gguf_type, "--out", str(out))
            assert done.returncode == 0, done.stderr
            files[name, gguf_type] = out / f"model-{gguf_type}.gguf"
            assert done.stdout.strip() == f"wrote {files[name, gguf_type]}"
        return runs[name], files[name, gguf_type]

    return get


def rounded(model, gguf_type: str):
    """A copy of ``model`` with every matrix rounded to ``gguf_type`` and back, by gguf's
    own quantize/dequantize (vectors stay float32 in the file, as here)."""
    import copy

    import gguf

    qtype, copied = gguf.GGMLQuantizationType[gguf_type.upper()], copy.deepcopy(model)
    with torch.no_grad():
        for parameter in copied.parameters():
            if parameter.ndim == 2:
                data = parameter.float().numpy()
                values = gguf.quants.dequantize(gguf.quants.quantize(data, qtype), qtype).reshape(data.shape)
                parameter.copy_(torch.from_numpy(values))
    return copied


def logit_gaps(model, gguf_path: Path, gguf_type: str) -> tuple[float, float]:
    """The GGUF file, loaded by transformers, against ``model`` with its weights rounded
    to the file's type (absolute gap), and against ``model`` itself (share of max|logit|)."""
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name).eval()
    with torch.no_grad():
        got = loaded(input_ids=PROBES).logits
        same_weights, unrounded = rounded(model, gguf_type)(input_ids=PROBES).logits, model(input_ids=PROBES).logits
    exact = (got - same_weights).abs().max().item()
    return exact, ((got - unrounded).abs().max() / unrounded.abs().max()).item()


@pytest.mark.parametrize("gguf_type", ["f16", "bf16", "q8_0"])
@pytest.mark.parametrize("run_name", list(RUNS))
def test_gguf_logits_match_the_merged_model(run_name, gguf_type, exported):
    from gguf import GGUFReader

    run, path = exported(run_name, gguf_type)
    merged, _ = load_run(run, merged=True)  # what `ftx export --format hf` writes (QLoRA: dequantized)
    exact, rounding = logit_gaps(merged, path, gguf_type)
    assert exact <= EXACT and rounding <= ROUNDING_TOLERANCE[gguf_type], (exact, rounding)
    tensors = {tensor.name: tensor.tensor_type.name for tensor in GGUFReader(path).tensors}
    # The untied head is its own tensor; a tied one is read from the embeddings.
    assert ("output.weight" in tensors) == (run_name == "lora-untied-head")
    assert tensors["blk.0.attn_q.weight"] == gguf_type.upper() and tensors["output_norm.weight"] == "F32"


@pytest.mark.parametrize("run_name", list(RUNS))
def test_gguf_tokenizer_round_trips_the_chat_template(run_name, exported):
    from transformers import AutoTokenizer

    run, path = exported(run_name, "f16")
    _, tokenizer = load_run(run)
    renderer = renderer_for(OmegaConf.load(run / ".hydra" / "config.yaml"), tokenizer)
    loaded = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    assert loaded.chat_template == renderer.chat_template  # the template the run trained with
    trained_ids = renderer.tokenizer(renderer.render(CONVERSATION, tools=None), add_special_tokens=False)["input_ids"]
    assert loaded.apply_chat_template(CONVERSATION, tokenize=True, return_dict=False) == trained_ids
    for kind in ("bos", "eos", "pad"):
        assert getattr(loaded, f"{kind}_token") == getattr(tokenizer, f"{kind}_token"), kind
        assert getattr(loaded, f"{kind}_token_id") == getattr(tokenizer, f"{kind}_token_id"), kind
    text = "Where is my order #123?\n\tIt's late."
    assert loaded(text)["input_ids"] == tokenizer(text)["input_ids"]


def chatml_tokenizer():
    """A byte-level BPE with Qwen2's pre-tokenizer, ChatML's special tokens, a plain
    added token and a ChatML chat template: the Qwen2 tokenizer's shape, trained here."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from ftx.gguf import SPLIT_PRE_TOKENIZERS

    qwen2 = next(regex for regex, name in SPLIT_PRE_TOKENIZERS.items() if name == "qwen2")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(qwen2), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    texts = (SHIPPED / "train.jsonl").read_text().splitlines()[:400]
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(texts, trainer)
    tok.add_special_tokens([AddedToken("<|im_start|>", special=True), AddedToken("<|im_end|>", special=True)])
    tok.add_tokens([AddedToken("<think>", special=False)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tokenizer.chat_template = (
        "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    return tokenizer


def tiny_model(model_type: str, vocab_size: int, tied: bool):
    """A random 2-layer model with grouped-query attention (4 heads, 2 for k/v) and
    weights large enough that attention is far from uniform, so a wrong q/k layout
    shows in the logits; biases (Qwen2's q/k/v) random too, not their zero init."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.for_model(
        model_type,
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        initializer_range=0.15,
        tie_word_embeddings=tied,
    )
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith(".bias"):
                parameter.normal_(0, 0.5)
    return model


@pytest.mark.parametrize(("model_type", "tied"), [("mistral", False), ("qwen2", True)])
def test_direct_export(model_type, tied, tmp_path, monkeypatch):
    """Mistral (as GGUF llama: permuted q/k, grouped k/v) and Qwen2 (q/k/v biases), with a
    padded vocabulary; each exported in f16 and q8_0 and read back."""
    from gguf import GGUFReader
    from transformers import AutoTokenizer

    import ftx.gguf

    tokenizer = chatml_tokenizer()
    model = tiny_model(model_type, vocab_size=len(tokenizer) + 13, tied=tied)  # rows without a token: [PAD]
    template = tokenizer.chat_template
    for gguf_type in ("f16", "q8_0"):
        path = write_gguf(model, tokenizer, tmp_path / f"model-{gguf_type}.gguf", gguf_type, template, "t")
        assert logit_gaps(model, path, gguf_type)[0] <= EXACT
    tensors = {tensor.name: tensor.tensor_type.name for tensor in GGUFReader(tmp_path / "model-f16.gguf").tensors}
    assert (tensors.get("blk.1.attn_k.bias") == "F32") == (model_type == "qwen2")
    assert ("output.weight" in tensors) == (not tied)

    loaded = AutoTokenizer.from_pretrained(tmp_path, gguf_file="model-f16.gguf")
    conversation = [*CONVERSATION[:2], {"role": "assistant", "content": "<think> cancel 12345</think> ok"}]
    assert loaded.chat_template == tokenizer.chat_template
    expected = tokenizer.apply_chat_template(conversation, tokenize=True, return_dict=False)
    assert loaded.apply_chat_template(conversation, tokenize=True, return_dict=False) == expected
    assert expected.count(tokenizer.convert_tokens_to_ids("<|im_end|>")) == 3  # whole, not in pieces
    assert (loaded.eos_token, loaded.pad_token, loaded.bos_token) == ("<|im_end|>", "<|endoftext|>", None)

    if model_type == "mistral":  # the check has teeth: without llama.cpp's permutation it fails
        monkeypatch.setattr(ftx.gguf, "_permute", lambda weights, n_head: weights)
        unpermuted = write_gguf(model, tokenizer, tmp_path / "unpermuted.gguf", "f16", None, "t")
        assert logit_gaps(model, unpermuted, "f16")[0] > 1000 * EXACT


def test_llama3_rope_scaling_is_written_as_llama_cpp_computes_it(tmp_path):
    """transformers' GGUF loader does not read rope scaling back, so the factors are checked
    against llama.cpp's own formula (convert_hf_to_gguf.py, LlamaModel.generate_extra_tensors)."""
    from gguf import GGUFReader
    from transformers import LlamaConfig, LlamaForCausalLM

    from ftx.models.pretrain import train_tokenizer

    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0}
    rope |= {"high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    tokenizer = train_tokenizer((SHIPPED / "train.jsonl").read_text().splitlines()[:100], vocab_size=300)
    shape = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1, "num_attention_heads": 2}
    config = LlamaConfig(vocab_size=len(tokenizer), num_key_value_heads=2, rope_parameters=rope, **shape)
    path = write_gguf(LlamaForCausalLM(config).eval(), tokenizer, tmp_path / "l3.gguf", "f16", None, "l3")
    written = next(t for t in GGUFReader(path).tensors if t.name == "rope_freqs.weight").data
    dim, old_context = 32, 64
    low_wavelen, high_wavelen = old_context / rope["low_freq_factor"], old_context / rope["high_freq_factor"]
    expected = []
    for freq in 1.0 / (rope["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)):
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            expected.append(1.0)
        elif wavelen > low_wavelen:
            expected.append(rope["factor"])
        else:
            smooth = (old_context / wavelen - rope["low_freq_factor"]) / (
                rope["high_freq_factor"] - rope["low_freq_factor"]
            )
            expected.append(1 / ((1 - smooth) / rope["factor"] + smooth))
    torch.testing.assert_close(torch.from_numpy(written.copy()), torch.tensor(expected), rtol=1e-5, atol=0)


def sentencepiece_style_tokenizer():
    """BPE over bytes as fallback, words marked by U+2581 (Llama 2's and Mistral 7B's kind)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
    texts = (SHIPPED / "train.jsonl").read_text().splitlines()[:100]
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def test_refusals(exported, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    from ftx.models.pretrain import train_tokenizer

    tokenizer = train_tokenizer((SHIPPED / "train.jsonl").read_text().splitlines()[:100], vocab_size=300)
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=1, n_head=2, architectures=["GPT2LMHeadModel"])
    with pytest.raises(ValueError, match=r"llama, mistral, qwen2; this model is 'gpt2' \(GPT2LMHeadModel\)"):
        write_gguf(GPT2LMHeadModel(config), tokenizer, tmp_path / "gpt2.gguf", "f16", None, "gpt2")
    assert not list(tmp_path.iterdir())
    with pytest.raises(ValueError, match=r"this one is BPE with byte fallback \(SentencePiece style\)"):
        sentencepiece = sentencepiece_style_tokenizer()
        llama = LlamaForCausalLM(LlamaConfig(vocab_size=len(sentencepiece), hidden_size=32, num_hidden_layers=1))
        write_gguf(llama, sentencepiece, tmp_path / "sp.gguf", "f16", None, "sp")

    run, path = exported("lora-untied-head", "f16")
    again = ftx_main("export", str(run), "--format", "gguf", "--out", str(path))
    assert again.returncode == 2 and f"ftx export: error: {path} exists" in again.stderr
    both = ftx_main("export", str(run), "--format", "gguf", "--adapter-only", "--out", str(tmp_path / "x"))
    assert both.returncode == 2 and "--adapter-only" in both.stderr
    hf_typed = ftx_main("export", str(run), "--gguf-type", "q8_0", "--out", str(tmp_path / "x"))
    assert hf_typed.returncode == 2 and "--gguf-type applies to --format gguf" in hf_typed.stderr

    # A reward run (same files, objective=reward) is refused before any weights load.
    reward = tmp_path / "reward"
    (reward / ".hydra").mkdir(parents=True)
    (reward / "metrics.json").write_text((run / "metrics.json").read_text())
    cfg = OmegaConf.load(run / ".hydra" / "config.yaml")
    cfg.objective.name = "reward"
    OmegaConf.save(cfg, reward / ".hydra" / "config.yaml")
    refused = ftx_main("export", str(reward), "--format", "gguf", "--out", str(tmp_path / "r.gguf"))
    assert refused.returncode == 2 and "is a reward model (objective=reward)" in refused.stderr


def test_a_failed_write_leaves_no_file(tiny_model_dir, tmp_path, monkeypatch):
    import gguf
    from transformers import AutoModelForCausalLM, AutoTokenizer

    def fail(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", fail)
    model, tokenizer = (
        AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        AutoTokenizer.from_pretrained(tiny_model_dir),
    )
    with pytest.raises(OSError, match="disk full"):
        write_gguf(model, tokenizer, tmp_path / "model.gguf", "f16", None, "tiny")
    assert not list(tmp_path.iterdir())


def test_export_help_imports_neither_torch_nor_gguf():
    probe = (
        "import sys, ftx.cli\n"
        "try:\n    ftx.cli.main(['export', '--help'])\nexcept SystemExit:\n    pass\n"
        "assert not {'torch', 'gguf'} & set(sys.modules), 'imported at --help'"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "--format {hf,gguf}" in done.stdout and "--gguf-type {f16,bf16,q8_0}" in done.stdout
