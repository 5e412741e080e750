"""What every tab needs: where outputs go, whose token to use, errors as messages, chat text.

Handlers are thin: parse inputs, call one workbench function, format the result. Errors
cross into the page only through `user_errors`, which turns a WorkbenchError into a
gr.Error carrying its message and anything unexpected into a short note (the traceback
goes to the server log, never to the page).
"""

from __future__ import annotations

import functools
import hashlib
import html
import inspect
import logging
import os
import re
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import gradio as gr

from workbench.errors import WorkbenchError
from workbench.models import env_token
from workbench.progress import CancelToken
from workbench.recipe import ConfigUnavailable
from workbench.staging import MANIFEST

log = logging.getLogger(__name__)

ASSETS = Path(__file__).resolve().parent.parent.parent / "assets"
PRESETS = Path(__file__).resolve().parent.parent.parent / "presets"
F = TypeVar("F", bound=Callable[..., Any])
T = TypeVar("T")
# The default of a handler's progress parameter: Gradio recognises a parameter by this default
# and hands each call its own tracker, so one module-level instance serves every handler.
PROGRESS = gr.Progress()


def outputs_root() -> Path:
    """Where builds go: $MOE_WORKBENCH_OUTPUTS, else ./outputs."""
    return Path(os.environ.get("MOE_WORKBENCH_OUTPUTS") or "outputs").expanduser().resolve()


def on_space() -> bool:
    """Running as a Hugging Face Space: visitors are strangers (no local paths, own tokens)."""
    return bool(os.environ.get("SPACE_ID"))


def model_roots() -> list[Path]:
    """Folders the app may load models from by path: the outputs folder, the folder the app
    started in, and those in $MOE_WORKBENCH_MODEL_ROOTS (separated by the OS's path separator)."""
    listed = os.environ.get("MOE_WORKBENCH_MODEL_ROOTS", "").split(os.pathsep)
    extra = [Path(p).expanduser() for p in listed if p]
    return [p.resolve() for p in (outputs_root(), Path.cwd(), *extra)]


def check_model_ref(ref: str, where: str = "model") -> None:
    """Refuse a model the app has no business loading, before anything reads it.

    Demo models and Hub ids are fine. A folder is fine under `model_roots()`, never on a
    Space: a visitor must not make the server read its folders (or another visitor's builds),
    except an expert the visitor forged here, whose folder name holds a secret only they were
    shown (`private_name`). A `+LORA` adapter folder is held to the same rule.
    """
    from workbench.models import parse_ref

    if on_space() and is_private_output(ref):
        return
    parsed = parse_ref(ref, allow_local=not on_space())  # a SourceError on a Space for any folder
    roots = model_roots()
    for part in (parsed, parsed.adapter):
        if part is None or part.kind != "local":
            continue
        path = Path(part.name).resolve()
        if not any(path == root or root in path.parents for root in roots):
            shown = ", ".join(str(r) for r in dict.fromkeys(roots))
            raise WorkbenchError(f"{where} {ref!r} names a folder outside those this app loads models from "
                                 f"({shown}); move it under one of them, or add its parent folder to "
                                 "MOE_WORKBENCH_MODEL_ROOTS and restart the app")


_PRIVATE = re.compile(r".+-[0-9a-f]{32}")


def private_name(name: str) -> str:
    """On a Space, an output name no other visitor can guess (it is their key to the folder)."""
    return f"{name}-{secrets.token_hex(16)}" if on_space() else name


def is_private_output(ref: str) -> bool:
    """A finished output folder of this app whose name ends in a `private_name` secret."""
    path = Path(ref.strip()) if isinstance(ref, str) else Path()
    return (path.is_absolute() and path.parent == outputs_root() and _PRIVATE.fullmatch(path.name) is not None
            and (path / MANIFEST).is_file())


def oauth_available() -> bool:
    """Gradio's Hugging Face sign-in needs the `gradio[oauth]` extras (authlib, itsdangerous)."""
    import importlib.util

    return all(importlib.util.find_spec(name) is not None for name in ("authlib", "itsdangerous"))


def user_token(oauth: gr.OAuthToken | None) -> str | None:
    """The token to act with: the signed-in user's on a Space, HF_TOKEN locally.

    On a Space a logged-out visitor gets None, never the Space owner's HF_TOKEN.
    """
    if on_space():
        return oauth.token if oauth is not None else None
    return env_token()


def user_errors(fn: F) -> F:
    """Show errors as messages: WorkbenchError verbatim, anything else as a short note."""

    def translate(exc: Exception) -> gr.Error:
        if isinstance(exc, gr.Error):
            return exc
        if isinstance(exc, WorkbenchError):
            # Text, not markup (quotes need no escaping: API clients read the message as it is).
            return gr.Error(html.escape(str(exc), quote=False).replace("\n", "<br>"), print_exception=False)
        log.exception("unexpected error in %s", fn.__qualname__)
        return gr.Error(f"Something went wrong ({type(exc).__name__}); the server log has the details.",
                        print_exception=False)

    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def stream(*args: Any, **kwargs: Any) -> Any:
            try:
                yield from fn(*args, **kwargs)
            except Exception as exc:
                raise translate(exc) from None

        return stream  # type: ignore[return-value]

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            raise translate(exc) from None

    return call  # type: ignore[return-value]


def message_text(content: Any) -> str:
    """Chat message content as plain text: Gradio 6 sends a string or a list of content blocks."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return str(content.get("text") or content.get("content") or "")
    if isinstance(content, (list, tuple)):
        return "".join(message_text(block) for block in content)
    return str(content)


def chat_messages(history: list[Any] | None) -> list[dict[str, str]]:
    """Chatbot history as [{"role", "content": str}], dropping anything that is not a chat turn."""
    out = []
    for item in history or []:
        message = item if isinstance(item, dict) else getattr(item, "__dict__", {})
        role = message.get("role")
        if role in ("user", "assistant", "system"):
            out.append({"role": role, "content": message_text(message.get("content"))})
    return out


# ---- config.json of models, cached across sessions ------------------------------------------


class ConfigCache:
    """read_configs with memory: a model's config is read once; a failure is retried after a while.

    Validation runs on every edit; without this each keystroke would hit the Hub. With
    `wait`, a Hub config not yet cached is fetched on a thread of its own and waited for at
    most that long: a slow Hub then never holds up a keystroke's check, the ref maps to a
    "being fetched" warning, and `pending` says so until the fetch ends (the Design tab
    checks again then). One fetch per model and token at a time, whoever asks.
    """

    def __init__(self, retry_after: float = 60.0) -> None:
        self.retry_after = retry_after
        self._found: dict[tuple[str, str], dict | ConfigUnavailable] = {}
        self._when: dict[tuple[str, str], float] = {}
        self._fetching: dict[tuple[str, str], threading.Thread] = {}
        self._lock = threading.Lock()

    @staticmethod
    def _key(ref: str, token: str | None) -> tuple[str, str]:
        # Per token (by its hash, never the token itself): one user's access to a private
        # model must not show its config to another.
        return ref, hashlib.sha256(token.encode()).hexdigest() if token else ""

    def get(self, refs: list[str], token: str | None, *,
            wait: float | None = None) -> dict[str, dict | ConfigUnavailable]:
        out: dict[str, dict | ConfigUnavailable] = {}
        for ref in dict.fromkeys(refs):
            try:
                check_model_ref(ref)
            except WorkbenchError as exc:
                out[ref] = ConfigUnavailable(str(exc))
                continue
            key = self._key(ref, token)
            with self._lock:
                cached, when = self._found.get(key), self._when.get(key, 0.0)
            fresh = time.monotonic() - when < self.retry_after
            if isinstance(cached, dict) or (cached is not None and fresh):
                out[ref] = cached
                continue
            if wait is None or not _on_the_hub(ref):
                out[ref] = self._read(key, ref, token)
                continue
            fetch = self._start(key, ref, token)
            fetch.join(wait)
            with self._lock:
                done = self._found.get(key) if not fetch.is_alive() else None
            out[ref] = done if done is not None else ConfigUnavailable(
                f"config.json of {ref} is being fetched from the Hub; the checks update when it arrives",
                level="warning")
        return out

    def pending(self, refs: list[str], token: str | None) -> bool:
        """Whether a config of `refs` is still being fetched for this token."""
        with self._lock:
            return any(self._fetching.get(self._key(ref, token)) is not None for ref in refs)

    def _read(self, key: tuple[str, str], ref: str, token: str | None) -> dict | ConfigUnavailable:
        from workbench.models import read_configs

        found = read_configs([ref], token=token)[ref]
        with self._lock:
            self._found[key], self._when[key] = found, time.monotonic()
        return found

    def _start(self, key: tuple[str, str], ref: str, token: str | None) -> threading.Thread:
        """The fetch of `key` under way, or a new one."""
        def run() -> None:
            try:
                self._read(key, ref, token)
            finally:
                with self._lock:
                    self._fetching.pop(key, None)

        with self._lock:
            fetch = self._fetching.get(key)
            if fetch is None:
                fetch = self._fetching[key] = threading.Thread(target=run, name="config-fetch", daemon=True)
                fetch.start()
        return fetch


def _on_the_hub(ref: str) -> bool:
    from workbench.models import parse_ref

    try:
        parsed = parse_ref(ref)
    except WorkbenchError:
        return False
    return "hub" in (parsed.kind, parsed.adapter.kind if parsed.adapter else None)  # a Hub LoRA too


configs = ConfigCache()


def read_asset(name: str) -> str:
    path = ASSETS / name
    return path.read_text(encoding="utf-8") if path.is_file() else ""


# ---- heavy work that stops when its client leaves -------------------------------------------

ABANDONED_SECONDS = 5.0  # a handler generator not pulled for this long has lost its client
PULSE_SECONDS = 0.5


def watched(work: Callable[[CancelToken], T], *, pulse: float = PULSE_SECONDS,
            abandoned: float = ABANDONED_SECONDS) -> Iterator[T | None]:
    """Run `work(cancel)` on a thread; yield None every `pulse` seconds while it runs, then its
    result. A handler built on this is a generator, and Gradio stops pulling a generator
    whose client went away (a closed tab, a dropped connection): the work is then cancelled
    at its next check, once the generator is closed or has not been pulled for `abandoned`
    seconds. Without it a 64 x 64-prompt preview ran on for 40 s after its client left."""
    cancel = CancelToken()
    outcome: dict[str, Any] = {}
    pulled = [time.monotonic()]

    def run() -> None:
        try:
            outcome["value"] = work(cancel)
        except BaseException as exc:  # handed to the handler's thread below
            outcome["error"] = exc

    def watch() -> None:
        while worker.is_alive():
            if time.monotonic() - pulled[0] > abandoned:
                cancel.cancel()
                return
            time.sleep(min(pulse, abandoned) / 2)

    worker = threading.Thread(target=run, name="watched-work", daemon=True)
    worker.start()
    threading.Thread(target=watch, name="watched-client", daemon=True).start()
    try:
        while worker.is_alive():
            worker.join(pulse)
            if worker.is_alive():
                yield None
                pulled[0] = time.monotonic()
    finally:
        if worker.is_alive():  # closed mid-work (GeneratorExit): the client is gone
            cancel.cancel()
    if "error" in outcome:
        raise outcome["error"]
    yield outcome["value"]

