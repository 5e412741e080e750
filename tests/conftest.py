"""Shared fixtures: an isolated environment, pico models, the bundled demo model, and for browser
tests the app's server and headless Chromium (helpers in tests/browser.py)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

# huggingface_hub reads HF_HUB_OFFLINE and HF_HOME once, at import: isolate before importing it.
_HOME = Path(tempfile.mkdtemp(prefix="moe-workbench-tests-"))
os.environ["HF_HOME"] = str(_HOME / "hf")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.pop("HF_TOKEN", None)
os.environ.pop("HUGGING_FACE_HUB_TOKEN", None)

import pytest  # noqa: E402

from tests.browser import ARGS, CHROMIUM, ROOT  # noqa: E402
from tests.pico import make_pico_model, make_tokenizer  # noqa: E402
from tests.versions import check_version_floors  # noqa: E402


def pytest_configure(config: pytest.Config) -> None:
    # docs/reliability.md: the test command fails when an installed package is below its floor.
    problems = check_version_floors()
    if problems:
        raise pytest.UsageError("version floors not met: " + "; ".join(problems))


def pytest_unconfigure(config: pytest.Config) -> None:
    shutil.rmtree(_HOME, ignore_errors=True)


@pytest.fixture(scope="session", autouse=True)
def isolated_env(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Never touch the user's caches, tokens or the network from a test."""
    os.environ["MOE_WORKBENCH_CACHE"] = os.environ.get("MOE_WORKBENCH_TEST_CACHE") or str(_HOME / "cache")
    os.environ["MOE_WORKBENCH_OUTPUTS"] = str(_HOME / "outputs")
    # The app loads models by path only from configured folders: the tests' pico models live here.
    os.environ["MOE_WORKBENCH_MODEL_ROOTS"] = str(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="session")
def pico_tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="session")
def pico_factory(tmp_path_factory: pytest.TempPathFactory, pico_tokenizer):
    """make(name, **kwargs) -> folder of a pico model; same kwargs give the same folder."""
    made: dict[tuple, Path] = {}
    root = tmp_path_factory.mktemp("pico")

    def make(name: str = "base", **kwargs) -> Path:
        key = (name, tuple(sorted(kwargs.items())))
        if key not in made:
            kwargs.setdefault("tokenizer", pico_tokenizer)
            made[key] = make_pico_model(root / f"{name}-{len(made)}", **kwargs)
        return made[key]

    return make


@pytest.fixture(scope="session")
def pico_llama(pico_factory) -> Path:
    return pico_factory("llama", seed=0)


@pytest.fixture(scope="session")
def demo_model_path() -> Path:
    """SmolLM2-135M-Instruct, dequantised once per test session from the bundled GGUF."""
    from workbench.models.sources import demo_model_path as resolve_demo

    return resolve_demo()


# ---- browser tests ---------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_app(folder: Path, **env_changes: str) -> Iterator[tuple[str, subprocess.Popen]]:
    """`python app.py` on a free port, outputs under `folder`: its URL and process."""
    port = free_port()
    env = {**os.environ, "GRADIO_SERVER_PORT": str(port), "GRADIO_SERVER_NAME": "127.0.0.1",
           "MOE_WORKBENCH_OUTPUTS": str(folder / "outputs"), **env_changes}
    log = open(folder / "server.log", "w")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen([sys.executable, "app.py"], cwd=ROOT, env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 120
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                log.close()
                pytest.fail(f"app did not start: {(folder / 'server.log').read_text()[-3000:]}")
            time.sleep(0.5)
    try:
        yield url, proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory, demo_model_path):
    with running_app(tmp_path_factory.mktemp("browser")) as (url, _):
        yield url


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.skip("Chromium is not installed: run 'make browser' (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield chromium
        chromium.close()
