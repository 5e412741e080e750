"""Chat tab: one input, the base model and the MoE answering side by side, each stoppable; with the
Interventions panel, a third pane answers the same message with the same seed under them."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import gradio as gr

from workbench.chat import SamplingSettings
from workbench.spaces_compat import gpu
from workbench.ui import build_logic, chat_logic, shared, steer_logic
from workbench.ui.tab_build import BuildTab
from workbench.ui.tab_design import DesignTab


@dataclass
class Steer:
    """The Interventions panel: its controls (in `steer_logic.spec`'s order) and what goes with them."""

    controls: list  # force, layers, ban, ablate, top-k, temperature, routers
    compare: gr.Checkbox  # the third pane answers
    note: gr.Markdown
    revisions: gr.State  # this session's recipe revisions (fingerprints, first used first)
    revision: gr.State  # the revision the last message was sent with
    yaml: gr.Code  # the Design tab's recipe


@dataclass
class ChatTab:
    last: gr.State  # the last MoE reply: trace, models, prompt and reply ids (for the Routing tab)
    last_steered: gr.State  # the same for the steered pane, with the intervention it ran under
    show_routing: gr.Button
    show_steered: gr.Button  # the Routing tab for the steered reply (shown with the third pane)
    moe: gr.Dropdown
    builds: gr.State  # the Build tab's: which builds this session may use
    steer: Steer


@dataclass
class _Pane:
    side: str
    chat: gr.Chatbot
    stats: gr.Markdown
    stop: gr.Button
    column: gr.Column


def examples() -> list[str]:
    return [line for line in shared.read_asset("chat_examples.txt").splitlines()
            if line.strip() and not line.startswith("#")]


def render(built: BuildTab, tab: gr.Tab, design: DesignTab) -> ChatTab:
    last, last_steered = gr.State(None), gr.State(None)
    with gr.Row(equal_height=True):
        moe = gr.Dropdown([], label="MoE", info="a finished build", scale=3,
                          elem_id="wb-chat-moe-build")
        base = gr.Textbox(chat_logic.DEFAULT_BASE, label="Base model",
                          info="read from the MoE's recipe; change it to compare another",
                          scale=3, elem_id="wb-chat-base-model")
    with gr.Accordion("System prompt and sampling (shared by every pane)", open=False):
        system = gr.Textbox(label="System prompt", lines=2, placeholder="optional")
        with gr.Row():
            temperature = gr.Slider(0, 2, 0.7, step=0.05, label="Temperature", info="0 is greedy")
            top_p = gr.Slider(0.05, 1, 0.95, step=0.05, label="Top-p")
            top_k = gr.Slider(0, 200, 50, step=1, label="Top-k", info="0 is off")
        with gr.Row():
            max_new = gr.Slider(1, 1024, 128, step=1, label="Max new tokens", elem_id="wb-max-new")
            penalty = gr.Slider(0.5, 2, 1.0, step=0.05, label="Repetition penalty")
            seed = gr.Number(0, label="Seed", precision=0, info="same seed, same reply")
            device = gr.Dropdown(["auto", "cpu", "cuda"], value="auto", label="Device")
    steer = _steer_panel(design)
    with gr.Row(equal_height=True):
        panes = [_pane("base", "Base model"), _pane("moe", "MoE", "saved routers"),
                 _pane("steered", "MoE, steered", "under the Interventions panel", visible=False)]
    with gr.Row(equal_height=True):
        message = gr.Textbox(placeholder="Message the models…", show_label=False, scale=5, lines=1,
                             max_lines=6, elem_id="wb-chat-input", submit_btn=False)
        send = gr.Button("Send", variant="primary", scale=1, elem_id="wb-send")
    with gr.Row():
        stop_both = gr.Button("Stop all", variant="stop", size="sm")
        regenerate = gr.Button("Regenerate", size="sm")
        clear = gr.Button("Clear", size="sm")
        show_routing = gr.Button("Routing of the last reply →", size="sm", variant="secondary",
                                 elem_id="wb-open-routing")
        show_steered = gr.Button("Routing of the steered reply →", size="sm", variant="secondary",
                                 elem_id="wb-open-steered-routing", visible=False)
    tried = gr.Examples(examples(), inputs=[message], label="Try")
    settings = [system, temperature, top_p, top_k, max_new, penalty, seed, device]
    _wire(panes, message, send, stop_both, regenerate, clear, moe, base, settings, last, last_steered,
          built.builds, steer)
    _wire_models(built, tab, moe, base)

    def to_try(chosen: str | None, yaml_text: str) -> gr.Dataset:
        return gr.Dataset(samples=[[p] for p in chat_logic.try_prompts(chosen or "", yaml_text, examples())])

    for event in (tab.select, moe.change):
        event(to_try, [moe, design.yaml], [tried.dataset], show_progress="hidden")
    _wire_steer(steer, moe, panes[2], show_steered, device)
    return ChatTab(last, last_steered, show_routing, show_steered, moe, built.builds, steer)


def _pane(side: str, title: str, subtitle: str = "", *, visible: bool = True) -> _Pane:
    stops = {"base": "Stop base", "moe": "Stop MoE", "steered": "Stop steered"}
    whose = {"base": "The base model's", "moe": "The MoE's", "steered": "The steered MoE's"}
    with gr.Column(visible=visible, elem_id=f"wb-pane-{side}") as column:
        with gr.Row(equal_height=True):
            words = f"### {title}" + (f" <span class='wb-muted'>· {subtitle}</span>" if subtitle else "")
            gr.Markdown(words, elem_classes="wb-pane-title")
            stop = gr.Button(stops[side], size="sm", scale=0, min_width=110)
        chat = gr.Chatbot(label=title, show_label=False, height=420, elem_id=f"wb-chat-{side}",
                          placeholder=f"{whose[side]} replies appear here.")
        stats = gr.Markdown(elem_classes="wb-stats-line", elem_id=f"wb-stats-{side}")
    return _Pane(side, chat, stats, stop, column)


def _steer_panel(design: DesignTab) -> Steer:
    title = "Interventions: steer the MoE's router (a third pane answers under them)"
    with gr.Accordion(title, open=False, elem_id="wb-steer"):
        with gr.Row(equal_height=True):
            force = gr.Dropdown([("nobody", steer_logic.NO_FORCE)], value=steer_logic.NO_FORCE,
                                label="Force expert", info="its tokens go to it alone",
                                elem_id="wb-steer-force")
            layers = gr.Textbox("", label="on layers", placeholder="all, or e.g. 10-20", max_lines=1,
                                elem_id="wb-steer-layers")
            ban = gr.CheckboxGroup([], label="Ban", info="the router picks among the others",
                                   elem_id="wb-steer-ban")
            ablate = gr.CheckboxGroup([], label="Ablate", info="reply without it: its share is dropped",
                                      elem_id="wb-steer-ablate")
        with gr.Row(equal_height=True):
            top_k = gr.Slider(0, 4, 0, step=1, label="Experts per token", info="0: the model's own top-k",
                              elem_id="wb-steer-top-k")
            temperature = gr.Slider(0.1, 5, 1.0, step=0.1, label="Router temperature",
                                    info="1: as trained; higher spreads, lower sharpens",
                                    elem_id="wb-steer-temperature")
            routers = gr.Radio(steer_logic.ROUTER_CHOICES, value=steer_logic.SAVED, label="Routers",
                               info="new gates without a rebuild: edit a prompt on the Design tab, "
                               "send again",
                               elem_id="wb-steer-routers")
            compare = gr.Checkbox(False, label="Third pane: answer under these", elem_id="wb-steer-compare")
        note = gr.Markdown(elem_classes="wb-muted", elem_id="wb-steer-note")
    return Steer([force, layers, ban, ablate, top_k, temperature, routers], compare, note, gr.State([]),
                 gr.State(0), design.yaml)


def _settings(temperature: float, top_p: float, top_k: float, max_new: float, penalty: float,
              seed: float) -> SamplingSettings:
    return SamplingSettings(float(temperature), float(top_p), int(top_k), int(max_new), float(penalty),
                            int(seed or 0))


def _streamer(side: str):
    @gpu(duration=120)
    @shared.user_errors
    def stream(history: list, moe: str, base: str, system: str, temperature: float, top_p: float,
               top_k: float, max_new: float, penalty: float, seed: float, device: str, mine: list,
               sent: float | None, request: gr.Request, oauth_token: gr.OAuthToken | None = None):
        settings = _settings(temperature, top_p, top_k, max_new, penalty, seed)
        for update in chat_logic.reply(side, request.session_hash or "", history, moe, base, system, settings,
                                       token=shared.user_token(oauth_token), device=device,
                                       session_builds=mine, sent_at=sent):
            out = [update.history, update.stats]
            yield (*out, update.last) if side == "moe" and update.last is not None else (*out, gr.skip())

    return stream


@gpu(duration=120)
@shared.user_errors
def _steered_stream(history: list, moe: str, base: str, system: str, temperature: float, top_p: float,
                    top_k: float, max_new: float, penalty: float, seed: float, device: str, mine: list,
                    sent: float | None, compare: bool, force: Any, layers: str, ban: list, ablate: list,
                    steer_k: float, router_temperature: float, routers: str, yaml_text: str, revision: int,
                    request: gr.Request, oauth_token: gr.OAuthToken | None = None):
    """The third pane: the MoE pane's reply (same message, same seed) under the panel's intervention."""
    if not compare:
        return
    settings = _settings(temperature, top_p, top_k, max_new, penalty, seed)
    spec = steer_logic.spec(force, layers, ban, ablate, steer_k, router_temperature, routers, revision)
    steer = {"spec": spec, "yaml": yaml_text}
    for update in chat_logic.reply("steered", request.session_hash or "", history, moe, base, system,
                                   settings, token=shared.user_token(oauth_token), device=device,
                                   session_builds=mine, sent_at=sent, steer=steer):
        yield update.history, update.stats, update.last if update.last is not None else gr.skip()


def _wire(panes: list[_Pane], message: gr.Textbox, send: gr.Button, stop_both: gr.Button,
          regenerate: gr.Button, clear: gr.Button, moe: gr.Dropdown, base: gr.Textbox,
          settings: list, last: gr.State, last_steered: gr.State, builds: gr.State, steer: Steer) -> None:
    base_pane, moe_pane, steered_pane = panes
    histories = [p.chat for p in panes]
    sent = gr.State(None)  # when the message was sent: a reply's stats say how long it waited

    def streams(after: Any) -> None:
        for pane in (base_pane, moe_pane):
            after.success(_streamer(pane.side), [pane.chat, moe, base, *settings, builds, sent],
                          [pane.chat, pane.stats, last], concurrency_id="chat", concurrency_limit=4,
                          show_progress="hidden")
        after.success(_steered_stream, [steered_pane.chat, moe, base, *settings, builds, sent, steer.compare,
                                        *steer.controls, steer.yaml, steer.revision],
                      [steered_pane.chat, steered_pane.stats, last_steered], concurrency_id="chat",
                      concurrency_limit=4, show_progress="hidden")

    def revision_now(routers: str, yaml_text: str, seen: list) -> tuple[int, list]:
        # Numbered when the recipe's routers are used, so "revision N" counts what was chatted with.
        return steer_logic.revision(yaml_text, seen) if routers == steer_logic.RECIPE else (0, seen)

    @shared.user_errors
    def submit(text: str, base_history: list, moe_history: list, steered_history: list, compare: bool,
               routers: str, yaml_text: str, seen: list) -> tuple:
        base_history, moe_history, steered_next = chat_logic.add_user(text, base_history, moe_history,
                                                                      steered_history)
        revision, seen = revision_now(routers, yaml_text, seen)
        return ("", base_history, moe_history, steered_next if compare else gr.skip(), time.time(), revision,
                seen)

    routers = steer.controls[6]
    outputs = [message, *histories, sent, steer.revision, steer.revisions]
    for trigger in (send.click, message.submit):
        streams(trigger(submit, [message, *histories, steer.compare, routers, steer.yaml, steer.revisions],
                        outputs, show_progress="hidden"))

    def stopper(sides: tuple[str, ...]):
        def stop(request: gr.Request) -> None:
            chat_logic.stop(request.session_hash or "", sides)
        return stop

    for pane in panes:
        pane.stop.click(stopper((pane.side,)), None, None, show_progress="hidden")
    stop_both.click(stopper(chat_logic.SIDES), None, None, show_progress="hidden")

    def again(base_history: list, moe_history: list, steered_history: list, seed: float, routers: str,
              yaml_text: str, seen: list) -> tuple:
        # A new seed, shown in the settings: the regenerated reply is itself reproducible.
        drop = chat_logic.drop_last_reply
        revision, seen = revision_now(routers, yaml_text, seen)
        return (drop(base_history), drop(moe_history), drop(steered_history), int(seed or 0) + 1, time.time(),
                revision, seen)

    seed = settings[6]
    streams(regenerate.click(again, [*histories, seed, routers, steer.yaml, steer.revisions],
                             [*histories, seed, sent, steer.revision, steer.revisions],
                             show_progress="hidden"))
    cleared = [*histories, *(p.stats for p in panes), last, last_steered]
    clear.click(lambda: ([], [], [], "", "", "", None, None), None, cleared, show_progress="hidden")


def _wire_steer(steer: Steer, moe: gr.Dropdown, steered_pane: _Pane, show_steered: gr.Button,
                device: gr.Dropdown) -> None:
    """The panel follows the chosen MoE (its experts by name) and says, as it changes, what the
    third pane will run under; changing an intervention opens the third pane."""
    force, layers, ban, ablate, *rest = steer.controls

    def note(folder: str | None, *values: Any) -> str:
        return steer_logic.panel_note(steer_logic.spec(*values), folder)

    @shared.user_errors
    def experts(folder: str | None, layers_text: str, *others: Any) -> tuple:
        """Another MoE: its experts to choose from, and no expert chosen (numbers are per MoE)."""
        choices = steer_logic.expert_choices(folder)
        nobody = steer_logic.NO_FORCE
        top_k = min(int(others[0] or 0), len(choices)) if choices else 0
        return (gr.Dropdown(choices=[("nobody", nobody), *choices], value=nobody),
                gr.CheckboxGroup(choices=choices, value=[]), gr.CheckboxGroup(choices=choices, value=[]),
                gr.Slider(maximum=max(len(choices), 1), value=top_k),
                note(folder, nobody, layers_text, [], [], top_k, *others[1:]))

    moe.change(experts, [moe, layers, *rest], [force, ban, ablate, rest[0], steer.note],
               show_progress="hidden")

    @shared.user_errors
    def changed(folder: str | None, *values: Any) -> tuple:
        opened = steer_logic.active(steer_logic.spec(*values))
        return note(folder, *values), (True if opened else gr.skip())

    for control in steer.controls:
        control.input(changed, [moe, *steer.controls], [steer.note, steer.compare], show_progress="hidden")

    def ahead(yaml_text: str, routers: str, where: str, request: gr.Request,
              oauth_token: gr.OAuthToken | None = None) -> None:
        """With the recipe's routers chosen, an edit on the Design tab starts computing them (once
        the typing pauses), so the next reply does not wait for them."""
        if routers == steer_logic.RECIPE:
            steer_logic.prefetch(request.session_hash or "", yaml_text, token=shared.user_token(oauth_token),
                                 device=where)

    routers = steer.controls[6]
    for event in (steer.yaml.change, routers.change):
        event(ahead, [steer.yaml, routers, device], None, show_progress="hidden", concurrency_limit=None)
    steer.compare.change(lambda on: (gr.Column(visible=bool(on)), gr.Button(visible=bool(on))),
                         [steer.compare], [steered_pane.column, show_steered], show_progress="hidden")


def _wire_models(built: BuildTab, tab: gr.Tab, moe: gr.Dropdown, base: gr.Textbox) -> None:
    def refresher(newest_first: bool):
        def refresh(mine: list[str], current: str | None) -> gr.Dropdown:
            found = build_logic.build_choices(mine)
            paths = [path for _, path in found]
            if newest_first and mine and mine[-1] in paths:
                return gr.Dropdown(choices=found, value=mine[-1])  # a build just finished: talk to it
            return gr.Dropdown(choices=found, value=current if current in paths else (paths or [None])[-1])
        return refresh

    tab.select(refresher(False), [built.builds, moe], [moe], show_progress="hidden")
    built.builds.change(refresher(True), [built.builds, moe], [moe], show_progress="hidden")
    # A MoE names its base; with none chosen the box keeps what it had (the base chats alone).
    moe.change(lambda chosen: chat_logic.base_of(chosen) or gr.skip(), [moe], [base], show_progress="hidden")

    def switched(request: gr.Request) -> None:
        """Replies still coming from the MoE chosen before (its pane and the steered one) stop."""
        chat_logic.stop(request.session_hash or "", ("moe", "steered"))

    moe.change(switched, None, None, show_progress="hidden", concurrency_limit=None)
