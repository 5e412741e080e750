"""Version floors from docs/reliability.md, checked before any test runs."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

FLOORS = {"gradio": (6, 20), "torch": (2, 10), "transformers": (5, 0)}


def _parse(text: str) -> tuple[int, ...]:
    parts = []
    for piece in text.split("+")[0].split(".")[:2]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


def check_version_floors() -> list[str]:
    problems = []
    for name, floor in FLOORS.items():
        try:
            found = version(name)
        except PackageNotFoundError:
            problems.append(f"{name} is not installed (need >= {'.'.join(map(str, floor))})")
            continue
        if _parse(found) < floor:
            problems.append(f"{name} {found} is older than {'.'.join(map(str, floor))}")
    return problems
