"""What router traces mean, in numbers: load, entropy, divergence.

(How well gates route their own themes is scored held out, in `workbench.gates.score`.)

Pure functions of `RouterTrace`s and tensors: no model, no I/O. Load counts top-k slots, so
each token spreads a total of one over its k experts per layer (1/k each); a router that
ignores its input scores 1/E everywhere.

Legend: T tokens, L layers, E experts, k experts per token, R reply tokens, V vocabulary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from workbench.gates import GateDiagnostics, diagnose
from workbench.routing.trace import RouterTrace


def _json(t: Tensor) -> Any:
    """Tensor -> nested lists with NaN as None (JSON has no NaN)."""
    if t.dim() == 0:
        value = float(t)
        return None if math.isnan(value) else value
    return [_json(row) for row in t]


def slot_share(topk_ids: Tensor, experts: int) -> Tensor:
    """(T, L, k) top-k ids -> (L, E) share of each layer's T*k slots per expert; zeros when T = 0."""
    t, layers, k = topk_ids.shape
    if t == 0:
        return torch.zeros(layers, experts)
    counts = torch.zeros(layers, experts)
    counts.scatter_add_(1, topk_ids.permute(1, 0, 2).reshape(layers, -1), torch.ones(layers, t * k))
    return counts / (t * k)


@dataclass
class ExpertLoad:
    prefill: Tensor  # (L, E) share of the prompt's top-k slots
    decode: Tensor  # (L, E) share of the generated tokens' slots; zeros without any
    overall: Tensor  # (L, E)
    prefill_tokens: int
    decode_tokens: int

    def to_dict(self) -> dict[str, Any]:
        return {"prefill": _json(self.prefill), "decode": _json(self.decode), "overall": _json(self.overall),
                "prefill_tokens": self.prefill_tokens, "decode_tokens": self.decode_tokens}


def expert_load(trace: RouterTrace) -> ExpertLoad:
    """Per layer, the share of top-k choices each expert got, for prompt and reply apart."""
    pre = trace.is_prefill
    ids, e = trace.topk_ids, trace.experts
    return ExpertLoad(slot_share(ids[pre], e), slot_share(ids[~pre], e), slot_share(ids, e),
                      int(pre.sum()), int((~pre).sum()))


def normalised_entropy(probs: Tensor) -> Tensor:
    """(..., E) distributions -> (...) entropy / log E, in [0, 1]; 0 when E = 1."""
    experts = probs.shape[-1]
    if experts < 2:
        return torch.zeros(probs.shape[:-1])
    p = probs.double()
    h = -(p * torch.log(p.clamp_min(1e-30))).sum(dim=-1)
    return (h / math.log(experts)).float()


@dataclass
class Entropy:
    prefill: Tensor  # (L,) mean normalised entropy over the prompt's tokens; NaN without any
    decode: Tensor  # (L,) over generated tokens; NaN without any
    overall: Tensor  # (L,)

    def to_dict(self) -> dict[str, Any]:
        return {"prefill": _json(self.prefill), "decode": _json(self.decode), "overall": _json(self.overall)}


def routing_entropy(trace: RouterTrace) -> Entropy:
    """Per layer, how undecided the router is: 0 = always one expert, 1 = uniform over all E."""
    h = normalised_entropy(trace.probs)  # (T, L)
    pre = trace.is_prefill
    nan = torch.full((trace.layers,), float("nan"))
    return Entropy(h[pre].mean(0) if pre.any() else nan, h[~pre].mean(0) if (~pre).any() else nan,
                   h.mean(0) if trace.num_tokens else nan)


def gate_similarity(vectors: Tensor) -> GateDiagnostics:
    """Expert-expert cosine per layer and its mean, and per-layer condition numbers of (L, E, H)
    gates or router weights (`trace.router_weights`): the diagnostics the gates carry."""
    return diagnose(vectors)


def kl_divergence(p_logits: Tensor, q_logits: Tensor) -> Tensor:
    """(R, V) logits of P and Q -> (R,) KL(P || Q) in nats, computed in float64."""
    if p_logits.shape != q_logits.shape:
        raise ValueError(f"logits of shape {tuple(p_logits.shape)} and {tuple(q_logits.shape)} differ")
    log_p = torch.log_softmax(p_logits.double(), dim=-1)
    log_q = torch.log_softmax(q_logits.double(), dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(dim=-1).clamp_min(0.0).float()


def top_experts(trace: RouterTrace) -> Tensor:
    """(T,) for each token the expert with the most top-k weight summed over layers."""
    mass = torch.zeros(trace.num_tokens, trace.experts)
    flat_ids = trace.topk_ids.reshape(trace.num_tokens, -1)  # (T, L*k)
    mass.scatter_add_(1, flat_ids, trace.topk_weights.reshape(trace.num_tokens, -1))
    return mass.argmax(dim=-1)


@dataclass
class Divergence:
    kl: Tensor  # (R,) KL(MoE || base) of the distribution each reply token was drawn from
    top_expert: Tensor  # (R,) top expert of the forward that produced that distribution
    tokens: list[str]  # (R,) the reply tokens
    expert_names: list[str]

    def to_dict(self) -> dict[str, Any]:
        return {"kl": _json(self.kl), "top_expert": self.top_expert.tolist(), "tokens": list(self.tokens),
                "expert_names": list(self.expert_names)}


def divergence(trace: RouterTrace, moe_logits: Tensor, base_logits: Tensor) -> Divergence:
    """Base-versus-MoE divergence per reply token, next to the expert that produced it.

    `trace` is the MoE's trace of prompt + reply; the logits are `generate.reply_logits` of
    both models on the same ids. Reply token j was drawn from the forward over token P+j-1
    (P prompt tokens), so that row's top expert is shown next to it.
    """
    prompt = int(trace.is_prefill.sum())
    replies = moe_logits.shape[0]
    if prompt == 0 or trace.num_tokens < prompt + replies:
        raise ValueError(f"trace has {trace.num_tokens} tokens ({prompt} prompt); "
                         f"{replies} reply tokens need at least {prompt + replies}")
    producers = top_experts(trace)[prompt - 1: prompt - 1 + replies]
    return Divergence(kl_divergence(moe_logits, base_logits), producers,
                      trace.tokens[prompt: prompt + replies], list(trace.expert_names))


def expert_weights(trace: RouterTrace) -> Tensor:
    """(T, L, E) the weight each expert got per token and layer (0 where it did not run)."""
    weights = torch.zeros(trace.num_tokens, trace.layers, trace.experts)
    return weights.scatter_add_(2, trace.topk_ids, trace.topk_weights)


@dataclass
class InterventionChanges:
    changed: Tensor  # (T, L) bool: the experts that ran there differ from the saved routers'
    shift: Tensor  # (T, L) largest change of any expert's weight there, in [0, 1]
    saved_ids: Tensor  # (T, L, k) the saved routers' choice, best first

    @property
    def count(self) -> int:
        return int(self.changed.sum())

    @property
    def cells(self) -> int:
        return self.changed.numel()

    def to_dict(self) -> dict[str, Any]:
        return {"changed_cells": self.count, "cells": self.cells, "changed": self.changed.tolist(),
                "max_weight_shift": float(self.shift.max()) if self.cells else 0.0}

    def summary(self) -> str:
        """One line: how many cells changed experts, and how far weights moved."""
        if not self.cells:
            return "nothing routed"
        moved = float(self.shift.max())
        if self.count == 0:
            return (f"no token changed experts at any layer; weights moved by up to {moved:.2f}"
                    if moved > 1e-6 else "routing identical to the saved routers")
        return (f"{self.count} of {self.cells} cells ({self.count / self.cells:.0%}) ran other experts "
                f"than the saved routers chose; weights moved by up to {moved:.2f}")


def intervention_changes(steered: RouterTrace, saved: RouterTrace) -> InterventionChanges:
    """Which cells (token, layer) an intervention changed: `steered` and `saved` are traces of
    the same ids, with and without it (teacher-forced, so each sees the same tokens)."""
    if steered.token_ids != saved.token_ids or steered.probs.shape != saved.probs.shape:
        raise ValueError(f"traces of different texts: {steered.num_tokens} and {saved.num_tokens} tokens, "
                         f"{steered.layers} and {saved.layers} layers")
    a, b = expert_weights(steered), expert_weights(saved)  # (T, L, E)
    changed = ((a > 0) != (b > 0)).any(dim=-1)
    return InterventionChanges(changed, (a - b).abs().amax(dim=-1), saved.topk_ids)


def routing_summary(trace: RouterTrace) -> dict[str, Any]:
    """Load and entropy of one trace, as JSON-ready values (the CLI's `summary` key)."""
    return {"load": expert_load(trace).to_dict(), "entropy": routing_entropy(trace).to_dict()}
