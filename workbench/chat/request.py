"""Chat requests: settings, the chat template, and every check made before a reply streams.

A bad request (an empty message, settings out of range, a prompt that cannot fit the
model's context) raises `ChatError` here, before any token is computed, so a stream never
starts only to hang or fail half-way. Both sides of a comparison get the same rendered
prompt: the template is applied once, with the base model's tokenizer.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from workbench.errors import WorkbenchError

log = logging.getLogger(__name__)

MAX_MESSAGE_CHARS = 8000  # per message; the browser's max_length is not enforced on the server
MAX_MESSAGES = 64  # history turns kept from a client-sent conversation
MAX_NEW_TOKENS = 2048
# Used only when a tokenizer has no chat template; both sides then share this one.
FALLBACK_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)
ROLES = ("system", "user", "assistant")


class ChatError(WorkbenchError):
    """A chat request that cannot be served as given."""


@dataclass(frozen=True)
class SamplingSettings:
    temperature: float = 0.7  # 0 means greedy
    top_p: float = 0.95
    top_k: int = 50  # 0 means no top-k cut
    max_new_tokens: int = 256
    repetition_penalty: float = 1.0  # 1 means none; > 1 discourages tokens already present
    seed: int = 0

    def check(self) -> None:
        """Raise ChatError naming the first value out of range and the range it must be in."""
        rules = [
            (0.0 <= self.temperature <= 5.0, "temperature", self.temperature, "0 (greedy) to 5"),
            (0.0 < self.top_p <= 1.0, "top_p", self.top_p, "above 0 and at most 1"),
            (0 <= self.top_k <= 100_000, "top_k", self.top_k, "0 (off) to 100000"),
            (1 <= self.max_new_tokens <= MAX_NEW_TOKENS, "max_new_tokens", self.max_new_tokens,
             f"1 to {MAX_NEW_TOKENS}"),
            (0.5 <= self.repetition_penalty <= 3.0, "repetition_penalty", self.repetition_penalty,
             "0.5 to 3"),
            (0 <= self.seed < 2**63, "seed", self.seed, "0 to 2**63 - 1"),
        ]
        for ok, name, value, allowed in rules:
            if not ok:
                raise ChatError(f"{name} = {value!r} is out of range; use {allowed}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ChatPrompt:
    text: str  # the rendered prompt, chat template applied; shown to the user on request
    token_ids: list[int]
    max_new_tokens: int  # the request's, reduced to what the context leaves room for
    dropped_messages: int = 0  # oldest history messages left out to fit the context


def normalise_messages(messages: str | Sequence[dict[str, str]]) -> list[dict[str, str]]:
    """A message string or [{role, content}, ...] -> checked messages; the last must be the user's."""
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    out = []
    for i, message in enumerate(list(messages)[-MAX_MESSAGES:]):
        role, content = message.get("role"), message.get("content")
        if role not in ROLES or not isinstance(content, str):
            raise ChatError(f"message {i} needs a role ({', '.join(ROLES)}) and text content; "
                            f"got {message!r:.80}")
        if len(content) > MAX_MESSAGE_CHARS:
            raise ChatError(f"message {i} is {len(content)} characters; the limit is {MAX_MESSAGE_CHARS}: "
                            "shorten it")
        out.append({"role": role, "content": content})
    if not out or out[-1]["role"] != "user" or not out[-1]["content"].strip():
        raise ChatError("the message is empty: type something to send")
    return out


def render(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    """The prompt text for `messages` with the tokenizer's chat template (or the fallback)."""
    from jinja2 import TemplateError  # lazy: a transformers dependency, needed only here

    template = getattr(tokenizer, "chat_template", None) or FALLBACK_TEMPLATE
    try:
        return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                             add_generation_prompt=True)
    except (TemplateError, ValueError, TypeError) as exc:
        raise ChatError(f"the chat template of this model failed on the conversation: {exc}") from exc


def encode(tokenizer: Any, text: str) -> list[int]:
    """Token ids of a rendered prompt; the template already wrote any special tokens it wants."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def prepare(messages: str | Sequence[dict[str, str]], settings: SamplingSettings,
            tokenizers: Sequence[Any], context_lengths: Sequence[int]) -> list[ChatPrompt]:
    """One ChatPrompt per model, rendered with tokenizers[0]'s template (the base, if any).

    History is dropped oldest first until the prompt fits every model's context with room
    for at least one new token; a last message that alone does not fit is a ChatError.
    """
    settings.check()
    convo = normalise_messages(messages)
    dropped = 0
    while True:
        text = render(tokenizers[0], convo)
        ids = [encode(tok, text) for tok in tokenizers]
        over = [(len(i), n) for i, n in zip(ids, context_lengths, strict=True) if len(i) >= n]
        if not over:
            break
        first_kept = next((j for j, m in enumerate(convo) if m["role"] != "system"), 0)
        if len(convo) - first_kept <= 1:
            length, limit = over[0]
            raise ChatError(f"the prompt is {length} tokens and the model's context is {limit}: "
                            "shorten the message")
        del convo[first_kept]
        dropped += 1
    if dropped:
        log.info("dropped %d oldest message(s) to fit the context", dropped)
    return [ChatPrompt(text, i, min(settings.max_new_tokens, n - len(i)), dropped)
            for i, n in zip(ids, context_lengths, strict=True)]
