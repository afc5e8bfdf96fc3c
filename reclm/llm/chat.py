"""Chat-template helpers shared by SFT and every generation backend.

A prompt is either a plain user message (``str``) or a conversation (a list of ``{"role", "content"}``
messages). Our own short system prompt replaces SmolLM2's default one (about 20 tokens less per prompt,
which counts on a CPU). Training examples mask every token outside assistant responses with -100, so the
loss covers responses only, in every assistant turn of a multi-turn dialogue.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Union

SYSTEM_PROMPT = "You write concise profiles."
IGNORE_INDEX = -100

Message = dict[str, str]
Conversation = list[Message]
Prompt = Union[str, Conversation]  # noqa: UP007 - readable alias

# Used when a tokenizer has no chat template (base models such as Gemma 3 base): ChatML without specials.
FALLBACK_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] + ':\\n' + message['content'] + '\\n\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'assistant:\\n' }}{% endif %}"
)


def as_conversation(prompt: Prompt, system: str | None = SYSTEM_PROMPT) -> Conversation:
    """A conversation for ``prompt``: a string becomes one user turn; a system message is added if absent."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else [dict(m) for m in prompt]
    for m in messages:
        if m.get("role") not in ("system", "user", "assistant") or not isinstance(m.get("content"), str):
            raise ValueError(f"bad chat message {m!r}: needs role system|user|assistant and string content")
    if system is not None and (not messages or messages[0]["role"] != "system"):
        messages.insert(0, {"role": "system", "content": system})
    return messages


def render(tokenizer: Any, conversation: Conversation, add_generation_prompt: bool) -> str:
    """The conversation as text through the tokenizer's chat template (or a plain fallback)."""
    template = None if getattr(tokenizer, "chat_template", None) else FALLBACK_TEMPLATE
    return tokenizer.apply_chat_template(
        conversation, tokenize=False, add_generation_prompt=add_generation_prompt, chat_template=template
    )


def prompt_text(tokenizer: Any, prompt: Prompt, system: str | None = SYSTEM_PROMPT) -> str:
    """Text fed to the model for generation: the conversation plus the assistant header."""
    return render(tokenizer, as_conversation(prompt, system), add_generation_prompt=True)


def prompt_ids(tokenizer: Any, prompts: Sequence[Prompt], system: str | None = SYSTEM_PROMPT) -> list[list[int]]:
    """Token ids of each generation prompt (the template already holds any special tokens)."""
    texts = [prompt_text(tokenizer, p, system) for p in prompts]
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


@dataclass
class TrainingExample:
    input_ids: list[int]
    labels: list[int]

    @property
    def n_label_tokens(self) -> int:
        return sum(1 for t in self.labels if t != IGNORE_INDEX)


def assistant_spans(tokenizer: Any, conversation: Conversation) -> tuple[str, list[tuple[int, int]]]:
    """Full text and the character spans of each assistant response (content and end-of-turn marker)."""
    text = render(tokenizer, conversation, add_generation_prompt=False)
    spans = []
    for i, message in enumerate(conversation):
        if message["role"] != "assistant":
            continue
        before = render(tokenizer, conversation[:i], add_generation_prompt=True)
        through = render(tokenizer, conversation[: i + 1], add_generation_prompt=False)
        if not (text.startswith(through) and through.startswith(before)):
            raise ValueError("the chat template does not render conversations prefix by prefix; cannot mask labels")
        spans.append((len(before), len(through.rstrip())))
    if not spans:
        raise ValueError("a training conversation needs at least one assistant message")
    return text, spans


def training_example(tokenizer: Any, conversation: Conversation) -> TrainingExample:
    """Input ids with labels equal to the ids inside assistant responses and -100 everywhere else."""
    text, spans = assistant_spans(tokenizer, conversation)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    labels = []
    for token, (start, end) in zip(encoded["input_ids"], encoded["offset_mapping"]):
        inside = any(s <= start < e for s, e in spans) and end > start
        labels.append(token if inside else IGNORE_INDEX)
    return TrainingExample(list(encoded["input_ids"]), labels)


def pair_conversation(prompt: str, response: str, system: str | None = SYSTEM_PROMPT) -> Conversation:
    """The one-turn dialogue of a teacher record: prompt -> profile."""
    return as_conversation([{"role": "user", "content": prompt}, {"role": "assistant", "content": response}], system)
