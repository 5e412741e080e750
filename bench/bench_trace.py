"""Router tracing, preview and heatmap speed on the demo model (and its 4x top-2 MoE).

- tracing overhead: the same seeded reply generated with and without router hooks,
  advanced token by token in turn, for `--rounds` rounds; median reply time and median
  decode step of each;
- preview: routing a 256-token text with recipe gates over the base model, no build;
  the built MoE's trace of the same text for comparison;
- plots: the token-by-layer heatmap of a 1,024-token x 30-layer trace, built and serialised.

    .venv/bin/python bench/bench_trace.py --rounds 5 --threads 2
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bench_chat import DEMO, PROMPTS, bench_args, demo_moe, interleaved_steps  # noqa: E402
from workbench.chat import ReplyStream, SamplingSettings, prepare  # noqa: E402
from workbench.chat.engine import Registry  # noqa: E402
from workbench.gates import compute_gates  # noqa: E402
from workbench.recipe import Expert, Recipe  # noqa: E402
from workbench.routing import (  # noqa: E402
    RouterTrace,
    plots,  # noqa: E402
    preview_routing,
    trace_text,
)
from workbench.routing.trace import route  # noqa: E402

WORDS = ("The dragon counted the coins while def sort(xs): return sorted(xs) and 2x + 3 = 7 "
         "meant x equals two; hello, thanks, see you tomorrow!").split()


def text_of(tokenizer, tokens: int) -> str:
    words = []
    while len(tokenizer(" ".join(words))["input_ids"]) < tokens:
        words.append(WORDS[len(words) % len(WORDS)])
    while len(tokenizer(" ".join(words))["input_ids"]) > tokens:
        words.pop()
    return " ".join(words)


def median_time(fn: Callable[[], object], rounds: int) -> tuple[float, float]:
    """Median (wall seconds, process CPU seconds) of `rounds` calls after one warm-up.

    CPU time is reported beside wall time because other jobs on a shared machine stretch
    wall time; with 2 threads, CPU time is up to twice the wall time of an idle machine.
    """
    fn()
    walls, cpus = [], []
    for _ in range(rounds):
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return statistics.median(walls), statistics.median(cpus)


def traced_pair(entries: dict, settings: SamplingSettings) -> dict:
    """The same seeded reply twice: without and with router tracing."""
    out = {}
    for name, entry in entries.items():
        (prompt,) = prepare("Write a short story about a dragon who learns to paint.", settings,
                            [entry.tokenizer], [entry.context_length])
        out[name] = ReplyStream(entry, prompt, settings, trace=name == "traced")
    return out


def synthetic_trace(tokens: int, layers: int, experts: int, k: int) -> RouterTrace:
    noise = torch.randn(tokens, layers, experts, generator=torch.Generator().manual_seed(0))
    probs = torch.softmax(noise, dim=-1)
    weights, ids = route(probs, k)
    return RouterTrace([f"tok{i}" for i in range(tokens)], list(range(tokens)), probs, ids, weights,
                       torch.arange(tokens) < tokens // 2, [DEMO] * experts)


def main() -> int:
    args = bench_args(__doc__.splitlines()[0])
    registry = Registry()
    base = registry.get(DEMO, device="cpu")
    moe = registry.get(str(demo_moe(args.work)), device="cpu")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cpus, "
          f"torch threads {torch.get_num_threads()}, torch {torch.__version__}, "
          f"load average {os.getloadavg()[0]:.1f}")

    settings = SamplingSettings(temperature=0.7, max_new_tokens=args.tokens, seed=1)
    pair = {"untraced": moe, "traced": moe}
    totals: dict[str, list[float]] = {"untraced": [], "traced": []}
    medians: dict[str, list[float]] = {"untraced": [], "traced": []}
    interleaved_steps(traced_pair(pair, SamplingSettings(temperature=0, max_new_tokens=4)))  # warm-up
    for _ in range(args.rounds):
        streams = traced_pair(pair, settings)
        for name, times in interleaved_steps(streams).items():
            totals[name].append(sum(times))
            medians[name].append(statistics.median(times[1:-1]))
        same = streams["traced"].result.token_ids == streams["untraced"].result.token_ids
        assert same, "tracing changed the reply"
    p, t = statistics.median(totals["untraced"]), statistics.median(totals["traced"])
    step_p, step_t = statistics.median(medians["untraced"]), statistics.median(medians["traced"])
    tokens = len(streams["traced"].result.token_ids)
    print(f"tracing, {tokens} tokens, replies interleaved token by token: reply {p:.3f} s untraced, "
          f"{t:.3f} s traced ({100 * (t / p - 1):+.1f}%); median decode step {1000 * step_p:.1f} ms vs "
          f"{1000 * step_t:.1f} ms ({100 * (step_t / step_p - 1):+.1f}%)")

    recipe = Recipe(base_model=DEMO, experts=[Expert(source_model=DEMO, positive_prompts=q) for q in PROMPTS])
    gates = compute_gates(recipe, base.path, model=base.model, tokenizer=base.tokenizer)
    text = text_of(base.tokenizer, 256)
    n = len(base.tokenizer(text)["input_ids"])
    preview_s, preview_cpu = median_time(lambda: preview_routing(gates, base, text, 2), args.rounds)
    traced_s, traced_cpu = median_time(lambda: trace_text(moe, text), args.rounds)
    print(f"preview of a {n}-token text (base model + gates): {preview_s:.3f} s wall, "
          f"{preview_cpu:.3f} s CPU; built MoE trace of the same text: {traced_s:.3f} s wall, "
          f"{traced_cpu:.3f} s CPU")

    big = synthetic_trace(1024, 30, 4, 2)
    build_s, build_cpu = median_time(lambda: plots.routing_heatmap(big), args.rounds)
    json_s, _ = median_time(lambda: plots.routing_heatmap(big).to_json(), args.rounds)
    print(f"heatmap 1024 tokens x 30 layers: built {build_s:.3f} s wall ({build_cpu:.3f} s CPU), "
          f"built + to_json {json_s:.3f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
