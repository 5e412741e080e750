"""The model registry's memory bound: RSS while six distinct models are loaded in turn.

Six random Llama checkpoints (float32, hidden 512, MLP 1536, 8 layers, vocab of the pico
tokenizer: about 102 MB of tensors each) are loaded one after another into two registries
in separate processes: one bounded to 2.5 models' worth of bytes, one unbounded. Each
process reports, after every load, the registry's resident tensor bytes and the process's
RSS; the peak of each is the figure of record.

    .venv/bin/python bench/bench_registry.py --work /tmp/bench-registry
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODELS = 6


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def make_models(work: Path) -> list[Path]:
    sys.path.insert(0, str(ROOT))
    from tests.pico import make_pico_model, make_tokenizer

    tokenizer = make_tokenizer()
    folders = []
    for i in range(MODELS):
        folder = work / f"model-{i}"
        if not (folder / "config.json").is_file():
            make_pico_model(folder, seed=i + 1, hidden=512, intermediate=1536, layers=8, heads=8,
                            kv_heads=4, tokenizer=tokenizer)
        folders.append(folder)
    return folders


def child(folders: list[str], max_bytes: int | None) -> None:
    sys.path.insert(0, str(ROOT))
    from workbench.chat.engine import Registry

    registry = Registry(max_bytes=max_bytes if max_bytes else 1 << 62)
    rows = []
    for folder in folders:
        registry.get(folder, device="cpu")
        rows.append({"loaded": len(registry.loaded()), "resident_mb": registry.resident_bytes() / 1e6,
                     "rss_mb": rss_mb()})
    print(json.dumps(rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--child", nargs="*")
    parser.add_argument("--max-bytes", type=int, default=0)
    args = parser.parse_args()
    if args.child is not None:
        child(args.child, args.max_bytes)
        return
    args.work.mkdir(parents=True, exist_ok=True)
    folders = [str(f) for f in make_models(args.work)]
    sys.path.insert(0, str(ROOT))
    from workbench.chat.engine import Registry

    one = Registry()
    one.get(folders[0], device="cpu")
    size = one.resident_bytes()
    del one
    bound = int(size * 2.5)
    print(f"one model: {size / 1e6:.1f} MB of tensors; bound {bound / 1e6:.1f} MB\n")
    print("| registry | after each load: models kept | peak resident tensors MB | peak RSS MB |")
    print("|---|---|---|---|")
    for name, max_bytes in (("bounded (2.5 models)", bound), ("unbounded", 0)):
        command = [sys.executable, __file__, "--work", str(args.work), "--max-bytes", str(max_bytes),
                   "--child", *folders]
        out = subprocess.run(command, capture_output=True, text=True, check=True)
        rows = json.loads(out.stdout.strip().splitlines()[-1])
        kept = " ".join(str(r["loaded"]) for r in rows)
        print(f"| {name} | {kept} | {max(r['resident_mb'] for r in rows):.1f} | "
              f"{max(r['rss_mb'] for r in rows):.0f} |")


if __name__ == "__main__":
    main()
