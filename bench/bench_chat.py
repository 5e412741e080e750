"""Chat speed and memory: the demo model against a 2-of-4-experts MoE built from it, side by side.

The MoE (4 copies of SmolLM2-135M-Instruct, top-2, float32) is built once into `--work` and
reused. Both models are loaded in one registry (tensors shared); base, MoE and the MoE with
transformers' own experts path (no decode fast path) each generate a reply, for
`--rounds` rounds, one token of each in turn, so a noisy machine affects them alike; the
median decode step is reported (tokens/s = 1 / median step), greedy, same prompt.
Memory: distinct tensor bytes of base alone, MoE alone, both with sharing, and both as two
separate loads.

    .venv/bin/python bench/bench_chat.py --rounds 5 --threads 2
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from workbench.build import build  # noqa: E402
from workbench.chat import ReplyStream, SamplingSettings, prepare  # noqa: E402
from workbench.chat.engine import Registry, load_model  # noqa: E402
from workbench.recipe import Expert, Recipe  # noqa: E402

DEMO = "demo:smollm2-135m-instruct"
PROMPTS = [["Write a Python function that sorts a list.", "def add(a, b): return a + b"],
           ["Solve the equation 2x + 3 = 7.", "What is the integral of x squared?"],
           ["Once upon a time, a dragon guarded a castle.", "Write a poem about the sea."],
           ["Hello! How are you today?", "Thanks, see you tomorrow."]]
QUESTION = "Write a short story about a dragon who learns to paint. Use at least five sentences."


def demo_moe(work: Path) -> Path:
    """The 4x demo MoE (top-2, float32) under `work`, built on first use."""
    out = work / "demo-moe-4x2"
    if not (out / "config.json").is_file():
        recipe = Recipe(base_model=DEMO, experts_per_token=2, dtype="float32",
                        experts=[Expert(source_model=DEMO, positive_prompts=p) for p in PROMPTS])
        work.mkdir(parents=True, exist_ok=True)
        build(recipe, out, device="cpu")
    return out


def streams_for(entries: dict, settings: SamplingSettings, *, trace: bool = False) -> dict[str, ReplyStream]:
    out = {}
    for name, entry in entries.items():
        (prompt,) = prepare(QUESTION, settings, [entry.tokenizer], [entry.context_length])
        out[name] = ReplyStream(entry, prompt, settings, trace=trace and entry.is_moe)
    return out


def interleaved_steps(streams: dict[str, ReplyStream]) -> dict[str, list[float]]:
    """Advance every reply one token in turn; seconds of each call, in order.

    Interleaving token by token puts every model in the same moments of a noisy machine.
    The first call includes the prompt's prefill; the last one the reply's end (for a traced
    reply: routing its last token and assembling the trace).
    """
    running = {name: iter(stream) for name, stream in streams.items()}
    steps: dict[str, list[float]] = {name: [] for name in streams}
    while running:
        for name in list(running):
            started = time.perf_counter()
            try:
                next(running[name])
            except StopIteration:
                del running[name]
            steps[name].append(time.perf_counter() - started)
    return steps


def memory_report(moe_path: Path) -> dict[str, float]:
    alone = {}
    for name, ref in (("base", DEMO), ("moe", str(moe_path))):
        registry = Registry()
        registry.get(ref, device="cpu")
        alone[name] = registry.resident_bytes() / 1e6
        registry.clear()
    both = Registry()
    both.get(DEMO, device="cpu")
    both.get(str(moe_path), device="cpu")
    shared = both.resident_bytes() / 1e6
    both.clear()
    return {"base alone MB": alone["base"], "MoE alone MB": alone["moe"], "both, shared MB": shared,
            "both, separate MB": alone["base"] + alone["moe"]}


def bench_args(description: str) -> argparse.Namespace:
    """Arguments shared by the chat and trace benches; sets logging and torch threads."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--work", type=Path, default=Path("/tmp/moe-bench-chat"))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=64, help="max new tokens per reply")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    return args


def main() -> int:
    args = bench_args(__doc__.splitlines()[0])
    moe_path = demo_moe(args.work)

    registry = Registry()
    entries = {"base": registry.get(DEMO, device="cpu"), "moe": registry.get(str(moe_path), device="cpu")}
    plain = load_model(str(moe_path), device="cpu")
    # Undo the decode fast path: the class's forward is transformers' own experts implementation.
    for module in plain.model.modules():
        module.__dict__.pop("forward", None)
    entries["moe, transformers experts"] = plain
    settings = SamplingSettings(temperature=0, max_new_tokens=args.tokens)
    interleaved_steps(streams_for(entries, SamplingSettings(temperature=0, max_new_tokens=4)))  # warm-up
    steps: dict[str, list[float]] = {name: [] for name in entries}
    for _ in range(args.rounds):
        for name, times in interleaved_steps(streams_for(entries, settings)).items():
            steps[name].extend(times[1:-1])  # decode steps only: no prefill, no end

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cpus, "
          f"torch threads {torch.get_num_threads()}, torch {torch.__version__}, "
          f"load average {os.getloadavg()[0]:.1f}")
    print(f"demo MoE 4 experts top-2 float32 vs base, greedy, {args.tokens} new tokens, "
          f"{args.rounds} rounds, decode steps interleaved token by token")
    base_rate = 1 / statistics.median(steps["base"])
    for name, times in steps.items():
        rate = 1 / statistics.median(times)
        print(f"  {name:28s} {rate:6.2f} tokens/s  (x{rate / base_rate:.2f} of base)  "
              f"median step {1000 * statistics.median(times):.1f} ms over {len(times)} steps")
    del entries, plain
    registry.clear()
    print("memory: distinct tensor storage bytes of the loaded models")
    for key, value in memory_report(moe_path).items():
        print(f"  {key:20s} {value:8.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
