"""Held-out routing of every gate mode on a recipe, and what `fitted` gates cost from disk.

    .venv/bin/python bench/bench_fitted.py presets/demo.yaml
    .venv/bin/python bench/bench_fitted.py presets/demo.yaml --base /tmp/bench-models/base --no-compare

1. The comparison (`workbench.gates.compare_modes`, base loaded once): held-out top-1 and
   top-k of every mode, and the seconds each mode's gates take for the whole recipe.
2. `fitted` gates in a fresh process, as a build's gate worker computes them: load the
   base (streamed leaf by leaf above 1 GB on the CPU), run every prompt, fit; wall time
   of each part and the process's peak RSS.

`--base` replaces the recipe's base model (the prompts stay), e.g. with a synthetic base
from `bench/make_synthetic.py`, to see the cost at a larger size. Prints markdown.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from workbench.recipe import read_recipe  # noqa: E402  (repo root on sys.path first)


def recipe_of(path: str, base: str | None):
    recipe, _ = read_recipe(path)
    if base:
        experts = [e.model_copy(update={"source_model": base}) for e in recipe.experts]
        recipe = recipe.model_copy(update={"base_model": base, "experts": experts})
    return recipe


def fitted_from_disk(path: str, base: str | None) -> dict:
    """In this process: fitted gates from nothing loaded, each part timed."""
    from workbench.gates.bank import collect
    from workbench.gates.fit import fit_bank
    from workbench.gates.forward import load_base, load_tokenizer
    from workbench.models import resolve

    recipe = recipe_of(path, base)
    folder = resolve(recipe.base_model).path
    times = {}
    started = time.perf_counter()
    model, tokenizer = load_base(folder, "cpu"), load_tokenizer(folder)
    times["load_s"] = time.perf_counter() - started
    mark = time.perf_counter()
    bank = collect(model, tokenizer, recipe, probes=False)
    times["forwards_s"] = time.perf_counter() - mark
    mark = time.perf_counter()
    fit_bank(bank)
    times["fit_s"] = time.perf_counter() - mark
    times["total_s"] = time.perf_counter() - started
    times["tokens"] = sum(p.tokens.shape[1] for p in bank.prompts)
    times["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return times


def compare(path: str, base: str | None) -> str:
    from workbench.gates import compare_modes
    from workbench.models import resolve

    recipe = recipe_of(path, base)
    folder = resolve(recipe.base_model).path
    started = time.perf_counter()
    results = compare_modes(recipe, folder, device="cpu")
    seconds = time.perf_counter() - started
    first = results[0].score
    lines = [f"held out: {first.held_out}; chance top-1 {first.chance_top1:.3f}, top-{first.k} "
             f"{first.chance_topk:.3f}; comparison {seconds:.1f} s in all (base load included)\n",
             f"| mode | held-out top-1 | held-out top-{first.k} | gates, s |", "|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r.label} | {r.score.top1:.3f} | {r.score.topk:.3f} | {r.seconds:.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe")
    parser.add_argument("--base", help="replace the recipe's base (and sources) with this model")
    parser.add_argument("--no-compare", action="store_true", help="only the fitted gates from disk")
    parser.add_argument("--fitted-only", action="store_true", help=argparse.SUPPRESS)  # the child's part
    args = parser.parse_args()
    if args.fitted_only:
        print(json.dumps(fitted_from_disk(args.recipe, args.base)))
        return
    if not args.no_compare:
        print(compare(args.recipe, args.base))
    child = [sys.executable, __file__, args.recipe, "--fitted-only"]
    child += ["--base", args.base] if args.base else []
    found = json.loads(subprocess.run(child, check=True, capture_output=True, text=True).stdout)
    print(f"\nfitted gates from disk, fresh process ({found['tokens']} prompt tokens): load "
          f"{found['load_s']:.2f} s, forwards {found['forwards_s']:.2f} s, fit {found['fit_s']:.2f} s, "
          f"total {found['total_s']:.2f} s; peak RSS {found['peak_rss_mb']:.0f} MB")


if __name__ == "__main__":
    main()
