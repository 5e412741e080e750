"""How long the demo model's long steps take, as the app and the CLI say before they start.

One place for every such figure, so the README, the presets and the pages never promise
different times. Each is a measurement recorded in BENCHMARKS.md by the bench named beside it,
whole command, on the project's reference machine (two quiet CPU cores); a GPU or a bigger
base changes them, so each sentence says what it was measured on.
"""

from __future__ import annotations

MACHINE = "two quiet CPU cores"
FORGE_DEMO_S = 80  # bench/bench_alignment.py: hero 74.2 s, villain 79.3 s (28 pairs, 20 steps)
BUILD_DEMO_S = 20  # bench/bench_alignment.py: build of the alignment preset, 19.1 s
COMPARE_DEMO_S = 25  # `gates --compare` on the demo preset: every mode, 24.5 s with the base load
DEQUANTISE_DEMO_S = 25  # the first start's GGUF dequantisation (models/demo.py)


def about(seconds: float) -> str:
    """'about 80 s' under two minutes, else 'about 3 minutes'."""
    return f"about {seconds:.0f} s" if seconds < 120 else f"about {seconds / 60:.0f} minutes"


def forge_each() -> str:
    """The forge of one demo expert, as a parenthesis can say it."""
    return f"{about(FORGE_DEMO_S)} each on {MACHINE}, longer under load"


def compare_modes() -> str:
    return f"{about(COMPARE_DEMO_S)} on the demo model on {MACHINE}"
