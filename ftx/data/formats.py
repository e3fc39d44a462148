"""The dataset formats users bring, each parsed into one of two shapes:

- :class:`Example` for supervised fine-tuning: a prompt/completion text pair, a
  plain text, or a conversation (list of messages with per-turn training weights);
- :class:`Preference` for reward models and DPO: a prompt with a chosen and a
  rejected response.

A parser returns the parsed record and a list of problems (empty when the row is
good), so a whole file is checked in one pass and every problem is reported with
its line. Formats are named in ``data.format`` or detected from a row's keys.

| format              | a row looks like                                                    |
|---------------------|---------------------------------------------------------------------|
| `prompt_completion` | `{"prompt": "...", "completion": "..."}` (text, or message lists)   |
| `text`              | `{"text": "..."}` (every token trained)                             |
| `chat`              | OpenAI fine-tuning: `{"messages": [{"role", "content", "weight"?}]}` |
|                     | with tools: `"tools"` (or `"functions"`), `tool_calls`, `tool` turns |
| `alpaca`            | `{"instruction", "input"?, "output", "system"?}`                    |
| `sharegpt`          | `{"conversations": [{"from": "human"/"gpt"/"system", "value"}]}`    |
| `preference`        | TRL: `{"prompt"?, "chosen", "rejected"}`, text or message lists     |
| `openai_preference` | `{"input": {"messages"}, "preferred_output", "non_preferred_output"}` |
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

ROLES = ("system", "user", "assistant", "tool")
OPENAI_ROLES = {role: role for role in ROLES} | {"function": "tool"}  # a legacy function result is a tool turn
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bing": "assistant",
    "bard": "assistant",
    "tool": "tool",
    "function_response": "tool",
    "observation": "tool",
}


class DataError(ValueError):
    """Bad data; the message lists file:line and reason for every problem found."""


SHOWN_PROBLEMS = 20


def problems_error(source: str, problems: list[str], shown: int = SHOWN_PROBLEMS) -> DataError:
    """One error listing the first ``shown`` problems (each "file:line: reason") and the fix."""
    listed = "\n  ".join(problems[:shown])
    more = f"\n  … and {len(problems) - shown} more" if len(problems) > shown else ""
    fix = "Fix these rows, or set data.on_error=skip to drop them (the count is reported)."
    return DataError(f"{len(problems)} problem(s) in {source}:\n  {listed}{more}\n{fix}")


@dataclass
class Example:
    """One supervised example. Exactly one shape is set:

    - ``messages``: a conversation; assistant turns with weight 1 are trained;
    - ``completion`` with a ``prompt``: the prompt (rendered through
      ``data.prompt_template``) is context, the completion is trained;
    - ``completion`` alone: plain text, all of it trained.
    """

    source: str
    """file:line (or dataset:row) the example came from."""
    prompt: str | None = None
    completion: str | None = None
    messages: list[dict[str, Any]] | None = None
    """[{"role", "content", "weight", ...}], weight 0 or 1 (assistant turns only);
    content None on an assistant turn that only calls tools (``tool_calls``)."""
    tools: list[dict[str, Any]] | None = None
    """The conversation's tools (OpenAI's top-level ``tools``), passed to the template."""

    @property
    def is_chat(self) -> bool:
        return self.messages is not None

    def reference(self) -> str:
        """What a perfect model would generate: the last assistant turn or the completion."""
        if self.messages is None:
            return self.completion
        return next(m["content"] or "" for m in reversed(self.messages) if m["role"] == "assistant")

    def prompt_messages(self) -> list[dict[str, Any]]:
        """The conversation before its last assistant turn (what generation continues)."""
        answers = [i for i, m in enumerate(self.messages) if m["role"] == "assistant"]
        return self.messages[: answers[-1]] if answers else self.messages


@dataclass
class Preference:
    """A prompt with a preferred (chosen) and a dispreferred (rejected) response.

    Text pairs have string fields; conversational pairs have message lists
    (``prompt`` the context, ``chosen``/``rejected`` the assistant turn(s)).
    """

    source: str
    prompt: str | list[dict[str, Any]]
    chosen: str | list[dict[str, Any]]
    rejected: str | list[dict[str, Any]]
    tools: list[dict[str, Any]] | None = None

    def as_examples(self) -> tuple[Example, Example]:
        """The chosen and the rejected continuation as SFT examples (response trained)."""
        return self._example(self.chosen), self._example(self.rejected)

    def _example(self, response: str | list[dict[str, Any]]) -> Example:
        if isinstance(response, str):
            return Example(self.source, prompt=self.prompt, completion=response)
        return Example(self.source, messages=[*self.prompt, *response], tools=self.tools)


Parsed = tuple[Example | Preference | None, list[str]]


# ------------------------------------------------------------------------ fields


def _text(row: dict, key: str, problems: list[str], required: bool = True, where: str = "") -> str | None:
    """A non-empty string field; records a problem and returns None otherwise."""
    name = f"{where}{key}" if where else repr(key)
    if key not in row or row[key] is None:
        if required:
            problems.append(f"missing {name}")
        return None
    value = row[key]
    if not isinstance(value, str):
        problems.append(f"{name} must be a string, got {type(value).__name__}")
        return None
    if required and not value.strip():
        problems.append(f"{name} is empty")
        return None
    return value


def parse_messages(
    value: Any,
    problems: list[str],
    key: str = "messages",
    role_key: str = "role",
    content_key: str = "content",
    role_names: dict[str, str] | None = None,
    need_assistant: bool = True,
) -> list[dict[str, Any]] | None:
    """Validate a message list; normalise to [{"role", "content", "weight"}] plus,
    where given, the keys chat templates read (:data:`TEMPLATE_KEYS`): OpenAI's
    ``tool_calls`` (arguments decoded from their JSON string, as inference servers
    pass them to templates), ``tool_call_id`` and ``name``. An assistant turn that
    calls tools may have no content (``None``)."""
    if not isinstance(value, list):
        problems.append(f"{key!r} must be a list of messages, got {type(value).__name__}")
        return None
    if not value:
        problems.append(f"{key!r} is empty")
        return None
    allowed = role_names or OPENAI_ROLES
    messages, before = [], len(problems)
    for index, message in enumerate(value):
        where = f"{key}[{index}]"
        if not isinstance(message, dict):
            problems.append(f"{where} must be an object, got {type(message).__name__}")
            continue
        role = message.get(role_key)
        if role not in allowed:
            shown = ", ".join(sorted(allowed))
            problems.append(f"{where}: unknown {role_key} {role!r} (expected one of: {shown})")
            continue
        role = allowed[role]
        extra = _template_keys(message, role, where, problems)
        calls = bool(extra.get("tool_calls"))
        content = _content(message, content_key, problems, where, optional=calls)
        # Assistant turns train unless weighted 0; other turns never carry a weight.
        # (Arrow-backed datasets give rows without a weight a weight of None.)
        weighted = message.get("weight") is not None
        weight = message["weight"] if weighted else int(role == "assistant")
        if weighted and (weight not in (0, 1) or isinstance(weight, bool)):
            problems.append(f"{where}.weight must be 0 or 1, got {weight!r}")
        elif weighted and role != "assistant":
            problems.append(f"{where}.weight is only meaningful on assistant turns (role {role!r})")
        if content is not None or calls:
            messages.append({"role": role, "content": content, "weight": int(weight), **extra})
    if len(problems) > before:
        return None
    assistant = [m for m in messages if m["role"] == "assistant"]
    if need_assistant and not assistant:
        problems.append(f"{key!r} has no assistant turn: nothing to learn")
        return None
    if need_assistant and not any(m["weight"] for m in assistant):
        problems.append(f"{key!r}: every assistant turn has weight 0: nothing to learn")
        return None
    return messages


TEMPLATE_KEYS = ("tool_calls", "tool_call_id", "name")
"""Message keys besides role and content that reach the chat template."""


def _content(message: dict, key: str, problems: list[str], where: str, optional: bool) -> str | None:
    """A message's text: a string, or OpenAI's list of text parts (joined with
    newlines, as vLLM joins them for string templates). ``optional``: may be absent
    or null (an assistant turn that only calls tools)."""
    value = message.get(key)
    if value is None:
        if not optional:
            problems.append(f"missing {where}.{key}")
        return None
    if isinstance(value, list):
        texts = []
        for number, part in enumerate(value):
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            if kind != "text" or not isinstance(part.get("text"), str):
                problems.append(
                    f'{where}.{key}[{number}] is a {kind!r} part: only text parts ({{"type": "text", '
                    f'"text": ...}}) can be trained'
                )
                return None
            texts.append(part["text"])
        value = "\n".join(texts)
    if not isinstance(value, str):
        problems.append(f"{where}.{key} must be a string or a list of text parts, got {type(value).__name__}")
        return None
    if not value.strip() and not optional:
        problems.append(f"{where}.{key} is empty")
        return None
    return value if value.strip() else None


def _template_keys(message: dict, role: str, where: str, problems: list[str]) -> dict[str, Any]:
    """tool_calls (an assistant's; the legacy function_call becomes one), tool_call_id
    (a tool result's) and name, checked; a legacy "function" result is a tool message."""
    extra: dict[str, Any] = {}
    for key in ("name", "tool_call_id"):
        if message.get(key) is not None:
            if not isinstance(message[key], str):
                problems.append(f"{where}.{key} must be a string, got {type(message[key]).__name__}")
            else:
                extra[key] = message[key]
    if "tool_call_id" in extra and role != "tool":
        problems.append(f"{where}.tool_call_id belongs on tool messages (role {role!r})")
    calls = _decoded(message.get("tool_calls"), f"{where}.tool_calls", problems) or None  # [] = no calls
    if message.get("function_call") is not None:
        if calls is not None:
            problems.append(f"{where} has both tool_calls and the legacy function_call: keep one")
            return extra
        calls = [{"type": "function", "function": message["function_call"]}]
    if calls is None:
        return extra
    if role != "assistant":
        problems.append(f"{where}.tool_calls: only assistant turns call tools (role {role!r})")
        return extra
    if not isinstance(calls, list) or not calls:
        problems.append(f"{where}.tool_calls must be a non-empty list of calls")
        return extra
    normalised = []
    for number, call in enumerate(calls):
        at = f"{where}.tool_calls[{number}]"
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
            problems.append(f'{at} must be {{"type": "function", "function": {{"name": ..., "arguments": ...}}}}')
            continue
        if call.get("type", "function") != "function":
            problems.append(f"{at}.type must be 'function', got {call['type']!r}")
            continue
        arguments = function.get("arguments", {})
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments) if arguments.strip() else {}
            except json.JSONDecodeError as error:
                problems.append(f"{at}.function.arguments is not valid JSON ({error.msg} at character {error.pos})")
                continue
        entry = {"type": "function", "function": {"name": function["name"], "arguments": arguments}}
        if isinstance(call.get("id"), str):
            entry["id"] = call["id"]
        normalised.append(entry)
    extra["tool_calls"] = normalised
    return extra


def _decoded(value: Any, name: str, problems: list[str]) -> Any:
    """A list that datasets on the Hub often store as its JSON text, decoded."""
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value) if value.strip() else None
    except json.JSONDecodeError as error:
        problems.append(f"{name} is a string that is not valid JSON ({error.msg} at character {error.pos})")
        return None


def parse_tools(row: dict, problems: list[str], where: str = "") -> list[dict[str, Any]] | None:
    """A row's top-level tools in OpenAI's form ([{"type": "function", "function":
    {"name", "description"?, "parameters"?}}]), or the legacy ``functions`` list
    turned into it; None when the row declares none."""
    tools = _decoded(row.get("tools"), f"{where}tools", problems)
    legacy = _decoded(row.get("functions"), f"{where}functions", problems)
    if tools is not None and legacy is not None:
        problems.append(f"{where}both 'tools' and the legacy 'functions': keep one")
        return None
    if legacy is not None:
        tools = [{"type": "function", "function": f} for f in legacy] if isinstance(legacy, list) else legacy
    if tools is None:
        return None
    name = f"{where}{'tools' if legacy is None else 'functions'}"
    if not isinstance(tools, list):
        problems.append(f"{name!r} must be a list of tools, got {type(tools).__name__}")
        return None
    for number, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
            problems.append(
                f'{name}[{number}] must be {{"type": "function", "function": {{"name": ..., "parameters": ...}}}}'
            )
    return tools or None


# ----------------------------------------------------------------------- formats


def parse_prompt_completion(row: dict, where: str) -> Parsed:
    problems: list[str] = []
    if isinstance(row.get("prompt"), list) or isinstance(row.get("completion"), list):
        # TRL's conversational prompt-completion: message lists on both sides.
        prompt = parse_messages(row.get("prompt"), problems, key="prompt", need_assistant=False)
        completion = parse_messages(row.get("completion"), problems, key="completion")
        tools = parse_tools(row, problems)
        if prompt is None or completion is None or problems:
            return None, problems
        return Example(where, messages=prompt + completion, tools=tools), problems
    prompt = _text(row, "prompt", problems)
    completion = _text(row, "completion", problems)
    return (Example(where, prompt=prompt, completion=completion) if not problems else None), problems


def parse_text(row: dict, where: str) -> Parsed:
    problems: list[str] = []
    text = _text(row, "text", problems)
    return (Example(where, completion=text) if not problems else None), problems


def parse_chat(row: dict, where: str) -> Parsed:
    problems: list[str] = []
    if "messages" not in row:
        return None, ["missing 'messages'"]
    messages = parse_messages(row["messages"], problems)
    tools = parse_tools(row, problems)
    return (Example(where, messages=messages, tools=tools) if messages and not problems else None), problems


def parse_alpaca(row: dict, where: str) -> Parsed:
    problems: list[str] = []
    instruction = _text(row, "instruction", problems)
    context = _text(row, "input", problems, required=False)
    output = _text(row, "output", problems)
    system = _text(row, "system", problems, required=False)
    if problems:
        return None, problems
    user = f"{instruction}\n\n{context}" if context and context.strip() else instruction
    messages = [{"role": "system", "content": system, "weight": 0}] if system and system.strip() else []
    messages += [{"role": "user", "content": user, "weight": 0}, {"role": "assistant", "content": output, "weight": 1}]
    return Example(where, messages=messages), problems


def parse_sharegpt(row: dict, where: str) -> Parsed:
    problems: list[str] = []
    if "conversations" not in row:
        return None, ["missing 'conversations'"]
    messages = parse_messages(
        row["conversations"],
        problems,
        key="conversations",
        role_key="from",
        content_key="value",
        role_names=SHAREGPT_ROLES,
    )
    system = _text(row, "system", problems, required=False)
    if messages is None or problems:
        return None, problems
    if system and system.strip():
        messages = [{"role": "system", "content": system, "weight": 0}, *messages]
    return Example(where, messages=messages), problems


def parse_preference(row: dict, where: str) -> Parsed:
    problems: list[str] = []
    for key in ("chosen", "rejected"):
        if key not in row:
            problems.append(f"missing {key!r}")
    if problems:
        return None, problems
    conversational = isinstance(row["chosen"], list) or isinstance(row["rejected"], list)
    if not conversational:
        prompt = _text(row, "prompt", problems)
        chosen, rejected = _text(row, "chosen", problems), _text(row, "rejected", problems)
        return _pair(where, prompt, chosen, rejected, problems)
    chosen = parse_messages(row["chosen"], problems, key="chosen")
    rejected = parse_messages(row["rejected"], problems, key="rejected")
    if chosen is None or rejected is None:
        return None, problems
    if "prompt" in row:
        prompt = parse_messages(row["prompt"], problems, key="prompt", need_assistant=False)
    else:
        # TRL's implicit prompt: the shared beginning of both conversations.
        shared = 0
        while shared < min(len(chosen), len(rejected)) - 1 and chosen[shared] == rejected[shared]:
            shared += 1
        if shared == 0:
            problems.append("no 'prompt', and 'chosen' and 'rejected' share no opening turns to take it from")
            return None, problems
        prompt, chosen, rejected = chosen[:shared], chosen[shared:], rejected[shared:]
    if prompt is None:
        return None, problems
    return _pair(where, prompt, chosen, rejected, problems, parse_tools(row, problems))


def parse_openai_preference(row: dict, where: str) -> Parsed:
    problems: list[str] = []
    source = row.get("input")
    if not isinstance(source, dict) or "messages" not in source:
        problems.append("missing 'input.messages'")
        prompt = tools = None
    else:
        prompt = parse_messages(source["messages"], problems, key="input.messages", need_assistant=False)
        tools = parse_tools(source, problems, where="input.")
    chosen = rejected = None
    for key in ("preferred_output", "non_preferred_output"):
        if key not in row:
            problems.append(f"missing {key!r}")
            continue
        output = parse_messages(row[key], problems, key=key)
        if key == "preferred_output":
            chosen = output
        else:
            rejected = output
    if prompt is None or chosen is None or rejected is None:
        return None, problems
    return _pair(where, prompt, chosen, rejected, problems, tools)


def _pair(
    where: str, prompt: Any, chosen: Any, rejected: Any, problems: list[str], tools: list | None = None
) -> Parsed:
    if problems or prompt is None or chosen is None or rejected is None:
        return None, problems
    if chosen == rejected:
        return None, ["'chosen' is identical to 'rejected': the pair teaches nothing"]
    return Preference(where, prompt, chosen, rejected, tools), problems


@dataclass(frozen=True)
class Format:
    name: str
    kind: str
    """sft or preference: which objectives can use it."""
    parse: Callable[[dict, str], Parsed]
    keys: frozenset[str] = field(default_factory=frozenset)
    """Keys whose presence identifies the format (all must be present)."""


FORMATS = {
    f.name: f
    for f in (
        # Detection order matters: the most specific key sets first.
        Format("openai_preference", "preference", parse_openai_preference, frozenset({"preferred_output"})),
        Format("preference", "preference", parse_preference, frozenset({"chosen", "rejected"})),
        Format("chat", "sft", parse_chat, frozenset({"messages"})),
        Format("sharegpt", "sft", parse_sharegpt, frozenset({"conversations"})),
        Format("alpaca", "sft", parse_alpaca, frozenset({"instruction", "output"})),
        Format("prompt_completion", "sft", parse_prompt_completion, frozenset({"prompt", "completion"})),
        Format("text", "sft", parse_text, frozenset({"text"})),
    )
}


def detect_format(row: Any) -> Format | None:
    """The format whose identifying keys the row has, or None."""
    if not isinstance(row, dict):
        return None
    return next((f for f in FORMATS.values() if f.keys <= row.keys()), None)


def describe_formats() -> str:
    return "; ".join(f"{f.name} ({', '.join(sorted(f.keys))})" for f in FORMATS.values())
