"""Router traces: which experts every token went to, layer by layer, captured with hooks.

`RouterTrace` is the one record plots and analysis read. It is filled from a built MoE by
forward hooks on each layer's router (found by module type and weight shape), attached in
`router_hooks`, a context manager that always removes them, or from the base model and a
recipe's gates without a build (`workbench.routing.preview`). Hooks only read the router's outputs
(logits, renormalised top-k weights, top-k ids), so tracing cannot change what the model
computes.

Legend: T tokens, L layers, E experts, k experts per token, H hidden.
"""

from __future__ import annotations

import logging
import re
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from workbench.errors import WorkbenchError
from workbench.recipe import routed_experts

log = logging.getLogger(__name__)

MAX_TRACE_TOKENS = 4096  # one forward over the whole text; attention memory grows with T^2
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")
_ROUTERS: weakref.WeakKeyDictionary[nn.Module, list[tuple[int, nn.Module]]] = weakref.WeakKeyDictionary()


class TraceError(WorkbenchError):
    """Routing could not be traced or previewed for this model and text."""


@dataclass
class RouterTrace:
    tokens: list[str]  # (T,) display strings, one per token
    token_ids: list[int]  # (T,)
    probs: Tensor  # (T, L, E) float32 router softmax over all experts
    topk_ids: Tensor  # (T, L, k) int64, best first
    topk_weights: Tensor  # (T, L, k) float32, renormalised to sum to one
    is_prefill: Tensor  # (T,) bool: read as part of the prompt (True) or generated (False)
    expert_names: list[str]  # (E,) each expert's source model
    source: str = "model"  # "model": a built MoE's routers; "preview": gates on the base, no build
    model: str = ""  # reference of the model that produced it
    intervention: dict[str, Any] | None = None  # Intervention.to_dict() it was routed under; None: none

    def __post_init__(self) -> None:
        t, layers, e = self.probs.shape
        k = self.topk_ids.shape[-1]
        shapes = {"topk_ids": (self.topk_ids.shape, (t, layers, k)),
                  "topk_weights": (self.topk_weights.shape, (t, layers, k)),
                  "is_prefill": (self.is_prefill.shape, (t,))}
        for name, (got, want) in shapes.items():
            if tuple(got) != want:
                raise ValueError(f"RouterTrace.{name} has shape {tuple(got)}, expected {want}")
        if len(self.tokens) != t or len(self.token_ids) != t or len(self.expert_names) != e:
            raise ValueError(f"RouterTrace has {len(self.tokens)} tokens, {len(self.token_ids)} ids and "
                             f"{len(self.expert_names)} expert names for probs of shape {(t, layers, e)}")

    @classmethod
    def joined(cls, traces: list[RouterTrace]) -> RouterTrace:
        """One trace of several texts routed by the same router, one after another (for a
        summary over all of them)."""
        first = traces[0]
        if len(traces) == 1:
            return first
        return cls([t for trace in traces for t in trace.tokens],
                   [i for trace in traces for i in trace.token_ids],
                   torch.cat([t.probs for t in traces]), torch.cat([t.topk_ids for t in traces]),
                   torch.cat([t.topk_weights for t in traces]), torch.cat([t.is_prefill for t in traces]),
                   first.expert_names, first.source, first.model, first.intervention)

    @property
    def num_tokens(self) -> int:
        return self.probs.shape[0]

    @property
    def layers(self) -> int:
        return self.probs.shape[1]

    @property
    def experts(self) -> int:
        return self.probs.shape[2]

    @property
    def k(self) -> int:
        return self.topk_ids.shape[2]

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready values; the keys are the CLI's documented `trace` schema."""
        return {
            "source": self.source, "model": self.model, "layers": self.layers, "experts": self.experts,
            "k": self.k, "expert_names": list(self.expert_names), "tokens": list(self.tokens),
            "token_ids": list(self.token_ids), "is_prefill": self.is_prefill.tolist(),
            "probs": self.probs.tolist(), "topk_ids": self.topk_ids.tolist(),
            "topk_weights": self.topk_weights.tolist(),
        } | ({"intervention": self.intervention} if self.intervention is not None else {})

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RouterTrace:
        experts, k, layers = int(data["experts"]), int(data["k"]), int(data["layers"])
        t = len(data["tokens"])
        return cls(
            tokens=list(data["tokens"]), token_ids=[int(i) for i in data["token_ids"]],
            probs=torch.tensor(data["probs"], dtype=torch.float32).reshape(t, layers, experts),
            topk_ids=torch.tensor(data["topk_ids"], dtype=torch.int64).reshape(t, layers, k),
            topk_weights=torch.tensor(data["topk_weights"], dtype=torch.float32).reshape(t, layers, k),
            is_prefill=torch.tensor(data["is_prefill"], dtype=torch.bool).reshape(t),
            expert_names=list(data["expert_names"]), source=str(data.get("source", "model")),
            model=str(data.get("model", "")), intervention=data.get("intervention"),
        )


def token_strings(tokenizer: Any, token_ids: list[int]) -> list[str]:
    """Each token decoded on its own, for display (a byte-level piece of a character shows as U+FFFD)."""
    return list(tokenizer.batch_decode([[i] for i in token_ids], skip_special_tokens=False))


def route(probs: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """(.., E) probabilities -> (top-k weights renormalised, top-k ids), as Mixtral's router does."""
    top, ids = torch.topk(probs, k, dim=-1)
    return top / top.sum(dim=-1, keepdim=True), ids


def layer_index(name: str) -> int | None:
    match = _LAYER.search(name + ".")
    return int(match.group(1)) if match else None


def _router_types() -> tuple[type, ...]:
    """The router modules of the families the workbench builds and loads (Mixtral, Qwen2-MoE):
    each returns (logits, top-k weights, top-k ids) from (T, H) states."""
    from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter  # lazy
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeTopKRouter

    return (MixtralTopKRouter, Qwen2MoeTopKRouter)


def find_routers(model: nn.Module) -> list[tuple[int, nn.Module]]:
    """(layer, router) for every MoE layer, in layer order: modules of a known router type whose
    weight is (E, H) for the model's expert count and hidden size; [] for a dense model."""
    if model in _ROUTERS:
        return _ROUTERS[model]
    config = model.config
    shape = (routed_experts(config), int(config.hidden_size))
    kinds = _router_types()
    found = []
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if isinstance(module, kinds) and weight is not None and tuple(weight.shape) == shape:
            layer = layer_index(name)
            if layer is not None:
                found.append((layer, module))
    found.sort(key=lambda item: item[0])
    _ROUTERS[model] = found
    return found


def router_weights(model: nn.Module) -> Tensor:
    """(L, E, H) float32 CPU copy of a MoE's router weights (compare with a recipe's gates)."""
    routers = find_routers(model)
    if not routers:
        raise TraceError("this model has no MoE routers; load a built MoE")
    return torch.stack([r.weight.detach().to("cpu", torch.float32) for _, r in routers])


class RouterRecorder:
    """Collects router outputs step by step (the prompt, then one step per generated token)."""

    def __init__(self, layers: int) -> None:
        self.layers = layers
        self.prefill: list[bool] = []
        self._rows: list[list[tuple[Tensor, Tensor, Tensor]]] = [[] for _ in range(layers)]

    def begin_step(self, tokens: int, *, prefill: bool) -> None:
        """The next forward reads `tokens` new tokens; `prefill` says whether they are the prompt."""
        self.prefill.extend([prefill] * tokens)

    def record(self, layer: int, logits: Tensor, weights: Tensor, ids: Tensor) -> None:
        # Same softmax as the router's own (float32): recomputed, never fed back.
        probs = torch.softmax(logits.detach().float(), dim=-1)
        self._rows[layer].append((probs, weights.detach().float(), ids.detach()))

    def complete(self) -> bool:
        """True when every layer has recorded every token begun (no step stopped half-way)."""
        return bool(self.prefill) and all(
            sum(p.shape[0] for p, _, _ in rows) == len(self.prefill) for rows in self._rows)

    def finish(self, token_ids: list[int], tokenizer: Any, expert_names: list[str], *,
               source: str = "model", model: str = "",
               intervention: dict[str, Any] | None = None) -> RouterTrace:
        """The RouterTrace of everything recorded; `token_ids` are the tokens read, in order."""
        counts = {sum(p.shape[0] for p, _, _ in rows) for rows in self._rows}
        if counts != {len(self.prefill)} or len(token_ids) != len(self.prefill):
            raise TraceError(f"router hooks saw {sorted(counts)} token(s) per layer for {len(token_ids)} "
                             f"token(s) read; was a forward run outside the recorder's steps?")
        per_layer = [[torch.cat([row[j] for row in rows]).cpu() for j in range(3)] for rows in self._rows]
        probs, weights, ids = (torch.stack([layer[j] for layer in per_layer], dim=1) for j in range(3))
        return RouterTrace(token_strings(tokenizer, token_ids), list(token_ids), probs, ids.long(), weights,
                           torch.tensor(self.prefill, dtype=torch.bool), list(expert_names), source, model,
                           intervention)


@contextmanager
def router_hooks(model: nn.Module, recorder: RouterRecorder) -> Iterator[RouterRecorder]:
    """Record every router call of `model` into `recorder` inside the block; hooks always come off."""
    routers = find_routers(model)
    if not routers:
        raise TraceError("this model has no MoE routers to trace; routing exists only in a built MoE "
                         "(use the preview for a base model)")
    handles = []

    def hook_for(layer: int):
        def hook(module: nn.Module, args: Any, output: tuple[Tensor, Tensor, Tensor]) -> None:
            logits, weights, ids = output  # (T, E), (T, k), (T, k)
            recorder.record(layer, logits, weights, ids)
        return hook

    try:
        for position, (_, module) in enumerate(routers):
            handles.append(module.register_forward_hook(hook_for(position)))
        yield recorder
    finally:
        for handle in handles:
            handle.remove()


def encode_text(tokenizer: Any, text: str, *, add_special_tokens: bool, limit: int) -> list[int]:
    if not text or not text.strip():
        raise TraceError("the text to route is empty: type some text")
    ids = list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])
    cap = min(limit, MAX_TRACE_TOKENS)
    if not ids or len(ids) > cap:
        raise TraceError(f"the text is {len(ids)} tokens; routing takes 1 to {cap} tokens: shorten it")
    return ids
