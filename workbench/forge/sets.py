"""The example sets the workbench ships (assets/forge/NAME.jsonl), and an expert's `forge_data`
read as one of them or as a file of the user's."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from workbench.errors import ForgeError
from workbench.recipe import forge_command_data

SETS = Path(__file__).resolve().parents[2] / "assets" / "forge"


def example_sets() -> dict[str, Path]:
    """Every shipped set by name, sorted."""
    return {p.stem: p for p in sorted(SETS.glob("*.jsonl"))}


def data_path(forge_data: str, *, allow_files: bool = True, roots: Sequence[Path] | None = None) -> Path:
    """The JSON-lines file an expert's `forge_data` names: a shipped set, or (locally) a file.

    With `roots` (the app's model roots), a file is accepted only under one of them: a recipe
    sent to the server must not make it read the server's other files.
    """
    shipped = example_sets()
    if forge_data in shipped:
        return shipped[forge_data]
    if not allow_files:
        raise ForgeError(f"forge_data {forge_data!r} is not a shipped example set; on this Space use one of "
                         f"{', '.join(shipped)}")
    path = Path(forge_command_data(forge_data)).expanduser()
    if roots is not None:
        path = path.resolve()
        if not any(path == root or root in path.parents for root in roots):
            shown = ", ".join(str(r) for r in dict.fromkeys(roots))
            raise ForgeError(f"forge_data {forge_data!r} is outside the folders this app reads from "
                             f"({shown}); use a shipped set ({', '.join(shipped)}), paste or upload the "
                             "examples in the Forge tab, or move the file under one of those folders")
    if not path.is_file():
        raise ForgeError(f"forge_data {forge_data!r}: no such example set or file; use one of "
                         f"{', '.join(shipped)} or a JSON-lines file")
    return path
