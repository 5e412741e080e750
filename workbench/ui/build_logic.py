"""The Build tab's handlers as plain functions: a checked request in, views of the job out."""

from __future__ import annotations

import html
import itertools
import json
import re
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from workbench import jobs
from workbench.errors import BuildError, WorkbenchError
from workbench.recipe import Recipe, RecipeError, errors, parse_recipe, routed_experts, validate
from workbench.staging import MANIFEST
from workbench.ui import shared
from workbench.ui.sizes import human

# How the log closes the stage a job ended in: a cancelled forge's log said "done in 21 s".
ENDINGS = {"done": "done in", "cancelled": "stopped after", "error": "failed after"}
STAGES = {"resolve": "Fetching models", "demo": "Preparing the demo model", "gates": "Computing gates",
          "write": "Writing tensors", "verify": "Verifying", "done": "Done",
          "forge": "Training the MLPs", "samples": "Sample replies", "gguf": "Converting"}


def make_request(yaml_text: str, name: str, device: str, dtype: str | None, shard_size: str,
                 replace: bool) -> jobs.BuildRequest:
    """A build request from the tab's fields, refused early for anything the user can fix now."""
    from workbench.build import output_path, parse_size  # imports torch: only when a build starts

    recipe, problems = parse_recipe(yaml_text or "")
    problems = problems + (validate(recipe) if recipe is not None else [])
    if recipe is None or errors(problems):
        raise RecipeError(errors(problems) or problems)
    for ref in recipe.model_refs():
        shared.check_model_ref(ref)
    out = output_path(shared.outputs_root(), (name or "").strip() or default_name(recipe))
    if out.exists() and not replace:
        raise BuildError(f"an output named {out.name!r} exists; tick 'replace' or choose another name")
    return jobs.BuildRequest(yaml_text, str(out), device=device or "auto", dtype=dtype or None,
                             shard_size=parse_size(shard_size or "5GB"), force=bool(replace))


def default_name(recipe: Recipe) -> str:
    """An output name from the recipe (its base model and expert count), not taken yet in the
    outputs folder: `smollm2-135m-instruct-4x`, then `...-4x-2`."""
    base = recipe.base_model.rstrip("/").split("/")[-1].split(":")[-1]
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", base).strip("-.")[:60] or "moe"
    return unused_name(f"{stem}-{len(recipe.experts)}x")


def unused_name(stem: str) -> str:
    """`stem`, or `stem-2`, `stem-3`...: the first name nothing in the outputs folder has."""
    root = shared.outputs_root()
    names = itertools.chain([stem], (f"{stem}-{number}" for number in itertools.count(2)))
    return next(name for name in names if not (root / name).exists())


@dataclass
class JobView:
    """What the Build or Forge tab shows at one moment of a job."""

    status: str
    log: str
    fraction: float | None = None  # None: no progress bar
    description: str = ""
    summary: str = ""
    output: str | None = None  # the finished job's folder
    finished: bool = False
    points: list[dict[str, float]] = field(default_factory=list)  # metrics so far (a forge's losses)


@dataclass
class Follower:
    """Turns a build's events into views, at most a few per second while progress streams."""

    job: jobs.Job
    queue: jobs.BuildQueue
    interval: float = 0.25
    lines: deque = field(default_factory=lambda: deque(maxlen=300))
    points: list = field(default_factory=list)
    # Where each stage's own 0..1 sits on the job's one bar.
    spans: dict = field(default_factory=lambda: SPANS)
    _last: float = 0.0
    _stage: str | None = None  # the stage the log last named, and since when
    _since: float = 0.0

    def views(self) -> Iterator[JobView]:
        fraction, description, held = None, "", False  # held: the newest progress not shown yet
        self.lines.append(f"→ {Path(self.job.request.out).name}")  # which output, also to a reopened page
        for event in self.job.stream(poll=0.5):
            if event is None or event.kind == "queued":
                place = self.queue.position(self.job)
                if place:
                    yield JobView(f"Waiting: you are number **{place}** in the queue "
                                  f"({place - 1} job(s) ahead: builds and forges take turns).", self.log)
                elif held:  # the job went quiet after an event the rate limit held back: show it now
                    held, self._last = False, time.monotonic()
                    yield JobView("", self.log, fraction, description, points=list(self.points))
                continue
            if event.kind == "log":
                self.lines.append(event.message)
            elif event.kind == "progress":
                # One bar for the whole build, never going back: the gates run beside the copy
                # and report their own stage, which names the wait but does not move the bar.
                fraction = max(fraction or 0.0, overall_fraction(event.stage, event.fraction, self.spans))
                description = progress_text(event)
                self._log_stage(event, event.at)
                if event.metrics:
                    self.points.append(event.metrics)
            if event.kind in jobs.FINAL_KINDS:
                self._log_stage(None, event.at, ENDINGS[event.kind])
                yield self.final(event)
                return
            held = True
            if time.monotonic() - self._last >= self.interval:
                held, self._last = False, time.monotonic()
                # The progress bar drawn over the status box carries the stage and time left.
                yield JobView("", self.log, fraction, description, points=list(self.points))

    def _log_stage(self, event: jobs.JobEvent | None, now: float, ending: str = "done in") -> None:
        """Each stage once in the log, with how long it took (timed by the events, so a page that
        replays a job later tells the same durations): not a line per progress event."""
        stage = None if event is None else event.stage
        if stage == self._stage:
            return
        if self._stage is not None:
            self.lines.append(f"[{self._stage}] {ending} {format_seconds(now - self._since)}")
        if event is not None:
            self.lines.append(f"[{stage}] {event.message}")
        self._stage, self._since = stage, now

    @property
    def log(self) -> str:
        return "\n".join(self.lines)

    def final(self, event: jobs.JobEvent) -> JobView:
        if event.kind == "done" and event.result:
            self.lines.append(event.message)
            return JobView("✔ Build finished.", self.log, None, "", summary_markdown(event.result),
                           event.result["path"], True)
        if event.kind == "cancelled":
            return JobView("■ Build cancelled; nothing was written.", self.log, finished=True)
        self.lines.append(f"error: {event.message}")
        return JobView(f"✖ Build failed: {html.escape(event.message)}", self.log, finished=True)


# Where each stage's own 0..1 sits on the build's one bar. The gates are computed beside the
# write (the write waits for them at the routers), so they have no span of their own.
SPANS = {"resolve": (0.0, 0.05), "demo": (0.0, 0.05), "write": (0.05, 0.95), "verify": (0.95, 1.0),
         "done": (1.0, 1.0)}


def overall_fraction(stage: str, fraction: float, spans: dict | None = None) -> float:
    low, high = (spans or SPANS).get(stage, (0.0, 0.0))
    return low + (high - low) * min(max(fraction, 0.0), 1.0)


# Stages whose own message is what a user waits on (a forge's step and loss, which sample reply).
SAID = ("forge", "samples")
# Stages whose fraction moves evenly enough for a time left that does not grow (the gates' does not).
TIMED = ("write", "forge", "gguf")


def progress_text(event: jobs.JobEvent) -> str:
    """The words on the progress bar, which draws the one percentage itself (the job's, overall)."""
    stage = STAGES.get(event.stage, event.stage.capitalize())
    said = f": {event.message}" if event.stage in SAID and event.message else ""
    if event.stage == "forge" or event.stage not in TIMED:  # a forge's message has its own time left
        return f"{stage}{said}"
    left = event.eta_seconds
    eta = "" if not left else " · almost done" if left < 1 else f" · about {format_seconds(left)} left"
    return f"{stage}{said}{eta}"


def shown_status(view: JobView, prefix: str = "") -> str | None:
    """What a job's status box says for a view: its own words, or for a running job what it does
    with one bar and one percentage (the job's), or None to leave the box as it is.

    Written into the box rather than left to Gradio's progress overlay: the overlay went away at
    every update the job's generator sent (a log line, a loss point), so a forge read as a blank
    box for minutes."""
    if view.status:
        return f"{prefix}{view.status}"
    if view.fraction is None:
        return None
    filled = round(view.fraction * BAR)
    return f"{prefix}{view.description}\n\n`{'█' * filled}{'░' * (BAR - filled)}` {view.fraction:.0%}"


BAR = 24  # characters of the status box's progress bar


def format_seconds(seconds: float) -> str:
    if seconds < 1:
        return "under a second"
    seconds = int(round(seconds))
    return f"{seconds // 60} min {seconds % 60:02d} s" if seconds >= 60 else f"{seconds} s"


def summary_markdown(result: dict) -> str:
    rows = "\n".join(f"| `{html.escape(name)}` | {human(size, 'B')} |" for name, size in result["files"])
    warnings = _warnings(result.get("gate_warnings") or [])
    return (f"**{Path(result['path']).name}**: {len(result['files'])} files, "
            f"{human(result['total_bytes'], 'B')}, built in {format_seconds(result['seconds'])}.\n\n"
            f"| file | size |\n|---|---|\n{rows}{warnings}")


def _warnings(found: list[str]) -> str:
    """Gate warnings, folded: mergekit's condition-number warning comes once per layer."""
    if not found:
        return ""
    more = f" (and {len(found) - 1} more like it; see the Preview tab)" if len(found) > 1 else ""
    return f"\n\n> ▲ {html.escape(found[0])}{more}"


def visible_builds(session_builds: list[str], *, moe_only: bool = True) -> list[str]:
    """Finished outputs this session may use, newest of its own last: on a Space only its own;
    locally also every one in the output folder. MoEs only, unless `moe_only` is off (a forged
    dense expert can be pushed, never chatted with or exported as a MoE)."""
    mine = [p for p in dict.fromkeys(session_builds) if (Path(p) / MANIFEST).is_file()]
    root = shared.outputs_root()
    others = []
    if not shared.on_space() and root.is_dir():
        others = sorted(str(p) for p in root.iterdir() if (p / MANIFEST).is_file() and str(p) not in mine)
    return [p for p in others + mine if not moe_only or is_moe(Path(p))]


def is_moe(folder: Path) -> bool:
    """A folder whose config.json declares routed experts (a build, not a forged dense expert)."""
    try:
        return routed_experts(json.loads((folder / "config.json").read_text(encoding="utf-8"))) > 0
    except (OSError, ValueError, TypeError, AttributeError):
        return False


def check_build(folder: str | None, session_builds: list[str], *, moe_only: bool = True) -> str:
    """A build folder sent by the browser, accepted only if this session may see it.

    Dropdown values come from the client; without this check a crafted request could name
    any folder on the server (another visitor's build, a model the server keeps privately).
    """
    if not folder:
        raise WorkbenchError("choose a finished build first (build one on the Build tab)")
    if folder not in visible_builds(session_builds, moe_only=moe_only):
        what = "MoE builds" if moe_only else "finished outputs"
        raise WorkbenchError(f"{Path(folder).name!r} is not one of your {what}; choose one from the list")
    return folder


def build_choices(session_builds: list[str], *, moe_only: bool = True) -> list[tuple[str, str]]:
    """(folder name, path) pairs for a dropdown."""
    return [(Path(p).name, p) for p in visible_builds(session_builds, moe_only=moe_only)]


# ---- GGUF export of a finished build -------------------------------------------------------


def gguf_note() -> str:
    """What the export panel says before anything runs: what it needs, and q4/q5."""
    from workbench.build import GGUF_INSTALL, QUANTIZE_HELP, converter_available

    head = ("Writes the build as one GGUF file beside it, with llama.cpp's own converter, and checks "
            "what it wrote (experts, experts per token, every tensor)." if converter_available() else
            f"GGUF export needs llama.cpp's converter on the server: `{GGUF_INSTALL}`.")
    return f"{head}\n\n{html.escape(QUANTIZE_HELP)}."


def export_request(folder: str | None, session_builds: list[str], out_type: str,
                   replace: bool) -> jobs.ExportRequest:
    """An export of one of this session's builds to OUTPUTS/NAME-TYPE.gguf, refused early for
    what the user can fix now."""
    from workbench.build import GGUF_TYPES, gguf_name

    folder = check_build(folder, session_builds)
    if out_type not in GGUF_TYPES:
        raise WorkbenchError(f"Type {out_type!r} is not one the converter writes; choose one of "
                             f"{', '.join(GGUF_TYPES)}")
    out = Path(folder).parent / gguf_name(Path(folder), out_type)
    if out.exists() and not replace:
        raise WorkbenchError(f"{out.name} exists; tick 'Replace an existing file' to write over it")
    return jobs.ExportRequest(folder, str(out), out_type, bool(replace))


EXPORT_SPANS = {"gguf": (0.0, 0.95), "verify": (0.95, 1.0), "done": (1.0, 1.0)}


@dataclass
class ExportFollower(Follower):
    """An export's events as views: converting, then reading the file back."""

    def __post_init__(self) -> None:
        self.spans = EXPORT_SPANS

    def final(self, event: jobs.JobEvent) -> JobView:
        result = event.result
        if event.kind == "done" and result:
            experts = f"{result['expert_count']} experts ({result['expert_used_count']} per token)"
            return JobView(f"✔ Wrote `{html.escape(result['path'])}`: {human(result['size'], 'B')} "
                           f"{result['file_type']}, {result['tensor_count']} tensors, {experts}, checked.",
                           self.log, output=result["path"], finished=True)
        if event.kind == "cancelled":
            return JobView("■ Export cancelled; nothing was written.", self.log, finished=True)
        return JobView(f"✖ Export failed: {html.escape(event.message)}", self.log, finished=True)
