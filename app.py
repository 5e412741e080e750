"""MoE Workbench: `python app.py` opens the web app (also the Hugging Face Space's app_file).

Importing this file builds nothing and launches nothing; running it does both. The address
is 127.0.0.1:7860 unless GRADIO_SERVER_NAME / GRADIO_SERVER_PORT say otherwise (a Space or
the Docker image sets 0.0.0.0).
"""

from __future__ import annotations

import logging
import os
import threading

# Before gradio is imported: no usage analytics, no telemetry, no version checks over the network.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

log = logging.getLogger("workbench.app")


DEMO = "demo:smollm2-135m-instruct"


def warm_demo_model() -> None:
    """Ready the bundled demo model in the background (dequantised once, then loaded), so the
    first preview and chat are quick. MOE_WORKBENCH_PRELOAD=0 skips the load."""
    from workbench.errors import WorkbenchError
    from workbench.models import demo_model_path

    try:
        demo_model_path()
        if os.environ.get("MOE_WORKBENCH_PRELOAD", "1") != "0":
            from workbench.chat import registry

            registry().get(DEMO)
    except WorkbenchError as exc:
        log.warning("the demo model is not available: %s", exc)


def import_model_libraries() -> None:
    """Import what handlers import lazily, once, before any handler thread runs.

    transformers resolves its top-level names lazily, and two threads resolving names at
    the same moment can fail with "cannot import name 'CONFIG_MAPPING' from 'transformers'"
    (seen with the warm-up thread and the page's first validation). The CLI is one thread
    and never meets this; the server pays a few seconds at start instead.
    """
    from transformers import (  # noqa: F401 (imported for the side effect)
        CONFIG_MAPPING,
        AutoConfig,
        AutoModelForCausalLM,
        AutoTokenizer,
        DynamicCache,
        GgufConfig,
    )


def cap_malloc_arenas(arenas: int = 2) -> None:
    """Let glibc's malloc keep at most `arenas` heaps, before the server starts its threads.

    Gradio runs each event in a worker thread, and glibc gives busy threads heaps of their own
    (up to eight per core), which a chat round's short-lived tensors and traces leave
    fragmented: the server grew 10-50 MB a round and never gave it back. With two arenas the
    same ten rounds stay flat (tests/test_browser_memory.py). MALLOC_ARENA_MAX set by the user
    wins; elsewhere than glibc this does nothing.
    """
    import ctypes
    import ctypes.util

    if os.environ.get("MALLOC_ARENA_MAX"):
        return
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        if libc is not None and hasattr(libc, "mallopt"):
            libc.mallopt(-8, arenas)  # M_ARENA_MAX
    except OSError:
        log.debug("no C library to cap malloc arenas in")


def main() -> None:
    cap_malloc_arenas()
    logging.basicConfig(level=os.environ.get("MOE_WORKBENCH_LOG", "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from workbench.ui.blocks import create_app, launch_options, queue_options

    import_model_libraries()
    threading.Thread(target=warm_demo_model, name="warm-demo", daemon=True).start()
    demo = create_app()
    demo.queue(**queue_options()).launch(**launch_options())


if __name__ == "__main__":
    main()
