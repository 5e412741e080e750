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
    # fitted gates, names and probe prompts are the workbench's own: mergekit-moe cannot rebuild it
    assert "not a mergekit-moe recipe" in card and "`gate_mode: fitted`" in card and "`probe_prompts`" in card
    assert "## Routing report" not in render_card(recipe, diagnose(torch.eye(2, 8)[None]), {}, {})
