"""Fitted gates and the held-out routing score: what they promise on designed cases and a pico base."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from workbench.gates.bank import PromptBank, PromptStates, collect
from workbench.gates.compute import compute_gates, diagnose
from workbench.gates.fit import fit_router
from workbench.gates.score import bank_gates, compare_modes, folds, heldout_score
from workbench.recipe import Expert, Recipe

LAYERS, HIDDEN = 2, 16


def themed_bank(themes: list[torch.Tensor], *, prompts: int = 4, tokens: int = 6, common: float = 30.0,
                negatives: dict[int, torch.Tensor] | None = None, seed: int = 0,
                texts: list[list[str]] | None = None) -> PromptBank:
    """A bank whose tokens are a large direction shared by all text, plus their theme's own
    direction, plus noise: the shape of real prompt states (docs/recipe.md, "Why mergekit's gates...")."""
    gen = torch.Generator().manual_seed(seed)
    shared = torch.zeros(HIDDEN)
    shared[0] = common
    bank = PromptBank(len(themes), LAYERS, HIDDEN)

    def states(e: int, kind: str, j: int, direction: torch.Tensor, text: str) -> PromptStates:
        noise = 0.5 * torch.randn(LAYERS, tokens, HIDDEN, generator=gen)
        noise[..., 0] = 0  # the shared direction is the same in every text
        x = shared + direction + noise
        return PromptStates(e, kind, j, text, x[:, -1], x[:, -1], x, x[0].sum(0))

    for e, theme in enumerate(themes):
        for j in range(prompts):
            text = texts[e][j] if texts else f"expert {e} prompt {j}"
            bank.prompts.append(states(e, "positive", j, theme, text))
        if negatives and e in negatives:
            bank.prompts.append(states(e, "negative", 0, negatives[e], f"expert {e} negative"))
    return bank


def recipe_of(experts: int, k: int = 1, mode: str = "fitted") -> Recipe:
    return Recipe(base_model="b", gate_mode=mode, experts_per_token=k,
                  experts=[Expert(source_model="b", positive_prompts=[f"p{e}"]) for e in range(experts)])


def unit(i: int, scale: float = 2.0) -> torch.Tensor:
    v = torch.zeros(HIDDEN)
    v[i] = scale
    return v


def test_fitted_gates_separate_themes_the_mean_method_confuses():
    # Experts 0 and 2 have negatives (their rows lose the shared direction and never win), 1 and 3 do not.
    themes = [unit(1), unit(2), unit(3), unit(4)]
    bank = themed_bank(themes, negatives={0: unit(5), 2: unit(6)})
    recipe = recipe_of(4)
    mean = heldout_score(recipe, bank, mode="hidden", center=False)
    fitted = heldout_score(recipe, bank, mode="fitted")
    assert mean.per_expert_top1[0] < 0.1 and mean.per_expert_top1[2] < 0.1  # never chosen: the demo
    assert mean.top1 < 0.55
    assert fitted.top1 > 0.9 and all(rate > 0.8 for rate in fitted.per_expert_top1)
    centred = heldout_score(recipe, bank, mode="hidden", center=True)
    assert centred.top1 > mean.top1 + 0.3  # the one-switch fix of mergekit's modes


def test_identical_prompt_sets_score_exactly_chance():
    same = themed_bank([unit(1)] * 4, seed=3)
    for e in range(4):  # every expert gets the very same states
        for j, p in enumerate(same.of(e, "positive")):
            p.tokens = same.of(0, "positive")[j].tokens
    for mode in ("hidden", "fitted"):
        score = heldout_score(recipe_of(4, k=2), same, mode=mode)
        assert score.top1 == pytest.approx(0.25) and score.topk == pytest.approx(0.5)
        assert (score.chance_top1, score.chance_topk) == (0.25, 0.5)


def test_a_prompt_the_gates_were_fitted_on_is_never_scored_as_held_out():
    # Noise tokens with no theme: fitted gates memorise what they saw and know nothing else.
    texts = [[f"e{e} p{j}" for j in range(4)] for e in range(2)]
    texts[1][3] = texts[1][2]  # planted: one text twice among expert 1's prompts
    bank = themed_bank([torch.zeros(HIDDEN)] * 2, common=0.0, texts=texts, tokens=2)
    for p in bank.prompts:
        if p.text == texts[1][2]:
            p.tokens = bank.of(1, "positive")[2].tokens  # the same text has the same states
    recipe = recipe_of(2)
    everything = bank_gates("fitted", False, bank)
    seen = PromptBank(2, LAYERS, HIDDEN, [PromptStates(p.expert, "probe", 0, "probe copy", p.last, p.last,
                                                      p.tokens, p.embed_sum) for p in bank.prompts])
    in_sample = heldout_score(recipe, seen, full=everything)
    assert in_sample.top1 > 0.95  # scored on its own training tokens, any router looks perfect
    held = heldout_score(recipe, bank)
    assert held.top1 < 0.8
    assert held.tokens == [4 * 2, 2 * 2]  # expert 1's duplicated prompt counted in neither of its folds
    # A probe that is one of the positive prompts is not held out either.
    bank.prompts.append(PromptStates(0, "probe", 0, texts[0][0], *(bank.of(0, "positive")[0].last,) * 2,
                                     bank.of(0, "positive")[0].tokens, torch.zeros(HIDDEN)))
    assert heldout_score(recipe, bank).tokens == held.tokens


def test_folds_hold_out_each_prompt_once_and_spare_single_prompt_experts():
    bank = themed_bank([unit(1), unit(2)], prompts=3)
    bank.prompts = [p for p in bank.prompts if not (p.expert == 1 and p.index > 0)]
    split = folds(bank)
    assert sorted(pair for fold in split for pair in fold) == [(0, 0), (0, 1), (0, 2)]
    score = heldout_score(recipe_of(2), bank)
    assert score.per_expert_top1[1] is None and score.tokens[1] == 0


def test_fit_is_deterministic_and_confident_where_the_data_separate():
    bank = themed_bank([unit(1, 4.0), unit(2, 4.0)], common=5.0)
    pos = [torch.cat([p.tokens for p in bank.of(e, "positive")], 1) for e in range(2)]
    first, again = fit_router(pos, [None, None]), fit_router(pos, [None, None])
    assert torch.equal(first, again)
    probs = torch.softmax(torch.bmm(pos[0], first.transpose(1, 2)), -1)  # (L, T, E)
    assert float(probs[..., 0].mean()) > 0.9  # not the flat softmax of unit rows


def test_fit_is_the_same_whatever_threads_the_process_has():
    """Two threads against one moved the demo's fitted weights by ~1e-3: a recipe's routers
    swapped in on the server would then not be the ones its build (another process) wrote."""
    generator = torch.Generator().manual_seed(3)
    # The demo's shapes (30 layers, hidden 576): big enough for torch to split the sums.
    pos = [torch.randn(30, 50, 576, generator=generator) + shift for shift in (0.3, -0.2, 0.1, 0.0)]
    neg = [torch.randn(30, 10, 576, generator=generator), None, None, None]
    before = torch.get_num_threads()
    try:
        got = []
        for threads in (1, 2, 4):
            torch.set_num_threads(threads)
            got.append(fit_router(pos, neg))
            assert torch.get_num_threads() == threads  # the caller's setting is back
    finally:
        torch.set_num_threads(before)
    assert torch.equal(got[0], got[1]) and torch.equal(got[0], got[2])


@pytest.fixture(scope="module")
def pico(pico_llama):
    model = AutoModelForCausalLM.from_pretrained(pico_llama, dtype=torch.float32, use_safetensors=True)
    return pico_llama, model.eval(), AutoTokenizer.from_pretrained(pico_llama)


PICO_SETS = [(["def f(x): return x", "import os"], ["Once upon a time"]),
             (["2 + 2 = 4", "x^2 - 1 = 0", "17% of 240"], None),
             (["A dragon slept", "The sea at night"], None)]


def pico_recipe(base, mode: str, **extra) -> Recipe:
    experts = [Expert(source_model=str(base), positive_prompts=p, negative_prompts=n) for p, n in PICO_SETS]
    return Recipe(base_model=str(base), experts=experts, gate_mode=mode, **extra)


def test_bank_rows_equal_the_gates_a_build_computes(pico):
    base, model, tok = pico
    bank = collect(model, tok, pico_recipe(base, "hidden"))
    for mode in ("hidden", "router_input", "cheap_embed"):
        for center in (False, True):
            recipe = pico_recipe(base, mode, center_gates=center)
            built = compute_gates(recipe, base, model=model, tokenizer=tok)
            torch.testing.assert_close(bank_gates(mode, center, bank), built.vectors, atol=2e-5, rtol=1e-4)


def test_fitted_mode_builds_the_same_router_twice(pico):
    base, model, tok = pico
    recipe = pico_recipe(base, "fitted")
    first = compute_gates(recipe, base, model=model, tokenizer=tok)
    assert first.vectors.shape == (model.config.num_hidden_layers, 3, model.config.hidden_size)
    assert torch.equal(first.vectors, compute_gates(recipe, base, model=model, tokenizer=tok).vectors)
    assert torch.isfinite(first.vectors).all() and first.vectors.abs().sum() > 0


def test_compare_scores_every_mode_with_random_last(pico):
    base, model, tok = pico
    results = compare_modes(pico_recipe(base, "hidden"), base, model=model, tokenizer=tok)
    labels = [r.label for r in results]
    assert len(labels) == 10 and labels[-1] == "random" and "hidden centred" in labels and "fitted" in labels
    assert all(r.seconds >= 0 and r.score.top1 is not None for r in results)
    top = [r.score.top1 for r in results[:-1]]
    assert top == sorted(top, reverse=True)


def test_rows_that_sum_to_zero_are_not_called_singular():
    # Fitted and centred rows sum to zero, so they span E - 1 directions: mergekit's number is
    # infinite for them although they route perfectly; the shift-invariant one is not.
    rows = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [-1.0, -1.0, 0.0]]])
    assert diagnose(rows).condition_numbers[0] > 1e6
    assert diagnose(rows, shift_invariant=True).condition_numbers[0] == pytest.approx(3 ** 0.5)
    assert diagnose(rows, shift_invariant=True).warnings == []


def test_fitted_gates_carry_no_singular_warnings(pico):
    base, model, tok = pico
    gates = compute_gates(pico_recipe(base, "fitted"), base, model=model, tokenizer=tok)
    assert all(c < 1e3 for c in gates.diagnostics.condition_numbers)


def test_a_fitted_build_runs_its_prompts_through_the_base_once(pico, monkeypatch):
    from workbench.gates import bank as bank_module
    from workbench.gates import score as score_module

    base, model, tok = pico
    recipe = pico_recipe(base, "fitted")
    calls = []
    real = bank_module.collect
    monkeypatch.setattr(score_module, "collect", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(bank_module, "collect", lambda *a, **k: calls.append(1) or real(*a, **k))
    gates = score_module.scored_gates(recipe, base, device="cpu")
    assert len(calls) == 1 and gates.score is not None and gates.score.mode == "fitted"
    torch.testing.assert_close(gates.vectors, compute_gates(recipe, base, model=model, tokenizer=tok).vectors,
                               atol=1e-4, rtol=1e-3)
