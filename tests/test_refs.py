"""Model references in mergekit-moe's forms: the dict form of its `ModelReference`, revisions,
`model+lora`; read into one string per model, with every mistake named where it is."""

from __future__ import annotations

import pytest

from workbench.recipe import dump_recipe, parse_recipe, patch_yaml, validate
from workbench.recipe.refs import split_ref

RECIPE = """base_model: org/base
experts:
  - source_model: {a}
    positive_prompts: ["code"]
  - source_model: org/b
    positive_prompts: ["tale"]
"""


def first_source(text: str) -> tuple[str | None, list]:
    recipe, problems = parse_recipe(RECIPE.format(a=text))
    problems += validate(recipe) if recipe is not None else []
    return (recipe.experts[0].source_model if recipe else None), [p for p in problems if p.level == "error"]


@pytest.mark.parametrize(("written", "read"), [
    ("{model: org/a}", "org/a"),
    ("{model: {path: org/a, revision: v1.0}}", "org/a@v1.0"),
    ("{model: org/a@abc123, lora: {path: org/a-lora, revision: main}}", "org/a@abc123+org/a-lora@main"),
    ("{model: {path: ./experts/a}, lora: ./adapters/a}", "./experts/a+./adapters/a"),
    ("{model: org/a, lora: null}", "org/a"),
    ("org/a@v1+org/a-lora", "org/a@v1+org/a-lora"),
])
def test_the_forms_mergekit_reads_become_one_string(written: str, read: str) -> None:
    source, errors = first_source(written)
    assert source == read and errors == []


def test_the_string_form_round_trips_and_mergekit_reads_it_alike() -> None:
    recipe, _ = parse_recipe(RECIPE.format(a="{model: {path: org/a, revision: v1}, lora: org/l}"))
    dumped = dump_recipe(recipe)
    assert "source_model: org/a@v1+org/l" in dumped and parse_recipe(dumped)[0] == recipe
    assert split_ref(recipe.experts[0].source_model) == ("org/a@v1", "org/l")
    assert split_ref("org/a") == ("org/a", None)


@pytest.mark.parametrize(("written", "path", "says", "fix"), [
    # mergekit drops this `revision` silently and builds from the default branch
    ("{model: org/a, revision: abc}", "experts[0].source_model.revision", "belongs inside `model`",
     "{model: {path: ..., revision: ...}}"),
    ("{model: org/a, override_architecture: MistralForCausalLM}",
     "experts[0].source_model.override_architecture", "not supported", "remove it"),
    ("{model: org/a, adapter: org/l}", "experts[0].source_model.adapter", "unknown key 'adapter'",
     "takes model and lora"),
    ("{lora: org/l}", "experts[0].source_model.model", "is required", "name the model"),
    ("{model: {path: org/a, rev: x}}", "experts[0].source_model.model.rev", "unknown key 'rev'",
     "path and revision"),
    ("{model: {revision: x}}", "experts[0].source_model.model.path", "is required", "path: org/name"),
    ("{model: {path: org/a, revision: 3}}", "experts[0].source_model.model.revision",
     "must be a branch, tag or commit (got 3)", "revision: main"),
    ("{model: {path: 'org/a@v1'}}", "experts[0].source_model.model.path", "contains '+' or '@'",
     "under `revision`"),
    ("{model: [org/a]}", "experts[0].source_model.model", "must be a model name", "org/name"),
    ("org/a+org/l+org/m", "experts[0].source_model", "has 2 '+'", "org/model+org/lora"),
    ("org/a@v1@v2", "experts[0].source_model", "has 2 '@'", "org/name@revision"),
    ("org/a+", "experts[0].source_model", "the LoRA part of 'org/a+' is empty", "both parts named"),
    ("+org/l", "experts[0].source_model", "the model part of '+org/l' is empty", "both parts named"),
    ("org/a@", "experts[0].source_model", "ends in '@'", "after '@'"),
    ("org/a+demo:smollm2-135m-instruct", "experts[0].source_model", "is a demo model, not a LoRA adapter",
     "after the '+'"),
])
def test_a_bad_reference_is_named_with_what_is_wrong_and_the_fix(written, path, says, fix) -> None:
    _, errors = first_source(written)
    found = [p for p in errors if p.path == path]
    assert found, errors
    assert says in found[0].message and fix in found[0].fix


def test_a_lora_on_the_base_is_refused_with_the_way_round() -> None:
    recipe, _ = parse_recipe(RECIPE.replace("base_model: org/base", "base_model: org/base+org/base-lora")
                             .format(a="org/a"))
    (problem,) = [p for p in validate(recipe) if p.level == "error"]
    assert problem.path == "base_model" and "applies a LoRA to the base" in problem.message
    assert "merge_and_unload" in problem.fix


def test_the_base_takes_the_dict_form_too() -> None:
    text = RECIPE.format(a="org/a").replace("base_model: org/base",
                                            "base_model: {model: {path: org/base, revision: r1}}")
    recipe, problems = parse_recipe(text)
    assert problems == [] and recipe.base_model == "org/base@r1"


def test_a_form_edit_keeps_a_dict_reference_as_the_user_wrote_it() -> None:
    text = RECIPE.format(a="{model: {path: org/a, revision: v1}}  # pinned")
    recipe, _ = parse_recipe(text)
    data = recipe.model_dump(exclude_none=True)
    data["experts"][1]["positive_prompts"] = ["tale", "myth"]
    patched = patch_yaml(text, data)
    assert "{model: {path: org/a, revision: v1}}  # pinned" in patched and '"myth"' in patched
    data["experts"][0]["source_model"] = "org/a@v2"  # edited in the form: the new value goes in
    assert "source_model: org/a@v2" in patch_yaml(text, data)
