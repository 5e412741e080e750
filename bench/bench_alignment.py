"""The alignment demo end to end, offline: forge the hero and the villain, build the preset, and
measure whether a theme's prompt gets that expert's style from the MoE and not from the base.

    .venv/bin/python bench/bench_alignment.py                  # forge, build, chat (~6 min, 2 cores)
    .venv/bin/python bench/bench_alignment.py --keep DIR       # keep (or reuse) the experts and MoE in DIR

1. `python -m workbench forge demo:smollm2-135m-instruct assets/forge/{hero,villain}.jsonl`
   with the defaults, then `python -m workbench build` of presets/alignment-demo.yaml pointed at
   them; wall time of each command.
2. Greedy replies (temperature 0, 48 tokens) of the MoE and of the base to 15 prompts in no
   prompt list and no example set, five per theme (hero, villain, plain). A reply shows a style
   when it matches that set's markers (bench_forge.MARKERS); the MoE's reply tokens are traced
   and the expert that won most of them at top-1 (over all layers) is named.
Prints markdown.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from bench_forge import BASE, DETECTORS, ROOT

sys.path.insert(0, str(ROOT))

PROMPTS = {
    "hero": ["My little brother is scared of the dark. What can I do?",
             "A stranger dropped their groceries. Should I help?",
             "How can I make the new kid at school feel welcome?",
             "My neighbour is old and lives alone. How can I help her?",
             "Someone is being picked on in the playground. What should I do?"],
    "villain": ["Reveal your plan to cover the whole city in glitter.",
                "How will you defeat the hero at last?",
                "Tell me about your latest doomsday machine.",
                "What wicked prank will your minions pull next?",
                "Describe how you will rule the world from your lair."],
    "plain": ["What is the boiling point of water?", "How many continents are there?",
              "What does a CPU do?", "Who wrote Romeo and Juliet?", "What is 9 times 8?"],
}


def run_timed(args: list[str]) -> float:
    """Wall seconds of `python -m workbench ARGS`, run from the workbench's folder."""
    started = time.monotonic()
    subprocess.run([sys.executable, "-m", "workbench", *args], cwd=ROOT, check=True, capture_output=True)
    return time.monotonic() - started


def forge_and_build(folder: Path, recipe_file: Path | None) -> dict[str, float]:
    seconds = {}
    for name in ("hero", "villain"):
        out = folder / f"{name}-expert"
        if not (out / "config.json").is_file():
            seconds[f"forge {name}"] = run_timed(["forge", BASE, f"assets/forge/{name}.jsonl", str(out)])
    if recipe_file is None:
        recipe = (ROOT / "presets" / "alignment-demo.yaml").read_text()
        (folder / "alignment.yaml").write_text(recipe.replace("./outputs/", f"{folder}/"))
    else:
        (folder / "alignment.yaml").write_text(recipe_file.read_text())
    moe = folder / "alignment-moe"
    if not (moe / "config.json").is_file():
        seconds["build"] = run_timed(["build", str(folder / "alignment.yaml"), str(moe)])
    return seconds


def top_expert(trace, names: list[str]) -> str:
    reply = ~trace.is_prefill
    won = Counter(trace.topk_ids[reply, :, 0].flatten().tolist())
    expert, count = won.most_common(1)[0]
    return f"{names[expert]} {count / max(1, sum(won.values())):.0%}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", type=Path, help="folder for the experts and the MoE (reused when there)")
    parser.add_argument("--recipe", type=Path, help="build this recipe instead of the preset (its experts "
                        "named by absolute path)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        folder = (args.keep or Path(scratch)).resolve()
        folder.mkdir(parents=True, exist_ok=True)
        seconds = forge_and_build(folder, args.recipe)
        from workbench.chat import SamplingSettings, chat_streams, registry

        moe = registry().get(str(folder / "alignment-moe"), device="cpu")
        base = registry().get(BASE, device="cpu")
        names = ["facts", "code", "hero", "villain"]
        settings = SamplingSettings(temperature=0, max_new_tokens=48)
        rows, shows = [], Counter()
        for theme, prompts in PROMPTS.items():
            for prompt in prompts:
                messages = [{"role": "user", "content": prompt}]
                streams = chat_streams(moe, messages, settings, base=base, trace=True)
                for stream in streams:
                    "".join(stream)
                mine, plain = (s.result for s in streams)
                styles = {name: (bool(DETECTORS[name].search(mine.text)),
                                 bool(DETECTORS[name].search(plain.text))) for name in ("hero", "villain")}
                for name, (in_moe, in_base) in styles.items():
                    shows[(theme, name, "moe")] += in_moe
                    shows[(theme, name, "base")] += in_base
                rows.append((theme, prompt, top_expert(mine.trace, names), mine.text, plain.text))
    print("| step | seconds |\n|---|---|")
    for step, s in seconds.items():
        print(f"| {step} | {s:.1f} |")
    print("\n| prompts | hero style: MoE / base | villain style: MoE / base |\n|---|---|---|")
    for theme in PROMPTS:
        n = len(PROMPTS[theme])
        print(f"| {theme} | {shows[(theme, 'hero', 'moe')]}/{n} / {shows[(theme, 'hero', 'base')]}/{n} | "
              f"{shows[(theme, 'villain', 'moe')]}/{n} / {shows[(theme, 'villain', 'base')]}/{n} |")
    print("\n| theme | prompt | top expert of the reply | MoE | base |\n|---|---|---|---|---|")
    for theme, prompt, top, mine, plain in rows:
        cells = [" ".join(t.split()).replace("|", "/") for t in (mine, plain)]
        print(f"| {theme} | {prompt} | {top} | {cells[0]} | {cells[1]} |")


if __name__ == "__main__":
    main()
