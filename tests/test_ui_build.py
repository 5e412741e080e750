"""Build tab handlers: early refusals, queue place, progress views, summary, whose builds are shown."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tests.test_jobs import FAKE, RECIPE
from workbench import jobs
from workbench.errors import BuildError, WorkbenchError
from workbench.recipe import RecipeError
from workbench.ui import build_logic, shared


@pytest.fixture
def outputs(tmp_path, monkeypatch):
    monkeypatch.setenv("MOE_WORKBENCH_OUTPUTS", str(tmp_path / "outputs"))
    return tmp_path / "outputs"


@pytest.mark.parametrize("name", ["../escape", "/etc", "a/b", ".hidden", "bad\u202ename", "nul\x00"])
def test_output_names_never_leave_the_output_folder(outputs, name):
    with pytest.raises(BuildError):
        build_logic.make_request(RECIPE, name, "cpu", "", "5GB", False)


def test_an_empty_name_is_taken_from_the_recipe_and_never_one_that_exists(outputs):
    first = build_logic.make_request(RECIPE, "", "cpu", "", "5GB", False)
    assert Path(first.out).name == "base-2x"  # org/base with two experts
    (outputs / "base-2x").mkdir(parents=True)
    (outputs / "base-2x-2").mkdir()
    assert Path(build_logic.make_request(RECIPE, "", "cpu", "", "5GB", False).out).name == "base-2x-3"
    demo = (Path(__file__).resolve().parents[1] / "presets" / "demo.yaml").read_text()
    assert Path(build_logic.make_request(demo, "", "cpu", "", "5GB", False).out).name == \
        "smollm2-135m-instruct-4x"


def test_request_is_checked_before_queueing(outputs):
    with pytest.raises(RecipeError) as info:
        build_logic.make_request(RECIPE.replace("org/a", ""), "ok", "cpu", "", "5GB", False)
    assert any(p.path == "experts[0].source_model" for p in info.value.problems)
    with pytest.raises(BuildError, match="shard size"):
        build_logic.make_request(RECIPE, "ok", "cpu", "", "lots", False)
    (outputs / "taken").mkdir(parents=True)
    with pytest.raises(BuildError, match="exists"):
        build_logic.make_request(RECIPE, "taken", "cpu", "", "5GB", False)
    request = build_logic.make_request(RECIPE, "taken", "cpu", "float16", "500MB", True)
    assert request.out == str(outputs.resolve() / "taken") and request.force
    assert request.shard_size == 500 * 10**6 and request.dtype == "float16"


def test_follower_shows_queue_place_progress_and_summary(outputs):
    queue = jobs.BuildQueue(FAKE)
    first = queue.submit(jobs.BuildRequest(RECIPE, str(outputs / "slow-x")))
    second = queue.submit(jobs.BuildRequest(RECIPE, str(outputs / "ok-y")))
    views = build_logic.Follower(second, queue, interval=0.0).views()
    waiting = next(views)
    assert "number **2** in the queue" in waiting.status
    queue.cancel(first.id)
    rest = list(views)
    assert any(v.fraction is not None and "Writing tensors" in v.description for v in rest)
    final = rest[-1]
    assert final.finished and final.output == str(outputs / "ok-y") and "token.txt" in final.summary
    assert "[write]" in final.log


def test_cancelled_and_failed_builds_say_so(outputs):
    queue = jobs.BuildQueue(FAKE)
    job = queue.submit(jobs.BuildRequest(RECIPE, str(outputs / "crash-z")))
    final = list(build_logic.Follower(job, queue).views())[-1]
    assert final.finished and final.output is None and "failed" in final.status
    assert "[write] failed after" in final.log and "done in" not in final.log
    job = queue.submit(jobs.BuildRequest(RECIPE, str(outputs / "slow-w")))
    views = build_logic.Follower(job, queue, interval=0.0).views()
    next(views)
    while job.state == "queued" or not any(e.kind == "progress" for e in job.history):
        time.sleep(0.05)  # cancelled once it writes
    queue.cancel(job.id)
    final = list(views)[-1]
    assert "cancelled" in final.status
    assert "[write] stopped after" in final.log and "done in" not in final.log  # it said "done in 21 s"


def test_summary_lists_files_and_folds_gate_warnings():
    text = build_logic.summary_markdown({"path": "/o/moe", "files": [["model.safetensors", 2_000_000_000]],
                                         "total_bytes": 2_000_000_000, "seconds": 75.0,
                                         "gate_warnings": ["layer 0: x", "layer 1: x", "layer 2: x"]})
    assert "2.00 GB" in text and "1 min 15 s" in text and "2 more" in text and "layer 1" not in text


def make_build(folder: Path, experts: int = 4) -> str:
    """A finished output: a MoE build, or with `experts=0` a forged dense expert."""
    folder.mkdir(parents=True)
    (folder / "workbench_manifest.json").write_text(json.dumps({"files": []}))
    (folder / "config.json").write_text(json.dumps({"model_type": "mixtral", "num_local_experts": experts}
                                                   if experts else {"model_type": "llama"}))
    return str(folder)


def test_a_space_shows_only_the_sessions_own_builds(outputs, monkeypatch):
    mine, theirs = make_build(outputs / "mine"), make_build(outputs / "theirs")
    (outputs / "half").mkdir()  # no manifest: not a finished build
    assert build_logic.visible_builds([mine]) == [theirs, mine]  # locally: all, own newest last
    monkeypatch.setenv("SPACE_ID", "someone/workbench")
    assert build_logic.visible_builds([mine]) == [mine]


def test_a_forged_dense_expert_is_never_offered_as_the_moe_but_can_be_pushed(outputs):
    moe, dense = make_build(outputs / "a-moe"), make_build(outputs / "hero-expert", experts=0)
    assert build_logic.build_choices([]) == [("a-moe", moe)]  # Chat, Routing and GGUF export
    assert build_logic.build_choices([], moe_only=False) == [("a-moe", moe), ("hero-expert", dense)]
    with pytest.raises(WorkbenchError, match="'hero-expert' is not one of your MoE builds"):
        build_logic.check_build(dense, [dense])
    assert build_logic.check_build(dense, [dense], moe_only=False) == dense


def test_token_comes_from_the_signed_in_user_on_a_space(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_owner")
    assert shared.user_token(None) == "hf_owner"  # locally
    monkeypatch.setenv("SPACE_ID", "someone/workbench")
    assert shared.user_token(None) is None  # a logged-out visitor never gets the owner's token
    assert shared.user_token(type("T", (), {"token": "hf_visitor"})()) == "hf_visitor"



def test_a_folder_sent_by_the_browser_must_be_one_of_the_sessions_builds(outputs, tmp_path, monkeypatch):
    mine = make_build(outputs / "mine")
    elsewhere = make_build(tmp_path / "private-model")
    assert build_logic.check_build(mine, [mine]) == mine
    with pytest.raises(WorkbenchError, match="not one of your MoE builds"):
        build_logic.check_build(elsewhere, [mine])
    with pytest.raises(WorkbenchError, match="choose a finished build"):
        build_logic.check_build("", [mine])
    monkeypatch.setenv("SPACE_ID", "someone/workbench")
    theirs = make_build(outputs / "theirs")
    with pytest.raises(WorkbenchError):
        build_logic.check_build(theirs, [mine])  # another visitor's build


@pytest.mark.parametrize(("stage", "message", "eta", "text"), [
    ("write", "model.layers.3.mlp", None, "Writing tensors"),
    ("write", "model.layers.3.mlp", 0.4, "Writing tensors · almost done"),
    ("write", "model.layers.3.mlp", 75, "Writing tensors · about 1 min 15 s left"),
    # The gates' fraction jumps: a time left from it grew ("Computing gates (0%) - 94.1%").
    ("gates", "running 6 prompt sets", 75, "Computing gates"),
    # A forge's step and loss are what its user waits on; its message has its own time left.
    ("forge", "step 3/20, loss 2.104, 40 s left", 75,
     "Training the MLPs: step 3/20, loss 2.104, 40 s left"),
    ("samples", "prompt 2 of 3: both models answer", None,
     "Sample replies: prompt 2 of 3: both models answer"),
])
def test_progress_text_reads_as_a_sentence_with_the_bar_s_one_percentage(stage, message, eta, text):
    event = jobs.JobEvent("progress", stage=stage, fraction=0.4, message=message, eta_seconds=eta)
    assert build_logic.progress_text(event) == text


class ScriptedJob:
    """A job whose events are given: what a build with gates beside the copy reports."""

    def __init__(self, events):
        self.events = events
        self.request = jobs.BuildRequest(RECIPE, "/outputs/scripted")

    def stream(self, poll):
        yield from self.events


def test_the_bar_never_goes_back_and_the_log_names_each_stage_once():
    """The bar reached 90% 'almost done' and restarted at 'Computing gates (0%)'; the log held
    80 lines of '[gates] importing torch'."""
    progress = lambda stage, f, m: jobs.JobEvent("progress", stage, f, m)  # noqa: E731
    events = [progress("resolve", 0.0, "demo"), progress("resolve", 1.0, "ready")]
    events += [progress("write", f / 10, f"tensor {f}") for f in range(10)]
    events += [progress("gates", 0.0, "importing torch")] * 80
    events += [progress("gates", 0.5, "running 6 prompt sets")] * 40 + [progress("gates", 1.0, "ready")]
    events += [progress("write", 1.0, "routers"), progress("verify", 1.0, "verified"),
               jobs.JobEvent("done", "done", 1.0, "built", result={"path": "x", "files": [], "total_bytes": 0,
                                                                   "seconds": 1.0})]
    views = list(build_logic.Follower(ScriptedJob(events), queue=None, interval=0.0).views())
    bars = [v.fraction for v in views if v.fraction is not None]
    assert bars == sorted(bars) and bars[-1] == 1.0
    assert any("Computing gates" in v.description and v.fraction >= 0.85 for v in views)
    log = views[-1].log.splitlines()
    assert [line for line in log if line.startswith("[gates]")] == ["[gates] importing torch",
                                                                     "[gates] done in under a second"]
    assert len(log) < 13 and log[0] == "→ scripted"  # the output, then each stage once



def fake_export(*, model, out, out_type, force, token, on_progress, cancel):
    """Runs in the job's child: a GGUF export whose output name says what to do."""
    from workbench.progress import Progress

    for step in range(40 if "slow" in out else 2):
        on_progress(Progress("gguf", step / 40, "writing tensors"))
        time.sleep(0.05)
        cancel.check()
    Path(out).write_bytes(b"GGUF")
    return {"path": out, "size": 2 * 10**6, "seconds": 1.0, "arch": "llama", "expert_count": 4,
            "expert_used_count": 2, "tensor_count": 33, "file_type": out_type}


EXPORTS = jobs.BuildQueue(FAKE, export_runner="tests.test_ui_build:fake_export")


def test_an_export_is_checked_before_queueing_then_runs_as_a_job_of_the_session(outputs):
    mine = make_build(outputs / "mine")
    request = build_logic.export_request(mine, [mine], "q8_0", False)
    assert (request.model, request.out, request.out_type) == (mine, str(outputs / "mine-q8_0.gguf"), "q8_0")
    with pytest.raises(WorkbenchError, match="not one of your MoE builds"):
        build_logic.export_request(str(outputs / "other"), [mine], "f16", False)
    with pytest.raises(WorkbenchError, match="Type 'q4_k_m' is not one the converter writes"):
        build_logic.export_request(mine, [mine], "q4_k_m", False)
    job = EXPORTS.submit(request, owner="a" * 32)
    views = list(build_logic.ExportFollower(job, EXPORTS, interval=0.0).views())
    assert any(v.fraction is not None and "Converting" in v.description for v in views)
    assert views[-1].finished and views[-1].output == request.out
    assert "33 tensors, 4 experts (2 per token), checked." in views[-1].status
    assert EXPORTS.jobs_of("a" * 32, "export") == [job]
    with pytest.raises(WorkbenchError, match="mine-q8_0.gguf exists; tick 'Replace an existing file'"):
        build_logic.export_request(mine, [mine], "q8_0", False)
    assert "llama-quantize" in build_logic.gguf_note()


def test_leaving_the_page_leaves_the_export_running_and_cancel_stops_it(outputs):
    mine = make_build(outputs / "slow")
    job = EXPORTS.submit(build_logic.export_request(mine, [mine], "f16", False))
    views = build_logic.ExportFollower(job, EXPORTS, interval=0.0).views()
    next(views)
    views.close()  # what Gradio does when the client goes away: the export goes on
    final = list(build_logic.ExportFollower(job, EXPORTS, interval=0.0).views())[-1]  # a reopened page
    assert final.finished and final.output == str(outputs / "slow-f16.gguf")
    again = EXPORTS.submit(build_logic.export_request(mine, [mine], "f16", True))
    while not any(e.kind == "progress" for e in again.history):
        time.sleep(0.05)
    assert EXPORTS.cancel(again.id)  # the panel's Cancel button
    final = list(build_logic.ExportFollower(again, EXPORTS, interval=0.0).views())[-1]
    assert final.status == "■ Export cancelled; nothing was written."


def test_the_last_progress_before_a_quiet_spell_is_shown_not_dropped_by_the_rate_limit():
    """A forge's 'step 4/20' was never drawn: a log line took the rate limit's turn just before it,
    and the next event came only with step 5."""
    step = lambda n: jobs.JobEvent("progress", "forge", n / 20, f"step {n}/20, loss 2.0, 9 s left",  # noqa: E731
                                   metrics={"step": n, "loss": 2.0})
    events = [step(3), jobs.JobEvent("log", message="INFO workbench.forge: a line"), step(4), None,
              jobs.JobEvent("cancelled", message="stopped")]
    views = list(build_logic.Follower(ScriptedJob(events), queue=SimpleQueue(), interval=60.0).views())
    shown = [v.description for v in views if v.fraction is not None]
    assert shown[-1] == "Training the MLPs: step 4/20, loss 2.0, 9 s left"
    assert [p["step"] for p in views[-2].points] == [3, 4]


class SimpleQueue:
    """A queue in which the scripted job has already started."""

    def position(self, job) -> int:
        return 0


def test_a_running_job_s_status_says_what_it_does_with_one_bar_and_one_percentage():
    running = build_logic.JobView("", "", 0.5, "Training the MLPs: step 10/20, loss 1.2, 30 s left")
    assert build_logic.shown_status(running, "1 of 2 (hero): ") == (
        "1 of 2 (hero): Training the MLPs: step 10/20, loss 1.2, 30 s left\n\n"
        f"`{'█' * 12}{'░' * 12}` 50%")
    assert build_logic.shown_status(build_logic.JobView("✔ Build finished.", "")) == "✔ Build finished."
    assert build_logic.shown_status(build_logic.JobView("", "log only")) is None  # the box stays as it is
