"""Preview, Chat and Routing handlers on the real engine: a pico MoE, then the bundled demo model.

An identity MoE (every expert a copy of the base) must answer exactly like its base at
temperature 0, its preview must be called exact, and its divergence from the base is zero:
three things a user would notice if a handler wired the wrong model or the wrong ids.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from workbench.chat import SamplingSettings
from workbench.ui import chat_logic, preview_logic, routing_logic

GREEDY = SamplingSettings(temperature=0.0, max_new_tokens=8, seed=0)


def identity_recipe(base: str, experts: list[str] | None = None) -> str:
    experts = experts or [base] * 4
    prompts = ["def add(a, b): return a + b", "Solve 2x + 3 = 7 for x.", "Once upon a time a dragon",
               "Hello! How are you doing today?"]
    lines = [f"base_model: {base}", "experts_per_token: 2", "dtype: float32", "experts:"]
    for expert, prompt in zip(experts, prompts, strict=False):
        lines += [f"  - source_model: {expert}", f"    positive_prompts: [{prompt!r}]"]
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def pico_moe(pico_factory, tmp_path_factory) -> tuple[str, str, str]:
    from workbench.build import build
    from workbench.recipe import parse_recipe

    base = str(pico_factory("ui-engine-base", seed=5))
    text = identity_recipe(base)
    recipe, _ = parse_recipe(text)
    out = build(recipe, tmp_path_factory.mktemp("ui-engine") / "pico-moe", device="cpu").path
    return base, str(out), text


def chat_both(moe: str, base: str, message: str) -> tuple[list, list]:
    base_history, moe_history = chat_logic.add_user(message, [], [])
    base_updates = list(chat_logic.reply("base", "t", base_history, moe, base, "", GREEDY, device="cpu"))
    moe_updates = list(chat_logic.reply("moe", "t", moe_history, moe, base, "", GREEDY, device="cpu"))
    return base_updates, moe_updates


def test_preview_of_an_identity_moe_is_exact_and_cached(pico_moe):
    base, _, text = pico_moe
    first = preview_logic.run_preview(text, "def add(a, b): return a + b", device="cpu")
    assert first.exact and "exactly" in first.note
    assert first.trace.layers == 3 and first.trace.experts == 4 and first.trace.source == "preview"
    again = preview_logic.run_preview(text, "Once upon a time", device="cpu")
    assert again.gates is first.gates  # probe edits reuse the gates
    # One prompt per expert: nothing to hold out, and the summary says how to fix that.
    recipe, score, advice = preview_logic.run_score(text, device="cpu")
    assert score.top1 is None and "two or more positive prompts" in preview_logic.score_summary(score, advice)


def test_compare_then_use_the_best_mode_keeps_the_users_yaml(pico_moe):
    base, _, _ = pico_moe
    text = "# my notes\n" + identity_recipe(base).replace(
        "positive_prompts: ['def add(a, b): return a + b']",
        "positive_prompts: ['def add(a, b): return a + b', 'import os']  # code")
    recipe, score, _ = preview_logic.run_score(text, device="cpu")
    assert score.tokens[0] > 0 and score.tokens[1:] == [0, 0, 0] and score.chance_top1 == 0.25
    recipe, results = preview_logic.run_compare(text, device="cpu")
    table = preview_logic.compare_table(results, recipe)
    assert "| hidden (recipe) |" in table and "| fitted |" in table and table.count("\n| ") == 11
    patched = preview_logic.with_mode(text, "router_input", True)
    assert patched.startswith("# my notes\n") and "'import os']  # code" in patched
    assert "gate_mode: router_input" in patched and "center_gates: true" in patched
    back = preview_logic.with_mode(patched, "hidden", False)
    assert "center_gates" not in back and "gate_mode: hidden" in back


def test_preview_with_a_different_expert_says_it_is_an_estimate(pico_moe, pico_factory):
    base, _, _ = pico_moe
    other = str(pico_factory("ui-engine-other", seed=9))
    mixed = identity_recipe(base, [base, other, base, other])
    result = preview_logic.run_preview(mixed, "hello", device="cpu")
    assert not result.exact and "estimate" in result.note


def test_chat_panes_agree_for_an_identity_moe_and_routing_shows_no_divergence(pico_moe):
    base, moe, _ = pico_moe
    assert chat_logic.base_of(moe) == base
    base_updates, moe_updates = chat_both(moe, "", "Hello! How are you doing today?")  # base read from recipe
    base_text = base_updates[-1].history[-1]["content"]
    assert base_text and base_text == moe_updates[-1].history[-1]["content"]
    assert "tokens/s" in base_updates[-1].stats
    last = moe_updates[-1].last
    view = routing_logic.from_reply(last, device="cpu")
    assert view.divergence is not None and float(view.divergence.kl.max()) < 1e-4
    assert int((~view.trace.is_prefill).sum()) == len(last["reply_ids"])
    figures = view.figures(layer=99)  # out of range: clamped to the last layer
    assert figures["divergence"] is not None and "layer 2" in figures["layer"].layout.title.text
    assert "generated" in view.summary()


def test_routing_of_any_text_through_the_built_moe(pico_moe):
    _, moe, _ = pico_moe
    view = routing_logic.from_text(moe, "The knight rode through the forest.", device="cpu")
    assert view.trace.source == "model" and bool(view.trace.is_prefill.all())
    assert view.figures(0)["divergence"] is None


@pytest.mark.demo
def test_demo_preset_preview_build_chat_and_routing(demo_model_path, tmp_path, monkeypatch):
    from workbench import jobs
    from workbench.ui import build_logic, design_logic

    monkeypatch.setenv("MOE_WORKBENCH_OUTPUTS", str(tmp_path))
    text = design_logic.preset_text("demo")
    preview = preview_logic.run_preview(text, "def fibonacci(n):", device="cpu")
    assert preview.exact and preview.trace.layers == 30 and preview.trace.experts == 4
    request = build_logic.make_request(text, "demo-moe", "cpu", "", "5GB", False)
    queue = jobs.BuildQueue()
    final = list(build_logic.Follower(queue.submit(request), queue).views())[-1]
    assert final.output == str(Path(tmp_path).resolve() / "demo-moe"), final.status
    base_updates, moe_updates = chat_both(final.output, "", "Write a haiku about the sea.")
    assert base_updates[-1].history[-1]["content"] == moe_updates[-1].history[-1]["content"] != ""
    view = routing_logic.from_reply(moe_updates[-1].last, device="cpu")
    assert float(view.divergence.kl.max()) < 1e-3


def test_routing_with_nothing_to_show_says_what_to_do_first():
    """Routing before any reply showed a bare "Error" pill."""
    assert "No chat reply yet" in routing_logic.nothing_to_route("reply", None, None)
    assert "No chat reply yet" in routing_logic.nothing_to_route("reply", {"trace": None}, "out/moe")
    assert "No steered reply yet" in routing_logic.nothing_to_route("steered", None, "out/moe")
    assert "No MoE chosen" in routing_logic.nothing_to_route("text", None, "")
    assert routing_logic.nothing_to_route("reply", {"trace": object()}, None) == ""
    assert routing_logic.nothing_to_route("steered", {"trace": object()}, None) == ""
    assert routing_logic.nothing_to_route("text", None, "out/moe") == ""
