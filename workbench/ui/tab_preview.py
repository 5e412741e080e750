"""Preview tab: route probe texts with the recipe's gates on the base model, before any build."""

from __future__ import annotations

import gradio as gr

from workbench.spaces_compat import gpu
from workbench.ui import preview_logic, shared
from workbench.ui.tab_design import DesignTab

INTRO = ("Where would tokens go? The base model reads the text, and each layer's router input is "
         "scored against the recipe's gates, exactly as the built MoE's router would. Nothing is built.")


def render(design: DesignTab, tab: gr.Tab) -> None:
    gr.Markdown(INTRO, elem_classes="wb-muted")
    probes = preview_logic.probe_examples()
    with gr.Row(equal_height=True):
        text = gr.Textbox(probes[0] if probes else "", label="Probe text", lines=3, max_lines=10, scale=5,
                          elem_id="wb-probe", info="any text; routed token by token")
        with gr.Column(scale=1, min_width=160):
            device = gr.Dropdown(["auto", "cpu", "cuda"], value="auto", label="Device")
            run = gr.Button("Preview routing", variant="primary", elem_id="wb-preview-run")
    gr.Examples([[p] for p in probes], inputs=[text], label="Probe texts")
    note = gr.Markdown(elem_classes="wb-note", elem_id="wb-preview-note", visible=False)
    summary = gr.Markdown(elem_id="wb-preview-summary", elem_classes="wb-muted")
    heatmap = gr.Plot(label="Top expert per token and layer", elem_id="wb-preview-heatmap")
    with gr.Row(equal_height=False):
        with gr.Column():
            aligned_summary = gr.Markdown(elem_id="wb-preview-alignment-score")
            aligned = gr.Plot(label="Prompt-to-expert alignment", elem_id="wb-preview-alignment")
        similarity = gr.Plot(label="Gate diagnostics", elem_id="wb-preview-gates")

    @gpu(duration=60)
    @shared.user_errors
    def preview(yaml_text: str, probe: str, where: str, oauth_token: gr.OAuthToken | None = None,
                progress: gr.Progress = shared.PROGRESS) -> tuple:
        from workbench import routing

        progress(0.1, desc="Loading the base model and computing gates")
        token = shared.user_token(oauth_token)
        for result in shared.watched(lambda cancel: preview_logic.run_preview(
                yaml_text, probe, token=token, device=where, cancel=cancel)):
            if result is None:  # still computing: a pulse that lets a vanished client stop it
                yield (gr.skip(),) * 4
                continue
            yield (gr.Markdown(result.note, visible=True), result.summary(),
                   routing.routing_heatmap(result.trace),
                   routing.gate_similarity_figure(result.gates.diagnostics, result.names))

    @gpu(duration=60)
    @shared.user_errors
    def alignment(yaml_text: str, where: str, oauth_token: gr.OAuthToken | None = None):
        from workbench import routing

        token = shared.user_token(oauth_token)
        for done in shared.watched(lambda cancel: preview_logic.run_alignment(
                yaml_text, token=token, device=where, cancel=cancel)):
            if done is None:
                yield gr.skip(), gr.skip()
                continue
            recipe, found = done
            figure = routing.alignment_figure(found, recipe.expert_labels())
            yield preview_logic.alignment_summary(found), figure

    inputs = [design.yaml, text, device]
    outputs = [note, summary, heatmap, similarity]
    # The heatmap first; the alignment (every positive prompt routed) follows in its own event.
    for trigger in (run.click, text.submit, tab.select):  # on select: refreshed after a recipe edit
        trigger(preview, inputs, outputs, show_progress_on=[heatmap], concurrency_id="gpu",
                trigger_mode="always_last").success(
            alignment, [design.yaml, device], [aligned_summary, aligned], show_progress_on=[aligned],
            concurrency_id="gpu")
