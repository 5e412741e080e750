"""The example sets the workbench ships (assets/forge/NAME.jsonl), and an expert's `forge_data`
read as one of them or as a file of the user's."""

from __future__ import annotations

import json
from pathlib import Path

from workbench.errors import ForgeError
from workbench.recipe import forge_command_data

SETS = Path(__file__).resolve().parents[2] / "assets" / "forge"


def example_sets() -> dict[str, Path]:
    """Every shipped set by name, sorted."""
    return {p.stem: p for p in sorted(SETS.glob("*.jsonl"))}


def data_path(forge_data: str, *, allow_files: bool = True) -> Path:
    """The JSON-lines file an expert's `forge_data` names: a shipped set, or (locally) a file."""
    shipped = example_sets()
    if forge_data in shipped:
        return shipped[forge_data]
    if not allow_files:
        raise ForgeError(f"forge_data {forge_data!r} is not a shipped example set; on this Space use one of "
                         f"{', '.join(shipped)}")
    path = Path(forge_command_data(forge_data)).expanduser()
    if not path.is_file():
        raise ForgeError(f"forge_data {forge_data!r}: no such example set or file; use one of "
                         f"{', '.join(shipped)} or a JSON-lines file")
    return path


def sample_prompts(path: Path, count: int = 3) -> list[str]:
    """Prompts of a set's first chat examples, e.g. to route an expert forged from it."""
    found = []
    for line in path.read_text(encoding="utf-8").splitlines():
        item = json.loads(line) if line.strip() else {}
        if isinstance(item, dict) and isinstance(item.get("prompt"), str):
            found.append(item["prompt"])
        if len(found) == count:
            break
    return found
