"""The server's memory over a chat: rounds of the base, the MoE and a third pane under the recipe's
routers, as a person sends them, level off. Without a cap on glibc's malloc arenas (app.py) the
same ten rounds grew the server from 2,799 to 3,399 MB, 50-170 MB a round; with it, 2,510 to
2,579 MB, flat over the last rounds."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.browser import open_tab, session_page, wait_for_text
from tests.conftest import running_app

pytestmark = [pytest.mark.browser, pytest.mark.demo]
ROUNDS = 10
SIDES = ("base", "moe", "steered")  # the third pane under the recipe's routers, fitted for the chat


@pytest.fixture(scope="module")
def app(tmp_path_factory, demo_model_path):
    with running_app(tmp_path_factory.mktemp("memory")) as (url, proc):
        yield url, proc


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for {pid}")


def answered(page, count: int) -> bool:
    return all(page.locator(f"#wb-chat-{side} [data-testid='bot']").count() >= count
               and "tokens/s" in page.inner_text(f"#wb-stats-{side}") for side in SIDES)


def test_ten_chat_rounds_level_off(browser, app):
    url, proc = app
    with session_page(browser, url) as page:
        open_tab(page, "3 · Build")
        page.fill("#wb-output-name textarea", "memory-moe")
        page.click("#wb-build")
        wait_for_text(page, "#wb-build-status", ("finished",), 600)
        open_tab(page, "4 · Chat")
        page.wait_for_function("document.querySelector('#wb-chat-moe-build input').value === 'memory-moe'",
                               timeout=30_000)
        page.get_by_text("System prompt and sampling").click()
        tokens = page.locator("#wb-max-new input[type=number]")
        tokens.fill("16")
        tokens.press("Enter")
        page.get_by_text("Interventions: steer the MoE's router").click()
        page.locator("#wb-steer-routers").get_by_label("the Design tab's recipe (unsaved)").click()
        wait_for_text(page, "#wb-steer-note", ("routers from the unsaved recipe",), 30)
        page.locator("#wb-chat-steered").wait_for(state="visible", timeout=30_000)
        sizes = []
        for number in range(1, ROUNDS + 1):
            page.fill("#wb-chat-input textarea", f"Tell me one fact about the number {number}.")
            page.click("#wb-send")
            deadline = time.monotonic() + 120
            while not answered(page, number):
                assert time.monotonic() < deadline, f"round {number} was not answered"
                time.sleep(0.2)
            sizes.append(rss_mb(proc.pid))
        print("server RSS per round, MB:", [round(s) for s in sizes])
        late = sizes[-1] - sizes[ROUNDS // 2 - 1]  # the second half of the rounds
        assert late < 60, f"the server grew {late:.0f} MB over rounds {ROUNDS // 2}-{ROUNDS}: {sizes}"
