"""Published chat templates (tests/templates/, verbatim from the model repos; see
SOURCES.md there) on tokenizers built here with each family's special tokens: the
ids ftx trains on are the ids ``apply_chat_template`` gives, the trained tokens are
exactly each trained assistant turn's content, tool calls and end-of-turn token,
generation stops where a turn ends, and data a template cannot render is refused
by file and line."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from conftest import ftx_main, tiny_overrides

from ftx.data import load_records
from ftx.data.formats import Example
from ftx.data.render import IGNORE_INDEX, Renderer, TemplateError, template_message

TEMPLATES = Path(__file__).parent / "templates"

CORPUS = [
    "What is the capital of France? Paris. And of Germany? Berlin. I think it is Lyon.",
    "You are a helpful assistant. Answer in one word. Are you sure?",
    "get_weather city Paris temperature 21 degrees sunny, the weather in Paris is sunny.",
    "Yes no maybe hello world user model assistant system tool function arguments name",
] * 20


@dataclass
class Family:
    name: str
    template: str
    kind: str
    """bytelevel (GPT-2/tiktoken-like, Llama 3, Qwen) or metaspace (SentencePiece-like: Mistral, Gemma, Phi-3)."""
    bos: str | None
    eos: str
    closer: str
    """The token that ends an assistant turn in this template."""
    specials: list[str]
    added: list[str] = field(default_factory=list)
    """Added tokens that are not special (Qwen's <tool_call>)."""
    system: bool = True
    """Whether the template accepts a system message."""
    tools: bool = False
    """Whether the template renders tools and tool calls."""
    opening: str = ""
    """What the template writes at the start of the last answer, after the generation
    prompt, that the model generates too (Qwen3's empty thinking block)."""


FAMILIES = [
    Family(
        "llama3",
        "llama3.jinja",
        "bytelevel",
        "<|begin_of_text|>",
        "<|eot_id|>",
        "<|eot_id|>",
        [
            "<|begin_of_text|>",
            "<|end_of_text|>",
            "<|start_header_id|>",
            "<|end_header_id|>",
            "<|eot_id|>",
            "<|eom_id|>",
            "<|python_tag|>",
        ],
        tools=True,
    ),
    Family(
        "qwen2.5",
        "qwen2.5.jinja",
        "bytelevel",
        None,
        "<|im_end|>",
        "<|im_end|>",
        ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        added=["<tool_call>", "</tool_call>"],
        tools=True,
    ),
    Family(
        "qwen3",
        "qwen3.jinja",
        "bytelevel",
        None,
        "<|im_end|>",
        "<|im_end|>",
        ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        added=["<tool_call>", "</tool_call>", "<think>", "</think>"],
        tools=True,
        opening="<think>\n\n</think>\n\n",
    ),
    Family(
        "mistral",
        "mistral.jinja",
        "metaspace",
        "<s>",
        "</s>",
        "</s>",
        [
            "<unk>",
            "<s>",
            "</s>",
            "[INST]",
            "[/INST]",
            "[TOOL_CALLS]",
            "[AVAILABLE_TOOLS]",
            "[/AVAILABLE_TOOLS]",
            "[TOOL_RESULTS]",
            "[/TOOL_RESULTS]",
        ],
    ),
    Family(
        "gemma",
        "gemma.jinja",
        "metaspace",
        "<bos>",
        "<eos>",
        "<end_of_turn>",
        ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"],
        system=False,
    ),
    Family(
        "phi3",
        "phi3.jinja",
        "metaspace",
        "<s>",
        "<|endoftext|>",
        "<|end|>",
        ["<unk>", "<s>", "</s>", "<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"],
    ),
    Family(
        "chatml",
        "chatml.jinja",
        "bytelevel",
        None,
        "<|im_end|>",
        "<|im_end|>",
        ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
    ),
]
BY_NAME = {f.name: f for f in FAMILIES}


def family_tokenizer(family: Family):
    """A BPE tokenizer trained here, with the family's special tokens, BOS/EOS and
    its published chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    if family.kind == "bytelevel":
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:  # SentencePiece-like: spaces become ▁ and stay with the word after them
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split("\n", "isolated"), pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")]
        )
        tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
        alphabet = [chr(c) for c in range(32, 127)] + ["\n", "▁"]
    trainer = trainers.BpeTrainer(vocab_size=500, special_tokens=family.specials, initial_alphabet=alphabet)
    tok.train_from_iterator(CORPUS, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=family.bos, eos_token=family.eos, pad_token=family.specials[0]
    )
    tokenizer.add_tokens(family.added)
    tokenizer.chat_template = (TEMPLATES / family.template).read_text()
    return tokenizer


@pytest.fixture(scope="module", params=[f.name for f in FAMILIES])
def family(request):
    family = BY_NAME[request.param]
    return family, family_tokenizer(family)


def tiny_config(tokenizer):
    """A one-layer Llama over ``tokenizer``'s vocabulary (hidden 64: bitsandbytes' CPU blocks)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )


def conversation(family: Family) -> list[dict]:
    """Three answers, the first of weight 0 (a wrong answer kept as context)."""
    messages = [{"role": "system", "content": "You are a helpful assistant."}] if family.system else []
    return messages + [
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "I think it is Lyon.", "weight": 0},
        {"role": "user", "content": "Are you sure? Answer in one word."},
        {"role": "assistant", "content": "Paris"},
        {"role": "user", "content": "And of Germany?"},
        {"role": "assistant", "content": "Berlin"},
    ]


def parsed(row: dict, tmp_path: Path) -> Example:
    """The row read as a user's data file is read (validated and normalised)."""
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(row) + "\n")
    return load_records(path, "train", "auto", "refuse").records[0]


def trained_runs(renderer: Renderer, example: Example) -> list[str]:
    """The trained characters of the rendering, as runs of consecutive tokens."""
    ids, labels = renderer.encode(example, completion_only=True)
    text = renderer.render([template_message(m) for m in example.messages], tools=example.tools)
    offsets = renderer.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    runs, last = [], None
    for (start, end), label in zip(offsets, labels, strict=True):
        if label == IGNORE_INDEX:
            last = None
            continue
        if last is None:
            runs.append("")
        runs[-1] += text[start:end]
        last = end
    return runs


def reference_ids(tokenizer, messages: list[dict], **kwargs) -> list[int]:
    """What transformers (and an inference server rendering the same template) feeds the model."""
    plain = [{k: v for k, v in m.items() if k != "weight"} for m in messages]
    return tokenizer.apply_chat_template(plain, tokenize=True, **kwargs)["input_ids"]


# --------------------------------------------------------------- token identity


def test_ids_are_apply_chat_templates_and_only_answers_are_trained(family, tmp_path):
    family, tokenizer = family
    messages = conversation(family)
    example = parsed({"messages": messages}, tmp_path)
    renderer = Renderer(tokenizer, "{prompt}", None)
    ids, labels = renderer.encode(example, completion_only=True)
    assert ids == reference_ids(tokenizer, messages)
    # Trained: each weight-1 answer and the token closing it; never headers, the
    # template's whitespace after the closer, or the weight-0 answer.
    runs = [run.lstrip(" ") for run in trained_runs(renderer, example)]
    assert runs == [f"Paris{family.closer}", f"{family.opening}Berlin{family.closer}"]
    # Generation starts from the ids transformers gives the prompt.
    prompt = reference_ids(tokenizer, messages[:-1], add_generation_prompt=True)
    assert renderer.encode_prompt(example) == prompt
    # completion_only=False trains all but the weight-0 answer.
    _, everything = renderer.encode(example, completion_only=False)
    untrained = tokenizer.decode([t for t, label in zip(ids, everything, strict=True) if label == IGNORE_INDEX])
    assert "Lyon" in untrained and "Paris" not in untrained and "France" not in untrained


def test_prompt_and_completion_are_tokenized_as_the_joined_text(family):
    family, tokenizer = family
    renderer = Renderer(tokenizer, "Question: {prompt}\nAnswer:", None)
    example = Example("x", prompt="capital of France?", completion=" Paris")
    ids, labels = renderer.encode(example, completion_only=True)
    joined = tokenizer("Question: capital of France?\nAnswer: Paris", add_special_tokens=False)["input_ids"]
    bos = [tokenizer.bos_token_id] if family.bos else []
    assert ids == bos + joined + [tokenizer.eos_token_id]
    assert tokenizer.decode([t for t, label in zip(ids, labels, strict=True) if label != IGNORE_INDEX]).strip() == (
        f"Paris{family.eos}"
    )


def test_an_answer_quoting_the_end_token_is_trained_whole(tmp_path):
    tokenizer = family_tokenizer(BY_NAME["chatml"])
    answer = "Write <|im_end|> at the end. Then stop."
    messages = [{"role": "user", "content": "How do I end a turn?"}, {"role": "assistant", "content": answer}]
    example = parsed({"messages": messages}, tmp_path)
    assert trained_runs(Renderer(tokenizer, "{prompt}", None), example) == [f"{answer}<|im_end|>"]


def test_an_end_of_turn_token_added_as_a_plain_token_still_ends_the_turn(tmp_path):
    """Tokenizers that add their turn markers with add_tokens (special=False)."""
    plain = Family("plain", "chatml.jinja", "bytelevel", None, "<|endoftext|>", "<|im_end|>", ["<|endoftext|>"])
    tokenizer = family_tokenizer(plain)
    tokenizer.add_tokens(["<|im_start|>", "<|im_end|>"])
    renderer = Renderer(tokenizer, "{prompt}", None)
    example = parsed({"messages": conversation(plain)}, tmp_path)
    assert trained_runs(renderer, example) == ["Paris<|im_end|>", "Berlin<|im_end|>"]
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in renderer.stop_ids()


# ------------------------------------------------------------------ tool calls

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


def tool_row(content: str | None = None, calls: int = 1) -> dict:
    """OpenAI's fine-tuning format for function calling: top-level tools, an
    assistant turn whose content is null, arguments as a JSON string, a tool result."""
    call = [
        {"id": f"call_{i}", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
        for i in range(calls)
    ]
    return {
        "tools": [WEATHER],
        "messages": [
            {"role": "user", "content": "What is the weather in Paris?"},
            {"role": "assistant", "content": content, "tool_calls": call},
            *[
                {"role": "tool", "tool_call_id": f"call_{i}", "content": '{"temperature": 21, "sky": "sunny"}'}
                for i in range(calls)
            ],
            {"role": "assistant", "content": "It is sunny in Paris, 21 degrees."},
        ],
    }


def as_template_sees_it(row: dict) -> list[dict]:
    """The row's messages as vLLM's OpenAI server hands them to templates: arguments
    decoded from their JSON string, null content as ""."""
    messages = []
    for message in row["messages"]:
        message = {k: "" if k == "content" and v is None else v for k, v in message.items()}
        if "tool_calls" in message:
            message["tool_calls"] = [
                {**c, "function": {**c["function"], "arguments": json.loads(c["function"]["arguments"])}}
                for c in message["tool_calls"]
            ]
        messages.append(message)
    return messages


@pytest.mark.parametrize("name", ["qwen2.5", "qwen3", "llama3"])
def test_a_tool_call_is_trained_and_its_result_is_not(name, tmp_path):
    tokenizer = family_tokenizer(BY_NAME[name])
    row = tool_row()
    example = parsed(row, tmp_path)
    renderer = Renderer(tokenizer, "{prompt}", None)
    ids, _ = renderer.encode(example, completion_only=True)
    assert ids == reference_ids(tokenizer, as_template_sees_it(row), tools=row["tools"])
    runs = trained_runs(renderer, example)
    assert len(runs) == 2 and '"name": "get_weather"' in runs[0] and '"city": "Paris"' in runs[0]
    assert runs[1] == f"{BY_NAME[name].opening}It is sunny in Paris, 21 degrees.{BY_NAME[name].closer}"
    assert not any("temperature" in run for run in runs)  # the tool's result is context
    text = renderer.render([template_message(m) for m in example.messages], tools=example.tools)
    assert "The weather in a city." in text  # the tools reach the template


def test_parallel_calls_and_text_beside_a_call_are_trained(tmp_path):
    tokenizer = family_tokenizer(BY_NAME["qwen2.5"])
    row = tool_row(content="Let me look that up.", calls=2)
    example = parsed(row, tmp_path)
    renderer = Renderer(tokenizer, "{prompt}", None)
    assert renderer.encode(example, True)[0] == reference_ids(tokenizer, as_template_sees_it(row), tools=row["tools"])
    first = trained_runs(renderer, example)[0]
    assert first.startswith("Let me look that up.") and first.count("<tool_call>") == 2
    assert first.endswith("</tool_call><|im_end|>")


def test_legacy_functions_and_function_call_become_tools(tmp_path):
    row = {
        "functions": [WEATHER["function"]],
        "messages": [
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "function_call": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
            {"role": "function", "name": "get_weather", "content": "sunny"},
            {"role": "assistant", "content": [{"type": "text", "text": "Sunny."}]},
        ],
    }
    example = parsed(row, tmp_path)
    assert example.tools == [WEATHER]
    assert example.messages[1]["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": {"city": "Paris"}}
    assert example.messages[2]["role"] == "tool" and example.messages[2]["name"] == "get_weather"
    assert example.messages[3]["content"] == "Sunny."  # text parts read as their text
    renderer = Renderer(family_tokenizer(BY_NAME["qwen2.5"]), "{prompt}", None)
    assert "get_weather" in trained_runs(renderer, example)[0]


def test_hub_style_tool_fields_are_read(tmp_path):
    """Datasets on the Hub often store tools as JSON text, and no calls as []."""
    row = tool_row()
    row["tools"] = json.dumps(row["tools"])
    row["messages"][-1]["tool_calls"] = []
    example = parsed(row, tmp_path)
    assert example.tools == [WEATHER] and "tool_calls" not in example.messages[-1]


def test_a_template_that_cannot_render_tools_refuses_the_conversation(tmp_path):
    example = parsed(tool_row(), tmp_path)
    renderer = Renderer(family_tokenizer(BY_NAME["chatml"]), "{prompt}", None)
    with pytest.raises(TemplateError, match="does not render tool calls.*'get_weather'.*tool-aware"):
        renderer.encode(example, True)


# ------------------------------------------------------------------ templates


def test_qwen3_trains_each_turn_as_the_whole_conversation_renders_it(tmp_path):
    """Qwen3 drops the reasoning of answers before the last question: each turn is
    found in the whole rendering, not refused as a template that rewrites history."""
    tokenizer = family_tokenizer(BY_NAME["qwen3"])
    messages = [
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "<think>\nFrance, so Paris.\n</think>\n\nParis"},
        {"role": "user", "content": "And of Germany?"},
        {"role": "assistant", "content": "<think>\nGermany, so Berlin.\n</think>\n\nBerlin"},
    ]
    example = parsed({"messages": messages}, tmp_path)
    renderer = Renderer(tokenizer, "{prompt}", None)
    ids, _ = renderer.encode(example, True)
    assert ids == reference_ids(tokenizer, messages)
    first, last = trained_runs(renderer, example)
    assert first == "Paris<|im_end|>"  # its reasoning is not in the rendering
    assert last.startswith("<think>") and "Germany, so Berlin." in last and last.endswith("Berlin<|im_end|>")


def test_generation_stops_at_the_end_of_turn_token(tmp_path):
    """Gemma ends turns with <end_of_turn>, not its EOS: a model scripted to answer
    "Yes", close its turn and run on is cut at the turn's end, whether or not its
    generation_config lists <end_of_turn>."""
    from transformers import LlamaForCausalLM

    from ftx.evaluation import generate, stop_ids

    tokenizer = family_tokenizer(BY_NAME["gemma"])
    renderer = Renderer(tokenizer, "{prompt}", None)
    end_of_turn = tokenizer.convert_tokens_to_ids("<end_of_turn>")
    assert set(renderer.stop_ids()) == {tokenizer.eos_token_id, end_of_turn}
    prompt = renderer.encode_prompt(renderer.user_example("Is Paris in France?", chat=True))
    script = tokenizer("Yes", add_special_tokens=False)["input_ids"] + [end_of_turn]
    script += tokenizer("\nuser\nAnd", add_special_tokens=False)["input_ids"]

    class Scripted(LlamaForCausalLM):
        """Emits ``script`` one token per step, whatever it is given."""

        step = 0

        def forward(self, input_ids=None, **kwargs):
            out = super().forward(input_ids=input_ids, **kwargs)
            self.step = 0 if input_ids.shape[1] > 1 else self.step + 1  # the prompt first, then a token a step
            out.logits = torch.zeros_like(out.logits)
            out.logits[:, -1, script[min(self.step, len(script) - 1)]] = 100.0
            return out

    model = Scripted(tiny_config(tokenizer)).eval()
    for configured in (tokenizer.eos_token_id, [tokenizer.eos_token_id, end_of_turn]):
        model.generation_config.eos_token_id = configured
        assert generate(model, tokenizer, [prompt], 12, stop_ids(model, renderer)) == ["Yes"]
    # What passing the tokenizer's EOS alone did: the answer runs into the next turn.
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    ran_on = generate(model, tokenizer, [prompt], 6, [tokenizer.eos_token_id])[0]
    assert ran_on.startswith("Yes") and "user" in ran_on


# ------------------------------------------------------------------ bad input


@pytest.fixture(scope="module")
def gemma_model(tmp_path_factory) -> Path:
    """A tiny model whose tokenizer is Gemma-style, with Gemma's published template."""
    from transformers import LlamaForCausalLM

    out = tmp_path_factory.mktemp("gemma-style")
    tokenizer = family_tokenizer(BY_NAME["gemma"])
    torch.manual_seed(0)
    LlamaForCausalLM(tiny_config(tokenizer)).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def chat_rows(count: int = 8) -> list[dict]:
    return [
        {
            "messages": [
                {"role": "user", "content": f"What is {i} plus {i}?"},
                {"role": "assistant", "content": str(2 * i)},
            ]
        }
        for i in range(count)
    ]


CUSTOM = ["data=custom", "data.general_text=null", "logger=none"]


def validate(model_dir: Path, data: Path, *extra: str):
    return ftx_main(
        "data", "validate", "model=hf", f"model.name_or_path={model_dir}", *CUSTOM, f"data.train_file={data}", *extra
    )


def run_train(model_dir: Path, data: Path, run_dir: Path, *extra: str):
    files = {"train": data, "eval": data}
    out = ftx_main("train", *tiny_overrides(model_dir, files, run_dir, steps=1), *CUSTOM, *extra)
    record = json.loads((run_dir / "metrics.json").read_text()) if (run_dir / "metrics.json").is_file() else {}
    return out, record


def test_a_template_that_raises_refuses_its_rows_by_line(gemma_model, tmp_path):
    rows = chat_rows()
    rows[2]["messages"].insert(0, {"role": "system", "content": "Be brief."})  # Gemma's template raises on it
    rows[5]["messages"].insert(0, {"role": "system", "content": "Be brief."})
    data = write_rows(tmp_path / "sys.jsonl", rows)
    for command in ("validate", "train"):
        if command == "validate":
            out = validate(gemma_model, data)
        else:
            out, record = run_train(gemma_model, data, tmp_path / "run")
            assert record["status"] == "failed" and "System role not supported" in record["error"]
            assert not (tmp_path / "run" / "adapter").exists()
        assert out.returncode == 2, out.stderr
        assert f"2 problem(s) in {data}" in out.stderr
        assert f"{data}:3: the chat template (the tokenizer's chat template) refused it: System role not supported" in (
            out.stderr
        )
        assert f"{data}:6: " in out.stderr and "Traceback" not in out.stderr
    # data.on_error=skip drops them and trains on the rest.
    # (the task score, generated from held-out prompts, skips them too)
    out, record = run_train(gemma_model, data, tmp_path / "skip", "data.on_error=skip", "data.task_metric=exact_match")
    assert out.returncode == 0 and record["status"] == "completed", out.stderr
    assert record["data"]["refused"] == 2 and record["data"]["examples"] == 6


def test_chat_template_is_read_from_a_jinja_file(gemma_model, tmp_path):
    data = write_rows(tmp_path / "d.jsonl", chat_rows())
    chatml = TEMPLATES / "chatml.jinja"
    out = validate(gemma_model, data, f"data.chat_template={chatml}")
    assert out.returncode == 0, out.stderr
    renderer = Renderer(family_tokenizer(BY_NAME["gemma"]), "{prompt}", str(chatml))
    assert renderer.chat_template == chatml.read_text() and "chatml.jinja" in renderer.template_name
    missing = validate(gemma_model, data, "data.chat_template=templates/none.jinja")
    assert missing.returncode == 2 and "data.chat_template=templates/none.jinja: no such file" in missing.stderr


def test_a_split_with_nothing_to_train_stops_before_weights_load(gemma_model, tmp_path):
    data = write_rows(tmp_path / "long.jsonl", chat_rows())
    out, record = run_train(gemma_model, data, tmp_path / "run", "data.max_length=8")
    assert out.returncode == 2 and record["status"] == "failed"
    assert "none of its" in out.stderr and f"{data}:1" in out.stderr and "data.max_length=8" in out.stderr
    assert "memory" not in record  # stopped before the planner and the weights


def test_tool_calls_a_template_cannot_render_are_refused_in_train(gemma_model, tmp_path):
    data = write_rows(tmp_path / "tools.jsonl", [tool_row()] * 4)
    out, record = run_train(gemma_model, data, tmp_path / "run")
    assert out.returncode == 2 and record["status"] == "failed", out.stderr
    assert f"{data}:1: messages[1].tool_calls: the tokenizer's chat template does not render tool calls" in out.stderr


@pytest.mark.parametrize(
    "message, reason",
    [
        ({"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}, "is a 'image_url' part"),
        (
            {"role": "assistant", "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": "{x"}}]},
            "arguments is not valid JSON",
        ),
        ({"role": "assistant", "content": None}, "missing messages[1].content"),
        ({"role": "user", "tool_calls": [{"function": {"name": "f"}}], "content": "a"}, "only assistant turns call"),
    ],
)
def test_bad_tool_and_content_rows_are_named(message, reason, tmp_path):
    from ftx.data import DataError

    row = {"messages": [{"role": "user", "content": "hi"}, message, {"role": "assistant", "content": "ok"}]}
    path = write_rows(tmp_path / "bad.jsonl", [row])
    with pytest.raises(DataError, match=f"bad.jsonl:1: .*{re.escape(reason)}"):
        load_records(path, "train", "auto", "refuse")


def test_train_names_the_examples_truncation_left_untrained(gemma_model, tmp_path):
    rows = chat_rows()
    for line in (3, 7):  # a prompt longer than data.max_length: nothing of its answer is left
        rows[line - 1]["messages"][0]["content"] = "Paris and Berlin and Lyon " * 20
    data = write_rows(tmp_path / "some.jsonl", rows)
    out, record = run_train(gemma_model, data, tmp_path / "run", "data.max_length=64")
    assert out.returncode == 0 and record["status"] == "completed", out.stderr
    logged = out.stdout + out.stderr
    assert "2 training example(s) have no trained token left after truncation to data.max_length=64" in logged
    assert f"{data}:3" in logged and f"{data}:7" in logged


def test_template_variables_reach_training_and_generation(tmp_path):
    """data.chat_template_kwargs: Qwen3 without thinking (enable_thinking=false)."""
    tokenizer = family_tokenizer(BY_NAME["qwen3"])
    messages = conversation(BY_NAME["qwen3"])
    example = parsed({"messages": messages}, tmp_path)
    renderer = Renderer(tokenizer, "{prompt}", None, {"enable_thinking": False})
    assert renderer.encode(example, True)[0] == reference_ids(tokenizer, messages, enable_thinking=False)
    prompt = reference_ids(tokenizer, messages[:-1], add_generation_prompt=True, enable_thinking=False)
    assert renderer.encode_prompt(example) == prompt
    assert tokenizer.decode(prompt).endswith("<think>\n\n</think>\n\n")
