"""Data formats, validation, templates, masking, packing and the tokenized cache."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import ftx_main, read_metrics, tiny_overrides
from transformers import AutoModelForCausalLM, AutoTokenizer

from ftx.config import compose_config, project_root
from ftx.data import IGNORE_INDEX, DataError, Example, Preference, load_records, load_splits
from ftx.data.render import DEFAULT_CHAT_TEMPLATE, Renderer, TemplateError
from ftx.data.tokenized import Collator, tokenize_split
from ftx.train import train

EXAMPLES = project_root() / "datasets" / "examples"
SFT_FILES = {
    "chat.jsonl": "chat",
    "tools.jsonl": "chat",
    "prompt_completion.jsonl": "prompt_completion",
    "alpaca.json": "alpaca",
    "sharegpt.jsonl": "sharegpt",
    "text.csv": "text",
}
PREFERENCE_FILES = {"preference.jsonl": "preference", "openai_preference.jsonl": "openai_preference"}
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def data_overrides(tiny_model_dir, tiny_data, run_dir, train_file, *extra):
    return [
        *tiny_overrides(tiny_model_dir, tiny_data, run_dir, steps=1),
        "data=custom",
        f"data.train_file={train_file}",
        "data.eval_file=null",
        "data.eval_fraction=0.2",
        "data.general_text=null",
        "logger=none",
        *extra,
    ]


def trained(renderer: Renderer, example: Example, completion_only: bool = True) -> str:
    ids, labels = renderer.encode(example, completion_only)
    assert len(ids) == len(labels)
    assert all(label in (IGNORE_INDEX, token) for token, label in zip(ids, labels, strict=True))
    return renderer.tokenizer.decode([t for t, label in zip(ids, labels, strict=True) if label != IGNORE_INDEX])


# ------------------------------------------------------------------ every format


@pytest.mark.parametrize("name", [*SFT_FILES, *PREFERENCE_FILES])
def test_shipped_example_files_load_in_their_format(name):
    records = load_records(EXAMPLES / name, "train", "auto", "refuse")
    expected = {**SFT_FILES, **PREFERENCE_FILES}[name]
    assert records.format.name == expected and records.skipped == 0
    kind = Preference if name in PREFERENCE_FILES else Example
    assert len(records.records) >= 4 and all(isinstance(r, kind) for r in records.records)
    # Declared formats give the same records as detection.
    assert load_records(EXAMPLES / name, "train", expected, "refuse").records == records.records


@pytest.mark.parametrize("name", SFT_FILES)
def test_each_format_trains_a_step(name, tiny_model_dir, tiny_data, tmp_path):
    # The tools' JSON schemas alone are ~500 tokens of the 300-token tiny vocabulary.
    longer = ["data.max_length=1536"] if name == "tools.jsonl" else []
    cfg = compose_config(data_overrides(tiny_model_dir, tiny_data, tmp_path, EXAMPLES / name, *longer))
    record = train(cfg)
    assert record["status"] == "completed" and record["train"]["steps"] == 1
    assert record["data"]["format"] == SFT_FILES[name] and record["data"]["trained_tokens"] > 0
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("name", PREFERENCE_FILES)
def test_each_preference_format_trains_a_reward_step(name, tiny_model_dir, tiny_data, tmp_path):
    overrides = data_overrides(tiny_model_dir, tiny_data, tmp_path, EXAMPLES / name, "objective=reward")
    record = train(compose_config([*overrides, "data=custom", f"data.train_file={EXAMPLES / name}"]))
    assert record["status"] == "completed" and record["train"]["steps"] == 1
    assert record["data"]["format"] == PREFERENCE_FILES[name] and "pair_accuracy" in record["quality"]


def test_packed_training_run(tiny_model_dir, tiny_data, tmp_path):
    overrides = data_overrides(tiny_model_dir, tiny_data, tmp_path, EXAMPLES / "chat.jsonl", "data.packing=true")
    record = train(compose_config([*overrides, "data.max_length=256", "trainer.batch_size=2"]))
    assert record["status"] == "completed" and math.isfinite(record["train"]["final_loss"])
    assert record["data"]["packing"] and record["data"]["rows"] < record["data"]["examples"] == 5


def test_preference_data_is_refused_for_sft_before_weights_load(tiny_model_dir, tiny_data, tmp_path):
    cfg = compose_config(data_overrides(tiny_model_dir, tiny_data, tmp_path, EXAMPLES / "preference.jsonl"))
    with pytest.raises(DataError, match="objective=sft learns from prompt/completion"):
        train(cfg)
    assert read_metrics(tmp_path)["status"] == "failed" and not (tmp_path / "adapter").exists()


def test_file_types_give_the_same_records(tmp_path):
    from datasets import Dataset, DatasetDict

    rows = [json.loads(line) for line in (EXAMPLES / "prompt_completion.jsonl").read_text().splitlines()]
    expected = [(r["prompt"], r["completion"]) for r in rows]
    (tmp_path / "d.json").write_text(json.dumps(rows, indent=2))
    Dataset.from_list(rows).to_parquet(tmp_path / "d.parquet")
    Dataset.from_list(rows).to_csv(tmp_path / "d.csv", index=False)
    DatasetDict({"train": Dataset.from_list(rows[:4]), "test": Dataset.from_list(rows[4:])}).save_to_disk(
        tmp_path / "saved"
    )
    for source in ("d.json", "d.parquet", "d.csv"):
        got = load_records(tmp_path / source, "train", "auto", "refuse").records
        assert [(e.prompt, e.completion) for e in got] == expected, source
    saved = [load_records(tmp_path / "saved", split, "auto", "refuse").records for split in ("train", "test")]
    assert [(e.prompt, e.completion) for e in saved[0] + saved[1]] == expected
    assert saved[1][0].source == f"{tmp_path / 'saved'}[test]:row 1"
    with pytest.raises(DataError, match="has splits train, test, not 'validation'"):
        load_records(tmp_path / "saved", "validation", "auto", "refuse")


def test_eval_split_of_a_saved_dataset(tiny_model_dir, tiny_data, tmp_path):
    from datasets import Dataset, DatasetDict

    rows = [json.loads(line) for line in (EXAMPLES / "chat.jsonl").read_text().splitlines()]
    DatasetDict({"train": Dataset.from_list(rows[:4]), "test": Dataset.from_list(rows[4:])}).save_to_disk(
        tmp_path / "saved"
    )
    overrides = data_overrides(tiny_model_dir, tiny_data, tmp_path, tmp_path / "saved", "data.eval_split=test")
    splits = load_splits(compose_config(overrides))
    assert (len(splits.train), len(splits.eval), splits.format) == (4, 2, "chat")
    fraction = load_splits(compose_config(data_overrides(tiny_model_dir, tiny_data, tmp_path, EXAMPLES / "chat.jsonl")))
    assert (len(fraction.train), len(fraction.eval)) == (5, 1)


# -------------------------------------------------------------------- bad input


BAD_ROWS = [
    (
        "chat",
        '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]',
        "invalid JSON",
    ),
    ("chat", '{"prompt": "a", "completion": "b"}', "missing 'messages'"),
    ("chat", '{"messages": "hello"}', "'messages' must be a list of messages, got str"),
    ("chat", '{"messages": []}', "'messages' is empty"),
    ("chat", '{"messages": [{"role": "robot", "content": "x"}]}', "messages[0]: unknown role 'robot'"),
    ("chat", '{"messages": [{"role": "user", "content": ""}]}', "messages[0].content is empty"),
    (
        "chat",
        '{"messages": [{"role": "user", "content": 3}]}',
        "messages[0].content must be a string or a list of text parts, got int",
    ),
    ("chat", '{"messages": [{"role": "user", "content": "hi"}]}', "'messages' has no assistant turn"),
    (
        "chat",
        '{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "weight": 2}]}',
        "messages[1].weight must be 0 or 1, got 2",
    ),
    (
        "chat",
        '{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "weight": 0}]}',
        "'messages': every assistant turn has weight 0",
    ),
    ("prompt_completion", '{"prompt": 3, "completion": "b"}', "'prompt' must be a string, got int"),
    ("prompt_completion", '{"prompt": "a", "completion": "  "}', "'completion' is empty"),
    ("prompt_completion", "[1, 2]", "expected an object, got list"),
    ("alpaca", '{"instruction": "a", "input": "b"}', "missing 'output'"),
    ("sharegpt", '{"conversations": [{"from": "alien", "value": "x"}]}', "conversations[0]: unknown from 'alien'"),
    ("preference", '{"prompt": "a", "chosen": "same", "rejected": "same"}', "'chosen' is identical to 'rejected'"),
    ("preference", '{"prompt": "a", "chosen": "b"}', "missing 'rejected'"),
    (
        "openai_preference",
        '{"preferred_output": [{"role": "assistant", "content": "b"}], '
        '"non_preferred_output": [{"role": "assistant", "content": "c"}]}',
        "missing 'input.messages'",
    ),
]


@pytest.mark.parametrize(("fmt", "row", "reason"), BAD_ROWS)
def test_each_bad_row_is_named_with_its_line(fmt, row, reason, tmp_path):
    good = {
        "chat": '{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}',
        "prompt_completion": '{"prompt": "a", "completion": "b"}',
        "alpaca": '{"instruction": "a", "output": "b"}',
        "sharegpt": '{"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]}',
        "preference": '{"prompt": "a", "chosen": "b", "rejected": "c"}',
        "openai_preference": '{"input": {"messages": [{"role": "user", "content": "a"}]}, '
        '"preferred_output": [{"role": "assistant", "content": "b"}], '
        '"non_preferred_output": [{"role": "assistant", "content": "c"}]}',
    }[fmt]
    path = tmp_path / "d.jsonl"
    path.write_text(f"{good}\n\n{row}\n{good}\n")
    with pytest.raises(DataError) as info:
        load_records(path, "train", "auto", "refuse")
    message = str(info.value)
    assert f"{path}:3: {reason}" in message and "1 problem(s)" in message, message
    assert "data.on_error=skip" in message
    skipped = load_records(path, "train", "auto", "skip")
    assert skipped.skipped == 1 and len(skipped.records) == 2 and skipped.format.name == fmt


def test_every_problem_of_a_file_is_listed(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(
        '{"prompt": "a", "completion": "b"}\n{oops\n{"prompt": "a"}\n{"prompt": 3, "completion": "b"}\n'
        '\n{"prompt": "a", "completion": "  "}\n[1, 2]\n'
    )
    with pytest.raises(DataError) as info:
        load_records(path, "train", "auto", "refuse")
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


def test_lines_are_located_in_json_arrays_and_csv(tmp_path):
    array = tmp_path / "d.json"
    array.write_text('[\n  {"prompt": "a", "completion": "b"},\n\n  {"prompt": "a",\n   "completion": 5}\n]\n')
    with pytest.raises(DataError, match=f"{array}:4: 'completion' must be a string, got int"):
        load_records(array, "train", "auto", "refuse")
    table = tmp_path / "d.csv"
    table.write_text('prompt,completion\n"two\nlines",b\na,\nc,d,e\n')
    with pytest.raises(DataError) as info:
        load_records(table, "train", "auto", "refuse")
    assert f"{table}:4: 'completion' is empty" in str(info.value)
    assert f"{table}:5: 1 more cell(s) than the header has columns" in str(info.value)


def test_utf8_with_a_byte_order_mark_and_crlf_read_as_plain_utf8(tmp_path):
    """Excel's "CSV UTF-8" and many Windows editors write a BOM and CRLF line ends."""
    rows = [json.loads(line) for line in (EXAMPLES / "prompt_completion.jsonl").read_text().splitlines()]
    expected = [(r["prompt"], r["completion"]) for r in rows]
    from datasets import Dataset

    Dataset.from_list(rows).to_csv(tmp_path / "plain.csv", index=False)
    files = {
        "d.jsonl": "\r\n".join(json.dumps(r) for r in rows) + "\r\n",
        "d.json": json.dumps(rows, indent=2).replace("\n", "\r\n"),
        "d.csv": (tmp_path / "plain.csv").read_text().replace("\n", "\r\n"),
    }
    for name, text in files.items():
        (tmp_path / name).write_bytes(b"\xef\xbb\xbf" + text.encode())
        got = load_records(tmp_path / name, "train", "auto", "refuse").records
        assert [(e.prompt, e.completion) for e in got] == expected, name
        second_line = {"d.jsonl": 2, "d.csv": 3}.get(name)  # CRLF counts as one line end
        assert second_line is None or got[1].source == f"{tmp_path / name}:{second_line}", name


def test_a_json_document_named_jsonl_is_one_problem_with_its_fix(tmp_path):
    rows = [{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(40)]
    array = tmp_path / "rows.jsonl"
    array.write_text(json.dumps(rows, indent=2))
    with pytest.raises(DataError) as info:
        load_records(array, "train", "auto", "refuse")
    message = str(info.value)
    assert "holds a JSON array, not JSON Lines" in message and "name it rows.json" in message
    assert "invalid JSON" not in message and "problem(s)" not in message  # one message, not one per line
    pretty = tmp_path / "pretty.jsonl"
    pretty.write_text("\n".join(json.dumps(r, indent=2) for r in rows[:3]) + "\n")
    with pytest.raises(DataError, match=r"pretty.jsonl:1: pretty-printed JSON: JSON Lines needs each row on one line"):
        load_records(pretty, "train", "auto", "refuse")
    broken = tmp_path / "broken.jsonl"  # plain bad lines are still reported one by one
    broken.write_text('{"prompt": "a", "completion": "b"}\nnot json\n{"prompt": "c"\n')
    with pytest.raises(DataError, match=r"2 problem\(s\)"):
        load_records(broken, "train", "auto", "refuse")


def test_unknown_format_names_the_setting(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"question": "a", "answer": "b"}\n')
    with pytest.raises(DataError, match=r"d.jsonl:1: cannot tell the format from the keys \['answer', 'question'\]"):
        load_records(path, "train", "auto", "refuse")
    with pytest.raises(DataError, match="missing 'messages'"):
        load_records(EXAMPLES / "prompt_completion.jsonl", "train", "chat", "refuse")


# --------------------------------------------------------------------- masking


def test_prompt_is_masked_and_eos_is_learnt(tokenizer):
    renderer = Renderer(tokenizer, "{prompt}\n### JSON:\n", None)
    example = Example("x", prompt="Cancel 3 kettles.", completion='{"intent": "cancel"}')
    ids, labels = renderer.encode(example, completion_only=True)
    n_prompt = len(tokenizer("Cancel 3 kettles.\n### JSON:\n", add_special_tokens=False)["input_ids"])
    assert labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert labels[n_prompt:] == ids[n_prompt:] and ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(ids[n_prompt:-1]) == '{"intent": "cancel"}'
    assert renderer.encode_prompt(example) == ids[:n_prompt]  # generation starts where training's prompt ends
    _, all_labels = renderer.encode(example, completion_only=False)
    assert all_labels == ids


def test_only_weighted_assistant_turns_are_trained(tokenizer):
    renderer = Renderer(tokenizer, "{prompt}", None)
    assert renderer.chat_template == DEFAULT_CHAT_TEMPLATE  # the tiny tokenizer has none
    example = load_records(EXAMPLES / "chat.jsonl", "train", "auto", "refuse").records[2]
    final = '{"intent": "cancel", "product": "blender", "quantity": 3, "urgency": "low"}'
    assert trained(renderer, example) == final + tokenizer.eos_token
    # All tokens: system and user turns too, but never the weight-0 answer.
    everything = trained(renderer, example, completion_only=False)
    assert "You file support tickets" in everything and "As JSON, please." in everything
    assert "Sure! Here you go" not in everything
    # The segments put together are exactly what the template renders.
    ids, _ = renderer.encode(example, True)
    assert tokenizer.decode(ids) == renderer.render(example.messages)
    prompt = tokenizer.decode(renderer.encode_prompt(example))
    assert prompt.endswith("As JSON, please.\n\n### Assistant:\n") and "Sure! Here you go" in prompt


def test_tokenizer_chat_template_is_used(tokenizer):
    tokenizer = AutoTokenizer.from_pretrained(tokenizer.name_or_path)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.chat_template = CHATML
    renderer = Renderer(tokenizer, "{prompt}", None)
    example = Example(
        "x",
        messages=[
            {"role": "user", "content": "hi", "weight": 0},
            {"role": "assistant", "content": "one", "weight": 1},
            {"role": "user", "content": "again", "weight": 0},
            {"role": "assistant", "content": "two", "weight": 1},
        ],
    )
    assert trained(renderer, example) == "one<|im_end|>two<|im_end|>"  # never the newline after it
    ids, labels = renderer.encode(example, True)
    im_start = tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert ids.count(im_start) == 4 and all(labels[i] == IGNORE_INDEX for i, t in enumerate(ids) if t == im_start)


def test_a_template_that_rewrites_history_is_followed(tokenizer):
    """The last message is marked: the turns before render differently once it
    follows. The answer is found where its content renders."""
    rewriting = "{% for m in messages %}{% if loop.last %}LAST {% endif %}{{ m['content'] }} {% endfor %}"
    renderer = Renderer(tokenizer, "{prompt}", rewriting)
    example = Example(
        "x",
        messages=[{"role": "user", "content": "a", "weight": 0}, {"role": "assistant", "content": "bc", "weight": 1}],
    )
    assert trained(renderer, example) == "bc"


def test_a_template_that_drops_the_answers_is_refused(tokenizer):
    roles_only = "{% for m in messages %}[{{ m['role'] }}] {% endfor %}"
    renderer = Renderer(tokenizer, "{prompt}", roles_only)
    example = Example(
        "x",
        messages=[{"role": "user", "content": "a", "weight": 0}, {"role": "assistant", "content": "b", "weight": 1}],
    )
    with pytest.raises(TemplateError, match="data.chat_template"):
        renderer.encode(example, True)


# --------------------------------------------------------------------- packing


def test_packed_examples_do_not_see_each_other(tiny_model_dir, tiny_data, tmp_path):
    cfg = compose_config(
        [*tiny_overrides(tiny_model_dir, tiny_data, tmp_path), "data.max_length=256", f"paths.cache_dir={tmp_path}"]
    )
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    examples = load_splits(cfg).train[:6]
    plain = tokenize_split(cfg, tokenizer, examples, packing=False)
    packed = tokenize_split(cfg, tokenizer, examples, packing=True)
    assert packed.stats.rows < plain.stats.rows and packed.stats.tokens == plain.stats.tokens
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    row = next(r for r in packed.rows if len(r["seq_lengths"]) > 1)
    batch = Collator(tokenizer.pad_token_id, packed=True)([row])
    with torch.no_grad():
        logits = model(**batch, use_cache=False).logits[0]
        leaky = model(input_ids=batch["input_ids"], use_cache=False).logits[0]  # one long sequence
    start, leaked = 0, False
    for length in row["seq_lengths"]:
        alone = torch.tensor([row["input_ids"][start : start + length]])
        with torch.no_grad():
            expected = model(input_ids=alone, use_cache=False).logits[0]
        torch.testing.assert_close(logits[start : start + length], expected, atol=1e-5, rtol=1e-4)
        leaked |= start > 0 and not torch.allclose(leaky[start : start + length], expected, atol=1e-3)
        assert batch["labels"][0, start] == IGNORE_INDEX  # never a target of the previous example
        start += length
    assert leaked, "without per-example positions the test must see leakage"


# ----------------------------------------------------------------------- cache


def test_tokenized_cache_hits_and_invalidates(tiny_model_dir, tiny_data, tmp_path, monkeypatch):
    overrides = [*tiny_overrides(tiny_model_dir, tiny_data, tmp_path), f"paths.cache_dir={tmp_path / 'cache'}"]
    cfg = compose_config(overrides)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    examples = load_splits(cfg).train
    first = tokenize_split(cfg, tokenizer, examples, packing=False)
    entries = lambda: sorted(p.name for p in (tmp_path / "cache" / "tokenized").iterdir())  # noqa: E731
    assert len(entries()) == 1

    def refuse(*args, **kwargs):
        raise AssertionError("tokenized again despite a cached entry")

    monkeypatch.setattr(Renderer, "encode", refuse)
    again = tokenize_split(cfg, tokenizer, examples, packing=False)
    assert again.rows == first.rows and again.stats == first.stats
    monkeypatch.undo()

    changes = {
        "max_length": (compose_config([*overrides, "data.max_length=100"]), examples),
        "template": (compose_config([*overrides, "data.prompt_template='Q {prompt} A'"]), examples),
        "masking": (compose_config([*overrides, "objective.completion_only=false"]), examples),
        "data": (cfg, [Example(examples[0].source, prompt="changed", completion="x"), *examples[1:]]),
    }
    for count, (name, (changed_cfg, changed_examples)) in enumerate(changes.items(), start=2):
        tokenize_split(changed_cfg, tokenizer, changed_examples, packing=False)
        assert len(entries()) == count, name
    tokenizer.add_tokens(["<new>"])
    tokenize_split(cfg, tokenizer, examples, packing=False)
    assert len(entries()) == len(changes) + 2


# ------------------------------------------------------------------------- CLI


def test_data_validate_command(tiny_model_dir, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        '{"messages": [{"role": "user", "content": "a"}]}\n{"messages": [{"role": "bot", "content": "b"}]}\n'
    )
    out = ftx_main("data", "validate", "data=custom", f"data.train_file={bad}")
    assert out.returncode == 2
    assert f"{bad}:1: 'messages' has no assistant turn" in out.stderr and f"{bad}:2: messages[0]: unknown" in out.stderr
    out = ftx_main(
        "data",
        "validate",
        "model=hf",
        f"model.name_or_path={tiny_model_dir}",
        "data=custom",
        f"data.train_file={EXAMPLES / 'chat.jsonl'}",
        "data.max_length=100",
        f"paths.cache_dir={tmp_path}",
    )
    assert out.returncode == 0, out.stderr
    assert "format chat (sft), 5 train / 1 eval rows" in out.stdout
    assert "| split | examples | tokens | trained tokens |" in out.stdout
    assert f"{EXAMPLES / 'chat.jsonl'}:3: longer than data.max_length=100" in out.stdout
