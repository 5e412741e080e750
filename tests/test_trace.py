"""Router traces and the no-build preview: shapes, values, hooks, and preview == built routing."""

from __future__ import annotations

import json

import pytest
import torch

from workbench.build import build
from workbench.chat import ReplyStream, SamplingSettings, prepare
from workbench.chat.engine import Registry
from workbench.gates import Gates, diagnose
from workbench.recipe import Expert, Recipe
from workbench.routing import (
    RouterRecorder,
    RouterTrace,
    find_routers,
    preview_routing,
    router_hooks,
    trace_text,
)
from workbench.routing.trace import TraceError, router_weights

PROMPTS = [["def add(a, b): return a + b"], ["Solve 2x + 3 = 7 for x."], ["Once upon a time a dragon"],
           ["Hello! How are you doing today?"]]
DEMO_PROMPTS = [["Write a Python function that sorts a list.", "def add(a, b): return a + b"],
                ["Solve the equation 2x + 3 = 7.", "What is the integral of x squared?"],
                ["Once upon a time, a dragon guarded a castle.", "Write a poem about the sea."],
                ["Hello! How are you today?", "Thanks, see you tomorrow."]]
TEXT = "The knight rode through the enchanted forest at night. def add(a, b): return a + b"


def recipe_for(base: str, experts: list[str], prompts: list[list[str]], k: int = 2) -> Recipe:
    return Recipe(base_model=base, experts_per_token=k, dtype="float32", experts=[
        Expert(source_model=e, positive_prompts=prompts[i % len(prompts)]) for i, e in enumerate(experts)])


@pytest.fixture(scope="module")
def pico(pico_factory, tmp_path_factory):
    """(registry, base entry, identity MoE entry, its gates, recipe) on pico models."""
    base = pico_factory("trace-base", seed=5)
    recipe = recipe_for(str(base), [str(base)] * 4, PROMPTS)
    result = build(recipe, tmp_path_factory.mktemp("trace") / "moe", device="cpu")
    registry = Registry()
    return (registry, registry.get(str(base), device="cpu"), registry.get(str(result.path), device="cpu"),
            result.gates, recipe)


def check_trace_values(trace: RouterTrace) -> None:
    t, layers, e = trace.probs.shape
    assert torch.allclose(trace.probs.sum(-1), torch.ones(t, layers), atol=1e-5)
    best = torch.topk(trace.probs, trace.k, dim=-1)
    assert torch.equal(trace.topk_ids, best.indices)  # the chosen experts are the argmax set, best first
    assert torch.allclose(trace.topk_weights.sum(-1), torch.ones(t, layers), atol=1e-5)
    expected = best.values / best.values.sum(-1, keepdim=True)
    assert torch.allclose(trace.topk_weights, expected, atol=1e-6)


def test_trace_of_a_text_has_the_right_shapes_and_values(pico):
    _, _, moe, _, _ = pico
    trace = trace_text(moe, TEXT)
    ids = moe.tokenizer(TEXT)["input_ids"]
    assert trace.token_ids == ids and len(trace.tokens) == len(ids)
    assert trace.probs.shape == (len(ids), 3, 4) and trace.k == 2 and trace.source == "model"
    assert bool(trace.is_prefill.all())
    check_trace_values(trace)
    assert "".join(trace.tokens) == moe.tokenizer.decode(ids)


def test_generation_trace_marks_prompt_and_reply_with_the_kv_cache(pico):
    _, _, moe, _, _ = pico
    settings = SamplingSettings(temperature=1.0, max_new_tokens=9, seed=2)
    (prompt,) = prepare("Once upon a time", settings, [moe.tokenizer], [moe.context_length])
    stream = ReplyStream(moe, prompt, settings, trace=True)
    list(stream)
    trace = stream.result.trace
    n_prompt, reply = len(prompt.token_ids), stream.result.token_ids
    assert trace.token_ids == prompt.token_ids + reply  # every reply token routed, the last one too
    assert trace.is_prefill.tolist() == [True] * n_prompt + [False] * len(reply)
    check_trace_values(trace)
    # With the KV cache, a decode step routes only its new token, exactly as a full pass would.
    full = trace_text(moe, moe.tokenizer.decode(trace.token_ids), add_special_tokens=False)
    if full.token_ids == trace.token_ids:
        assert torch.equal(full.topk_ids, trace.topk_ids)
        assert torch.allclose(full.probs, trace.probs, atol=1e-5)


def test_hooks_come_off_even_when_the_forward_fails(pico):
    _, _, moe, _, _ = pico
    routers = [module for _, module in find_routers(moe.model)]
    assert len(routers) == 3
    with pytest.raises(IndexError), router_hooks(moe.model, RouterRecorder(3)):
        assert all(len(r._forward_hooks) == 1 for r in routers)
        moe.model(input_ids=torch.tensor([[10**6]]))  # index out of range
    assert all(len(r._forward_hooks) == 0 for r in routers)


def test_dense_models_have_no_routers(pico):
    _, base, _, _, _ = pico
    assert find_routers(base.model) == []
    with pytest.raises(TraceError, match="no MoE routers"):
        trace_text(base, TEXT)


def test_trace_round_trips_through_json(pico):
    _, _, moe, _, _ = pico
    trace = trace_text(moe, TEXT)
    again = RouterTrace.from_dict(json.loads(json.dumps(trace.to_dict())))
    assert again.tokens == trace.tokens and again.expert_names == trace.expert_names
    assert torch.equal(again.topk_ids, trace.topk_ids) and torch.equal(again.is_prefill, trace.is_prefill)
    assert torch.allclose(again.probs, trace.probs) and again.layers == 3


def test_bad_trace_shapes_are_refused():
    probs = torch.full((2, 3, 4), 0.25)
    ids, weights = torch.zeros(2, 3, 2, dtype=torch.long), torch.full((2, 3, 2), 0.5)
    with pytest.raises(ValueError, match="topk_weights"):
        RouterTrace(["a", "b"], [1, 2], probs, ids, weights[..., :1], torch.ones(2, dtype=torch.bool),
                    ["x"] * 4)
    with pytest.raises(ValueError, match="is_prefill"):
        RouterTrace(["a", "b"], [1, 2], probs, ids, weights, torch.ones(3, dtype=torch.bool), ["x"] * 4)
    with pytest.raises(ValueError, match="expert names"):
        RouterTrace(["a", "b"], [1, 2], probs, ids, weights, torch.ones(2, dtype=torch.bool), ["x"] * 3)


def test_router_weights_are_the_gates_the_build_wrote(pico):
    _, _, moe, gates, _ = pico
    assert torch.equal(router_weights(moe.model), gates.vectors)


def test_preview_equals_the_built_trace_for_an_identity_moe(pico):
    _, base, moe, gates, recipe = pico
    built = trace_text(moe, TEXT)
    preview = preview_routing(gates, base, TEXT, recipe.experts_per_token)
    assert preview.source == "preview" and preview.token_ids == built.token_ids
    assert torch.equal(preview.topk_ids, built.topk_ids)  # every token, every layer
    assert torch.allclose(preview.probs, built.probs, atol=1e-5)


def test_preview_is_exact_at_layer_zero_for_real_experts(pico, pico_factory, tmp_path):
    registry, base, _, _, _ = pico
    experts = [str(pico_factory("trace-expert", seed=s)) for s in (31, 32, 33, 34)]
    recipe = recipe_for(base.ref, experts, PROMPTS)
    result = build(recipe, tmp_path / "mixed", device="cpu")
    built = trace_text(registry.get(str(result.path), device="cpu"), TEXT)
    preview = preview_routing(result.gates, base, TEXT, 2)
    assert torch.equal(preview.topk_ids[:, 0], built.topk_ids[:, 0])
    assert torch.allclose(preview.probs[:, 0], built.probs[:, 0], atol=1e-5)
    assert not torch.allclose(preview.probs[:, 1:], built.probs[:, 1:], atol=1e-3)  # later: an estimate


def test_preview_refuses_mismatched_gates_and_k(pico):
    _, base, _, gates, _ = pico
    wrong = torch.zeros(5, 4, gates.vectors.shape[-1])
    with pytest.raises(TraceError, match="layers"):
        preview_routing(Gates(wrong, "hidden", diagnose(wrong)), base, TEXT, 2)
    with pytest.raises(TraceError, match="experts_per_token"):
        preview_routing(gates, base, TEXT, 5)
    with pytest.raises(TraceError, match="empty"):
        preview_routing(gates, base, "  ", 2)


# ---- the bundled demo model --------------------------------------------------------------


@pytest.fixture(scope="module")
def demo(demo_model_path, tmp_path_factory):
    """(registry, base entry, identity 4x demo MoE entry (k=2, float32), its gates)."""
    ref = "demo:smollm2-135m-instruct"
    recipe = recipe_for(ref, [ref] * 4, DEMO_PROMPTS)
    result = build(recipe, tmp_path_factory.mktemp("demo-trace") / "demo-moe", device="cpu")
    registry = Registry()
    base, moe = registry.get(ref, device="cpu"), registry.get(str(result.path), device="cpu")
    return registry, base, moe, result.gates


def long_text(tokenizer, tokens: int) -> str:
    words = ("The dragon counted the coins while def sort(xs): return sorted(xs) and 2x + 3 = 7 "
             "meant x equals two; hello, thanks, see you tomorrow! ").split()
    text = ""
    while len(tokenizer(text)["input_ids"]) < tokens:
        text += words[len(text.split()) % len(words)] + " "
    return text


@pytest.mark.demo
def test_demo_preview_equals_the_built_trace(demo):
    _, base, moe, gates = demo
    text = long_text(base.tokenizer, 256)
    built = trace_text(moe, text)
    preview = preview_routing(gates, base, text, 2)
    assert built.probs.shape[1:] == (30, 4) and built.num_tokens >= 256
    assert torch.equal(preview.topk_ids, built.topk_ids)
    assert torch.allclose(preview.probs, built.probs, atol=1e-4)


@pytest.mark.demo
def test_demo_chat_traced_and_untraced_agree_and_share_memory(demo):
    registry, base, moe, _ = demo
    settings = SamplingSettings(temperature=0.7, max_new_tokens=16, seed=4)
    (prompt,) = prepare("Write a haiku about the sea.", settings, [base.tokenizer], [base.context_length])
    plain, traced = ReplyStream(moe, prompt, settings), ReplyStream(moe, prompt, settings, trace=True)
    assert "".join(plain) == "".join(traced) and plain.result.token_ids == traced.result.token_ids
    assert traced.result.trace.num_tokens == len(prompt.token_ids) + len(traced.result.token_ids)
    check_trace_values(traced.result.trace)
    moe_alone = sum(p.numel() * p.element_size() for p in moe.model.parameters())
    assert registry.resident_bytes() < 1.02 * moe_alone  # the base costs (almost) nothing on top
