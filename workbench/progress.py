"""Progress events and cancellation for long jobs (download, gates, build, push).

A job takes `on_progress` (called with `Progress` events) and `cancel` (a
`CancelToken`); it calls `cancel.check()` between units of work (tensors, prompt sets),
which raises `Cancelled`. The CLI turns events into a progress bar, the UI into gr.Progress.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

from workbench.errors import Cancelled


@dataclass(frozen=True)
class Progress:
    stage: str  # short name: "resolve", "gates", "write", "verify", ...
    fraction: float  # 0..1 within the stage
    message: str = ""
    metrics: dict[str, float] | None = None  # numbers a page may plot, e.g. a forge step's loss


ProgressFn = Callable[[Progress], None]


def ignore_progress(event: Progress) -> None:
    """Default sink for callers that do not watch progress."""


class CancelToken:
    """Thread-safe flag a caller sets to stop a job at its next check."""

    def __init__(self, parent: CancelToken | None = None) -> None:
        self._event = threading.Event()
        self._parent = parent

    def child(self) -> CancelToken:
        """A token cancelled with this one that can also be cancelled on its own, e.g. to
        stop a helper thread when the job it serves fails."""
        return CancelToken(self)

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set() or (self._parent is not None and self._parent.cancelled)

    def check(self) -> None:
        if self.cancelled:
            raise Cancelled("stopped on request")
