"""Writing an edit into recipe YAML the user wrote, keeping everything the edit did not touch.

The Design tab's form edits the recipe as data; the YAML editor beside it shows the user's
own text, with their comments, key order, quoting and indentation. Re-dumping the recipe
after every form edit threw all of that away (and, racing the user's typing, replaced the
text under their cursor). `patch_yaml` loads the text with ruamel.yaml's round-trip
loader, writes in only the values that differ from the new data, and dumps it back with
the indentation it found: an unchanged recipe comes back byte for byte.
"""

from __future__ import annotations

import io
from typing import Any

from workbench.recipe.refs import canonical_ref
from workbench.recipe.safe_yaml import load_yaml
from workbench.recipe.schema import Recipe


def patch_yaml(text: str, data: dict[str, Any]) -> str | None:
    """`text` with `data` written in; None when `text` is not a YAML mapping (the caller dumps).

    A key the text leaves out stays out while `data` holds its default (`experts_per_token:
    2`), as mergekit reads the two alike.
    """
    import yaml
    from ruamel.yaml import YAML
    from ruamel.yaml.error import YAMLError as RuamelError
    from ruamel.yaml.util import load_yaml_guess_indent

    try:
        if not isinstance(load_yaml(text), dict):  # our caps first: ruamel keeps aliases shared too
            return None
        _, indent, block_seq_indent = load_yaml_guess_indent(text)
        editor = YAML(typ="rt")
        editor.preserve_quotes = True
        editor.width = 4096  # never re-wrap a long prompt the user wrote on one line
        editor.indent(mapping=block_seq_indent or 2, sequence=indent or 2, offset=block_seq_indent or 0)
        doc = editor.load(text)
    except (yaml.YAMLError, RuamelError, ValueError):
        return None
    if not isinstance(doc, dict):
        return None
    _merge_map(doc, data, _defaults(Recipe))
    out = io.StringIO()
    editor.dump(doc, out)
    return out.getvalue()


def _defaults(model: type) -> dict[str, Any]:
    return {name: f.default for name, f in model.model_fields.items() if f.default is not None
            and not f.is_required()}


def _merge_map(node: Any, data: dict[str, Any], defaults: dict[str, Any]) -> None:
    """Make mapping `node` hold `data`: changed values replaced, new keys placed in `data`'s
    order among the existing ones, missing keys removed."""
    for key in [k for k in node if k not in data]:
        del node[key]
    order = list(data)
    for key, value in data.items():
        if key in node:
            node[key] = _merged(node[key], value)
        elif not (key in defaults and value == defaults[key]):
            before = set(order[:order.index(key)])
            node.insert(max((i + 1 for i, k in enumerate(node) if k in before), default=0), key, value)


def _same_ref(written: dict, ref: str) -> bool:
    problems: list = []
    return canonical_ref(dict(written), "", problems) == ref and not problems


def _merged(old: Any, new: Any) -> Any:
    """`new`, reusing `old`'s node (its comments and style) wherever the two agree."""
    if old == new and isinstance(old, bool) == isinstance(new, bool):  # 1 == True, yet not the same
        return old
    if isinstance(old, dict) and isinstance(new, str) and _same_ref(old, new):
        return old  # a model reference the user wrote in mergekit's dict form, unchanged
    if isinstance(old, dict) and isinstance(new, dict):
        _merge_map(old, new, {})
        return old
    if isinstance(old, list) and isinstance(new, list):
        for i, item in enumerate(new):
            if i < len(old):
                old[i] = _merged(old[i], item)
            elif old and isinstance(item, str) and isinstance(old[-1], str):
                old.append(type(old[-1])(item))  # a new prompt quoted like the one before it
            else:
                old.append(item)
        del old[len(new):]
        return old
    if isinstance(old, str) and isinstance(new, str) and type(old) is not str:
        return type(old)(new)  # keep the user's quoting style for the new text
    return new
