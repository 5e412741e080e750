"""Interventions applied to a loaded MoE: one request's routers, for one forward at a time.

A loaded MoE is shared by every session, so an intervention never changes its weights.
`Steering` prepares one request's intervention for one model (per layer: the router weight
to use, the experts masked out, the temperature, top-k and ablations, on the model's
device), and `Steering.applied()` is a context manager around one forward: inside it, each
router module's `forward` is this request's; on leaving, even on cancel or error, the
router's own forward is back. The engine runs one forward at a time under its compute lock
and enters `applied()` inside that lock, so no other request's forward ever meets it; the
override also checks the thread, so a forward run by another thread without the lock
routes as saved.

The override replaces the router's forward rather than adding a forward hook: a hook would
let the router compute its choice and then compute it again, and with 30 routers per token
that was a few percent of the demo MoE's decode time; the override costs about what the
router itself does. Trace hooks (`router_hooks`) still see what the override returned.

Legend: T tokens, L layers, E experts, k experts per token, H hidden.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from workbench.routing.steer import Intervention
from workbench.routing.trace import TraceError, find_routers

_STEERED = "_workbench_steered"  # set on a router while an override is installed


@dataclass
class _LayerPlan:
    weight: Tensor | None  # (E, H) swapped-in router weight on the router's device and dtype; None: saved
    mask: Tensor | None  # (E,) float32: 0 where allowed, -inf where banned or not forced here; None: all
    ablated: Tensor | None  # (E,) bool: experts whose share is dropped; None: none


class Steering:
    """One request's intervention, made ready for `model` (a loaded MoE); checked here."""

    def __init__(self, model: nn.Module, intervention: Intervention) -> None:
        routers = find_routers(model)
        if not routers:
            raise TraceError("this model has no MoE routers to steer; interventions need a built MoE")
        first = routers[0][1]
        experts, model_k = int(first.num_experts), int(first.top_k)
        intervention.check(len(routers), experts)
        self.intervention = intervention
        self.k = intervention.k_for(model_k, experts)
        self.scale = None if intervention.temperature == 1.0 else 1.0 / intervention.temperature
        device = first.weight.device
        banned = torch.zeros(experts, dtype=torch.bool)
        banned[list(intervention.ban)] = True
        ablated = None
        if intervention.ablate:
            ablated = torch.zeros(experts, dtype=torch.bool)
            ablated[list(intervention.ablate)] = True
            ablated = ablated.to(device)
        self._routers = [module for _, module in routers]
        self._plans = []
        for layer, module in enumerate(self._routers):
            weight = None
            if intervention.routers is not None:
                weight = intervention.routers[layer].to(module.weight.device, module.weight.dtype)
            forced = next((f.expert for f in intervention.force if f.covers(layer)), None)
            out = ~torch.nn.functional.one_hot(torch.tensor(forced), experts).bool() if forced is not None \
                else banned
            mask = None
            if bool(out.any()):
                mask = torch.zeros(experts).masked_fill(out, float("-inf")).to(module.weight.device)
            self._plans.append(_LayerPlan(weight, mask, ablated))

    def route(self, module: nn.Module, plan: _LayerPlan,
              hidden_states: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The router's forward (Mixtral's or Qwen2-MoE's) under the intervention -> (scores (T, E)
        float32, top-k weights (T, k), top-k ids (T, k)). The same ops as the router's own, in its
        order, so swapped-in weights route exactly as a build that wrote them."""
        flat = hidden_states.reshape(-1, module.hidden_dim)  # (T, H)
        logits = nn.functional.linear(flat, plan.weight if plan.weight is not None else module.weight)
        scores = logits.float()  # (T, E); what the trace's probabilities are computed from
        if self.scale is not None:
            scores = scores * self.scale
        if plan.mask is not None:
            scores = scores + plan.mask
        probs = torch.softmax(scores, dim=-1)
        top, ids = torch.topk(probs, self.k, dim=-1)  # (T, k), best first
        qwen = hasattr(module, "norm_topk_prob")  # Qwen2-MoE's router (Mixtral's has no such flag)
        if not qwen or module.norm_topk_prob:  # Mixtral renormalises always, Qwen2-MoE when told to
            top = top / top.sum(dim=-1, keepdim=True)
        if qwen:  # and hands its weights on in the logits' dtype
            top = top.to(logits.dtype)
        if plan.ablated is not None:
            top = top.masked_fill(plan.ablated[ids], 0.0)  # dropped, not renormalised
        return scores, top, ids

    @contextmanager
    def applied(self) -> Iterator[Steering]:
        """Inside the block, this thread's forwards of the model route under the intervention;
        the routers' own forwards are back when it ends, however it ends."""
        owner = threading.get_ident()
        installed: list[nn.Module] = []

        def override(module: nn.Module, plan: _LayerPlan):
            own = type(module).forward

            def forward(hidden_states: Tensor) -> tuple[Tensor, Tensor, Tensor]:
                if threading.get_ident() != owner:  # not this request's forward: route as saved
                    return own(module, hidden_states)
                return self.route(module, plan, hidden_states)
            return forward

        try:
            for module, plan in zip(self._routers, self._plans, strict=True):
                if getattr(module, _STEERED, False) or "forward" in module.__dict__:
                    raise TraceError("a router of this model is already overridden; interventions do not "
                                     "nest (one request's forward at a time)")
                module.forward = override(module, plan)
                object.__setattr__(module, _STEERED, True)
                installed.append(module)
            yield self
        finally:
            for module in installed:
                del module.forward
                object.__delattr__(module, _STEERED)


def steering_for(model: nn.Module, intervention: Intervention | None) -> Steering | None:
    """A Steering for `model`, or None for no intervention (or one that changes nothing)."""
    return Steering(model, intervention) if intervention is not None and intervention.active else None


@contextmanager
def steered(model: nn.Module, intervention: Intervention | None) -> Iterator[Steering | None]:
    """`Steering(model, intervention).applied()`, or nothing at all for no (or an inactive) intervention."""
    steering = steering_for(model, intervention)
    if steering is None:
        yield None
        return
    with steering.applied():
        yield steering


def is_steered(model: nn.Module) -> bool:
    """Whether any router of `model` has an override installed right now (tests, checks)."""
    return any(getattr(m, _STEERED, False) or "forward" in m.__dict__ for _, m in find_routers(model))


__all__ = ["Steering", "is_steered", "steered", "steering_for"]
