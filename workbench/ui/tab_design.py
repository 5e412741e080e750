"""Design tab: pick a preset or start blank, edit the recipe as a form or as YAML, see problems and sizes."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import gradio as gr

from workbench.ui import design_logic, forge_logic, form, shared
from workbench.ui.design_form import DesignOutputs, render_form


@dataclass
class DesignTab:
    yaml: gr.Code  # the recipe as text: Preview and Build read it
    draft: gr.State
    # For another tab that writes the YAML (Preview's "Use the best mode"): chained after it,
    # adopt(yaml) re-checks the recipe and redraws the form from it.
    adopt: Callable[..., dict]
    adopt_outputs: set
    forge_missing: gr.Button  # shown while experts of the recipe (forge_data) are still to be forged


def render(demo: gr.Blocks) -> DesignTab:
    text, checked = design_logic.initial()
    names = design_logic.preset_names()
    out = DesignOutputs(
        draft=gr.State(checked.draft),
        revision=gr.State(0),
        yaml=gr.Code(text, language="yaml", label="Recipe YAML (mergekit-moe format)", interactive=True,
                     lines=18, max_lines=40, elem_id="wb-yaml", wrap_lines=True, render=False),
        yaml_problems=gr.HTML(checked.problems_html, elem_id="wb-yaml-problems", elem_classes="wb-slot",
                              render=False),
        summary=gr.HTML(checked.summary(), elem_id="wb-summary", render=False),
        timer=gr.Timer(1.0, active=False),
    )
    with gr.Row(equal_height=False):
        with gr.Column(scale=3, elem_classes="wb-form-col"):
            with gr.Row(equal_height=True, elem_classes="wb-preset-row"):
                preset = gr.Dropdown(names, value=names[0], label="Start from", scale=1, elem_id="wb-preset",
                                     info="a preset recipe, or blank")
                about = gr.Markdown(design_logic.preset_description(text), elem_classes="wb-muted")
            with gr.Row(equal_height=True, elem_classes="wb-forge-row"):
                note = forge_logic.missing_note(text)
                missing = gr.Markdown(note, elem_id="wb-missing-experts", scale=3)
                forge = gr.Button("Forge missing experts", variant="primary", visible=bool(note), scale=1,
                                  elem_id="wb-forge-missing")
            render_form(out, demo)
        with gr.Column(scale=2, elem_classes="wb-side-col"):
            out.summary.render()
            out.yaml.render()
            out.yaml_problems.render()
    notes = _Missing(missing, forge)
    adopt = _wire(demo, out, preset, about, notes)
    return DesignTab(out.yaml, out.draft, adopt,
                     {out.draft, out.revision, out.yaml_problems, out.summary, missing, forge}, forge)


@dataclass
class _Missing:
    """The line and button offering to forge a recipe's missing experts; updated when a preset
    is chosen or a recipe adopted, never per keystroke."""

    note: gr.Markdown
    button: gr.Button

    def update(self, text: str) -> dict:
        note = forge_logic.missing_note(text)
        return {self.note: note, self.button: gr.Button(visible=bool(note))}


def _wire(demo: gr.Blocks, out: DesignOutputs, preset: gr.Dropdown, about: gr.Markdown,
          notes: _Missing) -> Callable[..., dict]:
    @shared.user_errors
    def yaml_edited(text: str, draft: dict, oauth_token: gr.OAuthToken | None = None) -> dict:
        checked, problems = design_logic.from_yaml(text, shared.user_token(oauth_token))
        if checked is None:  # not a recipe yet: keep the form, show why next to the editor
            return {out.yaml_problems: form.problems_html(problems, show_path=True),
                    out.summary: design_logic.status_line(None, problems)}
        update: dict[Any, Any] = {out.draft: checked.draft, out.yaml_problems: checked.problems_html,
                                  out.summary: checked.summary(), out.timer: gr.Timer(active=checked.pending)}
        if checked.draft != draft:
            update[out.revision] = design_logic.next_revision()  # re-render the form
        return update

    everything = {out.draft, out.revision, out.yaml_problems, out.summary, out.timer}
    # The per-keystroke checks are light and each session's own run one at a time (the browser
    # sends the next only when the last is done), so sessions never queue behind each other:
    # with the default limit of 1, one session's first read of a Hub config held up everyone's.
    out.yaml.input(yaml_edited, [out.yaml, out.draft], everything, show_progress="hidden",
                   trigger_mode="always_last", concurrency_limit=None)

    @shared.user_errors
    def preset_chosen(name: str, oauth_token: gr.OAuthToken | None = None) -> dict:
        text = design_logic.preset_text(name)
        checked, problems = design_logic.from_yaml(text, shared.user_token(oauth_token))
        return {out.yaml: text, out.draft: checked.draft, out.revision: design_logic.next_revision(),
                out.yaml_problems: checked.problems_html, out.summary: checked.summary(),
                about: design_logic.preset_description(text), out.timer: gr.Timer(active=checked.pending),
                **notes.update(text)}

    preset.input(preset_chosen, [preset], everything | {out.yaml, about, notes.note, notes.button},
                 concurrency_limit=None)

    # The form renders at once on load; the models' configs (the demo model may first need
    # dequantising) are read after, and may add compatibility problems.
    demo.load(yaml_edited, [out.yaml, out.draft], everything, show_progress="hidden", concurrency_limit=None)

    @shared.user_errors
    def fetched(text: str, oauth_token: gr.OAuthToken | None = None) -> dict:
        """A tick while a Hub config is fetched: once it is in, the checks that waited for it.
        A tick costs nothing while the fetch runs; the form is not redrawn (the user may be
        typing in it), its problems follow the next edit."""
        token = shared.user_token(oauth_token)
        if design_logic.fetching(text, token):
            return {}
        checked, _ = design_logic.from_yaml(text, token)
        if checked is None:
            return {out.timer: gr.Timer(active=False)}
        return {out.draft: checked.draft, out.yaml_problems: checked.problems_html,
                out.summary: checked.summary(), out.timer: gr.Timer(active=False)}

    out.timer.tick(fetched, [out.yaml], {out.draft, out.yaml_problems, out.summary, out.timer},
                   show_progress="hidden", concurrency_limit=None)

    @shared.user_errors
    def adopt(text: str, oauth_token: gr.OAuthToken | None = None) -> dict:
        checked, problems = design_logic.from_yaml(text, shared.user_token(oauth_token))
        if checked is None:
            return {out.yaml_problems: form.problems_html(problems, show_path=True),
                    out.summary: design_logic.status_line(None, problems)}
        return {out.draft: checked.draft, out.revision: design_logic.next_revision(),
                out.yaml_problems: checked.problems_html, out.summary: checked.summary(),
                **notes.update(text)}

    return adopt
