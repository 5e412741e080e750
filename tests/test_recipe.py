"""Recipes: parse, dump round-trip, and every validation rule with its key path."""

from __future__ import annotations

from pathlib import Path

import pytest

from workbench.recipe import (
    ConfigUnavailable,
    Recipe,
    RecipeError,
    dump_recipe,
    errors,
    parse_recipe,
    patch_yaml,
    recipe_from_dict,
    validate,
)
from workbench.recipe.parse import load_recipe
from workbench.recipe.schema import MAX_PROMPT_CHARS

PRESETS = sorted(Path(__file__).parent.parent.joinpath("presets").glob("*.yaml"))

GOOD = """
base_model: org/base
experts:
  - source_model: org/a
    positive_prompts: ["code"]
  - source_model: org/b
    positive_prompts: ["math"]
"""


def problems_of(text: str, configs=None):
    recipe, problems = parse_recipe(text)
    if recipe is not None:
        problems += validate(recipe, configs)
    return problems


def by_path(problems, level=None):
    return {p.path: p for p in problems if level is None or p.level == level}


def test_good_recipe_has_mergekit_defaults():
    recipe, problems = parse_recipe(GOOD)
    assert problems == []
    assert recipe.gate_mode == "hidden" and recipe.experts_per_token == 2 and recipe.dtype is None
    assert validate(recipe) == []


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.name)
def test_presets_parse_validate_and_round_trip(path):
    recipe = load_recipe(str(path))
    assert errors(validate(recipe)) == []
    again, problems = parse_recipe(dump_recipe(recipe))
    assert problems == [] and again == recipe


def test_round_trip_keeps_every_field():
    recipe = Recipe.model_validate({
        "base_model": "org/base@abc123", "gate_mode": "cheap_embed", "dtype": "bfloat16",
        "experts_per_token": 1, "architecture": "mixtral",
        "experts": [{"source_model": "./local", "positive_prompts": ["", "x: y"],
                     "negative_prompts": ["- z"], "noise_scale": 0.01, "residual_scale": 0.5}],
    })
    again, problems = parse_recipe(dump_recipe(recipe))
    assert problems == [] and again == recipe


def test_yaml_syntax_error_has_line_and_column():
    problems = problems_of("base_model: x\nexperts: [\n  - a: b\n")
    assert len(problems) == 1 and problems[0].level == "error"
    assert "line" in problems[0].message and "column" in problems[0].message


def test_oversized_yaml_refused():
    problems = problems_of("base_model: " + "x" * 300_000)
    assert "larger than" in problems[0].message


def alias_bomb(levels: int = 9) -> str:
    """Nine anchors of nine aliases each: 521 bytes that stand for 9**9 strings."""
    lines = ['l0: &l0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i in range(1, levels):
        lines.append(f"l{i}: &l{i} [" + ",".join([f"*l{i - 1}"] * 9) + "]")
    return "\n".join(lines) + f"\nbase_model: *l{levels - 1}\nexperts:\n  - source_model: x\n"


def test_an_alias_bomb_is_refused_before_it_expands():
    """It once took 67 s and 4 GB of the server's memory on every keystroke in the editor."""
    problems = problems_of(alias_bomb())
    assert len(problems) == 1 and problems[0].level == "error"
    assert "aliases" in problems[0].message and "line 5" in problems[0].message  # 9**5 > the cap
    assert "instead of nesting anchors" in problems[0].fix


def test_deep_nesting_and_self_reference_are_messages_not_crashes():
    deep = problems_of("base_model: " + "[" * 20_000 + "]" * 20_000 + "\n")
    assert len(deep) == 1 and "nested more than 64 levels deep" in deep[0].message
    assert "line 1" in deep[0].message
    loop = problems_of("base_model: &a [*a]\nexperts: []\n")
    assert len(loop) == 1 and "refers to itself" in loop[0].message


def test_ordinary_anchors_still_work_as_in_mergekit():
    recipe, problems = parse_recipe("""
base_model: org/base
experts:
  - source_model: org/a
    positive_prompts: &code ["def f(x):", "class A:"]
  - source_model: org/b
    positive_prompts: ["math"]
    negative_prompts: *code
""")
    assert recipe is not None and not errors(problems)
    assert recipe.experts[1].negative_prompts == ["def f(x):", "class A:"]


def test_unreadable_recipe_files_are_messages(tmp_path):
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes(GOOD.encode() + "# caf\xe9\n".encode("latin-1"))
    with pytest.raises(RecipeError, match=r"not UTF-8 text \(byte 0xe9 at offset \d+\).*save it as UTF-8"):
        load_recipe(str(bad))
    with pytest.raises(RecipeError, match="cannot read"):
        load_recipe(str(tmp_path / "a\0b.yaml"))


def test_half_a_surrogate_pair_is_refused_where_it_is():
    """`"\\ud83e"` passed validate and then failed the build after writing 0.86 GB. The YAML
    reader refuses the escape; a form (JSON from the browser) can still carry one."""
    yaml_text = GOOD.replace('["math"]', '["math", "robot \\ud83e"]')
    assert "invalid Unicode character escape" in errors(problems_of(yaml_text))[0].message
    experts = [{"source_model": "org/a", "positive_prompts": ["code"]},
               {"source_model": "org/b", "positive_prompts": ["math", "robot \ud83e"]}]
    recipe, _ = recipe_from_dict({"base_model": "org/base", "experts": experts})
    found = by_path(validate(recipe), "error")
    assert list(found) == ["experts[1].positive_prompts[1]"]
    assert "U+D83E" in found["experts[1].positive_prompts[1]"].message
    assert not errors(problems_of(GOOD.replace('["math"]', '["robot \\U0001F916"]')))


def test_not_a_mapping():
    assert "mapping" in problems_of("- just\n- a list\n")[0].message


def test_all_problems_at_once_with_key_paths():
    text = """
base_model: org/base
gate_mode: hiden
dtype: bf16
experts_per_tokens: 1
notes: hello
experts:
  - source_model: org/a
    positive_prompt: [x]
    noise_scale: loud
  - positive_prompts: [y]
"""
    found = by_path(problems_of(text))
    assert "did you mean 'hidden'" in found["gate_mode"].fix
    assert found["dtype"].fix == "write 'bfloat16'"
    typo = found["experts_per_tokens"]
    assert typo.level == "error" and "experts_per_token" in typo.fix
    assert found["notes"].level == "warning"
    assert "positive_prompts" in found["experts[0].positive_prompt"].fix
    assert found["experts[0].noise_scale"].level == "error"
    assert found["experts[1].source_model"].message == "is required"


def test_aliases_accepted_like_mergekit():
    recipe, problems = parse_recipe(GOOD + "gate_mode: hidden_last\ndtype: torch.float16\n")
    assert problems == [] and recipe.gate_mode == "hidden" and recipe.dtype == "float16"


def test_float64_as_in_mergekit():
    recipe, problems = parse_recipe(GOOD + "dtype: torch.float64\n")
    assert problems == [] and recipe.dtype == "float64"
    _, problems = parse_recipe(GOOD + "dtype: double\n")
    assert [(p.path, p.message, p.fix) for p in problems] == [("dtype", "unknown dtype 'double'",
                                                               "write 'float64'")]


QWEN = GOOD + ("architecture: qwen\nshared_experts:\n  - source_model: org/base\n"
               "    positive_prompts: [text]\n")
DEEPSEEK = GOOD + "architecture: deepseek\nshared_experts:\n  - source_model: org/base\n"


def test_qwen_with_one_gated_shared_expert_is_valid():
    recipe, problems = parse_recipe(QWEN.replace("qwen", "Qwen"))  # mergekit matches it in any case
    assert problems == [] and recipe.family == "qwen" and validate(recipe) == []
    assert recipe.model_refs() == ["org/base", "org/a", "org/b"]
    gate = recipe.shared_gate_recipe()
    assert [e.positive_prompts for e in gate.experts] == [["text"]] and gate.gate_mode == "hidden"
    again, _ = parse_recipe(dump_recipe(recipe))
    assert again == recipe


@pytest.mark.parametrize("text, path, message", [
    (GOOD + "architecture: qwen\n", "shared_experts", "exactly one shared expert"),
    (QWEN.replace("    positive_prompts: [text]\n", ""), "shared_experts[0].positive_prompts",
     "by its prompts"),
    (DEEPSEEK + "    positive_prompts: [x]\n", "shared_experts[0]", "takes no prompts"),
    (DEEPSEEK + "  - source_model: org/c\n", "shared_experts", "at most one"),
    (GOOD + "architecture: mixtrl\n", "architecture", "unknown architecture"),
])
def test_family_rules_mergekit_enforces(text, path, message):
    assert message in by_path(problems_of(text), "error")[path].message


def test_qwen_shared_prompts_optional_in_random_modes_and_fitted_warns():
    bare = QWEN.replace("    positive_prompts: [text]\n", "")
    assert errors(problems_of(bare + "gate_mode: random\n")) == []
    found = by_path(problems_of(QWEN + "gate_mode: fitted\n"), "warning")
    assert "router_input" in found["shared_experts[0]"].message
    assert parse_recipe(QWEN + "gate_mode: fitted\n")[0].shared_gate_recipe().gate_mode == "router_input"


def test_deepseek_needs_remote_code_and_is_refused_unless_allowed():
    recipe, _ = parse_recipe(DEEPSEEK)
    refused = by_path(validate(recipe), "error")["architecture"]
    assert "trust_remote_code" in refused.message and "--allow-remote-code" in refused.fix
    assert errors(validate(recipe, allow_remote_code=True)) == []
    alone, _ = parse_recipe(GOOD + "architecture: deepseek\n")
    warned = by_path(validate(alone, allow_remote_code=True), "warning")
    assert "llama.cpp" in warned["shared_experts"].message


def test_shared_expert_models_are_checked_against_the_base():
    recipe, _ = parse_recipe(QWEN.replace("org/base\n    positive", "org/s\n    positive"))
    configs = {"org/base": llama(), "org/a": llama(), "org/b": llama(), "org/s": llama(hidden_size=32)}
    found = by_path(validate(recipe, configs), "error")
    assert "in 'org/s'" in found["shared_experts[0].source_model"].message
    odd = {**configs, "org/s": llama(), "org/base": llama(head_dim=32)}
    assert "head_dim" in by_path(validate(recipe, odd), "error")["base_model"].message


@pytest.mark.parametrize("k, message", [(0, "at least 1"), (3, "only 2 experts")])
def test_experts_per_token_bounds(k, message):
    found = by_path(problems_of(GOOD + f"experts_per_token: {k}\n"), "error")
    assert message in found["experts_per_token"].message


def test_missing_positive_prompts_outside_random_modes():
    text = "base_model: b\nexperts:\n  - source_model: a\n  - source_model: c\n    positive_prompts: [x]\n"
    assert "experts[0].positive_prompts" in by_path(problems_of(text), "error")
    assert errors(problems_of(text + "gate_mode: random\n")) == []
    assert errors(problems_of(text + "gate_mode: uniform_random\n")) == []


def test_zero_positive_prompting_is_a_warning():
    text = GOOD.replace('["code"]', '["", ""]')
    found = by_path(problems_of(text))
    assert found["experts[0].positive_prompts"].level == "warning"
    assert "BOS" in found["experts[0].positive_prompts"].message


def test_identical_prompt_sets_refused():
    text = GOOD.replace('["math"]', '["code"]')
    assert "same prompts" in by_path(problems_of(text), "error")["experts"].message


def test_same_model_everywhere_is_allowed_with_warning():
    text = GOOD.replace("org/b", "org/a")
    found = by_path(problems_of(text))
    assert found["experts"].level == "warning" and errors(problems_of(text)) == []


def test_non_power_of_two_is_a_warning():
    text = GOOD + "  - source_model: org/c\n    positive_prompts: [story]\n"
    assert "power of two" in by_path(problems_of(text), "warning")["experts"].message


def test_prompt_caps():
    long = "y" * (MAX_PROMPT_CHARS + 1)
    found = by_path(problems_of(GOOD.replace('["math"]', f'["{long}"]')), "error")
    assert "limit" in found["experts[1].positive_prompts[0]"].message


def test_scales_checked():
    text = GOOD.replace('positive_prompts: ["code"]', 'positive_prompts: ["code"]\n    noise_scale: -1')
    text = text.replace('positive_prompts: ["math"]', 'positive_prompts: ["math"]\n    residual_scale: 0')
    found = by_path(problems_of(text))
    assert found["experts[0].noise_scale"].level == "error"
    assert found["experts[1].residual_scale"].level == "warning"


def test_shared_experts_not_for_mixtral():
    text = GOOD + "shared_experts:\n  - source_model: org/s\n"
    assert "shared_experts" in by_path(problems_of(text), "error")


def llama(**overrides):
    config = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 3,
              "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 320, "hidden_act": "silu"}
    return config | overrides


def test_compatibility_mismatches_named_per_expert():
    configs = {"org/base": llama(), "org/a": llama(hidden_size=128), "org/b": llama(num_hidden_layers=4)}
    messages = {}
    for p in problems_of(GOOD, configs):
        messages.setdefault(p.path, []).append(p.message)
    assert any("hidden_size is 128" in m for m in messages["experts[0].source_model"])
    assert messages["experts[1].source_model"] == ["num_hidden_layers is 4 in 'org/b' but 3 in the base"]


def test_compatibility_family_and_vocab():
    configs = {"org/base": llama(), "org/a": llama(model_type="gpt2"), "org/b": llama(vocab_size=999)}
    problems = problems_of(GOOD, configs)
    assert "gpt2" in by_path(problems, "error")["experts[0].source_model"].message
    assert "vocab_size" in by_path(problems, "warning")["experts[1].source_model"].message
    bad_base = {"org/base": llama(model_type="gpt2"), "org/a": llama(), "org/b": llama()}
    assert "cannot become a Mixtral" in by_path(problems_of(GOOD, bad_base))["base_model"].message


def test_mistral_expert_on_llama_base_with_same_shapes_is_fine():
    configs = {"org/base": llama(), "org/a": llama(model_type="mistral"), "org/b": llama(head_dim=16)}
    assert errors(problems_of(GOOD, configs)) == []


def test_unreachable_config_keeps_its_level():
    configs = {"org/base": llama(), "org/a": ConfigUnavailable("offline", "warning"),
               "org/b": ConfigUnavailable("no such folder")}
    found = by_path(problems_of(GOOD, configs))
    assert found["experts[0].source_model"].level == "warning"
    assert found["experts[1].source_model"].level == "error"


def test_load_recipe_raises_with_every_problem(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("base_model: b\ngate_mode: nope\nexperts: []\n")
    with pytest.raises(RecipeError) as info:
        load_recipe(str(path))
    assert {p.path for p in info.value.problems} == {"gate_mode", "experts"}
    with pytest.raises(RecipeError, match="cannot read"):
        load_recipe(str(tmp_path / "missing.yaml"))


def test_form_dict_path_matches_yaml_path():
    recipe, problems = recipe_from_dict({"base_model": "b", "experts": [{"source_model": "a"}],
                                         "gate_mode": "hidden_last"})
    assert problems == [] and recipe.gate_mode == "hidden"


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.stem)
def test_patching_a_preset_with_its_own_recipe_changes_nothing(path):
    """The Design tab writes form edits into the user's YAML; with no edit, not a byte moves."""
    text = path.read_text()
    recipe, _ = parse_recipe(text)
    assert patch_yaml(text, recipe.model_dump(exclude_none=True)) == text


def test_a_patch_changes_only_the_edited_node():
    text = GOOD.replace('["math"]', '["math"]  # keep this comment\n    negative_prompts: [\'story\']')
    recipe, _ = parse_recipe(text)
    data = recipe.model_dump(exclude_none=True)
    data["experts"][0]["positive_prompts"] = ["code", "more code"]
    data["experts"][1].pop("negative_prompts")
    patched = patch_yaml(text, data)
    assert '["code", "more code"]' in patched and "# keep this comment" in patched
    assert "negative_prompts" not in patched and "experts_per_token" not in patched  # default: left out
    assert parse_recipe(patched)[0].model_dump(exclude_none=True) == data


def test_a_patch_refuses_text_that_is_not_a_safe_mapping():
    assert patch_yaml(alias_bomb(), {"base_model": "x"}) is None
    assert patch_yaml("- a list", {"base_model": "x"}) is None
    assert patch_yaml("base_model: [oops", {"base_model": "x"}) is None


def test_workbench_gate_keys_parse_and_are_checked():
    text = GOOD.replace("base_model: org/base", "base_model: org/base\ngate_mode: fitted\ncenter_gates: true")
    probes = 'positive_prompts: ["math"]\n    probe_prompts: ["code", "x^2"]'
    recipe, problems = parse_recipe(text.replace('positive_prompts: ["math"]', probes))
    assert recipe.gate_mode == "fitted" and recipe.center_gates
    assert recipe.experts[1].probe_prompts == ["code", "x^2"]
    found = by_path(validate(recipe), "warning")
    assert "no effect in gate_mode 'fitted'" in found["center_gates"].message  # centring is for prompt means
    assert "not scored as held out" in found["experts[1].probe_prompts[0]"].message  # "code" is a positive
    assert "experts[1].probe_prompts[1]" not in found
    assert recipe.workbench_extensions() == ["gate_mode: fitted", "center_gates", "probe_prompts"]
    again, problems = parse_recipe(dump_recipe(recipe))
    assert problems == [] and again == recipe
    assert "center_gates" not in dump_recipe(parse_recipe(GOOD)[0])  # mergekit recipes stay mergekit's
    many = f'positive_prompts: ["math"]\n    probe_prompts: {["p"] * 65}'
    too_many = GOOD.replace('positive_prompts: ["math"]', many)
    assert "the limit is 64" in by_path(problems_of(too_many), "error")["experts[1].probe_prompts"].message
