"""Long jobs belong to the visitor, not to the page: a build started, the page reloaded mid-way,
and the reopened page finds it running, follows it to the end and can cancel; another visitor
sees none of it."""

from __future__ import annotations

import pytest

from tests.browser import open_tab, screenshot_folder, session_page, wait_for_text

pytestmark = [pytest.mark.browser, pytest.mark.demo]

RUNNING = "document.querySelector('#wb-cancel')?.disabled === false"


@pytest.fixture(scope="module")
def shots(tmp_path_factory):
    return screenshot_folder(tmp_path_factory, "jobs-shots")


def build_then_reload(page, name: str) -> None:
    """Start a build, reload the page while it runs, and open the Build tab again: the reopened
    page follows the same build (its Cancel is live, its log fills again)."""
    open_tab(page, "3 · Build")
    page.fill("#wb-output-name textarea", name)
    page.click("#wb-build")
    page.wait_for_function(RUNNING, timeout=60_000)
    page.reload(wait_until="load")
    page.wait_for_selector("#wb-expert-3", timeout=60_000)
    open_tab(page, "3 · Build")
    page.wait_for_function(RUNNING, timeout=30_000)


def test_a_page_reloaded_mid_build_finds_the_build_running_then_finished(browser, server, shots):
    with session_page(browser, server) as page:
        build_then_reload(page, "reloaded-moe")
        page.screenshot(path=str(shots / "reloaded-running.png"))
        status = wait_for_text(page, "#wb-build-status", ("finished", "failed", "cancelled"), 600)
        assert "✔ Build finished." in status, status
        assert "reloaded-moe" in page.inner_text("#wb-build-summary")
        log = page.input_value("#wb-build-log textarea")
        assert log.startswith("→ reloaded-moe\n") and "[write]" in log  # replayed from the first line
        page.screenshot(path=str(shots / "reloaded-finished.png"))
        # Seen to its end once, the build is not replayed on the next visit, but stays the visitor's own.
        page.reload(wait_until="load")
        page.wait_for_selector("#wb-expert-3", timeout=60_000)
        open_tab(page, "3 · Build")
        page.get_by_text("Push to the Hugging Face Hub").click()
        page.wait_for_function("document.querySelector('#wb-push input')?.value === 'reloaded-moe'",
                               timeout=30_000)
        assert page.inner_text("#wb-build-status").startswith("Ready.")


def test_a_build_cancelled_after_a_reload_stops_and_another_visitor_never_sees_it(browser, server, shots):
    with session_page(browser, server) as page, session_page(browser, server) as stranger:
        build_then_reload(page, "cancelled-moe")
        page.click("#wb-cancel")
        status = wait_for_text(page, "#wb-build-status", ("finished", "failed", "cancelled"), 120)
        assert "■ Build cancelled; nothing was written." in status, status
        stranger.reload(wait_until="load")
        stranger.wait_for_selector("#wb-expert-3", timeout=60_000)
        open_tab(stranger, "3 · Build")
        assert stranger.locator("#wb-cancel").is_disabled()
        assert stranger.inner_text("#wb-build-status").startswith("Ready.")
        page.screenshot(path=str(shots / "reloaded-cancelled.png"))
