"""YAML that cannot freeze the server: nesting depth and alias expansion capped before loading.

PyYAML builds an alias as a reference to the object it names, so nine nested anchors of
nine aliases each (a 521-byte "billion laughs") load at once into a graph whose walk
touches 9**9 values: validating one took 67 s and 4 GB. And nesting 20,000 deep overflows
the composer's recursion. So a document is read in three steps, each bounded by the
text's size (itself capped by the caller): its events, with the depth counted; its node
graph, with every alias counted as a copy of what it names (memoised, so the count costs
one pass); then, only if both stay within the caps, its Python values.
"""

from __future__ import annotations

from typing import Any

import yaml

MAX_DEPTH = 64  # recipes nest 4 deep
MAX_VALUES = 50_000  # scalars and collections, aliases expanded; 64 experts x 2 x 64 prompts fit
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class YamlRefused(yaml.YAMLError):
    """A document within the size cap that would still cost too much to load."""

    def __init__(self, problem: str, mark: yaml.Mark | None = None):
        super().__init__(problem)
        self.problem = problem
        self.problem_mark = mark


def load_yaml(text: str) -> Any:
    """`yaml.safe_load(text)`, refusing (YamlRefused) deep nesting and alias bombs first."""
    depth = 0
    for event in yaml.parse(text, Loader=_Loader):
        if isinstance(event, yaml.CollectionStartEvent):
            depth += 1
            if depth > MAX_DEPTH:
                raise YamlRefused(f"nested more than {MAX_DEPTH} levels deep", event.start_mark)
        elif isinstance(event, yaml.CollectionEndEvent):
            depth -= 1
    node = yaml.compose(text, Loader=_Loader)
    if node is None:
        return None
    _count(node, {})
    loader = _Loader(text)
    try:
        return loader.construct_document(node)
    finally:
        loader.dispose()


_OPEN = -1  # a node whose count is being made: meeting it again means it contains itself


def _count(node: yaml.Node, seen: dict[int, int]) -> int:
    """How many values `node` stands for once every alias is written out; depth <= MAX_DEPTH."""
    known = seen.get(id(node))
    if known == _OPEN:
        raise YamlRefused("an anchor refers to itself (&name ... *name inside it)", node.start_mark)
    if known is not None:
        return known
    seen[id(node)] = _OPEN
    total = 1
    if isinstance(node, yaml.SequenceNode):
        total += sum(_count(item, seen) for item in node.value)
    elif isinstance(node, yaml.MappingNode):
        total += sum(_count(key, seen) + _count(value, seen) for key, value in node.value)
    if total > MAX_VALUES:
        raise YamlRefused(f"stands for more than {MAX_VALUES:,} values once its aliases (*name) are "
                          "expanded", node.start_mark)
    seen[id(node)] = total
    return total
