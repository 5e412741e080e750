"""Write random Llama checkpoints (a base and N experts) big enough to benchmark the build.

Each model is written tensor by tensor through a small streaming safetensors writer: the
header is computed from the shapes first, then every tensor is generated, written and
dropped, so memory holds one tensor at a time (the largest, the 32000 x 2048 embedding, is
262 MB while drawn in float32, 131 MB in bf16) however many layers the model has. Shards
follow the Hub's layout (`model-0000i-of-0000N` plus `model.safetensors.index.json`) so the
build reads them the way it reads real checkpoints.

The tokenizer is tests/pico.py's tiny BPE tokenizer; the config's vocab_size is 32000 so
that embeddings and lm_head have realistic sizes (ids past the tokenizer's vocab are
simply never produced).

    .venv/bin/python bench/make_synthetic.py /tmp/bench-models --layers 12 --experts 4
"""

from __future__ import annotations

import argparse
import json
import logging
import struct
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from transformers import LlamaConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.pico import make_tokenizer  # noqa: E402  (repo root on sys.path first)

log = logging.getLogger("bench.make_synthetic")

Shape = tuple[int, ...]
DTYPE = torch.bfloat16
ST_DTYPE = "BF16"
ALIGN = 8  # safetensors pads the header so tensor data starts 8-byte aligned


def llama_config(hidden: int, intermediate: int, layers: int, vocab: int, heads: int, kv_heads: int,
                 bos: int, eos: int) -> dict:
    """config.json for a TinyLlama-shaped model (GQA, untied embeddings)."""
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        max_position_embeddings=2048, tie_word_embeddings=False, rms_norm_eps=1e-5,
        bos_token_id=bos, eos_token_id=eos, pad_token_id=eos, dtype="bfloat16",
    ).to_dict()
    config["architectures"] = ["LlamaForCausalLM"]
    return config


def tensor_shapes(config: dict) -> list[tuple[str, Shape]]:
    """Every tensor of a Llama checkpoint in the order save_pretrained writes them (H hidden, I MLP)."""
    h, i, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    head_dim = h // config["num_attention_heads"]
    kv = config["num_key_value_heads"] * head_dim
    out: list[tuple[str, Shape]] = [("model.embed_tokens.weight", (v, h))]
    for layer in range(config["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        out += [
            (p + "input_layernorm.weight", (h,)),
            (p + "self_attn.q_proj.weight", (h, h)),
            (p + "self_attn.k_proj.weight", (kv, h)),
            (p + "self_attn.v_proj.weight", (kv, h)),
            (p + "self_attn.o_proj.weight", (h, h)),
            (p + "post_attention_layernorm.weight", (h,)),
            (p + "mlp.gate_proj.weight", (i, h)),
            (p + "mlp.up_proj.weight", (i, h)),
            (p + "mlp.down_proj.weight", (h, i)),
        ]
    out += [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]
    return out


def nbytes(shape: Shape) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count * DTYPE.itemsize


def plan_shards(shapes: list[tuple[str, Shape]], shard_bytes: int) -> list[list[tuple[str, Shape]]]:
    """Greedy split by bytes, in order, as the Hub's sharded checkpoints are."""
    shards: list[list[tuple[str, Shape]]] = [[]]
    size = 0
    for name, shape in shapes:
        if shards[-1] and size + nbytes(shape) > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes(shape)
    return shards


def header_bytes(shard: list[tuple[str, Shape]]) -> bytes:
    header: dict[str, dict] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in shard:
        end = offset + nbytes(shape)
        header[name] = {"dtype": ST_DTYPE, "shape": list(shape), "data_offsets": [offset, end]}
        offset += nbytes(shape)
    raw = json.dumps(header, separators=(",", ":")).encode()
    return raw + b" " * (-len(raw) % ALIGN)


def random_tensors(shard: list[tuple[str, Shape]], gen: torch.Generator) -> Iterator[torch.Tensor]:
    """Norms are ones (as in a fresh model); matrices N(0, 0.02), the Llama initializer range."""
    for _name, shape in shard:
        if len(shape) == 1:
            yield torch.ones(shape, dtype=DTYPE)
        else:
            yield torch.randn(shape, generator=gen).mul_(0.02).to(DTYPE)


def write_shard(path: Path, shard: list[tuple[str, Shape]], gen: torch.Generator) -> int:
    """Stream one safetensors file: header, then each tensor's bytes; returns bytes of tensor data."""
    header = header_bytes(shard)
    written = 0
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(header)))
        handle.write(header)
        for tensor in random_tensors(shard, gen):
            # bf16 has no numpy dtype: write its raw 2-byte words through an int16 view.
            handle.write(tensor.view(torch.int16).numpy())
            written += tensor.numel() * DTYPE.itemsize
    return written


def write_model(folder: Path, config: dict, seed: int, shard_bytes: int) -> int:
    """Write config, shards, index and tokenizer of one random model; returns total tensor bytes."""
    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    shards = plan_shards(tensor_shapes(config), shard_bytes)
    names = [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))]
    weight_map, total = {}, 0
    for name, shard in zip(names, shards, strict=True):
        total += write_shard(folder / name, shard, gen)
        weight_map.update({tensor: name for tensor, _ in shard})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    make_tokenizer().save_pretrained(folder)
    return total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="folder to hold base/ and expert-K/")
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=5632)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--shard-gb", type=float, default=1.0, help="input shard size, GB")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    tok = make_tokenizer()
    config = llama_config(args.hidden, args.intermediate, args.layers, args.vocab, args.heads,
                          args.kv_heads, tok.bos_token_id, tok.eos_token_id)
    models = [("base", 0)] + [(f"expert-{k}", k + 1) for k in range(args.experts)]
    for name, seed in models:
        start = time.perf_counter()
        total = write_model(args.out / name, config, seed, int(args.shard_gb * 1e9))
        log.info("%s: %.2f GB in %.1f s", args.out / name, total / 1e9, time.perf_counter() - start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
