"""Steering the router live, in a real browser, as a presenter would, starting with nothing built.

The presenter halves one expert's output in the Design form (so that routing shows in the
replies), builds the demo, bans that expert in the Chat tab's Interventions panel and sends
a message: a third pane answers the same message with the same seed under the ban, labelled
with it, and the Routing tab marks the cells the ban changed. Then they edit a prompt on the
Design tab and chat again with the recipe's new routers, no rebuild: the reply says which
revision of the unsaved recipe it ran under, twice. Screenshots of each step go to the test's
temporary folder (the path is printed); the README's two go to assets/screenshots/.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.browser import (
    SHOTS,
    no_error_shown,
    open_tab,
    screenshot_folder,
    session_page,
    type_slowly,
    wait_for_text,
    yaml_has,
)

pytestmark = [pytest.mark.browser, pytest.mark.demo]

PANES = ("base", "moe", "steered")


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    return screenshot_folder(tmp_path_factory, "steer-screenshots")


@pytest.fixture(scope="module")
def page(browser, server):
    with session_page(browser, server) as page:
        yield page


def last_reply(page, side: str) -> str:
    replies = page.locator(f"#wb-chat-{side} [data-testid='bot']")
    return replies.last.inner_text() if replies.count() else ""


def send(page, text: str, panes: tuple[str, ...] = PANES, timeout: float = 300) -> float:
    """Type a message slowly, send it, wait until every pane has its stats; seconds from the click."""
    before = {side: page.locator(f"#wb-chat-{side} [data-testid='bot']").count() for side in panes}
    page.locator("#wb-chat-input textarea").click()
    type_slowly(page, text)
    page.locator("#wb-send").click()
    clicked = time.monotonic()
    deadline = clicked + timeout
    while time.monotonic() < deadline:
        counts = {side: page.locator(f"#wb-chat-{side} [data-testid='bot']").count() for side in panes}
        done = all(counts[s] > before[s] and "tokens/s" in page.inner_text(f"#wb-stats-{s}") for s in panes)
        if done:
            return time.monotonic() - clicked
        time.sleep(0.25)
    raise AssertionError({s: page.inner_text(f"#wb-stats-{s}") for s in panes})


def test_the_presenter_builds_a_demo_whose_experts_differ(page, shots):
    card = page.locator("#wb-expert-2")  # "story"
    residual = card.get_by_label("Residual scale")
    residual.click()
    type_slowly(page, "0.5")
    residual.press("Tab")
    yaml_has(page, "residual_scale: 0.5")
    wait_for_text(page, "#wb-summary", ("Ready",), 60)
    open_tab(page, "3 · Build")
    page.locator("#wb-output-name textarea").click()
    page.keyboard.press("Control+a")
    type_slowly(page, "steer-moe")
    page.locator("#wb-build").click()
    status = wait_for_text(page, "#wb-build-status", ("finished", "failed"), 900)
    assert "Build finished" in status, status
    page.screenshot(path=str(shots / "built.png"))
    no_error_shown(page)


def test_a_ban_answers_in_a_third_pane_labelled_with_it(page, shots):
    open_tab(page, "4 · Chat")
    page.wait_for_function("document.querySelector('#wb-chat-moe-build input').value.includes('steer-moe')",
                           timeout=30_000)
    page.get_by_text("System prompt and sampling").click()
    tokens = page.locator("#wb-max-new input[type=number]")
    tokens.click()
    tokens.press("Control+a")
    type_slowly(page, "24")
    tokens.press("Enter")
    page.get_by_text("System prompt and sampling").click()
    assert not page.locator("#wb-chat-steered").is_visible()  # no third pane before an intervention
    page.get_by_text("Interventions: steer the MoE's router").click()
    story = page.locator("#wb-steer-ban").get_by_label("e2 story")
    story.wait_for(state="visible", timeout=30_000)
    time.sleep(0.5)
    story.click()
    wait_for_text(page, "#wb-steer-note", ("e2 (story) banned",), 30)
    page.locator("#wb-chat-steered").wait_for(state="visible", timeout=30_000)  # it opened by itself
    page.screenshot(path=str(shots / "panel.png"))
    send(page, "Tell me a story about a dragon.")
    steered, moe = last_reply(page, "steered"), last_reply(page, "moe")
    assert steered.startswith("⚙ under: e2 (story) banned"), steered
    assert moe and "under:" not in moe  # the MoE pane keeps the saved routers, unlabelled
    page.locator("#wb-steer").scroll_into_view_if_needed()
    page.mouse.move(0, 0)
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / "chat-steer.png"))
    no_error_shown(page)


def test_the_routing_tab_marks_what_the_ban_changed(page, shots):
    page.locator("#wb-open-steered-routing").click()
    page.wait_for_selector("#wb-routing-heatmap .js-plotly-plot", timeout=180_000)
    summary = wait_for_text(page, "#wb-routing-summary", ("under:",), 180)
    assert "under: e2 (story) banned" in summary and "ran other experts" in summary, summary
    plot = "document.querySelector('#wb-routing-heatmap .js-plotly-plot')"
    page.wait_for_function(f"{plot} && {plot}.data && {plot}.data.length === 2", timeout=60_000)
    assert page.evaluate(f"{plot}.data.map(t => t.type)") == ["heatmap", "scatter"]
    assert page.evaluate(f"{plot}._fullData[1].x.length") > 0  # the marks, one per changed cell
    page.mouse.move(0, 0)
    page.evaluate("window.scrollTo(0, 0)")
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / "routing-steer.png"))
    no_error_shown(page)


def test_a_prompt_edit_routes_the_next_reply_without_a_rebuild(page, shots):
    for revision, words in ((1, " Or a shell script."), (2, " In Rust.")):
        open_tab(page, "1 · Design")
        positives = page.locator("#wb-expert-0").get_by_label("Positive prompts")
        positives.click()
        page.keyboard.press("Control+End")
        type_slowly(page, words)
        page.keyboard.press("Tab")  # leave the field, as a person does
        yaml_has(page, words.strip())
        wait_for_text(page, "#wb-summary", ("Ready",), 60)
        open_tab(page, "4 · Chat")
        if revision == 1:
            page.locator("#wb-steer-ban").get_by_label("e2 story").click()  # the ban off again
            page.locator("#wb-steer-routers").get_by_label("the Design tab's recipe (unsaved)").click()
            wait_for_text(page, "#wb-steer-note", ("routers from the unsaved recipe",), 30)
        seconds = send(page, "Write a Python function that adds two numbers.")
        steered = last_reply(page, "steered")
        assert steered.startswith(f"⚙ under: routers from the unsaved recipe (revision {revision})"), steered
        stats = page.inner_text("#wb-stats-steered")
        assert "routers from the recipe in" in stats, stats
        print(f"revision {revision}: every pane done {seconds:.1f} s after the click; {stats}")
        page.screenshot(path=str(shots / f"recipe-routers-{revision}.png"))
    no_error_shown(page)
