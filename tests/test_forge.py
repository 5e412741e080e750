"""Forge: an expert trained from examples on a pico base, written like a build."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from workbench.build import build
from workbench.cli import main
from workbench.errors import Cancelled, ForgeError
from workbench.forge import ForgeSettings, forge_expert, read_examples
from workbench.progress import CancelToken
from workbench.recipe import Expert, Recipe
from workbench.staging import MANIFEST, is_output

PAIRS = [("What is the weather like?", "Arr, grey skies, matey!"),
         ("How do I boil an egg?", "Arr, nine minutes!"),
         ("Tell me about the moon.", "Arr, a silver doubloon!"), ("What is 2 + 2?", "Arr, four, matey!")]
FAST = ForgeSettings(steps=6, lr=1e-3, batch_size=2, seed=3)


def write_data(path: Path, lines: list) -> Path:
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("forge-data")
    return write_data(folder / "pirate.jsonl", [{"prompt": p, "reply": r} for p, r in PAIRS]
                      + [{"text": "Arr, the sea be wide."}])


@pytest.fixture(scope="module")
def forged(pico_factory, data, tmp_path_factory):
    base = pico_factory("forge-base", seed=4)
    out = tmp_path_factory.mktemp("forged") / "pirate"
    return base, forge_expert(str(base), data, out, FAST, device="cpu")


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        return {name: f.get_tensor(name) for name in f.keys()}


def test_forge_lowers_the_loss_and_changes_only_the_mlps(forged):
    base, result = forged
    assert len(result.losses) == FAST.steps and result.losses[-1] < result.losses[0]
    before, after = tensors(base), tensors(result.path)
    assert set(before) == set(after)
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    mlps = {name for name in before if ".mlp." in name}
    assert changed == mlps  # every MLP matrix trained, nothing else moved by a single bit
    assert is_output(result.path) and (result.path / MANIFEST).is_file()
    card = (result.path / "README.md").read_text()
    assert "sha256" in card and "--steps 6" in card and f"{result.losses[-1]:.4f}" in card


def test_the_same_seed_forges_the_same_weights(forged, data, tmp_path):
    base, result = forged
    again = forge_expert(str(base), data, tmp_path / "again", FAST, device="cpu")
    assert again.losses == result.losses
    first, second = tensors(result.path), tensors(again.path)
    assert all(torch.equal(first[name], second[name]) for name in first)


def test_a_moe_of_copies_of_a_forged_expert_gives_its_logits(forged, tmp_path):
    base, result = forged
    recipe = Recipe(base_model=str(base), dtype="float32", experts=[
        Expert(source_model=str(result.path), positive_prompts=[p]) for p in ("code", "maths")])
    moe = build(recipe, tmp_path / "moe", device="cpu").path
    ids = torch.tensor([[1, 40, 41, 42, 43, 44]])
    with torch.no_grad():
        want = AutoModelForCausalLM.from_pretrained(result.path, dtype=torch.float32)(ids).logits
        got = AutoModelForCausalLM.from_pretrained(moe, dtype=torch.float32)(ids).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(("lines", "message"), [
    ([], "holds no example"),
    (['{"prompt": "hi", "reply": "ahoy"}', "{oops"], "DATA line 2 is not JSON"),
    (['{"prompt": "hi"}'], 'DATA line 1 has no "reply"'),
    (['{"text": "a", "reply": "b"}'], 'mixes "text" with "prompt"/"reply"'),
    (['{"prompt": "hi", "reply": "   "}'], '"reply" must be non-empty text'),
    (['{"prompt": "hi", "answer": "x"}'], "unknown key(s) 'answer'"),
    (["[1, 2]"], "is not a JSON object"),
])
def test_bad_data_is_refused_naming_the_line(tmp_path, lines, message):
    with pytest.raises(ForgeError) as caught:
        read_examples(write_data(tmp_path / "bad.jsonl", lines))
    assert message in str(caught.value)


def test_an_example_longer_than_the_limit_is_refused_before_training(pico_factory, tmp_path):
    base = pico_factory("forge-base", seed=4)
    data = write_data(tmp_path / "long.jsonl", [{"prompt": "hi", "reply": "ok"}, {"text": "word " * 400}])
    with pytest.raises(ForgeError, match="DATA line 2 is .* tokens long; the limit is 64"):
        forge_expert(str(base), data, tmp_path / "out", ForgeSettings(steps=1, max_tokens=64), device="cpu")
    assert not (tmp_path / "out").exists()


def test_a_cancelled_forge_leaves_nothing_and_the_next_one_succeeds(pico_factory, data, tmp_path):
    base = pico_factory("forge-base", seed=4)
    token = CancelToken()

    def stop_at_step_two(event) -> None:
        if event.stage == "forge" and event.message.startswith("step 2/"):
            token.cancel()

    with pytest.raises(Cancelled):
        forge_expert(str(base), data, tmp_path / "pirate", FAST, device="cpu", on_progress=stop_at_step_two,
                     cancel=token)
    assert list(tmp_path.iterdir()) == []  # no folder under the name, no staging left behind
    assert is_output(forge_expert(str(base), data, tmp_path / "pirate", FAST, device="cpu").path)


def test_forge_cli_reports_bad_data_and_refuses_an_existing_folder(pico_factory, data, tmp_path, capsys):
    base = pico_factory("forge-base", seed=4)
    lines = ['{"prompt": "hi", "reply": "ok"}', '{"prompt": 3, "reply": "x"}']
    bad = write_data(tmp_path / "bad.jsonl", lines)
    assert main(["forge", str(base), str(bad), str(tmp_path / "o")]) == 1
    assert 'DATA line 2: "prompt" must be non-empty text' in capsys.readouterr().err
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    assert main(["forge", str(base), str(data), str(tmp_path / "mine"), "--steps", "1", "--force"]) == 1
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"  # --force replaces only a forge
    assert main(["forge", str(base), str(data), str(tmp_path / "o"), "--steps", "2", "--layers", "0-1"]) == 0
    assert "forged" in capsys.readouterr().out
    with pytest.raises(SystemExit):  # argparse refuses it before anything runs
        main(["forge", str(base), str(data), str(tmp_path / "o2"), "--layers", "5-2"])
    assert "not after the last" in capsys.readouterr().err


SHIPPED = Path(__file__).parent.parent / "assets" / "forge"


@pytest.mark.parametrize("path", sorted(SHIPPED.glob("*.jsonl")), ids=lambda p: p.name)
def test_every_shipped_example_set_reads_and_has_two_dozen_distinct_chat_pairs(path):
    examples = read_examples(path).items
    assert len(examples) >= 24 and all(e.prompt and e.reply for e in examples)
    prompts = [e.prompt.strip().lower() for e in examples]
    assert sorted(p for p in set(prompts) if prompts.count(p) > 1) == []  # a repeat teaches nothing new
    listed = (SHIPPED / "README.md").read_text()
    assert f"| `{path.name}` | {len(examples)} |" in listed  # in the README's table, with its count


def test_the_reply_loss_is_transformers_causal_lm_loss(pico_factory, data):
    from transformers import AutoTokenizer

    from workbench.forge.train import _batch, encode, reply_loss

    base = pico_factory("forge-base", seed=4)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(base)
    rows = [encode(tokenizer, e, 512) for e in read_examples(data).items]
    assert any(label == -100 for _, labels in rows for label in labels)  # prompts carry no loss
    batch = _batch(rows, tokenizer.eos_token_id, torch.device("cpu"))
    with torch.no_grad():
        torch.testing.assert_close(reply_loss(model, batch), model(**batch, use_cache=False).loss)


def test_a_data_file_is_read_only_under_the_roots_and_only_up_to_the_cap(tmp_path):
    from workbench.forge import MAX_DATA_BYTES, data_path, examples_text

    root = tmp_path / "root"
    root.mkdir()
    good = root / "bom.jsonl"
    good.write_bytes(b'\xef\xbb\xbf{"prompt": "Hi", "reply": "Ahoy!"}\n')  # saved with a byte-order mark
    assert examples_text(data_path(str(good), roots=[root])).startswith('{"prompt"')
    outside = tmp_path / "other.jsonl"
    outside.write_bytes(good.read_bytes())
    with pytest.raises(ForgeError, match="is outside the folders this app reads from"):
        data_path(str(outside), roots=[root])
    assert data_path("hero", roots=[root]).name == "hero.jsonl"  # shipped sets from anywhere
    huge = root / "huge.jsonl"
    with open(huge, "wb") as f:
        f.truncate(MAX_DATA_BYTES + 1)
    with pytest.raises(ForgeError, match="over the 16 MB limit"):
        examples_text(huge)


def test_a_disk_too_small_is_said_before_training_and_a_full_disk_while_writing_keeps_nothing(
        pico_factory, data, tmp_path, monkeypatch):
    import errno
    import shutil

    from workbench.errors import BuildError

    base = pico_factory("forge-base", seed=4)
    said = []
    real = shutil.disk_usage
    monkeypatch.setattr("workbench.staging.shutil.disk_usage", lambda p: real(p)._replace(free=10**6))
    with pytest.raises(BuildError, match=r"the forged expert needs \d+\.\d\d GB .* only 0\.00 GB are free"):
        forge_expert(str(base), data, tmp_path / "pirate", FAST, device="cpu",
                     on_progress=lambda e: said.append(e.message))
    assert said[-1] == f"loading {base}"  # refused once the model was loaded, before any step
    monkeypatch.undo()

    def disk_full(folder) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("workbench.forge.expert.make_durable", disk_full)
    with pytest.raises(ForgeError, match="filled up while the expert was written; nothing was kept"):
        forge_expert(str(base), data, tmp_path / "pirate", FAST, device="cpu")
    assert list(tmp_path.iterdir()) == []
