"""Routing tab: every router decision of the last chat reply (or any text), layer by layer."""

from __future__ import annotations

from typing import Any

import gradio as gr

from workbench.spaces_compat import gpu
from workbench.ui import build_logic, routing_logic, shared, steer_logic
from workbench.ui.tab_chat import ChatTab

SOURCES = ["Last chat reply", "Last steered reply", "This text"]
KINDS = {SOURCES[0]: "reply", SOURCES[1]: "steered", SOURCES[2]: "text"}
INTRO = ("Each cell is one token at one layer, coloured by the expert its router ranked first; hover for "
         "the top-k experts and their weights. The dashed line separates the prompt from the generated "
         "tokens. The divergence strip shows where the MoE's next-token distribution left the base model's. "
         "Under an intervention (the Chat tab's third pane), × marks each cell where other experts ran "
         "than the saved routers chose.")


def render(chat: ChatTab, tab: gr.Tab, tabs: gr.Tabs) -> None:
    gr.Markdown(INTRO, elem_classes="wb-muted")
    view = gr.State(None)
    with gr.Row(equal_height=False):
        source = gr.Radio(SOURCES, value=SOURCES[0], label="Route", scale=1)
        text = gr.Textbox(label="Text (for 'This text')", lines=2, scale=4,
                          placeholder="any text, routed through the MoE chosen on the Chat tab")
        with gr.Column(scale=1, min_width=160):
            steered = gr.Checkbox(False, label="under the Chat tab's interventions",
                                  elem_id="wb-routing-steered")
            show = gr.Button("Show routing", variant="primary", elem_id="wb-routing-run")
    summary = gr.Markdown(elem_id="wb-routing-summary")
    heatmap = gr.Plot(label="Top expert per token and layer", elem_id="wb-routing-heatmap")
    divergence = gr.Plot(label="Base vs MoE divergence", visible=False, elem_id="wb-routing-divergence")
    with gr.Row(equal_height=False):
        with gr.Column(scale=1):
            layer = gr.Slider(0, 29, 0, step=1, label="Layer", elem_id="wb-routing-layer")
            per_layer = gr.Plot(label="Router probabilities at one layer")
        with gr.Column(scale=1):
            load = gr.Plot(label="Expert load per layer")
    entropy = gr.Plot(label="Routing entropy per layer")

    @gpu(duration=60)
    @shared.user_errors
    def route(kind: str, typed: str, last: dict | None, last_steered: dict | None, moe: str | None,
              mine: list, at: float, under: bool, yaml_text: str, seen: list, force: Any, layers: str,
              ban: list, ablate: list, top_k: float, temperature: float, routers: str,
              oauth_token: gr.OAuthToken | None = None, progress: gr.Progress = shared.PROGRESS) -> dict:
        token = shared.user_token(oauth_token)
        source = KINDS.get(kind, "reply")
        reply = last_steered if source == "steered" else last
        first = routing_logic.nothing_to_route(source, reply, moe)
        if first:  # an empty state says what to do, not "Error"
            return {summary: first, heatmap: None, per_layer: None, load: None, entropy: None,
                    divergence: gr.Plot(None, visible=False), view: None, layer: gr.skip()}
        progress(0.2, desc="Tracing")
        if source == "text":
            controls = (force, layers, ban, ablate, top_k, temperature, routers)
            steer = steer_logic.steer_of(controls, yaml_text, seen) if under else None
            shown = routing_logic.from_text(build_logic.check_build(moe, mine), typed, token=token,
                                            steer=steer)
        else:
            shown = routing_logic.from_reply(reply, token=token)
        return _show(shown, at) | {view: shown}

    def _show(shown: routing_logic.RoutingView, at: float) -> dict:
        figures = shown.figures(at)
        last_layer = shown.trace.layers - 1
        return {summary: shown.summary(), heatmap: figures["heatmap"], per_layer: figures["layer"],
                load: figures["load"], entropy: figures["entropy"],
                layer: gr.Slider(maximum=last_layer, value=min(int(at or 0), last_layer)),
                divergence: gr.Plot(figures["divergence"], visible=figures["divergence"] is not None)}

    @shared.user_errors
    def relayer(shown: routing_logic.RoutingView | None, at: float) -> dict:
        if shown is None:
            return {per_layer: gr.skip()}
        return {per_layer: shown.layer_figure(at)}

    outputs = {view, summary, heatmap, per_layer, load, entropy, layer, divergence}
    steer = chat.steer
    inputs = [source, text, chat.last, chat.last_steered, chat.moe, chat.builds, layer, steered, steer.yaml,
              steer.revisions, *steer.controls]
    show.click(route, inputs, outputs, show_progress_on=[heatmap], concurrency_id="gpu")
    layer.release(relayer, [view, layer], {per_layer}, show_progress="hidden")
    chat.show_routing.click(lambda: (gr.Tabs(selected="routing"), SOURCES[0]), None, [tabs, source]).then(
        route, inputs, outputs, show_progress_on=[heatmap], concurrency_id="gpu")
    chat.show_steered.click(lambda: (gr.Tabs(selected="routing"), SOURCES[1]), None, [tabs, source]).then(
        route, inputs, outputs, show_progress_on=[heatmap], concurrency_id="gpu")
