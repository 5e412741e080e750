"""The Chat tab's handlers as plain functions, over a backend that tests replace with canned replies.

Each pane (base, MoE, and the MoE steered by the Interventions panel) streams in its own
event, so any can be stopped alone; a stop sets the pane's CancelToken, which the generation
loop checks between tokens (and between layers of a long prefill). Tokens are kept per
(session, pane) in a small table, never models. The steered pane answers the same message
with the same seed as the MoE pane, and each of its replies starts with the line saying what
it ran under; that line is left out of what the model reads next.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from workbench.chat import SamplingSettings
from workbench.errors import Cancelled, WorkbenchError
from workbench.progress import CancelToken
from workbench.recipe import Recipe, parse_recipe
from workbench.ui import build_logic, shared, steer_logic

SIDES = ("base", "moe", "steered")
RECIPE_COPY = "mergekit_moe_config.yml"
LABEL = "⚙ *under: {}*\n\n"  # the first line of every steered reply
_LABEL_LINE = re.compile(r"^⚙ \*under: [^\n]*\*\n\n")


class Stream(Protocol):
    """What a backend returns: iterate for text deltas; `result` is set when iteration ends."""

    result: Any

    def __iter__(self) -> Iterator[str]: ...


class Backend(Protocol):
    def open(self, ref: str, base_ref: str, messages: list[dict[str, str]], settings: SamplingSettings, *,
             trace: bool, cancel: CancelToken, token: str | None, device: str,
             steer: dict[str, Any] | None = None) -> Stream: ...

    def prompt_ids(self, stream: Stream) -> list[int]: ...


class EngineBackend:
    """The real thing: the engine's registry, the shared chat template, streaming generation."""

    def open(self, ref: str, base_ref: str, messages: list[dict[str, str]], settings: SamplingSettings, *,
             trace: bool, cancel: CancelToken, token: str | None, device: str,
             steer: dict[str, Any] | None = None) -> Stream:
        """`steer` ({"spec", "yaml"}): the reply runs under the spec's intervention, its routers
        computed from the YAML when the spec asks for the recipe's."""
        from workbench.chat import ReplyStream, prepare, registry

        models = registry()
        entry = models.get(ref, device=device, token=token)
        base = models.get(base_ref, device=device, token=token) if base_ref != ref else entry
        # The base's template renders the prompt for both sides: the comparison is like for like.
        prompts = prepare(messages, settings, [base.tokenizer, entry.tokenizer],
                          [base.context_length, entry.context_length])
        intervention, notes, seconds = None, [], None
        if steer is not None:
            intervention, notes, seconds = steer_logic.resolve(steer["spec"], steer.get("yaml", ""), entry,
                                                               token=token, device=device, cancel=cancel)
        stream = ReplyStream(entry, prompts[1], settings, cancel=cancel, trace=trace,
                             intervention=intervention)
        stream.notes, stream.setup_s = notes, seconds
        return stream

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
# When each (session, side) was last stopped with no reply running: a reply still waiting in the
# queue then, for a message sent before, starts stopped instead of running to its length.
_stopped_at: dict[tuple[str, str], float] = {}
_cancels_lock = threading.Lock()
MAX_STOPPED = 4096  # sessions remembered; the oldest go first


def start_token(session: str, side: str, sent_at: float | None = None) -> CancelToken:
    """The reply's stop token: already cancelled when Stop was pressed after its message was sent
    and before it started."""
    token = CancelToken()
    with _cancels_lock:
        stopped = _stopped_at.pop((session, side), None)
        _cancels[(session, side)] = token
    if stopped is not None and sent_at is not None and stopped >= sent_at:
        token.cancel()
    return token


def stop(session: str, sides: tuple[str, ...] = SIDES) -> int:
    """Stop the session's replies on `sides`, running or still queued; returns how many were running."""
    now = time.time()
    with _cancels_lock:
        found = [_cancels.pop((session, side), None) for side in sides]
        for side, token in zip(sides, found, strict=True):
            if token is None:
                _stopped_at[(session, side)] = now
        while len(_stopped_at) > MAX_STOPPED:
            del _stopped_at[next(iter(_stopped_at))]
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
    last: dict[str, Any] | None = None  # MoE and steered panes, at the end: what the Routing tab needs


def base_of(moe_folder: str) -> str:
    """The base model a built MoE names in its recipe copy ('' when it has none)."""
    recipe = _recipe_of(moe_folder)
    return recipe.base_model if recipe is not None else ""


def _recipe_of(moe_folder: str) -> Recipe | None:
    """A built MoE's recipe copy, parsed (None when it has none)."""
    if not moe_folder or not (Path(moe_folder) / RECIPE_COPY).is_file():
        return None
    recipe, _ = parse_recipe((Path(moe_folder) / RECIPE_COPY).read_text(encoding="utf-8"))
    return recipe


MAX_TRY = 6


def try_prompts(moe_folder: str, yaml_text: str, shipped: list[str]) -> list[str]:
    """The Chat tab's "Try" prompts: one per expert of the chosen MoE's recipe (its probe prompt,
    else its first positive prompt), else of the Design tab's recipe; `shipped` when neither has
    any (the demo's themes are not every recipe's)."""
    recipe = _recipe_of(moe_folder) if moe_folder else parse_recipe(yaml_text or "")[0]
    found = []
    for expert in recipe.experts if recipe is not None else []:
        given = (expert.probe_prompts or []) + (expert.positive_prompts or [])
        found += [p.strip() for p in given if p.strip()][:1]
    return list(dict.fromkeys(found))[:MAX_TRY] or shipped


def conversation(system: str, history: list[Any]) -> list[dict[str, str]]:
    """What the model reads: the system prompt, then the pane's own turns (a steered reply's
    label line left out: the model never wrote it)."""
    turns = [{"role": t["role"], "content": _LABEL_LINE.sub("", t["content"]) if t["role"] == "assistant"
              else t["content"]} for t in shared.chat_messages(history)]
    return ([{"role": "system", "content": system.strip()}] if system and system.strip() else []) + turns


def reply(side: str, session: str, history: list[Any], moe: str, base: str, system: str,
          settings: SamplingSettings, *, token: str | None = None, device: str = "auto",
          session_builds: list[str] | None = None, sent_at: float | None = None,
          steer: dict[str, Any] | None = None) -> Iterator[PaneUpdate]:
    """Stream one pane's answer to the last user message in `history`.

    With `session_builds` (the handler passes them) the MoE folder, which arrives from the
    browser, must be one this session may use. `sent_at` (time.time() when the user sent the
    message) lets the stats say how long the reply waited before it started. The steered
    side takes `steer` ({"spec": the Interventions panel's values, "yaml": the Design tab's
    recipe}) and labels its reply with it.
    """
    waited = max(0.0, time.time() - sent_at) if sent_at else 0.0
    if not moe and side in ("moe", "steered"):
        yield PaneUpdate(shared.chat_messages(history)[-MAX_SHOWN:], NO_MOE)
        return
    base = _checked_base(moe, base, session_builds)
    history = shared.chat_messages(history)[-MAX_SHOWN:]
    if not history or history[-1]["role"] != "user":
        return
    extra, words = {}, ""
    if side == "steered":
        given = steer or {}
        steer = {"spec": given.get("spec") or steer_logic.spec(), "yaml": given.get("yaml", "")}
        extra = {"steer": steer}
        words = steer_logic.describe(steer["spec"], steer_logic.moe_facts(moe)[0])
    cancel = start_token(session, side, sent_at)
    try:
        if cancel.cancelled:
            yield PaneUpdate([*history, {"role": "assistant", "content": "…(stopped before it started)"}],
                             "stopped while waiting in the queue")
            return
        began, first_at = time.monotonic(), None
        stream = backend().open(base if side == "base" else moe, base, conversation(system, history),
                                settings, trace=side != "base", cancel=cancel, token=token, device=device,
                                **extra)
        resolved = getattr(stream, "intervention", None)  # with the recipe's top-k, if it has its own
        if words and resolved is not None:
            words = resolved.describe(steer_logic.moe_facts(moe)[0])
        history = [*history, {"role": "assistant", "content": LABEL.format(words) if words else ""}]
        try:
            for delta in stream:
                first_at = first_at or time.monotonic()
                history[-1]["content"] += delta
                yield PaneUpdate(history, "streaming…")
        except Cancelled:
            history[-1]["content"] += " …(stopped)"
        last = _last(side, stream, moe, base)
        if last is not None and words:
            last |= {"steer": steer, "label": words}
        yield PaneUpdate(history, _stats(stream, waited, (first_at or time.monotonic()) - began), last)
    finally:
        _release(session, side, cancel)


def _checked_base(moe: str, base: str, session_builds: list[str] | None) -> str:
    """The base model to compare with, once the MoE and the base are ones this session may use."""
    if moe and session_builds is not None:
        build_logic.check_build(moe, session_builds)
    base = (base or "").strip() or base_of(moe)
    if not base:
        raise WorkbenchError("this MoE names no base model; type the base model to compare with")
    if base != base_of(moe):  # typed in the Base box (the MoE's own base came with the build)
        shared.check_model_ref(base, "the base model")
    return base


def _last(side: str, stream: Stream, moe: str, base: str) -> dict[str, Any] | None:
    """What the Routing tab needs of a MoE reply (None for the base's, or without a trace)."""
    result = stream.result
    if side == "base" or getattr(result, "trace", None) is None:
        return None
    return {"trace": result.trace, "moe": moe, "base": base,
            "prompt_ids": backend().prompt_ids(stream), "reply_ids": list(result.token_ids)}


def _stats(stream: Stream, waited: float, to_first: float = 0.0) -> str:
    """The line under a reply: queueing, loading, time to compute swapped routers, speed, notes.
    `to_first` is the wall time from the reply's start to its first piece: what it holds beyond
    the model's own time to first token (loading a model, the routers) is said apart, so a reply
    that appeared 15 s after Send never reads as "0.47 s to first token" alone."""
    dropped = getattr(stream.prompt, "dropped_messages", 0)
    left_out = f" · the {dropped} oldest messages were left out to fit the context" if dropped else ""
    queued = f"queued {waited:.1f} s · " if waited >= MIN_SHOWN_WAIT else ""
    setup = getattr(stream, "setup_s", None)  # None: the saved routers ran
    routers = f"routers from the recipe in {setup:.2f} s · " if setup is not None else ""
    model_first = float(_as_dict(stream.result.stats)["time_to_first_token_s"])
    loading = to_first - model_first - (setup or 0.0)
    loaded = f"loading {loading:.1f} s · " if loading >= MIN_SHOWN_WAIT else ""
    notes = "".join(f" · note: {n}" for n in getattr(stream, "notes", None) or [])
    return queued + loaded + routers + stats_line(stream.result.stats) + left_out + notes


def _as_dict(stats: Any) -> dict[str, Any]:
    return stats.to_dict() if hasattr(stats, "to_dict") else dict(stats)


def stats_line(stats: Any) -> str:
    data = _as_dict(stats)
    return (f"{data['time_to_first_token_s']:.2f} s to first token · {data['tokens_per_s']:.1f} tokens/s · "
            f"{data['new_tokens']} tokens · {data['finish_reason']}")


def add_user(message: Any, *histories: list[Any]) -> tuple[list, ...]:
    """Append the user's message to every pane (one input, a conversation per pane)."""
    text = shared.message_text(message).strip()
    if not text:
        raise WorkbenchError("the message is empty: type something to send")
    turn = {"role": "user", "content": text}
    return tuple([*shared.chat_messages(history)[-MAX_SHOWN + 1:], turn] for history in histories)


def drop_last_reply(history: list[Any]) -> list[dict[str, str]]:
    """The history without its last assistant turn, ready to answer the same message again."""
    turns = shared.chat_messages(history)
    while turns and turns[-1]["role"] == "assistant":
        turns.pop()
    return turns
