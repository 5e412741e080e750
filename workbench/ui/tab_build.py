"""Build tab: output settings, build with progress / cancel / log / summary, download, GGUF export,
push to the Hub."""

from __future__ import annotations

import html
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import gradio as gr

from workbench import build, jobs
from workbench.errors import WorkbenchError
from workbench.ui import build_logic, session, shared
from workbench.ui.tab_design import DesignTab

DTYPES = [("as the recipe says", ""), ("bfloat16", "bfloat16"), ("float16", "float16"),
          ("float32", "float32"), ("float64", "float64")]


@dataclass
class BuildTab:
    builds: gr.State  # folders built in this session, newest last; other tabs watch it
    reattach: list[session.Reattach]  # the build's and the export's, run when a page opens


@dataclass
class _Controls:
    name: gr.Textbox
    device: gr.Dropdown
    dtype: gr.Dropdown
    shard: gr.Textbox
    replace: gr.Checkbox
    start: gr.Button
    stop: gr.Button
    status: gr.Markdown
    summary: gr.Markdown
    log: gr.Textbox
    job_id: gr.State
    builds: gr.State


def render(design: DesignTab, tab: gr.Tab, owner: gr.BrowserState) -> BuildTab:
    builds = gr.State([])
    with gr.Row(equal_height=False):
        with gr.Column(scale=3):
            ui = _controls(builds)
        with gr.Column(scale=2):
            download = gr.Button("Download recipe YAML", elem_id="wb-download", variant="secondary")
            exported, exports = _gguf_panel(builds, owner)
            model = _push_panel(builds)
    reattach = _wire_build(design, ui, owner)

    def refresh(mine: list[str]) -> tuple[gr.Dropdown, gr.Dropdown]:
        # Any finished output can be pushed (a forged expert too); only MoEs export as one.
        dropdowns = []
        for moe_only in (False, True):
            found = build_logic.build_choices(mine, moe_only=moe_only)
            dropdowns.append(gr.Dropdown(choices=found, value=found[-1][1] if found else None))
        return tuple(dropdowns)

    # The browser saves the editor's text itself: no server file to cap, clean up or serve.
    download.click(None, [design.yaml], None, js=SAVE_RECIPE)
    for event in (tab.select, builds.change):
        event(refresh, [builds], [model, exported], show_progress="hidden")
    return BuildTab(builds, [reattach, exports])


def _controls(builds: gr.State) -> _Controls:
    with gr.Group():
        name = gr.Textbox("", label="Output name", elem_id="wb-output-name",
                          placeholder="empty: named after the recipe (e.g. smollm2-135m-instruct-4x), never "
                          "one that exists",
                          info="a plain folder name; builds go to "
                          + ("this Space's storage" if shared.on_space() else str(shared.outputs_root())))
        with gr.Row():
            device = gr.Dropdown(["auto", "cpu", "cuda"], value="auto", label="Device",
                                 info="where the gates are computed")
            dtype = gr.Dropdown(DTYPES, value="", label="dtype", info="of the written weights")
            shard = gr.Textbox("5GB", label="Largest shard", info="e.g. 5GB, 500MB")
        replace = gr.Checkbox(False, label="Replace an existing output of this name "
                              "(the old one stays until the new one is verified)")
    with gr.Row():
        start = gr.Button("Build", variant="primary", elem_id="wb-build")
        stop = gr.Button("Cancel", variant="stop", interactive=False, elem_id="wb-cancel")
    # Tall enough for a running build's line and its progress bar (build_logic.shown_status).
    status = gr.Markdown("Ready. One build runs at a time; others wait in a queue. A build goes on if you "
                         "reload or close this page: reopen it to follow it, or press Cancel to stop it.",
                         elem_id="wb-build-status", elem_classes="wb-status", min_height=96, container=True)
    summary = gr.Markdown(elem_id="wb-build-summary")
    log = gr.Textbox(label="Log", lines=8, max_lines=8, autoscroll=True, interactive=False,
                     elem_id="wb-build-log")
    return _Controls(name, device, dtype, shard, replace, start, stop, status, summary, log, gr.State(""),
                     builds)


SAVE_RECIPE = """(text) => {
  const link = document.createElement("a");
  link.href = URL.createObjectURL(new Blob([text], {type: "application/x-yaml"}));
  link.download = "recipe.yaml";
  document.body.appendChild(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(link.href), 1000);
}"""


def _wire_build(design: DesignTab, ui: _Controls, owner: gr.BrowserState) -> session.Reattach:
    def follow(job: jobs.Job, mine: list) -> Iterator[dict]:
        """The tab's updates for one build until it ends. Leaving the page does not stop the build:
        it belongs to the session, and a reopened page follows it again (`reattach`)."""
        queue = jobs.default_queue()
        yield {ui.job_id: job.id, ui.start: gr.Button(interactive=False),
               ui.stop: gr.Button(interactive=True), ui.status: "Queued…", ui.summary: "", ui.log: ""}
        for view in build_logic.Follower(job, queue).views():
            status = build_logic.shown_status(view)
            update = {ui.log: view.log, **({ui.status: status} if status is not None else {})}
            if view.finished:
                update.update({ui.summary: view.summary, ui.job_id: "",
                               ui.start: gr.Button(interactive=True),
                               ui.stop: gr.Button(interactive=False)})
                if view.output:
                    update[ui.builds] = [*mine, view.output]
            yield update
        job.seen = True  # reached only when the page took the last update

    @shared.user_errors
    def run(yaml_text: str, name: str, device: str, dtype: str, shard: str, replace: bool, mine: list,
            key: str, oauth_token: gr.OAuthToken | None = None):
        try:
            request = build_logic.make_request(yaml_text, name, device, dtype, shard, replace)
        except WorkbenchError as exc:  # said where the old "Build finished" would still stand
            yield {ui.status: f"✖ Not started: {html.escape(str(exc))}", ui.summary: ""}
            return
        job = jobs.default_queue().submit(request, token=shared.user_token(oauth_token), owner=key)
        yield from follow(job, mine)

    def reattach(key: str, mine: list) -> Iterator[dict]:
        """On opening the page: the session's builds again, and any build still running or whose end
        no page has shown yet, followed from its first event."""
        mine = list(dict.fromkeys([*mine, *session.finished_outputs(key, "build")]))
        yield {ui.builds: mine}
        for job in session.to_follow(key, "build"):
            yield from follow(job, mine)

    def cancel(job_id: str) -> str:
        if job_id and jobs.default_queue().cancel(job_id):
            return "■ Cancelling…"
        return gr.skip()

    inputs = [design.yaml, ui.name, ui.device, ui.dtype, ui.shard, ui.replace, ui.builds, owner]
    outputs = [ui.job_id, ui.start, ui.stop, ui.status, ui.summary, ui.log, ui.builds]
    # Many sessions may wait here at once (each shows its queue place); jobs.py runs one build at a time.
    ui.start.click(run, inputs, outputs, show_progress="hidden", concurrency_limit=8)
    ui.stop.click(cancel, [ui.job_id], [ui.status], show_progress="hidden")
    return session.Reattach(reattach, [owner, ui.builds], outputs)


def _gguf_panel(builds: gr.State, owner: gr.BrowserState) -> tuple[gr.Dropdown, session.Reattach]:
    with gr.Accordion("Export as GGUF (llama.cpp)", open=False, elem_id="wb-gguf"):
        gr.Markdown(build_logic.gguf_note(), elem_classes="wb-muted")
        model = gr.Dropdown([], label="Build to export")
        with gr.Row():
            kind = gr.Dropdown(list(build.GGUF_TYPES), value="f16", label="Type", info="q8_0: half the size")
            replace = gr.Checkbox(False, label="Replace an existing file")
        with gr.Row():
            start = gr.Button("Export GGUF", variant="secondary", elem_id="wb-gguf-export",
                              interactive=build.converter_available())
            stop = gr.Button("Cancel export", variant="stop", interactive=False, elem_id="wb-gguf-cancel")
        status = gr.Markdown(elem_id="wb-gguf-status", min_height=48)
        job_id = gr.State("")

    def follow(job: jobs.Job) -> Iterator[dict]:
        """The panel's updates for one export until it ends; like a build, it outlives the page."""
        yield {job_id: job.id, start: gr.Button(interactive=False), stop: gr.Button(interactive=True),
               status: f"Exporting `{html.escape(Path(job.request.out).name)}`… (it takes turns with builds "
                       "and forges)"}
        for view in build_logic.ExportFollower(job, jobs.default_queue()).views():
            shown = build_logic.shown_status(view)
            update = {status: shown} if shown is not None else {}
            if view.finished:
                update.update({job_id: "", start: gr.Button(interactive=build.converter_available()),
                               stop: gr.Button(interactive=False)})
            if update:
                yield update
        job.seen = True  # reached only when the page took the last update

    @shared.user_errors
    def export(folder: str, mine: list, out_type: str, overwrite: bool, key: str) -> Iterator[dict]:
        request = build_logic.export_request(folder, mine, out_type, overwrite)
        yield from follow(jobs.default_queue().submit(request, owner=key))

    def reattach(key: str) -> Iterator[dict]:
        for job in session.to_follow(key, "export"):
            yield from follow(job)

    def cancel(current: str) -> str:
        if current and jobs.default_queue().cancel(current):
            return "■ Cancelling…"
        return gr.skip()

    outputs = [job_id, start, stop, status]
    # Many sessions may wait at once; the job queue runs one export (or build, or forge) at a time.
    start.click(export, [model, builds, kind, replace, owner], outputs, show_progress="hidden",
                concurrency_limit=8)
    stop.click(cancel, [job_id], [status], show_progress="hidden")
    return model, session.Reattach(reattach, [owner], outputs)


def _push_panel(builds: gr.State) -> gr.Dropdown:
    with gr.Accordion("Push to the Hugging Face Hub", open=False, elem_id="wb-push"):
        if shared.on_space() and shared.oauth_available():
            gr.LoginButton()
        elif shared.on_space():
            gr.Markdown("Sign-in is not set up on this Space (it needs `gradio[oauth]` and "
                        "`hf_oauth: true`), so pushing is off: a visitor never pushes with the Space "
                        "owner's token.",
                        elem_classes="wb-muted")
        else:
            gr.Markdown("Uses the `HF_TOKEN` environment variable (never shown, logged or saved).",
                        elem_classes="wb-muted")
        model = gr.Dropdown([], label="Build or forged expert to push")
        repo = gr.Textbox(label="Repo id", placeholder="your-name/my-moe")
        with gr.Row():
            private = gr.Checkbox(True, label="Private")
            overwrite = gr.Checkbox(False, label="Replace the repo if it exists")
        card_button = gr.Button("Show the model card", size="sm")
        card = gr.Markdown(elem_classes="wb-card-preview")
        push = gr.Button("Push", variant="primary")
        status = gr.Markdown()

    @shared.user_errors
    def show_card(folder: str, mine: list) -> str:
        card = build.model_card(Path(build_logic.check_build(folder, mine, moe_only=False)))
        return card or "_This build has no model card._"

    @shared.user_errors
    def do_push(folder: str, mine: list, repo_id: str, private: bool, overwrite: bool,
                oauth_token: gr.OAuthToken | None = None, progress: gr.Progress = shared.PROGRESS) -> str:
        folder = build_logic.check_build(folder, mine, moe_only=False)
        result = build.push(Path(folder), (repo_id or "").strip(), token=shared.user_token(oauth_token) or "",
                          private=private, overwrite=overwrite,
                          on_progress=lambda e: progress(e.fraction, desc=f"{e.stage}: {e.message}"))
        made = "new repo" if result.created else "replaced"
        return f"✔ Pushed {len(result.files)} files ({made}): [{result.repo_id}]({result.url})"

    card_button.click(show_card, [model, builds], [card])
    push.click(do_push, [model, builds, repo, private, overwrite], [status], concurrency_limit=2)
    return model
