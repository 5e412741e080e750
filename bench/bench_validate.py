"""How long `validate` takes on recipes that once froze the server: an alias bomb, deep
nesting, and presets naming Hub models while offline.

Each case runs `python -m workbench validate FILE` in its own process, `--rounds` times, one
case after another in turn; the median wall time and the largest peak RSS are reported.
Run it with no network (the way these cases hurt); HF_HUB_OFFLINE must be unset, since it
makes huggingface_hub answer from its cache without trying the network at all.

    .venv/bin/python bench/bench_validate.py --rounds 5
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def alias_bomb() -> str:
    lines = ['l0: &l0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    lines += [f"l{i}: &l{i} [" + ",".join([f"*l{i - 1}"] * 9) + "]" for i in range(1, 9)]
    return "\n".join(lines) + "\nbase_model: *l8\nexperts:\n  - source_model: x\n"


def cases(folder: Path) -> dict[str, Path]:
    (folder / "alias-bomb.yaml").write_text(alias_bomb())
    (folder / "nested.yaml").write_text("base_model: " + "[" * 20_000 + "]" * 20_000 + "\n")
    found = {"alias bomb (521 bytes, 9**9 values)": folder / "alias-bomb.yaml",
             "YAML nested 20,000 deep": folder / "nested.yaml"}
    for name in ("cognito-2x7b", "raiden-16x3b", "mistral-4x7b"):
        found[f"preset {name} (Hub ids, offline)"] = ROOT / "presets" / f"{name}.yaml"
    return found


def run(path: Path) -> tuple[float, int, int]:
    """(seconds, exit code, peak RSS in MB) of one validate."""
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "workbench", "validate", str(path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    seconds = time.perf_counter() - started
    peak = max(before, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
    return seconds, done.returncode, peak // 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        found = cases(Path(tmp))
        times: dict[str, list[float]] = {name: [] for name in found}
        codes: dict[str, int] = {}
        peaks: dict[str, int] = {}
        for _ in range(args.rounds):
            for name, path in found.items():
                seconds, code, peak = run(path)
                times[name].append(seconds)
                codes[name] = code
                peaks[name] = max(peaks.get(name, 0), peak)
    print("| case | exit | median s | range s | peak RSS MB (largest child so far) |")
    print("|---|---|---|---|---|")
    for name, values in times.items():
        print(f"| {name} | {codes[name]} | {statistics.median(values):.2f} | "
              f"{min(values):.2f}-{max(values):.2f} | {peaks[name]} |")


if __name__ == "__main__":
    main()
