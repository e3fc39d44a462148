"""Reading, validating and tokenizing prompt/completion data."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from ftx.data import IGNORE_INDEX, DataError, TokenizedDataset, read_jsonl


def test_every_problem_is_reported_with_file_and_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(
        '{"prompt": "a", "completion": "b"}\n'
        "{oops\n"
        '{"prompt": "a"}\n'
        '{"prompt": 3, "completion": "b"}\n'
        "\n"
        '{"prompt": "a", "completion": "  "}\n'
        "[1, 2]\n"
    )
    with pytest.raises(DataError) as info:
        read_jsonl(path)
    message = str(info.value)
    assert "5 problem(s)" in message
    for line, reason in [
        (2, "invalid JSON"),
        (3, "missing 'completion'"),
        (4, "'prompt' must be a string"),
        (6, "'completion' is empty"),
        (7, "expected an object"),
    ]:
        assert f"{path}:{line}: {reason}" in message


def test_prompt_is_masked_and_eos_is_learnt(tiny_model_dir, tiny_data):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    examples = read_jsonl(tiny_data["train"])[:3]
    data = TokenizedDataset(examples, tokenizer, "{prompt}\n### JSON:\n", max_length=256, completion_only=True)
    for example, row in zip(examples, data.rows, strict=True):
        n_prompt = len(tokenizer(example.prompt + "\n### JSON:\n", add_special_tokens=False)["input_ids"])
        assert row["labels"][:n_prompt] == [IGNORE_INDEX] * n_prompt
        assert row["labels"][n_prompt:] == row["input_ids"][n_prompt:]
        assert row["input_ids"][-1] == tokenizer.eos_token_id
        assert tokenizer.decode(row["input_ids"][n_prompt:-1]) == example.completion
    all_tokens = TokenizedDataset(examples, tokenizer, "{prompt}\n### JSON:\n", 256, completion_only=False)
    assert all(IGNORE_INDEX not in row["labels"] for row in all_tokens.rows)


def test_truncation_is_counted(tiny_model_dir, tiny_data):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    examples = read_jsonl(tiny_data["train"])[:4]
    data = TokenizedDataset(examples, tokenizer, "{prompt}\n### JSON:\n", max_length=10, completion_only=True)
    assert data.truncated == 4 and all(len(row["input_ids"]) == 10 for row in data.rows)
