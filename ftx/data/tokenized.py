"""Tokenized splits: encode → truncate → (pack) → cache → batches.

Tokenized data is cached under ``paths.cache_dir/tokenized/<key>`` as a
``datasets`` Arrow dataset, the key a hash of the examples, the tokenizer (its
full serialisation and special tokens), both templates and every setting that
changes the tokens; repeated runs and sweep trials reuse it, and any change makes
a new entry.

Packing (``data.packing``) uses TRL's best-fit-decreasing ``pack_dataset``:
examples are placed whole into rows of ``data.max_length`` tokens, and TRL's
padding-free collator gives each example its own position ids (restarting at 0).
Models whose attention builds its mask with transformers' ``masking_utils``
(Llama, Mistral, Qwen2/3, Gemma, Phi-3 and most current decoders) then keep a
block-diagonal causal mask from those position ids, so packed examples attend only
to themselves, under eager, sdpa and flash-attention alike; the first token of each
example is never a target of the previous one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
import tempfile
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from omegaconf import DictConfig

from ftx.config import as_container
from ftx.data.formats import SHOWN_PROBLEMS, DataError, Example, problems_error
from ftx.data.render import IGNORE_INDEX, Renderer, TemplateError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

CACHE_VERSION = 2  # bump when the encoding itself changes (2: whole-conversation ids, offset masks)


@dataclass
class SplitStats:
    """What a tokenized split holds (``ftx data validate`` prints these)."""

    examples: int
    tokens: int
    """Input tokens after truncation (= tokens seen per epoch)."""
    trained_tokens: int
    """Tokens with a label (the loss is averaged over these)."""
    truncated: int
    """Examples longer than data.max_length, cut at it."""
    untrained: int
    """Examples left with no trained token (after truncation)."""
    longest: int
    """Longest example before truncation."""
    rows: int
    """Sequences per epoch: examples, or packed rows with data.packing."""
    over_length: list[str]
    """Where the first truncated examples came from (file:line), at most 20."""
    untrained_at: list[str] = field(default_factory=list)
    """Where the first examples left with no trained token came from, at most 20."""
    refused: list[int] = field(default_factory=list)
    """Indices of the examples the chat template refused, dropped under data.on_error=skip."""


class TokenizedSplit:
    """Rows of input_ids/labels (+ seq_lengths when packed; prompts: input_ids and
    their example), with their stats.

    Like every training set an objective's loader holds (:class:`PairSplit`), it
    says what it trains on: :meth:`sequences` and :meth:`summary`."""

    def __init__(self, rows: list[dict], stats: SplitStats) -> None:
        self.rows = rows
        self.stats = stats

    def sequences(self) -> list[dict[str, list[int]]]:
        """The token sequences a step trains on (what memory is planned for)."""
        return self.rows

    def summary(self) -> SplitStats:
        """The statistics reported for the split (truncation, untrained examples)."""
        return self.stats

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        return self.rows[index]


def renderer_for(cfg: DictConfig, tokenizer: PreTrainedTokenizerBase) -> Renderer:
    return Renderer(
        tokenizer, cfg.data.prompt_template, cfg.data.chat_template, as_container(cfg.data.chat_template_kwargs)
    )


def tokenize_split(
    cfg: DictConfig, tokenizer: PreTrainedTokenizerBase, examples: list[Example], packing: bool
) -> TokenizedSplit:
    """Encode ``examples`` (from the cache when the same ones were encoded before)."""
    renderer = renderer_for(cfg, tokenizer)
    settings = {
        "version": CACHE_VERSION,
        "examples": [asdict(e) for e in examples],
        "tokenizer": _tokenizer_fingerprint(tokenizer),
        "prompt_template": cfg.data.prompt_template,
        "chat_template": renderer.chat_template,
        "chat_template_kwargs": renderer.template_kwargs,
        "max_length": cfg.data.max_length,
        "completion_only": cfg.objective.completion_only,
        "packing": packing,
        "on_error": cfg.data.on_error,  # what a template's refusal does: stop, or drop the row
    }
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:24]
    entry = Path(cfg.paths.cache_dir) / "tokenized" / key
    if cfg.data.cache and (entry / "stats.json").is_file():
        split = _load(entry)
    else:
        split = _encode(renderer, examples, cfg.data, cfg.objective.completion_only, packing)
        if cfg.data.cache:
            _store(entry, split)
    if examples and not split.stats.trained_tokens:
        source = examples[0].source.rsplit(":", 1)[0]
        where = ", ".join(split.stats.untrained_at[:3])
        raise DataError(
            f"{source}: none of its {split.stats.examples} example(s) has a token to train (e.g. {where}) after "
            f"rendering and truncation to data.max_length={cfg.data.max_length}; raise data.max_length if prompts "
            "fill it, or check that the chat template (data.chat_template) renders the assistant's turns."
        )
    return split


def _encode(
    renderer: Renderer, examples: list[Example], data: DictConfig, completion_only: bool, packing: bool
) -> TokenizedSplit:
    max_length = data.max_length
    rows, over_length, untrained_at, refused, longest = [], [], [], {}, 0
    for index, example in enumerate(examples):
        try:
            ids, labels = renderer.encode(example, completion_only)
        except TemplateError as error:
            refused[index] = f"{example.source}: {error}"
            continue
        longest = max(longest, len(ids))
        if len(ids) > max_length:
            over_length.append(example.source)
        ids, labels = ids[:max_length], labels[:max_length]
        # The first label is never a target (labels shift left inside the model).
        if all(label == IGNORE_INDEX for label in labels[1:]):
            untrained_at.append(example.source)
        rows.append({"input_ids": ids, "labels": labels})
    if refused and (data.on_error == "refuse" or not rows):
        raise problems_error(examples[0].source.rsplit(":", 1)[0], list(refused.values()), SHOWN_PROBLEMS)
    if refused:
        first = next(iter(refused.values()))
        log.warning(
            "skipped %d example(s) the chat template refused (data.on_error=skip), first: %s", len(refused), first
        )
    tokens = sum(len(r["input_ids"]) for r in rows)
    trained = sum(sum(label != IGNORE_INDEX for label in r["labels"][1:]) for r in rows)
    if packing:
        rows = _pack(rows, max_length)
    stats = SplitStats(
        len(examples) - len(refused),
        tokens,
        trained,
        len(over_length),
        len(untrained_at),
        longest,
        len(rows),
        over_length[:20],
        untrained_at[:20],
        sorted(refused),
    )
    return TokenizedSplit(rows, stats)


def encode_prompts(renderer: Renderer, examples: list[Example], on_error: str) -> tuple[list[Example], list[list[int]]]:
    """The examples whose generation prompt the template renders, and those prompts'
    ids; the others are listed by line (data.on_error=refuse) or dropped."""
    kept, prompts, refused = [], [], []
    for example in examples:
        try:
            prompts.append(renderer.encode_prompt(example))
        except TemplateError as error:
            refused.append(f"{example.source}: {error}")
            continue
        kept.append(example)
    if refused and (on_error == "refuse" or not kept):
        raise problems_error(examples[0].source.rsplit(":", 1)[0], refused, SHOWN_PROBLEMS)
    return kept, prompts


def _pack(rows: list[dict[str, list[int]]], max_length: int) -> list[dict[str, list[int]]]:
    from datasets import Dataset
    from trl.data_utils import pack_dataset

    columns = {"input_ids": [r["input_ids"] for r in rows], "labels": [r["labels"] for r in rows]}
    return pack_dataset(Dataset.from_dict(columns), seq_length=max_length, strategy="bfd").to_list()


def _tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    vocabulary = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    specials = [tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.chat_template]
    return hashlib.sha256((vocabulary + json.dumps(specials)).encode()).hexdigest()


def _store(entry: Path, split: TokenizedSplit) -> None:
    """Written to a temporary directory and renamed: a reader sees all or nothing,
    and two sweep trials writing the same entry at once both succeed."""
    import datasets

    datasets.disable_progress_bars()  # a bar per cache write is noise in run logs
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=entry.parent, prefix=f".{entry.name}-"))
    try:
        datasets.Dataset.from_list(split.rows).save_to_disk(str(tmp / "rows"))
        (tmp / "stats.json").write_text(json.dumps(asdict(split.stats)))
        tmp.rename(entry)
    except OSError:
        if not (entry / "stats.json").is_file():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


_ANNOUNCED: set[Path] = set()


def _load(entry: Path) -> TokenizedSplit:
    from datasets import load_from_disk

    stats = SplitStats(**json.loads((entry / "stats.json").read_text()))
    if entry not in _ANNOUNCED:  # once: evaluation reads the held-out split again
        _ANNOUNCED.add(entry)
        log.info("tokenized data from cache %s", entry)
    return TokenizedSplit(load_from_disk(str(entry / "rows")).to_list(), stats)


def make_loader(
    cfg: DictConfig,
    tokenizer: PreTrainedTokenizerBase,
    examples: list[Example],
    shuffle: bool,
    packing: bool = False,
):
    """A DataLoader of tokenized batches: padded with an attention mask, or with
    ``packing`` one padding-free row per batch with per-example position ids."""
    from ftx.data.sampling import batches

    split = tokenize_split(cfg, tokenizer, examples, packing)
    collate = Collator(tokenizer.pad_token_id, packed=packing)
    return batches(split, cfg.trainer.batch_size, shuffle, collate, cfg.seed, cfg.data.num_workers)


class Collator:
    """Batches of rows, as TRL's ``DataCollatorForLanguageModeling`` makes them
    (re-implemented: importing TRL's trainer module costs seconds and pulls in W&B).

    Unpacked: right-padded input_ids (pad id) and labels (IGNORE_INDEX) with an
    attention mask. Packed (``padding_free``): the batch flattened into one row, no
    padding, position ids restarting at 0 for every example, and no example's first
    token a target of the one before.
    """

    def __init__(self, pad_token_id: int, packed: bool) -> None:
        self.pad_token_id = pad_token_id
        self.packed = packed

    def __call__(self, rows: list[dict[str, list[int]]]) -> dict:
        import torch

        if self.packed:
            input_ids = torch.tensor([token for row in rows for token in row["input_ids"]])[None]
            labels = torch.tensor([label for row in rows for label in row["labels"]])[None]
            lengths = [length for row in rows for length in row["seq_lengths"]]
            position_ids = torch.cat([torch.arange(length) for length in lengths])[None]
            labels[position_ids == 0] = IGNORE_INDEX
            return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}
        longest = max(len(row["input_ids"]) for row in rows)
        input_ids = torch.full((len(rows), longest), self.pad_token_id)
        labels = torch.full((len(rows), longest), IGNORE_INDEX)
        attention_mask = torch.zeros((len(rows), longest), dtype=torch.long)
        for i, row in enumerate(rows):
            n = len(row["input_ids"])
            input_ids[i, :n] = torch.tensor(row["input_ids"])
            labels[i, :n] = torch.tensor(row["labels"])
            attention_mask[i, :n] = 1
        return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def stats_table(splits: dict[str, SplitStats], batch_size: int, max_length: int) -> str:
    """One Markdown row per split: what an epoch costs and what it trains."""
    lines = [
        "| split | examples | tokens | trained tokens | truncated | untrained | longest | sequences | steps/epoch |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, s in splits.items():
        steps = math.ceil(s.rows / batch_size)
        lines.append(
            f"| {name} | {s.examples} | {s.tokens} | {s.trained_tokens} | {s.truncated} | {s.untrained} "
            f"| {s.longest} | {s.rows} | {steps} |"
        )
    return "\n".join(lines) + f"\n\n(max_length {max_length}; truncated examples are cut at it)"


def most_trained(sequences: list[dict]) -> int | None:
    """The most trained tokens (labelled, after the first) in one training sequence;
    None for sequences without labels (an RL objective's prompts)."""
    if not sequences or "labels" not in sequences[0]:
        return None
    return max(sum(label != IGNORE_INDEX for label in s["labels"][1:]) for s in sequences)


class PairSplit:
    """Preference pairs as rows {"chosen": row, "rejected": row}, each side tokenized
    (and cached) like an SFT example whose response is the trained part."""

    def __init__(self, chosen: TokenizedSplit, rejected: TokenizedSplit) -> None:
        # A pair the template refused on either side (dropped under data.on_error=skip) is dropped whole.
        kept = [_by_example(side) for side in (chosen, rejected)]
        both = sorted(kept[0].keys() & kept[1].keys())
        self.rows = [{"chosen": kept[0][i], "rejected": kept[1][i]} for i in both]
        refused = sorted(set(chosen.stats.refused) | set(rejected.stats.refused))
        self.stats = {
            side: replace(split.stats, examples=len(both), rows=len(both), refused=refused)
            for side, split in (("chosen", chosen), ("rejected", rejected))
        }

    def sequences(self) -> list[dict[str, list[int]]]:
        """Both sides of every pair: a step runs the B chosen and the B rejected."""
        return [row[side] for row in self.rows for side in ("chosen", "rejected")]

    def summary(self) -> SplitStats:
        """The chosen responses' statistics (the rejected ones are in ``stats``)."""
        return self.stats["chosen"]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, dict[str, list[int]]]:
        return self.rows[index]


def _by_example(split: TokenizedSplit) -> dict[int, dict[str, list[int]]]:
    """An unpacked split's rows by the index of the example each encodes."""
    refused = set(split.stats.refused)
    indices = [i for i in range(len(split.rows) + len(refused)) if i not in refused]
    return dict(zip(indices, split.rows, strict=True))


def tokenize_pairs(cfg: DictConfig, tokenizer: PreTrainedTokenizerBase, pairs: list) -> PairSplit:
    sides = [pair.as_examples() for pair in pairs]
    chosen = tokenize_split(cfg, tokenizer, [side[0] for side in sides], packing=False)
    rejected = tokenize_split(cfg, tokenizer, [side[1] for side in sides], packing=False)
    return PairSplit(chosen, rejected)


def pair_loaders(cfg: DictConfig, tokenizer: PreTrainedTokenizerBase, splits) -> tuple:
    """Train (shuffled) and held-out pair loaders of a preference ``Splits``."""
    return (
        make_pair_loader(cfg, tokenizer, splits.train, shuffle=True),
        make_pair_loader(cfg, tokenizer, splits.eval, shuffle=False),
    )


def make_pair_loader(cfg: DictConfig, tokenizer: PreTrainedTokenizerBase, pairs: list, shuffle: bool):
    """Batches of B pairs as one padded batch of 2B sequences: the B chosen first,
    then the B rejected (one forward pass scores both, as TRL's trainers do)."""
    from ftx.data.sampling import batches

    collate = Collator(tokenizer.pad_token_id, packed=False)
    return batches(
        tokenize_pairs(cfg, tokenizer, pairs),
        cfg.trainer.batch_size,
        shuffle,
        lambda rows: collate([r["chosen"] for r in rows] + [r["rejected"] for r in rows]),
        cfg.seed,
        cfg.data.num_workers,
    )


def warn_truncation(stats: SplitStats, max_length: int) -> None:
    """Say which training examples data.max_length cut, and which it left with
    nothing to train (the run goes on; the record counts them)."""
    if stats.truncated:
        log.warning(
            "%d of %d training examples are longer than data.max_length=%d (longest %d) and were truncated",
            stats.truncated,
            stats.examples,
            max_length,
            stats.longest,
        )
    if stats.untrained:
        more = stats.untrained - len(stats.untrained_at)
        log.warning(
            "%d training example(s) have no trained token left after truncation to data.max_length=%d: %s%s",
            stats.untrained,
            max_length,
            ", ".join(stats.untrained_at),
            f" and {more} more" if more > 0 else "",
        )
