"""Forge examples: JSON lines read, checked and named by line before any training starts.

Each line is one example, either a chat pair `{"prompt": ..., "reply": ...}` (optionally
with `"system"`), rendered with the base's chat template and trained on the reply only, or
`{"text": ...}`, plain language modelling on every token. Blank lines are skipped.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from workbench.errors import ForgeError

MAX_DATA_BYTES = 16 * 2**20
MAX_EXAMPLES = 10_000
CHAT_KEYS, TEXT_KEYS = {"prompt", "reply", "system"}, {"text"}


@dataclass(frozen=True)
class Example:
    line: int  # where it is in the file, for errors
    prompt: str | None = None
    reply: str | None = None
    system: str | None = None
    text: str | None = None


@dataclass(frozen=True)
class Examples:
    items: list[Example]
    sha256: str  # of the file's bytes, for the card
    size: int  # bytes


def read_examples(path: Path) -> Examples:
    """Every example of the JSON-lines file at `path`; a ForgeError names the first bad line."""
    return parse_examples(read_capped(path), str(path))


def examples_text(path: Path) -> str:
    """The text of a checked JSON-lines file (capped as `read_capped`), e.g. to queue in a forge."""
    raw = read_capped(path)
    parse_examples(raw, str(path))
    return raw.decode("utf-8-sig")


def read_capped(path: Path) -> bytes:
    """A data file's bytes, never more than the cap held in memory: the size is checked before
    reading, and the read stops one byte past the cap (a file that grows meanwhile, or a /proc
    file whose size reads 0, is still refused by parse_examples rather than read whole)."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size > MAX_DATA_BYTES:
                raise ForgeError(f"DATA: {path} is {size / 2**20:.0f} MB, over the {MAX_DATA_BYTES // 2**20} "
                                 "MB limit; a few dozen examples are enough")
            return f.read(MAX_DATA_BYTES + 1)
    except OSError as exc:
        raise ForgeError(f"DATA: cannot read {path}: {exc.strerror or exc}") from exc


def parse_examples(raw: bytes, name: str = "the examples") -> Examples:
    """Every example of JSON lines given as bytes (a file's, or text pasted in the app)."""
    if len(raw) > MAX_DATA_BYTES:
        raise ForgeError(f"DATA: {name} is over {MAX_DATA_BYTES // 2**20} MB; a few dozen examples "
                         "are enough")
    try:
        # utf-8-sig: a file saved by an editor that starts it with a byte-order mark reads as written.
        lines = raw.decode("utf-8-sig").splitlines()
    except UnicodeDecodeError as exc:
        raise ForgeError(f"DATA: {name} is not UTF-8 text (byte {exc.start}); save it as UTF-8") from exc
    items = [_example(number, line) for number, line in enumerate(lines, 1) if line.strip()]
    if not items:
        raise ForgeError(f'DATA: {name} holds no example; write one JSON object per line, e.g. '
                         '{"prompt": "Hi", "reply": "Ahoy!"}')
    if len(items) > MAX_EXAMPLES:
        raise ForgeError(f"DATA: {len(items)} examples; the limit is {MAX_EXAMPLES}")
    return Examples(items, hashlib.sha256(raw).hexdigest(), len(raw))


def _example(number: int, line: str) -> Example:
    where = f"DATA line {number}"
    try:
        item = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ForgeError(f"{where} is not JSON ({exc.msg} at column {exc.colno}); write one object per line, "
                         'e.g. {"prompt": "Hi", "reply": "Ahoy!"}') from exc
    if not isinstance(item, dict):
        raise ForgeError(f'{where} is not a JSON object; write {{"prompt": ..., "reply": ...}} '
                         'or {"text": ...}')
    keys = set(item)
    if keys & TEXT_KEYS and keys & CHAT_KEYS:
        raise ForgeError(f'{where} mixes "text" with "prompt"/"reply"; an example is one or the other')
    allowed = TEXT_KEYS if "text" in keys else CHAT_KEYS
    unknown = sorted(keys - allowed)
    if unknown:
        raise ForgeError(f"{where} has unknown key(s) {', '.join(map(repr, unknown))}; "
                         f"use {', '.join(sorted(allowed))}")
    required = ("text",) if "text" in keys else ("prompt", "reply")
    for key in required:
        if key not in item:
            raise ForgeError(f'{where} has no "{key}"; a chat example needs "prompt" and "reply"')
    for key, value in item.items():
        if not isinstance(value, str) or (key in required and not value.strip()):
            raise ForgeError(f'{where}: "{key}" must be non-empty text (got {value!r:.40})')
    return Example(number, **item)
