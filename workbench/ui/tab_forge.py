"""Forge tab: an expert trained from a few examples (a shipped set, pasted or uploaded), with a
live loss plot and sample replies of the base and the new expert side by side."""

from __future__ import annotations

import html
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr

from workbench import jobs, timings
from workbench.errors import WorkbenchError
from workbench.forge import ForgeSettings
from workbench.ui import build_logic, forge_logic, session, shared
from workbench.ui.tab_design import DesignTab

FIRST_SET = "pirate"


@dataclass
class ForgeTab:
    forged: gr.State  # folders forged in this session, newest last
    forge_missing: Any  # handler: forge every missing expert of the Design tab's recipe
    inputs: list  # what forge_missing reads
    outputs: list  # what forge_missing writes
    reattach: session.Reattach


@dataclass
class _Controls:
    base: gr.Textbox
    set_name: gr.Dropdown
    examples: gr.Textbox
    upload: gr.UploadButton
    name: gr.Textbox
    steps: gr.Number
    lr: gr.Number
    batch: gr.Number
    seed: gr.Number
    layers: gr.Textbox
    samples: gr.Textbox
    replace: gr.Checkbox
    start: gr.Button
    stop: gr.Button
    status: gr.Markdown
    plot: gr.Plot
    summary: gr.Markdown
    log: gr.Textbox
    mine: gr.Markdown
    add: gr.Button
    job_id: gr.State
    forged: gr.State
    last: gr.State  # the folder the last forge wrote, for "Add to the recipe"


def render(design: DesignTab, owner: gr.BrowserState) -> ForgeTab:
    defaults = ForgeSettings()
    gr.Markdown("Train an expert's MLPs on a few dozen chat examples: attention, embeddings and norms stay "
                "the base's, so inside a MoE on this base the expert answers in its new style wherever the "
                f"router sends tokens to it. On the demo model a forge takes {timings.forge_each()}.",
                elem_classes="wb-muted")
    with gr.Row(equal_height=False):
        with gr.Column(scale=3):
            base = gr.Textbox(forge_logic.DEMO_BASE, label="Base model", elem_id="wb-forge-base",
                              info="the model whose MLPs train; use the recipe's base_model")
            with gr.Row(equal_height=True):
                set_name = gr.Dropdown(forge_logic.set_choices(), value=FIRST_SET, label="Examples from",
                                       elem_id="wb-forge-set", scale=3)
                upload = gr.UploadButton("Upload .jsonl", file_types=[".jsonl", ".json", ".txt"], size="sm",
                                         scale=1, elem_id="wb-forge-upload")
            examples = gr.Textbox(forge_logic.set_text(FIRST_SET), label="Examples (JSON lines)", lines=8,
                                  max_lines=14, elem_id="wb-forge-examples",
                                  info='one per line: {"prompt": ..., "reply": ...} or {"text": ...}')
            name = gr.Textbox(forge_logic.default_name(FIRST_SET), label="Output name",
                              elem_id="wb-forge-name", info="a plain folder name, beside your builds")
            with gr.Accordion("Training settings", open=False):
                with gr.Row():
                    steps = gr.Number(defaults.steps, label="Steps", precision=0, minimum=1)
                    lr = gr.Number(defaults.lr, label="Learning rate")
                    batch = gr.Number(defaults.batch_size, label="Batch size", precision=0, minimum=1)
                    seed = gr.Number(defaults.seed, label="Seed", precision=0)
                layers = gr.Textbox("", label="Layers", placeholder="all",
                                    info="e.g. 10-20; empty: every layer")
            samples = gr.Textbox("\n".join(forge_logic.DEFAULT_SAMPLES), label="Sample prompts", lines=3,
                                 info="both models answer these once the expert is forged (one per line)",
                                 elem_id="wb-forge-samples")
            replace = gr.Checkbox(False, label="Replace an existing output of this name")
            with gr.Row():
                start = gr.Button("Forge", variant="primary", elem_id="wb-forge")
                stop = gr.Button("Cancel", variant="stop", interactive=False, elem_id="wb-forge-cancel")
        with gr.Column(scale=3):
            status = gr.Markdown("Ready. Forges and builds take turns, one at a time. A forge goes on if "
                                 "you reload or close this page: reopen it to follow it, or press Cancel.",
                                 elem_id="wb-forge-status", elem_classes="wb-status", min_height=96,
                                 container=True)
            plot = gr.Plot(label="Training loss", elem_id="wb-forge-loss")
            summary = gr.Markdown(elem_id="wb-forge-summary")
            add = gr.Button("Add this expert to the recipe", visible=False, elem_id="wb-forge-add")
            mine = gr.Markdown(forge_logic.forged_list([]), elem_id="wb-forge-list")
            log = gr.Textbox(label="Log", lines=5, max_lines=5, autoscroll=True, interactive=False)
    ui = _Controls(base, set_name, examples, upload, name, steps, lr, batch, seed, layers, samples, replace,
                   start, stop, status, plot, summary, log, mine, add, gr.State(""), gr.State([]),
                   gr.State(""))
    _wire_inputs(ui)
    forge_missing, reattach = _wire_forge(design, ui, owner)
    return ForgeTab(ui.forged, forge_missing, [design.yaml, ui.forged, owner], _outputs(ui) + [design.yaml],
                    reattach)


def _outputs(ui: _Controls) -> list:
    return [ui.job_id, ui.start, ui.stop, ui.status, ui.plot, ui.summary, ui.log, ui.forged, ui.mine, ui.add,
            ui.last, ui.examples, ui.set_name, ui.name]


def _wire_inputs(ui: _Controls) -> None:
    def chosen(name: str) -> dict:
        if name == forge_logic.OWN_SET:
            return {ui.name: forge_logic.default_name("")}
        return {ui.examples: forge_logic.set_text(name), ui.name: forge_logic.default_name(name)}

    ui.set_name.input(chosen, [ui.set_name], [ui.examples, ui.name], show_progress="hidden",
                      concurrency_limit=None)

    @shared.user_errors
    def uploaded(path: str | None) -> dict:
        return {ui.examples: forge_logic.uploaded_text(path), ui.set_name: forge_logic.OWN_SET}

    ui.upload.upload(uploaded, [ui.upload], [ui.examples, ui.set_name], concurrency_limit=None)


def _wire_forge(design: DesignTab, ui: _Controls, owner: gr.BrowserState) -> tuple[Any, session.Reattach]:
    def follow(job: jobs.Job, forged: list, earlier: str = "") -> Iterator[dict]:
        """The tab's updates for one forge until it ends (the fields show what it trains). Leaving the
        page does not stop it: it belongs to the session, and a reopened page follows it again."""
        request, prefix = job.request, f"{html.escape(job.label)}: " if job.label else ""
        yield {ui.job_id: job.id, ui.start: gr.Button(interactive=False),
               ui.stop: gr.Button(interactive=True), ui.status: f"{prefix}Queued…", ui.summary: earlier,
               ui.log: "", ui.plot: None, ui.add: gr.Button(visible=False), ui.examples: request.examples,
               ui.set_name: forge_logic.set_of(request.examples), ui.name: Path(request.out).name}
        for view in forge_logic.ForgeFollower(job, jobs.default_queue()).views():
            status = build_logic.shown_status(view, prefix)
            update = {ui.log: view.log, **({ui.status: status} if status is not None else {})}
            if view.points:
                update[ui.plot] = forge_logic.loss_figure(view.points)
            if view.finished:
                update.update({ui.summary: "\n\n".join(filter(None, (earlier, view.summary))), ui.job_id: "",
                               ui.start: gr.Button(interactive=True),
                               ui.stop: gr.Button(interactive=False)})
                if view.output:
                    forged.append(view.output)
                    update.update({ui.forged: list(forged), ui.mine: forge_logic.forged_list(forged),
                                   ui.add: gr.Button(visible=True), ui.last: view.output})
            yield update
        job.seen = True  # reached only when the page took the last update

    def follow_all(found: list[jobs.Job], forged: list) -> Iterator[dict]:
        """Follow jobs one after the other; when one does not finish, the later ones are cancelled."""
        earlier = ""
        for number, job in enumerate(found):
            yield from follow(job, forged, earlier)
            if job.state != "done":
                for later in found[number + 1:]:
                    jobs.default_queue().cancel(later.id)
                return
            earlier = "\n\n".join(filter(None, (earlier, forge_logic.summary_markdown(job.result or {}))))

    @shared.user_errors
    def run(base: str, examples: str, name: str, steps: float, lr: float, batch: float, seed: float,
            layers: str, samples: str, replace: bool, forged: list, key: str,
            oauth_token: gr.OAuthToken | None = None) -> Iterator[dict]:
        try:
            request = forge_logic.make_request(base, examples, name, steps, lr, batch, seed, layers, samples,
                                               replace)
        except WorkbenchError as exc:
            yield {ui.status: f"✖ Not started: {html.escape(str(exc))}", ui.summary: ""}
            return
        job = jobs.default_queue().submit(request, token=shared.user_token(oauth_token), owner=key)
        yield from follow(job, list(forged))

    @shared.user_errors
    def forge_missing(yaml_text: str, forged: list, key: str,
                      oauth_token: gr.OAuthToken | None = None) -> Iterator[dict]:
        """Queue every expert of the recipe not forged yet, point the recipe at where each will be,
        and follow them one after the other."""
        missing = forge_logic.missing_experts(yaml_text)
        if not missing:
            yield {ui.status: "Every expert of the recipe is forged already."}
            return
        plan = forge_logic.missing_requests(missing)  # every request checked before any is queued
        pointed = forge_logic.point_recipe(yaml_text, plan)
        if pointed != yaml_text:
            yield {design.yaml: pointed}
        queued = forge_logic.submit_all(plan, shared.user_token(oauth_token), key)
        yield from follow_all(queued, list(forged))
        if all(job.state == "done" for job in queued):
            yield {ui.status: f"✔ Forged {len(queued)} expert(s); the recipe is ready to build."}

    def reattach(key: str, forged: list) -> Iterator[dict]:
        """On opening the page: the session's forged experts again, and any forge still running or
        whose end no page has shown yet, followed from its first event."""
        forged = list(dict.fromkeys([*forged, *session.finished_outputs(key, "forge")]))
        yield {ui.forged: forged, ui.mine: forge_logic.forged_list(forged)}
        yield from follow_all(session.to_follow(key, "forge"), forged)

    def cancel(job_id: str) -> str:
        if job_id and jobs.default_queue().cancel(job_id):
            return "■ Cancelling…"
        return gr.skip()

    @shared.user_errors
    def add(yaml_text: str, folder: str, examples: str) -> str:
        return forge_logic.add_expert(yaml_text, folder, examples)

    inputs = [ui.base, ui.examples, ui.name, ui.steps, ui.lr, ui.batch, ui.seed, ui.layers, ui.samples,
              ui.replace, ui.forged, owner]
    ui.start.click(run, inputs, _outputs(ui), show_progress="hidden", concurrency_limit=8)
    ui.stop.click(cancel, [ui.job_id], [ui.status], show_progress="hidden")
    ui.add.click(add, [design.yaml, ui.last, ui.examples], [design.yaml]).success(
        design.adopt, [design.yaml], design.adopt_outputs, show_progress="hidden")
    return forge_missing, session.Reattach(reattach, [owner, ui.forged], _outputs(ui))

