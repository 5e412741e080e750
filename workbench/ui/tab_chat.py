"""Chat tab: one input, the base model and the MoE answering side by side, each stoppable."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import gradio as gr

from workbench.chat import SamplingSettings
from workbench.spaces_compat import gpu
from workbench.ui import build_logic, chat_logic, shared
from workbench.ui.tab_build import BuildTab


@dataclass
class ChatTab:
    last: gr.State  # the last MoE reply: trace, models, prompt and reply ids (for the Routing tab)
    show_routing: gr.Button
    moe: gr.Dropdown
    builds: gr.State  # the Build tab's: which builds this session may use


@dataclass
class _Pane:
    side: str
    chat: gr.Chatbot
    stats: gr.Markdown
    stop: gr.Button


def examples() -> list[str]:
    return [line for line in shared.read_asset("chat_examples.txt").splitlines()
            if line.strip() and not line.startswith("#")]


def render(built: BuildTab, tab: gr.Tab) -> ChatTab:
    last = gr.State(None)
    with gr.Row(equal_height=True):
        moe = gr.Dropdown([], label="MoE", info="a finished build", scale=3,
                          elem_id="wb-chat-moe-build")
        base = gr.Textbox(chat_logic.DEFAULT_BASE, label="Base model",
                          info="read from the MoE's recipe; change it to compare another",
                          scale=3, elem_id="wb-chat-base-model")
    with gr.Accordion("System prompt and sampling (shared by both sides)", open=False):
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
    with gr.Row(equal_height=True):
        panes = [_pane("base", "Base model"), _pane("moe", "MoE")]
    with gr.Row(equal_height=True):
        message = gr.Textbox(placeholder="Message both models…", show_label=False, scale=5, lines=1,
                             max_lines=6, elem_id="wb-chat-input", submit_btn=False)
        send = gr.Button("Send", variant="primary", scale=1, elem_id="wb-send")
    with gr.Row():
        stop_both = gr.Button("Stop both", variant="stop", size="sm")
        regenerate = gr.Button("Regenerate", size="sm")
        clear = gr.Button("Clear", size="sm")
        show_routing = gr.Button("Routing of the last reply →", size="sm", variant="secondary",
                                 elem_id="wb-open-routing")
    gr.Examples(examples(), inputs=[message], label="Try")
    settings = [system, temperature, top_p, top_k, max_new, penalty, seed, device]
    _wire(panes, message, send, stop_both, regenerate, clear, moe, base, settings, last, built.builds)
    _wire_models(built, tab, moe, base)
    return ChatTab(last, show_routing, moe, built.builds)


def _pane(side: str, title: str) -> _Pane:
    with gr.Column():
        with gr.Row(equal_height=True):
            gr.Markdown(f"### {title}", elem_classes="wb-pane-title")
            stop = gr.Button(f"Stop {title.split()[0].lower() if side == 'base' else 'MoE'}", size="sm",
                             scale=0, min_width=110)
        chat = gr.Chatbot(label=title, show_label=False, height=420, elem_id=f"wb-chat-{side}",
                          placeholder=f"The {title.lower()}'s replies appear here.")
        stats = gr.Markdown(elem_classes="wb-stats-line", elem_id=f"wb-stats-{side}")
    return _Pane(side, chat, stats, stop)


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


def _wire(panes: list[_Pane], message: gr.Textbox, send: gr.Button, stop_both: gr.Button,
          regenerate: gr.Button, clear: gr.Button, moe: gr.Dropdown, base: gr.Textbox,
          settings: list, last: gr.State, builds: gr.State) -> None:
    base_pane, moe_pane = panes
    sent = gr.State(None)  # when the message was sent: a reply's stats say how long it waited

    def streams(after: Any) -> None:
        for pane in panes:
            after.success(_streamer(pane.side), [pane.chat, moe, base, *settings, builds, sent],
                          [pane.chat, pane.stats, last], concurrency_id="chat", concurrency_limit=4,
                          show_progress="hidden")

    @shared.user_errors
    def submit(text: str, base_history: list, moe_history: list) -> tuple:
        base_history, moe_history = chat_logic.add_user(text, base_history, moe_history)
        return "", base_history, moe_history, time.time()

    for trigger in (send.click, message.submit):
        streams(trigger(submit, [message, base_pane.chat, moe_pane.chat],
                        [message, base_pane.chat, moe_pane.chat, sent], show_progress="hidden"))

    def stopper(sides: tuple[str, ...]):
        def stop(request: gr.Request) -> None:
            chat_logic.stop(request.session_hash or "", sides)
        return stop

    for pane in panes:
        pane.stop.click(stopper((pane.side,)), None, None, show_progress="hidden")
    stop_both.click(stopper(chat_logic.SIDES), None, None, show_progress="hidden")

    def again(base_history: list, moe_history: list, seed: float) -> tuple:
        # A new seed, shown in the settings: the regenerated reply is itself reproducible.
        drop = chat_logic.drop_last_reply
        return drop(base_history), drop(moe_history), int(seed or 0) + 1, time.time()

    seed = settings[6]
    histories = [base_pane.chat, moe_pane.chat]
    streams(regenerate.click(again, [*histories, seed], [*histories, seed, sent], show_progress="hidden"))
    clear.click(lambda: ([], [], "", "", None), None, [base_pane.chat, moe_pane.chat, base_pane.stats,
                                                      moe_pane.stats, last], show_progress="hidden")


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
