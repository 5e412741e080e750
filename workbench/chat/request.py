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
# A prompt's tokens at most, whatever the context: CPU prefill time and attention memory grow
# with them, and the chat lane is shared (64 messages of 8,000 characters once took 87 s).
MAX_PROMPT_TOKENS = 4096
MAX_PROMPT_CHARS = 32 * MAX_PROMPT_TOKENS  # no tokenizer packs more than this into the cap
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
    from workbench.models import TemplateFailure, render_chat

    try:
        return render_chat(tokenizer, messages)
    except TemplateFailure as exc:
        raise ChatError(str(exc)) from exc


def encode(tokenizer: Any, text: str) -> list[int]:
    """Token ids of a rendered prompt; the template already wrote any special tokens it wants."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def prepare(messages: str | Sequence[dict[str, str]], settings: SamplingSettings,
            tokenizers: Sequence[Any], context_lengths: Sequence[int]) -> list[ChatPrompt]:
    """One ChatPrompt per model, rendered with tokenizers[0]'s template (the base, if any).

    The newest history that fits is kept: the prompt must leave every model's context room
    for at least one new token and stay within MAX_PROMPT_TOKENS (prefill time and memory
    grow with it, and one chat lane serves everyone). System messages are always kept; a
    last message that alone does not fit is a ChatError. Finding the cut renders the
    conversation O(log n) times, never once per dropped message.
    """
    settings.check()
    convo = normalise_messages(messages)
    lead = next(i for i, m in enumerate(convo) if m["role"] != "system")  # the last is the user's
    system, turns = convo[:lead], convo[lead:]
    limits = [min(n - 1, MAX_PROMPT_TOKENS) for n in context_lengths]

    def attempt(keep: int) -> tuple[str, list[list[int]]] | None:
        """The prompt with the newest `keep` turns, or None when it does not fit."""
        text = render(tokenizers[0], system + turns[-keep:])
        ids = [encode(tok, text) for tok in tokenizers]
        return (text, ids) if all(len(i) <= n for i, n in zip(ids, limits, strict=True)) else None

    # No tokenizer averages 32 characters a token over a conversation, so older turns past
    # MAX_PROMPT_CHARS cannot fit: leave them out before any tokenising.
    keep = len(turns)
    while keep > 1 and sum(len(m["content"]) for m in turns[-keep:]) > MAX_PROMPT_CHARS:
        keep -= 1
    found = attempt(keep)
    if found is None:
        low, high = 1, keep - 1  # the largest keep in [low, high] that fits, if any
        while low <= high:
            middle = (low + high) // 2
            tried = attempt(middle)
            if tried is None:
                high = middle - 1
            else:
                found, keep, low = tried, middle, middle + 1
        if found is None:
            text = render(tokenizers[0], system + turns[-1:])
            length = max(len(encode(tok, text)) for tok in tokenizers)
            raise ChatError(f"the prompt is {length} tokens and at most {min(limits)} fit here (the "
                            f"model's context is {min(context_lengths)} tokens, a prompt at most "
                            f"{MAX_PROMPT_TOKENS}): shorten the message or the system prompt")
    text, ids = found
    dropped = len(turns) - keep
    if dropped:
        log.info("left out the %d oldest message(s) to fit the context", dropped)
    return [ChatPrompt(text, i, min(settings.max_new_tokens, n - len(i)), dropped)
            for i, n in zip(ids, context_lengths, strict=True)]
