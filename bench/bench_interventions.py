"""Steering the router live: a prompt edit to a reply under the new routers, and an intervention's cost.

(a) Prompt edit -> reply under the new routers, on the demo preset (presets/demo.yaml: four
    copies of SmolLM2-135M-Instruct, gate_mode fitted, top-2), every round with a newly
    edited prompt so that nothing is cached:
    - swap: what the Chat tab's third pane does (`steer_logic.resolve`: the edited recipe's
      gates from the loaded base, rounded as a build writes them, swapped in for one reply),
      then the reply;
    - rebuild: what the presenter did before, `python -m workbench build --force` (a child
      process, as the app's Build tab runs it), unload the old MoE, load the new one, the reply.
    Both arms generate the same reply (greedy, same prompt and length); "beyond the reply" is
    the arm's time minus its reply's own time. The arms alternate, rebuild first in odd rounds.
(b) Per-token cost of an active intervention on the saved demo MoE: decode steps of replies
    with no intervention and with interventions, one token of each in turn (a noisy machine
    hits them alike), greedy; median step per configuration and its ratio to none. "swapped,
    unchanged" swaps in the MoE's own routers (routing identical, only the override runs);
    "ban + temperature" bans an expert and warms the router; "force e0" sends every token to
    one expert (the other top-k slot has weight 0 and is skipped).
(c) The override alone, where a loaded machine's noise cannot hide it: the MoE's routers
    called on one token, saved and overridden (installed and removed each time, as a decode
    step does), in alternating blocks; the difference per token against (b)'s median step.

    .venv/bin/python bench/bench_interventions.py --rounds 3 --tokens 32 --decode-rounds 5
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bench_chat import interleaved_steps  # noqa: E402
from workbench.chat import ReplyStream, SamplingSettings, prepare, registry  # noqa: E402
from workbench.routing import Force, Intervention, Steering, find_routers, router_weights  # noqa: E402
from workbench.ui import steer_logic  # noqa: E402

PRESET = ROOT / "presets" / "demo.yaml"
QUESTION = "Write a Python function that reverses a list, then explain it in two sentences."


def edited(text: str, n: int) -> str:
    """The preset with its first positive prompt edited (a new prompt every call)."""
    old = '"Write a Python function that reverses a linked list."'
    assert old in text, "the demo preset changed: edit another prompt"
    new = f'"Write a Python function that reverses a linked list, edit {n} at {time.time()}."'
    return text.replace(old, new)


def reply(entry, settings: SamplingSettings, intervention=None) -> ReplyStream:
    (prompt,) = prepare(QUESTION, settings, [entry.tokenizer], [entry.context_length])
    stream = ReplyStream(entry, prompt, settings, intervention=intervention)
    list(stream)
    return stream


def build_cli(recipe: Path, out: Path) -> None:
    command = [sys.executable, "-m", "workbench", "build", str(recipe), str(out), "--device", "cpu",
               "--force"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"build failed: {done.stderr[-2000:]}")


def swap_round(text: str, moe, settings: SamplingSettings) -> dict[str, float]:
    started, cpu = time.perf_counter(), time.process_time()
    intervention, _, routers_s = steer_logic.resolve(steer_logic.spec(routers=steer_logic.RECIPE, revision=1),
                                                     text, moe, device="cpu")
    routers_cpu = time.process_time() - cpu
    stream = reply(moe, settings, intervention)
    total = time.perf_counter() - started
    return {"total": total, "reply": stream.result.stats.total_s, "routers": routers_s,
            "routers_cpu": routers_cpu, "tokens": stream.result.stats.new_tokens}


def rebuild_round(text: str, work: Path, settings: SamplingSettings) -> dict[str, float]:
    recipe, out = work / "edited.yaml", work / "rebuilt"
    recipe.write_text(text, encoding="utf-8")
    started, children = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
    build_cli(recipe, out)
    built, after = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
    build_cpu = (after.ru_utime + after.ru_stime) - (children.ru_utime + children.ru_stime)
    registry().unload(str(out))
    moe = registry().get(str(out), device="cpu")
    loaded = time.perf_counter()
    stream = reply(moe, settings)
    total = time.perf_counter() - started
    return {"total": total, "reply": stream.result.stats.total_s, "build": built - started,
            "build_cpu": build_cpu, "load": loaded - built, "tokens": stream.result.stats.new_tokens}


def median(rows: list[dict[str, float]], key: str) -> float:
    return statistics.median(r[key] for r in rows)


def edit_to_reply(args: argparse.Namespace, moe) -> None:
    text = PRESET.read_text(encoding="utf-8")
    settings = SamplingSettings(temperature=0, max_new_tokens=args.tokens)
    swap_round(edited(text, -1), moe, SamplingSettings(temperature=0, max_new_tokens=2))  # warm-up
    swaps, rebuilds = [], []
    for r in range(args.rounds):
        arms = [("swap", swaps), ("rebuild", rebuilds)]
        for name, rows in (arms[::-1] if r % 2 == 0 else arms):
            new = edited(text, r * 2 + (name == "swap"))
            rows.append(swap_round(new, moe, settings) if name == "swap" else
                        rebuild_round(new, args.work, settings))
            print(f"  round {r + 1} {name:7s} " + " ".join(f"{k} {v:.2f}" for k, v in rows[-1].items()),
                  flush=True)
    print(f"(a) prompt edit -> reply under the new routers, {args.tokens} greedy tokens, {args.rounds} "
          "rounds (median):")
    for name, rows in (("swap", swaps), ("rebuild", rebuilds)):
        beyond = statistics.median(r["total"] - r["reply"] for r in rows)
        if name == "swap":
            parts = f"routers {median(rows, 'routers'):.2f} s, {median(rows, 'routers_cpu'):.2f} CPU s"
        else:
            parts = (f"build {median(rows, 'build'):.2f} s, {median(rows, 'build_cpu'):.2f} CPU s; "
                     f"load {median(rows, 'load'):.2f} s")
        print(f"  {name:8s} total {median(rows, 'total'):6.2f} s = reply {median(rows, 'reply'):5.2f} s + "
              f"beyond the reply {beyond:5.2f} s ({parts})")
    ratios = [(b["total"] - b["reply"]) / (s["total"] - s["reply"])
              for s, b in zip(swaps, rebuilds, strict=True)]
    print(f"  beyond the reply, rebuild / swap per round: {', '.join(f'{x:.1f}' for x in ratios)}")


def decode_cost(args: argparse.Namespace, moe) -> None:
    own = router_weights(moe.model)  # (L, E, H): swapping these in routes exactly as saved
    configs = {"none": None,
               "swapped, unchanged": Intervention().with_routers(own, "its own routers"),
               "ban + temperature": Intervention(ban=(3,), temperature=2.0),
               "force e0": Intervention(force=(Force(0),))}
    settings = SamplingSettings(temperature=0, max_new_tokens=args.tokens)

    def streams(tokens: int) -> dict[str, ReplyStream]:
        out = {}
        for name, intervention in configs.items():
            (prompt,) = prepare(QUESTION, settings, [moe.tokenizer], [moe.context_length])
            out[name] = ReplyStream(moe, prompt, SamplingSettings(temperature=0, max_new_tokens=tokens),
                                    intervention=intervention)
        return out

    interleaved_steps(streams(4))  # warm-up
    steps: dict[str, list[float]] = {name: [] for name in configs}
    per_round: dict[str, list[float]] = {name: [] for name in configs}
    for _ in range(args.decode_rounds):
        got = interleaved_steps(streams(args.tokens))
        base = statistics.median(got["none"][1:-1])
        for name, times in got.items():
            steps[name].extend(times[1:-1])  # decode steps only: no prefill, no end
            per_round[name].append(statistics.median(times[1:-1]) / base)
    print(f"(b) decode step per configuration, {args.tokens} greedy tokens x {args.decode_rounds} rounds, "
          "interleaved token by token:")
    none = statistics.median(steps["none"])
    for name, times in steps.items():
        step = statistics.median(times)
        rounds = ", ".join(f"{x:.3f}" for x in per_round[name])
        print(f"  {name:20s} median step {1000 * step:7.2f} ms  x{step / none:.3f} of none  "
              f"(per round: {rounds}; {len(times)} steps)")
    router_cost(moe, none)


def router_cost(moe, decode_step: float, blocks: int = 20, calls: int = 50) -> None:
    """(c) What the override itself costs per token: every router of the MoE called on one
    token's state, saved against overridden, in alternating blocks, plus installing and
    removing the override once (what each decode step does)."""
    routers = [module for _, module in find_routers(moe.model)]
    x = torch.randn(1, moe.model.config.hidden_size)
    steering = Steering(moe.model, Intervention(ban=(3,), temperature=2.0))

    def token() -> None:
        for router in routers:
            router(x)

    def timed(fn) -> float:
        started = time.perf_counter()
        for _ in range(calls):
            fn()
        return (time.perf_counter() - started) / calls

    def steered_token() -> None:
        with steering.applied():
            token()

    plain, steered = [], []
    with torch.inference_mode():
        for _ in range(blocks):
            plain.append(timed(token))
            steered.append(timed(steered_token))
    saved, overridden = statistics.median(plain), statistics.median(steered)
    extra = overridden - saved
    print(f"(c) the routers of one decode step ({len(routers)}): saved {1000 * saved:.3f} ms, overridden "
          f"(installed and removed) {1000 * overridden:.3f} ms: +{1000 * extra:.3f} ms per token = "
          f"{100 * extra / decode_step:.2f}% of the median decode step")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/moe-bench-steer"))
    parser.add_argument("--rounds", type=int, default=3, help="rounds of (a), each arm once")
    parser.add_argument("--tokens", type=int, default=32, help="new tokens per reply")
    parser.add_argument("--decode-rounds", type=int, default=5, help="rounds of (b)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-edit", action="store_true", help="only (b)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cpus, torch threads "
          f"{torch.get_num_threads()}, torch {torch.__version__}; load average at start "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    saved = args.work / "saved"
    if not (saved / "config.json").is_file():
        build_cli(PRESET, saved)
    base = registry().get("demo:smollm2-135m-instruct", device="cpu")  # as in the app: base and MoE loaded
    moe = registry().get(str(saved), device="cpu")
    assert base is not None and moe.is_moe
    if not args.skip_edit:
        edit_to_reply(args, moe)
    decode_cost(args, moe)
    print(f"load average at the end {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
