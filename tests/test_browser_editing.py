"""The app holding up under a real user, in a real browser, starting with nothing built.

A user types into the YAML editor at human speed with pauses, switches every preset, edits
the form (experts per token, a new expert), chats before any build, opens Routing before
any reply and downloads the recipe. Nothing they type may be rewritten or lost, and no
error toast may appear for any of it. Screenshots of each step go to the test's temporary
folder (the path is printed) to be looked at.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.browser import (
    DOC,
    no_error_shown,
    open_tab,
    screenshot_folder,
    session_page,
    type_slowly,
    wait_for_text,
    yaml_has,
)

pytestmark = [pytest.mark.browser, pytest.mark.demo]

PRESETS = ["raiden-16x3b", "demo", "cognito-2x7b", "mistral-4x7b", "demo", "blank", "demo"]


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    return screenshot_folder(tmp_path_factory, "screenshots")


@pytest.fixture
def page(browser, server):
    """A fresh session per test, with every console error and toast recorded."""
    with session_page(browser, server, accept_downloads=True) as page:
        yield page


def editor_text(page) -> str:
    return page.evaluate(DOC)


def test_slow_typing_in_the_yaml_keeps_every_character_and_comment(page, shots):
    """1-2 s into a pause, the editor's text was replaced by a re-dump of the recipe."""
    before = editor_text(page)
    page.locator("#wb-yaml .cm-line", has_text="How do I use git rebase").first.click()
    page.keyboard.press("End")
    type_slowly(page, '\n- "Slow typer continues with a longer line', pause_after=(10, 24))
    time.sleep(4)
    after = editor_text(page)
    page.screenshot(path=str(shots / "typed-yaml.png"))
    new_lines = [line for line in after.splitlines() if line not in before.splitlines()]
    assert new_lines == ['      - "Slow typer continues with a longer line"']  # the editor closed the quote
    assert [line for line in before.splitlines() if line not in after.splitlines()] == []
    assert after.startswith("# The embedded default")
    wait_for_text(page, "#wb-summary", ("Ready",), 30)
    positives = page.locator("#wb-expert-0").get_by_label("Positive prompts")
    deadline = time.monotonic() + 30  # the form follows the editor; a busy machine takes a while
    while not positives.input_value().endswith("longer line") and time.monotonic() < deadline:
        time.sleep(0.25)
    assert positives.input_value().endswith("Slow typer continues with a longer line")
    assert editor_text(page) == after  # and the form catching up never wrote into the editor
    no_error_shown(page)


def test_switching_every_preset_shows_no_error_toast(page, shots):
    """Each switch once showed 'Could not parse server response' toasts (KeyErrors on the server)."""
    for name in PRESETS:
        # A busy renderer still drawing 16 cards can hold a click's wait for navigations past
        # Playwright's 30 s default (seen on a loaded CI machine): the user would just wait.
        page.locator("#wb-preset input").click(timeout=120_000)
        time.sleep(0.6)
        page.get_by_role("option", name=name, exact=True).click()
        expected = {"raiden-16x3b": 16, "cognito-2x7b": 2, "blank": 2}.get(name, 4)
        deadline = time.monotonic() + 60  # a busy machine re-renders 16 cards slowly
        while page.locator(".wb-card").count() != expected and time.monotonic() < deadline:
            time.sleep(0.25)
        assert page.locator(".wb-card").count() == expected, name
        time.sleep(1.5)  # any late event of the old form arrives by now
        no_error_shown(page)
    page.screenshot(path=str(shots / "presets.png"))
    assert editor_text(page).startswith("# The embedded default")


def test_a_form_edit_keeps_the_yaml_comments_and_top_k_zero_is_explained(page, shots):
    """Top-k 0 left the form at 0, the YAML at 2 and the status at Ready; later edits were dropped."""
    k = page.get_by_label("Experts per token")
    k.click()
    k.press("Control+a")
    type_slowly(page, "0")
    k.press("Tab")
    wait_for_text(page, "#wb-summary", ("error",), 30)
    assert "experts_per_token: 0" in editor_text(page)
    assert "must be at least 1" in page.inner_text("body")
    page.screenshot(path=str(shots / "top-k-zero.png"))
    k.click()
    k.press("Control+a")
    type_slowly(page, "1")
    k.press("Tab")
    wait_for_text(page, "#wb-summary", ("Ready",), 30)
    text = editor_text(page)
    assert "experts_per_token: 1" in text and text.startswith("# The embedded default")
    assert '      - "Write a Python function that reverses a linked list."' in text  # quotes kept

    page.locator("#wb-add-expert").click()
    page.wait_for_selector("#wb-expert-4", timeout=30_000)
    source = page.locator("#wb-expert-4").get_by_label("Source model")
    assert source.input_value() == "demo:smollm2-135m-instruct"
    problems = page.inner_text("#wb-expert-4")
    assert "positive_prompts" in problems or "prompt" in problems
    assert editor_text(page).startswith("# The embedded default")
    no_error_shown(page)


def test_prompts_as_chat_messages_route_what_is_typed_as_the_chat_sends_it(page, shots):
    page.get_by_label("Prompts are").click()
    page.get_by_role("option", name="chat messages").click()
    yaml_has(page, "prompt_template: chat")  # the form's edit reaches the YAML a moment later
    wait_for_text(page, "#wb-summary", ("Ready",), 60)
    text = editor_text(page)
    assert "prompt_template: chat" in text and text.startswith("# The embedded default")
    assert '      - "Write a Python function that reverses a linked list."' in text  # the rest as written
    open_tab(page, "2 · Preview")
    page.click("#wb-preview-run")
    plot = "document.querySelector('#wb-preview-heatmap .js-plotly-plot')"
    # The typed text is routed inside the chat template: the system prompt and the assistant's
    # opening are among its tokens.
    tokens = f"String({plot}.data[0].customdata[0])"
    page.wait_for_function(f"{plot} && {plot}.data && {tokens}.includes('assistant')", timeout=180_000)
    page.screenshot(path=str(shots / "preview-chat-template.png"))
    no_error_shown(page)


def test_with_nothing_built_the_base_chats_and_routing_says_what_to_do(page, shots):
    """No build: the message vanished and both panes said Error; Routing showed a bare Error."""
    open_tab(page, "4 · Chat")
    page.get_by_text("System prompt and sampling").click()
    tokens = page.locator("#wb-max-new input[type=number]")
    tokens.fill("8")
    tokens.press("Enter")
    page.locator("#wb-chat-input textarea").click()
    type_slowly(page, "Hi there")
    page.locator("#wb-send").click()
    wait_for_text(page, "#wb-stats-base", ("tokens/s",), 120)
    assert "Hi there" in page.inner_text("#wb-chat-base")
    assert "Hi there" in page.inner_text("#wb-chat-moe")
    assert "build one on the Build tab" in page.inner_text("#wb-stats-moe")
    page.screenshot(path=str(shots / "chat-without-a-build.png"))
    no_error_shown(page)

    open_tab(page, "5 · Routing")
    page.locator("#wb-routing-run").click()
    wait_for_text(page, "#wb-routing-summary", ("No chat reply yet",), 30)
    assert "Error" not in page.inner_text("#wb-routing-heatmap")
    page.screenshot(path=str(shots / "routing-empty.png"))
    no_error_shown(page)


def test_the_recipe_downloads_as_the_editor_shows_it(page):
    open_tab(page, "3 · Build")
    with page.expect_download() as found:
        page.locator("#wb-download").click()
    saved = Path(found.value.path()).read_text()
    assert saved == editor_text(page) and saved.startswith("# The embedded default")


def test_a_shared_expert_gets_a_card_like_a_routed_one(page, shots):
    """Shared experts were YAML only; Qwen2-MoE's gated shared expert now has a card with prompts."""
    assert page.locator("#wb-shared-0").count() == 0
    page.get_by_label("Output family").click()
    page.get_by_role("option", name="Qwen2-MoE (+ gated shared expert)").click()
    yaml_has(page, "architecture: qwen")
    wait_for_text(page, "#wb-summary", ("error(s) to fix",), 30)  # Qwen2-MoE needs its shared expert
    page.locator("#wb-add-shared").click()
    card = page.locator("#wb-shared-0")
    card.wait_for(state="visible", timeout=30_000)
    assert card.get_by_label("Source model").input_value() == "demo:smollm2-135m-instruct"
    wait_for_text(page, "#wb-shared-0", ("gates its shared expert",), 30)  # its problem, on its card
    assert page.locator("#wb-add-shared").is_hidden()  # one shared expert at most
    positives = card.get_by_label("Positive prompts")
    positives.click()
    type_slowly(page, "Plain everyday text about anything.")
    page.keyboard.press("Tab")
    yaml_has(page, "Plain everyday text about anything.")
    assert "shared_experts:" in editor_text(page)
    wait_for_text(page, "#wb-summary", ("Ready",), 60)
    page.screenshot(path=str(shots / "shared-expert.png"))
    card.get_by_role("button", name="Remove").click()
    page.wait_for_function(f"!({DOC})().includes('shared_experts')", timeout=30_000)
    page.locator("#wb-add-shared").wait_for(state="visible", timeout=30_000)
    no_error_shown(page)
