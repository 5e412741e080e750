"""What every browser test shares beside conftest's `server` and `browser` fixtures: a fresh
visitor's page, and the ways a person acts and looks (types at human speed, waits for text,
reads toasts, takes screenshots)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHOTS = ROOT / "assets" / "screenshots"
CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]
VIEWPORT = {"width": 1400, "height": 1100}
DOC = "() => document.querySelector('#wb-yaml .cm-content').cmTile.view.state.doc.toString()"


def wait_for_text(page, selector: str, words: tuple[str, ...], timeout: float = 120) -> str:
    """The element's text once it shows one of `words`. An element Gradio redraws may be missing
    for a while (a long job's progress replaces it): that reads as no text yet, not as a failure."""
    deadline = time.monotonic() + timeout
    text = ""
    while time.monotonic() < deadline:
        text = page.evaluate("(s) => document.querySelector(s)?.innerText ?? ''", selector)
        if any(w in text for w in words):
            return text
        time.sleep(0.2)
    raise AssertionError(f"{selector} never showed {words}; it shows: {text[:500]}")


def shot(page, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.mouse.move(0, 0)  # no hover tooltips in the picture
    page.evaluate("window.scrollTo(0, 0)")
    page.screenshot(path=str(SHOTS / f"{name}.png"))


def open_tab(page, name: str) -> None:
    page.get_by_role("tab", name=name).click()


def yaml_has(page, text: str, timeout: float = 30_000) -> None:
    """Wait until the YAML editor's text contains `text`."""
    page.wait_for_function(f"(t) => ({DOC})().includes(t)", arg=text, timeout=timeout)


def type_slowly(page, text: str, pause_after: tuple[int, ...] = ()) -> None:
    """About five keys a second, with a pause of a few seconds after the given positions."""
    for i, key in enumerate(text):
        page.keyboard.type(key)
        time.sleep(0.2)
        if i in pause_after:
            time.sleep(3)


def no_error_shown(page) -> None:
    """No toast on the page and no failed request in the console of a `session_page`."""
    toasts = [t for t in page.locator(".toast-body").all_inner_texts() if t.strip()]
    assert toasts == [], f"toasts: {toasts}"
    failed = [e for e in page.console_errors if "500" in e or "parse server response" in e]
    assert failed == [], f"console: {failed}"


@contextmanager
def session_page(browser, server: str, **context_options) -> Iterator:
    """A new visitor's page on the app, loaded with the demo preset's form and summary drawn;
    its console errors are kept in `page.console_errors`."""
    context = browser.new_context(viewport=VIEWPORT, **context_options)
    page = context.new_page()
    page.console_errors = []
    page.on("console", lambda m: page.console_errors.append(m.text) if m.type == "error" else None)
    try:
        page.goto(server, wait_until="load")
        page.wait_for_selector("#wb-expert-3", timeout=60_000)
        wait_for_text(page, "#wb-summary", ("PARAMETERS",), 60)
        yield page
    finally:
        context.close()


def screenshot_folder(tmp_path_factory, name: str) -> Path:
    """A temporary folder for a test module's screenshots, its path printed to look at."""
    folder = tmp_path_factory.mktemp(name)
    print(f"screenshots in {folder}")
    return folder
