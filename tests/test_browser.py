"""The app in a real browser (Debian's headless Chromium through Playwright), on the demo model.

One server (`python app.py` on a free port, outputs in a temporary folder) and one page walk
through what a user does, in order: the page loads with the demo preset; a bad YAML edit
shows an inline error; the preview heatmap appears; the demo preset builds to the end with
its progress bar; both chat panes stream a reply; the routing heatmap of that reply renders.
A second browser context checks that sessions keep their own state. Screenshots of each
tab go to assets/screenshots/ (the README shows them).
"""

from __future__ import annotations

import re
import time
from urllib.parse import urlparse

import pytest

from tests.browser import SHOTS, VIEWPORT, open_tab, shot, wait_for_text, yaml_has

pytestmark = [pytest.mark.browser, pytest.mark.demo]


@pytest.fixture(scope="module")
def page(browser, server):
    context = browser.new_context(viewport=VIEWPORT)
    page = context.new_page()
    page.requests = []
    page.on("request", lambda request: page.requests.append(request.url))
    page.goto(server, wait_until="load")
    page.wait_for_selector("#wb-expert-3", timeout=60_000)
    yield page
    context.close()


def test_page_loads_offline_with_the_demo_preset(page, server):
    assert page.title() == "MoE Workbench"
    assert page.input_value("#wb-base-model textarea") == "demo:smollm2-135m-instruct"
    positives = page.locator("#wb-expert-0").get_by_label("Positive prompts")
    assert "Write a Python function" in positives.input_value()
    summary = wait_for_text(page, "#wb-summary", ("PARAMETERS",), 60)  # sizes shown in capitals
    assert "Ready" in summary and "ACTIVE PER TOKEN" in summary
    hosts = {urlparse(url).hostname for url in page.requests if url.startswith("http")}
    assert hosts <= {"127.0.0.1"}, f"the page fetched from {hosts}"
    shot(page, "design")


def test_bad_yaml_shows_an_inline_error_and_a_good_edit_updates_the_form(page):
    original = page.locator("#wb-yaml .cm-content").inner_text()
    editor = page.locator("#wb-yaml .cm-content")
    editor.click()
    page.keyboard.press("Control+End")
    page.keyboard.type("\nexperts_per_token: [oops\n")
    problems = wait_for_text(page, "#wb-yaml-problems", ("YAML syntax error",), 20)
    assert "line" in problems and "column" in problems
    assert page.input_value("#wb-base-model textarea") == "demo:smollm2-135m-instruct"  # form kept
    editor.click()
    page.keyboard.press("Control+a")
    page.keyboard.insert_text(original.replace("demo:smollm2-135m-instruct", "demo:typo-model", 1))
    wait_for_text(page, "#wb-yaml-problems", ("unknown demo model",), 20)
    page.wait_for_function("document.querySelector('#wb-base-model textarea').value === 'demo:typo-model'",
                           timeout=20_000)
    editor.click()
    page.keyboard.press("Control+a")
    page.keyboard.insert_text(original)
    page.wait_for_function("document.querySelector('#wb-base-model textarea').value === "
                           "'demo:smollm2-135m-instruct'", timeout=20_000)
    wait_for_text(page, "#wb-summary", ("Ready",), 30)


def test_a_field_edit_shows_its_problem_next_to_the_field(page):
    source = page.locator("#wb-expert-1").get_by_label("Source model")
    source.fill("")
    card = wait_for_text(page, "#wb-expert-1", ("is empty",), 20)
    assert "name a hub id" in card
    assert "source_model: ''" in page.locator("#wb-yaml .cm-content").inner_text()
    source.fill("demo:smollm2-135m-instruct")
    wait_for_text(page, "#wb-summary", ("Ready",), 30)


def test_preview_heatmap_appears(page):
    open_tab(page, "2 · Preview")
    page.wait_for_selector("#wb-preview-heatmap .js-plotly-plot", timeout=180_000)
    plot = "document.querySelector('#wb-preview-heatmap .js-plotly-plot')"
    kinds = page.evaluate(f"{plot}.data.map(t => t.type)")
    assert kinds == ["heatmap"]
    assert "exactly" in page.inner_text("#wb-preview-note")
    page.wait_for_selector("#wb-preview-score .js-plotly-plot", timeout=180_000)
    summary = wait_for_text(page, "#wb-preview-score-summary", ("Held-out top-1",), 180)
    assert "chance 0.25" in summary
    shot(page, "preview")


def test_compare_gate_modes_then_use_the_best(page):
    # The user switches the demo to mergekit's mode in the form, then asks which mode is best.
    open_tab(page, "1 · Design")
    page.get_by_label("Gate mode").click()
    page.get_by_role("option", name="hidden", exact=True).click()
    yaml_has(page, "gate_mode: hidden")
    open_tab(page, "2 · Preview")
    page.click("#wb-compare-run")
    table = wait_for_text(page, "#wb-compare-table", ("hidden (recipe)",), 300)
    assert page.locator("#wb-compare-table tbody tr td").first.inner_text().strip() == "fitted"  # best first
    assert "random" in table and "chance" in table.lower()
    use = page.locator("#wb-compare-use")
    use.wait_for(state="visible", timeout=30_000)
    assert "Use fitted" in use.inner_text()
    page.locator("#wb-compare-table").scroll_into_view_if_needed()
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / "preview-compare.png"))
    use.click()
    yaml_has(page, "gate_mode: fitted")
    # Read the toast while it shows: on a loaded machine the held-out score below takes longer
    # than the toast stays up.
    page.wait_for_selector(".toast-body", timeout=30_000)
    toasts = page.locator(".toast-body").all_inner_texts()  # the one that says what changed, no error
    assert toasts and all("gate_mode is now fitted" in t for t in toasts), toasts
    text = page.locator("#wb-yaml .cm-content").inner_text()
    assert "# The embedded default" in text and "name: chit-chat" in text  # the rest as the user wrote it
    wait_for_text(page, "#wb-preview-score-summary", ("Held-out top-1",), 180)
    open_tab(page, "1 · Design")
    page.wait_for_function("document.querySelector('#wb-yaml').closest('body')"
                           ".querySelector('input[aria-label=\"Gate mode\"]')?.value === 'fitted'",
                           timeout=30_000)
    later = page.locator(".toast-body").all_inner_texts()
    assert all("gate_mode is now fitted" in t for t in later), later  # and no error came after it


def test_demo_build_runs_to_the_end_with_its_progress_bar(page):
    open_tab(page, "3 · Build")
    page.fill("#wb-output-name textarea", "browser-moe")
    page.click("#wb-build")
    seen_bar, deadline = False, time.monotonic() + 300
    while time.monotonic() < deadline:
        status = page.inner_text("#wb-build-status")
        if re.search(r"█+░* \d+%", status):  # what the build does, its one bar and percentage
            seen_bar = True
            if not (SHOTS / "build-progress.png").exists() or "Writing" in status:
                SHOTS.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(SHOTS / "build-progress.png"))
        if "finished" in status or "failed" in status:
            break
        time.sleep(0.2)
    assert "Build finished" in status, status
    assert seen_bar, "no progress bar was shown during the build"
    assert "model.safetensors" in page.inner_text("#wb-build-summary")
    shot(page, "build")
    # The same name again, without 'replace': said in the status, not left under "finished".
    page.click("#wb-build")
    status = wait_for_text(page, "#wb-build-status", ("Not started",), 30)
    assert "browser-moe" in status and "exists" in status
    assert page.inner_text("#wb-build-summary").strip() == ""
    assert page.locator(".toast-body").count() == 0


def test_the_build_exports_as_gguf_and_reads_back_its_experts(page):
    page.get_by_text("Export as GGUF (llama.cpp)").click()
    assert "browser-moe" in page.input_value("#wb-gguf input")  # the newest build, chosen already
    page.locator("#wb-gguf").get_by_label("Type").click()
    page.get_by_role("option", name="q8_0").click()
    page.click("#wb-gguf-export")
    status = wait_for_text(page, "#wb-gguf-status", ("✔ Wrote", "failed", "cannot"), 600)
    assert "✔ Wrote" in status and "q8_0" in status, status
    assert "4 experts (2 per token), checked" in status, status
    assert page.locator(".toast-body").count() == 0


def test_both_chat_panes_stream_a_reply(page):
    open_tab(page, "4 · Chat")
    page.wait_for_function("document.querySelector('#wb-chat-moe-build input').value.includes('browser-moe')",
                           timeout=20_000)
    assert page.input_value("#wb-chat-base-model textarea") == "demo:smollm2-135m-instruct"
    page.get_by_text("System prompt and sampling").click()
    tokens = page.locator("#wb-max-new input[type=number]")
    tokens.fill("24")
    tokens.press("Enter")
    page.fill("#wb-chat-input textarea", "Write a haiku about the sea.")
    page.click("#wb-send")
    # Streaming means the page shows a reply growing: several lengths before the stats arrive.
    seen: dict[str, set[int]] = {"base": set(), "moe": set()}
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        for side, lengths in seen.items():
            lengths.add(page.evaluate(f"(b => b.length ? b[b.length - 1].innerText.length : 0)"
                                      f"(document.querySelectorAll('#wb-chat-{side} [data-testid=bot]'))"))
        if all("tokens/s" in page.inner_text(f"#wb-stats-{side}") for side in seen):
            break
        time.sleep(0.03)
    for side, lengths in seen.items():
        assert "tokens/s" in page.inner_text(f"#wb-stats-{side}"), f"the {side} pane never finished"
        assert len(lengths - {0}) >= 2, f"the {side} reply did not stream (lengths seen: {sorted(lengths)})"
    base_reply = page.locator("#wb-chat-base [data-testid='bot']").last.inner_text()
    moe_reply = page.locator("#wb-chat-moe [data-testid='bot']").last.inner_text()
    assert base_reply.strip() and moe_reply.strip()
    page.get_by_text("System prompt and sampling").click()  # closed again for the screenshot
    shot(page, "chat")


def test_routing_heatmap_of_the_reply_renders_with_traces(page):
    page.click("#wb-open-routing")
    page.wait_for_selector("#wb-routing-heatmap .js-plotly-plot", timeout=120_000)
    plot = "document.querySelector('#wb-routing-heatmap .js-plotly-plot')"
    kinds = page.evaluate(f"{plot}.data.map(t => t.type)")
    drawn = page.locator("#wb-routing-heatmap .heatmaplayer .hm").count()  # the painted heatmap
    rows = page.evaluate(f"(r => Math.round(Math.abs(r[0] - r[1])))({plot}._fullLayout.yaxis.range)")
    assert kinds == ["heatmap"] and drawn >= 1 and rows == 30  # one row per layer
    summary = page.inner_text("#wb-routing-summary")
    assert "generated" in summary and "KL" in summary
    page.wait_for_selector("#wb-routing-divergence .js-plotly-plot", timeout=60_000)
    shot(page, "routing")


def test_two_sessions_keep_their_own_state(browser, server, page):
    other = browser.new_context(viewport=VIEWPORT).new_page()
    other.goto(server, wait_until="load")
    other.wait_for_selector("#wb-expert-3", timeout=60_000)
    open_tab(page, "1 · Design")
    page.fill("#wb-base-model textarea", "demo:first-session-only")
    page.wait_for_function("document.querySelector('#wb-yaml .cm-content').innerText"
                           ".includes('first-session-only')", timeout=20_000)
    time.sleep(1)
    assert "first-session-only" not in other.locator("#wb-yaml .cm-content").inner_text()
    assert other.input_value("#wb-base-model textarea") == "demo:smollm2-135m-instruct"
    open_tab(other, "4 · Chat")
    assert other.locator("#wb-chat-moe [data-testid='bot']").count() == 0  # the first session's chat
    assert page.locator("#wb-chat-moe [data-testid='bot']").count() >= 1
    other.context.close()
