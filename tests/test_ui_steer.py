"""The Interventions panel's logic and its third pane, on the real engine with pico models.

The panel's values become an Intervention; the Design tab's recipe becomes routers on the
loaded MoE for one session's replies; the Routing tab shows which cells changed. A MoE of
four different experts, so every routing change shows in the replies.
"""

from __future__ import annotations

import threading

import pytest
import yaml

from workbench.build import build
from workbench.chat import SamplingSettings, registry
from workbench.recipe import Expert, Recipe
from workbench.routing import InterventionError, is_steered
from workbench.ui import chat_logic, routing_logic, steer_logic

PROMPTS = [["def add(a, b): return a + b"], ["Solve 2x + 3 = 7 for x."], ["Once upon a time a dragon"],
           ["Hello! How are you doing today?"]]
SETTINGS = SamplingSettings(temperature=1.0, max_new_tokens=8, seed=5)


def recipe_text(base, experts, prompts, k: int = 2) -> str:
    recipe = Recipe(base_model=str(base), dtype="float32", experts_per_token=k, experts=[
        Expert(source_model=str(e), positive_prompts=p, name=f"x{i}") for i, (e, p) in
        enumerate(zip(experts, prompts, strict=True))])
    return yaml.safe_dump(recipe.model_dump(exclude_none=True))


@pytest.fixture(scope="module")
def pico(pico_factory, tmp_path_factory):
    base = pico_factory("ui-steer-base", seed=7)
    experts = [pico_factory("ui-steer-expert", seed=s) for s in (41, 42, 43, 44)]
    root = tmp_path_factory.mktemp("ui-steer")
    saved_text = recipe_text(base, experts, PROMPTS)
    other_text = recipe_text(base, experts, PROMPTS[::-1], k=1)
    from workbench.recipe import parse_recipe

    moe = build(parse_recipe(saved_text)[0], root / "moe", device="cpu").path
    other = build(parse_recipe(other_text)[0], root / "other", device="cpu").path
    yield {"base": str(base), "moe": str(moe), "other": str(other), "saved_text": saved_text,
           "other_text": other_text}
    for ref in (str(moe), str(other), str(base)):
        registry().unload(ref)


def run(side: str, history, folder: str, base: str, session: str = "s", steer=None):
    return list(chat_logic.reply(side, session, history, folder, base, "", SETTINGS, device="cpu",
                                 steer=steer))


def answer(updates) -> str:
    return updates[-1].history[-1]["content"]


# ---- the panel's values ----------------------------------------------------------------------


def test_the_panels_values_become_an_intervention_and_words(pico):
    values = steer_logic.spec(force=1, layers="1-2", ban=[3, 3], ablate=[0], top_k=0, temperature=2)
    assert values == {"force": 1, "layers": "1-2", "ban": [3], "ablate": [0], "top_k": None,
                      "temperature": 2.0, "routers": "saved", "revision": 0}
    names = steer_logic.moe_facts(pico["moe"])[0]
    assert names == ["x0", "x1", "x2", "x3"]
    assert steer_logic.expert_choices(pico["moe"])[1] == ("e1 x1", 1)
    assert steer_logic.describe(values, names) == ("e1 (x1) forced on layers 1-2 · e3 (x3) banned · "
                                                   "e0 (x0) ablated · router temperature 2")
    assert steer_logic.describe(steer_logic.spec(force=-1)) == "no intervention (the saved routers)"
    assert not steer_logic.active(steer_logic.spec(force=-1)) and steer_logic.active(values)
    recipe = steer_logic.spec(routers="recipe", revision=3)
    assert steer_logic.describe(recipe) == "routers from the unsaved recipe (revision 3)"
    assert "build the recipe on the Build tab" in steer_logic.panel_note(recipe, pico["moe"])
    bad = steer_logic.spec(force=2, layers="1-7", ban=[2])
    note = steer_logic.panel_note(bad, pico["moe"])
    assert note.startswith("**Cannot apply:**") and "layers 0 to 2" in note
    assert "both forced and banned" in note
    assert "not a layer range" in steer_logic.panel_note(steer_logic.spec(force=1, layers="x"), pico["moe"])
    assert steer_logic.moe_facts(pico["base"]) == ([], None)  # a dense model has no experts to steer
    with pytest.raises(InterventionError):
        steer_logic.intervention_of(steer_logic.spec(force=1, layers="5-2"))


def test_a_recipes_revision_counts_what_the_session_chatted_with(pico):
    first, seen = steer_logic.revision(pico["saved_text"], [])
    assert first == 1 and len(seen) == 1
    same, seen = steer_logic.revision(pico["saved_text"] + "\n# a comment\n", seen)  # routers unchanged
    assert same == 1 and len(seen) == 1
    second, seen = steer_logic.revision(pico["other_text"], seen)
    assert second == 2 and steer_logic.revision(pico["saved_text"], seen)[0] == 1
    assert steer_logic.revision("experts: [", seen) == (0, seen)


# ---- the third pane on the engine ------------------------------------------------------------


def test_the_design_recipes_routers_answer_like_its_build_for_this_session_only(pico):
    history = [{"role": "user", "content": "Once upon a time"}]
    steer = {"spec": steer_logic.spec(routers="recipe", revision=1), "yaml": pico["other_text"]}
    steered = run("steered", history, pico["moe"], pico["base"], steer=steer)
    built = run("moe", history, pico["other"], pico["base"])  # the MoE built from that recipe
    saved = run("moe", history, pico["moe"], pico["base"])
    label = "⚙ *under: top-1 · routers from the unsaved recipe (revision 1)*\n\n"
    assert answer(steered) == label + answer(built)[:]  # same seed, same tokens as the built model
    assert answer(saved) != answer(built)
    assert "routers from the recipe in" in steered[-1].stats and "tokens/s" in steered[-1].stats
    assert "routers from the recipe" not in saved[-1].stats  # the saved routers took no time to set up
    last = steered[-1].last
    assert last["steer"] == steer and last["trace"].k == 1 and last["trace"].intervention["top_k"] == 1
    assert not is_steered(registry().get(pico["moe"], device="cpu").model)
    # The Routing tab: the reply's routing, what it ran under, and the cells the swap changed.
    view = routing_logic.from_reply(last, device="cpu")
    assert view.changes is not None and view.changes.count > 0
    summary = view.summary()
    assert "**under: top-1 · routers from the unsaved recipe (revision 1)**" in summary
    assert "ran other experts than the saved routers chose" in summary and "KL" in summary
    figure = view.figures(0)["heatmap"]
    assert [t.type for t in figure.data] == ["heatmap", "scatter"]
    # The MoE pane's own reply has none of it.
    plain = routing_logic.from_reply(saved[-1].last, device="cpu")
    assert plain.changes is None and "under:" not in plain.summary()


def test_any_text_routes_under_the_panel_on_the_routing_tab(pico):
    steer = steer_logic.steer_of([2, "", [], [], 0, 1.0, "saved"], "", [])
    view = routing_logic.from_text(pico["moe"], "def add(a, b): return a + b", device="cpu", steer=steer)
    assert view.under == "e2 (x2) forced on every layer" and bool((view.trace.topk_ids[..., 0] == 2).all())
    assert view.changes.count > 0
    none = routing_logic.from_text(pico["moe"], "hello", device="cpu",
                                   steer=steer_logic.steer_of([-1, "", [], [], 0, 1.0, "saved"], "", []))
    assert none.changes is None and "no intervention" in none.summary()


def test_a_bad_recipe_or_intervention_is_a_message_and_the_next_reply_is_saved(pico):
    history = [{"role": "user", "content": "Hi"}]
    with pytest.raises(Exception, match="experts"):
        run("steered", history, pico["moe"], pico["base"],
            steer={"spec": steer_logic.spec(routers="recipe"), "yaml": "base_model: x\nexperts: []\n"})
    with pytest.raises(InterventionError, match="does not exist"):
        run("steered", history, pico["moe"], pico["base"], steer={"spec": steer_logic.spec(ban=[9])})
    assert answer(run("moe", history, pico["moe"], pico["base"])) == answer(
        run("moe", history, pico["moe"], pico["base"]))
    assert not is_steered(registry().get(pico["moe"], device="cpu").model)


def test_two_sessions_on_one_moe_keep_their_own_routers(pico):
    history = [{"role": "user", "content": "Once upon a time"}]
    saved = answer(run("moe", history, pico["moe"], pico["base"]))
    steer = {"spec": steer_logic.spec(ban=[0, 1], routers="recipe", revision=1), "yaml": pico["other_text"]}
    steered = answer(run("steered", history, pico["moe"], pico["base"], steer=steer))
    got: dict[str, list[str]] = {"A": [], "B": []}

    def session(name: str, side: str, given) -> None:
        for _ in range(3):
            got[name].append(answer(run(side, history, pico["moe"], pico["base"], session=name, steer=given)))

    threads = [threading.Thread(target=session, args=("A", "steered", steer)),
               threading.Thread(target=session, args=("B", "moe", None))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == {"A": [steered] * 3, "B": [saved] * 3}


def test_the_recipes_routers_are_computed_ahead_once_the_typing_pauses(pico, monkeypatch):
    from workbench.recipe import parse_recipe
    from workbench.ui import preview_logic

    made: list[str] = []
    real = preview_logic.gates_for

    def counting(recipe, entry, cancel=None):
        made.append(recipe.experts[0].positive_prompts[0])
        return real(recipe, entry, cancel)

    monkeypatch.setattr(preview_logic, "gates_for", counting)
    texts = [pico["other_text"].replace("Hello! How are you doing today?", f"Hello {n}") for n in range(3)]
    timers = [steer_logic.prefetch("typist", text, device="cpu", delay=0.3) for text in texts]
    timers[-1].join(timeout=60)
    for timer in timers[:-1]:
        timer.join(timeout=5)
    assert made == ["Hello 2"]  # the edits before the pause were never computed
    recipe = parse_recipe(texts[-1])[0]
    base = preview_logic.base_entry(recipe, token=None, device="cpu")
    assert preview_logic._gates.has(preview_logic.cache_key(recipe, base))
    steer_logic.prefetch("typist", "experts: [", device="cpu", delay=0.01).join(timeout=5)  # no error


def test_a_result_being_made_is_made_once_for_every_caller():
    from workbench.ui.preview_logic import _Cache

    cache, calls, started = _Cache(), [], threading.Event()

    def slow() -> str:
        calls.append(1)
        started.set()
        threading.Event().wait(0.3)
        return "gates"

    got: list[str] = []
    first = threading.Thread(target=lambda: got.append(cache.get("k", slow)))
    first.start()
    started.wait(5)
    got.append(cache.get("k", slow))  # arrives while the first is making it
    first.join()
    assert got == ["gates", "gates"] and calls == [1]

    def broken() -> str:
        raise RuntimeError("no")

    with pytest.raises(RuntimeError):
        cache.get("bad", broken)
    assert cache.get("bad", lambda: "then fine") == "then fine"
