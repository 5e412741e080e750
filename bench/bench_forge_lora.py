"""Plain MLP forge against LoRA merged back (peft), side by side on the demo model (issue 13).

    .venv/bin/pip install peft                             # bench-only, not a project requirement
    .venv/bin/python bench/bench_forge_lora.py             # hero and villain, every variant
    .venv/bin/python bench/bench_forge_lora.py --set pirate --variant mlp --variant lora16-1e-3

Each variant forges each set through `forge.forge_expert` (load, train, write the folder) in a
child process of its own, so its peak RSS is its own; variants run in turn within a set, so load
from other work on the machine falls on all of them alike.

- `mlp...`: the workbench's training as shipped (`forge.train.train`), AdamW on gate/up/down_proj.
- `lora...`: peft adapters of rank r (alpha 2r, no dropout) on the same gate/up/down_proj of every
  layer, trained by that same loop (same seed, the same batches in the same order, AdamW, the same
  steps) with only the parameters it trains swapped for the adapters'; then `merge_and_unload()`
  folds them into the MLP weights and the folder is written as any forge writes it.

Per variant: seconds a step (median, step 1 left out as warm-up), the training loop's seconds,
the whole forge's seconds (load, train, write; in process, after imports), peak RSS of the child
as the forge ends (before the replies), the mean loss of the last pass over the set, and the share
of bench_forge's unseen prompts whose greedy reply shows the set's style. Prints markdown.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal
from unittest import mock

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bench_forge import BASE, MARKERS, SETS, UNSEEN, answers, cell, replies, shown  # noqa: E402


@dataclass(frozen=True)
class Variant:
    method: Literal["mlp", "lora"]
    steps: int
    lr: float
    rank: int = 0  # LoRA only


VARIANTS = {
    "mlp": Variant("mlp", 30, 5e-5),  # the shipped defaults
    "mlp-1e-4": Variant("mlp", 30, 1e-4),
    "lora16-2e-4": Variant("lora", 30, 2e-4, 16),
    "lora16-1e-3": Variant("lora", 30, 1e-3, 16),
    "lora64-1e-3": Variant("lora", 30, 1e-3, 64),
}
DEFAULT_VARIANTS = ["mlp", "lora16-2e-4", "lora16-1e-3", "lora64-1e-3"]


def lora_train(rank: int, model: Any, tokenizer: Any, examples: Any, settings: Any,
               **kwargs: Any) -> list[float]:
    """`forge.train.train` on LoRA adapters of the MLPs instead of the MLPs, merged back into `model`."""
    import torch
    from peft import LoraConfig, get_peft_model

    from workbench.forge import train as forge_train

    torch.manual_seed(settings.seed)  # the adapters' A matrices start random
    config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, bias="none",
                        target_modules=list(forge_train.MLP_PARTS))
    wrapped = get_peft_model(model, config)  # injects lora.Linear into `model` itself

    def adapters(module: Any, layers: Any) -> list[tuple[str, Any]]:
        return [(name, p) for name, p in module.named_parameters() if "lora_" in name]

    with mock.patch.object(forge_train, "mlp_parameters", adapters):
        losses = forge_train.train(model, tokenizer, examples, settings, **kwargs)
    merged = wrapped.merge_and_unload()
    if merged is not model or any("lora_" in name for name, _ in model.named_parameters()):
        raise RuntimeError("merge_and_unload did not fold the adapters back into the model")
    return losses


def forge_variant(variant: Variant, data: Path, out: Path, also_at: list[int]) -> dict[str, Any]:
    """Forge one variant in this process; its timings, losses, peak RSS and replies, also those of
    the model as it stands after each step in `also_at` (the learning rate is constant, so that is
    the model a forge of that many steps writes; a LoRA one unmerged, which computes the same)."""
    from workbench.chat.engine import wrap_model
    from workbench.forge import ForgeSettings, expert, forge_expert
    from workbench.forge.train import train

    steps: list[float] = []  # seconds of each training step, checkpoint replies left out
    early: dict[str, Any] = {}  # per step in also_at: replies, and seconds and RSS so far
    now: dict[str, Any] = {}  # the model and tokenizer being trained, and when the current step began

    def clock(event: Any) -> None:
        if event.stage != "forge" or not event.metrics or "step" not in event.metrics:
            return
        steps.append(time.monotonic() - now["since"])
        step = int(event.metrics["step"])
        if step in also_at and step < variant.steps:
            rss, began = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, time.monotonic()
            said = answers(wrap_model(now["model"], now["tokenizer"]))
            now["model"].train()  # wrap_model put it in eval mode
            early[str(step)] = {"train_s": sum(steps), "rss_mb": rss, "replies": said,
                                "replies_s": time.monotonic() - began}
        now["since"] = time.monotonic()

    inner = (lambda *a, **k: lora_train(variant.rank, *a, **k)) if variant.method == "lora" else train

    def timed(model: Any, tokenizer: Any, *args: Any, **kwargs: Any) -> list[float]:
        now.update(model=model, tokenizer=tokenizer, since=time.monotonic())
        return inner(model, tokenizer, *args, **kwargs)

    settings = ForgeSettings(steps=variant.steps, lr=variant.lr)
    with mock.patch.object(expert, "train", timed):
        result = forge_expert(BASE, data, out, settings, device="cpu", on_progress=clock)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux
    paused = sum(e["replies_s"] for e in early.values())
    last_pass = math.ceil(result.examples / settings.batch_size)
    return {"step_s": statistics.median(steps[1:] or steps), "train_s": sum(steps),
            "forge_s": result.seconds - paused, "rss_mb": peak_mb, "losses": result.losses,
            "last_pass": last_pass, "replies": replies(str(out)),
            "early": early}


def alternate(rounds: int, set_name: str) -> dict[str, list[float]]:
    """Seconds of each training step (forward, backward, AdamW) of the plain MLP forge and of LoRA
    r16 and r64, taken in turn in one process on the same batches, so every moment's load falls on
    all three alike; round 0 is warm-up and not kept. The order within a round alternates. Also
    the CPU seconds of each step (all torch threads together), which other work on a loaded
    machine hardly changes: with one thread, the step's own work."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from workbench.forge import mlp_parameters, read_examples
    from workbench.forge.train import MLP_PARTS, _batch, encode, reply_loss
    from workbench.models import resolve

    path = str(resolve(BASE).path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    rows = [encode(tokenizer, e, 512) for e in read_examples(SETS / f"{set_name}.jsonl").items]
    batches = [_batch(rows[i:i + 4], tokenizer.pad_token_id or 0, torch.device("cpu"))
               for i in range(0, len(rows) - 3, 4)]
    contenders = {}
    for name, rank in [("mlp", 0), ("lora16", 16), ("lora64", 64)]:
        model = AutoModelForCausalLM.from_pretrained(path, dtype="float32", use_safetensors=True)
        model.requires_grad_(False)
        if rank:
            torch.manual_seed(0)
            get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(MLP_PARTS)))
            trained = [p for n, p in model.named_parameters() if "lora_" in n]
        else:
            trained = [p for _, p in mlp_parameters(model, None)]
        for p in trained:
            p.requires_grad_(True)
        contenders[name] = (model.train(), torch.optim.AdamW(trained, lr=1e-4, weight_decay=0.0))
    seconds: dict[str, list[float]] = {f"{name}{kind}": [] for name in contenders for kind in ("", " CPU")}
    for step in range(rounds + 1):
        batch = batches[step % len(batches)]
        for name in sorted(contenders, reverse=step % 2 == 1):
            model, optimiser = contenders[name]
            began, cpu = time.monotonic(), time.process_time()
            loss = reply_loss(model, batch)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            if step:
                seconds[name].append(time.monotonic() - began)
                seconds[name + " CPU"].append(time.process_time() - cpu)
    return seconds


def run_child(name: str, set_name: str, tmp: Path, threads: int | None, also_at: list[int]) -> dict[str, Any]:
    report = tmp / f"{set_name}-{name}.json"
    command = [sys.executable, __file__, "--child", name, "--set", set_name, "--report", str(report),
               "--out", str(tmp / f"{set_name}-{name}"), f"--steps={VARIANTS[name].steps}",
               *(f"--also-at={step}" for step in also_at)]
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {}))
    subprocess.run(command, cwd=ROOT, env=env, check=True)
    return json.loads(report.read_text())


def rows_of(set_name: str, name: str, got: dict[str, Any], load: float, base: list[str]) -> list[str]:
    """The variant's table row, then one per checkpoint (as the forge of that many steps would be)."""
    v = VARIANTS[name]
    how = "MLP" if v.method == "mlp" else f"LoRA r{v.rank}"
    out = []
    for step, seen in [(v.steps, got), *((int(k), e) for k, e in got["early"].items())]:
        loss = statistics.fmean(got["losses"][:step][-got["last_pass"]:])  # the last pass over the set
        forge_s = got["forge_s"] - got["train_s"] + seen["train_s"]  # load and write as the full forge's
        mark = "" if step == v.steps else " (checkpoint)"
        out.append(f"| `{set_name}` | {how}, lr {v.lr:g}, {step} steps{mark} | {load:.1f} | "
                   f"{got['step_s']:.2f} s | {seen['train_s']:.1f} s | {forge_s:.1f} s | "
                   f"{seen['rss_mb']:.0f} MB | {got['losses'][0]:.2f} -> {loss:.2f} | "
                   f"{shown(set_name, base)}/{len(UNSEEN)} | "
                   f"**{shown(set_name, seen['replies'])}/{len(UNSEEN)}** |")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--set", dest="sets", action="append", choices=sorted(MARKERS),
                        help="a set in assets/forge/ (repeatable; default: hero and villain)")
    parser.add_argument("--variant", dest="variants", action="append", choices=sorted(VARIANTS),
                        help=f"repeatable; default: {' '.join(DEFAULT_VARIANTS)}")
    parser.add_argument("--also-at", type=int, action="append",
                        help="also score each variant's model after this many steps (repeatable; default 20)")
    parser.add_argument("--threads", type=int,
                        help="torch threads of each forge (OMP_NUM_THREADS); default torch's, one a core. "
                             "On a loaded machine 1 is several times faster than 2 fighting for the cores")
    parser.add_argument("--steps", type=int, help="every variant trains this many steps (a quick check)")
    parser.add_argument("--alternate", type=int, metavar="ROUNDS",
                        help="instead: time ROUNDS steps of MLP, LoRA r16 and r64 in turn in one process")
    parser.add_argument("--json", type=Path, help="also write every measurement here")
    parser.add_argument("--child", choices=sorted(VARIANTS), help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--report", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    sets = args.sets or ["hero", "villain"]
    also_at = args.also_at or [20]
    if args.steps:
        VARIANTS.update({name: replace(v, steps=args.steps) for name, v in VARIANTS.items()})
    if args.alternate:
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        load, seconds = os.getloadavg()[0], alternate(args.alternate, sets[0])
        print(f"`{sets[0]}`, {args.alternate} steps each in turn, load at start {load:.1f}, torch threads "
              f"{args.threads or 'default'}:\n\n| method | s/step median | min | max |\n|---|---|---|---|")
        for name, took in seconds.items():
            print(f"| {name} | {statistics.median(took):.2f} | {min(took):.2f} | {max(took):.2f} |")
        return
    if args.child:
        found = forge_variant(VARIANTS[args.child], SETS / f"{sets[0]}.jsonl", args.out, also_at)
        args.report.write_text(json.dumps(found))
        return
    names = args.variants or DEFAULT_VARIANTS
    uptime = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    base = replies(BASE)
    rows, found = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for set_name in sets:
            for name in names:
                load = os.getloadavg()[0]
                got = run_child(name, set_name, Path(tmp), args.threads, also_at)
                found[f"{set_name}/{name}"] = {**got, "load": load}
                rows += rows_of(set_name, name, got, load, base)
                if args.json:
                    args.json.write_text(json.dumps({"uptime": uptime, "base": base, "found": found}))
    print(f"At start: `{uptime}`; torch threads: {args.threads or 'default'}\n")
    print("| set | variant | load at start | s/step (median) | training | forge (load, train, write) | "
          "peak RSS | loss: step 1 -> last pass | base | forged |\n|---|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    for set_name in sets:
        print(f"\n`{set_name}.jsonl`, greedy replies (40 tokens at most, cut to 90 characters):\n")
        print("| prompt | base | " + " | ".join(names) + " |\n" + "|---" * (len(names) + 2) + "|")
        for i, prompt in enumerate(UNSEEN):
            print(f"| {prompt} | {cell(base[i])} | "
                  + " | ".join(cell(found[f"{set_name}/{name}"]["replies"][i]) for name in names) + " |")


if __name__ == "__main__":
    main()
