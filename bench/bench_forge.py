"""Forging an expert on the demo model: time, peak memory, and whether the style shows.

    .venv/bin/python bench/bench_forge.py                 # every set in assets/forge/
    .venv/bin/python bench/bench_forge.py --set villain   # one (repeat --set for more)

1. For each set, `python -m workbench forge demo:smollm2-135m-instruct assets/forge/SET.jsonl
   OUT` with the defaults, under `/usr/bin/time -v`: wall time and peak RSS of the whole
   command (model load included), and the 1-minute load average as it starts.
2. Greedy replies of the base (once) and of each forged expert to 10 prompts that are in no
   example set; a reply "shows the style" when it matches one of the set's `MARKERS`. The
   base's replies are scored with every set's markers: a detector the base passes measures
   nothing.
Prints markdown.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BASE = "demo:smollm2-135m-instruct"
SETS = ROOT / "assets" / "forge"
log = logging.getLogger("bench_forge")
UNSEEN = ["What is the tallest mountain in the world?", "How do I make a cup of tea?",
          "Why do leaves change colour in autumn?", "What is a rainbow?", "How do I tie my shoes?",
          "What is the best way to save money?", "Tell me about elephants.", "How do magnets work?",
          "What should I pack for a holiday?", "Why do we need sleep?"]

# Each set's signature phrases, as regular expressions matched case-insensitively on word
# boundaries. Words plain English uses ("be", "most", "shall") are left out on purpose, so the
# base's replies score low and a forged share means the style, not the topic.
MARKERS = {
    "pirate": [r"arr", r"matey", r"ye", r"o'"],
    "victorian": [r"i have the honour", r"most assuredly", r"pray", r"indeed"],
    "hero": [r"fear not", r"friends?", r"courage\w*", r"right thing", r"hero(es|ic)?"],
    "villain": [r"mwa+h[ah]*", r"mua+h[ah]*", r"foolish", r"schem\w*", r"minions?", r"villain\w*", r"capes?"],
}
DETECTORS = {name: re.compile(r"\b(?:" + "|".join(words) + r")(?!\w)", re.IGNORECASE)
             for name, words in MARKERS.items()}


def shipped_sets() -> list[str]:
    """The sets in assets/forge/; each must have its markers here, or its share means nothing."""
    names = sorted(path.stem for path in SETS.glob("*.jsonl"))
    missing = [name for name in names if name not in MARKERS]
    if missing:
        raise SystemExit(f"no MARKERS for {', '.join(missing)}: add their signature phrases to {__file__}")
    return names


def shown(name: str, replies: list[str]) -> int:
    return sum(bool(DETECTORS[name].search(reply)) for reply in replies)


def forge(data: Path, out: Path) -> tuple[float, float]:
    """(wall seconds, peak RSS MB) of the forge command with its defaults."""
    command = ["/usr/bin/time", "-v", sys.executable, "-m", "workbench", "forge", BASE, str(data), str(out)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=True)
    wall = re.search(r"Elapsed \(wall clock\) time .*: (?:(\d+):)?(\d+):([\d.]+)", done.stderr)
    hours, minutes, seconds = (float(g) if g else 0.0 for g in wall.groups())
    rss = float(re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr).group(1)) / 1024
    return hours * 3600 + minutes * 60 + seconds, rss


def replies(model_ref: str) -> list[str]:
    """Greedy replies to UNSEEN; the model is unloaded afterwards (a forged one is in a temp dir)."""
    from workbench.chat import registry

    out = answers(registry().get(model_ref, device="cpu"))
    registry().unload(model_ref, device="cpu")
    return out


def answers(entry: Any) -> list[str]:
    """Greedy replies to UNSEEN of a loaded model: a registry entry, or `chat.engine.wrap_model`'s."""
    from workbench.chat import SamplingSettings, chat_streams

    settings = SamplingSettings(temperature=0, max_new_tokens=40)
    return ["".join(chat_streams(entry, [{"role": "user", "content": prompt}], settings)[0])
            for prompt in UNSEEN]


def cell(text: str) -> str:
    return text.replace("|", "/").replace("\n", " ")[:90]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--set", dest="sets", action="append", choices=sorted(MARKERS),
                        help="a set in assets/forge/ (repeatable; default: every shipped set)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    names = args.sets or shipped_sets()
    base = replies(BASE)
    rows, forged = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            load = os.getloadavg()[0]
            seconds, rss = forge(SETS / f"{name}.jsonl", Path(tmp) / name)
            forged[name] = replies(str(Path(tmp) / name))
            share = f"{shown(name, base)}/{len(UNSEEN)} | **{shown(name, forged[name])}/{len(UNSEEN)}**"
            rows.append(f"| `{name}.jsonl` | {load:.1f} | {seconds:.1f} s | {rss:.0f} MB | {share} |")
            log.info("%s: load %.1f, %.1f s, %.0f MB, base / forged %s", name, load, seconds, rss, share)
    print(f"Forges with the defaults, whole command; style shown in greedy replies to {len(UNSEEN)} "
          "unseen prompts (`MARKERS` in bench/bench_forge.py):\n")
    print("| set | load at start | forge | peak RSS | base | forged |\n|---|---|---|---|---|---|")
    print("\n".join(rows))
    for name in names:
        print(f"\n`{name}.jsonl`, greedy replies (40 tokens at most, cut to 90 characters):\n")
        print("| prompt | base | forged |\n|---|---|---|")
        for prompt, b, f in zip(UNSEEN, base, forged[name], strict=True):
            print(f"| {prompt} | {cell(b)} | {cell(f)} |")


if __name__ == "__main__":
    main()
