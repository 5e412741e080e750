"""Gates from a child process, for builds in a process without torch (the CLI, UI build jobs):
the same routers as in-process gates, errors that keep their message, and a child that never
outlives the build or its cancel."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors import safe_open

from tests.test_build import KILL_SNIPPET  # a build that prints WRITING at each tensor
from workbench.errors import BuildError, GateError
from workbench.gates import GateRequest, compute_gates, from_gates
from workbench.gates.process import GateProcess
from workbench.progress import CancelToken
from workbench.recipe import Expert, Recipe

REPO = Path(__file__).resolve().parent.parent
PROMPTS = [["def add(a, b)", "import numpy"], ["Solve 2x + 3 = 7"], ["Once upon a time"]]

BUILD_SNIPPET = """
import json, sys
from pathlib import Path
from workbench.build import build
from workbench.recipe import Recipe

events, scores = {}, {}
for text, out in zip(sys.argv[1::2], sys.argv[2::2]):
    messages = events.setdefault(Path(out).name, [])
    result = build(Recipe.model_validate(json.loads(text)), Path(out), device="cpu", seed=3,
                   on_progress=lambda e: messages.append(e.message))
    assert result.gates is None and result.diagnostics.condition_numbers
    scores[Path(out).name] = result.score.to_dict() if result.score else None
print(json.dumps({"torch_imported": "torch" in sys.modules, "messages": events, "scores": scores}))
"""


def recipe_of(base: Path, mode: str) -> Recipe:
    return Recipe(base_model=str(base), gate_mode=mode,
                  experts=[Expert(source_model=str(base), positive_prompts=p) for p in PROMPTS])


def router_bytes(folder: Path) -> list[bytes]:
    with safe_open(str(folder / "model.safetensors"), framework="numpy") as f:
        names = sorted((n for n in f.keys() if n.endswith("block_sparse_moe.gate.weight")),
                       key=lambda n: int(n.split(".")[2]))
        return [f.get_tensor(n).tobytes() for n in names]


def children_of(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def gone(pid: int, within: float) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return True
        if state == "Z":  # exited, waiting for a parent to reap it
            return True
        time.sleep(0.05)
    return False


def test_a_build_without_torch_takes_the_same_routers_from_a_child(pico_factory, tmp_path: Path) -> None:
    base = pico_factory("identity", seed=1, family="llama")
    recipes = {mode: recipe_of(base, mode) for mode in ("random", "hidden")}
    # Chat-rendered prompts need transformers' tokenizer in the child (its template): the same routers.
    recipes["chat"] = recipe_of(base, "fitted").model_copy(update={"prompt_template": "chat"})
    args = []
    for mode, recipe in recipes.items():
        args += [json.dumps(recipe.model_dump(mode="json")), str(tmp_path / mode)]
    done = subprocess.run([sys.executable, "-c", BUILD_SNIPPET, *args], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["torch_imported"] is False  # the builder never paid for torch
    assert any("importing torch" in m for m in report["messages"]["hidden"])  # the child reported it
    # Noise needs no model: numpy makes it in the builder, and no child starts for it.
    assert not any("torch" in m for m in report["messages"]["random"])
    for mode, recipe in recipes.items():
        expected = from_gates(compute_gates(recipe, base, device="cpu", seed=3), "F32")
        assert router_bytes(tmp_path / mode) == expected.rows, mode
    plain = from_gates(compute_gates(recipe_of(base, "fitted"), base, device="cpu", seed=3), "F32")
    assert router_bytes(tmp_path / "chat") != plain.rows  # the template changed what the routers saw
    # The held-out score crosses from the child too, into the result and the model card.
    score = report["scores"]["hidden"]
    assert score["mode"] == "hidden" and score["tokens"][0] > 0 and score["tokens"][1:] == [0, 0]
    assert "## Routing report" in (tmp_path / "hidden" / "README.md").read_text()
    assert report["scores"]["random"] is None
    assert "## Routing report" not in (tmp_path / "random" / "README.md").read_text()


def test_gate_errors_cross_with_their_class_and_message(tmp_path: Path) -> None:
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text("{}")  # no layer count: the child's gates fail
    worker = GateProcess(GateRequest(recipe_of(base, "random"), base, "cpu", 0, "F32"), CancelToken())
    try:
        with pytest.raises(GateError, match="cannot read layers and hidden size"):
            worker.result(lambda event: None)
    finally:
        worker.stop()


def test_stop_ends_the_child_at_once(pico_factory) -> None:
    base = pico_factory("identity", seed=1, family="llama")
    worker = GateProcess(GateRequest(recipe_of(base, "hidden"), base, "cpu", 0, "F32"), CancelToken())
    started = time.monotonic()
    worker.stop()
    assert gone(worker.pid, 0.1)
    assert time.monotonic() - started < 3  # it left on its own: nothing waited for the kill timeout


def test_cancel_while_waiting_for_the_gates_stops_the_wait(pico_factory) -> None:
    from workbench.errors import Cancelled

    base = pico_factory("identity", seed=1, family="llama")
    cancel = CancelToken()
    worker = GateProcess(GateRequest(recipe_of(base, "hidden"), base, "cpu", 0, "F32"), cancel)
    cancel.cancel()
    try:
        with pytest.raises(Cancelled):
            worker.result(lambda event: None)
    finally:
        worker.stop()
    assert gone(worker.pid, 3)


def test_a_child_that_dies_is_reported_readably(pico_factory) -> None:
    base = pico_factory("identity", seed=1, family="llama")
    worker = GateProcess(GateRequest(recipe_of(base, "hidden"), base, "cpu", 0, "F32"), CancelToken())
    os.kill(worker.pid, signal.SIGKILL)
    try:
        with pytest.raises(BuildError, match=r"gates process ended unexpectedly \(exit code -9"):
            worker.result(lambda event: None)
    finally:
        worker.stop()


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads the process table from /proc")
def test_a_killed_build_takes_its_gates_process_with_it(pico_factory, tmp_path: Path) -> None:
    base = pico_factory("big", seed=4, layers=8, hidden=128, intermediate=192)
    child = subprocess.Popen([sys.executable, "-c", KILL_SNIPPET, str(base), str(tmp_path / "killed")],
                             cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert child.stdout.readline().strip() == "WRITING"
        helpers = children_of(child.pid)
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=30)
    assert len(helpers) == 1
    assert gone(helpers[0], 10)  # its stdin closed with the build: it exits, orphaned or not
