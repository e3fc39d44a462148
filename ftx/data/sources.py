"""Where data comes from: a file (.jsonl, .json, .csv, .parquet), a directory
written by ``datasets``' ``save_to_disk``, or a hub dataset already in the local
cache. Every row comes out with its location (``file:line``, ``dir[split]:row N``)
so that each problem can be reported where the user can fix it.

JSON Lines, JSON and CSV are read here rather than through ``datasets``, whose
loaders stop at the first bad line and report no line numbers; Parquet, saved
datasets and the hub cache go through ``datasets``/``pyarrow``.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass
class BadRow:
    """A row that could not be read at all (invalid JSON, say)."""

    reason: str


Row = tuple[str, Any]
"""(location, the row's value or a BadRow)."""

ENCODING = "utf-8-sig"
"""UTF-8 with or without a byte-order mark (Excel's "CSV UTF-8", many Windows
editors write one); CRLF line ends are read as LF."""


class SourceError(ValueError):
    """A file that is not what its name says as a whole (a JSON array named .jsonl):
    one problem with its fix, not one per line."""


def read_rows(source: str, split: str) -> Iterator[Row]:
    """Every row of ``source`` with its location; ``split`` picks a split of a
    saved or hub dataset (ignored for single files)."""
    path = Path(source).expanduser()
    if path.is_dir():
        yield from _saved_dataset(path, split)
    elif path.is_file():
        reader = {".csv": _csv, ".parquet": _parquet, ".json": _json}.get(path.suffix.lower(), _jsonl)
        yield from reader(path)
    else:
        yield from _hub_dataset(source, split)


def _jsonl(path: Path) -> Iterator[Row]:
    _refuse_json_document(path)
    with open(path, encoding=ENCODING) as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                yield f"{path}:{number}", json.loads(line)
            except json.JSONDecodeError as error:
                yield f"{path}:{number}", BadRow(f"invalid JSON ({error.msg} at column {error.colno})")


def _json(path: Path) -> Iterator[Row]:
    """A JSON array of rows, each located at the line where it starts. Files
    named .json that hold JSON Lines are read as such."""
    text = path.read_text(encoding=ENCODING)
    try:
        json.loads(text)
    except json.JSONDecodeError as error:
        first = next((line for line in text.splitlines() if line.strip()), "")
        if _parses(first) and error.lineno > 1:
            yield from _jsonl(path)
        else:
            yield f"{path}:{error.lineno}", BadRow(f"invalid JSON ({error.msg} at column {error.colno})")
        return
    decoder, index = json.JSONDecoder(), _skip_space(text, 0)
    if not text.startswith("[", index):
        yield f"{path}:1", BadRow("expected a JSON array of rows (or JSON Lines)")
        return
    index = _skip_space(text, index + 1)
    while not text.startswith("]", index):
        row, end = decoder.raw_decode(text, index)
        yield f"{path}:{text.count(chr(10), 0, index) + 1}", row
        index = _skip_space(text, end)
        index = _skip_space(text, index + 1) if text.startswith(",", index) else index


def _refuse_json_document(path: Path) -> None:
    """JSON Lines holds one object per line; a file whose first line does not parse
    but whose whole text (or first object) does is a JSON document under the wrong
    name, or pretty-printed rows: say which, once."""
    with open(path, encoding=ENCODING) as f:
        first = next((line for line in f if line.strip()), "")
    if not first or _parses(first):
        return
    text = path.read_text(encoding=ENCODING)
    start = _skip_space(text, 0)
    try:
        value, _ = json.JSONDecoder().raw_decode(text, start)
    except json.JSONDecodeError:
        return  # plain bad lines: reported one by one
    if isinstance(value, list):
        raise SourceError(
            f"{path}: this file holds a JSON array, not JSON Lines (one object per line): "
            f"name it {path.with_suffix('.json').name} (ftx reads a .json array), or write one object per line"
        )
    raise SourceError(
        f"{path}:1: pretty-printed JSON: JSON Lines needs each row on one line "
        f"(e.g. jq -c . {path.name} > compact.jsonl)"
    )


def _parses(line: str) -> bool:
    try:
        json.loads(line)
    except json.JSONDecodeError:
        return False
    return True


def _skip_space(text: str, index: int) -> int:
    while index < len(text) and text[index].isspace():
        index += 1
    return index


def _csv(path: Path) -> Iterator[Row]:
    """Rows keyed by the header; cells are strings (text formats only)."""
    with open(path, encoding=ENCODING, newline="") as f:
        reader = csv.DictReader(f)
        start = 2  # line 1 is the header
        for row in reader:
            if None in row:
                yield f"{path}:{start}", BadRow(f"{len(row[None])} more cell(s) than the header has columns")
            elif any(value is None for value in row.values()):
                yield f"{path}:{start}", BadRow("fewer cells than the header has columns")
            else:
                yield f"{path}:{start}", row
            start = reader.line_num + 1


def _parquet(path: Path) -> Iterator[Row]:
    import pyarrow.parquet as pq

    for number, row in enumerate(pq.read_table(path).to_pylist(), start=1):
        yield f"{path}:row {number}", row


def _saved_dataset(path: Path, split: str) -> Iterator[Row]:
    from datasets import DatasetDict, load_from_disk

    try:
        dataset = load_from_disk(str(path))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} is a directory but not a dataset written by save_to_disk.") from None
    if isinstance(dataset, DatasetDict):
        if split not in dataset:
            raise KeyError(f"{path} has splits {', '.join(dataset)}, not {split!r}; set data.train_split/eval_split.")
        dataset, path = dataset[split], f"{path}[{split}]"
    for number, row in enumerate(dataset, start=1):
        yield f"{path}:row {number}", row


def _hub_dataset(name: str, split: str) -> Iterator[Row]:
    """A hub dataset from the local cache only: ftx reaches no network at run time."""
    import datasets

    datasets.config.HF_HUB_OFFLINE = True  # read at import; set here for this process
    try:
        dataset = datasets.load_dataset(name, split=split)
    except Exception as error:  # datasets raises several types for "not cached"
        raise FileNotFoundError(
            f"{name}: no such file or directory, and not a dataset in the local Hugging Face cache "
            f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}). "
            "Download it once (datasets.load_dataset or hf download), or point to a local file."
        ) from None
    for number, row in enumerate(dataset, start=1):
        yield f"{name}[{split}]:row {number}", row
