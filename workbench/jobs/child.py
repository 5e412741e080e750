"""The child side of a job: `python -m workbench.jobs.child` (started by workbench.jobs).

Reads one JSON request line on stdin, runs the build or the forge it asks for, and writes JSON event lines on
stdout: progress (at most every 0.1 s per stage), then exactly one of done / error /
cancelled. A later stdin line "cancel", or stdin closing because the server went away,
cancels the job at its next check. The Hub token comes from this process's environment
(HF_TOKEN, set by the parent for this job only) and is scrubbed from every message.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
import traceback
from dataclasses import asdict
from typing import Any

from workbench.errors import WorkbenchError
from workbench.jobs.job import JobEvent
from workbench.jobs.queue import SERVER_ONLY
from workbench.models import env_token


class _Emitter:
    """Writes events as JSON lines; progress at most every 0.1 s unless the stage changes."""

    def __init__(self, stream: Any) -> None:
        self.stream, self.stage, self.last = stream, None, 0.0

    def progress(self, event: Any) -> None:
        now = time.monotonic()
        plotted = getattr(event, "metrics", None) is not None  # a point of a plot is never dropped
        if event.stage == self.stage and event.fraction < 1.0 and now - self.last < 0.1 and not plotted:
            return
        self.stage, self.last = event.stage, now
        self.send(JobEvent("progress", event.stage, float(event.fraction), str(event.message)[:300],
                           metrics=getattr(event, "metrics", None)))

    def send(self, event: JobEvent) -> None:
        self.stream.write(json.dumps(asdict(event)) + "\n")
        self.stream.flush()


def _watch_stdin(stream: Any, cancel: Any) -> None:
    """Cancel on a "cancel" line or when the parent goes away (stdin closes)."""
    for line in stream:
        if line.strip() == "cancel":
            break
    cancel.cancel()


def _result_dict(result: Any) -> dict[str, Any]:
    diagnostics = getattr(result, "diagnostics", None)
    return {"path": str(result.path), "files": [list(f) for f in result.files],
            "total_bytes": int(result.total_bytes), "seconds": float(result.seconds),
            "gate_warnings": list(diagnostics.warnings) if diagnostics is not None else []}


def _run_build(runner: Any, request: dict[str, Any], **job: Any) -> tuple[str, dict[str, Any]]:
    from pathlib import Path

    from workbench.recipe import RecipeError, errors, parse_recipe

    recipe, problems = parse_recipe(request.pop("recipe_yaml"))
    if recipe is None or errors(problems):
        raise RecipeError(problems)
    result = runner(recipe, Path(request.pop("out")), **job, **request)
    return f"built {result.path}", _result_dict(result)


def _run_plain(verb: str) -> Any:
    """A runner whose result is already JSON-ready (a forge's, an export's)."""
    def run(runner: Any, request: dict[str, Any], **job: Any) -> tuple[str, dict[str, Any]]:
        result = runner(**request, **job)
        return f"{verb} {result['path']}", result
    return run


KINDS = {"build": _run_build, "forge": _run_plain("forged"), "export": _run_plain("wrote")}


def child_main(stdin: Any = None, stdout: Any = None) -> int:
    """Run one job request read from stdin; report on stdout. Always exits 0 after a report."""
    import importlib

    from workbench.errors import Cancelled
    from workbench.models import scrub
    from workbench.progress import CancelToken

    stdin, emitter = stdin or sys.stdin, _Emitter(stdout or sys.stdout)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    request = json.loads(stdin.readline())
    module, _, name = request.pop("runner").partition(":")
    runner = getattr(importlib.import_module(module), name)
    kind = request.pop("job", "build")
    cancel = CancelToken()
    threading.Thread(target=_watch_stdin, args=(stdin, cancel), daemon=True).start()
    token = env_token()
    try:
        message, result = KINDS[kind](runner, request, token=token, on_progress=emitter.progress,
                                      cancel=cancel)
    except Cancelled:
        emitter.send(JobEvent("cancelled", message="stopped on request; nothing was written"))
    except WorkbenchError as exc:
        emitter.send(JobEvent("error", message=scrub(str(exc), token)))
    except MemoryError:
        emitter.send(JobEvent("error", message=f"the {kind} ran out of memory; close other programs "
                                               "or use a machine with more RAM"))
    except Exception as exc:  # a bug: the page gets a plain message, the server log the traceback
        for line in scrub("".join(traceback.format_exception(exc)), token).splitlines():
            print(SERVER_ONLY + line, file=sys.stderr, flush=True)
        emitter.send(JobEvent("error", message=f"the {kind} stopped on an unexpected {type(exc).__name__} "
                                               "(a bug in the workbench); the server log has the details"))
    else:
        emitter.send(JobEvent("done", "done", 1.0, message, result=result))
    return 0


if __name__ == "__main__":
    sys.exit(child_main())
