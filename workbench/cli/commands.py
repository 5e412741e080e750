"""The CLI's parser and its recipe commands: `validate`, `gates`, `build` and `export-gguf`.

A thin layer over the same functions the UI calls. User errors print one readable message
and exit 1 (no traceback); Ctrl-C exits 130 and leaves no half-written output. Hub tokens
come from HF_TOKEN only, never from the command line (it shows in process listings).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from workbench.cli.inspect import add_commands, print_gate_warnings, print_score, seed
from workbench.errors import SourceError, WorkbenchError
from workbench.forge import ForgeSettings as ForgeDefaults
from workbench.models import env_token
from workbench.progress import Progress
from workbench.recipe import Problem, RecipeError, errors, read_recipe, validate

log = logging.getLogger("workbench")
REMOTE_CODE_HELP = ("allow an output family that transformers loads only with trust_remote_code "
                    "(architecture: deepseek); the workbench never runs that code")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.run(args)
    except RecipeError as exc:
        _print_problems(exc.problems)
        return 1
    except WorkbenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nstopped", file=sys.stderr)
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m workbench", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    cmd = commands.add_parser("validate", help="check a recipe and its models' configs")
    cmd.add_argument("recipe", help="recipe YAML file")
    cmd.add_argument("--json", action="store_true", help="print the problem list as JSON")
    cmd.add_argument("--allow-remote-code", action="store_true", help=REMOTE_CODE_HELP)
    cmd.set_defaults(run=cmd_validate)

    cmd = commands.add_parser("gates", help="compute router gates, their held-out score and diagnostics, "
                                            "no build")
    cmd.add_argument("recipe")
    cmd.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    cmd.add_argument("--seed", type=seed, default=0)
    cmd.add_argument("--compare", action="store_true",
                     help="score every gate mode side by side on the recipe's held-out prompts")
    cmd.add_argument("--json", action="store_true", help="print the result as JSON")
    cmd.set_defaults(run=cmd_gates)

    cmd = commands.add_parser("build", help="build the MoE checkpoint into OUT")
    cmd.add_argument("recipe")
    cmd.add_argument("out", help="output folder (created; must not exist unless --force)")
    cmd.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    cmd.add_argument("--dtype", default=None,
                     help="bfloat16, float16, float32 or float64 (default: the recipe's)")
    cmd.add_argument("--shard-size", default="5GB", help="largest shard, e.g. 5GB or 500MB")
    cmd.add_argument("--seed", type=seed, default=0, help="seed for random gates and noise")
    cmd.add_argument("--force", action="store_true", help="replace OUT once the new build is verified")
    cmd.add_argument("--allow-remote-code", action="store_true", help=REMOTE_CODE_HELP)
    cmd.set_defaults(run=cmd_build)

    cmd = commands.add_parser("export-gguf", help="write a built MoE as one GGUF file, with llama.cpp's "
                                                  "converter")
    cmd.add_argument("model", help="a built MoE's folder")
    cmd.add_argument("out", help="the .gguf file to write, or a folder for MODEL-TYPE.gguf")
    cmd.add_argument("--type", default="f16", metavar="TYPE",
                     help="f16 (default), bf16 or q8_0; for q4/q5 see the message it prints")
    cmd.add_argument("--force", action="store_true", help="write over an existing file once the new one "
                     "is checked")
    cmd.set_defaults(run=cmd_export_gguf)

    cmd = commands.add_parser("forge", help="train an expert's MLPs from examples, into a model folder OUT")
    cmd.add_argument("base", help="base model: hub id, local folder or demo:NAME")
    cmd.add_argument("data", help='JSON lines: {"prompt": ..., "reply": ...} (optional "system") '
                     'or {"text": ...}')
    cmd.add_argument("out", help="output folder (created; must not exist unless --force)")
    defaults = ForgeDefaults()
    cmd.add_argument("--steps", type=int, default=defaults.steps)
    cmd.add_argument("--lr", type=float, default=defaults.lr, help="AdamW learning rate")
    cmd.add_argument("--batch-size", type=int, default=defaults.batch_size)
    cmd.add_argument("--seed", type=seed, default=defaults.seed)
    cmd.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    cmd.add_argument("--layers", type=layer_range, default=None, metavar="A-B",
                     help="train only the MLPs of layers A to B (default: all)")
    cmd.add_argument("--force", action="store_true",
                     help="replace OUT (an earlier forge) once the new one is verified")
    cmd.set_defaults(run=cmd_forge)

    add_commands(commands)
    return parser


def layer_range(text: str) -> tuple[int, int]:
    """argparse type of --layers: "A-B" (or one layer "A"), whole numbers, A <= B."""
    first, _, last = text.partition("-")
    try:
        pair = int(first), int(last or first)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a layer range; write e.g. 10-29") from None
    if not 0 <= pair[0] <= pair[1]:
        raise argparse.ArgumentTypeError(f"{text!r}: the first layer must be 0 or more, not after the last")
    return pair


def _print_problems(problems: list[Problem]) -> None:
    for problem in problems:
        print(problem, file=sys.stderr)


def cmd_validate(args: argparse.Namespace) -> int:
    from workbench.models import read_configs

    try:
        recipe, problems = read_recipe(args.recipe)
        problems = problems + validate(recipe, read_configs(recipe.model_refs(), token=env_token()),
                                       allow_remote_code=args.allow_remote_code)
    except RecipeError as exc:
        problems = exc.problems
    failed = bool(errors(problems))
    if args.json:
        print(json.dumps({"ok": not failed, "problems": [p.to_dict() for p in problems]}, indent=2))
    else:
        _print_problems(problems)
        if not failed:
            print(f"ok: {args.recipe} is valid" + (f" ({len(problems)} warnings)" if problems else ""))
    return 1 if failed else 0


def cmd_gates(args: argparse.Namespace) -> int:
    from workbench.models import resolve

    recipe, problems = read_recipe(args.recipe)
    _print_problems(problems)
    with ProgressBar() as bar:
        base = resolve(recipe.base_model, token=env_token(), on_progress=bar)
        if base.adapter is not None:  # the gates would come from the base without it
            raise SourceError(f"base_model '{recipe.base_model}' applies a LoRA, which the gates cannot "
                              "read: merge it into the base first (peft's merge_and_unload) and name that "
                              "folder")
        if args.compare:
            return _compare(args, recipe, base.path, bar)
        from workbench.gates import scored_gates

        gates = scored_gates(recipe, base.path, device=args.device, seed=args.seed, on_progress=bar)
    from workbench.gates import explain

    names = recipe.expert_labels()
    score = gates.score
    report = gates.diagnostics.to_dict()
    words = explain(score, gates.diagnostics, names) if score else []
    if args.json:
        print(json.dumps({"command": "gates", "mode": gates.mode, "center_gates": bool(recipe.center_gates),
                          "shape": list(gates.vectors.shape), **report,
                          "score": score.to_dict() if score else None, "advice": words}, indent=2))
        return 0
    layers, experts, hidden = gates.vectors.shape
    print(f"gates: mode {gates.mode}, {layers} layers x {experts} experts x {hidden} hidden")
    if score is not None:
        print_score(score, names)
    print("layer  condition  (over 5: prompts too similar)")
    for layer, cond in enumerate(gates.diagnostics.condition_numbers):
        print(f"{layer:5d}  {cond:9.2f}{'  !' if cond > 5 else ''}")
    print("mean expert-expert cosine:")
    for row in gates.diagnostics.mean_cosine:
        print("  " + " ".join(f"{v:6.3f}" for v in row))
    for line in words:
        print(f"note: {line}")
    for warning in gates.diagnostics.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    return 0


def _compare(args: argparse.Namespace, recipe: Any, base_path: Path, bar: ProgressBar) -> int:
    from workbench.gates import compare_modes, explain

    started = time.perf_counter()
    results = compare_modes(recipe, base_path, device=args.device, seed=args.seed, on_progress=bar)
    seconds = time.perf_counter() - started
    bar.close()
    names = recipe.expert_labels()
    best = results[0]
    own = (recipe.gate_mode, bool(recipe.center_gates))
    current = next((r for r in results if (r.mode, r.center) == own), None)
    words = explain(current.score, current.gates.diagnostics, names) if current else []
    if args.json:
        print(json.dumps({"command": "gates", "compare": [r.to_dict() for r in results],
                          "best": {"gate_mode": best.mode, "center_gates": best.center},
                          "recipe_mode": {"gate_mode": recipe.gate_mode,
                                          "center_gates": bool(recipe.center_gates)},
                          "advice": words, "seconds": seconds}, indent=2))
        return 0
    score = best.score
    print(f"gate modes on {args.recipe}, held out ({score.held_out}); chance: top-1 {score.chance_top1:.3f}, "
          f"top-{score.k} {score.chance_topk:.3f}; perfect 1")
    print(f"  {'mode':22s} {'top-1':>6s} {f'top-{score.k}':>6s} {'seconds':>8s}")
    for r in results:
        mark = " <- recipe" if r is current else ""
        top1 = "-" if r.score.top1 is None else f"{r.score.top1:.3f}"
        topk = "-" if r.score.topk is None else f"{r.score.topk:.3f}"
        print(f"  {r.label:22s} {top1:>6s} {topk:>6s} {r.seconds:8.2f}{mark}")
    if current is not best:
        key = f"gate_mode: {best.mode}" + ("\n  center_gates: true" if best.center else "")
        print(f"best: {best.label}; to use it, set in the recipe:\n  {key}")
    for line in words:
        print(f"note: {line}")
    print(f"compared in {seconds:.1f} s")
    return 0


def cmd_forge(args: argparse.Namespace) -> int:
    from workbench.forge import ForgeSettings, forge_expert

    if not args.out.strip():
        raise WorkbenchError("OUT is empty; name the output folder, e.g. experts/pirate")
    settings = ForgeSettings(steps=args.steps, lr=args.lr, batch_size=args.batch_size, seed=args.seed,
                             layers=args.layers)
    with ProgressBar() as bar:
        result = forge_expert(args.base, Path(args.data), Path(args.out), settings, device=args.device,
                              force=args.force, token=env_token(), on_progress=bar)
    print(f"forged {result.path}: {result.examples} examples, {len(result.losses)} steps, loss "
          f"{result.losses[0]:.3f} -> {result.losses[-1]:.3f} in {result.seconds:.1f} s; use it as an "
          "expert's source_model")
    return 0


def cmd_build(args: argparse.Namespace) -> int:
    from workbench.build import build, parse_size

    if not args.out.strip():  # Path("") is the current folder: never build into it unasked
        raise WorkbenchError("OUT is empty; name the output folder, e.g. out/my-moe")
    recipe, problems = read_recipe(args.recipe)
    _print_problems(problems)
    try:
        shard_size = parse_size(args.shard_size)
    except (ValueError, WorkbenchError) as exc:
        raise WorkbenchError(f"--shard-size: {exc}") from exc
    with ProgressBar() as bar:
        result = build(recipe, Path(args.out), device=args.device, dtype=args.dtype,
                       shard_size=shard_size, seed=args.seed, force=args.force,
                       token=env_token(), on_progress=bar, allow_remote_code=args.allow_remote_code)
    print_gate_warnings(result.diagnostics.warnings)
    size = result.total_bytes / 1e9
    shared = f" + {len(recipe.shared_experts)} shared" if recipe.shared_experts else ""
    print(f"built {result.path}: {len(recipe.experts)} experts{shared} (top-{recipe.experts_per_token}), "
          f"{len(result.files)} files, {size:.2f} GB in {result.seconds:.1f} s")
    return 0


def cmd_export_gguf(args: argparse.Namespace) -> int:
    from workbench.build import export_gguf

    with ProgressBar() as bar:
        result = export_gguf(Path(args.model), Path(args.out), args.type.lower(), force=args.force,
                             on_progress=bar)
    print(f"wrote {result.path}: {result.size / 1e9:.2f} GB {result.file_type}, {result.tensor_count} "
          "tensors, "
          f"{result.arch} with {result.expert_count} experts ({result.expert_used_count} per token), "
          f"checked, in {result.seconds:.1f} s")
    return 0


QUIET_SECONDS = 10.0  # off a terminal: the longest silence within one stage


class ProgressBar:
    """Progress events as one redrawn line on a terminal, or a line per stage otherwise."""

    def __init__(self, stream=sys.stderr) -> None:
        self.stream = stream
        self.tty = stream.isatty()
        self.stage = ""
        self.started = self.printed = time.monotonic()
        self.drawn = False

    def __call__(self, event: Progress) -> None:
        if not self.tty:
            # A line per stage, and between them one every QUIET_SECONDS: a forge's training is
            # minutes of one stage, which otherwise printed nothing from "loading" to "writing".
            now = time.monotonic()
            if event.stage != self.stage or now - self.printed >= QUIET_SECONDS:
                print(f"[{event.stage}] {event.message}", file=self.stream, flush=True)
                self.printed = now
            self.stage = event.stage
            return
        if event.stage != self.stage:
            self.started = time.monotonic()
            if self.drawn:
                self.stream.write("\n")
        self.stage = event.stage
        fraction = min(max(event.fraction, 0.0), 1.0)
        filled = int(fraction * 30)
        elapsed = time.monotonic() - self.started
        eta = f" {elapsed / fraction - elapsed:4.0f}s left" if 0.02 < fraction < 1 else ""
        bar = "#" * filled + "." * (30 - filled)
        line = f"\r{event.stage:>8} [{bar}] {fraction:4.0%}{eta} {event.message}"
        self.stream.write(line[:120].ljust(120))
        self.stream.flush()
        self.drawn = True

    def close(self) -> None:
        if self.tty and self.drawn:
            self.stream.write("\n")
            self.stream.flush()
            self.drawn = False

    def filter(self, record: logging.LogRecord) -> bool:
        """As a logging filter: end the bar's line before a log line, which then stands alone
        and the bar redraws below it."""
        self.close()
        return True

    def __enter__(self) -> ProgressBar:
        for handler in logging.getLogger().handlers:
            handler.addFilter(self)
        return self

    def __exit__(self, *exc: object) -> None:
        for handler in logging.getLogger().handlers:
            handler.removeFilter(self)
        self.close()


