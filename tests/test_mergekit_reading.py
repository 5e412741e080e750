"""What mergekit-moe 0.1.5 does with a recipe, as `mergekit_reading` says; each case is one
that was run through mergekit-moe 0.1.5 on pico models (exit code and error noted)."""

from __future__ import annotations

import pytest

from workbench.recipe import mergekit_reading, parse_recipe
from workbench.recipe.mergekit import ALL_SAME_FLAG

TWO = """base_model: /m/base
gate_mode: {mode}
experts:
  - source_model: {a}
    positive_prompts: ["def f(x):"]
  - source_model: {b}
    positive_prompts: ["Once upon a time"]
"""


def reading(text: str, **fields):
    values = {"mode": "hidden", "a": "/m/base", "b": "/m/other"} | fields
    recipe, problems = parse_recipe(text.format(**values))
    assert recipe is not None and not [p for p in problems if p.level == "error"], problems
    return mergekit_reading(recipe)


def test_a_plain_recipe_builds_the_same() -> None:
    found = reading(TWO)
    assert found.builds and found.stops == [] and found.flag is None


def test_float64_and_the_dict_form_build_the_same() -> None:
    # exit 0, float64 tensors; the dict form reads as its string form
    assert reading(TWO + "dtype: float64\n").builds
    assert reading(TWO, a="{model: {path: /m/base, revision: main}}").builds


@pytest.mark.parametrize("mode", ["fitted", "router_input"])
def test_workbench_modes_crash_mergekit(mode: str) -> None:
    # exit 1: TypeError: 'NoneType' object is not callable (mergekit/moe/router.py)
    found = reading(TWO, mode=mode)
    assert not found.builds and "TypeError" in found.stops[0]


def test_a_lora_reference_stops_mergekit() -> None:
    # exit 1: AssertionError: LoRA not merged - use .merged() to get a local path
    found = reading(TWO, b="/m/base+/m/lora")
    assert not found.builds and "never merges" in found.stops[0]


def test_the_same_model_everywhere_needs_the_flag_except_in_random_mode() -> None:
    # exit 1 without the flag, 0 with it; exit 0 in random mode (is_bad_config returns early)
    assert reading(TWO, b="/m/base", a="/m/base").flag == ALL_SAME_FLAG
    assert reading(TWO, b="/m/base", a="/m/base").builds
    assert reading(TWO, b="/m/base", a="/m/base", mode="random").flag is None


def test_uniform_random_without_prompts_and_a_single_expert_stop_mergekit() -> None:
    # exit 1: "Expert 0 has no positive prompts." / "... prompts are identical for all experts"
    urand = ("base_model: /m/base\ngate_mode: uniform_random\nexperts:\n  - source_model: /m/a\n"
             "  - source_model: /m/b\n")
    assert [s[:10] for s in reading(urand).stops] == ["experts[0]", "experts[1]"]
    assert reading(urand.replace("uniform_random", "random")).builds
    one = ("base_model: /m/base\nexperts_per_token: 1\nexperts:\n  - source_model: /m/other\n"
           "    positive_prompts: [x]\n")
    assert "single expert" in reading(one).stops[0]


def test_keys_mergekit_drops_are_named() -> None:
    # exit 0: pydantic's default extra="ignore" drops them without a word
    labelled = TWO.replace('["def f(x):"]', '["def f(x):"]\n    name: code\n    probe_prompts: [import os]')
    found = reading(labelled)
    assert found.builds and found.labels == ["name", "probe_prompts"]
    centred = reading(TWO + "center_gates: true\n")
    assert not centred.builds and centred.ignored == ["center_gates"] and centred.stops == []
