"""From an example to token ids and labels: the text a model sees, and which of
its tokens it learns.

Conversations are rendered with the tokenizer's chat template (transformers'
``apply_chat_template``); a tokenizer without one gets :data:`DEFAULT_CHAT_TEMPLATE`
(or ``data.chat_template``). Prompt/completion pairs go through
``data.prompt_template``. Either way the rendering is cut into segments, each
tokenized on its own and marked trained or not, so that the prompt tokens a model
trains on are exactly the tokens generation later starts from.

A chat template is cut by rendering growing prefixes of the conversation: the
text added by each turn is that turn's segment, and for an assistant turn the
generation prompt (``add_generation_prompt=True``) is split off as untrained
context. This needs templates that render earlier turns the same way whatever
follows; templates that rewrite history (dropping earlier reasoning, say) are
refused with a message naming ``data.chat_template``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ftx.data.formats import DataError, Example

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100  # the label value torch's cross-entropy skips

DEFAULT_CHAT_TEMPLATE = (
    # ftx's default for tokenizers without a chat template: plain-text role headers
    # (no new tokens, so any vocabulary works), each assistant turn closed by EOS so
    # generation stops where a turn ends.
    "{%- if bos_token and bos_token != eos_token %}{{ bos_token }}{% endif %}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}### Assistant:\n{{ message['content'] }}{{ eos_token }}"
    "{%- else %}### {{ message['role'] | capitalize }}:\n{{ message['content'] }}\n\n{% endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}### Assistant:\n{% endif %}"
)


class TemplateError(DataError):
    """A chat template that cannot be cut into per-turn segments."""


class Renderer:
    """Encodes examples for one tokenizer, prompt template and chat template."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, prompt_template: str, chat_template: str | None) -> None:
        self.tokenizer = tokenizer
        self.prompt_template = prompt_template
        self.chat_template = chat_template or tokenizer.chat_template or DEFAULT_CHAT_TEMPLATE

    # ------------------------------------------------------------------ training

    def encode(self, example: Example, completion_only: bool) -> tuple[list[int], list[int]]:
        """(input_ids, labels): labels are IGNORE_INDEX on every untrained token.

        Trained: assistant turns of weight 1 (or the completion); with
        ``completion_only=False`` also prompts, system and user turns, but never an
        assistant turn of weight 0.
        """
        ids: list[int] = []
        labels: list[int] = []
        for segment, trained, context in self.segments(example):
            segment_ids = self._tokens(segment)
            ids += segment_ids
            learn = trained or (context and not completion_only)
            labels += segment_ids if learn else [IGNORE_INDEX] * len(segment_ids)
        return ids, labels

    def segments(self, example: Example) -> list[tuple[str | list[int], bool, bool]]:
        """(text or token ids, trained, is_context) in order; is_context marks what
        ``completion_only=False`` also trains (prompts, system and user turns)."""
        if example.is_chat:
            return self._chat_segments(example.messages)
        eos = self._eos()
        if example.prompt is None:  # plain text: all of it is the "completion"
            return [(self._bos(), False, True), (example.completion, True, False), (eos, True, False)]
        return [
            (self._bos(), False, True),
            (self.prompt_template.format(prompt=example.prompt), False, True),
            (example.completion, True, False),
            (eos, True, False),
        ]

    def _chat_segments(self, messages: list[dict[str, Any]]) -> list[tuple[str, bool, bool]]:
        segments, rendered = [], ""

        def cut(text: str, trained: bool, context: bool) -> None:
            nonlocal rendered
            if not text.startswith(rendered):
                raise TemplateError(
                    "the chat template renders earlier turns differently once later turns are added, so "
                    "ftx cannot tell which tokens belong to which turn. Set data.chat_template to a template "
                    "that renders turns independently (null = ftx's default when the tokenizer has none)."
                )
            segments.append((text[len(rendered) :], trained, context))
            rendered = text

        for index, message in enumerate(messages):
            if message["role"] == "assistant":
                cut(self.render(messages[:index], generation_prompt=True), False, True)
                cut(self.render(messages[: index + 1]), bool(message["weight"]), False)
            else:
                cut(self.render(messages[: index + 1]), False, True)
        return [s for s in segments if s[0]]

    # ---------------------------------------------------------------- generation

    def encode_prompt(self, example: Example) -> list[int]:
        """Token ids generation continues from: the same tokens training saw
        before the (last) answer."""
        if example.is_chat:
            return self._tokens(self.render(example.prompt_messages(), generation_prompt=True))
        return self._bos() + self._tokens(self.prompt_template.format(prompt=example.prompt or ""))

    def user_example(self, text: str, chat: bool) -> Example:
        """An example whose prompt is ``text`` (for ``ftx generate``)."""
        if chat:
            return Example("prompt", messages=[{"role": "user", "content": text, "weight": 0}])
        return Example("prompt", prompt=text, completion="")

    # ------------------------------------------------------------------- helpers

    def render(self, messages: list[dict[str, Any]], generation_prompt: bool = False) -> str:
        turns = [{"role": m["role"], "content": m["content"]} for m in messages]
        return self.tokenizer.apply_chat_template(
            turns, chat_template=self.chat_template, tokenize=False, add_generation_prompt=generation_prompt
        )

    def _tokens(self, segment: str | list[int]) -> list[int]:
        if isinstance(segment, list):
            return segment
        # Special tokens written in the text (a template's <|im_end|>, say) are
        # parsed as such; no BOS/EOS added here: templates and segments place them.
        return self.tokenizer(segment, add_special_tokens=False)["input_ids"]

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
