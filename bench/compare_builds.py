"""Time a build of this checkout beside one of another checkout (an older commit) and mergekit-moe.

A before/after number is only worth the run it comes from on a shared machine, so the three
tools run in the same rounds, the order rotated each round, measured as bench_build.py measures
(`/usr/bin/time -v`, the process tree's sampled RSS, page cache per `--cache`). The other
checkout is any folder holding the workbench package, e.g. an export of an older commit:

    git archive c359916 | (mkdir -p /tmp/wb-before && tar -x -C /tmp/wb-before)
    .venv/bin/python bench/compare_builds.py /tmp/bench-mid --ref /tmp/wb-before --experts 4 \\
        --mode hidden --rounds 3 --nice 10
"""

from __future__ import annotations

import argparse
import logging
import shlex
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_build as bb  # noqa: E402  (this folder on sys.path first)


def workbench_case(root: Path, tool: str, recipe: Path, out: Path, models: Path, nice: int) -> bb.Case:
    build = [str(bb.WORKBENCH_PY), "-m", "workbench", "build", str(recipe), str(out), "--device", "cpu",
             "--force"]
    # `python -m workbench` takes the package from the working directory: the checkout's own code.
    return bb.Case(tool, "", ["sh", "-c", f"cd {shlex.quote(str(root))} && exec {shlex.join(build)}"], out,
                   models, nice)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", type=Path, help="folder from make_synthetic.py (base/, expert-K/)")
    parser.add_argument("--ref", type=Path, required=True, help="the other checkout (holds workbench/)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench-work"), help="recipes, outputs, logs")
    parser.add_argument("--experts", type=int, help="experts in the recipe (default: one per folder)")
    parser.add_argument("--mode", default="hidden", help="gate mode of the recipe (default hidden)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--cache", choices=bb.CACHE_MODES, default="empty")
    parser.add_argument("--nice", type=int, default=0, help="as bench_build.py --nice (root only)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logs = args.work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    recipe = bb.write_recipe(args.models, args.work, args.mode, args.experts)
    root = Path(__file__).resolve().parents[1]
    mk_out = args.work / "out-mergekit"
    cases = [workbench_case(args.ref.resolve(), "ref", recipe, args.work / "out-ref", args.models, args.nice),
             workbench_case(root, "this", recipe, args.work / "out-this", args.models, args.nice),
             bb.Case("mergekit", "", bb.command("mergekit", recipe, mk_out), mk_out, args.models, args.nice)]
    for case in cases:  # warm-up: .pyc files, page cache; not reported
        bb.measure(case, logs, cache=args.cache)
    runs = []
    for k in range(args.rounds):
        order = cases[k % len(cases):] + cases[:k % len(cases)]
        runs += [bb.measure(case, logs, round_no=k + 1, cache=args.cache) for case in order]
    by_round = {k: {r.tool: r.seconds for r in runs if r.round == k} for k in range(1, args.rounds + 1)}
    print(f"{args.mode} gates, {args.rounds} rounds; this checkout: git "
          f"{bb.shell(f'git -C {root} rev-parse --short HEAD')}; ref: {args.ref}\n")
    print("| build | s, median (range) | CPU s | peak RSS MB, largest process | tree anon + file MB "
          "| mergekit / it, per round: median (range) |")
    print("|---|---|---|---|---|---|")
    for case in cases:
        mine = [r for r in runs if r.tool == case.tool]
        secs = [r.seconds for r in mine]
        ratios = [t["mergekit"] / t[case.tool] for t in by_round.values()]
        ratio = "" if case.tool == "mergekit" else (f"{statistics.median(ratios):.2f} "
                                                    f"({min(ratios):.2f}-{max(ratios):.2f})")
        print(f"| {case.tool} | {statistics.median(secs):.1f} ({min(secs):.1f}-{max(secs):.1f}) | "
              f"{statistics.median(r.cpu_seconds for r in mine):.1f} | "
              f"{max(r.max_rss_mb for r in mine):.0f} | "
              f"{max(r.anon_mb + r.file_mb for r in mine):.0f} | {ratio} |")
    print("\n| round | tool | s | CPU s | max RSS MB | anon MB | file MB |\n|---|---|---|---|---|---|---|")
    for r in runs:
        print(f"| {r.round} | {r.tool} | {r.seconds:.1f} | {r.cpu_seconds:.1f} | {r.max_rss_mb:.0f} | "
              f"{r.anon_mb:.0f} | {r.file_mb:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
