"""A job and what it says: the requests the queue runs (build, forge, GGUF export), the events a
child sends back, and the `Job` that keeps them for every page that follows it."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any, Literal

FINAL_KINDS = ("done", "error", "cancelled")
COALESCE_SECONDS = 1.0  # plain progress of one stage is kept at most about once a second
State = Literal["queued", "running", "done", "error", "cancelled"]


@dataclass(frozen=True)
class BuildRequest:
    recipe_yaml: str
    out: str  # absolute output folder, already checked with build.output_path
    device: str = "auto"
    dtype: str | None = None
    shard_size: int = 5 * 10**9
    seed: int = 0
    force: bool = False


@dataclass(frozen=True)
class ForgeRequest:
    """A forge: the base, the examples as JSON lines, the output and the training settings."""

    base: str
    examples: str
    out: str  # absolute output folder, already checked with build.output_path
    steps: int = 30
    lr: float = 5e-5
    batch_size: int = 4
    seed: int = 0
    layers: tuple[int, int] | None = None
    device: str = "auto"
    force: bool = False
    samples: tuple[str, ...] = ()  # prompts both the base and the expert answer once it is forged


@dataclass(frozen=True)
class ExportRequest:
    """A GGUF export: a finished MoE folder and the file to write beside it."""

    model: str
    out: str  # the .gguf file, already checked to stay in the outputs folder
    out_type: str = "f16"
    force: bool = False


Request = BuildRequest | ForgeRequest | ExportRequest


@dataclass(frozen=True)
class JobEvent:
    kind: Literal["queued", "progress", "log", "done", "error", "cancelled"]
    stage: str = ""
    fraction: float = 0.0
    message: str = ""
    position: int = 0  # place in line, the running job being number 1 ("queued" only)
    eta_seconds: float | None = None  # time left in the current stage, when it can be told
    result: dict[str, Any] | None = None  # "done" only: a build's path, files, sizes; a forge's losses
    metrics: dict[str, float] | None = None  # "progress" only: numbers to plot (a forge's step, loss)
    at: float = 0.0  # time.monotonic() when the server received it: a page that follows later replays it


@dataclass(eq=False)
class Job:
    """One queued job and everything it has said so far.

    The events are kept, not consumed: a job belongs to its owner's session, not to the page
    that started it, so a reloaded or second page replays them from the start (log, progress,
    result) and follows on from there.
    """

    id: str
    request: Request
    token: str | None = field(default=None, repr=False)
    owner: str = ""  # the session key of whoever started it ("" for none: no page finds it again)
    label: str = ""  # what the page calls it, e.g. "1 of 2 (hero)"
    state: State = "queued"
    history: list[JobEvent] = field(default_factory=list, repr=False)
    seen: bool = False  # a page has shown its end: a reloaded page need not show it again
    _changed: threading.Condition = field(default_factory=threading.Condition, repr=False)
    _read: int = 0  # next_event's place in the history
    _cancel: threading.Event = field(default_factory=threading.Event, repr=False)
    _stage: str = ""
    _stage_started: float = 0.0

    @property
    def finished(self) -> bool:
        return self.state in FINAL_KINDS

    @property
    def result(self) -> dict[str, Any] | None:
        """A finished job's result (None until it is done, or when it failed)."""
        with self._changed:
            return self.history[-1].result if self.state == "done" else None

    def next_event(self, timeout: float | None = None) -> JobEvent | None:
        """The next event not read through this method, or None when `timeout` seconds pass without one."""
        with self._changed:
            self._changed.wait_for(lambda: self._read < len(self.history), timeout)
            if self._read >= len(self.history):
                return None
            self._read += 1
            return self.history[self._read - 1]

    def stream(self, poll: float = 0.5) -> Iterator[JobEvent | None]:
        """Every event from the first to the final one; None every `poll` seconds of silence (for
        queue updates). Each call reads the whole history: any number of pages may follow one job."""
        index = 0
        while True:
            with self._changed:
                if index == len(self.history):
                    self._changed.wait(poll)
                new = self.history[index:]
            index += len(new)
            if not new:
                yield None
            for event in new:
                yield event
                if event.kind in FINAL_KINDS:
                    return

    def _emit(self, event: JobEvent) -> None:
        if event.kind == "progress":
            event = self._with_eta(event)
        with self._changed:
            if event.kind in FINAL_KINDS:
                self.state = event.kind
            event = replace(event, at=time.monotonic())
            if self._coalesces(event):
                self.history[-1] = event  # the stage's first event stays, for its log line and timing
            else:
                self.history.append(event)
            self._changed.notify_all()

    def _coalesces(self, event: JobEvent) -> bool:
        """Whether `event` may take the place of the last one kept: both plain progress of the
        stage the one before them started, under a second apart. A long build sends ten a second;
        kept whole, a finished job's history grew by megabytes an hour."""
        if len(self.history) < 2 or event.kind != "progress" or event.metrics:
            return False
        plain = all(e.kind == "progress" and not e.metrics and e.stage == event.stage
                    for e in self.history[-2:])
        return plain and event.at - self.history[-2].at < COALESCE_SECONDS

    def _with_eta(self, event: JobEvent) -> JobEvent:
        now = time.monotonic()
        if event.stage != self._stage:
            self._stage, self._stage_started = event.stage, now
        elapsed, fraction = now - self._stage_started, event.fraction
        if 0.02 < fraction < 1.0 and elapsed > 0.5:
            return replace(event, eta_seconds=elapsed / fraction - elapsed)
        return event
