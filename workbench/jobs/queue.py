"""The job runner: one build or forge at a time, each in its own subprocess, progress streamed back.

A build reads and writes gigabytes through native code, a forge trains a model; a crash
there (out of memory, a segfault in a reader) must not take the web server down, so every job runs in a
child `python -m workbench.jobs.child`. The parent sends the request as one JSON line on the
child's stdin and later, to cancel, the line "cancel"; the child answers with JSON lines
on stdout (progress, then one of done / error / cancelled). Closing the child's stdin also
cancels it, so a dead server never leaves a build running. The build itself is
crash-safe (staging folder, rename into place), so killing the child leaves no output.

Jobs wait in a FIFO; a waiting user can read their place in the queue. A job belongs to
its owner's session key, not to a page: it keeps every event it sent, so a reloaded page
finds it (`jobs_of`) and replays its log and progress; only `cancel` stops it. Hub tokens reach
the child through its environment only (never its command line, which `ps` shows), and
a job without a token gets an environment with every inherited token removed, so a
logged-out visitor never builds with the server owner's token.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
from collections import deque
from dataclasses import asdict
from typing import Any

from workbench.errors import WorkbenchError
from workbench.jobs.job import FINAL_KINDS, ExportRequest, ForgeRequest, Job, JobEvent, Request
from workbench.models import child_environment

log = logging.getLogger(__name__)

DEFAULT_RUNNER = "workbench.build:build"
FORGE_RUNNER = "workbench.forge:forge_job"
EXPORT_RUNNER = "workbench.build:export_job"
KEEP_FINISHED = 32  # finished jobs kept for pages that reopen, each with its events
# A child's stderr line for the server log only: tracebacks hold server paths.
SERVER_ONLY = "server-log| "
# What the page's build log shows of the child's stderr: its log records. Anything else
# (progress bars, a crash's fatal-error report with server paths) goes to the server log.
_LOG_RECORD = re.compile(r"^(DEBUG|INFO|WARNING|ERROR|CRITICAL) [\w.]+: ")


class QueueFull(WorkbenchError):
    """Too many builds are waiting; the caller should try again later."""


class BuildQueue:
    """Runs submitted builds, forges and GGUF exports one at a time, each in a child process: all are
    heavy, and each reads or writes a whole model."""

    def __init__(self, runner: str = DEFAULT_RUNNER, *, forge_runner: str = FORGE_RUNNER,
                 export_runner: str = EXPORT_RUNNER, max_waiting: int = 8, grace_seconds: float = 10.0):
        # "module:function" the child calls per kind of job; server-side only, never user input.
        self.runners = {"build": runner, "forge": forge_runner, "export": export_runner}
        self.max_waiting = max_waiting
        self.grace_seconds = grace_seconds
        self._waiting: deque[Job] = deque()
        self._jobs: dict[str, Job] = {}
        self._lock = threading.Condition()
        self._ids = itertools.count(1)
        self._worker: threading.Thread | None = None
        self._child: subprocess.Popen | None = None
        self._running: Job | None = None

    def submit(self, request: Request, token: str | None = None, *, owner: str = "", label: str = "") -> Job:
        """Queue a job. `owner` is the session key that finds it again (`jobs_of`) from any page."""
        with self._lock:
            if len(self._waiting) >= self.max_waiting:
                raise QueueFull(f"{len(self._waiting)} jobs (builds, forges, exports) are already "
                                "waiting; try again in a few minutes")
            job = Job(f"{_kind(request)}-{next(self._ids)}", request, token, owner, label)
            self._jobs[job.id] = job
            self._waiting.append(job)
            place = self._place(job)
            job._emit(JobEvent("queued", position=place, message=f"waiting: number {place} in the queue"))
            if self._worker is None or not self._worker.is_alive():
                self._worker = threading.Thread(target=self._work, name="build-queue", daemon=True)
                self._worker.start()
            self._lock.notify_all()
        return job

    def get(self, job_id: str) -> Job | None:
        return self._jobs.get(job_id)

    def jobs_of(self, owner: str, kind: str | None = None) -> list[Job]:
        """The owner's jobs (of one kind: "build" or "forge") still known, oldest first: waiting,
        running, and the last few finished ones."""
        if not owner:
            return []
        with self._lock:
            return [job for job in self._jobs.values()
                    if job.owner == owner and (kind is None or _kind(job.request) == kind)]

    def position(self, job: Job) -> int:
        """Place in line counting the running build as number 1; 0 once the job has started."""
        with self._lock:
            return self._place(job)

    def _place(self, job: Job) -> int:
        for i, waiting in enumerate(self._waiting):
            if waiting is job:
                return i + 1 + (self._running is not None)
        return 0

    def cancel(self, job_id: str) -> bool:
        """Stop a job: drop it from the queue, or ask its child to stop. False if already over."""
        with self._lock:
            job = self._jobs.get(job_id)
            if job is None or job.finished:
                return False
            job._cancel.set()
            if job in self._waiting:
                self._waiting.remove(job)
                job._emit(JobEvent("cancelled", message="removed from the queue before it started"))
                return True
            child = self._child
        if child is not None and child.stdin is not None:
            try:
                child.stdin.write("cancel\n")
                child.stdin.flush()
            except (BrokenPipeError, OSError, ValueError):
                log.debug("build child already gone when cancelling %s", job_id)
            # A child stuck in native code never reads the cancel: kill it after the grace period.
            timer = threading.Timer(self.grace_seconds, _kill, args=(child, job_id))
            timer.daemon = True
            timer.start()
        return True

    def _work(self) -> None:
        while True:
            with self._lock:
                while not self._waiting:
                    self._lock.wait()
                job = self._waiting.popleft()
                job.state, self._running = "running", job
            try:
                self._run(job)
            except Exception as exc:  # the queue must survive anything one job does
                log.exception("job runner failed for %s", job.id)
                job._emit(JobEvent("error", message=f"the job runner failed: {type(exc).__name__}: {exc}"))
            finally:
                job.token = None
                with self._lock:
                    self._child, self._running = None, None
                    self._forget_old()

    def _forget_old(self) -> None:
        """Keep every unfinished job and the last KEEP_FINISHED finished ones (a page reopened later
        still finds its result); the lock is held."""
        finished = [k for k, v in self._jobs.items() if v.finished]
        for key in finished[:-KEEP_FINISHED]:
            del self._jobs[key]

    def _run(self, job: Job) -> None:
        child = subprocess.Popen(
            [sys.executable, "-m", "workbench.jobs.child"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True, env=child_environment(job.token), start_new_session=True)
        stderr_tail: deque[str] = deque(maxlen=20)
        reader = threading.Thread(target=_drain, args=(child.stderr, stderr_tail, job), daemon=True)
        reader.start()
        try:
            kind = _kind(job.request)
            line = {"runner": self.runners[kind], "job": kind, **asdict(job.request)}
            child.stdin.write(json.dumps(line) + "\n")
            child.stdin.flush()
        except (BrokenPipeError, OSError):
            log.warning("build child for %s exited before reading its request", job.id)
        with self._lock:  # only now may cancel() write to the child: the request line comes first
            self._child = child
        if job._cancel.is_set():
            self.cancel(job.id)
        final = self._relay(child, job)
        self._stop(child, job)
        reader.join(timeout=5)
        if final is None:
            code = child.returncode
            if stderr_tail and not job._cancel.is_set():  # a crash's last words hold server paths
                log.error("build %s ended with exit code %s; its last output: %s", job.id, code,
                          " | ".join(stderr_tail))
            message = ("stopped" if job._cancel.is_set() else
                       f"the {_kind(job.request)} process ended unexpectedly (exit code {code}); nothing "
                       "was written. "
                       "The server log has its last output")
            job._emit(JobEvent("cancelled" if job._cancel.is_set() else "error", message=message))

    def _relay(self, child: subprocess.Popen, job: Job) -> JobEvent | None:
        """Forward the child's events; return the final one (None if the child died silently)."""
        for line in child.stdout:
            try:
                data = json.loads(line)
                event = JobEvent(**data)
            except (ValueError, TypeError):
                log.debug("build child wrote a non-event line: %.200s", line)
                continue
            job._emit(event)
            if event.kind in FINAL_KINDS:
                return event
        return None

    def _stop(self, child: subprocess.Popen, job: Job) -> None:
        """Wait for the child; one that ignores a cancel is killed after the grace period."""
        with contextlib.suppress(OSError):  # the child may already be gone
            child.stdin.close()
        try:
            child.wait(timeout=self.grace_seconds)
        except subprocess.TimeoutExpired:
            _kill(child, job.id)
            child.wait()


def _kind(request: Request) -> str:
    return {ForgeRequest: "forge", ExportRequest: "export"}.get(type(request), "build")


def _kill(child: subprocess.Popen, job_id: str) -> None:
    if child.poll() is not None:
        return
    log.warning("build child of %s did not stop when asked; killing it", job_id)
    with contextlib.suppress(ProcessLookupError):  # it exited between poll() and here
        os.killpg(child.pid, signal.SIGKILL)  # its own session: takes any helpers it started too


def _drain(stream: Any, tail: deque[str], job: Job) -> None:
    """Keep the child's stderr (its log) flowing; its last lines explain a crash."""
    for line in stream:
        line = line.rstrip()
        if line.startswith(SERVER_ONLY):
            log.error("build %s: %s", job.id, line[len(SERVER_ONLY):])
        elif line:
            tail.append(line[:300])
            if _LOG_RECORD.match(line):
                job._emit(JobEvent("log", message=line[:500]))
            else:
                log.info("build %s: %s", job.id, line[:500])


_default: BuildQueue | None = None
_default_lock = threading.Lock()


def default_queue() -> BuildQueue:
    """The server's one build queue, created on first use (importing starts nothing)."""
    global _default
    with _default_lock:
        if _default is None:
            _default = BuildQueue()
        return _default
