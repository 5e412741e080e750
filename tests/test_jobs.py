"""The job runner: subprocess per build or forge, one at a time, queue places, cancel, crash isolation.

Most tests run a fake build (`fake_build` below, imported by the child process) whose
behaviour the output folder's name picks; one runs the real build on pico models.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

import pytest

from workbench.jobs import BuildQueue, BuildRequest, ForgeRequest, QueueFull
from workbench.models import child_environment
from workbench.progress import Progress
from workbench.staging import MANIFEST, is_output

FAKE = "tests.test_jobs:fake_build"
ROOT = Path(__file__).resolve().parents[1]
RECIPE = """
base_model: org/base
experts:
  - source_model: org/a
    positive_prompts: ["code"]
  - source_model: org/b
    positive_prompts: ["math"]
"""


def fake_build(recipe, out: Path, *, token, on_progress, cancel, **options):
    """Runs in the child. The out folder's name says what to do."""
    kind = out.name.split("-")[0]
    if kind == "hang":  # ignores cancel: must be killed
        on_progress(Progress("write", 0.5, "stuck"))
        time.sleep(120)
    for step in range(200 if kind == "slow" else 5):
        on_progress(Progress("write", step / 5 if kind != "slow" else 0.01, f"tensor {step}"))
        if kind == "crash" and step == 2:
            os.kill(os.getpid(), signal.SIGSEGV)
        if kind == "bug" and step == 2:  # a bug whose message and traceback hold server paths
            open(out.parent / "no-such-folder" / "x")
        time.sleep(0.05)
        cancel.check()
    out.mkdir(parents=True)
    (out / "token.txt").write_text("yes" if token == "hf_secret_for_test" else "no")
    (out / "options.txt").write_text(repr(sorted(options.items())))
    return SimpleNamespace(path=out, files=[("token.txt", 3)], total_bytes=3, seconds=0.25, gates=None)


def request(tmp_path: Path, name: str) -> BuildRequest:
    return BuildRequest(recipe_yaml=RECIPE, out=str(tmp_path / name), device="cpu", seed=7)


def finish(job, timeout: float = 60.0) -> list:
    events, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        event = job.next_event(timeout=1.0)
        if event is not None:
            events.append(event)
            if event.kind in ("done", "error", "cancelled"):
                return events
    raise AssertionError(f"job {job.id} did not finish; events so far: {events}")


def test_build_runs_in_child_and_reports_progress_and_result(tmp_path):
    jobs = BuildQueue(FAKE)
    job = jobs.submit(request(tmp_path, "ok-1"))
    events = finish(job)
    kinds = [e.kind for e in events]
    assert kinds[0] == "queued" and kinds[-1] == "done" and "progress" in kinds
    done = events[-1]
    assert done.result["path"] == str(tmp_path / "ok-1") and done.result["total_bytes"] == 3
    assert job.state == "done"
    options = (tmp_path / "ok-1" / "options.txt").read_text()
    assert "('device', 'cpu')" in options and "('seed', 7)" in options


def test_second_build_waits_and_sees_its_place(tmp_path):
    jobs = BuildQueue(FAKE)
    first = jobs.submit(request(tmp_path, "slow-a"))
    second = jobs.submit(request(tmp_path, "ok-b"))
    queued = second.next_event(timeout=5)
    assert queued.kind == "queued" and queued.position == 2
    while first.state == "queued":
        time.sleep(0.05)
    assert jobs.position(second) == 2 and second.state == "queued"
    jobs.cancel(first.id)
    assert finish(first)[-1].kind == "cancelled"
    assert finish(second)[-1].kind == "done"


def test_cancel_stops_the_child_and_leaves_no_output(tmp_path):
    jobs = BuildQueue(FAKE)
    job = jobs.submit(request(tmp_path, "slow-c"))
    while job.next_event(timeout=10).kind != "progress":
        pass
    started = time.monotonic()
    assert jobs.cancel(job.id)
    assert finish(job)[-1].kind == "cancelled"
    assert time.monotonic() - started < 5
    assert not (tmp_path / "slow-c").exists()
    assert not jobs.cancel(job.id)  # already over


def test_cancel_while_waiting_removes_from_queue(tmp_path):
    jobs = BuildQueue(FAKE)
    first = jobs.submit(request(tmp_path, "slow-d"))
    second = jobs.submit(request(tmp_path, "ok-e"))
    assert jobs.cancel(second.id)
    assert finish(second)[-1].kind == "cancelled"
    jobs.cancel(first.id)
    finish(first)
    assert not (tmp_path / "ok-e").exists()


def test_a_child_that_ignores_cancel_is_killed(tmp_path):
    jobs = BuildQueue(FAKE, grace_seconds=1.0)
    job = jobs.submit(request(tmp_path, "hang-f"))
    while job.next_event(timeout=10).kind != "progress":
        pass
    jobs.cancel(job.id)
    assert finish(job, timeout=20)[-1].kind == "cancelled"


def test_crash_in_child_is_an_error_and_the_queue_goes_on(tmp_path):
    jobs = BuildQueue(FAKE)
    crashed = jobs.submit(request(tmp_path, "crash-g"))
    after = jobs.submit(request(tmp_path, "ok-h"))
    events = finish(crashed)
    assert events[-1].kind == "error" and "ended unexpectedly" in events[-1].message
    shown = " ".join(e.message for e in events)  # faulthandler's report names server files
    assert "Fatal Python error" not in shown and 'File "' not in shown and str(ROOT) not in shown
    assert finish(after)[-1].kind == "done"


def test_a_bug_in_the_build_shows_no_traceback_or_server_path(tmp_path, caplog):
    """The page gets a plain message; the traceback goes to the server log only."""
    job = BuildQueue(FAKE).submit(request(tmp_path, "bug-z"))
    with caplog.at_level("ERROR", logger="workbench.jobs.queue"):
        events = finish(job)
    shown = [e.message for e in events]
    assert events[-1].kind == "error" and "unexpected FileNotFoundError" in events[-1].message
    assert not [m for m in shown if str(tmp_path) in m or "Traceback" in m or 'File "' in m], shown
    deadline = time.monotonic() + 10  # stderr is drained beside the events: it may trail the last one
    while "Traceback" not in caplog.text and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "Traceback" in caplog.text and str(tmp_path) in caplog.text


def test_queue_limit_answers_quickly(tmp_path):
    jobs = BuildQueue(FAKE, max_waiting=1)
    running = jobs.submit(request(tmp_path, "slow-i"))
    while running.state == "queued":
        time.sleep(0.05)
    waiting = jobs.submit(request(tmp_path, "ok-j"))
    with pytest.raises(QueueFull, match="already waiting"):
        jobs.submit(request(tmp_path, "ok-k"))
    jobs.cancel(waiting.id)
    jobs.cancel(running.id)
    finish(running)


def test_token_reaches_child_by_environment_only(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_owner_token_must_not_leak")
    assert "HF_TOKEN" not in child_environment(None)
    assert child_environment(None)["HF_HUB_DISABLE_IMPLICIT_TOKEN"] == "1"
    assert child_environment("hf_user")["HF_TOKEN"] == "hf_user"
    jobs = BuildQueue(FAKE)
    with_token = jobs.submit(request(tmp_path, "ok-l"), token="hf_secret_for_test")
    finish(with_token)
    without = jobs.submit(request(tmp_path, "ok-m"))
    finish(without)
    assert (tmp_path / "ok-l" / "token.txt").read_text() == "yes"
    assert (tmp_path / "ok-m" / "token.txt").read_text() == "no"
    assert with_token.token is None  # not kept after the job


def test_real_build_of_a_pico_moe(tmp_path, pico_factory):
    base = pico_factory("jobs-base", seed=1)
    recipe = (f"base_model: {base}\nexperts:\n"
              f"  - source_model: {base}\n    positive_prompts: [code]\n"
              f"  - source_model: {base}\n    positive_prompts: [story]\n")
    jobs = BuildQueue()
    job = jobs.submit(BuildRequest(recipe, str(tmp_path / "pico-moe"), device="cpu"))
    events = finish(job, timeout=120)
    assert events[-1].kind == "done", events[-1].message
    stages = {e.stage for e in events if e.kind == "progress"}
    assert {"gates", "write"} <= stages
    assert (tmp_path / "pico-moe" / "workbench_manifest.json").is_file()
    names = [name for name, _ in events[-1].result["files"]]
    assert "config.json" in names and "model.safetensors" in names


def test_child_stops_when_the_server_goes_away(tmp_path):
    child = subprocess.Popen([sys.executable, "-m", "workbench.jobs.child"], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                             env=child_environment(None))
    child.stdin.write(json.dumps({"runner": FAKE, **asdict(request(tmp_path, "slow-o"))}) + "\n")
    child.stdin.flush()
    assert json.loads(child.stdout.readline())["kind"] == "progress"
    child.stdin.close()  # what a dead server looks like from the child
    kinds = [json.loads(line)["kind"] for line in child.stdout]
    assert kinds[-1] == "cancelled" and child.wait(timeout=10) == 0
    assert not (tmp_path / "slow-o").exists()


EXAMPLES = "\n".join(json.dumps({"prompt": p, "reply": r}) for p, r in [
    ("What is the weather like?", "Arr, grey skies, matey!"), ("How do I boil an egg?", "Arr, nine minutes!"),
    ("Tell me about the moon.", "Arr, a silver doubloon!")])


def forge_request(base: Path, out: Path, steps: int = 4, **more) -> ForgeRequest:
    return ForgeRequest(str(base), EXAMPLES, str(out), steps=steps, lr=1e-3, batch_size=2, device="cpu",
                        **more)


def test_a_forge_job_streams_its_losses_and_answers_the_samples(tmp_path, pico_factory):
    base = pico_factory("jobs-forge-base", seed=2)
    job = BuildQueue().submit(forge_request(base, tmp_path / "pirate", samples=("Hello?", "What is 1 + 1?")))
    assert job.id.startswith("forge-")
    events = finish(job, timeout=180)
    assert events[-1].kind == "done", events[-1].message
    points = [e.metrics for e in events if e.kind == "progress" and e.metrics]
    assert [p["step"] for p in points] == [1, 2, 3, 4]  # every step reaches the page's plot
    result = events[-1].result
    assert result["losses"] == [p["loss"] for p in points]
    assert [s["prompt"] for s in result["samples"]] == ["Hello?", "What is 1 + 1?"]
    assert all(isinstance(s["base"], str) and isinstance(s["forged"], str) for s in result["samples"])
    assert is_output(tmp_path / "pirate")


def test_a_forge_killed_mid_training_leaves_nothing_finished_and_the_next_succeeds(tmp_path, pico_factory):
    base = pico_factory("jobs-forge-base", seed=2)
    jobs = BuildQueue()
    job = jobs.submit(forge_request(base, tmp_path / "pirate", steps=400))
    for event in job.stream():
        if event is not None and event.kind == "progress" and (event.metrics or {}).get("step") == 2:
            os.killpg(jobs._child.pid, signal.SIGKILL)  # kill -9: no cleanup code runs in the child
            break
    events = finish(job)
    assert events[-1].kind == "error" and "ended unexpectedly" in events[-1].message
    assert not (tmp_path / "pirate").exists()
    assert not any((p / MANIFEST).exists() for p in tmp_path.iterdir())  # only an unfinished staging folder
    again = finish(jobs.submit(forge_request(base, tmp_path / "pirate")), timeout=180)
    assert again[-1].kind == "done", again[-1].message
    assert is_output(tmp_path / "pirate")
    assert [p.name for p in tmp_path.iterdir()] == ["pirate"]  # the killed forge's staging is cleaned


def test_every_page_that_follows_a_job_reads_it_from_the_start_to_its_end(tmp_path):
    jobs = BuildQueue(FAKE)
    job = jobs.submit(request(tmp_path, "ok-replay"), owner="a" * 32)
    live = [e for e in job.stream(poll=0.1) if e is not None]  # the page that started it
    later = [e for e in job.stream(poll=0.1) if e is not None]  # a page reopened after the end
    assert [e.kind for e in later] == [e.kind for e in live]
    assert later[0].kind == "queued" and later[-1].kind == "done"
    assert all(a.at <= b.at for a, b in zip(later, later[1:], strict=False))  # timed as received
    assert job.result["path"] == str(tmp_path / "ok-replay")


def test_a_session_finds_its_own_jobs_and_no_one_else_s(tmp_path):
    jobs = BuildQueue(FAKE)
    mine = jobs.submit(request(tmp_path, "ok-mine"), owner="a" * 32)
    theirs = jobs.submit(request(tmp_path, "ok-theirs"), owner="b" * 32)
    nobody = jobs.submit(request(tmp_path, "ok-nobody"))
    for job in (mine, theirs, nobody):
        finish(job)
    assert jobs.jobs_of("a" * 32) == [mine]
    assert jobs.jobs_of("a" * 32, "forge") == []
    assert jobs.jobs_of("") == []  # a job without an owner is found by no page


def test_finished_jobs_are_kept_for_reopened_pages_up_to_a_bound(tmp_path, monkeypatch):
    monkeypatch.setattr("workbench.jobs.queue.KEEP_FINISHED", 2)
    jobs = BuildQueue(FAKE)
    done = [jobs.submit(request(tmp_path, f"ok-kept-{i}"), owner="a" * 32) for i in range(3)]
    for job in done:
        finish(job)
    deadline = time.monotonic() + 10  # the runner forgets old jobs just after the last one's final event
    while len(jobs.jobs_of("a" * 32)) > 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert jobs.jobs_of("a" * 32) == done[1:]


def test_a_job_keeps_a_stage_s_first_event_and_about_one_progress_a_second_after_it():
    from workbench.jobs import Job, JobEvent

    job = Job("build-x", request(Path("/tmp"), "ok"))
    job._emit(JobEvent("progress", "write", 0.0, "first tensor"))
    for n in range(1, 200):  # ten a second would be 200 events in 20 s; these come at once
        job._emit(JobEvent("progress", "write", n / 200, f"tensor {n}"))
    job._emit(JobEvent("progress", "forge", 0.5, "step 1", metrics={"step": 1, "loss": 2.0}))
    job._emit(JobEvent("progress", "forge", 0.6, "step 2", metrics={"step": 2, "loss": 1.9}))
    kept = [(e.stage, e.message) for e in job.history]
    assert kept == [("write", "first tensor"), ("write", "tensor 199"),  # the newest stands for the rest
                    ("forge", "step 1"), ("forge", "step 2")]  # a point of a plot is never dropped
