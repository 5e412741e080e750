"""Forging an expert in a real browser, starting with nothing built or forged.

A user picks a shipped example set, shortens the training (typed, at human speed), forges on
the demo model, watches the loss plot grow, reads the base's and the forged expert's sample
replies side by side, and adds the expert to the recipe. Another user opens the alignment demo
preset, is offered to forge its missing experts, starts, and cancels. Screenshots go to the
test's temporary folder (the path is printed) to be looked at; the finished forge's also to
assets/screenshots/forge.png (the README shows it).
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from tests.browser import (
    DOC,
    ROOT,
    SHOTS,
    no_error_shown,
    open_tab,
    screenshot_folder,
    session_page,
    type_slowly,
    wait_for_text,
)

pytestmark = [pytest.mark.browser, pytest.mark.demo]


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    return screenshot_folder(tmp_path_factory, "forge-screenshots")


@pytest.fixture
def page(browser, server):
    with session_page(browser, server) as page:
        yield page


def choose(page, selector: str, option: str) -> None:
    page.locator(f"{selector} input").click(timeout=120_000)
    time.sleep(0.6)
    page.get_by_role("option", name=option).click()


def test_forge_a_villain_watch_the_loss_compare_replies_and_add_it_to_the_recipe(page, shots):
    open_tab(page, "Forge an expert")
    choose(page, "#wb-forge-set", "villain (28 examples)")
    deadline = time.monotonic() + 20
    while "Mwahaha" not in page.input_value("#wb-forge-examples textarea") and time.monotonic() < deadline:
        time.sleep(0.2)
    assert page.input_value("#wb-forge-name textarea") == "villain-expert"
    page.get_by_text("Training settings").click()
    steps = page.get_by_label("Steps")
    steps.click()
    steps.press("Control+a")
    type_slowly(page, "6")
    time.sleep(1)
    page.locator("#wb-forge").click()
    wait_for_text(page, "#wb-forge-status", ("Training the MLPs", "Queued", "Waiting", "Preparing"), 60)
    wait_for_text(page, "#wb-forge-loss", ("Training loss",), 120)  # the plot appears with the first step
    page.screenshot(path=str(shots / "forge-running.png"))
    status = wait_for_text(page, "#wb-forge-status", ("Forged", "failed"), 600)
    assert "✔ Forged villain-expert in" in status, status  # the name in bold, read as text
    page.mouse.move(0, 0)  # no hover tooltips in the picture
    page.screenshot(path=str(shots / "forge-done.png"), full_page=True)
    page.screenshot(path=str(SHOTS / "forge.png"), full_page=True)  # the README shows it
    assert page.locator("#wb-forge-loss .js-plotly-plot").count() == 1
    summary = page.inner_text("#wb-forge-summary")
    assert "prompt" in summary and "forged" in summary and "Why is the sky blue?" in summary
    assert "villain-expert" in page.inner_text("#wb-forge-list")

    page.locator("#wb-forge-add").click()
    open_tab(page, "1 · Design")
    deadline = time.monotonic() + 60
    while page.locator(".wb-card").count() != 5 and time.monotonic() < deadline:
        time.sleep(0.25)
    assert page.locator(".wb-card").count() == 5
    text = page.evaluate(DOC)
    assert "villain-expert" in text and text.startswith("# The embedded default")  # comments kept
    wait_for_text(page, "#wb-summary", ("Ready",), 60)  # the forged folder is a valid expert
    page.screenshot(path=str(shots / "forge-added.png"))
    no_error_shown(page)


def test_the_alignment_preset_offers_to_forge_its_experts_and_a_cancel_leaves_nothing(page, shots):
    if (ROOT / "outputs" / "hero-expert").exists():
        pytest.skip("this checkout has forged the alignment demo's hero already (outputs/hero-expert)")
    choose(page, "#wb-preset", "alignment-demo")
    wait_for_text(page, "#wb-missing-experts", ("not forged yet",), 60)
    assert "**hero**" not in page.inner_text("#wb-missing-experts")  # bold, not asterisks
    page.screenshot(path=str(shots / "alignment-missing.png"))
    page.locator("#wb-forge-missing").click()
    status = wait_for_text(page, "#wb-forge-status", ("1 of 2",), 60)
    assert "hero" in status
    assert page.locator("#wb-forge-cancel").is_enabled()
    # The progress reads as it moves: which expert, the step and the loss, step after step.
    early = wait_for_text(page, "#wb-forge-status", ("step 2/20",), 300)
    moving = r"1 of 2 \(hero\): Training the MLPs: step 2/20, loss \d+\.\d{3}, \d+ s left"
    assert re.search(moving, early), early
    wait_for_text(page, "#wb-forge-status", ("step 4/20",), 120)
    trained = (ROOT / "assets" / "forge" / "hero.jsonl").read_text()
    assert page.input_value("#wb-forge-examples textarea") == trained  # the box shows what trains
    page.screenshot(path=str(shots / "alignment-progress.png"))
    page.locator("#wb-forge-cancel").click()
    wait_for_text(page, "#wb-forge-status", ("cancelled",), 60)
    page.screenshot(path=str(shots / "alignment-cancelled.png"))
    assert not (ROOT / "outputs" / "hero-expert").exists()
    # Nothing built yet: the Chat tab's "Try" prompts are this recipe's themes, not the demo's.
    open_tab(page, "4 · Chat")
    page.locator("#wb-tab-chat").get_by_text("Should I tell the truth even if it gets me in trouble?",
                                             exact=True).wait_for(timeout=30_000)
    assert page.locator("#wb-tab-chat").get_by_text("Write a Python function that checks whether a string",
                                                    exact=False).count() == 0
    no_error_shown(page)
