"""Routing statistics on hand-made traces, and held-out scores / divergence on pico and demo models."""

from __future__ import annotations

import math

import pytest
import torch

from workbench.build import build
from workbench.chat import ReplyStream, SamplingSettings, prepare, reply_logits
from workbench.chat.engine import Registry
from workbench.gates import compute_gates, score_recipe
from workbench.recipe import Expert, Recipe
from workbench.routing import (
    RouterTrace,
    divergence,
    expert_load,
    routing_entropy,
    routing_summary,
)
from workbench.routing.analysis import (
    gate_similarity,
    kl_divergence,
    normalised_entropy,
    slot_share,
    top_experts,
)
from workbench.routing.trace import route

DISTINCT = [["def add(a, b): return a + b", "import numpy as np; x = np.zeros(3)"],
            ["Solve 2x + 3 = 7 for x.", "The integral of x squared is x cubed over three."],
            ["Once upon a time a dragon guarded a silver castle.",
             "The knight rode through the enchanted forest at night."],
            ["Hello! How are you doing today?", "Thanks, that sounds great. See you tomorrow."]]


def make_trace(probs: torch.Tensor, k: int, prefill: int | None = None) -> RouterTrace:
    """A trace from (T, L, E) probabilities, routed as Mixtral does; the first `prefill` tokens are prompt."""
    t, _, e = probs.shape
    weights, ids = route(probs, k)
    flags = torch.arange(t) < (t if prefill is None else prefill)
    return RouterTrace([f"t{i}" for i in range(t)], list(range(t)), probs, ids, weights, flags,
                       [f"model-{j}" for j in range(e)])


def one_hot_probs(choices: list[list[int]], experts: int) -> torch.Tensor:
    """(T, L) chosen experts -> (T, L, E) probabilities with 0.7 on the choice, the rest spread."""
    chosen = torch.tensor(choices)
    probs = torch.full((*chosen.shape, experts), 0.3 / (experts - 1))
    probs.scatter_(-1, chosen.unsqueeze(-1), 0.7)
    return probs


def test_slot_share_counts_each_tokens_k_choices():
    ids = torch.tensor([[[0, 1]], [[0, 2]]])  # T=2, L=1, k=2
    assert torch.allclose(slot_share(ids, 3), torch.tensor([[0.5, 0.25, 0.25]]))
    assert torch.equal(slot_share(ids[:0], 3), torch.zeros(1, 3))


def test_expert_load_keeps_prompt_and_reply_apart():
    probs = one_hot_probs([[0, 1], [0, 1], [2, 2]], 3)  # two prompt tokens go to 0/1, the reply to 2
    load = expert_load(make_trace(probs, k=1, prefill=2))
    assert torch.allclose(load.prefill, torch.tensor([[1.0, 0, 0], [0, 1.0, 0]]))
    assert torch.allclose(load.decode, torch.tensor([[0, 0, 1.0], [0, 0, 1.0]]))
    assert (load.prefill_tokens, load.decode_tokens) == (2, 1)
    assert torch.allclose(load.overall.sum(-1), torch.ones(2))


def test_entropy_is_zero_when_decided_and_one_when_uniform():
    assert torch.allclose(normalised_entropy(torch.full((3, 4), 0.25)), torch.ones(3))
    assert float(normalised_entropy(torch.tensor([1.0, 0, 0, 0]))) == pytest.approx(0.0, abs=1e-6)
    assert float(normalised_entropy(torch.tensor([1.0]))) == 0.0
    probs = torch.stack([torch.full((2, 4), 0.25), one_hot_probs([[0, 0]], 4)[0]])  # token 0 uniform
    entropy = routing_entropy(make_trace(probs, k=2, prefill=1))
    assert torch.allclose(entropy.prefill, torch.ones(2))
    assert bool((entropy.decode < 0.8).all())
    no_reply = routing_entropy(make_trace(probs, k=2))
    assert bool(no_reply.decode.isnan().all()) and no_reply.to_dict()["decode"] == [None, None]


def test_kl_divergence_known_values():
    p = torch.log(torch.tensor([[0.5, 0.5], [0.2, 0.8]]))
    q = torch.log(torch.tensor([[0.9, 0.1], [0.2, 0.8]]))
    expected = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)
    assert torch.allclose(kl_divergence(p, q), torch.tensor([expected, 0.0]), atol=1e-6)
    with pytest.raises(ValueError):
        kl_divergence(p, q[:1])


def test_top_expert_is_the_one_with_most_weight_over_layers():
    probs = one_hot_probs([[1, 1, 2]], 3)  # layers 0 and 1 pick expert 1, layer 2 picks 2
    assert top_experts(make_trace(probs, k=1)).tolist() == [1]


def test_divergence_pairs_each_reply_token_with_the_step_that_produced_it():
    probs = one_hot_probs([[0], [0], [2], [1], [3]], 4)  # 3 prompt tokens, 2 reply tokens
    trace = make_trace(probs, k=1, prefill=3)
    moe, base = torch.zeros(2, 5), torch.zeros(2, 5)
    base[1, 0] = 3.0
    result = divergence(trace, moe, base)
    assert result.top_expert.tolist() == [2, 1]  # produced by the forwards over tokens 2 and 3
    assert result.tokens == ["t3", "t4"] and result.kl[0] == 0 and result.kl[1] > 0.1
    with pytest.raises(ValueError, match="reply tokens"):
        divergence(trace, torch.zeros(3, 5), torch.zeros(3, 5))


def test_gate_similarity_of_orthogonal_and_equal_gates():
    orthogonal = torch.eye(4).repeat(2, 1, 1)  # (L=2, E=4, H=4)
    sim = gate_similarity(orthogonal)
    assert torch.allclose(torch.tensor(sim.mean_cosine), torch.eye(4)) and sim.condition_numbers == [1.0, 1.0]
    equal = gate_similarity(torch.ones(1, 3, 8))
    assert torch.allclose(torch.tensor(equal.mean_cosine), torch.ones(3, 3)) and equal.warnings


def test_summary_is_json_ready():
    summary = routing_summary(make_trace(torch.full((3, 2, 4), 0.25), k=2, prefill=3))
    assert set(summary) == {"load", "entropy"} and summary["entropy"]["decode"] == [None, None]


# ---- on models ---------------------------------------------------------------------------


def heldout_top1(entry, prompts: list[list[str]], mode: str) -> float:
    recipe = Recipe(base_model=entry.ref, gate_mode=mode, experts=[
        Expert(source_model=entry.ref, positive_prompts=p) for p in prompts])
    gates = compute_gates(recipe, entry.path, model=entry.model, tokenizer=entry.tokenizer)
    return score_recipe(recipe, entry.path, gates, model=entry.model, tokenizer=entry.tokenizer).top1


@pytest.mark.parametrize("mode", ["fitted", "hidden_avg", "hidden"])
def test_identical_prompt_sets_score_chance_on_a_pico_model(pico_factory, mode):
    # (A random pico model carries no meaning from one text to another: distinct themes are
    # scored on the demo model below.)
    entry = Registry().get(str(pico_factory("align", seed=0)), device="cpu")
    assert heldout_top1(entry, [DISTINCT[0]] * 4, mode) == pytest.approx(0.25)


@pytest.mark.demo
def test_distinct_prompts_align_better_than_identical_ones_demo(demo_model_path):
    entry = Registry().get("demo:smollm2-135m-instruct", device="cpu")
    same = heldout_top1(entry, [DISTINCT[0]] * 4, "fitted")
    assert same == pytest.approx(0.25)
    assert heldout_top1(entry, DISTINCT, "fitted") > same + 0.3
    assert heldout_top1(entry, DISTINCT, "hidden") < heldout_top1(entry, DISTINCT, "fitted")


def test_identity_moe_does_not_diverge_and_a_noisy_one_does(pico_factory, tmp_path):
    base = pico_factory("diverge", seed=9)
    registry = Registry()
    entries = {}
    for name, noise in (("identity", None), ("noisy", 0.3)):
        recipe = Recipe(base_model=str(base), dtype="float32", experts=[
            Expert(source_model=str(base), positive_prompts=p, noise_scale=noise) for p in DISTINCT])
        entries[name] = registry.get(str(build(recipe, tmp_path / name, device="cpu").path), device="cpu")
    base_entry = registry.get(str(base), device="cpu")
    settings = SamplingSettings(temperature=0, max_new_tokens=8)
    kl = {}
    for name, entry in entries.items():
        (prompt,) = prepare("Once upon a time", settings, [entry.tokenizer], [entry.context_length])
        stream = ReplyStream(entry, prompt, settings, trace=True)
        list(stream)
        reply = stream.result.token_ids
        logits = [reply_logits(e, prompt.token_ids, reply) for e in (entry, base_entry)]
        result = divergence(stream.result.trace, *logits)
        assert result.kl.shape == (len(reply),) and len(result.tokens) == len(reply)
        kl[name] = float(result.kl.mean())
    assert kl["identity"] < 1e-6 < 1e-2 < kl["noisy"]
