"""The Forge tab's handlers as plain functions: a checked forge request in, views of the job out,
and the plan that forges a recipe's missing experts."""

from __future__ import annotations

import html
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from workbench import jobs, timings
from workbench.errors import ForgeError, WorkbenchError
from workbench.forge import (
    MAX_DATA_BYTES,
    ForgeSettings,
    data_path,
    example_sets,
    examples_text,
    parse_examples,
)
from workbench.recipe import parse_recipe
from workbench.staging import MANIFEST
from workbench.ui import build_logic, shared

DEMO_BASE = "demo:smollm2-135m-instruct"
OWN_SET = ""  # the set dropdown's value for "my own examples"
# Prompts in no shipped set: the samples show the style carries over to questions never trained on.
DEFAULT_SAMPLES = ("Why is the sky blue?", "How do I make pancakes?", "What should I do on a rainy day?")
SPANS = {"resolve": (0.0, 0.05), "demo": (0.0, 0.05), "forge": (0.05, 0.9), "write": (0.9, 0.96),
         "samples": (0.96, 1.0), "done": (1.0, 1.0)}


def set_choices() -> list[tuple[str, str]]:
    found = [(f"{name} ({_count(path)} examples)", name) for name, path in example_sets().items()]
    return found + [("my own examples (paste or upload)", OWN_SET)]


def _count(path: Path) -> int:
    return sum(1 for line in path.read_text(encoding="utf-8").splitlines() if line.strip())


def set_text(name: str) -> str:
    """A shipped set's JSON lines ('' for one's own: the box is left to the user)."""
    sets = example_sets()
    return sets[name].read_text(encoding="utf-8") if name in sets else ""


def uploaded_text(path: str | None) -> str:
    """An uploaded examples file's text; a bad file is refused now, its first bad line named."""
    if not path:
        return ""
    with open(path, "rb") as f:
        raw = f.read(MAX_DATA_BYTES + 1)
    parse_examples(raw, Path(path).name)
    return raw.decode("utf-8")


def loss_figure(points: list[dict[str, float]]) -> Any:
    """The training loss per step, drawn as the forge runs."""
    import plotly.graph_objects as go

    fig = go.Figure(go.Scatter(x=[p["step"] for p in points], y=[p["loss"] for p in points],
                               mode="lines+markers", name="loss",
                               hovertemplate="step %{x}: loss %{y:.3f}<extra></extra>"))
    fig.update_layout(template="plotly_white", title={"text": "Training loss (on the replies)"},
                      xaxis={"title": {"text": "step"}, "rangemode": "tozero"},
                      yaxis={"title": {"text": "loss"}, "rangemode": "tozero"}, height=300,
                      margin={"l": 50, "r": 20, "t": 50, "b": 40})
    return fig


def add_expert(yaml_text: str, folder: str, examples: str) -> str:
    """The recipe with one more expert, sourced from a forged folder and routed by a few of the
    prompts it was forged on (a start: the user makes them the theme to route)."""
    from workbench.recipe import load_yaml, patch_yaml

    data = load_yaml(yaml_text or "")
    if not isinstance(data, dict) or not isinstance(data.get("experts"), list):
        raise WorkbenchError("the Design tab's recipe has no experts list to add to; fix its YAML first")
    prompts = [e.prompt for e in parse_examples((examples or "").encode("utf-8")).items if e.prompt][:4]
    name = Path(folder).name.removesuffix("-expert")[:40] or "forged"
    data["experts"].append({"source_model": folder, "name": name,
                            "positive_prompts": prompts or ["Write your routing prompts here."]})
    patched = patch_yaml(yaml_text, data)
    if patched is None:
        raise WorkbenchError("the Design tab's recipe is not a YAML mapping; fix it first")
    return patched


def default_name(set_name: str) -> str:
    return f"{set_name or 'my'}-expert"


def parse_layers(text: str) -> tuple[int, int] | None:
    text = (text or "").strip()
    if not text:
        return None
    first, sep, last = text.partition("-")
    if not sep or not first.strip().isdigit() or not last.strip().isdigit():
        raise ForgeError(f"Layers {text!r}: write a range such as 10-20, or leave it empty for all layers")
    return int(first), int(last)


def make_request(base: str, examples: str, name: str, steps: float, lr: float, batch_size: float,
                 seed: float, layers: str, samples: str, replace: bool, *, out: Path | None = None,
                 device: str = "auto") -> jobs.ForgeRequest:
    """A forge request from the tab's fields, refused early for anything the user can fix now."""
    from workbench.build import output_path  # imports torch: only when a forge starts

    base = (base or "").strip()
    if not base:
        raise ForgeError(f"Base model is empty; the demo model is {DEMO_BASE}")
    shared.check_model_ref(base, "Base model")
    parse_examples((examples or "").encode("utf-8"), "the examples box")  # every bad line named now
    settings = ForgeSettings(steps=int(steps or 0), lr=float(lr or 0), batch_size=int(batch_size or 0),
                             seed=int(seed or 0), layers=parse_layers(layers))
    settings.check({"steps": "Steps", "lr": "Learning rate", "batch_size": "Batch size"})
    out = out or output_path(shared.outputs_root(), shared.private_name((name or "").strip()))
    if out.exists() and not replace:
        raise ForgeError(f"an output named {out.name!r} exists; tick 'replace' or choose another name")
    prompts = tuple(line.strip() for line in (samples or "").splitlines() if line.strip())
    return jobs.ForgeRequest(base, examples, str(out), settings.steps, settings.lr, settings.batch_size,
                             settings.seed, settings.layers, device=device, force=bool(replace),
                             samples=prompts[:5])


@dataclass
class Missing:
    """An expert of the recipe whose forged folder is not there yet."""

    index: int
    label: str
    base: str  # the recipe's base_model: what the expert is forged from
    data: Path
    out: Path


def missing_experts(yaml_text: str) -> list[Missing]:
    """The recipe's experts with `forge_data` whose source folder holds no finished model."""
    recipe, _ = parse_recipe(yaml_text or "")
    if recipe is None:
        return []
    found = []
    labels = recipe.expert_labels()
    for i, expert in enumerate(recipe.experts):
        if not expert.forge_data or expert.source_model == recipe.base_model:
            continue
        out = Path(expert.source_model).expanduser().resolve()
        if not (out / MANIFEST).is_file() and not (out / "config.json").is_file():
            data = data_path(expert.forge_data, allow_files=not shared.on_space(), roots=shared.model_roots())
            found.append(Missing(i, labels[i], recipe.base_model, data, out))
    return found


def missing_note(yaml_text: str) -> str:
    """The Design tab's line above the form when experts are still to be forged ('' if none)."""
    try:
        found = missing_experts(yaml_text)
    except WorkbenchError as exc:
        return f"▲ {html.escape(str(exc))}"
    if not found:
        return ""
    names = ", ".join(f"**{html.escape(m.label)}**" for m in found)
    return (f"▲ {len(found)} expert(s) of this recipe are not forged yet: {names}. Press **Forge missing "
            f"experts** ({timings.forge_each()}) before building.")


def missing_requests(missing: list[Missing]) -> list[tuple[Missing, jobs.ForgeRequest]]:
    """A forge request for each missing expert, with the default settings, into `forge_target`."""
    defaults = ForgeSettings()
    plan = []
    for expert in missing:
        out = forge_target(expert)
        plan.append((expert, make_request(
            expert.base, examples_text(expert.data), out.name, defaults.steps, defaults.lr,
            defaults.batch_size, defaults.seed, "", "\n".join(DEFAULT_SAMPLES), False, out=out)))
    return plan


def point_recipe(yaml_text: str, plan: list[tuple[Missing, jobs.ForgeRequest]]) -> str:
    """The recipe with each planned expert's source_model naming the folder it is forged into
    (unchanged where it already does), the user's comments and layout kept."""
    from workbench.recipe import load_yaml, patch_yaml

    moved = [(expert, request) for expert, request in plan if Path(request.out) != expert.out]
    if not moved:
        return yaml_text
    data = load_yaml(yaml_text)
    for expert, request in moved:
        data["experts"][expert.index]["source_model"] = request.out
    return patch_yaml(yaml_text, data) or yaml_text


def submit_all(plan: list[tuple[Missing, jobs.ForgeRequest]], token: str | None,
               owner: str) -> list[jobs.Job]:
    """Queue the plan's forges at once, so they run one after the other whether or not a page
    follows them; a full queue takes none of them."""
    queue, queued = jobs.default_queue(), []
    try:
        for number, (expert, request) in enumerate(plan, 1):
            queued.append(queue.submit(request, token=token, owner=owner,
                                       label=f"{number} of {len(plan)} ({expert.label})"))
    except jobs.QueueFull:
        for job in queued:
            queue.cancel(job.id)
        raise
    return queued


def set_of(examples: str) -> str:
    """The shipped set whose text this is, for the "Examples from" list (else one's own)."""
    for name, path in example_sets().items():
        if path.read_text(encoding="utf-8") == examples:
            return name
    return OWN_SET


def forge_target(missing: Missing) -> Path:
    """Where a missing expert is forged: a folder of its source folder's name in the outputs folder,
    the only place the app writes (a model root is a place to read models from), or the next free
    name after it (never over another output). When that is not where the recipe's source_model
    points, the recipe is pointed at it."""
    from workbench.build import output_path

    root = shared.outputs_root()
    if missing.out.parent == root and not shared.on_space():
        return output_path(root, missing.out.name)  # as the recipe says: a leftover there needs 'replace'
    return output_path(root, shared.private_name(build_logic.unused_name(missing.out.name)))


@dataclass
class ForgeFollower(build_logic.Follower):
    """A forge's events as views: the bar spans training, writing and the sample replies."""

    def __post_init__(self) -> None:
        self.spans = SPANS

    def final(self, event: jobs.JobEvent) -> build_logic.JobView:
        if event.kind == "done" and event.result:
            self.lines.append(event.message)
            result = event.result
            return build_logic.JobView(
                f"✔ Forged **{html.escape(Path(result['path']).name)}** in "
                f"{build_logic.format_seconds(result['seconds'])}.", self.log, None, "",
                summary_markdown(result), result["path"], True, list(self.points))
        if event.kind == "cancelled":
            return build_logic.JobView("■ Forge cancelled; nothing was written.", self.log, finished=True,
                                       points=list(self.points))
        self.lines.append(f"error: {event.message}")
        return build_logic.JobView(f"✖ Forge failed: {html.escape(event.message)}", self.log, finished=True,
                                   points=list(self.points))


def summary_markdown(result: dict) -> str:
    losses = result.get("losses") or []
    head = (f"**{html.escape(Path(result['path']).name)}**: {result['examples']} examples, {len(losses)} "
            f"steps, loss {losses[0]:.3f} → {losses[-1]:.3f}. Use it as an expert's source model: "
            f"`{html.escape(result['path'])}`" if losses else "")
    samples = result.get("samples") or []
    if not samples:
        return head
    rows = "\n".join(f"| {_cell(s['prompt'])} | {_cell(s['base'])} | {_cell(s['forged'])} |" for s in samples)
    return f"{head}\n\n| prompt | base | forged |\n|---|---|---|\n{rows}"


def _cell(text: str) -> str:
    return html.escape(" ".join(text.split())).replace("|", "&#124;") or "_(empty)_"


def forged_list(forged: list[str]) -> str:
    """This session's forged experts, each with the line to paste as a source model."""
    mine = [p for p in dict.fromkeys(forged) if (Path(p) / MANIFEST).is_file()]
    if not mine:
        return "_No expert forged in this session yet._"
    return "**Forged in this session** (paste as a Source model):\n\n" + "\n".join(
        f"- `{html.escape(p)}`" for p in mine)
