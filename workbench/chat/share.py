"""Tensor sharing between loaded models: a MoE and its base hold one copy of what they share.

A frankenMoE copies the base's embeddings, attention, norms and lm_head verbatim, and its
expert MLPs are often copies of the base's MLP too (Cognito-2x7B's first expert is its base;
every demo MoE is made of copies). When both are loaded, each equal tensor is kept once:

- same-named parameters (the non-expert ones) that are `torch.equal` become one Parameter;
- a dense model's MLP (gate_proj, up_proj, down_proj) that equals expert e of a MoE layer
  becomes a view into that expert's slice of the fused `gate_up_proj` / `down_proj`.

Equality is checked value by value, never assumed from names or a recipe, so a MoE built in
bf16 and loaded in float32 next to a float32 base shares only what is really equal.
Legend: L layers, E experts, H hidden, I intermediate.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch
from torch import nn

log = logging.getLogger(__name__)


def unique_bytes(modules: Iterable[nn.Module]) -> int:
    """Bytes of distinct storages behind the parameters and buffers of `modules` together."""
    seen: dict[tuple[str, int], int] = {}
    for module in modules:
        for tensor in list(module.parameters()) + list(module.buffers()):
            storage = tensor.untyped_storage()
            key = (str(tensor.device), storage.data_ptr())
            seen[key] = max(seen.get(key, 0), storage.nbytes())
    return sum(seen.values())


def _same_kind(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and a.device == b.device


def _swap(target: nn.Module, replacement: dict[int, nn.Parameter]) -> None:
    """Point every slot that holds a replaced Parameter at its replacement (keeps ties tied)."""
    for module in target.modules():
        for key, param in list(module._parameters.items()):
            if param is not None and id(param) in replacement:
                module._parameters[key] = replacement[id(param)]


def share_same_named(target: nn.Module, source: nn.Module) -> int:
    """Replace target's parameters by source's same-named, equal ones; returns the bytes saved."""
    source_params = dict(source.named_parameters(remove_duplicate=False))
    replacement: dict[int, nn.Parameter] = {}
    keep_alive = []  # ids stay unique only while the replaced objects live
    saved = 0
    for name, param in target.named_parameters():
        other = source_params.get(name)
        if other is None or other is param or not _same_kind(param, other):
            continue
        if torch.equal(param, other):
            replacement[id(param)] = other
            keep_alive.append(param)
            saved += param.numel() * param.element_size()
    _swap(target, replacement)
    return saved


def _layers(model: nn.Module) -> list[nn.Module]:
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    return list(layers) if layers is not None else []


def _is_fused_experts(module: object) -> bool:
    return all(hasattr(module, name) for name in ("gate_up_proj", "down_proj", "num_experts"))


def _is_dense_mlp(module: object) -> bool:
    return all(hasattr(module, name) for name in ("gate_proj", "up_proj", "down_proj"))


def _matching_expert(experts: nn.Module, mlp: nn.Module) -> int | None:
    gate, up, down = mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight  # (I, H) (I, H) (H, I)
    inter = gate.shape[0]
    fused, fused_down = experts.gate_up_proj, experts.down_proj  # (E, 2I, H), (E, H, I)
    if fused.shape[1:] != (2 * inter, gate.shape[1]) or fused_down.shape[1:] != down.shape:
        return None
    if fused.dtype != gate.dtype or fused.device != gate.device:
        return None
    for e in range(experts.num_experts):
        # MixtralExperts splits gate_up with chunk(2): gate rows first, then up rows.
        if (torch.equal(fused[e, :inter], gate) and torch.equal(fused[e, inter:], up)
                and torch.equal(fused_down[e], down)):
            return e
    return None


def is_moe(model: nn.Module) -> bool:
    """True when the model's decoder layers hold fused experts (a Mixtral-style MoE)."""
    layers = _layers(model)
    return bool(layers) and _is_fused_experts(getattr(getattr(layers[0], "mlp", None), "experts", None))


def share_expert_mlps(moe: nn.Module, dense: nn.Module) -> int:
    """Make each dense MLP that equals one of the MoE layer's experts a view into that expert.

    Returns the bytes saved. The dense model's own copies are freed once nothing else holds them.
    """
    saved = 0
    for moe_layer, dense_layer in zip(_layers(moe), _layers(dense), strict=False):
        experts = getattr(getattr(moe_layer, "mlp", None), "experts", None)
        mlp = getattr(dense_layer, "mlp", None)
        if not (_is_fused_experts(experts) and _is_dense_mlp(mlp)):
            continue
        e = _matching_expert(experts, mlp)
        if e is None:
            continue
        inter = mlp.gate_proj.weight.shape[0]
        fused, fused_down = experts.gate_up_proj.detach(), experts.down_proj.detach()
        for linear, view in ((mlp.gate_proj, fused[e, :inter]), (mlp.up_proj, fused[e, inter:]),
                             (mlp.down_proj, fused_down[e])):
            saved += linear.weight.numel() * linear.weight.element_size()
            linear.weight = nn.Parameter(view, requires_grad=False)
    return saved


def share_between(new: nn.Module, loaded: nn.Module) -> int:
    """Share everything equal between a newly loaded model and one already loaded; bytes saved."""
    saved = share_same_named(new, loaded)
    new_is_moe, old_is_moe = is_moe(new), is_moe(loaded)
    if new_is_moe and not old_is_moe:
        saved += share_expert_mlps(new, loaded)
    elif old_is_moe and not new_is_moe:
        saved += share_expert_mlps(loaded, new)
    if saved:
        log.info("shared %.1f MB of equal tensors between models", saved / 1e6)
    return saved
