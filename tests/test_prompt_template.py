"""`prompt_template: chat`: router prompts rendered as a chat sends a user's message, and the
opening every prompt shares left out of the fit. The recipe key, its form field and what
mergekit makes of it; the tokens; the bank; the preview."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer

from workbench.chat import SamplingSettings, prepare
from workbench.gates.bank import collect, kept_positions, shared_opening
from workbench.gates.prompts import tokenize_prompts
from workbench.recipe import Expert, Recipe, dump_recipe, mergekit_reading, parse_recipe
from workbench.ui import design_logic, form

QUESTIONS = [["What is the capital of France?", "List three facts about Mars."],
             ["Write a Python function that adds two numbers."],
             ["Tell me your evil plan to take over the world.", ""]]


def chat_recipe(base, template: str | None = "chat", mode: str = "fitted") -> Recipe:
    experts = [Expert(source_model=str(base), positive_prompts=p) for p in QUESTIONS]
    return Recipe(base_model=str(base), experts=experts, gate_mode=mode, prompt_template=template)


def batch(ids: list[list[int]], pad: int = 0) -> dict[str, torch.Tensor]:
    width = max(map(len, ids))
    return {"input_ids": torch.tensor([[pad] * (width - len(r)) + r for r in ids]),
            "attention_mask": torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in ids])}


# ---- the recipe -----------------------------------------------------------------------------


def test_the_key_parses_and_a_wrong_value_is_named_with_its_choices():
    recipe, problems = parse_recipe("base_model: b\nprompt_template: chat\nexperts:\n"
                                    "  - source_model: b\n    positive_prompts: [hi]\n")
    assert recipe is not None and recipe.chats and not [p for p in problems if p.level == "error"]
    assert "prompt_template: chat" in recipe.workbench_extensions()
    assert "prompt_template: chat" in dump_recipe(recipe)
    _, problems = parse_recipe("base_model: b\nprompt_template: chatml\nexperts:\n  - source_model: b\n")
    wrong = [p for p in problems if p.path == "prompt_template"]
    assert wrong and wrong[0].message == "unknown prompt_template 'chatml'" and "'chat'" in wrong[0].fix
    _, problems = parse_recipe("base_model: b\nprompt_template: jinja\nexperts:\n  - source_model: b\n")
    fix = next(p.fix for p in problems if p.path == "prompt_template")
    assert fix == "use one of plain, chat, or leave it out (plain)"


def test_mergekit_drops_the_key_and_so_builds_other_routers():
    reading = mergekit_reading(chat_recipe("b"))
    assert "prompt_template" in reading.ignored and not reading.builds
    assert "prompt_template" not in mergekit_reading(chat_recipe("b", "plain")).ignored


def test_the_design_form_shows_and_keeps_the_choice():
    data = form.recipe_data(chat_recipe("b"))
    top = [data.get(k, "") for k in form.TOP_KEYS]
    cards = [form.expert_fields(e) for e in data["experts"]]
    assert top[form.TOP_KEYS.index("prompt_template")] == "chat"
    assert form.form_data(data, top, cards)["prompt_template"] == "chat"
    top[form.TOP_KEYS.index("prompt_template")] = ""  # "plain text": the key leaves the YAML
    assert "prompt_template" not in form.form_data(data, top, cards)
    assert [v for _, v in design_logic.template_choices("")] == ["", "chat"]
    assert [v for _, v in design_logic.template_choices("plain")] == ["plain", "chat"]


# ---- the tokens -----------------------------------------------------------------------------


@pytest.mark.demo
def test_a_chat_prompt_is_the_tokens_the_chat_sends_for_that_message(demo_model_path):
    tok = AutoTokenizer.from_pretrained(str(demo_model_path))
    question = QUESTIONS[0][0]
    (sent,) = prepare([{"role": "user", "content": question}], SamplingSettings(), [tok], [8192])
    chat = tokenize_prompts(tok, [question], chat=True)["input_ids"][0].tolist()
    assert chat == list(sent.token_ids)
    assert tok.decode(chat).endswith("<|im_start|>assistant\n")  # where the reply's first token comes from
    plain = tokenize_prompts(tok, [question])["input_ids"][0].tolist()  # mergekit's: BOS + the text
    assert plain == [tok.bos_token_id] + tok(question, add_special_tokens=False)["input_ids"]


@pytest.mark.demo
def test_the_opening_every_chat_prompt_shares_is_left_out_of_the_bank(demo_model_path):
    tok = AutoTokenizer.from_pretrained(str(demo_model_path))
    sets = [tokenize_prompts(tok, prompts, chat=True) for prompts in QUESTIONS]
    opening = shared_opening(sets)
    rendered = tok.decode(sets[0]["input_ids"][0, -sets[0]["attention_mask"][0].sum():][:opening])
    # The template's system prompt and the user's header: the same states in every prompt.
    assert rendered.endswith("trained by Hugging Face<|im_end|>\n<|im_start|>user\n"), rendered
    plain = [tokenize_prompts(tok, prompts) for prompts in QUESTIONS]
    assert shared_opening(plain) == 1  # mergekit's rendering shares the BOS alone


def test_the_shared_opening_counts_real_tokens_only_and_a_prompt_that_is_all_opening_keeps_it():
    sets = [batch([[1, 5, 6, 7, 8], [1, 5, 6, 9]]), batch([[1, 5, 6, 7]])]
    assert shared_opening(sets) == 3  # left padding never counts
    assert kept_positions(sets, 3, 10**6) == [[[3, 4], [3]], [[3]]]
    assert shared_opening([batch([[1, 5]]), batch([[1, 5, 6]])]) == 2
    assert kept_positions([batch([[1, 5]]), batch([[1, 5, 6]])], 2, 10**6) == [[[0, 1]], [[2]]]


def test_fitted_chat_gates_fit_on_every_chat_token_but_the_first_and_score_without_the_opening(pico_llama):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(pico_llama)).eval()
    tok = AutoTokenizer.from_pretrained(str(pico_llama))
    recipe = chat_recipe(pico_llama)
    bank = collect(model, tok, recipe, probes=False)
    sets = [tokenize_prompts(tok, prompts, chat=True) for prompts in QUESTIONS]
    opening = shared_opening(sets)
    assert opening > 0  # "user: " of the fallback template, in every prompt
    lengths = [int(n) for s in sets for n in s["attention_mask"].sum(dim=1)]
    # The fit keeps the opening (it teaches the router to prefer no expert on the template's own
    # text); the held-out score routes only what is the prompt's own.
    assert [p.tokens.shape[1] for p in bank.prompts] == [n - 1 for n in lengths]
    assert [p.own_tokens.shape[1] for p in bank.prompts] == [n - opening for n in lengths]
    shared = slice(0, opening - 1)  # the same states in every prompt
    torch.testing.assert_close(bank.prompts[0].tokens[:, shared], bank.prompts[1].tokens[:, shared])
    plain = collect(model, tok, chat_recipe(pico_llama, None), probes=False)
    assert [p.opening for p in plain.prompts] == [0] * len(lengths)  # BOS + text share the BOS alone


# ---- the preview ----------------------------------------------------------------------------


@pytest.mark.demo
def test_the_preview_routes_a_typed_message_as_the_chat_renders_it(demo_model_path):
    from workbench.chat import registry
    from workbench.gates import compute_gates
    from workbench.routing import preview_routing

    entry = registry().get("demo:smollm2-135m-instruct", device="cpu")
    recipe = chat_recipe("demo:smollm2-135m-instruct", mode="hidden")
    gates = compute_gates(recipe, entry.path, model=entry.model, tokenizer=entry.tokenizer)
    question = "Describe your secret volcano lair."
    trace = preview_routing(gates, entry, question, 2, chat=True)
    (sent,) = prepare([{"role": "user", "content": question}], SamplingSettings(), [entry.tokenizer], [8192])
    assert list(trace.token_ids) == list(sent.token_ids)
    assert len(preview_routing(gates, entry, question, 2).token_ids) < len(sent.token_ids)
    from workbench.ui.preview_logic import Preview

    assert "as a chat message" in Preview(recipe, trace, gates, True, 0.1).summary()
    plain = recipe.model_copy(update={"prompt_template": None})
    assert "chat" not in Preview(plain, trace, gates, True, 0.1).summary()
