"""ftx's own small base model, pretrained offline on text every machine has.

The default experiment must *fine-tune*: a base that already models English and
code, not random weights. No hub is reachable at run time, so ftx pretrains one:
a byte-level BPE tokenizer and a small Llama, trained with next-token loss on the
Python documentation that ships with the interpreter (``pydoc_data.topics``, the
text behind ``help('if')``) and the docstrings of pure-Python stdlib modules.

The result is an ordinary Hugging Face model directory, cached under
``<cache_dir>/models/pydoc-<hash>`` where the hash covers every pretraining setting,
so it is built once and reused by every later run, sweep trial and test.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib
import inspect
import json
import logging
import math
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from ftx.config import PretrainConfig
from ftx.console import clock

log = logging.getLogger(__name__)

# Pure-Python stdlib modules with long, well-written docstrings.
_DOC_MODULES = [
    "argparse",
    "collections",
    "contextlib",
    "csv",
    "dataclasses",
    "datetime",
    "decimal",
    "difflib",
    "email",
    "enum",
    "fractions",
    "functools",
    "heapq",
    "http.client",
    "inspect",
    "ipaddress",
    "itertools",
    "json",
    "logging",
    "os",
    "pathlib",
    "pickle",
    "random",
    "re",
    "shutil",
    "statistics",
    "string",
    "subprocess",
    "tarfile",
    "textwrap",
    "threading",
    "typing",
    "unittest",
    "urllib.parse",
    "zipfile",
]


def python_docs_corpus() -> list[str]:
    """Documents (one string each) from the interpreter's own documentation."""
    from pydoc_data.topics import topics

    docs = [topics[name] for name in sorted(topics)]
    for module_name in _DOC_MODULES:
        module = importlib.import_module(module_name)
        for _, member in sorted(vars(module).items()):
            doc = inspect.getdoc(member) if callable(member) or inspect.ismodule(member) else None
            if doc and len(doc) > 200 and getattr(member, "__module__", module_name) == module_name:
                docs.append(doc)
        if module.__doc__:
            docs.append(module.__doc__)
    return docs


def base_model_dir(cfg: PretrainConfig, cache_dir: str | Path) -> Path:
    """The cache directory for a pretraining config (hash of all its settings)."""
    key = hashlib.sha256(json.dumps(asdict(cfg), sort_keys=True).encode()).hexdigest()[:12]
    return Path(cache_dir).expanduser() / "models" / f"{cfg.corpus}-{key}"


def ensure_base_model(cfg: PretrainConfig, cache_dir: str | Path) -> Path:
    """Return the built base model directory, pretraining it first if needed.

    Safe under parallel sweep trials: one process builds while others wait on a
    file lock, and the directory appears only when complete (atomic rename).
    """
    target = base_model_dir(cfg, cache_dir)
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / "config.json").is_file():
            return target
        with tempfile.TemporaryDirectory(dir=target.parent, prefix=".build-") as tmp:
            pretrain(cfg, Path(tmp) / "model")
            (Path(tmp) / "model").rename(target)
    return target


# Long on purpose: one plain training loop (tokenizer, model, schedule, steps, save)
# that reads top to bottom like the scripts it replaces; its parts are used nowhere else.
def pretrain(cfg: PretrainConfig, out_dir: Path) -> dict[str, float]:
    """Train tokenizer and model on the corpus; save both to ``out_dir``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, get_cosine_schedule_with_warmup

    if cfg.corpus != "python-docs":
        raise ValueError(f"model.pretrain.corpus={cfg.corpus}: only python-docs is built in.")
    started = time.perf_counter()
    docs = python_docs_corpus()
    tokenizer = train_tokenizer(docs, cfg.vocab_size)

    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for doc in docs:
        ids.extend(tokenizer(doc)["input_ids"] + [eos])
    tokens = torch.tensor(ids, dtype=torch.long)
    n_seq = len(tokens) // cfg.seq_len
    sequences = tokens[: n_seq * cfg.seq_len].view(n_seq, cfg.seq_len)
    log.info(
        "pretraining ftx base on %d documents, %d tokens, %d steps",
        len(docs),
        len(tokens),
        cfg.steps,
    )

    torch.manual_seed(cfg.seed)
    model_config = LlamaConfig(
        **llama_config_kwargs(cfg, len(tokenizer)),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=eos,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(model_config)
    model.train()
    # Weight decay on matrices only: decaying norm scales and embeddings shrinks the
    # logit range, and a LoRA fine-tune (which cannot change either) then plateaus.
    decayed = [p for n, p in model.named_parameters() if p.ndim == 2 and "embed" not in n]
    others = [p for n, p in model.named_parameters() if not (p.ndim == 2 and "embed" not in n)]
    optimizer = torch.optim.AdamW(
        [{"params": decayed, "weight_decay": 0.1}, {"params": others, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(0.9, 0.95),
    )
    schedule = get_cosine_schedule_with_warmup(optimizer, max(1, cfg.steps // 20), cfg.steps)
    generator = torch.Generator().manual_seed(cfg.seed)
    order = torch.randperm(n_seq, generator=generator)
    position = 0
    losses = []
    looping = time.perf_counter()
    for step in range(cfg.steps):
        if position + cfg.batch_size > n_seq:
            order, position = torch.randperm(n_seq, generator=generator), 0
        batch = sequences[order[position : position + cfg.batch_size]]
        position += cfg.batch_size
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if (step + 1) % 50 == 0 or step + 1 == cfg.steps:
            elapsed = time.perf_counter() - looping
            left = clock(elapsed / (step + 1) * (cfg.steps - step - 1))
            recent = sum(losses[-50:]) / len(losses[-50:])
            done = f"{clock(elapsed)} elapsed, about {left} left"
            log.info("pretrain step %d/%d · loss %.3f · %s", step + 1, cfg.steps, recent, done)

    model.eval()
    out_dir.mkdir(parents=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    final = sum(losses[-20:]) / len(losses[-20:])
    record = {
        "corpus_tokens": len(tokens),
        "final_loss": final,
        "final_perplexity": math.exp(final),
        "train_s": time.perf_counter() - started,
        "settings": asdict(cfg),
    }
    (out_dir / "ftx_pretrain.json").write_text(json.dumps(record, indent=2))
    log.info("pretrained base: loss %.3f in %.0f s -> %s", final, record["train_s"], out_dir)
    return record


def llama_config_kwargs(cfg: PretrainConfig, vocab_size: int) -> dict:
    """The LlamaConfig of ftx's base for these settings (the planner uses it before
    the base is built, with ``vocab_size`` = the configured one)."""
    return {
        "model_type": "llama",
        "vocab_size": vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_heads,
        "max_position_embeddings": cfg.seq_len * 4,
        "tie_word_embeddings": cfg.tie_embeddings,
    }


def random_llama(out_dir: Path, texts: list[str], tokenizer_vocab: int, vocab_size: int | None = None, **shape) -> Path:
    """A randomly initialised Llama with a BPE tokenizer trained on ``texts``, saved as
    a Hugging Face directory: the models of tests and benchmarks, built offline.

    ``shape`` is LlamaConfig's (hidden_size, num_hidden_layers, …); the vocabulary is
    the tokenizer's unless ``vocab_size`` makes it larger. Seeded: same shape, same weights.
    """
    return random_model(out_dir, texts, tokenizer_vocab, "llama", vocab_size, **shape)


def random_model(
    out_dir: Path, texts: list[str], tokenizer_vocab: int, model_type: str, vocab_size: int | None = None, **shape
) -> Path:
    """:func:`random_llama` for any transformers ``model_type`` (qwen2, llama, …), its
    ``shape`` as in a published config.json."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    tokenizer = train_tokenizer(texts, vocab_size=tokenizer_vocab)
    torch.manual_seed(0)
    config = AutoConfig.for_model(
        model_type,
        vocab_size=max(vocab_size or 0, len(tokenizer)),
        **shape,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    AutoModelForCausalLM.from_config(config).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def train_tokenizer(docs: list[str], vocab_size: int):
    """Byte-level BPE (GPT-2 style) trained on ``docs``, wrapped for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|pad|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(docs, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|pad|>",
    )
