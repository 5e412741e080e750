"""GGUF export through llama.cpp's packaged converter: a pico Mixtral MoE reads back with its
experts, experts per token and every tensor; refusals, failures and cancels leave nothing."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.pico import CORPUS
from workbench.build import build
from workbench.build.gguf import INSTALL, converter_available, export_gguf
from workbench.cli.commands import main
from workbench.errors import BuildError, Cancelled
from workbench.progress import CancelToken
from workbench.recipe import Expert, Recipe

pytestmark = pytest.mark.skipif(not converter_available(),
                                reason=f"llama.cpp's converter is not installed: {INSTALL}")
PROMPTS = [["def add(a, b)"], ["Solve 2x + 3 = 7"], ["Once upon a time"], ["Hello!"]]


def with_sentencepiece(folder: Path) -> Path:
    """Add a tokenizer.model: llama.cpp's converter knows the pre-tokenizers of published BPE
    vocabularies only, and takes a Llama model's SentencePiece vocabulary without that check."""
    import sentencepiece

    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(sentence_iterator=iter(CORPUS), model_writer=model,
                                             vocab_size=200, model_type="bpe", bos_id=0, eos_id=1, unk_id=2,
                                             pad_id=-1, minloglevel=2)
    (folder / "tokenizer.model").write_bytes(model.getvalue())
    return folder


@pytest.fixture(scope="module")
def moe(pico_factory, tmp_path_factory) -> Path:
    """A pico Mixtral MoE: 4 experts, 2 per token, tied embeddings, a SentencePiece vocabulary."""
    root = tmp_path_factory.mktemp("gguf")
    base = with_sentencepiece(shutil.copytree(pico_factory("gguf", seed=9, tie=True), root / "base"))
    recipe = Recipe(base_model=str(base), experts_per_token=2,
                    experts=[Expert(source_model=str(base), positive_prompts=p) for p in PROMPTS])
    return build(recipe, root / "moe", device="cpu").path


def test_cli_export_reads_back_with_every_expert_and_tensor(moe: Path, tmp_path: Path, capsys) -> None:
    from gguf import GGUFReader

    assert main(["export-gguf", str(moe), str(tmp_path), "--type", "q8_0"]) == 0
    out = tmp_path / "moe-q8_0.gguf"
    assert "4 experts (2 per token), checked" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]  # no temporary file left
    reader = GGUFReader(str(out))
    assert reader.get_field("llama.expert_count").contents() == 4
    assert reader.get_field("llama.expert_used_count").contents() == 2
    shapes = {t.name: [int(n) for n in t.shape] for t in reader.tensors}
    names = ["token_embd.weight", "output_norm.weight"]
    per_layer = ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate_inp",
                 "ffn_gate_exps", "ffn_down_exps", "ffn_up_exps")
    for layer in range(3):
        names += [f"blk.{layer}.{n}.weight" for n in per_layer]
        assert shapes[f"blk.{layer}.ffn_up_exps.weight"] == [64, 96, 4]  # (H, I, E) in GGUF's order
        assert shapes[f"blk.{layer}.ffn_gate_inp.weight"] == [64, 4]
    assert sorted(shapes) == sorted(names)  # tied: no output.weight, as in the checkpoint


def test_refusals_name_the_fix_and_write_nothing(moe: Path, tmp_path: Path) -> None:
    with pytest.raises(BuildError, match="llama-quantize"):
        export_gguf(moe, tmp_path / "m.gguf", "q4_k_m")
    (tmp_path / "taken.gguf").write_text("keep me")
    with pytest.raises(BuildError, match="--force"):
        export_gguf(moe, tmp_path / "taken.gguf")
    with pytest.raises(BuildError, match="not a MoE"):
        export_gguf(moe.parent / "base", tmp_path / "dense.gguf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken.gguf"]
    assert (tmp_path / "taken.gguf").read_text() == "keep me"


def test_a_failed_or_cancelled_conversion_leaves_nothing(moe: Path, tmp_path: Path) -> None:
    bare = shutil.copytree(moe, tmp_path / "bare")
    (bare / "tokenizer.model").unlink()  # the pico BPE vocabulary is one llama.cpp does not know
    with pytest.raises(BuildError, match="converter failed"):
        export_gguf(bare, tmp_path / "bare.gguf")
    cancel = CancelToken()
    seen = []

    def on_progress(event) -> None:
        seen.append(event)
        cancel.cancel()

    with pytest.raises(Cancelled):
        export_gguf(moe, tmp_path / "cancelled.gguf", on_progress=on_progress, cancel=cancel)
    assert seen and sorted(p.name for p in tmp_path.iterdir()) == ["bare"]


def test_a_killed_export_s_partial_file_is_removed_by_the_next_export(moe: Path, tmp_path: Path) -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])  # a pid that is surely dead now
    child.wait()
    killed = tmp_path / f".moe.gguf.partial-{child.pid}"
    killed.write_bytes(b"GGUF" + bytes(1000))  # what kill -9 left mid-write
    live = tmp_path / f".other.gguf.partial-{os.getpid()}"  # a running export's: left alone
    live.write_bytes(b"GGUF")
    export_gguf(moe, tmp_path / "moe.gguf")
    assert sorted(p.name for p in tmp_path.iterdir()) == [live.name, "moe.gguf"]


@pytest.mark.demo
def test_demo_moe_exports_with_its_four_experts(demo_model_path: Path, tmp_path: Path) -> None:
    """The demo MoE (4 experts, 2 per token) through the converter's own SmolLM2 vocabulary."""
    ref = "demo:smollm2-135m-instruct"
    recipe = Recipe(base_model=ref, experts_per_token=2, dtype="bfloat16",
                    experts=[Expert(source_model=ref, positive_prompts=p) for p in PROMPTS])
    built = build(recipe, tmp_path / "demo-moe", device="cpu")
    result = export_gguf(built.path, tmp_path, "bf16")
    assert (result.arch, result.expert_count, result.expert_used_count) == ("llama", 4, 2)
    assert result.tensor_count == 2 + 30 * 10  # token_embd, output_norm, 10 per layer; tied: no output
