"""A browser's session key, and the long jobs it owns.

Builds and forges belong to the person who started them, not to the page: the key lives in
the browser's storage (`gr.BrowserState`), so a reloaded or reopened page sends the same key
and finds its jobs still running, or their results. The key is random (128 bits), made on the
server the first time a browser opens the app; knowing it is what lets a page follow or cancel
a job, so it is never shown.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from workbench import jobs

_KEY = re.compile(r"[0-9a-f]{32}")


def owner_key(stored: str | None) -> str:
    """The browser's key: the one it stored, or a new one when it has none (or a malformed one)."""
    return stored if isinstance(stored, str) and _KEY.fullmatch(stored) else secrets.token_hex(16)


def to_follow(owner: str, kind: str) -> list[jobs.Job]:
    """The owner's jobs of one kind that a page should show on opening, oldest first: those still
    waiting or running, and any finished one whose end no page has shown yet."""
    return [job for job in jobs.default_queue().jobs_of(owner, kind) if not (job.finished and job.seen)]


def finished_outputs(owner: str, kind: str) -> list[str]:
    """The folders the owner's finished jobs of one kind wrote, oldest first (a reloaded page's
    list of its builds or forged experts)."""
    return [job.request.out for job in jobs.default_queue().jobs_of(owner, kind) if job.state == "done"]


@dataclass
class Reattach:
    """A tab's handler that follows the session's jobs again when a page opens (wired in blocks)."""

    fn: Callable[..., Iterator[dict]]
    inputs: list
    outputs: list
