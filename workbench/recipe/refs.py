"""Model references as mergekit-moe spells them, read into one string per model.

mergekit 0.1.5's `ModelReference` (mergekit/common.py) takes a string
`PATH[@REVISION][+LORA[@REVISION]]` (split on '+', then each part on '@') or the dict form
`{model: PATH, lora: PATH}`, where each PATH is such a string or `{path: ..., revision: ...}`.
The dict form is read here into the string form, which is also what mergekit serialises it
as, so every stage sees one string per model and the recipe copy a build writes reads back
the same in both tools. Keys mergekit would drop silently (`{model: X, revision: R}` builds
from X's default branch there) are problems here. What the parts name (a Hub id, a folder,
`demo:NAME`) is `workbench.models.parse_ref`'s business; this module does string work only.
"""

from __future__ import annotations

from typing import Any

from workbench.recipe.schema import Problem

DEMO_PREFIX = "demo:"
REF_KEYS = ("model", "lora")
PATH_KEYS = ("path", "revision")
FORMS = "write 'org/name', 'org/name@revision', 'org/name+org/lora' or {model: {path: ..., revision: ...}}"


def split_ref(ref: str) -> tuple[str, str | None]:
    """'model+lora' -> ('model', 'lora'); 'model' -> ('model', None); mergekit splits at '+' too."""
    model, plus, lora = ref.partition("+")
    return model, (lora if plus else None)


def ref_problems(ref: str, path: str) -> list[Problem]:
    """What mergekit's parser refuses in a string reference (it raises on these), or would
    read as something else: a second '+', a second '@' in one part, an empty part."""
    if ref.count("+") > 1:
        return [Problem("error", path, f"'{ref}' has {ref.count('+')} '+'; a reference is a model and at "
                        "most one LoRA", "write 'org/model+org/lora'")]
    out = []
    for part, what in zip(ref.split("+"), ("model", "LoRA"), strict=False):
        if not part.strip() and "+" in ref:
            out.append(Problem("error", path, f"the {what} part of '{ref}' is empty",
                               "write 'org/model+org/lora', both parts named"))
        elif part.count("@") > 1:
            out.append(Problem("error", path, f"the {what} part '{part}' has {part.count('@')} '@'; a "
                               "revision is written once", "write 'org/name@revision'"))
        elif part.endswith("@"):
            out.append(Problem("error", path, f"the {what} part '{part}' ends in '@' with no revision",
                               "write the branch, tag or commit after '@', or drop the '@'"))
    return out


def canonical_ref(value: Any, path: str, problems: list[Problem]) -> Any:
    """A reference in mergekit's dict form as its string form, problems appended; any other
    value unchanged (a string stays as written; a wrong type is pydantic's to report)."""
    if not isinstance(value, dict):
        return value
    for key in value:
        if key in REF_KEYS:
            continue
        if key == "override_architecture":
            problems.append(Problem("error", f"{path}.{key}", "is not supported: the workbench reads each "
                                    "model's family from its config.json", "remove it"))
        elif key in PATH_KEYS:
            problems.append(Problem("error", f"{path}.{key}", f"'{key}' belongs inside `model` (mergekit-moe "
                                    "ignores it here and would use the default branch)",
                                    f"write {{model: {{path: ..., {key}: ...}}}}, or 'org/name@revision'"))
        else:
            problems.append(Problem("error", f"{path}.{key}", f"unknown key '{key}' in a model reference",
                                    f"a model reference takes model and lora; {FORMS}"))
    if "model" not in value:
        problems.append(Problem("error", f"{path}.model", "is required in the dict form of a model reference",
                                f"name the model: {FORMS}"))
        return ""
    parts = [_path_text(value["model"], f"{path}.model", problems)]
    if value.get("lora") is not None:
        parts.append(_path_text(value["lora"], f"{path}.lora", problems))
    return "+".join(parts)


def _path_text(value: Any, path: str, problems: list[Problem]) -> str:
    """One ModelPath (a string, or {path, revision}) as 'path[@revision]'."""
    if isinstance(value, str):
        return value
    if not isinstance(value, dict):
        problems.append(Problem("error", path, f"must be a model name or {{path: ..., revision: ...}} "
                                f"(got {value!r})"[:300], FORMS))
        return ""
    for key in value:
        if key not in PATH_KEYS:
            problems.append(Problem("error", f"{path}.{key}", f"unknown key '{key}'",
                                    "a model path takes path and revision"))
    name, revision = value.get("path"), value.get("revision")
    if not isinstance(name, str) or not name.strip():
        problems.append(Problem("error", f"{path}.path", "is required: the model's Hub id or folder",
                                "write path: org/name"))
        return ""
    if revision is not None and (not isinstance(revision, str) or not revision.strip()):
        problems.append(Problem("error", f"{path}.revision",
                                f"must be a branch, tag or commit (got {revision!r})",
                                "write revision: main, or leave it out"))
        return name
    # The string form splits at '+' and '@'; a dict path holding either would read back otherwise.
    if "+" in name or "@" in name:
        problems.append(Problem("error", f"{path}.path", f"'{name}' contains '+' or '@'",
                                "put a revision under `revision` and a LoRA under `lora`"))
    return f"{name}@{revision}" if revision else name
