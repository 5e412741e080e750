"""Forge tab handlers: early refusals naming the field, the missing experts of a recipe, the views of a
forge job (progress, loss points, samples), and adding a forged expert to the recipe."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.test_jobs import EXAMPLES, forge_request
from workbench import jobs
from workbench.errors import ForgeError, WorkbenchError
from workbench.recipe import load_yaml, parse_recipe
from workbench.staging import MANIFEST
from workbench.ui import forge_logic, shared

ROOT = Path(__file__).resolve().parents[1]
ALIGNMENT = (ROOT / "presets" / "alignment-demo.yaml").read_text()


@pytest.fixture
def outputs(tmp_path, monkeypatch):
    monkeypatch.setenv("MOE_WORKBENCH_OUTPUTS", str(tmp_path / "outputs"))
    monkeypatch.chdir(tmp_path)
    return tmp_path / "outputs"


def request(**changes):
    fields = {"base": "demo:smollm2-135m-instruct", "examples": EXAMPLES, "name": "pirate-expert",
              "steps": 30, "lr": 5e-5, "batch_size": 4, "seed": 0, "layers": "",
              "samples": "Hi?\n\nWhat is 2 + 2?", "replace": False} | changes
    return forge_logic.make_request(*fields.values())


def test_a_request_carries_the_fields_and_lands_in_the_outputs_folder(outputs):
    made = request(layers="2-5")
    assert made.out == str(outputs.resolve() / "pirate-expert")
    assert (made.steps, made.lr, made.batch_size, made.layers) == (30, 5e-5, 4, (2, 5))
    assert made.samples == ("Hi?", "What is 2 + 2?")  # blank lines dropped


@pytest.mark.parametrize(("changes", "said"), [
    ({"examples": ""}, "holds no example"),
    ({"examples": EXAMPLES + '\n{"prompt": "Hi"}'}, 'line 4 has no "reply"'),
    ({"examples": "not json"}, "line 1 is not JSON"),
    ({"steps": 0}, "^Steps is 0"),  # the field's label, not the CLI's flag
    ({"lr": 1.0}, "^Learning rate is 1.0"),
    ({"batch_size": 0}, "^Batch size is 0"),
    ({"layers": "ten"}, "Layers 'ten'"),
    ({"base": " "}, "Base model is empty"),
    ({"name": "../escape"}, "output name"),
    ({"base": "/etc"}, "outside those this app loads models from"),
])
def test_bad_fields_are_refused_before_queueing_with_the_field_named(outputs, changes, said):
    with pytest.raises(WorkbenchError, match=said.replace("(", r"\(").replace("+", r"\+")):
        request(**changes)


def test_an_existing_output_needs_replace(outputs):
    (outputs / "pirate-expert").mkdir(parents=True)
    with pytest.raises(ForgeError, match="exists; tick 'replace'"):
        request()
    assert request(replace=True).force


def test_the_alignment_preset_names_its_missing_experts_and_where_they_go(outputs):
    missing = forge_logic.missing_experts(ALIGNMENT)
    assert [(m.label, m.data.name) for m in missing] == [("hero", "hero.jsonl"), ("villain", "villain.jsonl")]
    assert missing[0].base == "demo:smollm2-135m-instruct"
    assert forge_logic.forge_target(missing[0]) == missing[0].out  # under the app's folder: as written
    note = forge_logic.missing_note(ALIGNMENT)
    assert "2 expert(s)" in note and "**hero**" in note and "Forge missing" in note
    (missing[0].out / MANIFEST).parent.mkdir(parents=True)
    (missing[0].out / MANIFEST).write_text("{}")
    assert [m.label for m in forge_logic.missing_experts(ALIGNMENT)] == ["villain"]
    assert forge_logic.missing_note((ROOT / "presets" / "demo.yaml").read_text()) == ""


def test_on_a_space_a_forged_expert_is_private_to_the_visitor_who_forged_it(outputs, monkeypatch):
    monkeypatch.setenv("SPACE_ID", "someone/workbench")
    missing = forge_logic.missing_experts(ALIGNMENT)[0]
    target = forge_logic.forge_target(missing)
    assert target.parent == outputs.resolve() and re.fullmatch(r"hero-expert-[0-9a-f]{32}", target.name)
    assert forge_logic.forge_target(missing) != target  # a new secret each time
    made = request()
    assert Path(made.out).name.startswith("pirate-expert-")
    with pytest.raises(WorkbenchError):  # not finished yet: nothing to load
        shared.check_model_ref(str(target))
    target.mkdir(parents=True)
    (target / MANIFEST).write_text("{}")
    shared.check_model_ref(str(target))  # the visitor's own forged expert, by its secret name
    plain = outputs / "hero-expert"
    plain.mkdir()
    (plain / MANIFEST).write_text("{}")
    with pytest.raises(WorkbenchError):  # any other folder stays refused on a Space
        shared.check_model_ref(str(plain))


def test_the_views_of_a_forge_show_every_loss_and_the_samples_side_by_side(tmp_path, pico_factory):
    base = pico_factory("ui-forge-base", seed=5)
    queue = jobs.BuildQueue()
    job = queue.submit(forge_request(base, tmp_path / "pirate-expert", samples=("Hello?",)))
    views = list(forge_logic.ForgeFollower(job, queue, interval=0.0).views())
    final = views[-1]
    assert final.finished and final.output == str(tmp_path / "pirate-expert")
    assert [p["step"] for p in final.points] == [1, 2, 3, 4]
    assert "Forged **pirate-expert**" in final.status
    assert "| prompt | base | forged |" in final.summary and "| Hello? |" in final.summary
    fractions = [v.fraction for v in views if v.fraction is not None]
    assert fractions == sorted(fractions) and fractions[-1] > 0.9
    figure = forge_logic.loss_figure(final.points)
    assert list(figure.data[0].x) == [1, 2, 3, 4]


def test_a_forged_expert_is_added_to_the_recipe_with_comments_kept(tmp_path):
    text = "# my recipe\n" + (ROOT / "presets" / "demo.yaml").read_text()
    patched = forge_logic.add_expert(text, str(tmp_path / "pirate-expert"), EXAMPLES)
    assert patched.startswith("# my recipe\n")
    recipe, problems = parse_recipe(patched)
    added = recipe.experts[-1]
    assert added.source_model == str(tmp_path / "pirate-expert") and added.name == "pirate"
    assert added.positive_prompts == [json.loads(line)["prompt"] for line in EXAMPLES.splitlines()]
    assert len(load_yaml(patched)["experts"]) == 5
    with pytest.raises(WorkbenchError, match="no experts list"):
        forge_logic.add_expert("base_model: x\n", "/x", EXAMPLES)


def test_an_upload_is_read_or_refused_naming_its_line(tmp_path):
    good = tmp_path / "mine.jsonl"
    good.write_text(EXAMPLES)
    assert forge_logic.uploaded_text(str(good)) == EXAMPLES
    bad = tmp_path / "bad.jsonl"
    bad.write_text(EXAMPLES + "\n[1, 2]\n")
    with pytest.raises(ForgeError, match="line 4 is not a JSON object"):
        forge_logic.uploaded_text(str(bad))


def test_a_forge_aimed_outside_the_outputs_folder_goes_there_under_a_free_name(outputs, monkeypatch):
    served = outputs.parent / "served"  # the app's outputs folder is not the recipe's ./outputs
    monkeypatch.setenv("MOE_WORKBENCH_OUTPUTS", str(served))
    (served / "hero-expert").mkdir(parents=True)  # another output of that name: never written over
    plan = forge_logic.missing_requests(forge_logic.missing_experts(ALIGNMENT))
    assert [Path(r.out) for _, r in plan] == [served.resolve() / "hero-expert-2",
                                              served.resolve() / "villain-expert"]
    pointed = load_yaml(forge_logic.point_recipe(ALIGNMENT, plan))
    assert [e["source_model"] for e in pointed["experts"][2:]] == [r.out for _, r in plan]
