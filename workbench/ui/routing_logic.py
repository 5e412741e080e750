"""The Routing tab's work as plain functions: a trace (the last chat reply, or any text) to figures.

A reply of the steered pane (or a text routed under the Chat tab's interventions) comes with
the cells its intervention changed: the same tokens are routed again with and without it,
each in one forward, and compared by which experts ran."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from workbench.errors import WorkbenchError

log = logging.getLogger(__name__)


@dataclass
class RoutingView:
    trace: Any  # RouterTrace
    divergence: Any = None  # routing.Divergence against the base, for a chat reply
    note: str = ""
    changes: Any = None  # routing.InterventionChanges, when routed under an intervention
    under: str = ""  # that intervention, in words

    def summary(self) -> str:
        t = self.trace
        prompt = int(t.is_prefill.sum())
        what = "the preview" if t.source == "preview" else f"`{Path(t.model).name or t.model}`"
        parts = [f"{t.num_tokens} tokens ({prompt} prompt, {t.num_tokens - prompt} generated) · {t.layers} "
                 f"layers · {t.experts} experts, top-{t.k} · routed by {what}"]
        if self.under:
            parts.append(f"**under: {self.under}**")
        if self.changes is not None:
            parts.append(self.changes.summary() + (" (marked ×)" if self.changes.count else ""))
        if self.divergence is not None and len(self.divergence.kl):
            from workbench.routing import IDENTICAL_NATS

            kl = self.divergence.kl
            if float(kl.max()) < IDENTICAL_NATS:
                parts.append("replies identical to the base model's (KL below 1e-6 nats at every token)")
            else:
                parts.append(f"mean KL(MoE ‖ base) {float(kl.mean()):.4f} nats, "
                             f"largest {float(kl.max()):.4f}")
        if self.note:
            parts.append(self.note)
        return " · ".join(parts)

    def figures(self, layer: int) -> dict[str, Any]:
        from workbench import routing

        t = self.trace
        return {
            "heatmap": routing.routing_heatmap(t, changes=self.changes),
            "layer": self.layer_figure(layer),
            "load": routing.expert_load_figure(routing.expert_load(t), t.expert_names),
            "entropy": routing.entropy_figure(routing.routing_entropy(t)),
            "divergence": routing.divergence_figure(self.divergence) if self.divergence is not None else None,
        }


    def layer_figure(self, layer: float) -> Any:
        from workbench import routing

        return routing.layer_probs_heatmap(self.trace, max(0, min(int(layer or 0), self.trace.layers - 1)))


def nothing_to_route(source: str, last: dict[str, Any] | None, moe: str | None) -> str:
    """What to do first, when the tab has nothing to show yet ('' when it has); `source` is
    "reply", "steered" or "text"."""
    if source == "reply" and (not last or last.get("trace") is None):
        return ("**No chat reply yet.** Send a message on the Chat tab with a MoE chosen (build one on "
                "the Build tab first), then come back; or pick *This text* and type any text.")
    if source == "steered" and (not last or last.get("trace") is None):
        return ("**No steered reply yet.** On the Chat tab, open *Interventions*, set one (ban an expert, "
                "force one, or use the Design tab's routers) and send a message: the third pane answers "
                "under it.")
    if source == "text" and not moe:
        return ("**No MoE chosen.** Build one on the Build tab and choose it on the Chat tab, then route "
                "any text here. To see routing before building, use the Preview tab.")
    return ""


def _steering(steer: dict[str, Any] | None, entry: Any, *, token: str | None, device: str) -> tuple[Any, str]:
    """(the Intervention a steer spec means for `entry`, its words); (None, "") for none."""
    from workbench.ui import steer_logic

    if not steer or not steer_logic.active(steer.get("spec")):
        return None, ""
    intervention, _, _ = steer_logic.resolve(steer["spec"], steer.get("yaml", ""), entry, token=token,
                                             device=device)
    return intervention, intervention.describe(entry.expert_names)


def changes_of(entry: Any, ids: list[int], intervention: Any) -> Any:
    """Which cells `intervention` changes on these tokens: each routed with and without it."""
    from workbench.routing import intervention_changes, trace_ids

    return intervention_changes(trace_ids(entry, ids, intervention=intervention), trace_ids(entry, ids))


def from_reply(last: dict[str, Any] | None, *, token: str | None = None, device: str = "auto") -> RoutingView:
    """The last MoE (or steered) chat reply's trace, with its divergence from the base model when
    both load, and for a steered reply the cells its intervention changed."""
    if not last or last.get("trace") is None:
        raise WorkbenchError("no chat reply yet: send a message on the Chat tab first")
    trace = last["trace"]
    intervention, under, changes = None, "", None
    if last.get("steer"):
        from workbench.chat import registry

        entry = registry().get(last["moe"], device=device, token=token)
        intervention, under = _steering(last["steer"], entry, token=token, device=device)
        if intervention is not None:
            changes = changes_of(entry, list(last["prompt_ids"]) + list(last["reply_ids"]), intervention)
    if not last.get("reply_ids"):
        return RoutingView(trace, note="the reply is empty, so there is nothing to compare", changes=changes,
                           under=under)
    try:
        divergence = divergence_of(last, token=token, device=device, intervention=intervention)
        return RoutingView(trace, divergence, changes=changes, under=under)
    except (WorkbenchError, ValueError) as exc:
        log.info("no divergence for this reply: %s", exc)
        return RoutingView(trace, note=f"no base comparison: {exc}", changes=changes, under=under)


def divergence_of(last: dict[str, Any], *, token: str | None, device: str, intervention: Any = None) -> Any:
    """Teacher-forced next-token distributions of both models on the same prompt and reply (the
    MoE's under the reply's intervention)."""
    from workbench.chat import registry, reply_logits
    from workbench.routing import divergence

    models = registry()
    moe = models.get(last["moe"], device=device, token=token)
    base = models.get(last["base"], device=device, token=token)
    moe_logits = reply_logits(moe, last["prompt_ids"], last["reply_ids"], intervention=intervention)
    base_logits = reply_logits(base, last["prompt_ids"], last["reply_ids"])
    return divergence(last["trace"], moe_logits, base_logits)


def from_text(moe: str, text: str, *, token: str | None = None, device: str = "auto",
              steer: dict[str, Any] | None = None) -> RoutingView:
    """Route any text through a built MoE in one forward; with `steer` (the Chat tab's
    interventions), under them, with the cells they changed."""
    from workbench.chat import registry
    from workbench.routing import intervention_changes, trace_text

    if not moe:
        raise WorkbenchError("choose a built MoE on the Chat tab first (or build one)")
    entry = registry().get(moe, device=device, token=token)
    intervention, under = _steering(steer, entry, token=token, device=device)
    if intervention is None:
        note = "the Chat tab sets no intervention: the saved routers" if steer else ""
        return RoutingView(trace_text(entry, text), note=note)
    routed = trace_text(entry, text, intervention=intervention)
    return RoutingView(routed, changes=intervention_changes(routed, trace_text(entry, text)), under=under)
