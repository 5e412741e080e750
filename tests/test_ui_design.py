"""Design tab handlers: form <-> recipe round trips, problems next to their fields, sizes."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from workbench.recipe import Problem, errors, parse_recipe
from workbench.ui import design_logic, form, sizes

PRESETS = sorted(Path(__file__).parent.parent.joinpath("presets").glob("*.yaml"))
DEMO_PRESET = Path(__file__).parent.parent / "presets" / "demo.yaml"


@pytest.mark.parametrize("prompts", [
    ["plain", "two\nlines", "back\\slash", "", '""', "  spaced  ", 'say "hi"'],
    None,
    [""],
])
def test_prompts_survive_the_textbox(prompts):
    assert form.decode_prompts(form.encode_prompts(prompts)) == prompts


def test_blank_lines_are_ignored_and_empty_prompt_is_explicit():
    assert form.decode_prompts("a\n\n\nb\n") == ["a", "b"]
    assert form.decode_prompts('""\n""') == ["", ""]
    assert form.decode_prompts("") is None


HUB_RECIPE = """
base_model: org/base
experts:
  - source_model: org/a
    positive_prompts: [code first]
  - source_model: org/b
    positive_prompts: [math second]
  - source_model: org/c
    positive_prompts: [story third]
  - source_model: org/d
    positive_prompts: [chat fourth]
"""


def form_values(data: dict) -> tuple[list, list]:
    top = [data.get(k, "") if k != "experts_per_token" else data.get(k, 2) for k in form.TOP_KEYS]
    cards = [form.expert_fields(e) for e in data["experts"]]
    # The textboxes hand numbers back as text.
    text = lambda v: "" if v is None else str(v)  # noqa: E731
    cards = [[*c[:3], text(c[3]), text(c[4]), c[5]] for c in cards]
    return top, cards


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.name)
def test_every_preset_round_trips_through_the_form(path):
    recipe, _ = parse_recipe(path.read_text())
    data = form.recipe_data(recipe)
    top, cards = form_values(data)
    again, problems = parse_recipe(form.data_yaml(form.form_data(data, top, cards), None))
    assert again == recipe


def test_a_form_edit_keeps_the_keys_the_form_does_not_show():
    data = {"base_model": "org/base", "gate_mode": "hidden", "center_gates": True, "experts": [
        {"source_model": "org/a", "positive_prompts": ["def f(x): return x"], "probe_prompts": ["import os"]},
        {"source_model": "org/b", "positive_prompts": ["Once upon a time"]}]}
    top, cards = form_values(data)
    cards[1][1] = "Once upon a time\nA dragon slept"  # the user adds a prompt to expert 2
    edited = form.form_data(data, top, cards)
    assert edited["center_gates"] is True and edited["experts"][0]["probe_prompts"] == ["import os"]
    assert edited["experts"][1]["positive_prompts"] == ["Once upon a time", "A dragon slept"]


def test_an_expert_name_round_trips_and_labels_the_expert():
    data = {"base_model": "org/base", "experts": [
        {"source_model": "org/a", "name": "code", "positive_prompts": ["def f(x): return x"]},
        {"source_model": "org/b", "positive_prompts": ["Once upon a time there was a fox"]}]}
    top, cards = form_values(data)
    checked = design_logic.check(form.form_data(data, top, cards), None)
    assert checked.recipe.experts[0].name == "code" and checked.recipe.experts[1].name is None
    assert checked.recipe.expert_labels() == ["code", "Once upon a time…"]
    assert "name: code" in checked.yaml
    cards[0][5] = "x" * 41
    too_long = design_logic.check(form.form_data(data, top, cards), None)
    assert [p.path for p in errors(too_long.problems)] == ["experts[0].name"]
    assert too_long.slots()["experts[0].source_model"]  # shown beside the name's field


def test_form_keeps_scales_and_reports_bad_numbers_at_their_path():
    data = {"base_model": "org/base", "experts": [{"source_model": "org/a", "positive_prompts": ["x"]},
                                                  {"source_model": "org/b", "positive_prompts": ["y"]}]}
    top, cards = form_values(data)
    cards[0][3], cards[1][4] = "0.01", "abc"
    checked = design_logic.check(form.form_data(data, top, cards), None)
    assert checked.recipe is None
    assert {p.path for p in checked.problems} == {"experts[1].residual_scale"}
    assert checked.slots()["experts[1].scales"] and not checked.slots()["experts[0].scales"]
    cards[1][4] = ""
    fixed = design_logic.check(form.form_data(data, top, cards), None)
    assert fixed.recipe.experts[0].noise_scale == 0.01 and fixed.recipe.experts[1].residual_scale is None


@pytest.mark.parametrize("path, slot", [
    ("base_model", "base_model"),
    ("experts[1].positive_prompts[3]", "experts[1].positive_prompts"),
    ("experts[0].noise_scale", "experts[0].scales"),
    ("experts[2]", "experts[2]"),
    ("experts[9].source_model", "experts"),  # beyond the cards shown
    ("gate_mode", "settings"),
    ("experts_per_token", "settings"),
    ("", "experts"),
])
def test_problem_paths_map_to_form_slots(path, slot):
    assert form.slot_for(path, 3) == slot


def test_problems_html_escapes_and_shows_the_fix():
    html = form.problems_html([Problem("error", "base_model", "bad <b>name</b>", "use org/name")])
    assert "&lt;b&gt;" in html and "wb-error" in html and "use org/name" in html


def test_bad_yaml_keeps_the_form_and_says_where():
    checked, problems = design_logic.from_yaml("base_model: x\nexperts: [oops\n", None)
    assert checked is None
    assert "line" in problems[0].message and "column" in problems[0].message


def test_yaml_typo_is_reported_not_ignored():
    text = HUB_RECIPE.replace("base_model: org/base", "base_model: org/base\ngate_mod: hidden")
    checked, _ = design_logic.from_yaml(text, None)
    assert any(p.path == "gate_mod" and "gate_mode" in p.fix for p in checked.problems)




def test_add_remove_duplicate_move_experts():
    start, _ = design_logic.from_yaml(HUB_RECIPE, None)  # hub ids: offline, configs fail fast
    names = lambda c: [e["positive_prompts"][0][:10] for e in c.data["experts"]]  # noqa: E731
    first = names(start)
    moved = design_logic.restructure(start.draft, "down", 0, None)
    assert names(moved) == [first[1], first[0], *first[2:]]
    copied = design_logic.restructure(start.draft, "duplicate", 1, None)
    assert names(copied) == [first[0], first[1], first[1], *first[2:]]
    removed = design_logic.restructure(start.draft, "remove", 0, None)
    assert names(removed) == first[1:]
    added = design_logic.restructure(start.draft, "add", -1, None)
    assert len(added.data["experts"]) == 5
    # The new card starts from the base model: only its prompts are left to fill in.
    assert added.data["experts"][4]["source_model"] == start.data["base_model"]
    new_card = [p.path for p in added.problems if p.path.startswith("experts[4]")]
    assert new_card == ["experts[4].positive_prompts"]
    assert any(p.path == "experts" and "power of two" in p.message for p in added.problems)


def test_compatibility_problem_lands_on_the_expert_card(pico_factory):
    base, wide = pico_factory("ui-base"), pico_factory("ui-wide", hidden=96)
    data = {"base_model": str(base), "experts": [
        {"source_model": str(base), "positive_prompts": ["code"]},
        {"source_model": str(wide), "positive_prompts": ["story"]}]}
    checked = design_logic.check(data, None)
    slots = checked.slots()
    assert "hidden_size" in slots["experts[1].source_model"]
    assert not slots["experts[0].source_model"]
    assert "Parameters" in checked.summary()


@pytest.mark.parametrize("family", [
    "", "architecture: qwen\nshared_experts:\n  - source_model: {base}\n    positive_prompts: [s]\n",
    "architecture: deepseek\nshared_experts:\n  - source_model: {base}\n"],
    ids=["mixtral", "qwen", "deepseek"])
def test_size_estimate_counts_every_parameter_of_a_real_build(pico_factory, tmp_path, family):
    from safetensors import safe_open

    from workbench.build import build

    base = pico_factory("ui-size", tie=True)
    recipe, _ = parse_recipe(f"base_model: {base}\nexperts_per_token: 1\nexperts:\n"
                             f"  - source_model: {base}\n    positive_prompts: [a]\n"
                             f"  - source_model: {base}\n    positive_prompts: [b]\n"
                             f"  - source_model: {base}\n    positive_prompts: [c]\n"
                             + family.format(base=base))
    result = build(recipe, tmp_path / "moe", device="cpu", allow_remote_code=True)
    config = json.loads((base / "config.json").read_text())
    estimate = sizes.estimate(recipe, config)
    with safe_open(str(result.path / "model.safetensors"), framework="pt") as f:
        counted = sum(math.prod(f.get_slice(name).get_shape()) for name in f.keys())
    assert estimate.total_params == counted
    one_expert = 3 * config["hidden_size"] * config["intermediate_size"] * config["num_hidden_layers"]
    assert estimate.total_params - estimate.active_params == 2 * one_expert  # 3 experts, 1 active
    assert estimate.disk_bytes == counted * 4  # float32 pico


def test_sizes_say_why_they_are_missing():
    recipe, _ = parse_recipe(design_logic.preset_text("demo"))
    assert "config.json" in sizes.estimate_html(recipe, "offline")
    assert "parses" in sizes.estimate_html(None, None)
    assert sizes.human(1_234_567) == "1.23 M" and sizes.human(2.5e9, "B") == "2.50 GB"


def test_a_form_edit_keeps_the_users_yaml_comments_and_layout():
    """Form edits re-dumped the recipe: comments gone, keys reordered, quotes stripped."""
    text = DEMO_PRESET.read_text()  # demo.yaml: a comment block, quoted prompts, its own key order
    checked, _ = design_logic.from_yaml(text, None)
    assert checked.yaml_in(text) == text  # nothing edited: byte for byte
    top = [checked.data["base_model"], checked.data["gate_mode"], checked.data.get("dtype"), 1, None, None]
    cards = [form.expert_fields(e) for e in checked.data["experts"]]
    cards[2][1] += "\nA story about a brave little toaster."
    edited = design_logic.from_form(checked.draft, top, cards, None)
    patched = edited.yaml_in(text)
    removed = [line for line in text.splitlines() if line not in patched.splitlines()]
    added = [line for line in patched.splitlines() if line not in text.splitlines()]
    assert removed == ["experts_per_token: 2"]
    assert added == ["experts_per_token: 1", '      - "A story about a brave little toaster."']
    assert parse_recipe(patched)[0] == edited.recipe


def test_a_form_edit_on_yaml_that_does_not_parse_writes_the_whole_recipe():
    checked, _ = design_logic.from_yaml(DEMO_PRESET.read_text(), None)
    assert checked.yaml_in("experts: [oops") == checked.yaml
    assert checked.yaml_in("") == checked.yaml


@pytest.mark.parametrize("value, mixtral", [("", ""), ("mixtral", "mixtral"), ("qwen", "")])
def test_output_family_offers_every_family_once(value, mixtral):
    choices = design_logic.family_choices(value)
    assert [v for _, v in choices] == [mixtral, "qwen", "deepseek"]
    assert design_logic.family_choices("mixtrl")[-1] == ("mixtrl", "mixtrl")  # an unknown value stays shown


def test_choosing_qwen_keeps_the_yaml_shared_expert_and_its_problems_show_in_settings():
    text = HUB_RECIPE + "shared_experts:\n  - source_model: org/base\n    positive_prompts: [text]\n"
    recipe, _ = parse_recipe(text)
    data = form.recipe_data(recipe)
    top, cards = form_values(data)
    top[form.TOP_KEYS.index("architecture")] = "qwen"
    again, problems = parse_recipe(form.data_yaml(form.form_data(data, top, cards), None))
    assert problems == [] and again.family == "qwen" and len(again.shared_experts) == 1
    top[form.TOP_KEYS.index("architecture")] = "deepseek"
    checked = design_logic.from_form({"data": data}, top, cards, None)
    assert form.slot_for("architecture", 4) == "settings"
    assert any("trust_remote_code" in p.message for p in errors(checked.problems))


def test_the_shared_expert_s_card_edits_the_recipe_and_shows_its_own_problems():
    from workbench.ui import form

    data = {"base_model": "org/base", "architecture": "qwen", "experts": [
        {"source_model": "org/a", "positive_prompts": ["code"]},
        {"source_model": "org/b", "positive_prompts": ["maths"]}]}
    added = design_logic.restructure({"data": data}, "add-shared", -1, None)
    assert added.data["shared_experts"] == [{"source_model": "org/base", "positive_prompts": []}]
    slots = added.slots()
    assert "gates its shared expert" in slots["shared_experts[0].positive_prompts"]
    assert "gates its shared expert" not in slots["settings"]
    top = [added.data.get(k) for k in form.TOP_KEYS]
    cards = [form.expert_fields(e) for e in added.data["experts"]]
    edited = form.form_data(added.data, top, cards, [["org/base", "plain text\nnews", "", "", "", ""]])
    expected = [{"source_model": "org/base", "positive_prompts": ["plain text", "news"]}]
    assert edited["shared_experts"] == expected
    assert "shared_experts" in form.form_data(added.data, top, cards)  # no shared cards given: kept
    assert "shared_experts" not in form.form_data(added.data, top, cards, [])  # its card removed
    removed = design_logic.restructure(added.draft, "remove-shared", 0, None)
    assert "shared_experts" not in removed.data
    deepseek = design_logic.restructure({"data": {**data, "architecture": "deepseek"}}, "add-shared", -1,
                                        None)
    assert deepseek.data["shared_experts"] == [{"source_model": "org/base"}]  # ungated: no prompts
