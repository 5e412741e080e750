"""The model registry: each model loaded once per process, shared tensors, one forward at a time.

Heavy objects (models, tokenizers) live here and nowhere else; UI sessions hold only model
references. `registry().get(ref)` loads a model on first use (two threads asking at once load
it once) and `unload(ref)` frees it. When a MoE and its base are both loaded, every tensor
that is equal between them is kept once (see `workbench.chat.share`), so base plus MoE cost about
the MoE alone. Every forward pass, whichever model and session, runs under `COMPUTE_LOCK`:
on a GPU or two CPU cores, two passes at once only slow each other down, and router hooks
must see only their own session's pass. Generation takes the lock per token, so sessions
interleave token by token.

On the CPU, weights are copied out of their memory-mapped files into RAM (`materialise`),
and a loaded MoE gets a decode path for its experts: for a single token it runs just that
token's k experts' matmuls, skipping the routing bookkeeping (one-hot masks, sorts, index
lists) that transformers' implementations pay per layer: a few percent of decode speed for
the 2-of-4 demo MoE on idle cores, more on busy ones (bench/bench_chat.py measures it);
prompts of several tokens keep transformers' own path.
Legend: E experts, k experts per token, T tokens, H hidden, I intermediate.
"""

from __future__ import annotations

import gc
import logging
import os
import threading
import time
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from workbench.chat.share import share_between, unique_bytes
from workbench.device import pick_device
from workbench.errors import SourceError
from workbench.recipe import Recipe, parse_recipe, routed_experts

log = logging.getLogger(__name__)

# One forward at a time in this process (docs/reliability.md: GPU work never runs concurrently).
COMPUTE_LOCK = threading.RLock()
RECIPE_COPY = "mergekit_moe_config.yml"  # the recipe a build writes next to the weights


@dataclass
class LoadedModel:
    ref: str  # the reference it was loaded by (a demo name, a hub id or a folder)
    model: nn.Module
    tokenizer: Any
    device: torch.device
    dtype: torch.dtype
    path: Path | None = None
    expert_names: list[str] = field(default_factory=list)  # per expert: its source model; [] if dense
    base_ref: str | None = None  # a built MoE's base_model, from its recipe copy
    lock: Any = COMPUTE_LOCK

    @property
    def is_moe(self) -> bool:
        return routed_experts(self.model.config) > 0

    @property
    def layers(self) -> int:
        return int(self.model.config.num_hidden_layers)

    @property
    def top_k(self) -> int:
        return int(getattr(self.model.config, "num_experts_per_tok", 0) or 0)

    @property
    def context_length(self) -> int:
        return int(getattr(self.model.config, "max_position_embeddings", 0) or 2048)


def wrap_model(model: nn.Module, tokenizer: Any, *, ref: str = "<in memory>",
               expert_names: list[str] | None = None) -> LoadedModel:
    """A LoadedModel around a model already in memory (tools and tests); not registered."""
    param = next(model.parameters())
    experts = routed_experts(model.config)
    names = expert_names or [f"expert {e}" for e in range(experts)]
    return LoadedModel(ref, model.eval(), tokenizer, param.device, param.dtype, expert_names=names)


def _decode_experts_forward(self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                            top_k_weights: torch.Tensor) -> torch.Tensor:
    """MixtralExperts.forward for (T, H) states; T == 1 runs only the token's k experts.

    Experts are summed in ascending id order, the order of transformers' eager loop. A slot
    of weight 0 (an intervention's forced or ablated expert) adds nothing and is skipped.
    """
    if hidden_states.shape[0] != 1:
        return type(self).forward(self, hidden_states, top_k_index, top_k_weights)
    ids, weights = top_k_index[0].tolist(), top_k_weights[0].tolist()
    out = None
    for slot in sorted(range(len(ids)), key=ids.__getitem__):
        e = ids[slot]
        if weights[slot] == 0.0:
            continue
        gate, up = nn.functional.linear(hidden_states, self.gate_up_proj[e]).chunk(2, dim=-1)  # (1, I) x2
        y = nn.functional.linear(self.act_fn(gate) * up, self.down_proj[e])  # (1, H)
        y = y * top_k_weights[0, slot]
        out = y if out is None else out + y
    return torch.zeros_like(hidden_states) if out is None else out.to(hidden_states.dtype)


def install_decode_path(model: nn.Module) -> int:
    """Give every fused-experts module of `model` the single-token fast path; returns how many."""
    count = 0
    for module in model.modules():
        fused = getattr(module, "gate_up_proj", None)
        if isinstance(fused, torch.Tensor) and fused.dim() == 3 and hasattr(module, "act_fn"):
            module.forward = types.MethodType(_decode_experts_forward, module)
            count += 1
    return count


def materialise(model: nn.Module) -> None:
    """Copy CPU weights out of their memory-mapped safetensors files into RAM.

    transformers maps CPU weights from the files and reads pages on first touch; when a build
    or a download fills the page cache, those pages are evicted and a chat step re-reads them
    from disk (seconds instead of milliseconds). A tied Parameter is one object: copied once.
    """
    with torch.no_grad():
        for param in model.parameters():
            param.data = param.data.clone()


def saved_recipe(folder: Path | None) -> Recipe | None:
    """The recipe a built MoE was made from (its recipe copy), or None without a readable one."""
    if folder is None:
        return None
    try:
        text = (Path(folder) / RECIPE_COPY).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    return parse_recipe(text)[0]


def _recipe_facts(folder: Path, experts: int) -> tuple[list[str], str | None]:
    """(expert labels, base model) from a built MoE's recipe copy; generic names without one."""
    generic = [f"expert {e}" for e in range(experts)]
    recipe = saved_recipe(folder)
    if recipe is None:
        return generic, None
    names = recipe.expert_labels()
    return (names if len(names) == experts else generic), recipe.base_model


def lora_refused(ref: str) -> str:
    return (f"{ref!r} applies a LoRA, which only a recipe's experts take (as the build reads their "
            "weights); to chat with it, build a MoE that uses it, or merge the adapter into its model "
            "first (peft's merge_and_unload) and load that folder")


def load_model(ref: str, *, device: str = "auto", token: str | None = None,
               allow_local: bool = True) -> LoadedModel:
    """Resolve and load `ref` (a folder, hub id or demo:NAME) with its tokenizer; not registered."""
    from transformers import AutoModelForCausalLM, AutoTokenizer  # lazy: importing stays cheap

    from workbench.models import resolve

    source = resolve(ref, token=token, allow_local=allow_local)
    if source.adapter is not None:
        raise SourceError(lora_refused(ref))
    where, dtype = pick_device(device)
    log.info("loading %s from %s on %s (%s)", ref, source.path, where, dtype)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(source.path), trust_remote_code=False)
        model = AutoModelForCausalLM.from_pretrained(
            str(source.path), dtype=dtype, use_safetensors=True, trust_remote_code=False,
            device_map=str(where)).eval()
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise SourceError(f"cannot load model {ref!r} from {source.path}: {exc}; check that the folder "
                          "holds a complete checkpoint (config.json, safetensors, tokenizer)") from exc
    experts = routed_experts(model.config)
    names, base = _recipe_facts(source.path, experts) if experts else ([], None)
    if where.type == "cpu":
        materialise(model)
        if experts:
            install_decode_path(model)
    return LoadedModel(ref, model, tokenizer, where, dtype, source.path, names, base)


@dataclass
class _Slot:
    lock: threading.Lock = field(default_factory=threading.Lock)
    entry: LoadedModel | None = None
    used: float = 0.0  # time.monotonic() of the last get(): the least recent goes first


def default_max_bytes() -> int:
    """$MOE_WORKBENCH_MODEL_GB (GB of models kept loaded), else half of this machine's memory."""
    given = os.environ.get("MOE_WORKBENCH_MODEL_GB", "").strip()
    if given:
        try:
            gb = float(given)
        except ValueError:
            raise SourceError(f"MOE_WORKBENCH_MODEL_GB={given!r} is not a number of GB; e.g. 8") from None
        if not gb > 0:
            raise SourceError(f"MOE_WORKBENCH_MODEL_GB={given!r} must be above 0")
        return int(gb * 1e9)
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2


class Registry:
    """Loaded models by (reference, device); load once, share equal tensors, unload on request.

    Bounded: once the loaded models hold more than `max_bytes` of distinct tensors, the least
    recently used are unloaded (never the one just asked for). A reply already streaming
    keeps its model alive until it ends; the registry only stops handing it out.
    """

    def __init__(self, *, allow_local: bool = True, max_bytes: int | None = None) -> None:
        self.allow_local = allow_local  # False in a public Space: no server folders by name
        self.max_bytes = max_bytes if max_bytes is not None else default_max_bytes()
        self._lock = threading.Lock()
        self._slots: dict[tuple[str, str], _Slot] = {}

    def _key(self, ref: str, device: str) -> tuple[str, str]:
        """(reference, "device/dtype"); a local folder by its resolved path, so that two
        spellings of one folder load it once."""
        from workbench.models import parse_ref

        parsed = parse_ref(ref, allow_local=self.allow_local)
        if parsed.adapter is not None:  # its key would be the plain model's
            raise SourceError(lora_refused(ref))
        name = str(Path(parsed.name).resolve()) if parsed.kind == "local" else ref.strip()
        where, dtype = pick_device(device)
        return name, f"{where}/{dtype}"

    def get(self, ref: str, *, device: str = "auto", token: str | None = None) -> LoadedModel:
        """The model loaded by `ref` on `device`, loading it (and sharing tensors) on first use."""
        key = self._key(ref, device)
        while True:
            with self._lock:
                slot = self._slots.setdefault(key, _Slot())
            with slot.lock:  # a second caller for the same model waits here, then finds it loaded
                with self._lock:
                    if self._slots.get(key) is not slot:
                        continue  # its load failed or it was unloaded while we waited: start over
                    slot.used = time.monotonic()
                if slot.entry is None:
                    slot.entry = self._load(key, device, token, slot)
                    self._evict(keep=key)
                return slot.entry

    def _evict(self, keep: tuple[str, str]) -> None:
        """Unload the least recently used models until the rest fit in max_bytes."""
        while self.resident_bytes() > self.max_bytes:
            with self._lock:
                others = [(s.used, k) for k, s in self._slots.items() if k != keep and s.entry is not None]
                if not others:
                    return  # the one model asked for is larger than the bound: it stays
                _, oldest = min(others)
                del self._slots[oldest]  # a get() that holds the slot still returns its model
            log.info("unloading %s (least recently used) to keep loaded models under %.1f GB",
                     oldest[0], self.max_bytes / 1e9)
            _free_memory()

    def _load(self, key: tuple[str, str], device: str, token: str | None, slot: _Slot) -> LoadedModel:
        try:
            entry = load_model(key[0], device=device, token=token, allow_local=self.allow_local)
        except BaseException:
            with self._lock:
                if self._slots.get(key) is slot:
                    del self._slots[key]
            raise
        with COMPUTE_LOCK:  # sharing rewires modules that another thread may be running
            for other in self.loaded():
                if other.device == entry.device and other.dtype == entry.dtype:
                    share_between(entry.model, other.model)
        return entry

    def loaded(self) -> list[LoadedModel]:
        with self._lock:
            return [s.entry for s in self._slots.values() if s.entry is not None]

    def unload(self, ref: str, *, device: str | None = None) -> int:
        """Forget `ref` (on `device`, or on every device); returns how many models were dropped.

        Tensors it shared with a model that stays loaded stay with that model.
        """
        wanted, only = self._key(ref, device or "cpu")
        only = only if device else None
        with self._lock:
            keys = [k for k in self._slots if k[0] == wanted and (only is None or k[1] == only)]
            dropped = [self._slots.pop(k) for k in keys]
        for slot in dropped:
            slot.entry = None
        if dropped:
            _free_memory()
        return len(dropped)

    def clear(self) -> None:
        for entry in self.loaded():
            self.unload(entry.ref)

    def resident_bytes(self) -> int:
        """Bytes of distinct tensor storage held by all loaded models together."""
        return unique_bytes(entry.model for entry in self.loaded())


def _free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


_REGISTRY: Registry | None = None
_REGISTRY_LOCK = threading.Lock()


def registry() -> Registry:
    """The process-wide registry, created on first use (importing this module creates nothing)."""
    global _REGISTRY
    with _REGISTRY_LOCK:
        if _REGISTRY is None:
            _REGISTRY = Registry()
        return _REGISTRY


__all__ = ["COMPUTE_LOCK", "LoadedModel", "Registry", "install_decode_path", "load_model", "materialise",
           "registry", "saved_recipe", "wrap_model"]
