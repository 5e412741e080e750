"""Hidden-gate memory and time: whole base in memory vs leaf modules streamed from disk.

Each mode runs in its own process (max RSS is per process), side by side in one invocation:

    .venv/bin/python bench/make_synthetic.py /tmp/synth --experts 1 --layers 8 --hidden 1536 \\
        --intermediate 4096
    .venv/bin/python bench/bench_gates.py /tmp/synth/base
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_one(base: Path, mode: str, out: Path) -> None:
    sys.path.insert(0, str(ROOT))
    import torch

    from workbench.gates import compute as gates
    from workbench.gates import forward as base_forward
    from workbench.recipe import Recipe

    # Either way whatever the base's size: "whole" never streams, "stream" always does.
    base_forward.STREAM_ABOVE_BYTES = 10**15 if mode == "whole" else 0
    recipe = Recipe.model_validate({"base_model": str(base), "experts": [
        {"source_model": str(base), "positive_prompts": ["def add(a, b):", "import numpy as np"],
         "negative_prompts": ["Once upon a time"]},
        {"source_model": str(base), "positive_prompts": ["Tell me a story about a dragon."]},
    ]})
    start = time.perf_counter()
    vectors = gates.compute_gates(recipe, base, device="cpu").vectors
    seconds = time.perf_counter() - start
    torch.save(vectors, out)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
    print(json.dumps({"mode": mode, "seconds": round(seconds, 2), "max_rss_mb": peak}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("base", type=Path)
    parser.add_argument("--one", choices=["whole", "stream"], help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        run_one(args.base, args.one, args.out)
        return
    import torch

    results = {}
    for mode in ("whole", "stream"):
        out = Path(f"/tmp/bench-gates-{mode}.pt")
        done = subprocess.run([sys.executable, __file__, str(args.base), "--one", mode, "--out", str(out)],
                              capture_output=True, text=True, check=True)
        results[mode] = json.loads(done.stdout.strip().splitlines()[-1]) | {"vectors": torch.load(out)}
    diff = (results["whole"]["vectors"] - results["stream"]["vectors"]).abs().max().item()
    for mode in ("whole", "stream"):
        print(f"{mode:7s} {results[mode]['seconds']:6.1f} s  max RSS {results[mode]['max_rss_mb']} MB")
    print(f"max |gate difference| = {diff:.3g}")


if __name__ == "__main__":
    main()
