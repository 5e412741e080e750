"""LoRA adapters for `model+lora` references: read a peft adapter folder, apply it to the
expert's weights as they are read.

mergekit merges a reference's LoRA with peft's `merge_and_unload` (mergekit/common.py,
`ModelReference.merged`), which for a plain LoRA on a linear layer makes
    W' = W + s · B @ A,   s = lora_alpha / r   (lora_alpha / √r with use_rslora)
where A is (r, in) and B is (out, r). That is all this module does, per weight, from the
adapter's `adapter_model.safetensors` (never a pickle) and `adapter_config.json`. A MoE takes
only its experts' MLPs, so an adapter's other modules (attention, embeddings) have no effect;
anything that would change an MLP weight some other way (DoRA, per-module ranks, biases,
LoRA variants, fully trained modules) is refused with what to do instead.

Dimensions: r the adapter's rank, in / out the weight's input and output widths.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import workbench.models.hub as hub_source
from workbench.errors import SourceError
from workbench.models.tensors import TensorInfo, load_tensor, read_header

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
MAX_CONFIG_BYTES = 1 << 20
PREFIX = "base_model.model."  # peft's wrapper around the model, in every saved key
MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
MERGE_FIRST = ("merge it into its model with peft (PeftModel.from_pretrained(model, adapter)"
               ".merge_and_unload(), then save_pretrained with safetensors) and name that folder")
# adapter_config.json keys that describe how it was made, or choose modules (the weight file
# says which were adapted): none changes what merging does.
HARMLESS = frozenset({
    "base_model_name_or_path", "revision", "task_type", "peft_type", "peft_version", "auto_mapping",
    "inference_mode", "init_lora_weights", "lora_dropout", "target_modules", "exclude_modules",
    "layers_to_transform", "layers_pattern", "loftq_config", "eva_config", "corda_config",
    "lora_ga_config", "megatron_core", "qalora_group_size", "ensure_weight_tying", "r", "lora_alpha",
    "use_rslora", "modules_to_save", "trainable_token_indices", "bias",
})
# Keys that change the merge; plain LoRA leaves them false, empty or null, any other value is refused.
PLAIN = ("use_dora", "fan_in_fan_out", "rank_pattern", "alpha_pattern", "lora_bias", "layer_replication",
         "target_parameters", "megatron_config")
WHY = {
    "use_dora": "DoRA rescales every adapted weight by a learned magnitude",
    "fan_in_fan_out": "it was made for GPT-2-style Conv1D layers, stored transposed",
    "rank_pattern": "its modules have ranks of their own",
    "alpha_pattern": "its modules have alphas of their own",
    "lora_bias": "it trains a bias for lora_B, which Mixtral experts cannot hold",
    "layer_replication": "it duplicates layers", "target_parameters": "it adapts raw parameters, not layers",
    "megatron_config": "it was made for Megatron's parallel layers",
}


class LoraRefused(SourceError):
    """An adapter the workbench will not apply: `what` is wrong, `fix` says what to do."""

    def __init__(self, what: str, fix: str):
        self.what, self.fix = what, fix
        super().__init__(f"{what}: {fix}")


@dataclass(frozen=True)
class LoraAdapter:
    """A peft LoRA folder, checked: its scale and, per adapted MLP weight, its A and B."""

    ref: str  # as written after the '+'
    path: Path
    revision: str | None  # the Hub commit it resolved to; None for a local folder
    rank: int
    scale: float  # s in W' = W + s · B @ A
    pairs: Mapping[str, tuple[TensorInfo, TensorInfo]]  # weight name -> (A, B), MLP weights only
    unused: tuple[str, ...]  # adapted modules the MoE does not take from an expert

    def changes(self, weight: str) -> bool:
        return weight in self.pairs

    def check_shapes(self, shapes: Mapping[str, tuple[int, ...]]) -> None:
        """Every adapted weight exists in the model with shape (out, in) = (B rows, A columns)."""
        for weight, (a, b) in self.pairs.items():
            if weight not in shapes:
                raise SourceError(f"LoRA '{self.ref}' adapts {weight}, which the model does not have: "
                                  "is it an adapter for this model?")
            if shapes[weight] != (b.shape[0], a.shape[1]):
                raise SourceError(f"LoRA '{self.ref}': {weight} is {shapes[weight]} but the adapter's B @ A "
                                  f"is {(b.shape[0], a.shape[1])}: it was trained on another model")

    def apply(self, weight: str, tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """`tensor` + s · B @ A in `dtype` (float32 or float64: at least the output's precision)."""
        a_info, b_info = self.pairs[weight]
        a, b = load_tensor(a_info).to(dtype), load_tensor(b_info).to(dtype)  # (r, in), (out, r)
        return tensor.to(dtype) + (b @ a) * self.scale


def open_adapter(ref: str, folder: Path, revision: str | None = None) -> LoraAdapter:
    """The adapter in `folder` (adapter_config.json + adapter_model.safetensors), checked."""
    config = adapter_config(folder / ADAPTER_CONFIG, ref)
    weights = folder / ADAPTER_WEIGHTS
    if not weights.is_file():
        _refuse_pickles(ref, {p.name for p in folder.iterdir()})
        raise SourceError(f"LoRA '{ref}' has no {ADAPTER_WEIGHTS} in {folder.name}: save the adapter with "
                          "peft's save_pretrained (safetensors is its default)")
    rank, scale = settings(config, ref)
    pairs, unused = _pairs(read_header(weights), ref, rank)
    if unused:
        log.info("LoRA '%s' also adapts %s; a MoE takes only its experts' MLPs, so that part has no effect",
                 ref, ", ".join(unused[:4]) + (" ..." if len(unused) > 4 else ""))
    return LoraAdapter(ref, folder, revision, rank, scale, pairs, tuple(unused))


def fetch_adapter(ref: str, name: str, revision: str | None, token: str | None) -> LoraAdapter:
    """An adapter repo on the Hub: listed, refused before download when it has only pickles,
    then its two files fetched at the listed commit."""
    listing = hub_source.list_repo(name, revision, token)
    files = set(listing.sizes)
    if ADAPTER_WEIGHTS not in files:
        _refuse_pickles(ref, files)
        raise SourceError(f"LoRA '{ref}': {name} has no {ADAPTER_WEIGHTS}; is it a peft adapter repo?")
    if ADAPTER_CONFIG not in files:
        raise SourceError(f"LoRA '{ref}': {name} has no {ADAPTER_CONFIG}; is it a peft adapter repo?")
    adapter_config(hub_source.fetch_file(name, ADAPTER_CONFIG, listing.sha, token), ref)  # refuse early
    folder = hub_source.fetch_snapshot(name, listing.sha, [ADAPTER_CONFIG, ADAPTER_WEIGHTS], token)
    return open_adapter(ref, folder, listing.sha)


def check_adapter(ref: str, kind: str, name: str, revision: str | None, token: str | None) -> None:
    """Validation's cheap look: the adapter's config alone (local, or one small Hub file)."""
    if kind == "local":
        folder = Path(name).resolve()
        if not folder.is_dir():
            raise LoraRefused(f"LoRA '{ref}': no adapter folder at {folder}", "check the path after the '+'")
        settings(adapter_config(folder / ADAPTER_CONFIG, ref), ref)
        if not (folder / ADAPTER_WEIGHTS).is_file():
            _refuse_pickles(ref, {p.name for p in folder.iterdir()})
            raise LoraRefused(f"LoRA '{ref}' has no {ADAPTER_WEIGHTS}", "save it with peft's save_pretrained")
        return
    settings(adapter_config(hub_source.fetch_file(name, ADAPTER_CONFIG, revision, token), ref), ref)


def adapter_config(path: Path, ref: str) -> dict[str, Any]:
    if not path.is_file():
        raise LoraRefused(f"LoRA '{ref}' has no {ADAPTER_CONFIG}", "after the '+' name a peft adapter folder "
                          "or repo (adapter_config.json + adapter_model.safetensors)")
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise LoraRefused(f"LoRA '{ref}': {ADAPTER_CONFIG} is {path.stat().st_size / 1e6:.1f} MB, not a peft "
                          "config", "re-save the adapter")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as exc:
        raise LoraRefused(f"LoRA '{ref}': {ADAPTER_CONFIG} is not valid JSON ({exc})",
                          "re-save the adapter") from None
    if not isinstance(config, dict):
        raise LoraRefused(f"LoRA '{ref}': {ADAPTER_CONFIG} is not a JSON object", "re-save the adapter")
    return config


def settings(config: dict[str, Any], ref: str) -> tuple[int, float]:
    """(r, s) of a plain LoRA's config; anything else refused, saying why and what to do."""
    kind = config.get("peft_type")
    if kind != "LORA":
        raise LoraRefused(f"LoRA '{ref}' is a {kind!r} adapter; the workbench applies plain LoRA (peft_type "
                          "LORA) only", MERGE_FIRST)
    for key in PLAIN:
        if config.get(key):  # every plain value is falsy: False, {}, None
            raise LoraRefused(f"LoRA '{ref}' sets {key}: {config[key]!r} ({WHY[key]}); the workbench "
                              "applies plain LoRA only", MERGE_FIRST)
    unknown = sorted(k for k, v in config.items() if k not in HARMLESS and k not in PLAIN and v)
    if unknown:
        raise LoraRefused(f"LoRA '{ref}' sets {', '.join(unknown)}, which the workbench does not know how "
                          "to merge", MERGE_FIRST)
    if config.get("bias", "none") != "none":
        raise LoraRefused(f"LoRA '{ref}' trains biases (bias: {config['bias']!r}), which Mixtral experts "
                          "cannot hold", f"{MERGE_FIRST}, or train it with bias='none'")
    saved = config.get("modules_to_save") or []
    if any(p in str(m) for m in saved for p in (*MLP_PROJECTIONS, "mlp")):
        raise LoraRefused(f"LoRA '{ref}' replaces whole MLP modules (modules_to_save: {saved})", MERGE_FIRST)
    rank, alpha = config.get("r"), config.get("lora_alpha", 8)  # peft's default alpha
    if type(rank) is not int or rank < 1 or not isinstance(alpha, int | float) or isinstance(alpha, bool):
        raise LoraRefused(f"LoRA '{ref}': r is {rank!r} and lora_alpha {alpha!r}", "r must be a positive "
                          "whole number and lora_alpha a number: re-save the adapter")
    return rank, alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)


def _pairs(infos: dict[str, TensorInfo], ref: str,
           rank: int) -> tuple[dict[str, tuple[TensorInfo, TensorInfo]], list[str]]:
    """Per adapted MLP weight its (A, B); the other adapted modules by name."""
    found: dict[str, dict[str, TensorInfo]] = {}
    unused: list[str] = []
    for key, info in infos.items():
        name = key.removeprefix(PREFIX)
        module, _, part = name.rpartition(".lora_")
        is_mlp = any(f".mlp.{p}" in name for p in MLP_PROJECTIONS)
        if part in ("A.weight", "B.weight") and is_mlp:
            found.setdefault(module + ".weight", {})[part[0]] = info
        elif is_mlp or ".mlp." in name:
            raise SourceError(f"LoRA '{ref}' holds {key}, which changes an MLP in a way the workbench does "
                              f"not apply: {MERGE_FIRST}")
        else:
            unused.append(name)
    pairs = {}
    for weight, parts in sorted(found.items()):
        if set(parts) != {"A", "B"}:
            raise SourceError(f"LoRA '{ref}' has lora_{''.join(parts)} but not both lora_A and lora_B for "
                              f"{weight}: the adapter file is incomplete, re-save it")
        a, b = parts["A"], parts["B"]
        if len(a.shape) != 2 or len(b.shape) != 2 or a.shape[0] != rank or b.shape[1] != rank:
            raise SourceError(f"LoRA '{ref}': {weight} has A {a.shape} and B {b.shape}; with r = {rank} they "
                              f"must be (r, in) and (out, r): re-save the adapter")
        pairs[weight] = (a, b)
    if not pairs:
        raise SourceError(f"LoRA '{ref}' adapts no MLP (gate_proj, up_proj, down_proj), and a MoE takes only "
                          "its experts' MLPs: this expert would be its model unchanged; drop the '+LoRA' "
                          "or use an adapter trained on the MLPs")
    return pairs, sorted({n.rpartition(".lora_")[0] or n for n in unused})


def _refuse_pickles(ref: str, files: set[str]) -> None:
    pickles = sorted(f for f in files if f.startswith("adapter_model.") and f != ADAPTER_WEIGHTS)
    if pickles:
        raise LoraRefused(f"LoRA '{ref}' has only {', '.join(pickles)}: loading pickle runs arbitrary code, "
                          "so the workbench reads safetensors only",
                          "re-save it with peft's save_pretrained (safe_serialization=True)")
