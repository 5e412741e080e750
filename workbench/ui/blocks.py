"""The whole app: six tabs in one Gradio Blocks (five steps and the forge), and how it launches.

Per-session values live in gr.State (recipe draft, builds of this session, chat ids,
the last trace); models live in the engine's registry, shared by every session.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import gradio as gr

from workbench import __version__
from workbench.forge import MAX_DATA_BYTES
from workbench.ui import session, shared, tab_build, tab_chat, tab_design, tab_forge, tab_preview, tab_routing

log = logging.getLogger(__name__)

TITLE = "MoE Workbench"
INTRO = ("Design a **frankenMoE** from dense models, see where tokens would go before building, "
         "build it, chat with it next to its base model, and read every routing decision.")


def theme() -> gr.themes.Base:
    # System fonts only: the app must load offline, with nothing fetched from a font CDN.
    return gr.themes.Soft(
        primary_hue="indigo", secondary_hue="violet", neutral_hue="slate", radius_size="md",
        font=["ui-sans-serif", "system-ui", "Segoe UI", "Roboto", "Helvetica Neue", "Arial", "sans-serif"],
        font_mono=["ui-monospace", "SFMono-Regular", "Menlo", "Consolas", "monospace"],
    ).set(button_primary_background_fill="*primary_600", button_primary_background_fill_hover="*primary_700",
          button_primary_text_color="white")


def create_app() -> gr.Blocks:
    """Build the Blocks (no model is loaded and nothing is launched)."""
    with gr.Blocks(title=TITLE, analytics_enabled=False, delete_cache=(3600, 3600)) as demo:
        # The browser's session key (ui/session.py): long jobs belong to it, not to one page.
        owner = gr.BrowserState("", storage_key="moe-workbench-session")
        with gr.Row(elem_classes="wb-header"):
            gr.Markdown(f"# {TITLE}\n{INTRO}", elem_classes="wb-title")
            gr.Markdown(f"v{__version__} · runs {'on this Space' if shared.on_space() else 'locally'}",
                        elem_classes="wb-muted wb-version")
        with gr.Tabs(elem_id="wb-tabs") as tabs:
            with gr.Tab("1 · Design", id="design", elem_id="wb-tab-design"):
                design = tab_design.render(demo)
            with gr.Tab("2 · Preview", id="preview", elem_id="wb-tab-preview") as preview_tab:
                tab_preview.render(design, preview_tab)
            with gr.Tab("3 · Build", id="build", elem_id="wb-tab-build") as build_tab:
                built = tab_build.render(design, build_tab, owner)
            with gr.Tab("4 · Chat", id="chat", elem_id="wb-tab-chat") as chat_tab:
                chat = tab_chat.render(built, chat_tab, design)
            with gr.Tab("5 · Routing", id="routing", elem_id="wb-tab-routing") as routing_tab:
                tab_routing.render(chat, routing_tab, tabs)
            with gr.Tab("Forge an expert", id="forge", elem_id="wb-tab-forge"):
                forge = tab_forge.render(design, owner)
        # One click from a recipe with experts still to forge: to the Forge tab, forge them, redraw the form.
        design.forge_missing.click(lambda: gr.Tabs(selected="forge"), None, [tabs], show_progress="hidden") \
            .then(forge.forge_missing, forge.inputs, forge.outputs, show_progress="hidden",
                  concurrency_limit=8) \
            .then(design.adopt, [design.yaml], design.adopt_outputs, show_progress="hidden")
        # A page that opens finds its session's builds and forges, running or finished unseen.
        keyed = demo.load(session.owner_key, [owner], [owner], show_progress="hidden")
        for reattach in (*built.reattach, forge.reattach):
            keyed.then(reattach.fn, reattach.inputs, reattach.outputs, show_progress="hidden",
                       concurrency_limit=None)
    return demo


def launch_options() -> dict[str, Any]:
    """launch() arguments: local by default (127.0.0.1:7860); GRADIO_SERVER_NAME/PORT override."""
    return {
        "server_name": os.environ.get("GRADIO_SERVER_NAME") or "127.0.0.1",
        "server_port": int(os.environ.get("GRADIO_SERVER_PORT") or 7860),
        "theme": theme(),
        "css": shared.read_asset("style.css"),
        "show_error": False,  # messages come from gr.Error; never a traceback in the page
        # The one upload is a forge's examples: refused while it streams in past their cap, not
        # stored whole first (a 50 MB file was written to disk before the handler said no).
        "max_file_size": MAX_DATA_BYTES,
        "footer_links": ["gradio"],
    }


def queue_options() -> dict[str, Any]:
    # Chat and preview share one CPU/GPU: run one heavy event at a time unless told otherwise.
    return {"default_concurrency_limit": int(os.environ.get("MOE_WORKBENCH_CONCURRENCY") or 1),
            "max_size": 64}
