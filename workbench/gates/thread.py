"""Router gates computed on a worker thread while the build copies everything else.

A build's bytes are nearly all copies of source tensors that need neither torch nor the
gates; only the routers (a few hundred KB, written last) do. So the build starts copying
at once while a worker computes the gates: this thread where the process already holds
torch, else a child process (`workbench.gates.process`, same interface), since importing
torch on a thread holds the GIL the copy needs between tensors.

The worker's progress events are kept, not sent, so that the build reports one stage at
a time: the writer shows the latest of them in its own messages, and `result()` sends
them as the "gates" stage while the writer waits, so the stages run resolve, write,
gates, write (the routers), verify, done.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import TYPE_CHECKING

from workbench.progress import CancelToken, Progress, ProgressFn

if TYPE_CHECKING:
    from workbench.gates.types import RouterGates

Compute = Callable[[ProgressFn, CancelToken], "RouterGates"]
POLL_SECONDS = 0.1  # how often a waiting writer repeats the worker's latest event


class GateWorker(ABC):
    """What the build needs of a gates worker, wherever the gates are computed: a subclass
    starts the work and stores `_gates` or `_error`, then sets `_done`."""

    def __init__(self, cancel: CancelToken, starting: str):
        self._cancel = cancel
        self._latest = Progress("gates", 0.0, starting)
        self._gates: RouterGates | None = None
        self._error: BaseException | None = None
        self._done = threading.Event()

    @property
    def status(self) -> str:
        """A few words for the writer's progress messages; empty once the gates are ready."""
        return "" if self._done.is_set() else f"gates: {self._latest.message}"

    def check(self) -> None:
        """Raise the worker's error as soon as there is one, so a bad prompt does not wait
        for gigabytes of copying to be reported."""
        if self._done.is_set() and self._error is not None:
            raise self._error

    def result(self, on_progress: ProgressFn) -> RouterGates:
        """The gates, waiting for them if needed and reporting the worker's progress meanwhile;
        ends with one finished "gates" event either way."""
        while not self._done.wait(POLL_SECONDS):
            on_progress(self._latest)
            self._cancel.check()
        self.check()
        assert self._gates is not None  # the worker either stored gates or an error
        on_progress(Progress("gates", 1.0, f"{self._gates.mode} gates ready"))
        return self._gates

    @abstractmethod
    def stop(self) -> None:
        """End the work and wait for it; must run if the build fails."""


class ReadyGates(GateWorker):
    """Gates already in hand (given by the caller, or noise): nothing runs, nothing to stop."""

    def __init__(self, gates: RouterGates, cancel: CancelToken):
        super().__init__(cancel, "ready")
        self._gates = gates
        self._done.set()

    def stop(self) -> None:
        """Nothing runs."""


class GateThread(GateWorker):
    """One gates computation on a daemon thread."""

    def __init__(self, compute: Compute, cancel: CancelToken):
        super().__init__(cancel.child(), "starting")  # the build's cancel stops it, and so does stop()
        self._thread = threading.Thread(target=self._run, args=(compute,), name="gates", daemon=True)
        self._thread.start()

    def _run(self, compute: Compute) -> None:
        try:
            self._gates = compute(self._keep, self._cancel)
        except BaseException as exc:  # handed to the build's thread by check() / result()
            self._error = exc
        finally:
            self._done.set()

    def _keep(self, event: Progress) -> None:
        self._latest = event

    def stop(self) -> None:
        """Cancel the worker and wait for it (it stops at its next cancel check)."""
        self._cancel.cancel()
        self._thread.join()
