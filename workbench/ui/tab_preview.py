"""Preview tab: route probe texts with the recipe's gates on the base model, before any build."""

from __future__ import annotations

import gradio as gr

from workbench import timings
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
    score_summary = gr.Markdown(elem_id="wb-preview-score-summary")
    scored = gr.Plot(label="Held-out routing", elem_id="wb-preview-score")
    with gr.Group():
        with gr.Row(equal_height=True):
            gr.Markdown("**Which gate mode routes this recipe best?** Every mode scored on the same held-out "
                        f"prompts, side by side ({timings.compare_modes()}).",
                        elem_classes="wb-muted")
            compare = gr.Button("Compare gate modes", elem_id="wb-compare-run", scale=0, min_width=200)
        compared = gr.Markdown(elem_id="wb-compare-table")
        best = gr.State(None)  # (gate_mode, center_gates) of the comparison's best
        use_best = gr.Button("Use the best mode", variant="primary", visible=False, elem_id="wb-compare-use")
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
    def held_out(yaml_text: str, where: str, oauth_token: gr.OAuthToken | None = None):
        from workbench import routing

        token = shared.user_token(oauth_token)
        for done in shared.watched(lambda cancel: preview_logic.run_score(
                yaml_text, token=token, device=where, cancel=cancel)):
            if done is None:
                yield gr.skip(), gr.skip()
                continue
            recipe, score, advice = done
            figure = routing.heldout_figure(score, recipe.expert_labels())
            yield preview_logic.score_summary(score, advice), figure

    @gpu(duration=120)
    @shared.user_errors
    def compare_modes(yaml_text: str, where: str, oauth_token: gr.OAuthToken | None = None,
                      progress: gr.Progress = shared.PROGRESS):
        progress(0.05, desc="Scoring every gate mode on held-out prompts")
        token = shared.user_token(oauth_token)
        for done in shared.watched(lambda cancel: preview_logic.run_compare(
                yaml_text, token=token, device=where, cancel=cancel)):
            if done is None:
                yield gr.skip(), gr.skip(), gr.skip()
                continue
            recipe, results = done
            top = results[0]
            own = (top.mode, top.center) == (recipe.gate_mode, bool(recipe.center_gates))
            button = gr.Button(f"Use {top.label} (top-1 {top.score.top1:.2f})", visible=not own) \
                if top.score.top1 is not None else gr.Button(visible=False)
            yield preview_logic.compare_table(results, recipe), (top.mode, top.center), button

    @shared.user_errors
    def adopt_best(yaml_text: str, chosen: tuple | None) -> tuple:
        if not chosen:
            raise gr.Error("Compare the gate modes first.")
        mode, center = chosen
        gr.Info(f"gate_mode is now {mode}" + (" with center_gates: true" if center else "")
                + "; the Design tab's YAML keeps everything else as you wrote it.")
        return preview_logic.with_mode(yaml_text, mode, center), gr.Button(visible=False)

    inputs = [design.yaml, text, device]
    outputs = [note, summary, heatmap, similarity]
    # The heatmap first; the held-out score (gates made again without each fold) follows in its own event.
    for trigger in (run.click, text.submit, tab.select):  # on select: refreshed after a recipe edit
        trigger(preview, inputs, outputs, show_progress_on=[heatmap], concurrency_id="gpu",
                trigger_mode="always_last").success(
            held_out, [design.yaml, device], [score_summary, scored], show_progress_on=[scored],
            concurrency_id="gpu")
    compare.click(compare_modes, [design.yaml, device], [compared, best, use_best],
                  show_progress_on=[compared], concurrency_id="gpu")
    use_best.click(adopt_best, [design.yaml, best], [design.yaml, use_best]).success(
        design.adopt, [design.yaml], design.adopt_outputs, show_progress="hidden").success(
        preview, inputs, outputs, show_progress_on=[heatmap], concurrency_id="gpu").success(
        held_out, [design.yaml, device], [score_summary, scored], show_progress_on=[scored],
        concurrency_id="gpu")
