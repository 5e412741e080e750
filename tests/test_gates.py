"""Router gates: every mode against an independent computation, padding, seeds, diagnostics,
token cap, progress and cancellation; the device picker. L layers, E experts, H hidden."""

from __future__ import annotations

import copy
import json
import logging
import math
import shutil
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from workbench.device import pick_device
from workbench.errors import Cancelled, GateError, WorkbenchError
from workbench.gates import compute_gates, diagnose, lazy_weights
from workbench.gates import forward as base_forward
from workbench.gates.compute import combine_rows, prompt_states, reduce_states
from workbench.gates.prompts import MAX_PROMPT_TOKENS, tokenize_prompts
from workbench.gates.rows import cast
from workbench.progress import CancelToken
from workbench.recipe import Expert, Recipe

# (positives, negatives) per expert; lengths differ within each set so padding is exercised,
# and [""] is Cognito-style "zero positive prompting" (the BOS state alone).
SETS = [
    (["def add(a, b): return a + b", "import numpy as np"], ["Once upon a time"]),
    (["The knight rode through the enchanted forest at night.", "a dragon"], None),
    ([""], ["Evil schemes and cruelty hurt everyone.", "Solve 2x + 3 = 7 for x."]),
]
LAYERS, HIDDEN = 3, 64  # the pico model's


def recipe_for(base, mode: str, sets=SETS) -> Recipe:
    experts = [Expert(source_model=str(base), positive_prompts=p, negative_prompts=n) for p, n in sets]
    return Recipe(base_model=str(base), experts=experts, gate_mode=mode)


@pytest.fixture(scope="module")
def pico(pico_llama):
    model = AutoModelForCausalLM.from_pretrained(pico_llama, dtype=torch.float32, use_safetensors=True)
    return model.eval(), AutoTokenizer.from_pretrained(pico_llama)


def ids_alone(tok, prompt: str) -> list[int]:
    """BOS id by hand, then the prompt's own tokens: what one unpadded prompt should be."""
    return [tok.bos_token_id] + tok(prompt, add_special_tokens=False).input_ids


def unit(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm(dim=-1, keepdim=True)


def expected_rows(set_state, sets=SETS) -> torch.Tensor:
    """(L, E, H) from a per-set state function: positives minus negatives, made unit length."""
    rows = []
    for pos, neg in sets:
        v = set_state(pos) - (set_state(neg) if neg else 0)
        rows.append(unit(v))
    return torch.stack(rows, dim=-2)


@torch.no_grad()
def last_states_alone(model, tok, prompts) -> torch.Tensor:
    """Mean over prompts of hidden_states[l] at the last token, each prompt run alone: (L, H)."""
    per = [torch.stack(model(torch.tensor([ids_alone(tok, p)]), output_hidden_states=True).hidden_states)
           for p in prompts]
    return torch.stack([h[:LAYERS, 0, -1] for h in per]).mean(0)


def test_hidden_matches_each_prompt_run_alone(pico_llama, pico):
    model, tok = pico
    gates = compute_gates(recipe_for(pico_llama, "hidden"), pico_llama, device="cpu")
    want = expected_rows(lambda prompts: last_states_alone(model, tok, prompts))
    assert gates.vectors.shape == (LAYERS, len(SETS), HIDDEN)
    assert gates.vectors.dtype == torch.float32 and gates.vectors.device.type == "cpu"
    torch.testing.assert_close(gates.vectors, want, atol=1e-4, rtol=0)
    assert gates.mode == "hidden"


def test_prompt_sets_split_into_more_forwards_on_wide_models_give_the_same_gates(pico_llama, pico,
                                                                                 monkeypatch):
    model, tok = pico
    together = compute_gates(recipe_for(pico_llama, "hidden"), pico_llama, model=model, tokenizer=tok)
    # A budget of a few tokens' activations: as a model wide enough for this would get.
    config, keys = model.config, base_forward.MAX_PROMPT_TOKENS
    per_token = 4 * (3 * config.intermediate_size + config.num_attention_heads * keys)
    monkeypatch.setattr(base_forward, "ACTIVATION_BYTES", 20 * per_token)
    widths = []

    def count(module, args, kwargs) -> None:
        widths.append(tuple(kwargs["input_ids"].shape))  # (rows, width)

    handle = model.register_forward_pre_hook(count, with_kwargs=True)
    try:
        split = compute_gates(recipe_for(pico_llama, "hidden"), pico_llama, model=model, tokenizer=tok)
    finally:
        handle.remove()
    # Each forward within its budget, unless one prompt alone is longer.
    assert len(widths) > 1 and all(rows * width <= 20 or rows == 1 for rows, width in widths)
    torch.testing.assert_close(split.vectors, together.vectors, atol=1e-5, rtol=0)


def test_tokens_per_forward_shrinks_with_the_model_width():
    def config(intermediate: int, heads: int) -> SimpleNamespace:
        return SimpleNamespace(intermediate_size=intermediate, num_attention_heads=heads,
                               hidden_size=heads * 128)

    small, seven_b, seventy_b = config(512, 4), config(14336, 32), config(28672, 64)
    assert base_forward.tokens_per_forward(small) == base_forward.TOKENS_PER_FORWARD
    assert 1000 < base_forward.tokens_per_forward(seven_b) < 1200
    assert 500 < base_forward.tokens_per_forward(seventy_b) < 600
    # MLP activations of a whole merged forward stay near the budget, whatever the width.
    mlp = 3 * 28672 * 4 * base_forward.tokens_per_forward(seventy_b)
    assert mlp <= base_forward.ACTIVATION_BYTES


@torch.no_grad()
def test_hidden_avg_means_every_position_pad_included(pico_llama, pico):
    model, tok = pico

    def set_state(prompts):
        rows = [ids_alone(tok, p) for p in prompts]
        width = max(map(len, rows))
        ids = torch.tensor([[tok.bos_token_id] * (width - len(r)) + r for r in rows])
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
        hs = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        return torch.stack([hs[layer].mean(dim=1).mean(dim=0) for layer in range(LAYERS)])

    gates = compute_gates(recipe_for(pico_llama, "hidden_avg"), pico_llama, device="cpu")
    torch.testing.assert_close(gates.vectors, expected_rows(set_state), atol=1e-4, rtol=0)
    hidden = compute_gates(recipe_for(pico_llama, "hidden"), pico_llama, device="cpu")
    assert (gates.vectors - hidden.vectors).abs().max() > 0.05


def test_cheap_embed_sums_token_embeddings(pico_llama, pico):
    _, tok = pico
    embed = load_file(pico_llama / "model.safetensors")["model.embed_tokens.weight"]

    def set_state(prompts):
        total = sum(embed[i] for p in prompts for i in ids_alone(tok, p))
        return unit(total).expand(LAYERS, -1)

    gates = compute_gates(recipe_for(pico_llama, "cheap_embed"), pico_llama, device="cpu")
    torch.testing.assert_close(gates.vectors, expected_rows(set_state), atol=1e-5, rtol=0)
    assert torch.equal(gates.vectors[0], gates.vectors[-1])  # same row on every layer


@torch.no_grad()
def test_router_input_is_the_post_attention_norm_output(pico_llama, pico):
    model, tok = pico

    def set_state(prompts):
        seen: list[torch.Tensor] = []
        norms = [layer.post_attention_layernorm for layer in model.model.layers]
        handles = [n.register_forward_hook(lambda m, a, out: seen.append(out[0, -1])) for n in norms]
        try:
            for p in prompts:
                model(torch.tensor([ids_alone(tok, p)]))
        finally:
            for h in handles:
                h.remove()
        return torch.stack(seen).view(len(prompts), LAYERS, HIDDEN).mean(0)

    gates = compute_gates(recipe_for(pico_llama, "router_input"), pico_llama, device="cpu")
    torch.testing.assert_close(gates.vectors, expected_rows(set_state), atol=1e-4, rtol=0)
    hidden = compute_gates(recipe_for(pico_llama, "hidden"), pico_llama, device="cpu")
    assert (gates.vectors - hidden.vectors).abs().max() > 0.05  # a different state, not an alias


def test_prompts_are_left_padded_with_bos_first(pico_tokenizer):
    tok = pico_tokenizer
    batch = tokenize_prompts(tok, ["Hello! How are you doing today?", "Hi", ""])
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert ids.shape == mask.shape and ids.shape[0] == 3
    for row, m, prompt in zip(ids.tolist(), mask.tolist(), ["Hello! How are you doing today?", "Hi", ""],
                              strict=True):
        real = ids_alone(tok, prompt)
        pad = len(row) - len(real)
        assert row[pad:] == real  # BOS first, then the prompt, flush right
        assert row[:pad] == [tok.bos_token_id] * pad and m == [0] * pad + [1] * len(real)


@torch.no_grad()
def test_padded_batch_gives_each_prompts_own_last_state(pico, pico_tokenizer):
    model, tok = pico
    prompts = ["Once upon a time a dragon guarded a silver castle.", "Thanks", "Solve 2x + 3 = 7"]
    batch = tokenize_prompts(tok, prompts)
    out = model(**batch, output_hidden_states=True)
    for i, p in enumerate(prompts):
        alone = model(torch.tensor([ids_alone(tok, p)]), output_hidden_states=True).hidden_states
        for layer in range(LAYERS + 1):
            got, want = out.hidden_states[layer][i, -1], alone[layer][0, -1]
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    # The mean the gates use is the mean of those per-prompt states.
    want = torch.stack([torch.stack(out.hidden_states[:LAYERS])[:, i, -1] for i in range(3)]).mean(0)
    torch.testing.assert_close(prompt_states(out.hidden_states, batch["attention_mask"], average=False), want)


def test_right_padded_batch_is_refused():
    states = torch.zeros(2, 2, 3, 4)
    with pytest.raises(ValueError, match="left-padded"):
        reduce_states(states, torch.tensor([[1, 1, 1], [1, 1, 0]]), average=False)


def test_tokenizer_without_bos_adds_no_bos_and_pads_with_eos(pico_tokenizer):
    tok = copy.deepcopy(pico_tokenizer)
    tok.bos_token = None
    batch = tokenize_prompts(tok, ["Hello! How are you", "Hi"])
    assert tok.bos_token_id is None and tok.eos_token_id is not None
    assert batch["input_ids"][1].tolist()[-1] == tok("Hi", add_special_tokens=False).input_ids[-1]
    assert batch["input_ids"][1, 0].item() == tok.eos_token_id and batch["attention_mask"][1, 0] == 0
    assert pico_tokenizer.bos_token_id not in batch["input_ids"][0].tolist()
    with pytest.raises(GateError, match=r"prompts\[0\] is empty"):
        tokenize_prompts(tok, [""])


def test_gate_rows_subtracts_then_normalises():
    pos, neg = [torch.tensor([3.0, 4.0]), torch.tensor([1.0, 0.0])], [None, torch.tensor([1.0, 0.0])]
    torch.testing.assert_close(combine_rows(pos, [None, None], center=False),
                               torch.tensor([[0.6, 0.8], [1.0, 0.0]]))
    # The second row cancels to zero: the 1e-8 floor keeps it finite instead of NaN.
    torch.testing.assert_close(combine_rows(pos, neg, center=False), torch.tensor([[0.6, 0.8], [0.0, 0.0]]))


def test_centred_rows_lose_the_direction_every_expert_shares():
    # Mostly the common direction (10, 0): plain rows nearly agree; centred, what tells them apart stays.
    pos = [torch.tensor([10.0, 1.0]), torch.tensor([10.0, -1.0]), torch.tensor([2.0, 0.0])]
    neg = [None, None, torch.tensor([12.0, 0.0])]
    plain = combine_rows(pos, neg, center=False)
    assert float(plain[0] @ plain[1]) > 0.97 and float(plain[0] @ plain[2]) < -0.97
    # An expert without negatives is measured from the mean positive state; one with them, as before.
    mean = torch.stack(pos).mean(0)
    torch.testing.assert_close(combine_rows(pos, neg, center=True),
                               torch.stack([(pos[0] - mean) / (pos[0] - mean).norm(),
                                            (pos[1] - mean) / (pos[1] - mean).norm(), plain[2]]))


@pytest.mark.parametrize("mode", ["random", "uniform_random"])
def test_random_modes_are_seeded_and_ignore_prompts(pico_llama, mode):
    sets = [(None, None)] * 4
    first = compute_gates(recipe_for(pico_llama, mode, sets), pico_llama, seed=7)
    again = compute_gates(recipe_for(pico_llama, mode, sets), pico_llama, seed=7)
    other = compute_gates(recipe_for(pico_llama, mode, sets), pico_llama, seed=8)
    assert first.vectors.shape == (LAYERS, 4, HIDDEN)
    assert torch.equal(first.vectors, again.vectors)
    assert not torch.allclose(first.vectors, other.vectors)
    bound = 1 / math.sqrt(HIDDEN)
    if mode == "uniform_random":
        assert first.vectors.abs().max() <= bound and first.vectors.abs().max() > 0.95 * bound
    else:  # standard normal, not normalised: row norms near sqrt(H), std near 1
        assert abs(first.vectors.std().item() - 1) < 0.1
        assert first.vectors.norm(dim=-1).mean() > 6


@pytest.mark.parametrize("seed", [-1, 2**63, 1.5, True])
def test_a_seed_random_gates_cannot_use_is_refused_by_name(pico_llama, seed):
    with pytest.raises(GateError, match=rf"seed {seed!r} is not a whole number from 0 to 2\*\*63 - 1"):
        compute_gates(recipe_for(pico_llama, "random", [(None, None)] * 2), pico_llama, seed=seed)


@pytest.mark.parametrize(("code", "dtype"), [("BF16", torch.bfloat16), ("F16", torch.float16),
                                             ("F32", torch.float32)])
def test_router_rows_are_cast_exactly_as_torch_casts(code, dtype):
    # Ties at every rounding bit, subnormals, signed zeros and values that overflow half.
    bits = torch.tensor([0x3F808000, 0x3F818000, 0x3F807FFF, 0x3F808001, 0x00000001, 0x80000000,
                         0x7F7FFFFF, 0xFF7FFFFF, 0x477FF000, 0x38000000, 0x33800000], dtype=torch.int64)
    edges = bits.to(torch.int32).view(torch.float32)
    values = torch.cat([edges, torch.randn(4096, generator=torch.Generator().manual_seed(0)) * 3])
    expected = values.to(dtype).view(torch.uint8).numpy().tobytes()
    assert cast(values.numpy(), code) == expected


def test_diagnose_identical_rows_warn():
    row = torch.randn(HIDDEN, generator=torch.Generator().manual_seed(0))
    diag = diagnose(row.expand(2, 3, HIDDEN).clone())
    assert all(c > 1e6 for c in diag.condition_numbers)
    assert [w.split(":")[0] for w in diag.warnings] == ["layer 0", "layer 1"]
    assert "prompts too similar" in diag.warnings[0]
    torch.testing.assert_close(torch.tensor(diag.cosine), torch.ones(2, 3, 3))
    json.dumps(diag.to_dict(), allow_nan=False)


def test_diagnose_orthogonal_rows_are_perfect():
    vectors = torch.eye(4, HIDDEN).expand(3, 4, HIDDEN) * 2.5
    diag = diagnose(vectors)
    assert diag.condition_numbers == pytest.approx([1.0] * 3)
    assert diag.warnings == []
    torch.testing.assert_close(torch.tensor(diag.cosine), torch.eye(4).expand(3, 4, 4))
    torch.testing.assert_close(torch.tensor(diag.mean_cosine), torch.eye(4))
    assert json.loads(json.dumps(diag.to_dict()))["condition_numbers"] == pytest.approx([1.0] * 3)


def test_diagnose_single_expert_and_zero_rows():
    assert diagnose(torch.randn(2, 1, 8)).condition_numbers == [1.0, 1.0]
    diag = diagnose(torch.zeros(1, 2, 8))  # singular: infinite, and still valid JSON
    assert diag.condition_numbers == [math.inf] and diag.warnings
    assert json.loads(json.dumps(diag.to_dict(), allow_nan=False))["condition_numbers"] == [None]


def test_token_cap_names_expert_and_prompt_before_loading(tmp_path, pico_tokenizer):
    long = " x" * (MAX_PROMPT_TOKENS + 10)
    recipe = recipe_for(tmp_path, "hidden", [(["code"], None), (["math", long], None)])
    # tmp_path holds no model: the error must come from the prompts, before any load.
    with pytest.raises(GateError, match=r"experts\[1\]\.positive_prompts\[1\] is \d+ tokens.*cap is 512"):
        compute_gates(recipe, tmp_path, tokenizer=pico_tokenizer)


def test_missing_positive_prompts_is_an_error(pico_llama, pico_tokenizer):
    recipe = recipe_for(pico_llama, "hidden", [(["code"], None), (None, ["math"])])
    with pytest.raises(GateError, match=r"experts\[1\]\.positive_prompts is empty"):
        compute_gates(recipe, pico_llama, tokenizer=pico_tokenizer)


def test_one_progress_event_per_prompt_set(pico_llama):
    events = []
    compute_gates(recipe_for(pico_llama, "hidden"), pico_llama, device="cpu", on_progress=events.append)
    # What runs before the first set is done, then one event per set.
    assert [e.message for e in events[:2]] == ["loading the base model",
                                               "running 5 prompt sets through the base model"]
    sets = events[2:]
    assert len(sets) == 5  # 3 positive sets + 2 negative sets
    fractions = [e.fraction for e in events]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0 and len({e.fraction for e in sets}) == 5
    assert {e.stage for e in events} == {"gates"} and "expert 3/3" in events[-1].message


def no_norm_hooks(model) -> bool:
    # Only ours: transformers 5 keeps output-capture hooks of its own on the layers.
    return all(not layer.post_attention_layernorm._forward_hooks for layer in model.model.layers)


def test_cancel_stops_between_prompt_sets(pico_llama, pico):
    model, tok = pico
    token, events = CancelToken(), []

    def cancel_after_first(event):
        events.append(event)
        token.cancel()

    with pytest.raises(Cancelled):
        compute_gates(recipe_for(pico_llama, "router_input"), pico_llama, on_progress=cancel_after_first,
                      cancel=token, model=model, tokenizer=tok)
    assert len(events) == 1
    assert no_norm_hooks(model)


def test_passed_model_is_used_and_left_intact(pico_llama, pico):
    model, tok = pico
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for mode in ("hidden", "router_input", "cheap_embed"):
        loaded = compute_gates(recipe_for(pico_llama, mode), pico_llama, device="cpu")
        shared = compute_gates(recipe_for(pico_llama, mode), pico_llama, model=model, tokenizer=tok)
        torch.testing.assert_close(shared.vectors, loaded.vectors)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert no_norm_hooks(model)
    assert tok.padding_side == AutoTokenizer.from_pretrained(pico_llama).padding_side  # not mutated


def test_bfloat16_model_gives_float32_gates_close_to_float32(pico_llama, pico_tokenizer):
    # What a GPU run computes in (pick_device: bf16 on CUDA), checked on the CPU.
    model = AutoModelForCausalLM.from_pretrained(pico_llama, dtype=torch.bfloat16, use_safetensors=True)
    for mode in ("hidden", "router_input"):
        recipe = recipe_for(pico_llama, mode)
        low = compute_gates(recipe, pico_llama, model=model, tokenizer=pico_tokenizer)
        full = compute_gates(recipe, pico_llama, device="cpu")
        assert low.vectors.dtype == torch.float32 and low.vectors.device.type == "cpu"
        assert (unit(low.vectors) * full.vectors).sum(-1).min() > 0.99  # same directions, bf16 rounding


def test_random_mode_without_config_names_the_folder(tmp_path):
    with pytest.raises(GateError, match="config.json"):
        compute_gates(recipe_for(tmp_path, "random", [(None, None)] * 2), tmp_path)


def test_pick_device(monkeypatch):
    assert pick_device("cpu") == (torch.device("cpu"), torch.float32)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert pick_device("auto") == (torch.device("cpu"), torch.float32)
    with pytest.raises(WorkbenchError, match="no CUDA GPU"):
        pick_device("cuda")
    with pytest.raises(WorkbenchError, match="unknown device 'tpu'"):
        pick_device("tpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert pick_device("auto") == (torch.device("cuda", 0), torch.bfloat16)
    with pytest.raises(WorkbenchError, match="cuda:3"):
        pick_device("cuda:3")


DEMO_SETS = [
    (["def add(a, b):\n    return a + b", "import numpy as np", "for i in range(10):"], None),
    (["What is the integral of x squared?", "Solve 2x + 3 = 7 for x.", "Prove that 17 is prime."], None),
    (["Once upon a time, a dragon guarded a silver castle.", "Write a poem about the sea."], None),
    (["Hello! How are you today?", "Thanks, see you tomorrow!", "Good morning, friend."], None),
]


@pytest.mark.demo
def test_demo_model_gates_separate_clearly_different_experts(demo_model_path):
    recipe = recipe_for("demo:smollm2-135m-instruct", "hidden", DEMO_SETS)
    gates = compute_gates(recipe, demo_model_path, device="cpu")
    assert gates.vectors.shape == (30, 4, 576)
    torch.testing.assert_close(gates.vectors.norm(dim=-1), torch.ones(30, 4), atol=1e-5, rtol=0)
    off_diagonal = torch.tensor(gates.diagnostics.cosine)[:, ~torch.eye(4, dtype=torch.bool)]  # (L, E*E-E)
    assert off_diagonal.max() < 0.999
    assert len(gates.diagnostics.condition_numbers) == 30


STATE_MODES = ("hidden", "hidden_avg", "router_input")


def stream_recipe(base, mode: str) -> Recipe:
    return Recipe.model_validate({"base_model": str(base), "gate_mode": mode, "experts": [
        {"source_model": str(base), "positive_prompts": ["def f(x):", "import os"],
         "negative_prompts": ["Once"]},
        {"source_model": str(base), "positive_prompts": ["Hello there"]},
    ]})


def leaves(model) -> list[torch.nn.Module]:
    """Every module that owns parameters itself."""
    return [m for m in model.modules() if next(m.parameters(recurse=False), None) is not None]


@pytest.mark.parametrize(("family", "tie", "dtype"), [
    ("llama", False, torch.float32), ("llama", True, torch.bfloat16), ("mistral", False, torch.bfloat16),
])
def test_large_base_streams_leaves_from_disk_with_the_same_gates(pico_factory, monkeypatch, family, tie,
                                                                  dtype):
    # Past STREAM_ABOVE_BYTES each leaf module's weights are read from safetensors as it runs,
    # so memory stays at one leaf whatever the model size; the gates must not change.
    base = pico_factory("stream", family=family, tie=tie, dtype=dtype)
    loaded = base_forward.load_base(base, "cpu")
    assert loaded.model.layers[0].mlp.up_proj.weight.device.type == "cpu"
    expected = {mode: compute_gates(stream_recipe(base, mode), base, device="cpu").vectors
                for mode in STATE_MODES}
    monkeypatch.setattr(base_forward, "STREAM_ABOVE_BYTES", 0)
    streamed = base_forward.load_base(base, "cpu")
    assert {p.device.type for p in streamed.parameters()} == {"meta"} and not streamed.training
    for mode in STATE_MODES:
        got = compute_gates(stream_recipe(base, mode), base, device="cpu").vectors
        torch.testing.assert_close(got, expected[mode], atol=1e-6, rtol=0, msg=mode)


def test_a_linear_too_big_to_hold_is_applied_a_block_of_rows_at_a_time(pico_factory, monkeypatch):
    # A 70B MLP matrix is 0.9 GB in float32: past BLOCK_BYTES a Linear reads and applies its
    # weight a block of output rows at a time and never holds it whole; same gates.
    base = pico_factory("stream")
    expected = {mode: compute_gates(stream_recipe(base, mode), base, device="cpu").vectors
                for mode in STATE_MODES}
    monkeypatch.setattr(base_forward, "STREAM_ABOVE_BYTES", 0)
    monkeypatch.setattr(lazy_weights, "BLOCK_BYTES", 4096)  # a few rows of the pico MLP (64 x 4 bytes each)
    largest = []  # the largest block each blocked Linear read
    real_read = lazy_weights._Reader.read_into

    def read_into(self, info, out, first_element=0):
        if info.name.endswith("mlp.up_proj.weight"):
            largest.append(out.numel() * out.element_size())
        return real_read(self, info, out, first_element)

    monkeypatch.setattr(lazy_weights._Reader, "read_into", read_into)
    for mode in STATE_MODES:
        got = compute_gates(stream_recipe(base, mode), base, device="cpu").vectors
        torch.testing.assert_close(got, expected[mode], atol=1e-5, rtol=0, msg=mode)
    assert largest and max(largest) <= 4096  # up_proj is (I, H) = several blocks, never one read


def test_streamed_forward_holds_one_leaf_and_only_the_embedding_rows_it_needs(pico_factory, pico_tokenizer,
                                                                                 monkeypatch):
    base = pico_factory("stream", tie=True)
    monkeypatch.setattr(base_forward, "STREAM_ABOVE_BYTES", 0)
    model = base_forward.load_base(base, "cpu")
    embed, vocab = model.get_input_embeddings(), model.config.vocab_size
    calls = []  # (leaf, materialised parameters of the whole model, its own, embedding rows or None)

    def check(module, args):  # registered after the streaming hooks: the leaf's weights are in
        real = {id(p) for p in model.parameters() if p.device.type != "meta"}
        own = {id(p) for p in module.parameters(recurse=False)}
        rows = (module.weight.shape[0], args[0].unique().numel()) if module is embed else None
        calls.append((module, real, own, rows))

    for leaf in leaves(model):
        leaf.register_forward_pre_hook(check)
    for mode in STATE_MODES:
        compute_gates(stream_recipe(base, mode), base, model=model, tokenizer=pico_tokenizer)
    assert {id(m) for m, *_ in calls} >= {id(model.model.layers[0].mlp.down_proj), id(embed)}
    for module, real, own, _ in calls:
        assert real == own and own, module
    embed_rows = [rows for *_, rows in calls if rows is not None]
    assert embed_rows and all(table == used < vocab for table, used in embed_rows)  # rows only, never V
    assert {p.device.type for p in model.parameters()} == {"meta"}  # all released after the forwards


@pytest.mark.parametrize("mode", STATE_MODES)
def test_gate_forwards_stop_before_the_last_layer_finishes(pico_llama, pico, mode):
    model, tok = pico
    last = model.model.layers[-1]
    # router_input needs the last layer's attention (its norm's input); the other modes stop before it.
    watched = [last.mlp, model.model.norm, model.lm_head]
    if mode != "router_input":
        watched.append(last.self_attn)
    fired: list[torch.nn.Module] = []
    handles = [m.register_forward_hook(lambda m, args, out: fired.append(m)) for m in watched]
    try:
        with torch.no_grad():
            model(torch.tensor([ids_alone(tok, "Hello")]))
        assert len(fired) == len(watched)  # the hooks do see a full forward
        fired.clear()
        gates = compute_gates(recipe_for(pico_llama, mode), pico_llama, model=model, tokenizer=tok)
    finally:
        for handle in handles:
            handle.remove()
    assert fired == []
    assert all(not layer._forward_pre_hooks for layer in model.model.layers) and no_norm_hooks(model)
    if mode == "hidden":
        want = expected_rows(lambda prompts: last_states_alone(model, tok, prompts))
        torch.testing.assert_close(gates.vectors, want, atol=1e-4, rtol=0)
    assert gates.vectors.shape == (LAYERS, len(SETS), HIDDEN)


def test_checkpoint_with_other_tensor_names_loads_whole(pico_factory, monkeypatch, caplog, tmp_path):
    renamed = tmp_path / "renamed"
    shutil.copytree(pico_factory("stream"), renamed)
    tensors = load_file(renamed / "model.safetensors")
    tensors["model.norm.scale"] = tensors.pop("model.norm.weight")
    save_file(tensors, renamed / "model.safetensors", metadata={"format": "pt"})
    monkeypatch.setattr(base_forward, "STREAM_ABOVE_BYTES", 0)
    with caplog.at_level(logging.INFO, logger="workbench.gates.forward"):
        model = base_forward.load_base(renamed, "cpu")
    assert model.model.layers[0].mlp.up_proj.weight.device.type == "cpu"
    assert "'model.norm.weight'" in caplog.text and "loading it whole" in caplog.text


def test_streamed_embedding_keeps_working_with_a_pad_id_past_the_rows_read(pico_factory, monkeypatch,
                                                                           tmp_path):
    # F.embedding checks padding_idx against the table it gets: a compact table of the batch's
    # rows is far shorter than a pad id near the end of the vocabulary (Qwen's, say).
    base = tmp_path / "high-pad"
    shutil.copytree(pico_factory("stream"), base)
    config = json.loads((base / "config.json").read_text())
    config["pad_token_id"] = config["vocab_size"] - 1
    (base / "config.json").write_text(json.dumps(config))
    expected = compute_gates(stream_recipe(base, "hidden"), base, device="cpu").vectors
    monkeypatch.setattr(base_forward, "STREAM_ABOVE_BYTES", 0)
    model = base_forward.load_base(base, "cpu")
    assert model.get_input_embeddings().padding_idx == config["vocab_size"] - 1
    got = compute_gates(stream_recipe(base, "hidden"), base, model=model,
                        tokenizer=AutoTokenizer.from_pretrained(base)).vectors
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    assert model.get_input_embeddings().padding_idx == config["vocab_size"] - 1  # put back after the forward


def test_a_leaf_output_that_views_its_streamed_weights_survives_the_next_leaf(pico_factory, pico_tokenizer,
                                                                              monkeypatch):
    # Streamed leaves reuse one block of memory for their weights; an output that is a view of
    # them (not a copy) must keep its values when the next leaf is read. Layer 1: by then the
    # block has grown to an MLP matrix, so the next leaf would land on the norm's weights.
    base = pico_factory("stream")
    monkeypatch.setattr(base_forward, "STREAM_ABOVE_BYTES", 0)
    whole = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    models = [whole, base_forward.load_base(base, "cpu")]
    for model in models:
        norm = model.model.layers[1].input_layernorm
        norm.forward = lambda h, norm=norm: norm.weight.expand_as(h)
    want, got = (compute_gates(stream_recipe(base, "hidden"), base, model=m, tokenizer=pico_tokenizer).vectors
                 for m in models)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
