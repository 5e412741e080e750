"""The app's HTTP API as an attacker uses it: "Forge missing experts" called with recipes that aim
its writes at the app's own checkout and its reads at any file on the server. Nothing is written
outside the outputs folder, and a huge or foreign `forge_data` is refused without being read."""

from __future__ import annotations

import secrets
from pathlib import Path

import pytest
from gradio_client import Client
from gradio_client.exceptions import AppError

from tests.conftest import running_app
from workbench.staging import MANIFEST

ROOT = Path(__file__).resolve().parents[1]
KEY = "0" * 32  # a browser's session key, as the page sends it


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    folder = tmp_path_factory.mktemp("api")
    with running_app(folder, MOE_WORKBENCH_PRELOAD="0") as (url, proc):
        yield Client(url, verbose=False), proc, folder / "outputs"


def recipe(base: Path, source: str, forge_data: str) -> str:
    return (f"base_model: {base}\nexperts:\n  - source_model: {base}\n    positive_prompts: [sums]\n"
            f"  - source_model: {source}\n    forge_data: {forge_data}\n    positive_prompts: [the sea]\n")


def forge_missing(client: Client, yaml_text: str) -> tuple:
    return client.predict(yaml_text, [], KEY, api_name="/forge_missing")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for {pid}")


def test_a_forge_aimed_inside_the_app_is_written_to_the_outputs_folder(app, pico_factory):
    client, _, outputs = app
    name = f"escape-{secrets.token_hex(4)}-expert"
    aimed = ROOT / "workbench" / "ui" / name  # a model root: a place to read from, never to write
    forge_missing(client, recipe(pico_factory("api-base", seed=3), str(aimed), "hero"))
    assert not aimed.exists()
    assert (outputs / name / MANIFEST).is_file()  # forged all the same, where the app writes


def test_a_huge_forge_data_file_is_refused_before_it_is_read(app, pico_factory, tmp_path):
    client, proc, _ = app
    huge = tmp_path / "model.safetensors"  # under a model root, 1.5 GB (sparse: no disk used)
    with open(huge, "wb") as f:
        f.truncate(1_500_000_000)
    before = rss_mb(proc.pid)
    with pytest.raises(AppError, match="is 1431 MB, over the 16 MB limit"):
        forge_missing(client, recipe(pico_factory("api-base", seed=3), str(tmp_path / "big-expert"),
                                     str(huge)))
    assert rss_mb(proc.pid) - before < 100


def test_a_forge_data_outside_the_model_roots_is_refused_by_name(app, pico_factory, tmp_path):
    client, _, _ = app
    with pytest.raises(AppError, match="'/proc/self/environ' is outside the folders this app reads from"):
        forge_missing(client, recipe(pico_factory("api-base", seed=3), str(tmp_path / "env-expert"),
                                     "/proc/self/environ"))


def test_an_upload_over_the_examples_cap_is_refused_as_it_streams_in(app):
    import httpx

    client, _, _ = app
    big = b'{"text": "Arr"}\n' * (17 * 2**20 // 16)  # 17 MB of valid examples: over the 16 MB cap
    answer = httpx.post(f"{client.src.rstrip('/')}/gradio_api/upload",
                        files={"files": ("big.jsonl", big, "application/jsonl")}, timeout=60)
    assert answer.status_code == 413, answer.text[:200]
    small = httpx.post(f"{client.src.rstrip('/')}/gradio_api/upload",
                       files={"files": ("ok.jsonl", big[:1000], "application/jsonl")}, timeout=60)
    assert small.status_code == 200
