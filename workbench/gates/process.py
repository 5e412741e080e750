"""Router gates computed in a child process, for a build in a process without torch.

A plain build needs torch only for its gates. Importing torch costs about 2 s of CPU,
most of it holding the GIL, and on a thread beside the copy it stalled the copy at every
tensor: the same 3.8 GB build took 1.3 to 3.5 s longer with the import on a thread, 0 to
1.6 s with it in a child (bench/BUILD_RESULTS.md). So where the building process has not
imported torch (the CLI, a UI build job), `GateProcess` runs `python -m
workbench.gates.process`, which imports it, computes the gates and sends back the router
rows already cast to the output dtype (`workbench.gates.rows`): the builder never
imports torch at all. Same interface as `workbench.gates.thread.GateThread`.

Protocol. The parent writes one JSON request line on the child's stdin and keeps stdin
open: closing it (the gates are in, the build failed or was cancelled, the parent died)
makes the child exit at once. The child writes JSON lines on stdout: {"progress":
[fraction, message]}, {"log": [level, logger, message]}, then either {"error": {"type",
"message"}} or {"gates": {..., "nbytes": N}} followed by exactly N bytes, the router rows
layer after layer. The child's own stdout goes to its stderr, so no library print can
corrupt the channel.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import sys
import threading
import traceback
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from workbench import errors
from workbench.errors import BuildError, GateError, WorkbenchError
from workbench.gates.thread import GateWorker
from workbench.gates.types import GateDiagnostics, HeldOutScore, RouterGates
from workbench.progress import CancelToken, Progress
from workbench.recipe import Recipe

log = logging.getLogger(__name__)

STOP_SECONDS = 5.0  # a child that has not exited this long after its stdin closed is killed
# Errors a user can act on keep their class across the process boundary.
PASSED_ERRORS = ("GateError", "SourceError", "HubUnreachable", "BuildError", "Cancelled")


@dataclass(frozen=True)
class GateRequest:
    recipe: Recipe
    base_path: Path
    device: str
    seed: int
    dtype: str  # safetensors code the router rows are cast to

    def to_json(self) -> str:
        return json.dumps({"recipe": self.recipe.model_dump(mode="json"), "base_path": str(self.base_path),
                           "device": self.device, "seed": self.seed, "dtype": self.dtype})


class GateProcess(GateWorker):
    """One gates computation in a child process."""

    def __init__(self, request: GateRequest, cancel: CancelToken):
        super().__init__(cancel, "starting a process for the gates")
        self._stderr: deque[str] = deque(maxlen=20)
        self._child = subprocess.Popen([sys.executable, "-m", "workbench.gates.process"],
                                       stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                       env=_environment())
        with contextlib.suppress(OSError):  # a child that died at once is reported by the reader
            self._child.stdin.write(request.to_json().encode() + b"\n")
            self._child.stdin.flush()
        self._threads = [threading.Thread(target=self._read, name="gates-reader", daemon=True),
                         threading.Thread(target=self._drain, name="gates-stderr", daemon=True)]
        for thread in self._threads:
            thread.start()

    @property
    def pid(self) -> int:
        """The child's process id (for logs and tests)."""
        return self._child.pid

    def stop(self) -> None:
        """Close the child's stdin, which ends it at once; kill it if it has not gone in time."""
        self._close_stdin()
        try:
            self._child.wait(timeout=STOP_SECONDS)
        except subprocess.TimeoutExpired:
            log.warning("the gates process did not stop when asked; killing it")
            self._child.kill()
            self._child.wait()
        for thread in self._threads:
            thread.join(timeout=STOP_SECONDS)

    def _close_stdin(self) -> None:
        with contextlib.suppress(OSError):
            self._child.stdin.close()

    def _read(self) -> None:
        try:
            self._gates = self._relay(self._child.stdout)
            self._close_stdin()  # the child exits now instead of tearing torch down
        except BaseException as exc:  # handed to the build's thread by check() / result()
            self._error = exc
        finally:
            self._done.set()
            self._child.stdout.close()

    def _relay(self, stream: IO[bytes]) -> RouterGates:
        """Follow the child's messages up to the gates (returned) or an error (raised)."""
        for line in stream:
            message = json.loads(line)
            if "progress" in message:
                fraction, text = message["progress"]
                self._latest = Progress("gates", float(fraction), str(text))
            elif "log" in message:
                level, name, text = message["log"]
                logging.getLogger(name).log(int(level), "%s", text)
            elif "error" in message:
                raise _error_of(message["error"])
            elif "gates" in message:
                return _gates_of(message["gates"], stream)
        code = self._child.wait()
        tail = " | ".join(self._stderr)
        raise BuildError(f"the gates process ended unexpectedly (exit code {code}: a negative code is the "
                         f"signal that killed it, -9 often the out-of-memory killer); nothing was written. "
                         + (f"Its last output: {tail}" if tail else "It printed nothing"))

    def _drain(self) -> None:
        """Keep the child's stderr flowing; its last lines explain a crash."""
        for raw in self._child.stderr:
            line = raw.decode(errors="replace").rstrip()
            if line:
                self._stderr.append(line[:300])
                log.debug("gates process: %s", line)
        self._child.stderr.close()


def _environment() -> dict[str, str]:
    """The parent's environment without Hub tokens (the base is already local), and with the
    folder holding the workbench package on the path, whatever the working directory."""
    from workbench.models import child_environment

    env = child_environment(None)
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env


def _error_of(data: dict[str, str]) -> BaseException:
    kind, message = data.get("type", ""), data.get("message", "")
    if kind in PASSED_ERRORS:
        return getattr(errors, kind)(message)
    if data.get("user_error"):
        return GateError(message)
    return RuntimeError(f"computing the gates failed with {kind}: {message}\n{data.get('traceback', '')}")


def _gates_of(meta: dict[str, Any], stream: IO[bytes]) -> RouterGates:
    layers, experts, hidden = (int(n) for n in meta["shape"])
    payload = stream.read(int(meta["nbytes"]))
    if len(payload) != int(meta["nbytes"]) or len(payload) % layers:
        raise BuildError(f"the gates process sent {len(payload)} of {meta['nbytes']} bytes of router "
                         "rows; build again")
    size = len(payload) // layers
    rows = [payload[i * size:(i + 1) * size] for i in range(layers)]
    shared_rows = None
    if int(meta.get("shared_nbytes") or 0):  # Qwen2-MoE's shared_expert_gate rows follow the routers'
        shared = stream.read(int(meta["shared_nbytes"]))
        if len(shared) != int(meta["shared_nbytes"]) or len(shared) % layers:
            raise BuildError(f"the gates process sent {len(shared)} of {meta['shared_nbytes']} bytes of "
                             "shared-expert gate rows; build again")
        step = len(shared) // layers
        shared_rows = [shared[i * step:(i + 1) * step] for i in range(layers)]
    score = HeldOutScore.from_dict(meta["score"]) if meta.get("score") else None
    return RouterGates(meta["mode"], (layers, experts, hidden), meta["dtype"], rows,
                       GateDiagnostics.from_dict(meta["diagnostics"]), score=score, shared_rows=shared_rows)


# ---- the child ---------------------------------------------------------------------------


class _Channel:
    """The child's side of stdout: whole messages, one thread at a time."""

    def __init__(self, stream: IO[bytes]):
        self._stream, self._lock = stream, threading.Lock()

    def send(self, message: dict[str, Any], payload: bytes = b"") -> None:
        with self._lock:
            self._stream.write(json.dumps(message).encode() + b"\n" + payload)
            self._stream.flush()


class _Forward(logging.Handler):
    def __init__(self, channel: _Channel):
        super().__init__(logging.INFO)
        self._channel = channel

    def emit(self, record: logging.LogRecord) -> None:
        with contextlib.suppress(Exception):  # a log line must never fail the gates
            self._channel.send({"log": [record.levelno, record.name, self.format(record)]})


def _exit_when_stdin_closes() -> None:
    """The parent closes stdin when it no longer wants the gates, or dies: stop at once."""
    sys.stdin.buffer.read()
    os._exit(0)


def child_main() -> int:
    channel = _Channel(os.fdopen(os.dup(1), "wb"))
    os.dup2(2, 1)  # anything a library prints goes to stderr, never into the protocol
    logging.basicConfig(level=logging.INFO, handlers=[_Forward(channel)], force=True)
    logging.captureWarnings(True)
    request = json.loads(sys.stdin.buffer.readline())
    threading.Thread(target=_exit_when_stdin_closes, daemon=True).start()
    try:
        channel.send({"progress": [0.0, "importing torch"]})
        from workbench.gates.rows import from_gates
        from workbench.gates.score import scored_gates

        gates = scored_gates(Recipe.model_validate(request["recipe"]), Path(request["base_path"]),
                              device=request["device"], seed=int(request["seed"]),
                              on_progress=lambda e: channel.send({"progress": [e.fraction, e.message]}))
        found = from_gates(gates, request["dtype"])
        payload = b"".join(found.rows)
        shared = b"".join(found.shared_rows or [])
        channel.send({"gates": {"mode": found.mode, "shape": list(found.shape), "dtype": found.dtype,
                                "diagnostics": found.diagnostics.to_dict(),
                                "score": found.score.to_dict() if found.score else None,
                                "nbytes": len(payload), "shared_nbytes": len(shared)}}, payload + shared)
    except Exception as exc:
        channel.send({"error": {"type": type(exc).__name__, "message": str(exc),
                                "user_error": isinstance(exc, WorkbenchError),
                                "traceback": "".join(traceback.format_exception(exc))}})
    return 0


if __name__ == "__main__":
    # Every message is flushed as it is sent and the child writes no file, so it skips the
    # interpreter's teardown, which with torch loaded took up to 1.3 s the build waited for.
    os._exit(child_main())
