"""Forging an expert on the demo model: time, peak memory, and whether the style shows.

    .venv/bin/python bench/bench_forge.py assets/forge/pirate.jsonl --markers "arr,matey,ye ,be "

1. `python -m workbench forge demo:smollm2-135m-instruct DATA OUT` with the defaults, under
   `/usr/bin/time -v`: wall time and peak RSS of the whole command (model load included).
2. Greedy replies of the base and of the forged expert to 10 prompts that are in no example
   set; a reply "shows the style" when it contains one of `--markers` (case-insensitive).
Prints markdown.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

UNSEEN = ["What is the tallest mountain in the world?", "How do I make a cup of tea?",
          "Why do leaves change colour in autumn?", "What is a rainbow?", "How do I tie my shoes?",
          "What is the best way to save money?", "Tell me about elephants.", "How do magnets work?",
          "What should I pack for a holiday?", "Why do we need sleep?"]


def forge(data: Path, out: Path) -> tuple[float, float]:
    """(wall seconds, peak RSS MB) of the forge command with its defaults."""
    command = ["/usr/bin/time", "-v", sys.executable, "-m", "workbench", "forge",
               "demo:smollm2-135m-instruct", str(data), str(out)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=True)
    wall = re.search(r"Elapsed \(wall clock\) time .*: (?:(\d+):)?(\d+):([\d.]+)", done.stderr)
    hours, minutes, seconds = (float(g) if g else 0.0 for g in wall.groups())
    rss = float(re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr).group(1)) / 1024
    return hours * 3600 + minutes * 60 + seconds, rss


def replies(model_ref: str) -> list[str]:
    from workbench.chat import SamplingSettings, chat_streams, registry

    entry = registry().get(model_ref, device="cpu")
    settings = SamplingSettings(temperature=0, max_new_tokens=40)
    out = []
    for prompt in UNSEEN:
        stream = chat_streams(entry, [{"role": "user", "content": prompt}], settings)[0]
        out.append("".join(stream))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", type=Path)
    parser.add_argument("--markers", required=True, help="comma-separated words that show the style")
    args = parser.parse_args()
    markers = [m.lower() for m in args.markers.split(",") if m]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "expert"
        seconds, rss = forge(args.data, out)
        shows = lambda text: any(m in text.lower() for m in markers)  # noqa: E731
        base, forged = replies("demo:smollm2-135m-instruct"), replies(str(out))
    print(f"forge of {args.data} (defaults): {seconds:.1f} s, peak RSS {rss:.0f} MB\n")
    print(f"style shown in greedy replies to {len(UNSEEN)} unseen prompts: base "
          f"{sum(map(shows, base))}/{len(UNSEEN)}, forged {sum(map(shows, forged))}/{len(UNSEEN)}\n")
    print("| prompt | base | forged |\n|---|---|---|")
    for prompt, b, f in zip(UNSEEN, base, forged, strict=True):
        cell = lambda t: t.replace("|", "/").replace("\n", " ")[:90]  # noqa: E731
        print(f"| {prompt} | {cell(b)} | {cell(f)} |")


if __name__ == "__main__":
    main()
