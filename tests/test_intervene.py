"""Interventions on a loaded MoE: force, ban, ablate, top-k, temperature and swapped-in routers.

On a pico MoE whose four experts are different random models' MLPs, so every routing change
shows in the logits: forcing expert e everywhere is the dense model whose MLPs are e's,
banning all but e is the same, swapped-in routers route as the MoE built from their recipe,
and nothing an intervention does outlives its request (cancel, error, another session).
"""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.test_engine import interleave
from workbench.build import build
from workbench.chat import ReplyStream, SamplingSettings, prepare
from workbench.chat.engine import Registry
from workbench.errors import Cancelled
from workbench.gates import compute_gates
from workbench.progress import CancelToken
from workbench.recipe import Expert, Recipe
from workbench.routing import (
    Force,
    Intervention,
    InterventionError,
    Steering,
    find_routers,
    intervention_changes,
    is_steered,
    parse_force,
    recipe_routers,
    steered,
    swap_notes,
    trace_ids,
    trace_text,
)
from workbench.routing.trace import TraceError, router_weights

PROMPTS = [["def add(a, b): return a + b"], ["Solve 2x + 3 = 7 for x."], ["Once upon a time a dragon"],
           ["Hello! How are you doing today?"]]
TEXT = "The knight rode through the enchanted forest at night. def add(a, b): return a + b"
GREEDY = SamplingSettings(temperature=0.0, max_new_tokens=10)
SAMPLED = SamplingSettings(temperature=1.0, max_new_tokens=12, seed=3)


def recipe_for(base: Path, experts: list[Path], prompts: list[list[str]], k: int = 2) -> Recipe:
    return Recipe(base_model=str(base), experts_per_token=k, dtype="float32", gate_mode="hidden", experts=[
        Expert(source_model=str(e), positive_prompts=prompts[i]) for i, e in enumerate(experts)])


@pytest.fixture(scope="module")
def pico(pico_factory, tmp_path_factory):
    """A registry with the base and a 4-expert MoE of different experts (k=2), and its parts."""
    base = pico_factory("steer-base", seed=5)
    experts = [pico_factory("steer-expert", seed=s) for s in (31, 32, 33, 34)]
    recipe = recipe_for(base, experts, PROMPTS)
    out = build(recipe, tmp_path_factory.mktemp("steer") / "moe", device="cpu").path
    registry = Registry()
    return {"registry": registry, "base": registry.get(str(base), device="cpu"),
            "moe": registry.get(str(out), device="cpu"), "experts": experts, "recipe": recipe, "out": out,
            "base_path": base}


def ids_of(entry, text: str = TEXT) -> torch.Tensor:
    return torch.tensor([entry.tokenizer(text)["input_ids"]])


def logits(entry, intervention: Intervention | None = None, text: str = TEXT) -> torch.Tensor:
    with entry.lock, steered(entry.model, intervention), torch.inference_mode():
        return entry.model(input_ids=ids_of(entry, text), use_cache=False).logits[0].float()


def dense_with_expert(base: Path, expert: Path) -> torch.nn.Module:
    """The base model with every layer's MLP replaced by `expert`'s: what forcing it means."""
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    donor = AutoModelForCausalLM.from_pretrained(expert, dtype=torch.float32)
    for mine, theirs in zip(model.model.layers, donor.model.layers, strict=True):
        mine.mlp.load_state_dict(theirs.mlp.state_dict())
    return model


def reply(entry, intervention=None, settings=GREEDY, text="Once upon a time", **kwargs) -> ReplyStream:
    (prompt,) = prepare(text, settings, [entry.tokenizer], [entry.context_length])
    stream = ReplyStream(entry, prompt, settings, intervention=intervention, **kwargs)
    list(stream)
    return stream


def files_digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())
            if p.is_file()}


def routes_as_saved(moe, saved) -> None:
    assert not is_steered(moe.model)
    again = trace_text(moe, TEXT)
    assert torch.equal(again.topk_ids, saved.topk_ids) and torch.equal(again.topk_weights, saved.topk_weights)
    assert again.intervention is None


# ---- the values: parsing, checks, words ----------------------------------------------------


def test_an_intervention_parses_checks_and_describes_itself():
    assert parse_force("2") == Force(2) and parse_force("2@10-20") == Force(2, 10, 20)
    assert parse_force("1@5") == Force(1, 5, 5) and parse_force(" 3@4- ") == Force(3, 4, None)
    for bad in ("x", "2@7-3", "-1", "2@a-b"):
        with pytest.raises(InterventionError):
            parse_force(bad)
    ok = Intervention(force=(Force(1, 0, 1),), ban=(3, 3), top_k=1, temperature=2.0)
    assert ok.ban == (3,) and ok.problems(3, 4) == [] and ok.active and not Intervention().active
    names = ["code", "maths", "story", "chat"]
    assert ok.describe(names) == ("e1 (maths) forced on layers 0-1 · e3 (chat) banned · top-1 · "
                                  "router temperature 2")
    assert Intervention().describe() == "no intervention"
    problems = Intervention(force=(Force(5), Force(1, 2, 9), Force(2, 1, 2)), ban=(0, 1, 2, 3), ablate=(2,),
                            top_k=7, temperature=0.0).problems(3, 4)
    text = " | ".join(problems)
    for words in ("forced expert 5 does not exist", "layers 2-9 but this MoE has layers 0 to 2",
                  "same layer", "both forced and banned", "both forced and ablated", "every expert is banned",
                  "top-k 7", "temperature 0.0"):
        assert words in text, (words, problems)
    with pytest.raises(InterventionError, match="every expert is banned"):
        Intervention(ban=(0, 1, 2, 3)).check(3, 4)
    with pytest.raises(InterventionError, match="every expert is ablated or banned"):
        Intervention(ablate=(0, 1, 2, 3)).check(3, 4)  # was accepted, and answered noise
    with pytest.raises(InterventionError, match="every expert is ablated or banned"):
        Intervention(ban=(0, 1), ablate=(2, 3)).check(3, 4)
    assert Intervention(ablate=(0, 1, 2)).problems(3, 4) == []
    back = Intervention.from_dict(ok.to_dict())
    assert back == ok and ok.to_dict()["routers"] == "saved"
    assert ok.with_routers(torch.zeros(3, 4, 8), "r.yaml", k=2).top_k == 1  # a top-k given stays
    assert Intervention().with_routers(torch.zeros(3, 4, 8), "r.yaml", k=2).to_dict()["routers"] == "r.yaml"


def test_a_dense_model_or_a_bad_intervention_is_refused_before_any_token(pico):
    with pytest.raises(TraceError, match="no MoE routers"):
        Steering(pico["base"].model, Intervention(ban=(1,)))
    with pytest.raises(InterventionError, match="does not exist"):
        reply(pico["moe"], Intervention(ban=(9,)))
    assert not is_steered(pico["moe"].model)


# ---- what the interventions compute -------------------------------------------------------


@pytest.mark.parametrize("expert", range(4))
def test_forcing_an_expert_everywhere_gives_the_model_whose_mlps_are_that_experts(pico, expert):
    moe = pico["moe"]
    dense = dense_with_expert(pico["base_path"], pico["experts"][expert])
    with torch.inference_mode():
        want = dense(input_ids=ids_of(moe), use_cache=False).logits[0].float()
    forced = logits(moe, Intervention(force=(Force(expert),)))
    assert torch.allclose(forced, want, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(logits(moe), want, atol=1e-2)  # the saved routing is something else
    only = logits(moe, Intervention(ban=tuple(e for e in range(4) if e != expert)))
    assert torch.allclose(only, want, atol=1e-5, rtol=1e-5)
    # Generation too, with the single-token decode path: the same greedy reply as the dense model.
    stream = reply(moe, Intervention(force=(Force(expert),)))
    ids = torch.tensor([stream.prompt.token_ids])
    expected = dense.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False,
                              eos_token_id=None)[0, ids.shape[1]:].tolist()
    assert stream.result.token_ids == expected[: len(stream.result.token_ids)]
    assert stream.result.intervention.force == (Force(expert),)


def test_forcing_a_layer_range_changes_those_layers_only(pico):
    moe = pico["moe"]
    saved = trace_text(moe, TEXT)
    forced = trace_text(moe, TEXT, intervention=Intervention(force=(Force(2, 1, 2),)))
    assert forced.intervention["force"] == [{"expert": 2, "layers": [1, 2]}]
    assert torch.equal(forced.topk_ids[:, 0], saved.topk_ids[:, 0])  # layer 0 as saved
    assert torch.equal(forced.topk_weights[:, 0], saved.topk_weights[:, 0])
    assert bool((forced.topk_ids[:, 1:, 0] == 2).all()) and bool((forced.topk_weights[:, 1:, 0] == 1).all())
    assert bool((forced.topk_weights[:, 1:, 1] == 0).all())  # the other slot stays, with no weight
    assert torch.allclose(forced.probs[:, 1:, 2], torch.ones(1))
    changes = intervention_changes(forced, saved)
    assert not bool(changes.changed[:, 0].any()) and changes.count > 0
    assert "ran other experts" in changes.summary()


def test_a_ban_reroutes_and_an_ablation_drops_the_share(pico):
    moe = pico["moe"]
    saved = trace_text(moe, TEXT)
    chosen = (saved.topk_ids == 1).any(-1)  # (T, L) where the saved routers used expert 1
    assert bool(chosen.any()) and not bool(chosen.all())
    banned = trace_text(moe, TEXT, intervention=Intervention(ban=(1,)))
    assert not bool((banned.topk_ids == 1).any())
    assert bool((banned.probs[..., 1] == 0).all())
    # At layer 0 (its input is the same either way), where expert 1 was not chosen, the same
    # experts run with the same weights; later layers read what the changed layers wrote.
    keep = ~chosen[:, 0]
    assert torch.equal(banned.topk_ids[keep, 0], saved.topk_ids[keep, 0])
    assert torch.allclose(banned.topk_weights[keep, 0], saved.topk_weights[keep, 0], atol=1e-6)
    assert torch.equal(intervention_changes(banned, saved).changed[:, 0], chosen[:, 0])
    ablated = trace_text(moe, TEXT, intervention=Intervention(ablate=(1,)))
    first, was = ablated.topk_ids[:, 0], saved.topk_ids[:, 0]
    assert torch.equal(first, was)
    assert bool((ablated.topk_weights[:, 0][was == 1] == 0).all())
    kept = ablated.topk_weights[:, 0][was != 1]
    assert torch.equal(kept, saved.topk_weights[:, 0][was != 1])  # not renormalised
    assert bool((ablated.topk_weights.sum(-1)[chosen[:, 0].nonzero()[:, 0], 0] < 1).all())
    assert not torch.allclose(logits(moe, Intervention(ablate=(1,))), logits(moe), atol=1e-3)


def test_top_k_and_temperature_change_how_many_and_how_sharply(pico):
    moe = pico["moe"]
    saved = trace_text(moe, TEXT)
    # Layer 0 reads the same input either way; deeper layers read what the changed ones wrote.
    top1 = trace_text(moe, TEXT, intervention=Intervention(top_k=1))
    assert top1.k == 1 and torch.equal(top1.topk_ids[:, 0, 0], saved.topk_ids[:, 0, 0])
    assert bool((top1.topk_weights == 1).all())
    warm = trace_text(moe, TEXT, intervention=Intervention(temperature=4.0))
    assert torch.equal(warm.topk_ids[:, 0], saved.topk_ids[:, 0])  # the order of experts stays
    expected = torch.softmax(torch.log(saved.probs[:, 0]) / 4.0, dim=-1)
    assert torch.allclose(warm.probs[:, 0], expected, atol=1e-5)
    spread = warm.topk_weights[:, 0, 0] <= saved.topk_weights[:, 0, 0] + 1e-6  # a warmer router spreads
    assert bool(spread.all())
    changes = intervention_changes(warm, saved)
    assert not bool(changes.changed[:, 0].any()) and float(changes.shift[:, 0].max()) > 0.01
    assert intervention_changes(saved, saved).summary() == "routing identical to the saved routers"


def test_an_inactive_intervention_installs_nothing_and_changes_nothing(pico):
    moe = pico["moe"]
    assert torch.equal(logits(moe, Intervention()), logits(moe))
    plain, none = reply(moe), reply(moe, Intervention(temperature=1.0))
    assert plain.result.token_ids == none.result.token_ids and none.result.intervention is None


# ---- new routers from a recipe, without a rebuild ------------------------------------------


@pytest.mark.parametrize("k", [2, 1])
def test_swapped_routers_trace_like_the_model_built_from_that_recipe(pico, tmp_path, k):
    moe, base = pico["moe"], pico["base"]
    other = recipe_for(pico["base_path"], pico["experts"], [PROMPTS[3], PROMPTS[2], ["import numpy as np"],
                                                             ["The integral of x squared"]], k=k)
    built = pico["registry"].get(str(build(other, tmp_path / f"other-{k}", device="cpu").path), device="cpu")
    before, weights = files_digest(pico["out"]), router_weights(moe.model)
    saved = trace_text(moe, TEXT)
    gates = compute_gates(other, base.path, model=base.model, tokenizer=base.tokenizer)
    routers = recipe_routers(other, gates, moe, base_path=base.path)
    swap = Intervention().with_routers(routers, "the other recipe", k=other.experts_per_token)
    swapped, want = trace_text(moe, TEXT, intervention=swap), trace_text(built, TEXT)
    assert swapped.k == k and torch.equal(swapped.topk_ids, want.topk_ids)
    assert torch.allclose(swapped.topk_weights, want.topk_weights, atol=1e-6)
    assert torch.allclose(swapped.probs, want.probs, atol=1e-6)
    assert not torch.equal(swapped.topk_ids, saved.topk_ids)  # the routers really changed
    assert swapped.intervention["routers"] == "the other recipe"
    # The generation of the swapped MoE is the built one's, token for token.
    assert reply(moe, swap, SAMPLED).result.token_ids == reply(built, None, SAMPLED).result.token_ids
    # Nothing of the saved MoE changed: its files, its loaded routers, its routing.
    assert files_digest(pico["out"]) == before and torch.equal(router_weights(moe.model), weights)
    routes_as_saved(moe, saved)
    assert swap_notes(other, pico["recipe"]) == []


def test_swapped_routers_must_fit_the_moe_and_say_what_they_leave_out(pico, pico_factory):
    moe, base = pico["moe"], pico["base"]
    three = recipe_for(pico["base_path"], pico["experts"][:3], PROMPTS[:3])
    gates = compute_gates(three, base.path, model=base.model, tokenizer=base.tokenizer)
    with pytest.raises(InterventionError, match="needs"):
        recipe_routers(three, gates, moe, base_path=base.path)
    noisy = pico["recipe"].model_copy(deep=True)
    noisy.experts[2].noise_scale = 0.1
    notes = swap_notes(noisy, pico["recipe"])
    assert len(notes) == 1 and "expert 2: noise_scale" in notes[0] and "build" in notes[0]
    assert "no recipe copy" in swap_notes(noisy, None)[0]
    bf16 = pico["recipe"].model_copy(update={"dtype": "bfloat16"})
    full = compute_gates(bf16, base.path, model=base.model, tokenizer=base.tokenizer)
    assert recipe_routers(bf16, full, moe, base_path=base.path).dtype == torch.bfloat16  # as a build writes


# ---- never leaking into the next request ---------------------------------------------------


def test_after_a_cancel_an_error_or_an_abandoned_stream_the_next_request_routes_as_saved(pico, monkeypatch):
    moe = pico["moe"]
    saved = trace_text(moe, TEXT)
    force = Intervention(force=(Force(0),), temperature=3.0)
    # Cancelled after the first token.
    cancel = CancelToken()
    (prompt,) = prepare("Once upon a time", SAMPLED, [moe.tokenizer], [moe.context_length])
    stream = ReplyStream(moe, prompt, SAMPLED, cancel=cancel, intervention=force, trace=True)
    with pytest.raises(Cancelled):
        for _ in stream:
            cancel.cancel()
    assert stream.result.stats.finish_reason == "cancelled"
    routes_as_saved(moe, saved)
    # Cancelled in the middle of the prompt's forward (the cancel hook raises between layers).
    cancel = CancelToken()
    layers = moe.model.model.layers
    handle = layers[1].register_forward_pre_hook(lambda *a: cancel.cancel())
    try:
        with pytest.raises(Cancelled):
            list(ReplyStream(moe, prompt, SAMPLED, cancel=cancel, intervention=force))
    finally:
        handle.remove()
    routes_as_saved(moe, saved)
    # An error inside the steered router itself.
    def broken(self, module, plan, hidden):
        raise RuntimeError("boom")
    monkeypatch.setattr(Steering, "route", broken)
    with pytest.raises(RuntimeError, match="boom"):
        trace_text(moe, TEXT, intervention=force)
    monkeypatch.undo()
    routes_as_saved(moe, saved)
    # A consumer that stops reading (a closed browser tab): the generator is closed mid-reply.
    live = iter(ReplyStream(moe, prompt, SAMPLED, intervention=force))
    next(live)
    live.close()
    routes_as_saved(moe, saved)
    assert all("forward" not in router.__dict__ and not router._forward_hooks
               for _, router in find_routers(moe.model))


def test_two_sessions_never_see_each_others_intervention_or_routers(pico):
    moe, base = pico["moe"], pico["base"]
    gates = compute_gates(recipe_for(pico["base_path"], pico["experts"], PROMPTS[::-1]), base.path,
                          model=base.model, tokenizer=base.tokenizer)
    swap = Intervention(ban=(2,)).with_routers(recipe_routers(pico["recipe"], gates, moe), "reversed", k=1)
    alone_plain = reply(moe, None, SAMPLED).result.token_ids
    alone_swap = reply(moe, swap, SAMPLED).result.token_ids
    assert alone_plain != alone_swap
    # One thread, token by token in turn (the way two panes share a worker).
    (prompt,) = prepare("Once upon a time", SAMPLED, [moe.tokenizer], [moe.context_length])
    streams = [ReplyStream(moe, prompt, SAMPLED, intervention=swap), ReplyStream(moe, prompt, SAMPLED)]
    list(interleave(streams))
    assert [s.result.token_ids for s in streams] == [alone_swap, alone_plain]
    # Two threads at once (two sessions' requests on the server), each many times over.
    got: dict[str, list] = {"swap": [], "plain": []}

    def session(name: str, intervention) -> None:
        for _ in range(3):
            got[name].append(reply(moe, intervention, SAMPLED).result.token_ids)

    threads = [threading.Thread(target=session, args=("swap", swap)), threading.Thread(target=session,
                                                                                       args=("plain", None))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == {"swap": [alone_swap] * 3, "plain": [alone_plain] * 3}
    assert not is_steered(moe.model)


def test_an_override_from_another_thread_routes_that_threads_forward_as_saved(pico):
    """Defence in depth: even a forward run without the compute lock by another thread while a
    request is steered sees the saved routers."""
    moe = pico["moe"]
    want = logits(moe)
    seen: list[torch.Tensor] = []
    steering = Steering(moe.model, Intervention(force=(Force(3),)))
    with steering.applied():
        worker = threading.Thread(target=lambda: seen.append(logits(moe)))
        worker.start()
        worker.join()
        mine = trace_ids(moe, ids_of(moe)[0].tolist(), intervention=None)
    assert torch.equal(seen[0], want)
    assert bool((mine.topk_ids[..., 0] == 3).all())  # this thread's forward inside the block is steered


@pytest.mark.demo
def test_the_demo_presets_swapped_routers_are_the_bytes_its_build_writes(demo_model_path):
    """The UI computes a recipe's gates on the loaded base (the Preview tab's cache); a build
    computes them in its own process from a fresh load. For the demo preset (gate_mode fitted)
    they must be the same routers, bit for bit, or a swapped-in MoE would not be the built one."""
    from types import SimpleNamespace

    import numpy as np

    from workbench.gates import from_gates, scored_gates
    from workbench.recipe import read_recipe
    from workbench.ui import preview_logic

    recipe, _ = read_recipe(str(Path(__file__).resolve().parents[1] / "presets" / "demo.yaml"))
    assert recipe.gate_mode == "fitted"
    registry = Registry()
    base = registry.get(recipe.base_model, device="cpu")
    config = SimpleNamespace(num_hidden_layers=base.layers, num_local_experts=len(recipe.experts),
                             hidden_size=base.model.config.hidden_size)
    moe = SimpleNamespace(ref="demo MoE", model=SimpleNamespace(config=config))
    swapped = recipe_routers(recipe, preview_logic.gates_for(recipe, base), moe, base_path=base.path)
    written = from_gates(scored_gates(recipe, base.path, device="cpu"), "F32")  # what the build writes
    rows = np.stack([np.frombuffer(row, dtype="<f4").reshape(swapped.shape[1:]) for row in written.rows])
    assert swapped.dtype == torch.float32 and np.array_equal(swapped.numpy(), rows)


# ---- Qwen2-MoE -------------------------------------------------------------------------------


def test_a_qwen2_moe_is_traced_steered_and_takes_a_recipes_routers_like_a_mixtral(pico, tmp_path):
    shared = [Expert(source_model=str(pico["base_path"]), positive_prompts=["Hello! How are you?"])]
    recipe = pico["recipe"].model_copy(update={"architecture": "qwen", "shared_experts": shared})
    out = build(recipe, tmp_path / "qwen", device="cpu").path
    moe = pico["registry"].get(str(out), device="cpu")
    assert type(moe.model).__name__ == "Qwen2MoeForCausalLM" and moe.is_moe
    assert len(find_routers(moe.model)) == 3 and len(moe.expert_names) == 4
    saved = trace_text(moe, TEXT)
    assert (saved.experts, saved.k) == (4, 2) and (saved.topk_ids == 1).any()
    banned = trace_text(moe, TEXT, intervention=Intervention(ban=(1,)))
    assert not (banned.topk_ids == 1).any() and banned.intervention["ban"] == [1]
    forced = logits(moe, Intervention(force=(Force(2),)))
    assert not torch.allclose(forced, logits(moe), atol=1e-3)
    routes_as_saved(moe, saved)
    # The recipe's own routers, computed without a build, route as the build wrote them.
    gates = compute_gates(recipe, pico["base_path"], device="cpu")
    own = Intervention().with_routers(recipe_routers(recipe, gates, moe), "the recipe")
    swapped = trace_text(moe, TEXT, intervention=own)
    assert torch.equal(swapped.topk_ids, saved.topk_ids)
    torch.testing.assert_close(swapped.topk_weights, saved.topk_weights, atol=1e-6, rtol=0)
    torch.testing.assert_close(logits(moe, own), logits(moe), atol=1e-5, rtol=0)
