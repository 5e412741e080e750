"""The `preview`, `trace` and `chat` commands: output, the documented --json keys, and errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from workbench.build import build
from workbench.cli import main
from workbench.recipe import Expert, Recipe

PROMPTS = [["def add(a, b): return a + b"], ["Solve 2x + 3 = 7 for x."], ["Once upon a time a dragon"],
           ["Hello! How are you doing today?"]]
TRACE_KEYS = {"source", "model", "layers", "experts", "k", "expert_names", "tokens", "token_ids",
              "is_prefill", "probs", "topk_ids", "topk_weights"}
SCORE_KEYS = {"mode", "center_gates", "experts", "k", "held_out", "top1", "topk", "chance_top1",
              "chance_topk", "perfect", "top1_per_layer", "topk_per_layer", "per_expert_top1",
              "per_expert_topk", "matrix", "tokens"}
STATS_KEYS = {"prompt_tokens", "new_tokens", "time_to_first_token_s", "tokens_per_s", "total_s",
              "finish_reason"}


@pytest.fixture(scope="module")
def models(pico_factory, tmp_path_factory) -> dict[str, Path]:
    base = pico_factory("cli-base", seed=6)
    recipe = Recipe(base_model=str(base), dtype="float32", experts=[
        Expert(source_model=str(base), positive_prompts=p) for p in PROMPTS])
    root = tmp_path_factory.mktemp("cli")
    recipe_file = root / "recipe.yml"
    recipe_file.write_text(yaml.safe_dump(recipe.model_dump(exclude_none=True)))
    return {"base": base, "moe": build(recipe, root / "moe", device="cpu").path, "recipe": recipe_file}


def run_json(capsys, *argv: str) -> dict:
    assert main(list(argv)) == 0
    return json.loads(capsys.readouterr().out)


def test_preview_json_has_the_documented_keys(models, capsys):
    out = run_json(capsys, "preview", str(models["recipe"]), "--text", "Once upon a time", "--device", "cpu",
                   "--json")
    assert set(out) == {"command", "recipe", "base_model", "gate_mode", "center_gates", "experts_per_token",
                        "trace", "summary", "score", "advice", "gates"}
    assert set(out["trace"]) == TRACE_KEYS and out["trace"]["source"] == "preview"
    assert out["trace"]["layers"] == 3 and out["trace"]["experts"] == 4 and out["trace"]["k"] == 2
    assert set(out["summary"]) == {"load", "entropy"}
    assert set(out["score"]) == SCORE_KEYS
    # One prompt per expert: nothing can be held out, and the advice says what to do.
    assert out["score"]["top1"] is None and out["score"]["tokens"] == [0] * 4
    assert any("two or more positive prompts" in line for line in out["advice"])
    assert set(out["gates"]) == {"condition_numbers", "cosine", "mean_cosine", "warnings"}


def test_preview_of_a_texts_file_equals_one_preview_per_text(models, capsys, tmp_path):
    texts = ["Once upon a time", 'She said "hi"\tand left', "def f(x):"]
    file = tmp_path / "texts.jsonl"
    lines = [json.dumps({"text": texts[0]}), "", json.dumps({"text": texts[1]}), texts[2]]
    file.write_text("\n".join(lines) + "\n")
    many = run_json(capsys, "preview", str(models["recipe"]), "--texts-file", str(file), "--device", "cpu",
                    "--json")
    assert "trace" not in many and len(many["traces"]) == 3
    for text, trace in zip(texts, many["traces"], strict=True):
        one = run_json(capsys, "preview", str(models["recipe"]), "--text", text, "--device", "cpu", "--json")
        assert trace == one["trace"]
    tokens = sum(len(t["tokens"]) for t in many["traces"])
    assert many["summary"]["load"]["prefill_tokens"] == tokens


@pytest.mark.parametrize(("content", "message"), [
    ("", "holds no text"), ('{"text": 3}', 'line 1 has no string "text"'),
    ("ok\n{oops", "line 2 starts like JSON")])
def test_a_bad_texts_file_says_which_line(models, capsys, tmp_path, content, message):
    file = tmp_path / "texts.jsonl"
    file.write_text(content)
    assert main(["preview", str(models["recipe"]), "--texts-file", str(file), "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_trace_json_matches_the_preview_for_an_identity_moe(models, capsys):
    text = "The knight rode through the forest"
    traced = run_json(capsys, "trace", str(models["moe"]), "--text", text, "--device", "cpu", "--json")
    preview = run_json(capsys, "preview", str(models["recipe"]), "--text", text, "--device", "cpu", "--json")
    assert set(traced) == {"command", "model", "intervention", "trace", "summary"}
    assert traced["trace"]["source"] == "model" and traced["intervention"] is None
    assert traced["trace"]["topk_ids"] == preview["trace"]["topk_ids"]
    labels = ["def add(a, b): return…", "Solve 2x + 3…", "Once upon a time…", "Hello! How are you…"]
    assert traced["trace"]["expert_names"] == preview["trace"]["expert_names"] == labels


def test_trace_prints_a_grid_and_writes_html(models, capsys, tmp_path):
    page = tmp_path / "trace.html"
    argv = ["trace", str(models["moe"]), "--text", "Hello there", "--device", "cpu", "--html", str(page)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "top expert per layer" in out and "expert load" in out and "\"Hel\"" in out  # a token row
    html = page.read_text()
    assert "plotly" in html.lower() and "Top expert per token and layer" in html


def test_chat_json_gives_both_replies_stats_trace_and_divergence(models, capsys):
    out = run_json(capsys, "chat", str(models["moe"]), "--base", str(models["base"]), "--prompt", "Hi there",
                   "--seed", "3", "--max-new-tokens", "6", "--device", "cpu", "--trace", "--json")
    assert {"command", "prompt", "settings", "replies", "trace", "divergence"} <= set(out)
    model, base = out["replies"]
    assert (model["role"], base["role"]) == ("model", "base")
    assert set(model["stats"]) == STATS_KEYS and model["stats"]["new_tokens"] <= 6
    assert out["prompt"].endswith("assistant\n") and out["settings"]["seed"] == 3
    # Identity MoE, same seed: the same reply as its base, and no divergence.
    assert model["token_ids"] == base["token_ids"]
    assert max(out["divergence"]["kl"]) < 1e-5
    again = run_json(capsys, "chat", str(models["moe"]), "--prompt", "Hi there", "--seed", "3",
                     "--max-new-tokens", "6", "--device", "cpu", "--json")
    assert again["replies"][0]["text"] == model["text"] and len(again["replies"]) == 1


def test_chat_streams_text_and_stats(models, capsys):
    argv = ["chat", str(models["base"]), "--prompt", "Hello", "--max-new-tokens", "4", "--device", "cpu"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"== model: {models['base']}") and "tokens/s" in out


def test_chat_trace_prints_the_routing_summary(models, capsys):
    """`chat --trace` without --json traced the reply, then printed nothing of it."""
    argv = ["chat", str(models["moe"]), "--prompt", "Hello", "--max-new-tokens", "4", "--device", "cpu",
            "--trace"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "== routing of the model's reply" in out and "expert load" in out and "routing entropy" in out


def test_preview_of_copies_of_the_base_says_it_is_exact(models, capsys, tmp_path):
    """The CLI called every preview an estimate past layer 0; the UI rightly says copies are exact."""
    argv = ["preview", str(models["recipe"]), "--text", "Once upon a time", "--device", "cpu"]
    assert main(argv) == 0
    assert "exact at every layer" in capsys.readouterr().out
    noisy = yaml.safe_load(models["recipe"].read_text())
    noisy["experts"][0]["noise_scale"] = 0.01
    other = tmp_path / "noisy.yml"
    other.write_text(yaml.safe_dump(noisy))
    assert main(["preview", str(other), "--text", "Once upon a time", "--device", "cpu"]) == 0
    assert "later layers assume the experts behave like the base" in capsys.readouterr().out


def test_build_prints_the_gate_warnings_the_ui_shows(pico_factory, tmp_path, capsys):
    base = pico_factory("cli-base", seed=6)
    same = Recipe(base_model=str(base), dtype="float32", experts=[
        Expert(source_model=str(base), positive_prompts=["the same words"]) for _ in range(2)])
    recipe = tmp_path / "same.yml"
    recipe.write_text(yaml.safe_dump(same.model_dump(exclude_none=True)))
    assert main(["build", str(recipe), str(tmp_path / "moe"), "--device", "cpu"]) == 1  # identical sets
    # Different sets that end on the same token: the same last-token state at layer 0.
    varied = same.model_copy(update={"experts": [
        Expert(source_model=str(base), positive_prompts=["x y z"]),
        Expert(source_model=str(base), positive_prompts=["x y z z"])]})
    recipe.write_text(yaml.safe_dump(varied.model_dump(exclude_none=True)))
    capsys.readouterr()
    assert main(["build", str(recipe), str(tmp_path / "moe"), "--device", "cpu"]) == 0
    err = capsys.readouterr().err
    assert "warning: layer 0: condition number" in err


def test_trace_and_chat_take_interventions_and_json_records_them(models, capsys):
    text = "The knight rode through the forest"
    saved = run_json(capsys, "trace", str(models["moe"]), "--text", text, "--device", "cpu", "--json")
    out = run_json(capsys, "trace", str(models["moe"]), "--text", text, "--device", "cpu", "--json",
                   "--force-expert", "3@1-2", "--ban-expert", "0", "--top-k", "1",
                   "--router-temperature", "2")
    assert out["intervention"] == {"force": [{"expert": 3, "layers": [1, 2]}], "ban": [0], "ablate": [],
                                   "top_k": 1, "temperature": 2.0, "routers": "saved"}
    assert set(out["trace"]) == TRACE_KEYS | {"intervention"} and out["trace"]["k"] == 1
    assert out["trace"]["intervention"] == out["intervention"]
    tops = [[row[0] for row in token] for token in out["trace"]["topk_ids"]]  # (T, L) first choices
    assert all(t[1] == 3 and t[2] == 3 and t[0] != 0 for t in tops)
    assert [t[0] for t in tops] != [0] * len(tops) and saved["intervention"] is None
    chat = run_json(capsys, "chat", str(models["moe"]), "--base", str(models["base"]), "--prompt", "Hi there",
                    "--max-new-tokens", "5", "--device", "cpu", "--trace", "--json", "--ablate-expert", "2",
                    "--router-top-k", "3")
    assert chat["intervention"]["ablate"] == [2] and chat["intervention"]["top_k"] == 3
    assert chat["trace"]["k"] == 3 and chat["trace"]["intervention"] == chat["intervention"]
    assert chat["settings"]["top_k"] == 50  # chat's --top-k stays the sampler's
    assert main(["chat", str(models["moe"]), "--prompt", "Hi", "--max-new-tokens", "3", "--device", "cpu",
                 "--ban-expert", "1"]) == 0
    assert "(under: e1 (Solve 2x + 3…) banned)" in capsys.readouterr().out


def test_gates_from_routes_like_the_model_built_from_that_recipe_and_writes_nothing(models, capsys, tmp_path):
    other = Recipe(base_model=str(models["base"]), dtype="float32", experts_per_token=1, experts=[
        Expert(source_model=str(models["base"]), positive_prompts=p) for p in PROMPTS[::-1]])
    recipe = tmp_path / "other.yml"
    recipe.write_text(yaml.safe_dump(other.model_dump(exclude_none=True)))
    built = build(other, tmp_path / "other-moe", device="cpu").path
    before = sorted((p.name, p.stat().st_mtime_ns) for p in models["moe"].iterdir())
    text = "Once upon a time def add(a, b)"
    swapped = run_json(capsys, "trace", str(models["moe"]), "--text", text, "--device", "cpu", "--json",
                       "--gates-from", str(recipe))
    want = run_json(capsys, "trace", str(built), "--text", text, "--device", "cpu", "--json")
    assert swapped["trace"]["topk_ids"] == want["trace"]["topk_ids"] and swapped["trace"]["k"] == 1
    assert swapped["intervention"]["routers"] == f"{recipe} (not built)" and swapped["routers_notes"] == []
    assert sorted((p.name, p.stat().st_mtime_ns) for p in models["moe"].iterdir()) == before
    assert main(["trace", str(models["moe"]), "--text", text, "--device", "cpu", "--gates-from",
                 str(recipe)]) == 0
    assert f"under: top-1 · routers from {recipe} (not built)" in capsys.readouterr().out  # the recipe's k


@pytest.mark.parametrize("argv, message", [
    (["trace", "{moe}", "--text", "hi", "--ban-expert", "7"], "does not exist"),
    (["trace", "{moe}", "--text", "hi", "--force-expert", "1", "--ban-expert", "1"],
     "both forced and banned"),
    (["chat", "{base}", "--prompt", "hi", "--force-expert", "1"], "no routers to steer"),
    (["trace", "{moe}", "--text", "hi", "--router-temperature", "0"], "temperature"),
])
def test_bad_interventions_exit_1_with_a_message(models, capsys, argv, message):
    names = {"moe": str(models["moe"]), "base": str(models["base"])}
    assert main([a.format(**names) for a in argv] + ["--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err


def test_a_bad_force_argument_is_an_argparse_error(models, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["trace", str(models["moe"]), "--text", "hi", "--force-expert", "2@9-3"])
    assert exit_.value.code == 2 and "layer" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["chat", "{moe}", "--prompt", "   "], "empty"),
    (["chat", "{moe}", "--prompt", "hi", "--temperature", "-2"], "temperature"),
    (["trace", "{base}", "--text", "hello"], "no MoE routers"),
    (["trace", "{missing}", "--text", "hello"], "missing"),
    (["chat", "{base}", "--prompt", "hi", "--trace"], "not a MoE"),
])
def test_bad_requests_exit_1_with_a_message(models, capsys, tmp_path, argv, message):
    names = {"moe": str(models["moe"]), "base": str(models["base"]), "missing": str(tmp_path / "missing")}
    assert main([a.format(**names) for a in argv] + ["--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err
