"""The app as a whole: importing does nothing, the UI never imports torch, errors become messages."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import time
from pathlib import Path

import gradio as gr
import pytest

from workbench.errors import BuildError, WorkbenchError
from workbench.spaces_compat import gpu
from workbench.ui import build_logic, shared

ROOT = Path(__file__).resolve().parent.parent


def python(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.strip()


def test_importing_app_launches_nothing_and_loads_nothing_heavy():
    out = python("import sys, threading, app; "
                 "print(sorted(m for m in ('gradio', 'torch', 'transformers') if m in sys.modules), "
                 "threading.active_count())")
    assert out == "[] 1"


def test_building_the_app_keeps_torch_out_of_the_server_until_used():
    out = python("import sys; from workbench.ui.blocks import create_app; demo = create_app(); "
                 "print([m for m in ('torch', 'transformers', 'safetensors') if m in sys.modules])")
    assert out == "[]"


@pytest.mark.parametrize("path", sorted((ROOT / "workbench" / "ui").glob("*.py")), ids=lambda p: p.name)
def test_ui_modules_never_import_torch_transformers_or_safetensors(path):
    tree = ast.parse(path.read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom) and node.module}
    assert not imported & {"torch", "transformers", "safetensors"}


def test_the_app_has_its_tabs_in_order():
    from workbench.ui.blocks import create_app

    demo = create_app()
    labels = [b.label for b in demo.blocks.values() if isinstance(b, gr.Tab)]
    assert labels == ["1 · Design", "2 · Preview", "3 · Build", "4 · Chat", "5 · Routing", "Forge an expert"]


def test_the_design_checks_of_one_session_never_queue_behind_another():
    """With Gradio's default limit of 1 per listener, one session's first read of a Hub config
    held up every other session's per-keystroke check."""
    from workbench.ui.blocks import create_app

    demo = create_app()
    checks = [fn for fn in demo.fns.values() if getattr(fn.fn, "__name__", "") in ("yaml_edited",
                                                                                   "preset_chosen")]
    assert len(checks) >= 3  # the editor, the preset and the page's load
    assert all(fn.concurrency_limit is None for fn in checks)


def test_on_a_space_without_oauth_there_is_no_sign_in_and_no_owner_token(monkeypatch):
    from workbench.ui.blocks import create_app

    monkeypatch.setenv("SPACE_ID", "someone/workbench")
    monkeypatch.setenv("HF_TOKEN", "hf_owner")
    monkeypatch.setattr(shared, "oauth_available", lambda: False)
    demo = create_app()
    assert not demo.expects_oauth  # no LoginButton that would fail to start without gradio[oauth]
    assert shared.user_token(None) is None


def test_on_a_space_local_folders_are_refused_in_validation(monkeypatch, pico_llama):
    monkeypatch.setenv("SPACE_ID", "someone/workbench")
    found = shared.ConfigCache().get([str(pico_llama)], None)[str(pico_llama)]
    assert "local model folders are not allowed" in found.reason
    monkeypatch.delenv("SPACE_ID")
    assert isinstance(shared.ConfigCache().get([str(pico_llama)], None)[str(pico_llama)], dict)


def test_only_folders_under_the_model_roots_are_loaded_by_path(monkeypatch, tmp_path, pico_llama):
    """The chat's Base box once loaded (and replied with) any folder on the server."""
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(pico_llama, elsewhere)
    monkeypatch.setenv("MOE_WORKBENCH_MODEL_ROOTS", str(pico_llama.parent))
    monkeypatch.chdir(pico_llama.parent)
    for ref in ("demo:smollm2-135m-instruct", "org/name", str(pico_llama)):
        shared.check_model_ref(ref)
    with pytest.raises(WorkbenchError, match="outside those this app loads models from.*MODEL_ROOTS"):
        shared.check_model_ref(str(elsewhere), "the base model")
    with pytest.raises(WorkbenchError, match="outside"):  # a LoRA's folder is held to the same rule
        shared.check_model_ref(f"{pico_llama}+{elsewhere}", "experts[1]")
    found = shared.ConfigCache().get([str(elsewhere)], None)[str(elsewhere)]
    assert found.level == "error" and "outside those this app loads models from" in found.reason
    recipe = (f"base_model: {elsewhere}\nexperts:\n  - source_model: {elsewhere}\n"
              "    positive_prompts: [code]\n  - source_model: demo:smollm2-135m-instruct\n"
              "    positive_prompts: [math]\n")
    with pytest.raises(WorkbenchError, match="outside"):
        build_logic.make_request(recipe, "new-moe", "cpu", None, "5GB", False)
    monkeypatch.setenv("MOE_WORKBENCH_MODEL_ROOTS", str(tmp_path))
    shared.check_model_ref(str(elsewhere))


def test_launch_is_local_by_default_and_configurable(monkeypatch):
    from workbench.ui.blocks import launch_options

    monkeypatch.delenv("GRADIO_SERVER_NAME", raising=False)
    monkeypatch.delenv("GRADIO_SERVER_PORT", raising=False)
    options = launch_options()
    assert (options["server_name"], options["server_port"]) == ("127.0.0.1", 7860)
    assert options["show_error"] is False
    assert ".wb-problem" in options["css"]
    monkeypatch.setenv("GRADIO_SERVER_NAME", "0.0.0.0")
    monkeypatch.setenv("GRADIO_SERVER_PORT", "7999")
    assert (launch_options()["server_name"], launch_options()["server_port"]) == ("0.0.0.0", 7999)


def test_errors_become_messages_without_tracebacks():
    @shared.user_errors
    def known():
        raise BuildError("output name <x> is bad\nchoose another")

    @shared.user_errors
    def bug():
        raise KeyError("internal detail")

    @shared.user_errors
    def streaming():
        yield 1
        raise BuildError("half way")

    with pytest.raises(gr.Error) as info:
        known()
    assert info.value.message == "output name &lt;x&gt; is bad<br>choose another"
    with pytest.raises(gr.Error) as info:
        bug()
    assert "KeyError" in info.value.message and "internal detail" not in info.value.message
    stream = streaming()
    assert next(stream) == 1
    with pytest.raises(gr.Error, match="half way"):
        next(stream)


@pytest.mark.parametrize("content, text", [
    ("plain", "plain"),
    ([{"type": "text", "text": "a"}, {"type": "text", "text": "b"}], "ab"),
    ({"type": "text", "text": "one block"}, "one block"),
    (None, ""),
])
def test_chat_content_is_normalised(content, text):
    assert shared.message_text(content) == text


def test_gpu_decorator_is_a_no_op_without_spaces_and_uses_it_when_present(tmp_path, monkeypatch):
    def work():
        return 42

    assert gpu(work) is work and gpu(duration=5)(work) is work
    package = tmp_path / "spaces"
    package.mkdir()
    (package / "__init__.py").write_text(
        "def GPU(duration=60):\n    def wrap(fn):\n        fn.zero_gpu = duration\n        return fn\n"
        "    return wrap\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    decorated = gpu(duration=77)(lambda: 1)
    assert decorated.zero_gpu == 77


def test_watched_work_returns_its_result_and_passes_its_errors_on():
    assert list(shared.watched(lambda cancel: 42, pulse=0.01)) == [42]
    pulses = list(shared.watched(lambda cancel: time.sleep(0.2) or "done", pulse=0.05))
    assert pulses[-1] == "done" and None in pulses[:-1]
    with pytest.raises(WorkbenchError, match="bad recipe"):
        list(shared.watched(lambda cancel: (_ for _ in ()).throw(WorkbenchError("bad recipe"))))


def test_watched_work_stops_when_its_client_stops_pulling():
    """A 64 x 64-prompt preview kept computing ~40 s after its client left."""
    checks = []

    def long_work(cancel):
        for _ in range(200):  # 20 s unless stopped
            checks.append(1)
            cancel.check()
            time.sleep(0.1)

    closed = shared.watched(long_work, pulse=0.05)
    next(closed)
    closed.close()  # Gradio closes the generator of a client that went away
    time.sleep(0.5)
    stopped_at = len(checks)
    time.sleep(0.5)
    assert len(checks) == stopped_at < 20

    checks.clear()
    abandoned = shared.watched(long_work, pulse=0.05, abandoned=0.3)
    next(abandoned)  # pulled once, then never again (not closed either)
    time.sleep(1.2)
    stopped_at = len(checks)
    time.sleep(0.5)
    assert len(checks) == stopped_at < 15


def test_a_slow_hub_config_never_holds_up_a_keystroke_check(monkeypatch):
    """An online but slow Hub: the check answers within its wait, then the config arrives."""
    import threading

    from workbench import models
    from workbench.ui import design_logic

    release, calls = threading.Event(), []

    def slow(refs, token=None):
        calls.append(list(refs))
        release.wait(10)
        return {ref: {"model_type": "llama"} for ref in refs}

    monkeypatch.setattr(models, "read_configs", slow)
    monkeypatch.setattr(shared, "configs", shared.ConfigCache())
    monkeypatch.setattr(design_logic, "CONFIG_WAIT", 0.2)
    data = {"base_model": "org/slow-base", "experts": [
        {"source_model": "org/slow-base", "positive_prompts": ["code"]},
        {"source_model": "org/slow-base", "positive_prompts": ["maths"]}]}
    started = time.monotonic()
    first = design_logic.check(data, None)
    second = design_logic.check(data, None)  # the next keystroke: the same fetch, not a second one
    assert time.monotonic() - started < 2 and first.pending and second.pending and len(calls) == 1
    waiting = [p for p in first.problems if "being fetched" in p.message]
    assert waiting and all(p.level == "warning" for p in waiting)
    release.set()
    deadline = time.monotonic() + 5
    while shared.configs.pending(["org/slow-base"], None) and time.monotonic() < deadline:
        time.sleep(0.02)
    after = design_logic.check(data, None)
    assert not after.pending and not any("being fetched" in p.message for p in after.problems)
    assert len(calls) == 1  # the config is cached now
    assert "… Checking" in first.summary() and "✔ Ready: 2 experts" in after.summary()


def test_ready_means_checked_a_model_whose_config_cannot_be_read_is_not_ready(monkeypatch):
    """Offline with a Hub base and demo experts, the banner said "✔ Ready: 5 experts" above a
    warning that compatibility was unchecked; the build could only fail."""
    from workbench import models
    from workbench.recipe import ConfigUnavailable
    from workbench.ui import design_logic

    def offline(refs, token=None):
        return {ref: ConfigUnavailable("offline: the Hub cannot be reached", "warning") for ref in refs}

    monkeypatch.setattr(models, "read_configs", offline)
    monkeypatch.setattr(shared, "configs", shared.ConfigCache())
    data = {"base_model": "org/hub-base", "experts": [
        {"source_model": "org/hub-base", "positive_prompts": ["code"]},
        {"source_model": "org/hub-base", "positive_prompts": ["maths"]}]}
    design_logic.check(data, None)
    deadline = time.monotonic() + 5
    while shared.configs.pending(["org/hub-base"], None) and time.monotonic() < deadline:
        time.sleep(0.02)
    summary = design_logic.check(data, None).summary()
    assert "✖ Not checked: the config.json of <code>org/hub-base</code> cannot be read" in summary
    assert "Ready" not in summary


def test_a_hub_lora_on_a_local_model_is_fetched_off_the_keystroke_path(pico_llama):
    # Its adapter_config.json comes from the Hub, so the check must not wait for it.
    assert shared._on_the_hub(f"{pico_llama}+org/lora") and shared._on_the_hub("org/model+org/lora")
    assert not shared._on_the_hub(f"{pico_llama}+{pico_llama}") and not shared._on_the_hub("demo:nope")
