"""Time and measure the MoE build against a plain copy of the same bytes and mergekit-moe.

All tools are measured in one run, side by side, because the machine is noisy: each runs
once to warm the page cache, then `--rounds` rounds run every tool once, rotating the order
each round, and the median is reported. Every command runs under `/usr/bin/time -v` (its
"Maximum resident set size" is the peak-memory figure of record); a sampler also records the
peak anonymous and file-backed RSS of the process tree, since memory-mapped input pages
count in RSS yet are page cache the kernel can drop.

After each timed command the output files are fsynced, untimed but measured ("flush"): a
tool that leaves dirty pages behind would otherwise slow down whichever runs next, and
`s + flush` is the time until the output is really on disk (the copy baseline and the
workbench fsync inside their timed command). Each output is deleted right after it is
measured, so the page cache holds the inputs rather than stale outputs; the share of input
bytes cached when each run starts is recorded (`fincore`).

    .venv/bin/python bench/bench_build.py /tmp/bench-models --small /tmp/bench-small \\
        --work /tmp/bench-work --rounds 7 --nice 10 --results /tmp/build-report.md
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import shlex
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, fields
from pathlib import Path

import yaml

log = logging.getLogger("bench.bench_build")

ROOT = Path(__file__).resolve().parents[1]
WORKBENCH_PY = ROOT / ".venv" / "bin" / "python"
MERGEKIT_BIN = ROOT / "bench" / ".venv-mergekit" / "bin"
TOOLS = ("copy", "workbench", "mergekit")
# Python's default bytecode caching for every tool, whatever this shell sets: the warm-up run
# writes the workbench's .pyc files as any user's second run has them (pip wrote mergekit's).
TOOL_ENV = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
PROMPTS = [  # distinct per expert, as `hidden` mode requires
    (["def add(a, b): return a + b", "import numpy as np"], ["Once upon a time"]),
    (["The integral of x squared", "Solve 2x + 3 = 7"], ["Hello! How are you?"]),
    (["Once upon a time a dragon", "The knight rode through the forest"], ["def add(a, b)"]),
    (["Hello! How are you doing today?", "Thanks, see you tomorrow"], ["Solve 2x + 3 = 7"]),
]


@dataclass
class Run:
    tool: str
    label: str
    seconds: float
    flush_seconds: float
    cpu_seconds: float  # user + system time of the command and its children (/usr/bin/time -v)
    max_rss_mb: float  # /usr/bin/time -v: the largest single process
    anon_mb: float  # sampled peak RssAnon summed over the process tree
    file_mb: float  # sampled peak RssFile (mapped file pages) summed over the tree
    out_bytes: int
    cached: float  # share of input bytes in the page cache when the run started
    round: int = 0  # 1.. for the timed rounds, 0 for single runs


@dataclass
class Case:
    """One command to time: which tool, on which recipe, writing where, reading what."""

    tool: str
    label: str  # gate mode and model, as shown in the table
    argv: list[str]
    out: Path
    inputs: Path  # folder whose safetensors' page-cache residency is recorded before each run
    nice: int = 0  # CPU priority raised by this much in the child (root only), same for every tool


def write_recipe(models: Path, work: Path, mode: str, count: int | None = None) -> Path:
    """A recipe over the model set: `count` experts (default one per expert-K folder), cycling
    over the folders, so 4 experts can come from 2 sources as in most real merges."""
    folders = sorted(p for p in models.iterdir() if p.name.startswith("expert-"))
    entries = []
    for k in range(count or len(folders)):
        entry = {"source_model": str(folders[k % len(folders)])}
        if mode != "random":
            positive, negative = PROMPTS[k % len(PROMPTS)]
            entry.update(positive_prompts=positive, negative_prompts=negative)
        entries.append(entry)
    recipe = {"base_model": str(models / "base"), "gate_mode": mode, "dtype": "bfloat16",
              "experts_per_token": 2, "experts": entries}
    path = work / f"recipe-{models.name}-{mode}.yml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def command(tool: str, recipe: Path | None, out: Path, copy_src: Path | None = None) -> list[str]:
    if tool == "workbench":
        return [str(WORKBENCH_PY), "-m", "workbench", "build", str(recipe), str(out), "--device", "cpu",
                "--force"]
    if tool == "mergekit":
        return [str(MERGEKIT_BIN / "mergekit-moe"), str(recipe), str(out), "--device", "cpu", "--quiet"]
    # `sync FILE...` fsyncs just those files: durable like the workbench's output, without
    # flushing other processes' writes as a bare `sync` would.
    src, dst = shlex.quote(str(copy_src)), shlex.quote(str(out))
    return ["sh", "-c", f"cp -r --reflink=never {src} {dst} && sync {dst}/* {dst}"]


def _children(pid: int) -> list[int]:
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
        return [int(c) for t in tasks for c in (t / "children").read_text().split()]
    except OSError:  # the process ended between listing and reading
        return []


def _rss_kb(pid: int) -> tuple[int, int]:
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return 0, 0
    values = {line.split(":")[0]: int(line.split()[1])
              for line in lines if line.startswith(("RssAnon", "RssFile"))}
    return values.get("RssAnon", 0), values.get("RssFile", 0)


class TreeSampler(threading.Thread):
    """Peak RssAnon / RssFile of a process and its descendants, sampled every 50 ms."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid, self.peak_anon_kb, self.peak_file_kb = pid, 0, 0
        self._stop_event = threading.Event()

    def __enter__(self) -> TreeSampler:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop_event.set()
        self.join()

    def run(self) -> None:
        while not self._stop_event.wait(0.05):
            pids, stack = [], [self.pid]
            while stack:
                pids.append(stack.pop())
                stack += _children(pids[-1])
            sizes = [_rss_kb(p) for p in pids]
            self.peak_anon_kb = max(self.peak_anon_kb, sum(a for a, _ in sizes))
            self.peak_file_kb = max(self.peak_file_kb, sum(f for _, f in sizes))


def cached_share(folder: Path) -> float:
    """Fraction of the folder's safetensors bytes in the page cache right now (util-linux fincore)."""
    files = sorted(folder.rglob("*.safetensors"))
    if not files:
        return 0.0
    done = subprocess.run(["fincore", "--bytes", "--noheadings", "--raw", "--output", "RES,SIZE",
                           *map(str, files)], capture_output=True, text=True, check=True)
    pairs = [line.split() for line in done.stdout.splitlines() if line.strip()]
    size = sum(int(s) for _, s in pairs)
    return sum(int(r) for r, _ in pairs) / size if size else 0.0


DROP_CACHES = Path("/proc/sys/vm/drop_caches")


CACHE_MODES = ("empty", "full", "as-is")


def warm(folder: Path, cache: str) -> None:
    """Untimed, before each run, by --cache: "empty" empties the page cache (root only) and
    then reads the folder's safetensors once, so every tool starts from cached inputs and free
    memory; "full" only reads the inputs, so the cache stays full of earlier runs' pages and
    each page written first costs a reclaim (a machine in daily use); "as-is" does nothing,
    and this VM's proactive reclaim (DAMON) then evicts a varying share of the inputs."""
    if cache == "as-is":
        return
    subprocess.run(["sync"], check=True)
    if cache == "empty":
        if not os.access(DROP_CACHES, os.W_OK):
            raise SystemExit("--cache empty needs root (it writes /proc/sys/vm/drop_caches)")
        DROP_CACHES.write_text("1\n")
    files = sorted(folder.rglob("*.safetensors"))
    subprocess.run(["cat", *map(str, files)], stdout=subprocess.DEVNULL, check=True)


def measure(case: Case, logs: Path, keep_as: Path | None = None, round_no: int = 0,
            cache: str = "empty") -> Run:
    """Run one case under /usr/bin/time -v; fsync, size and delete (or keep) its output."""
    subprocess.run(["rm", "-rf", str(case.out)], check=True)
    warm(case.inputs, cache)
    cached = cached_share(case.inputs)
    log_file = logs / f"{case.tool}-{case.label.replace(' ', '_')}-{time.strftime('%H%M%S')}.log"
    start = time.perf_counter()
    with open(log_file, "w") as sink:
        proc = subprocess.Popen(["/usr/bin/time", "-v", *case.argv], stdout=sink, stderr=subprocess.STDOUT,
                                env=TOOL_ENV, preexec_fn=lambda: os.nice(-case.nice))
        with TreeSampler(proc.pid) as sampler:
            code = proc.wait()
    seconds = time.perf_counter() - start
    text = log_file.read_text(errors="replace")
    if code != 0:
        raise RuntimeError(f"{case.tool} ({case.label}) exited {code}; see {log_file}:\n{text[-3000:]}")
    stats = {line.split(":")[0].strip(): line.rsplit(":", 1)[1].strip()
             for line in text.splitlines() if line.startswith("\t") and ":" in line}
    cpu = float(stats["User time (seconds)"]) + float(stats["System time (seconds)"])
    max_rss_kb = int(stats["Maximum resident set size (kbytes)"])
    files = [p for p in case.out.rglob("*") if p.is_file()]
    start = time.perf_counter()
    subprocess.run(["sync", *map(str, files)], check=True)
    flush = time.perf_counter() - start
    run = Run(case.tool, case.label, seconds, flush, cpu, max_rss_kb / 1024, sampler.peak_anon_kb / 1024,
              sampler.peak_file_kb / 1024, sum(p.stat().st_size for p in files), cached, round_no)
    if keep_as is not None:
        subprocess.run(["rm", "-rf", str(keep_as)], check=True)
        case.out.rename(keep_as)
    else:
        subprocess.run(["rm", "-rf", str(case.out)], check=True)
    log.info("%-9s %-14s %6.1f s  flush %4.1f s  cpu %5.1f s  maxrss %5.0f MB  anon %5.0f MB  file %5.0f MB  "
             "%.2f GB  inputs cached %3.0f%%", run.tool, run.label, run.seconds, run.flush_seconds,
             run.cpu_seconds, run.max_rss_mb, run.anon_mb, run.file_mb, run.out_bytes / 1e9, 100 * cached)
    return run


def plan(args: argparse.Namespace, tools: list[str]) -> tuple[list[Case], list[Case], list[Case]]:
    """(big random-gate cases, small random-gate cases, big hidden-gate cases)."""
    work, copy_src = args.work, args.work / "copy-src"

    def case(tool: str, label: str, recipe: Path, inputs: Path) -> Case:
        out = work / f"out-{tool}"
        return Case(tool, label, command(tool, recipe, out, copy_src), out, inputs, args.nice)

    random_recipe = write_recipe(args.models, work, "random", args.experts)
    big = [case(t, "random", random_recipe, copy_src if t == "copy" else args.models) for t in tools]
    builders = [t for t in tools if t != "copy"]
    small = []
    if args.small:
        small_recipe = write_recipe(args.small, work, "random")
        small = [case(t, "random, small", small_recipe, args.small) for t in builders]
    hidden = []
    if not args.no_hidden:
        hidden_recipe = write_recipe(args.models, work, "hidden", args.experts)
        hidden = [case(t, "hidden", hidden_recipe, args.models) for t in builders]
    return big, small, hidden


def bench(args: argparse.Namespace) -> str:
    tools = [t for t in TOOLS if t in args.tools.split(",")]
    if tools == ["copy"]:
        raise SystemExit("--tools copy alone has nothing to copy: the copy source is a build's output")
    logs = args.work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    big, small, hidden = plan(args, tools)
    copy_src = args.work / "copy-src"
    # Warm-up: builders first; the first builder's output becomes the copy source, so the
    # copy moves exactly the bytes a build writes (renamed, so its pages stay cached).
    builders = [c for c in big if c.tool != "copy"]
    for k, case in enumerate(builders):
        measure(case, logs, keep_as=copy_src if k == 0 else None, cache=args.cache)
    for case in [c for c in big if c.tool == "copy"] + small:
        measure(case, logs, cache=args.cache)
    log.info("warm-up done")
    runs: list[Run] = []
    for k in range(args.rounds):
        order = big[k % len(big):] + big[:k % len(big)]
        runs += [measure(case, logs, round_no=k + 1, cache=args.cache) for case in order + small]
    once: list[Run] = []  # the hidden-gate runs, `--hidden-rounds` rounds in rotated order
    for k in range(args.hidden_rounds if hidden else 0):
        order = hidden[k % len(hidden):] + hidden[:k % len(hidden)]
        once += [measure(case, logs, round_no=k + 1, cache=args.cache) for case in order]
    commands = {f"{c.tool} ({c.label})": shlex.join(c.argv) for c in big + small + hidden}
    priority = f"nice -{args.nice}" if args.nice else "normal priority"
    env = environment([args.models, args.work]) + [
        f"- every timed command ran at {priority}", f"- page cache before each run: {args.cache} (--cache)",
        "- Python bytecode caching on for every tool (the warm-up writes the .pyc files)"]
    return render(runs, once, commands, env, args.rounds)


# ---- the report ------------------------------------------------------------------------------

def shell(cmd: str) -> str:
    done = subprocess.run(cmd, shell=True, capture_output=True, text=True)
    return (done.stdout + done.stderr).strip()


def environment(paths: list[Path]) -> list[str]:
    probe = shlex.quote("import torch, transformers, safetensors as s; "
                        "print(torch.__version__, transformers.__version__, s.__version__)")
    cpu = shell("grep -m1 'model name' /proc/cpuinfo | cut -d: -f2")
    mem = shell("awk '/MemTotal/ {printf \"%.1f GiB\", $2/1048576}' /proc/meminfo")
    load = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    commit = shell(f"git -C {ROOT} rev-parse --short HEAD")
    mk_version = shell(f"{MERGEKIT_BIN}/pip show mergekit | sed -n s/^Version:.//p")
    return [
        f"- date: {time.strftime('%Y-%m-%d %H:%M %Z')}; load average at the end: {load} "
        "(other jobs share the machine)",
        f"- machine: {shell('nproc')} CPU cores ({cpu}), RAM {mem}, kernel {platform.release()}",
        f"- workbench: git {commit} + working tree; python {platform.python_version()}; "
        f"torch / transformers / safetensors {shell(f'{WORKBENCH_PY} -c {probe}')}",
        f"- mergekit {mk_version} in bench/.venv-mergekit; "
        f"torch / transformers / safetensors {shell(f'{MERGEKIT_BIN}/python -c {probe}')}",
        "- disk (inputs, work):", "", "```", shell("df -hT " + " ".join(map(str, paths))), "```",
    ]


def median_run(runs: list[Run]) -> Run:
    """Field-wise median of one case's runs (each column its own median)."""
    values = {f.name: statistics.median(getattr(r, f.name) for r in runs)
              for f in fields(Run) if f.type in ("float", "int") and f.name != "round"}
    return Run(runs[0].tool, runs[0].label, **{**values, "out_bytes": int(values["out_bytes"])})


def _row(r: Run, copy: Run | None, note: str) -> str:
    total = r.seconds + r.flush_seconds
    ratio = (f"{r.seconds / copy.seconds:.2f} | {total / (copy.seconds + copy.flush_seconds):.2f}"
             if copy and r.out_bytes > copy.out_bytes // 2 else "n/a | n/a")
    return (f"| {r.tool} | {r.label}{note} | {r.seconds:.1f} | {total:.1f} | {r.cpu_seconds:.1f} | "
            f"{r.max_rss_mb:.0f} | "
            f"{r.anon_mb:.0f} | {r.file_mb:.0f} | {r.out_bytes:,} | {100 * r.cached:.0f}% | {ratio} |")


def _paired(runs: list[Run], label: str = "random") -> list[str]:
    """Median over rounds of each round's own ratios: robust to load that drifts between rounds."""
    by_round: dict[int, dict[str, float]] = {}
    for r in runs:
        if r.label == label:
            by_round.setdefault(r.round, {})[r.tool] = r.seconds
    rounds = [t for t in by_round.values() if {"workbench", "mergekit"} <= set(t)]
    if not rounds:
        return []
    speedup = [t["mergekit"] / t["workbench"] for t in rounds]
    text = (f"mergekit / workbench {statistics.median(speedup):.2f} "
            f"(range {min(speedup):.2f}-{max(speedup):.2f})")
    if all("copy" in t for t in rounds):
        to_copy = [t["workbench"] / t["copy"] for t in rounds]
        text = (f"workbench / copy {statistics.median(to_copy):.2f} "
                f"(range {min(to_copy):.2f}-{max(to_copy):.2f}); " + text)
    return [f"- {label} gates, per-round ratios (median over {len(rounds)} rounds): {text}."]


def _groups(runs: list[Run]) -> list[list[Run]]:
    """The runs of each (tool, label), in order of first appearance."""
    keys = dict.fromkeys((r.tool, r.label) for r in runs)
    return [[r for r in runs if (r.tool, r.label) == key] for key in keys]


def render(runs: list[Run], once: list[Run], commands: dict[str, str], env: list[str], rounds: int) -> str:
    keys = list(dict.fromkeys((r.tool, r.label) for r in runs))
    med = {key: median_run([r for r in runs if (r.tool, r.label) == key]) for key in keys}
    copy = med.get(("copy", "random"))
    table = [
        "| tool | gate mode, model | s | s + flush | CPU s | peak RSS MB (time -v) | anon MB | file MB "
        "| output bytes | inputs cached | ratio to copy | ratio to copy (s + flush) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
        *(_row(m, copy, f" (median of {rounds})") for m in med.values()),
        *(_row(median_run(group), copy, " (1 run)" if len(group) == 1 else f" (median of {len(group)})")
          for group in _groups(once)),
    ]
    lines = _paired(runs) + _paired(once, "hidden")
    wb, mk = med.get(("workbench", "random")), med.get(("mergekit", "random"))
    if wb and mk:
        lines.append(f"- random gates: the workbench is {mk.seconds / wb.seconds:.2f}x faster than "
                     f"mergekit-moe end to end, at {wb.max_rss_mb:.0f} MB peak RSS against "
                     f"{mk.max_rss_mb:.0f} MB.")
    for tool in ("workbench", "mergekit"):
        big, small = med.get((tool, "random")), med.get((tool, "random, small"))
        if big and small and copy:
            lines.append(f"- {tool}: the fixed start-up cost (the small model's build) is "
                         f"{small.seconds:.1f} s; "
                         f"the rest, {big.seconds - small.seconds:.1f} s, is "
                         f"{(big.seconds - small.seconds) / copy.seconds:.2f}x the copy time.")
    every = ["| # | round | tool | model | s | flush s | CPU s | max RSS MB | inputs cached |",
             "|---|---|---|---|---|---|---|---|---|"]
    every += [f"| {k + 1} | {r.round} | {r.tool} | {r.label} | {r.seconds:.1f} | {r.flush_seconds:.1f} | "
              f"{r.cpu_seconds:.1f} | "
              f"{r.max_rss_mb:.0f} | {100 * r.cached:.0f}% |" for k, r in enumerate(runs + once)]
    return "\n".join([
        f"One warm-up run of each case, then {rounds} rounds, the order rotated each round; medians.", "",
        *table, "", *lines, "",
        "### Commands", "", "```", *(f"{k}: {v}" for k, v in commands.items()), "```", "",
        "### Environment", "", *env, "",
        "### Every timed run, in order", "", *every, "",
    ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", type=Path, help="folder from make_synthetic.py (base/, expert-K/)")
    parser.add_argument("--small", type=Path, help="a tiny model set from make_synthetic.py: times each "
                        "tool's fixed start-up cost")
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench-work"), help="recipes, outputs, logs")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--experts", type=int, help="experts in the big model's recipes, cycling over its "
                        "expert-K folders (default: one per folder)")
    parser.add_argument("--tools", default=",".join(TOOLS), help="comma list of: " + ", ".join(TOOLS))
    parser.add_argument("--no-hidden", action="store_true", help="skip the `hidden` gate-mode runs")
    parser.add_argument("--hidden-rounds", type=int, default=1, help="rounds of `hidden` builds, each tool "
                        "once a round in rotated order, after the random-gate rounds (default 1)")
    parser.add_argument("--cache", choices=CACHE_MODES, default="empty", help="page cache before each run: "
                        "empty it and read the inputs (default), read the inputs into a full cache, or as is")
    parser.add_argument("--results", type=Path, help="write the markdown report here too")
    parser.add_argument("--nice", type=int, default=0, help="run every timed command N nice levels "
                        "above normal (needs root): steadier numbers on a shared machine")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    args.work.mkdir(parents=True, exist_ok=True)
    report = bench(args)
    print(report)
    if args.results:
        args.results.write_text("# Build benchmark results\n\n" + report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
