"""Record mergekit-moe 0.1.5's output layout per family, once, as a test fixture.

Builds pico Llama models (tests/pico.py), runs the public `mergekit-moe` from its own
virtual environment on one recipe per family, and writes every output tensor's name and
shape, plus the config keys it wrote, to tests/fixtures/mergekit_moe_layouts.json. The
layout tests compare the workbench's plan with that file; they never run mergekit.

    python bench/record_mergekit_layouts.py --mergekit bench/.venv-mergekit/bin/mergekit-moe

The recipes use the base itself as every expert (mergekit 0.1.5 opens loaders only for the
base and the routed experts, so a shared expert from another model crashes it) and
`--i-understand-this-is-not-useful-without-training`.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml
from safetensors import safe_open

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.pico import make_pico_model  # noqa: E402

log = logging.getLogger("record_mergekit_layouts")
OUT = REPO / "tests" / "fixtures" / "mergekit_moe_layouts.json"
PICO = {"hidden": 64, "intermediate": 96, "layers": 2, "heads": 4, "kv_heads": 2}
PROMPTS = [["def add(a, b)"], ["Once upon a time"], ["Solve 2x + 3"]]


def recipe(base: Path, architecture: str, shared: dict | None) -> dict:
    data = {"base_model": str(base), "architecture": architecture, "gate_mode": "hidden", "dtype": "float32",
            "experts_per_token": 2,
            "experts": [{"source_model": str(base), "positive_prompts": p} for p in PROMPTS]}
    if shared is not None:
        data["shared_experts"] = [{"source_model": str(base), **shared}]
    return data


CASES = {
    # name: (architecture, shared expert entry or None, tied base)
    "qwen": ("qwen", {"positive_prompts": ["Hello there"]}, False),
    "qwen_tied": ("qwen", {"positive_prompts": ["Hello there"]}, True),
    "deepseek": ("deepseek", {}, False),
    "deepseek_no_shared": ("deepseek", None, False),
}


def listing(folder: Path) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(str(shard), framework="numpy") as f:
            for name in f.keys():
                out[name] = list(f.get_slice(name).get_shape())
    return dict(sorted(out.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mergekit", required=True, help="path of the mergekit-moe executable (0.1.5)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    version = subprocess.run([str(Path(args.mergekit).with_name("python")), "-c",
                              "import importlib.metadata as m; print(m.version('mergekit'))"],
                             capture_output=True, text=True, check=True).stdout.strip()
    fixture: dict = {"mergekit": version, "pico": PICO, "experts": len(PROMPTS), "cases": {}}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        bases = {tie: make_pico_model(root / f"base-tied{tie}", seed=3, tie=tie, **PICO)
                 for tie in (False, True)}
        for name, (arch, shared, tie) in CASES.items():
            data = recipe(bases[tie], arch, shared)
            path = root / f"{name}.yml"
            path.write_text(yaml.safe_dump(data, sort_keys=False))
            out = root / f"out-{name}"
            subprocess.run([args.mergekit, str(path), str(out), "--device", "cpu",
                            "--i-understand-this-is-not-useful-without-training"], check=True,
                           capture_output=True)
            config = json.loads((out / "config.json").read_text())
            fixture["cases"][name] = {
                "recipe": {k: v for k, v in data.items() if k != "base_model"},
                "tied": tie,
                "config": {k: config.get(k) for k in sorted(config) if k not in ("transformers_version",
                                                                             "_name_or_path")},
                "tensors": listing(out),
            }
            log.info("%s: %d tensors", name, len(fixture["cases"][name]["tensors"]))
    OUT.parent.mkdir(exist_ok=True)
    OUT.write_text(json.dumps(fixture, indent=1) + "\n")
    log.info("wrote %s", OUT.relative_to(REPO))


if __name__ == "__main__":
    main()
