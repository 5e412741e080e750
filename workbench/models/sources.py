"""Model references -> local folders holding config.json, safetensors weights and a tokenizer.

A reference is one of
- `demo:NAME`: a model the workbench ships (see `workbench.models.demo`), e.g. demo:smollm2-135m-instruct;
- a local folder: an existing path, or one written as a path (`/`, `./`, `../`, `~`);
- a Hub id `org/name`, optionally `org/name@revision` (branch, tag or commit sha);
- any of the first three followed by `+LORA`, LORA a folder or Hub id of a peft LoRA adapter,
  applied to the model's weights as the build reads them (`workbench.models.lora`).

Trust rules, applied before any weight is read or downloaded: safetensors only (pickle
weights run code when loaded), no `auto_map` and no model_type unknown to transformers
(trust_remote_code is never on), and every shard an index lists must exist.
`read_config` is the cheap path for validation (config.json only); `resolve` returns a
`ModelSource` ready for gates and build, pinned to the Hub commit it resolved.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import workbench.models.hub as hub_source
from workbench.errors import HubUnreachable, SourceError
from workbench.models.demo import DEMO_MODELS, DemoModel, DemoPackageMissing, build_demo_folder
from workbench.models.lora import LoraAdapter, check_adapter, fetch_adapter, open_adapter
from workbench.progress import CancelToken, Progress, ProgressFn, ignore_progress
from workbench.recipe import ConfigUnavailable, split_ref

__all__ = ["DEMO_MODELS", "DEMO_PREFIX", "DemoModel", "ModelRef", "ModelSource", "cache_root",
           "demo_model_path", "parse_ref", "read_config", "read_configs", "resolve"]

log = logging.getLogger(__name__)

DEMO_PREFIX = "demo:"
# Hub ids: huggingface_hub's rules (word characters, '.', '-'; no '--' or '..'; <= 96 chars).
_HUB_ID = re.compile(r"^(?P<name>[\w.-]{1,96}/[\w.-]{1,96})(?:@(?P<rev>[\w./-]{1,200}))?$", re.ASCII)
_PATH_MARKERS = ("/", "./", "../", "~")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
SINGLE_WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
# Files a checkpoint folder needs besides weights; fetched from the Hub when present.
TOKENIZER_SUFFIXES = (".json", ".txt", ".jinja", ".model")


@dataclass(frozen=True)
class ModelRef:
    kind: Literal["local", "hub", "demo"]
    name: str  # folder path (local), "org/name" (hub) or the demo model's name
    revision: str | None = None  # hub only, as written after '@'
    adapter: ModelRef | None = None  # the LoRA after '+' (local or hub)


@dataclass(frozen=True)
class ModelSource:
    ref: str  # as written in the recipe
    path: Path  # folder with config.json, safetensors weights (+ index) and tokenizer files
    revision: str | None  # the commit sha a hub model resolved to; None otherwise
    config: dict[str, Any]  # parsed config.json
    adapter: LoraAdapter | None = None  # a `+LORA` reference's adapter, applied as weights are read


def cache_root() -> Path:
    """Where the workbench keeps its own files: $MOE_WORKBENCH_CACHE or ~/.cache/moe-workbench."""
    configured = os.environ.get("MOE_WORKBENCH_CACHE")
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "moe-workbench"


def parse_ref(ref: str, *, allow_local: bool = True) -> ModelRef:
    """Classify a model reference; raise SourceError when it is none of the three kinds.

    With `allow_local=False` (a public Space) a ref is never read as a local folder: a
    hub-shaped ref means the Hub even if a folder of that name exists on the server.
    `MODEL+LORA` gives MODEL's ref with the LoRA's (a folder or Hub id) as its `adapter`.
    """
    text = ref.strip() if isinstance(ref, str) else ""
    model, lora = split_ref(text)
    if lora is None:
        return _parse_one(ref, text, allow_local)
    if "+" in lora:
        raise SourceError(f"model reference {ref!r} has more than one '+': write MODEL+LORA")
    parsed, adapter = _parse_one(ref, model.strip(), allow_local), _parse_one(ref, lora.strip(), allow_local)
    if adapter.kind == "demo":
        raise SourceError(f"{lora.strip()!r} in {ref!r} is a demo model, not a LoRA adapter: name the "
                          "adapter's folder or Hub repo after the '+'")
    return replace(parsed, adapter=adapter)


def _parse_one(ref: str, text: str, allow_local: bool) -> ModelRef:
    control = next((c for c in text if ord(c) < 32 or ord(c) == 127), None)
    if control is not None:
        raise SourceError(f"model reference {ref!r} contains the control character U+{ord(control):04X}: "
                          "give a Hub id (org/name), a local folder or " + DEMO_PREFIX + "NAME")
    if not text:
        raise SourceError(f"empty model reference {ref!r}: give a Hub id (org/name), a local folder "
                          f"or {DEMO_PREFIX}NAME")
    if text.startswith(DEMO_PREFIX):
        name = text[len(DEMO_PREFIX):]
        if name not in DEMO_MODELS:
            available = ", ".join(DEMO_PREFIX + n for n in DEMO_MODELS)
            raise SourceError(f"unknown demo model {text!r}: available: {available}")
        return ModelRef("demo", name)
    hub = _HUB_ID.match(text)
    hub_ok = bool(hub) and ".." not in text and "--" not in hub["name"]
    looks_local = text.startswith(_PATH_MARKERS) or Path(text).expanduser().is_dir()
    if allow_local and looks_local:
        return ModelRef("local", str(Path(text).expanduser()))
    if hub_ok:
        return ModelRef("hub", hub["name"], hub["rev"])
    if looks_local:
        raise SourceError(f"local model folders are not allowed here ({text!r}): use a Hub id "
                          f"(org/name) or {DEMO_PREFIX}NAME")
    raise SourceError(f"{text!r} is not a folder, a Hub id (org/name[@revision]) or {DEMO_PREFIX}NAME: "
                      "check the spelling, or write a local path starting with ./ or /")


def demo_model_path(name: str = "smollm2-135m-instruct", *, on_progress: ProgressFn = ignore_progress,
                    cancel: CancelToken | None = None) -> Path:
    """The ready folder of a bundled demo model, dequantised on first use (~25 s, once)."""
    if name not in DEMO_MODELS:
        raise SourceError(f"unknown demo model {name!r}: available: {', '.join(DEMO_MODELS)}")
    folder = cache_root() / "models" / name
    return build_demo_folder(DEMO_MODELS[name], folder, on_progress=on_progress, cancel=cancel)


def _upstream(name: str, why: DemoPackageMissing) -> str:
    """The Hub repo a demo model was quantised from, used when its package is absent."""
    log.info("%s; using its upstream %s from the Hub", why, DEMO_MODELS[name].upstream)
    return DEMO_MODELS[name].upstream


def read_config(ref: str, *, token: str | None = None) -> dict[str, Any]:
    """config.json of a model, trust-checked, without reading or downloading weights.

    A local folder is also checked for safetensors weights (free); a hub model's weights
    are checked by `resolve`, which lists the repo.
    """
    parsed = parse_ref(ref)
    if parsed.adapter is not None:  # its adapter_config.json only: a refused kind shows at validation
        lora = parsed.adapter
        check_adapter(split_ref(ref)[1].strip(), lora.kind, lora.name, lora.revision, token)
    if parsed.kind == "demo":
        try:
            return _load_config(demo_model_path(parsed.name) / "config.json")
        except DemoPackageMissing as missing:
            parsed = ModelRef("hub", _upstream(parsed.name, missing), None)
    if parsed.kind == "local":
        return _check_local(Path(parsed.name))[1]
    path = hub_source.fetch_file(parsed.name, "config.json", parsed.revision, token)
    return _load_config(path, shown=f"{parsed.name}/config.json")


def read_configs(refs: Iterable[str], *, token: str | None = None) -> dict[str, dict | ConfigUnavailable]:
    """config.json of each distinct ref; a ref that fails maps to ConfigUnavailable(reason).

    An unreachable Hub is a warning (the recipe may be fine; we cannot tell offline); any
    other failure (no such folder, refused checkpoint, no access) is an error.
    """
    out: dict[str, dict | ConfigUnavailable] = {}
    for ref in dict.fromkeys(refs):
        try:
            out[ref] = read_config(ref, token=token)
        except HubUnreachable as exc:
            out[ref] = ConfigUnavailable(reason=str(exc), level="warning")
        except SourceError as exc:  # a refusal that knows its fix hands it on apart (a LoRA's)
            fix = getattr(exc, "fix", "")
            out[ref] = ConfigUnavailable(reason=getattr(exc, "what", str(exc)) if fix else str(exc), fix=fix)
    return out


def resolve(ref: str, *, token: str | None = None, revision: str | None = None, allow_local: bool = True,
            on_progress: ProgressFn = ignore_progress, cancel: CancelToken | None = None) -> ModelSource:
    """A local folder for `ref` with config.json, safetensors weights and tokenizer files.

    `revision` (hub only) overrides the ref's `@revision`; the build passes the commit sha
    that validation resolved, so it uses exactly the files validation saw. A `+LORA` ref's
    adapter is fetched and checked too, and rides along as the source's `adapter`.
    """
    parsed = parse_ref(ref, allow_local=allow_local)
    cancel = cancel or CancelToken()
    cancel.check()
    source = _resolve_model(ref, parsed, token, revision, on_progress, cancel)
    if parsed.adapter is None:
        return source
    lora, shown = parsed.adapter, split_ref(ref)[1].strip()
    cancel.check()
    on_progress(Progress("resolve", 0.9, f"reading LoRA {shown}"))
    if lora.kind == "local":
        adapter = open_adapter(shown, Path(lora.name).resolve())
    else:
        adapter = fetch_adapter(shown, lora.name, lora.revision, token)
    return replace(source, adapter=adapter)


def _resolve_model(ref: str, parsed: ModelRef, token: str | None, revision: str | None,
                   on_progress: ProgressFn, cancel: CancelToken) -> ModelSource:
    if parsed.kind == "demo":
        try:
            path = demo_model_path(parsed.name, on_progress=on_progress, cancel=cancel)
        except DemoPackageMissing as missing:
            return _resolve_hub(ref, _upstream(parsed.name, missing), None, token, on_progress, cancel)
        return ModelSource(ref, path, None, _load_config(path / "config.json"))
    if parsed.kind == "local":
        path, config = _check_local(Path(parsed.name))
        on_progress(Progress("resolve", 1.0, f"using local folder {path}"))
        return ModelSource(ref, path, None, config)
    return _resolve_hub(ref, parsed.name, revision or parsed.revision, token, on_progress, cancel)


def _resolve_hub(ref: str, name: str, revision: str | None, token: str | None,
                 on_progress: ProgressFn, cancel: CancelToken) -> ModelSource:
    on_progress(Progress("resolve", 0.0, f"listing files of {name}"))
    listing = hub_source.list_repo(name, revision, token)
    sha = listing.sha
    files = set(listing.sizes)
    # Refuse pickle-only and weightless repos from the listing alone, before any download.
    _check_weight_names(name, files)
    if "config.json" not in files:
        raise SourceError(f"{name}@{sha[:12]} has no config.json: it is not a transformers model repo")
    cancel.check()
    config = _load_config(hub_source.fetch_file(name, "config.json", sha, token), shown=f"{name}/config.json")
    weights = _weight_files(name, files, lambda: hub_source.fetch_file(name, WEIGHTS_INDEX, sha, token))
    extras = sorted(f for f in files if "/" not in f and f.endswith(TOKENIZER_SUFFIXES))
    wanted = sorted(set(weights) | set(extras))
    total = sum(listing.sizes.get(f) or 0 for f in wanted)
    cancel.check()
    on_progress(Progress("resolve", 0.1, f"downloading {len(wanted)} files of {name} ({total / 1e9:.2f} GB)"))
    path = hub_source.fetch_snapshot(name, sha, wanted, token)
    _weight_files(name, {p.name for p in path.iterdir()}, lambda: path / WEIGHTS_INDEX)
    on_progress(Progress("resolve", 1.0, f"{name} at commit {sha[:12]}"))
    return ModelSource(ref, path, sha, config)


def _check_local(folder: Path) -> tuple[Path, dict[str, Any]]:
    folder = folder.resolve()
    if not folder.is_dir():
        raise SourceError(f"no model folder at {folder}: check the path")
    config = _load_config(folder / "config.json")
    files = {p.name for p in folder.iterdir() if p.is_file()}
    _weight_files(str(folder), files, lambda: folder / WEIGHTS_INDEX)
    return folder, config


def _load_config(path: Path, *, shown: str | None = None) -> dict[str, Any]:
    shown = shown or str(path)
    if not path.is_file():
        raise SourceError(f"{shown} is missing: a model folder needs the config.json transformers wrote")
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise SourceError(f"{shown} is {path.stat().st_size / 1e6:.1f} MB; a config.json is a few KB: "
                          "re-download or re-save the model")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SourceError(f"{shown} is not valid JSON ({exc}): re-download or re-save the model") from None
    except RecursionError:
        raise SourceError(f"{shown} is nested too deeply to be a model config: re-save the model") from None
    if not isinstance(config, dict):
        raise SourceError(f"{shown} holds a JSON {type(config).__name__}, not an object: re-save the model")
    _check_trust(config, shown)
    _check_shape(config, shown)
    return config


# The facts a merge computes with; each must be a positive whole number where present.
SHAPE_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "vocab_size")
MAX_CONFIG_BYTES = 1 << 20


def _check_shape(config: dict[str, Any], shown: str) -> None:
    for key in SHAPE_FIELDS:
        value = config.get(key)
        if key == "head_dim" and value is None:
            continue  # derived from hidden_size / num_attention_heads
        if key in config and (type(value) is not int or value < 1):
            raise SourceError(f"{shown}: {key} is {value!r}; it must be a positive whole number: "
                              "fix the config or re-download the model")


# Families transformers has shipped natively for years; asking transformers itself (below)
# costs about a second of import per CLI call, so it is done only for other model types.
NATIVE_MODEL_TYPES = frozenset({"llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "gemma", "phi3"})


def _known_model_type(model_type: str) -> bool:
    if model_type in NATIVE_MODEL_TYPES:
        return True
    from transformers import CONFIG_MAPPING

    return model_type in CONFIG_MAPPING


def _check_trust(config: dict[str, Any], shown: str) -> None:
    if "auto_map" in config:
        raise SourceError(f"{shown} has auto_map: this model needs its own Python code "
                          "(trust_remote_code), which the workbench never runs; pick a model that "
                          "transformers supports natively")
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or not _known_model_type(model_type):
        raise SourceError(f"{shown} has model_type {model_type!r}, which this transformers does not know: "
                          "the workbench only loads models transformers supports natively")


def _check_weight_names(name: str, files: set[str]) -> None:
    """Refuse from file names alone: no safetensors, or pickle-only weights."""
    if any(f.endswith(".safetensors") for f in files):
        return
    pickles = sorted(f for f in files if f.endswith(PICKLE_SUFFIXES))
    if pickles:
        raise SourceError(
            f"{name} has only pickle weights ({', '.join(pickles[:3])}): loading pickle runs arbitrary "
            "code, so the workbench only reads safetensors; convert the model to safetensors "
            "(save_pretrained(..., safe_serialization=True)) or pick a repo that has them")
    raise SourceError(f"{name} has no weights (no *.safetensors): is this the right folder or repo?")


def _weight_files(name: str, files: set[str], index_path: Callable[[], Path]) -> list[str]:
    """The weight files to use: model.safetensors, or the index and every shard it lists."""
    _check_weight_names(name, files)
    if SINGLE_WEIGHTS in files:
        return [SINGLE_WEIGHTS]
    if WEIGHTS_INDEX not in files:
        found = sorted(f for f in files if f.endswith(".safetensors"))[:3]
        raise SourceError(f"{name} has {', '.join(found)} but neither {SINGLE_WEIGHTS} nor {WEIGHTS_INDEX}: "
                          "save it with transformers' save_pretrained (adapters must be merged first)")
    try:
        weight_map = json.loads(index_path().read_text(encoding="utf-8"))["weight_map"]
        shards = sorted(set(weight_map.values()))
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as exc:
        raise SourceError(f"{name}/{WEIGHTS_INDEX} is not a valid index ({type(exc).__name__}: {exc}): "
                          "re-save the model") from None
    # A shard name is a plain file name; anything else could point outside the model folder.
    bad = [s for s in shards if not isinstance(s, str) or Path(s).name != s or s in (".", "..")]
    if bad:
        raise SourceError(f"{name}/{WEIGHTS_INDEX} lists shard names that are not plain file names: "
                          f"{bad[:3]}; refusing to read outside the model folder")
    missing = [s for s in shards if s not in files]
    if missing:
        raise SourceError(f"{name}: {WEIGHTS_INDEX} lists {len(missing)} shard(s) that are missing, "
                          f"e.g. {missing[:3]}: re-download or re-save the model")
    return [WEIGHTS_INDEX, *shards]
