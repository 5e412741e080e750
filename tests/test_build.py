"""The streaming MoE writer end to end on pico models: identity, layout, portability,
sharding, expert transforms, progress, and what a crash, kill or refusal leaves behind."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from collections import namedtuple
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from workbench.build import build, output_path, parse_size
from workbench.build import builder as build_module
from workbench.errors import BuildError, Cancelled, GateError
from workbench.gates import Gates, diagnose
from workbench.models import ModelSource
from workbench.models.portable import V5_ONLY_TOKENIZER_CLASSES
from workbench.models.tensors import read_header
from workbench.progress import CancelToken
from workbench.recipe import Expert, Recipe, parse_recipe

REPO = Path(__file__).resolve().parent.parent
# A few token sequences (pico vocabulary is 320; 0 is BOS).
IDS = torch.tensor([[0, 17, 42, 99, 150, 7, 230, 5], [0, 300, 3, 3, 64, 128, 256, 11]])
PROMPTS = [["def add(a, b)", "import numpy"], ["Solve 2x + 3 = 7"], ["Once upon a time"], ["Hello!"]]


def make_recipe(base: Path, experts: list[Path], **kwargs) -> Recipe:
    extra = kwargs.pop("expert_kwargs", [{}] * len(experts))
    return Recipe(base_model=str(base), experts=[
        Expert(source_model=str(e), positive_prompts=PROMPTS[i % 4], **extra[i])
        for i, e in enumerate(experts)
    ], **kwargs)


def random_gates(layers: int, experts: int, hidden: int, seed: int = 0) -> Gates:
    vectors = torch.randn(layers, experts, hidden, generator=torch.Generator().manual_seed(seed))
    return Gates(vectors, "random", diagnose(vectors))


def logits(folder: Path) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with torch.no_grad():
        return model(IDS).logits


def tensors_of(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for shard in sorted(folder.glob("*.safetensors")):
        part = load_file(str(shard))
        assert not set(part) & set(out), "a tensor is stored twice"
        out.update(part)
    return out


def leftovers(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name.startswith("."))


def constant_expert(base: Path, folder: Path, value: float) -> Path:
    """A copy of `base` whose MLP matrices are all `value`, so a misplaced expert shows."""
    shutil.copytree(base, folder)
    weights = load_file(str(base / "model.safetensors"))
    for name in weights:
        if ".mlp." in name:
            weights[name] = torch.full_like(weights[name], value)
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


KINDS = [{"family": "llama"}, {"family": "mistral"}, {"family": "llama", "tie": True}]


@pytest.mark.parametrize("kind", KINDS, ids=["llama", "mistral", "llama-tied"])
def test_experts_copied_from_the_base_reproduce_its_logits(pico_factory, tmp_path: Path, kind: dict) -> None:
    base = pico_factory("identity", seed=1, **kind)
    recipe = make_recipe(base, [base] * 3, experts_per_token=2)
    result = build(recipe, tmp_path / "moe", device="cpu")
    assert result.path == tmp_path / "moe"
    assert (logits(result.path) - logits(base)).abs().max() < 1e-4
    config = json.loads((result.path / "config.json").read_text())
    assert config["num_local_experts"] == 3 and config["num_experts_per_tok"] == 2
    assert tuple(result.gates.vectors.shape) == (3, 3, 64)
    assert leftovers(tmp_path) == []


@pytest.mark.demo
def test_demo_model_experts_reproduce_its_logits(demo_model_path: Path, tmp_path: Path) -> None:
    ref = "demo:smollm2-135m-instruct"
    recipe = Recipe(base_model=ref, dtype="float32", experts_per_token=2, experts=[
        Expert(source_model=ref, positive_prompts=p) for p in PROMPTS])
    result = build(recipe, tmp_path / "demo-moe", device="cpu")
    ids = torch.tensor([[1, 504, 3458, 314, 253, 1345, 30, 2]])
    with torch.no_grad():
        moe = AutoModelForCausalLM.from_pretrained(result.path, dtype=torch.float32)(ids).logits
        dense = AutoModelForCausalLM.from_pretrained(demo_model_path, dtype=torch.float32)(ids).logits
    assert (moe - dense).abs().max() < 1e-4


@pytest.fixture(scope="module")
def layout_build(pico_factory, tmp_path_factory) -> tuple[Path, Path, Gates, Recipe]:
    """A tied base and three experts whose MLPs are the constants 1, 2, 3."""
    root = tmp_path_factory.mktemp("layout")
    base = pico_factory("layout", seed=2, tie=True)
    experts = [constant_expert(base, root / f"expert{e}", e + 1.0) for e in range(3)]
    gates = random_gates(3, 3, 64)
    recipe = make_recipe(base, experts, expert_kwargs=[{}, {"residual_scale": 1.0}, {}])
    result = build(recipe, root / "out", device="cpu", gates=gates)
    return base, result.path, gates, recipe


def test_each_expert_lands_under_its_own_names(layout_build) -> None:
    base, out, gates, _ = layout_build
    weights = tensors_of(out)
    dense = load_file(str(base / "model.safetensors"))
    for layer in range(3):
        moe = f"model.layers.{layer}.block_sparse_moe"
        assert torch.equal(weights[f"{moe}.gate.weight"], gates.vectors[layer])
        for e in range(3):
            for w, shape in (("w1", (96, 64)), ("w2", (64, 96)), ("w3", (96, 64))):
                tensor = weights[f"{moe}.experts.{e}.{w}.weight"]
                assert tuple(tensor.shape) == shape
                assert bool((tensor == e + 1.0).all()), f"expert {e} {w} of layer {layer}"
    for name in ("model.embed_tokens.weight", "model.norm.weight", "model.layers.2.self_attn.o_proj.weight"):
        assert torch.equal(weights[name], dense[name])
    assert "lm_head.weight" not in weights
    assert not any(".mlp." in name for name in weights)


def test_output_loads_without_missing_keys_and_stays_tied(layout_build) -> None:
    _, out, _, _ = layout_build
    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True


def test_output_is_portable(layout_build) -> None:
    base, out, _, built = layout_build
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "mixtral" and config["architectures"] == ["MixtralForCausalLM"]
    assert config["rope_theta"] == 10000.0 and config["sliding_window"] is None
    assert config["dtype"] == config["torch_dtype"] == "float32"
    tok = json.loads((out / "tokenizer_config.json").read_text())
    assert tok["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert tok["tokenizer_class"] not in V5_ONLY_TOKENIZER_CLASSES and "chat_template" in tok
    assert (out / "generation_config.json").is_file()
    recipe, problems = parse_recipe((out / "mergekit_moe_config.yml").read_text())
    assert recipe == built and not problems
    card = (out / "README.md").read_text()
    front = yaml.safe_load(card.split("---\n")[1])
    assert "base_model" not in front  # local folders only: the Hub accepts model ids there
    assert {"moe", "frankenmoe", "merge"} <= set(front["tags"]) and front["license"] == "other"
    assert "| 2 |" in card.split("## Gate diagnostics")[1]  # one row per layer
    assert str(base.parent) not in card.split("## Recipe")[0]


def test_a_loaders_private_keys_stay_out_of_the_output_config(pico_factory, tmp_path: Path) -> None:
    base = tmp_path / "from-gguf"
    shutil.copytree(pico_factory("identity", seed=1), base)
    config_path = base / "config.json"
    stray = {"_model_name_or_path": "Smollm2 135M 8k Lc100K Mix1 Ep2", "_name_or_path": str(base)}
    config_path.write_text(json.dumps(json.loads(config_path.read_text()) | stray))
    result = build(make_recipe(base, [base] * 2), tmp_path / "moe", device="cpu",
                   gates=random_gates(3, 2, 64))
    config = json.loads((result.path / "config.json").read_text())
    assert not [key for key in config if key.startswith("_")]


def test_card_of_hub_models_lists_them_as_base_models(pico_factory, tmp_path: Path) -> None:
    base = pico_factory("identity", seed=1, family="llama")
    config = json.loads((base / "config.json").read_text())
    refs = ["org/base@0123abc", "org/coder", "org/writer"]
    sources = {ref: ModelSource(ref, base, "0123abc", config) for ref in refs}
    recipe = Recipe(base_model=refs[0], experts=[Expert(source_model=r, positive_prompts=p)
                                                 for r, p in zip(refs[1:], PROMPTS, strict=False)])
    result = build(recipe, tmp_path / "hub-moe", device="cpu", sources=sources)
    front = yaml.safe_load((result.path / "README.md").read_text().split("---\n")[1])
    assert front["base_model"] == ["org/base", "org/coder", "org/writer"]
    assert parse_recipe((result.path / "mergekit_moe_config.yml").read_text())[0] == recipe


def test_manifest_lists_every_file_with_size_and_hash(layout_build) -> None:
    _, out, _, _ = layout_build
    manifest = json.loads((out / "workbench_manifest.json").read_text())
    listed = {f["path"]: f for f in manifest["files"]}
    assert set(listed) == {p.name for p in out.iterdir()} - {"workbench_manifest.json"}
    for name, entry in listed.items():
        data = (out / name).read_bytes()
        assert entry["size"] == len(data) and entry["sha256"] == hashlib.sha256(data).hexdigest(), name
    assert all(p.stat().st_mode & 0o777 == 0o644 for p in out.iterdir())


def test_small_shards_split_the_model_and_it_still_matches(pico_factory, tmp_path: Path) -> None:
    base = pico_factory("identity", seed=1, family="llama")
    result = build(make_recipe(base, [base] * 2), tmp_path / "sharded", device="cpu", shard_size="60KB")
    shards = sorted(p.name for p in result.path.glob("*.safetensors"))
    assert len(shards) > 3 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((result.path / "model.safetensors.index.json").read_text())
    stored = {}
    for shard in shards:
        with safe_open(str(result.path / shard), framework="pt") as f:
            data = sum(4 * torch.Size(f.get_slice(k).get_shape()).numel() for k in f.keys())
            assert data <= 60_000 or len(f.keys()) == 1  # a tensor never splits
            for key in f.keys():
                assert key not in stored
                stored[key] = (shard, f.get_slice(key).get_shape(), f.get_slice(key).get_dtype())
    assert index["weight_map"] == {k: v[0] for k, v in stored.items()}
    assert index["metadata"]["total_size"] == sum(4 * torch.Size(s).numel() for _, s, _ in stored.values())
    assert (logits(result.path) - logits(base)).abs().max() < 1e-4


def test_dtype_argument_casts_every_tensor(pico_factory, tmp_path: Path) -> None:
    base = pico_factory("identity", seed=1, family="llama")
    result = build(make_recipe(base, [base] * 2), tmp_path / "bf16", device="cpu", dtype="bfloat16")
    weights = tensors_of(result.path)
    assert {t.dtype for t in weights.values()} == {torch.bfloat16}
    dense = load_file(str(base / "model.safetensors"))
    assert torch.equal(weights["model.layers.1.block_sparse_moe.experts.1.w2.weight"],
                       dense["model.layers.1.mlp.down_proj.weight"].to(torch.bfloat16))
    assert json.loads((result.path / "config.json").read_text())["dtype"] == "bfloat16"


def test_a_float64_recipe_writes_float64_tensors(pico_factory, tmp_path: Path) -> None:
    base = pico_factory("identity", seed=1, family="llama")
    recipe, problems = parse_recipe(f"base_model: {base}\ndtype: float64\nexperts:\n"
                                    f"  - source_model: {base}\n    positive_prompts: [code]\n"
                                    f"  - source_model: {base}\n    positive_prompts: [tale]\n")
    assert recipe.dtype == "float64" and not [p for p in problems if p.level == "error"]
    result = build(recipe, tmp_path / "f64", device="cpu")  # gates computed here, rows cast to F64
    with safe_open(str(result.path / "model.safetensors"), framework="numpy") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F64"}
    weights = tensors_of(result.path)
    dense = load_file(str(base / "model.safetensors"))
    assert torch.equal(weights["model.layers.2.block_sparse_moe.experts.1.w1.weight"],
                       dense["model.layers.2.mlp.gate_proj.weight"].double())  # exact: an upcast
    assert torch.equal(weights["model.layers.0.block_sparse_moe.gate.weight"],
                       result.gates.vectors[0].double())
    config = json.loads((result.path / "config.json").read_text())
    assert config["dtype"] == config["torch_dtype"] == "float64"
    assert (logits(result.path) - logits(base)).abs().max() < 1e-4  # still the base's logits


def test_noise_and_residual_scale_change_only_their_expert(pico_factory, tmp_path: Path) -> None:
    base = pico_factory("identity", seed=1, family="llama")
    kwargs = [{"noise_scale": 0.05}, {"residual_scale": 0.5}, {}]
    recipe = make_recipe(base, [base] * 3, expert_kwargs=kwargs)
    gates = random_gates(3, 3, 64)
    first = tensors_of(build(recipe, tmp_path / "a", device="cpu", gates=gates).path)
    dense = load_file(str(base / "model.safetensors"))
    moe, mlp = "model.layers.{}.block_sparse_moe.experts.{}.{}.weight", "model.layers.{}.mlp.{}.weight"
    for layer in range(3):
        assert torch.equal(first[moe.format(layer, 1, "w2")], dense[mlp.format(layer, "down_proj")] * 0.5)
        assert torch.equal(first[moe.format(layer, 1, "w1")], dense[mlp.format(layer, "gate_proj")])
        assert torch.equal(first[moe.format(layer, 2, "w2")], dense[mlp.format(layer, "down_proj")])
    pairs = (("w1", "gate_proj"), ("w2", "down_proj"), ("w3", "up_proj"))
    noise = torch.cat([(first[moe.format(layer, 0, w)] - dense[mlp.format(layer, src)]).flatten()
                       for layer in range(3) for w, src in pairs])
    assert abs(noise.mean().item()) < 0.002 and abs(noise.std().item() - 0.05) < 0.002
    w1_noise = first[moe.format(0, 0, "w1")] - dense[mlp.format(0, "gate_proj")]
    w3_noise = first[moe.format(0, 0, "w3")] - dense[mlp.format(0, "up_proj")]
    assert not torch.allclose(w1_noise, w3_noise)  # independent noise per tensor
    again = tensors_of(build(recipe, tmp_path / "b", device="cpu", gates=gates).path)
    other = tensors_of(build(recipe, tmp_path / "c", device="cpu", gates=gates, seed=1).path)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not torch.equal(first[moe.format(0, 0, "w1")], other[moe.format(0, 0, "w1")])
    assert "mergekit_moe_config.yml OUT --seed 1`" in (tmp_path / "c" / "README.md").read_text()


def test_progress_goes_through_every_stage(pico_factory, tmp_path: Path) -> None:
    base = pico_factory("identity", seed=1, family="llama")
    events = []
    build(make_recipe(base, [base] * 2), tmp_path / "p", device="cpu", on_progress=events.append)
    stages = [e.stage for e in events]
    order = [s for i, s in enumerate(stages) if i == 0 or stages[i - 1] != s]
    # Gates run on a thread during the copy; the routers, written last, wait for them.
    assert [s for s in order if s in ("resolve", "gates", "write", "verify", "done")] == [
        "resolve", "write", "gates", "write", "verify", "done"]
    assert [e.message for e in events if e.stage == "gates"][-1] == "hidden gates ready"
    writes = [e for e in events if e.stage == "write"]
    fractions = [e.fraction for e in writes]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert writes[0].message.endswith("model.embed_tokens.weight")  # maybe after the gates status


# ---- faults: nothing half-written under the final name -----------------------------------


def fail_on_call(monkeypatch, n: int) -> None:
    real, calls = build_module._Job.fill, []

    def flaky(self, spec):
        calls.append(spec.out_name)
        if len(calls) == n:
            raise RuntimeError(f"injected failure at {spec.out_name}")
        return real(self, spec)

    monkeypatch.setattr(build_module._Job, "fill", flaky)


def test_failure_mid_write_leaves_nothing_and_next_build_works(pico_factory, tmp_path: Path,
                                                                monkeypatch) -> None:
    base = pico_factory("identity", seed=1, family="llama")
    recipe = make_recipe(base, [base] * 2)
    with monkeypatch.context() as m:
        fail_on_call(m, 5)
        with pytest.raises(RuntimeError, match="injected"):
            build(recipe, tmp_path / "moe", device="cpu")
    assert list(tmp_path.iterdir()) == []
    build(recipe, tmp_path / "moe", device="cpu")
    assert (tmp_path / "moe" / "model.safetensors").is_file() and leftovers(tmp_path) == []


def test_cancel_between_tensors_leaves_nothing(pico_factory, tmp_path: Path) -> None:
    base = pico_factory("identity", seed=1, family="llama")
    token = CancelToken()

    def cancel_on_third_write(event) -> None:
        if event.stage == "write" and event.fraction > 0.1:
            token.cancel()

    with pytest.raises(Cancelled):
        build(make_recipe(base, [base] * 2), tmp_path / "moe", device="cpu",
              on_progress=cancel_on_third_write, cancel=token)
    assert list(tmp_path.iterdir()) == []


# ---- gates on a thread beside the copy ---------------------------------------------------


def gates_that_wait_for(monkeypatch, until: threading.Event, error: Exception | None = None) -> list:
    """scored_gates (what a build's gate worker runs) replaced by one that blocks until `until`
    is set (or the build cancels it) and then raises `error` or returns random gates; returns
    the cancel tokens seen."""
    from workbench.gates import score as gates_module

    seen = []

    def fake(recipe, base_path, *, cancel, **kwargs):
        seen.append(cancel)
        while not until.wait(0.01):
            cancel.check()
        if error is not None:
            raise error
        return random_gates(3, len(recipe.experts), 64)

    monkeypatch.setattr(gates_module, "scored_gates", fake)
    return seen


def test_the_copy_runs_while_the_gates_are_computed(pico_factory, tmp_path: Path, monkeypatch) -> None:
    # The gates may only finish once every non-router tensor is written: a build that
    # computed the gates first would never get there (and fails on the timeout below).
    base = pico_factory("identity", seed=1, family="llama")
    copied = threading.Event()

    def watch(event) -> None:
        if event.stage == "write" and "gates:" in event.message and event.message.endswith("lm_head.weight"):
            copied.set()

    gates_that_wait_for(monkeypatch, copied)
    timed_out = []
    timer = threading.Timer(60, lambda: (timed_out.append(True), copied.set()))  # never hang the suite
    timer.start()
    try:
        result = build(make_recipe(base, [base] * 2), tmp_path / "moe", device="cpu", on_progress=watch)
    finally:
        timer.cancel()
    assert not timed_out
    infos = sorted(read_header(result.path / "model.safetensors").values(), key=lambda i: i.start)
    routers = [f"model.layers.{i}.block_sparse_moe.gate.weight" for i in range(3)]
    assert [i.name for i in infos[-3:]] == routers  # written last, once the gates were ready
    with safe_open(str(result.path / "model.safetensors"), framework="pt") as f:
        router = f.get_tensor(routers[0])
    torch.testing.assert_close(router, random_gates(3, 2, 64).vectors[0])


def test_a_gates_error_stops_the_copy_at_once_and_leaves_nothing(pico_factory, tmp_path: Path,
                                                                 monkeypatch) -> None:
    base = pico_factory("identity", seed=1, family="llama")
    ready = threading.Event()
    ready.set()
    gates_that_wait_for(monkeypatch, ready, GateError("experts[1].positive_prompts[0] is too long"))
    writes = []
    with pytest.raises(GateError, match="too long"):
        build(make_recipe(base, [base] * 2), tmp_path / "moe", device="cpu",
              on_progress=lambda e: writes.append(e) if e.stage == "write" else None)
    assert list(tmp_path.iterdir()) == []
    assert len(writes) < 10  # reported at the next tensor, not after the whole copy


def test_a_failed_copy_stops_the_gates_thread(pico_factory, tmp_path: Path, monkeypatch) -> None:
    base = pico_factory("identity", seed=1, family="llama")
    never = threading.Event()
    seen = gates_that_wait_for(monkeypatch, never)
    fail_on_call(monkeypatch, 3)
    with pytest.raises(RuntimeError, match="injected"):
        build(make_recipe(base, [base] * 2), tmp_path / "moe", device="cpu")
    assert seen and seen[0].cancelled
    assert not any(t.name == "gates" and t.is_alive() for t in threading.enumerate())
    assert list(tmp_path.iterdir()) == []


KILL_SNIPPET = """
import sys, time
from pathlib import Path
from workbench.build import build
from workbench.recipe import Expert, Recipe

base, out = sys.argv[1], Path(sys.argv[2])
def slow(event):
    if event.stage == "write":
        print("WRITING", flush=True)
        time.sleep(0.05)
experts = [Expert(source_model=base, positive_prompts=[p]) for p in ("code", "math", "story")]
# hidden gates: without torch here, they come from a gates process (test_gate_process)
build(Recipe(base_model=base, experts=experts, gate_mode="hidden"), out, device="cpu", on_progress=slow)
print("FINISHED", flush=True)
"""


def test_sigkill_mid_write_leaves_nothing_and_is_cleaned_up(pico_factory, tmp_path: Path) -> None:
    base = pico_factory("big", seed=4, layers=8, hidden=128, intermediate=192)
    out = tmp_path / "killed"
    child = subprocess.Popen([sys.executable, "-c", KILL_SNIPPET, str(base), str(out)], cwd=REPO,
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert child.stdout.readline().strip() == "WRITING"
        child.stdout.readline()  # a second tensor on its way
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=30)
    assert not out.exists()
    stale = leftovers(tmp_path)
    assert len(stale) == 1 and stale[0].startswith(f".killed.staging-{child.pid}-")
    experts = [base] * 3
    build(make_recipe(base, experts, gate_mode="random"), out, device="cpu")
    assert leftovers(tmp_path) == [] and (out / "workbench_manifest.json").is_file()


def test_existing_output_needs_force_and_survives_a_failed_rebuild(pico_factory, tmp_path: Path,
                                                                   monkeypatch) -> None:
    base = pico_factory("identity", seed=1, family="llama")
    out = tmp_path / "moe"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    events = []
    with pytest.raises(BuildError, match="exists; pass --force"):
        build(make_recipe(base, [base] * 2), out, device="cpu", on_progress=events.append)
    assert events == [] and (out / "keep.txt").read_text() == "mine"

    with pytest.raises(BuildError, match="not an earlier workbench build .*keep.txt"):
        build(make_recipe(base, [base] * 2), out, device="cpu", force=True)  # the user's folder
    assert (out / "keep.txt").read_text() == "mine" and leftovers(tmp_path) == []

    (out / "keep.txt").unlink()
    build(make_recipe(base, [base] * 2), out, device="cpu")
    build(make_recipe(base, [base] * 2), out, device="cpu", force=True)  # an earlier build: replaced
    manifest = (out / "workbench_manifest.json").read_text()
    with monkeypatch.context() as m:
        fail_on_call(m, 9)
        with pytest.raises(RuntimeError, match="injected"):
            build(make_recipe(base, [base] * 3), out, device="cpu", force=True)
    assert (out / "workbench_manifest.json").read_text() == manifest and leftovers(tmp_path) == []
    assert (logits(out) - logits(base)).abs().max() < 1e-4
    build(make_recipe(base, [base] * 3), out, device="cpu", force=True)
    assert json.loads((out / "config.json").read_text())["num_local_experts"] == 3
    assert leftovers(tmp_path) == []


def test_output_left_aside_by_a_dead_swap_is_restored_only_while_whole(pico_factory, tmp_path: Path) -> None:
    base = pico_factory("identity", seed=1, family="llama")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    build(make_recipe(base, [base] * 2), tmp_path / "built", device="cpu")
    aside = tmp_path / f".moe.old-{dead.pid}-0badf00d"
    shutil.copytree(tmp_path / "built", aside)
    with pytest.raises(BuildError, match="exists"):
        build(make_recipe(base, [base] * 2), tmp_path / "moe", device="cpu")
    restored, built = tmp_path / "moe" / "config.json", tmp_path / "built" / "config.json"
    assert restored.read_bytes() == built.read_bytes()
    assert leftovers(tmp_path) == []

    # Killed while deleting the old output (after the swap): part of it is gone. It is dropped,
    # and the next build goes ahead instead of finding an incomplete model under the name.
    half = tmp_path / f".again.old-{dead.pid}-0badf00d"
    shutil.copytree(tmp_path / "built", half)
    (half / "config.json").unlink()
    build(make_recipe(base, [base] * 3), tmp_path / "again", device="cpu")
    assert json.loads((tmp_path / "again" / "config.json").read_text())["num_local_experts"] == 3
    assert leftovers(tmp_path) == []


def test_refusals_happen_before_anything_is_written(pico_factory, tmp_path: Path, monkeypatch) -> None:
    base = pico_factory("identity", seed=1, family="llama")
    wide = pico_factory("wide", seed=1, hidden=32)
    with pytest.raises(BuildError, match="experts_per_token"):
        build(make_recipe(base, [base] * 2, experts_per_token=3), tmp_path / "a", device="cpu")
    with pytest.raises(BuildError, match="hidden_size"):
        build(make_recipe(base, [base, wide]), tmp_path / "b", device="cpu")
    with pytest.raises(BuildError, match=r"\(3, 2, 64\)"):
        build(make_recipe(base, [base] * 2), tmp_path / "c", device="cpu", gates=random_gates(3, 3, 64))
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**6, 10**6 - 1000, 1000))
    with pytest.raises(BuildError, match=r"needs 0\.00\d* GB .* only 0\.00 GB are free"):
        build(make_recipe(base, [base] * 2), tmp_path / "d", device="cpu")
    assert list(tmp_path.iterdir()) == []


def test_checkpoint_that_disagrees_with_its_config_is_refused(pico_factory, tmp_path: Path) -> None:
    base = pico_factory("identity", seed=1, family="llama")
    liar = shutil.copytree(pico_factory("liar", seed=1, intermediate=128), tmp_path / "liar")
    config = json.loads((liar / "config.json").read_text())
    (liar / "config.json").write_text(json.dumps({**config, "intermediate_size": 96}))
    with pytest.raises(BuildError, match=r"mlp.gate_proj.weight.*\(128, 64\).*\(96, 64\)"):
        build(make_recipe(base, [base, liar]), tmp_path / "out", device="cpu")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["liar"]


# ---- names and sizes from users --------------------------------------------------------


@pytest.mark.parametrize("name", ["../x", "/abs", "a/b", "a\\b", "\u202emoe", "", "  ", "a\x00b", ".hidden",
                                  "..", "x" * 200, "\U0001F600" * 60])
def test_output_path_rejects_escaping_or_hidden_names(tmp_path: Path, name: str) -> None:
    with pytest.raises(BuildError):
        output_path(tmp_path, name)


def test_output_path_accepts_plain_names(tmp_path: Path) -> None:
    assert output_path(tmp_path, "my-moe_v1.2") == tmp_path.resolve() / "my-moe_v1.2"


def test_output_path_refuses_a_symlink_out_of_root(tmp_path: Path) -> None:
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "link").symlink_to(tmp_path)
    with pytest.raises(BuildError, match="outside"):
        output_path(tmp_path / "root", "link")


SIZES = [("5GB", 5 * 10**9), ("500MB", 500 * 10**6), ("1.5GiB", 3 * 2**29), (1000, 1000), ("2g", 2 * 10**9),
         ("64 KiB", 65536), ("10", 10), ("3b", 3), ("1Ti", 2**40)]


@pytest.mark.parametrize(("text", "size"), SIZES)
def test_parse_size(text, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "5XB", "-1GB", "0", "GB", "1.5.2GB", "5ib", "0.1"])
def test_parse_size_refuses_nonsense(text: str) -> None:
    with pytest.raises(BuildError, match="size"):
        parse_size(text)


def test_a_shard_changed_after_hashing_fails_verification(pico_factory, tmp_path: Path, monkeypatch) -> None:
    base = pico_factory("identity", seed=1, family="llama")
    real = build_module.write_manifest

    def then_corrupt(folder: Path, written):
        done = real(folder, written)
        with open(folder / "model.safetensors", "ab") as f:
            f.write(b"junk")
        return done

    monkeypatch.setattr(build_module, "write_manifest", then_corrupt)
    with pytest.raises(BuildError, match="model.safetensors is .* bytes, the manifest says"):
        build(make_recipe(base, [base] * 2), tmp_path / "moe", device="cpu")
    assert list(tmp_path.iterdir()) == []
