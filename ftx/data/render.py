"""From an example to token ids and labels: the tokens a model sees, and which of
them it learns.

A conversation is rendered whole by its chat template (``data.chat_template``,
its text or a ``.jinja`` file; else the tokenizer's; else ftx's
:data:`DEFAULT_CHAT_TEMPLATE`), tools and tool calls included, and the rendering
is tokenized as one text. The ids are therefore exactly
``tokenizer.apply_chat_template(messages, tools=tools, tokenize=True)``: the ids an
inference server builds from the same conversation. Which of them are trained is
decided on the characters of that rendering and carried to tokens by the
tokenizer's offsets; a token is trained when any of its characters is.

An assistant turn's trained characters:

- start where the template's generation prompt ends: the rendering of the turns
  before it with ``add_generation_prompt=True`` is a prefix of the conversation's.
  Where it is not: from where the two part, when only the generation prompt
  differs (a template that opens a thinking block); else where the turn's content
  begins, found by rendering the conversation with two different contents (Mistral
  moves the system message into the last user turn, so earlier turns render
  differently once later ones follow);
- end with the template's end-of-turn token (``<|im_end|>``, ``<|eot_id|>``,
  ``<end_of_turn>``, ``<|end|>``, ``</s>``…: the first added token after the answer
  in a probe conversation), its last occurrence within the turn (an answer quoting
  the token's text is not cut); a template without one ends the turn where its
  content ends. Whitespace
  the template writes after it (ChatML's newline) and what it writes at the end of
  a conversation (Phi-3's EOS) are formatting, not the assistant's.

Messages reach the template as inference servers hand them over (vLLM, SGLang):
tool-call arguments as objects, no content as "".

So an assistant turn of weight 1 trains its content, its tool calls and its end of
turn; headers, system, user and tool turns, and weight-0 turns never (with
``completion_only=False`` everything is trained but weight-0 turns).

Prompt/completion pairs are tokenized as the joined text
``prompt_template.format(prompt=…) + completion``, BOS before and EOS after, the
completion's characters trained. Generation starts from the prompt text tokenized
alone; the two differ only where one token straddles the seam (it holds completion
characters, so it is trained).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ftx.data.formats import TEMPLATE_KEYS, DataError, Example

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

IGNORE_INDEX = -100  # the label value torch's cross-entropy skips

DEFAULT_CHAT_TEMPLATE = (
    # ftx's default for tokenizers without a chat template: plain-text role headers
    # (no new tokens, so any vocabulary works), each assistant turn closed by EOS so
    # generation stops where a turn ends. Tools are listed as JSON under "### Tools:",
    # and an assistant's tool calls follow its content as <tool_call>{json}</tool_call>.
    "{%- if bos_token and bos_token != eos_token %}{{ bos_token }}{% endif %}"
    "{%- if tools %}### Tools:\n{% for tool in tools %}{{ tool | tojson }}\n{% endfor %}\n{% endif %}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}### Assistant:\n{{ message['content'] or '' }}"
    "{%- for call in message['tool_calls'] or [] %}"
    "{%- if loop.first and message['content'] %}\n{% endif %}"
    "<tool_call>{{ {'name': call['function']['name'], "
    "'arguments': call['function']['arguments']} | tojson }}</tool_call>"
    "{%- endfor %}{{ eos_token }}"
    "{%- else %}### {{ message['role'] | capitalize }}:\n{{ message['content'] }}\n\n{% endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}### Assistant:\n{% endif %}"
)

# Two private-use characters no text holds: renderings that differ only in them
# part exactly where a message's content begins.
PROBES = ("\ue000", "\ue001")


class TemplateError(DataError):
    """A chat template that refused a conversation, or whose rendering ftx cannot
    align with the conversation's turns (the message names the template)."""


def read_chat_template(value: str | None) -> str | None:
    """``data.chat_template``: the template's text, or the path of a ``.jinja`` file
    holding it (a value without ``{`` ending in .jinja/.j2, or naming a file)."""
    if value is None or "{" in value:
        return value
    path = Path(value).expanduser()
    if path.is_file():
        return path.read_text(encoding="utf-8-sig")
    if path.suffix in (".jinja", ".j2"):
        raise DataError(
            f"data.chat_template={value}: no such file (relative paths are read from {Path.cwd()}); "
            "give the path of a .jinja file, or the template's text."
        )
    raise DataError(
        f"data.chat_template={value!r} is neither a file nor a Jinja template (no {{% %}} or {{{{ }}}} in it)."
    )


def template_message(message: dict[str, Any]) -> dict[str, Any]:
    """A normalised message as inference servers hand it to chat templates (vLLM,
    SGLang): role, content ("" on an assistant turn that only calls tools), tool
    calls with their arguments as objects, tool_call_id, name."""
    out = {"role": message["role"], "content": message["content"] or ""}
    return out | {key: message[key] for key in TEMPLATE_KEYS if message.get(key) is not None}


class Renderer:
    """Encodes examples for one tokenizer, prompt template and chat template."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        prompt_template: str,
        chat_template: str | None,
        template_kwargs: dict[str, Any] | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.prompt_template = prompt_template
        self.template_kwargs = dict(template_kwargs or {})
        """Extra variables the template reads (data.chat_template_kwargs)."""
        own = tokenizer.chat_template
        # data.chat_template may also name one of a tokenizer's templates ("tool_use").
        given = own[chat_template] if isinstance(own, dict) and chat_template in own else None
        given = given if given is not None else read_chat_template(chat_template)
        # A tokenizer's own templates may be a dict of named ones (a "tool_use" variant):
        # transformers picks among them, so only a given or default template is passed.
        self._template = given if given is not None else (None if own else DEFAULT_CHAT_TEMPLATE)
        self.chat_template = given if given is not None else (own or DEFAULT_CHAT_TEMPLATE)
        """The template's text (a tokenizer's named templates as their dict's string)."""
        if given is not None:
            self.template_name = (
                f"data.chat_template={chat_template}" if "{" not in chat_template else "data.chat_template"
            )
        else:
            self.template_name = "the tokenizer's chat template" if own else "ftx's default chat template"
        self._added = set(tokenizer.added_tokens_decoder) | set(tokenizer.all_special_ids)
        self._end_of_turn: tuple[str, int] | tuple[()] | None = None

    # ------------------------------------------------------------------ training

    def encode(self, example: Example, completion_only: bool) -> tuple[list[int], list[int]]:
        """(input_ids, labels): labels are IGNORE_INDEX on every untrained token.

        Trained: assistant turns of weight 1 (or the completion and EOS); with
        ``completion_only=False`` also prompts, headers, system, user and tool turns,
        but never an assistant turn of weight 0. Raises :class:`TemplateError`.
        """
        if example.is_chat:
            text, ids, offsets, spans = self.chat_spans(example)
            return ids, _labels(ids, offsets, spans, len(text), completion_only)
        prompt = "" if example.prompt is None else self.prompt_template.format(prompt=example.prompt)
        text = prompt + example.completion
        ids, offsets = self._encode(text)
        labels = _labels(ids, offsets, [(len(prompt), len(text), 1)], len(text), completion_only)
        bos, eos = self._bos(), self._eos()
        return bos + ids + eos, [IGNORE_INDEX] * len(bos) + labels + eos

    def chat_spans(self, example: Example) -> tuple[str, list[int], list[tuple[int, int]], list[tuple[int, int, int]]]:
        """The conversation's rendering, its ids and their character offsets, and
        (start, end, weight) of each assistant turn's trained characters."""
        messages = [template_message(m) for m in example.messages]
        self._check_tool_support(example)
        text = self.render(messages, tools=example.tools)
        ids, offsets = self._encode(text)
        spans: list[tuple[int, int, int]] = []
        for index, message in enumerate(example.messages):
            if message["role"] != "assistant":
                continue
            start = self._turn_start(text, messages, example.tools, index)
            end = self._turn_end(text, messages, example.tools, index, start)
            if spans and start < spans[-1][1] or end <= start:
                raise TemplateError(
                    f"{self.template_name} renders messages[{index}] (an assistant turn) where ftx cannot find it "
                    f"in the conversation's rendering; try another template (data.chat_template)"
                )
            for call in message.get("tool_calls", ()):
                if call["function"]["name"] not in text[start:end]:
                    raise TemplateError(self._no_tool_calls(index, call["function"]["name"]))
            if message.get("tool_calls") and message["content"] and message["content"].strip() not in text[start:end]:
                log.warning(
                    "%s: %s renders messages[%d]'s tool calls without its text, as an inference server would "
                    "show it: the text is not trained",
                    example.source,
                    self.template_name,
                    index,
                )
            spans.append((start, end, message["weight"]))
        missing = [t["function"]["name"] for t in example.tools or () if t["function"]["name"] not in text]
        if missing:
            raise TemplateError(self._no_tools(missing))
        return text, ids, offsets, spans

    def _check_tool_support(self, example: Example) -> None:
        """Tools and tool calls need a template that reads them (checked before
        rendering: a template that does not may also fail on a turn without content)."""
        source = str(self.chat_template)
        for index, message in enumerate(example.messages):
            if message.get("tool_calls") and "tool_calls" not in source:
                raise TemplateError(self._no_tool_calls(index, message["tool_calls"][0]["function"]["name"]))
        if example.tools and "tools" not in source:
            raise TemplateError(self._no_tools([t["function"]["name"] for t in example.tools]))

    def _no_tool_calls(self, index: int, name: str) -> str:
        return (
            f"messages[{index}].tool_calls: {self.template_name} does not render tool calls, so the call to {name!r} "
            "would not be trained (the model would learn to answer instead of calling); set data.chat_template "
            "to a tool-aware template"
        )

    def _no_tools(self, names: list[str]) -> str:
        return (
            f"'tools': {self.template_name} does not render the conversation's tools ({', '.join(names)}); "
            "set data.chat_template to a tool-aware template"
        )

    def _turn_start(self, text: str, messages: list[dict], tools: list | None, index: int) -> int:
        """Where assistant turn ``index``'s trained characters begin in ``text``:
        after the generation prompt, else where the turn's content begins."""
        if index:
            prompt = self.render(messages[:index], tools=tools, generation_prompt=True)
            if text.startswith(prompt):
                return len(prompt)
            if text.startswith(self.render(messages[:index], tools=tools)):
                # A generation prompt that writes more than the turn's header (a
                # thinking block the answer does not carry): trained from where they part.
                return _common_prefix(text, prompt)
        # The turns before render differently once this one follows (Mistral moves
        # the system message into the last user turn): where the content begins.
        content = self._content_span(text, messages, tools, index)
        if content is None:
            raise TemplateError(
                f"{self.template_name} renders the turns before messages[{index}] differently in the whole "
                "conversation than as the prompt a model continues, so ftx cannot tell which tokens are that "
                "turn's; try another template (data.chat_template)"
            )
        return content[0]

    def _turn_end(self, text: str, messages: list[dict], tools: list | None, index: int, start: int) -> int:
        """Where assistant turn ``index``'s trained characters end: after the last
        end-of-turn token within the turn (content that quotes the token's text does
        not end it); for a template without one, where the turn's content ends."""
        own = self.render(messages[: index + 1], tools=tools)  # the turn as the conversation's last
        if text.startswith(own):
            limit = len(own)
        else:  # rendered differently once later turns follow: bounded by the next message's content
            following = next((i for i in range(index + 1, len(messages)) if messages[i]["content"]), None)
            span = None if following is None else self._content_span(text, messages, tools, following)
            limit = len(text) if span is None else span[0]
        marker = self.end_of_turn()
        found = text.rfind(marker[0], start, limit) if marker else -1
        if found >= 0:
            return found + len(marker[0])
        content = self._content_span(text, messages, tools, index)
        if content is not None:
            return content[1]
        raise TemplateError(
            f"{self.template_name} closes assistant turns with no end-of-turn token ftx can find after "
            f"messages[{index}]; try another template (data.chat_template)"
        )

    def _content_span(self, text: str, messages: list[dict], tools: list | None, index: int) -> tuple[int, int] | None:
        """(start, end) of message ``index``'s content in ``text``: where renderings of
        the conversation with two different contents in its place part and meet
        again; None where they do not match ``text`` around it."""
        if not messages[index]["content"]:
            return None
        a, b = (
            self.render([*messages[:index], messages[index] | {"content": probe}, *messages[index + 1 :]], tools)
            for probe in PROBES
        )
        before = _common_prefix(a, b)
        after = _common_prefix(a[::-1], b[::-1])
        if not (text.startswith(a[:before]) and text.endswith(a[len(a) - after :])):
            return None
        return before, len(text) - after

    def end_of_turn(self) -> tuple[str, int] | None:
        """(text, id) of the token that closes an assistant turn in this template
        (``<|im_end|>``, ``<|eot_id|>``, ``<end_of_turn>``, ``<|end|>``, ``</s>``): the
        first added token after the answer in a probe conversation."""
        if self._end_of_turn is None:
            self._end_of_turn = ()
            probe = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": PROBES[0]}]
            try:
                text = self.render(probe)
            except TemplateError:  # a template with demands of its own (a system turn first…)
                log.warning("%s cannot render a probe conversation: no end-of-turn token is known", self.template_name)
                return None
            after = text.find(PROBES[0]) + len(PROBES[0])
            ids, offsets = self._encode(text)
            for token, (begin, end) in zip(ids, offsets, strict=True):
                if begin >= after and token in self._added:
                    self._end_of_turn = (text[begin:end], token)
                    break
        return self._end_of_turn or None

    # ---------------------------------------------------------------- generation

    def encode_prompt(self, example: Example) -> list[int]:
        """Token ids generation continues from: the conversation before its last
        answer with the generation prompt, or BOS and the templated prompt."""
        if example.is_chat:
            self._check_tool_support(example)
            messages = [template_message(m) for m in example.prompt_messages()]
            return self._encode(self.render(messages, tools=example.tools, generation_prompt=True))[0]
        return self._bos() + self._encode(self.prompt_template.format(prompt=example.prompt or ""))[0]

    def stop_ids(self) -> list[int]:
        """Tokens that end an assistant turn: the tokenizer's EOS and the template's
        end-of-turn token (Gemma's ``<end_of_turn>``, Llama 3's ``<|eot_id|>``)."""
        stops = self._eos()
        marker = self.end_of_turn() if getattr(self.tokenizer, "is_fast", False) else None
        return stops + [marker[1]] if marker and marker[1] not in stops else stops

    def user_example(self, text: str, chat: bool) -> Example:
        """An example whose prompt is ``text`` (for ``ftx generate``)."""
        if chat:
            return Example("prompt", messages=[{"role": "user", "content": text, "weight": 0}])
        return Example("prompt", prompt=text, completion="")

    # ------------------------------------------------------------------- helpers

    def render(self, messages: list[dict[str, Any]], tools: list | None = None, generation_prompt: bool = False) -> str:
        """The template's text for ``messages`` (as :func:`template_message` gives
        them); a template that raises refuses the conversation."""
        try:
            return self.tokenizer.apply_chat_template(
                messages,
                tools=tools,
                chat_template=self._template,
                tokenize=False,
                add_generation_prompt=generation_prompt,
                **self.template_kwargs,
            )
        except Exception as error:  # jinja2's TemplateError (raise_exception), or the template's own bug
            reason = str(error) if type(error).__module__.startswith("jinja2") else f"{type(error).__name__}: {error}"
            raise TemplateError(f"the chat template ({self.template_name}) refused it: {reason}") from None

    def _encode(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Ids and character offsets of ``text``. Special tokens written in it (a
        template's <|im_end|>) are parsed as such; no BOS/EOS added: templates place them."""
        if not getattr(self.tokenizer, "is_fast", False):
            raise DataError(
                f"{type(self.tokenizer).__name__} is a slow tokenizer: ftx needs a fast one (character offsets) "
                "to mark trained tokens; load the model's tokenizer.json"
            )
        encoding = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        return encoding["input_ids"], [tuple(o) for o in encoding["offset_mapping"]]

    def _bos(self) -> list[int]:
        """BOS where the tokenizer has its own (not when it doubles as EOS, as in
        GPT-2); an encoder's CLS (a reward model on BERT-like backbones pools it)."""
        bos, eos, cls = self.tokenizer.bos_token_id, self.tokenizer.eos_token_id, self.tokenizer.cls_token_id
        if bos is not None and bos != eos:
            return [bos]
        return [cls] if bos is None and cls is not None else []

    def _eos(self) -> list[int]:
        """EOS, or an encoder's SEP."""
        eos = self.tokenizer.eos_token_id
        eos = eos if eos is not None else self.tokenizer.sep_token_id
        return [eos] if eos is not None else []


def _labels(
    ids: list[int],
    offsets: list[tuple[int, int]],
    spans: list[tuple[int, int, int]],
    length: int,
    completion_only: bool,
) -> list[int]:
    """Each token's label: itself where trained, else IGNORE_INDEX. A token is
    trained when one of its characters is in a weight-1 span; with
    ``completion_only=False``, unless one is in a weight-0 span and none in a weight-1 one."""
    marks = bytearray(length + 1)  # 0 context, 1 trained turn, 2 untrained turn
    for start, end, weight in spans:
        marks[start:end] = (b"\x01" if weight else b"\x02") * (end - start)
    labels = []
    for token, (start, end) in zip(ids, offsets, strict=True):
        chars = marks[start : max(end, start + 1)]
        trained = 1 in chars if completion_only else 1 in chars or 2 not in chars
        labels.append(token if trained else IGNORE_INDEX)
    return labels


def _common_prefix(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n
