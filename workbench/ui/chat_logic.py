"""The Chat tab's handlers as plain functions, over a backend that tests replace with canned replies.

Each pane (base, MoE) streams in its own event, so either can be stopped alone; a stop sets
the pane's CancelToken, which the generation loop checks between tokens (and between layers
of a long prefill). Tokens are kept per (session, pane) in a small table, never models.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from workbench.chat import SamplingSettings
from workbench.errors import Cancelled, WorkbenchError
from workbench.progress import CancelToken
from workbench.recipe import parse_recipe
from workbench.ui import build_logic, shared

SIDES = ("base", "moe")
RECIPE_COPY = "mergekit_moe_config.yml"


class Stream(Protocol):
    """What a backend returns: iterate for text deltas; `result` is set when iteration ends."""

    result: Any

    def __iter__(self) -> Iterator[str]: ...


class Backend(Protocol):
    def open(self, ref: str, base_ref: str, messages: list[dict[str, str]], settings: SamplingSettings, *,
             trace: bool, cancel: CancelToken, token: str | None, device: str) -> Stream: ...

    def prompt_ids(self, stream: Stream) -> list[int]: ...


class EngineBackend:
    """The real thing: the engine's registry, the shared chat template, streaming generation."""

    def open(self, ref: str, base_ref: str, messages: list[dict[str, str]], settings: SamplingSettings, *,
             trace: bool, cancel: CancelToken, token: str | None, device: str) -> Stream:
        from workbench.chat import ReplyStream, prepare, registry

        models = registry()
        entry = models.get(ref, device=device, token=token)
        base = models.get(base_ref, device=device, token=token) if base_ref != ref else entry
        # The base's template renders the prompt for both sides: the comparison is like for like.
        prompts = prepare(messages, settings, [base.tokenizer, entry.tokenizer],
                          [base.context_length, entry.context_length])
        return ReplyStream(entry, prompts[1], settings, cancel=cancel, trace=trace)

    def prompt_ids(self, stream: Stream) -> list[int]:
        return list(stream.prompt.token_ids)


_backend: Backend = EngineBackend()
# Turns a pane keeps: every streamed token sends the pane's whole history back to the
# browser, so a crafted history of 10,000 messages cost seconds per token.
MAX_SHOWN = 200
MIN_SHOWN_WAIT = 0.5  # seconds a reply waited (other users, the other pane) before it is mentioned
NO_MOE = ("No MoE chosen yet: build one on the Build tab, then pick it in the MoE box above. "
          "The base model answers meanwhile.")
DEFAULT_BASE = "demo:smollm2-135m-instruct"  # the Base box's value before any MoE is chosen


def backend() -> Backend:
    return _backend


def use_backend(new: Backend) -> Backend:
    """Swap the backend (tests use a fake with canned replies); returns the previous one."""
    global _backend
    old, _backend = _backend, new
    return old


# ---- stop buttons ------------------------------------------------------------------------

_cancels: dict[tuple[str, str], CancelToken] = {}
_cancels_lock = threading.Lock()


def start_token(session: str, side: str) -> CancelToken:
    token = CancelToken()
    with _cancels_lock:
        _cancels[(session, side)] = token
    return token


def stop(session: str, sides: tuple[str, ...] = SIDES) -> int:
    """Stop the session's running replies on `sides`; returns how many were running."""
    with _cancels_lock:
        found = [_cancels.pop((session, side), None) for side in sides]
    for token in found:
        if token is not None:
            token.cancel()
    return sum(token is not None for token in found)


def _release(session: str, side: str, token: CancelToken) -> None:
    with _cancels_lock:
        if _cancels.get((session, side)) is token:
            del _cancels[(session, side)]


# ---- one pane's reply ----------------------------------------------------------------------


@dataclass
class PaneUpdate:
    history: list[dict[str, str]]
    stats: str
    last: dict[str, Any] | None = None  # MoE pane, at the end: what the Routing tab needs


def base_of(moe_folder: str) -> str:
    """The base model a built MoE names in its recipe copy ('' when it has none)."""
    if not moe_folder or not (Path(moe_folder) / RECIPE_COPY).is_file():
        return ""
    path = Path(moe_folder) / RECIPE_COPY
    recipe, _ = parse_recipe(path.read_text(encoding="utf-8"))
    return recipe.base_model if recipe is not None else ""


def conversation(system: str, history: list[Any]) -> list[dict[str, str]]:
    """What the model reads: the system prompt, then the pane's own turns."""
    turns = shared.chat_messages(history)
    return ([{"role": "system", "content": system.strip()}] if system and system.strip() else []) + turns


def reply(side: str, session: str, history: list[Any], moe: str, base: str, system: str,
          settings: SamplingSettings, *, token: str | None = None, device: str = "auto",
          session_builds: list[str] | None = None, sent_at: float | None = None) -> Iterator[PaneUpdate]:
    """Stream one pane's answer to the last user message in `history`.

    With `session_builds` (the handler passes them) the MoE folder, which arrives from the
    browser, must be one this session may use. `sent_at` (time.time() when the user sent the
    message) lets the stats say how long the reply waited before it started.
    """
    waited = max(0.0, time.time() - sent_at) if sent_at else 0.0
    if not moe and side == "moe":
        yield PaneUpdate(shared.chat_messages(history)[-MAX_SHOWN:], NO_MOE)
        return
    if moe and session_builds is not None:
        build_logic.check_build(moe, session_builds)
    base = (base or "").strip() or base_of(moe)
    if not base:
        raise WorkbenchError("this MoE names no base model; type the base model to compare with")
    if base != base_of(moe):  # typed in the Base box (the MoE's own base came with the build)
        shared.check_model_ref(base, "the base model")
    history = shared.chat_messages(history)[-MAX_SHOWN:]
    if not history or history[-1]["role"] != "user":
        return
    cancel = start_token(session, side)
    try:
        stream = backend().open(moe if side == "moe" else base, base, conversation(system, history), settings,
                                trace=side == "moe", cancel=cancel, token=token, device=device)
        history = [*history, {"role": "assistant", "content": ""}]
        try:
            for delta in stream:
                history[-1]["content"] += delta
                yield PaneUpdate(history, "streaming…")
        except Cancelled:
            history[-1]["content"] += " …(stopped)"
        result = stream.result
        last = None
        if side == "moe" and getattr(result, "trace", None) is not None:
            last = {"trace": result.trace, "moe": moe, "base": base,
                    "prompt_ids": backend().prompt_ids(stream), "reply_ids": list(result.token_ids)}
        dropped = getattr(stream.prompt, "dropped_messages", 0)
        left_out = f" · the {dropped} oldest messages were left out to fit the context" if dropped else ""
        queued = f"queued {waited:.1f} s · " if waited >= MIN_SHOWN_WAIT else ""
        yield PaneUpdate(history, queued + stats_line(result.stats) + left_out, last)
    finally:
        _release(session, side, cancel)


def stats_line(stats: Any) -> str:
    data = stats.to_dict() if hasattr(stats, "to_dict") else dict(stats)
    return (f"{data['time_to_first_token_s']:.2f} s to first token · {data['tokens_per_s']:.1f} tokens/s · "
            f"{data['new_tokens']} tokens · {data['finish_reason']}")


def add_user(message: Any, base_history: list[Any], moe_history: list[Any]) -> tuple[list, list]:
    """Append the user's message to both panes (one input, two conversations)."""
    text = shared.message_text(message).strip()
    if not text:
        raise WorkbenchError("the message is empty: type something to send")
    turn = {"role": "user", "content": text}
    return ([*shared.chat_messages(base_history)[-MAX_SHOWN + 1:], turn],
            [*shared.chat_messages(moe_history)[-MAX_SHOWN + 1:], turn])


def drop_last_reply(history: list[Any]) -> list[dict[str, str]]:
    """The history without its last assistant turn, ready to answer the same message again."""
    turns = shared.chat_messages(history)
    while turns and turns[-1]["role"] == "assistant":
        turns.pop()
    return turns
