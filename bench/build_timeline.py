"""Where one build's time goes: an in-process timeline of its phases (not a benchmark of record).

Wraps the build's phase functions to print when each started and ended, and when the gates
were ready. `--no-hash` replaces the manifest's sha256 with nothing (the manifest is then
wrong: for measuring only), `--page-cache` writes without O_DIRECT, as on a filesystem
that refuses it.
Run it on warm inputs and an empty output, as bench_build.py does:

    sync; echo 1 > /proc/sys/vm/drop_caches; cat /tmp/bench-models/*/*.safetensors >/dev/null
    .venv/bin/python bench/build_timeline.py /tmp/bench-work/recipe-bench-models-random.yml \\
        /tmp/bench-work/out-timeline [--no-hash]
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from pathlib import Path

STARTED = time.monotonic()
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from workbench.build import builder as build_module  # noqa: E402
from workbench.build import writer as tensor_writer  # noqa: E402
from workbench.progress import Progress  # noqa: E402
from workbench.recipe import load_recipe  # noqa: E402

PHASES = ("new_staging", "write_safetensors", "_write_extras", "write_manifest", "_verify", "commit")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--no-hash", action="store_true", help="skip the sha256 (measuring only)")
    parser.add_argument("--page-cache", action="store_true", help="write without O_DIRECT")
    args = parser.parse_args()
    marks: list[tuple[float, float, str]] = []

    def timed(name: str, function):
        @functools.wraps(function)
        def wrapper(*a, **k):
            begin = time.monotonic() - STARTED
            try:
                return function(*a, **k)
            finally:
                marks.append((begin, time.monotonic() - STARTED, name))
        return wrapper

    for name in PHASES:
        setattr(build_module, name, timed(name, getattr(build_module, name)))
    tensor_writer._Output.finish = timed("writing the last buffers, fsync", tensor_writer._Output.finish)
    if args.no_hash:
        tensor_writer._Output._hash_one = lambda self, index, offset, used: None
    if args.page_cache:
        tensor_writer._aligned_write_works = lambda fd: False
    gates_ready: list[float] = []
    waiting: list[float] = []  # when the writer first waited for the gates: the copy was done

    def on_progress(event: Progress) -> None:
        if event.stage == "gates" and event.fraction >= 1.0:
            gates_ready.append(time.monotonic() - STARTED)
        elif event.stage == "gates" and not waiting:
            waiting.append(time.monotonic() - STARTED)

    build_module.build(load_recipe(str(args.recipe)), args.out, device="cpu", force=True,
                       on_progress=on_progress)
    for begin, end, name in sorted(marks):
        print(f"{begin:6.2f} -> {end:6.2f} s  {name}")
    print(f"copy done, waiting for the gates at {waiting[0]:.2f} s" if waiting
          else "the gates never kept the writer waiting")
    print(f"gates ready at {gates_ready[0]:.2f} s" if gates_ready else "gates: no event")
    print(f"total {time.monotonic() - STARTED:.2f} s (from interpreter start to the end of build())")


if __name__ == "__main__":
    main()
