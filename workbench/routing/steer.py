"""Router interventions as values: what to force, ban or ablate, top-k, temperature, routers swapped in.

An `Intervention` says how one request's routers should decide, layer by layer; it holds
no model and changes none. `workbench.routing.intervene` applies it to a loaded MoE for the
length of one forward (one request's step), so the saved routers are what every other
request sees. Nothing here imports torch: the UI and the CLI build, check and describe
interventions before any model is loaded.

- force e (on layers A-B, or every layer): the router's choice there is expert e alone,
  weight 1; the other top-k slots keep their places with weight 0.
- ban e: the router picks among the other experts (their weights renormalised as usual).
- ablate e ("reply without e"): routing is unchanged, but e's share of each token is
  dropped, not given to the others (a zero-ablation of that expert's output).
- top-k: how many experts each token goes to; the model's own k when unset.
- temperature: router logits divided by T before the softmax (above 1 spreads the weights,
  below 1 sharpens them; top-k choices stay the same unless a ban or force applies).
- routers: (L, E, H) router weights used instead of the saved ones (a recipe's gates,
  computed without a build); `routers_from` says where they came from, in words.

Legend: L layers, E experts, H hidden, k experts per token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

from workbench.errors import WorkbenchError

MIN_TEMPERATURE, MAX_TEMPERATURE = 0.01, 100.0


class InterventionError(WorkbenchError):
    """An intervention that cannot apply to this model as given."""


@dataclass(frozen=True)
class Force:
    expert: int
    first: int | None = None  # first layer forced; None: layer 0
    last: int | None = None  # last layer forced (included); None: the last layer

    def covers(self, layer: int) -> bool:
        return (self.first is None or layer >= self.first) and (self.last is None or layer <= self.last)

    def layers_text(self) -> str:
        if self.first is None and self.last is None:
            return "every layer"
        first, last = self.first or 0, self.last
        if last is None:
            return f"layers {first}-end"
        return f"layer {first}" if first == last else f"layers {first}-{last}"

    def to_dict(self) -> dict[str, Any]:
        whole = self.first is None and self.last is None
        return {"expert": self.expert, "layers": None if whole else [self.first or 0, self.last]}


def parse_layers(text: str) -> tuple[int | None, int | None]:
    """"" or "all" -> every layer; "A-B" -> (A, B); "A" -> (A, A); "A-" -> (A, None)."""
    text = (text or "").strip().lower()
    if text in ("", "all", "every", "*"):
        return None, None
    first, dash, last = text.partition("-")
    try:
        a = int(first)
        b = int(last) if last.strip() else (None if dash else a)
    except ValueError:
        raise InterventionError(f"{text!r} is not a layer range; write e.g. 10-20, 5, or all") from None
    if a < 0 or (b is not None and b < a):
        raise InterventionError(f"layers {text!r}: the first layer must be 0 or more, and not after the last")
    return a, b


def parse_force(text: str) -> Force:
    """"E" (every layer) or "E@A-B" (layers A to B, both included) -> Force."""
    expert, _, layers = str(text).strip().partition("@")
    try:
        e = int(expert)
    except ValueError:
        raise InterventionError(f"{text!r}: write the expert as a number, e.g. 2 or 2@10-20") from None
    if e < 0:
        raise InterventionError(f"{text!r}: experts are numbered from 0")
    first, last = parse_layers(layers) if layers.strip() else (None, None)
    return Force(e, first, last)


def _name(e: int, names: list[str] | None) -> str:
    return f"e{e} ({names[e]})" if names and 0 <= e < len(names) and names[e] else f"e{e}"


@dataclass(frozen=True)
class Intervention:
    force: tuple[Force, ...] = ()
    ban: tuple[int, ...] = ()
    ablate: tuple[int, ...] = ()
    top_k: int | None = None  # None: the model's own
    temperature: float = 1.0
    routers: Any = field(default=None, compare=False, repr=False)  # (L, E, H) Tensor, or None: saved
    routers_from: str = ""  # where `routers` came from, in words ("the unsaved recipe (revision 2)")

    def __post_init__(self) -> None:
        # Lists from JSON or a form become tuples; duplicates mean nothing more.
        object.__setattr__(self, "force", tuple(self.force))
        object.__setattr__(self, "ban", tuple(sorted(set(int(e) for e in self.ban))))
        object.__setattr__(self, "ablate", tuple(sorted(set(int(e) for e in self.ablate))))

    @property
    def active(self) -> bool:
        """Whether it changes anything at all (an inactive one installs nothing)."""
        return bool(self.force or self.ban or self.ablate or self.top_k is not None
                    or self.temperature != 1.0 or self.routers is not None)

    def k_for(self, model_k: int, experts: int) -> int:
        """Experts per token under this intervention: its top-k (or the model's), at most the
        experts a ban leaves."""
        return min(self.top_k or model_k, experts - len(self.ban))

    def with_routers(self, routers: Any, source: str, k: int | None = None) -> Intervention:
        """The same intervention on swapped-in routers; `k` (the recipe's top-k) unless top-k was set."""
        return replace(self, routers=routers, routers_from=source,
                       top_k=self.top_k if self.top_k is not None else k)

    def problems(self, layers: int, experts: int) -> list[str]:
        """Everything that keeps it from applying to a MoE of `layers` x `experts`."""
        found = []
        for group, ids in (("forced", [f.expert for f in self.force]), ("banned", self.ban),
                           ("ablated", self.ablate)):
            bad = sorted({e for e in ids if not 0 <= e < experts})
            if bad:
                found.append(f"{group} expert {', '.join(map(str, bad))} does not exist; this MoE has "
                             f"experts 0 to {experts - 1}")
        for f in self.force:
            if (f.first or 0) >= layers or (f.last is not None and f.last >= layers):
                found.append(f"expert {f.expert} is forced on {f.layers_text()} but this MoE has layers 0 "
                             f"to {layers - 1}")
        for i, a in enumerate(self.force):
            for b in self.force[i + 1:]:
                if any(a.covers(layer) and b.covers(layer) for layer in range(layers)):
                    found.append(f"two experts are forced on the same layer (e{a.expert} on "
                                 f"{a.layers_text()}, e{b.expert} on {b.layers_text()}): give them "
                                 "separate layer ranges")
        forced = {f.expert for f in self.force}
        for group, ids in (("banned", self.ban), ("ablated", self.ablate)):
            both = sorted(forced & set(ids))
            if both:
                found.append(f"expert {', '.join(map(str, both))} is both forced and {group}: choose one")
        if len(set(self.ban)) >= experts:
            found.append(f"every expert is banned; leave at least one of the {experts}")
        elif len(set(self.ban) | set(self.ablate)) >= experts:  # every MLP's output would be zero: noise
            found.append("every expert is ablated or banned, so no MLP adds anything and the reply is "
                         f"noise; leave at least one of the {experts} working")
        if self.top_k is not None and not 1 <= self.top_k <= experts:
            found.append(f"top-k {self.top_k} is out of range; use 1 to {experts}")
        if not (math.isfinite(self.temperature) and MIN_TEMPERATURE <= self.temperature <= MAX_TEMPERATURE):
            found.append(f"router temperature {self.temperature!r} is out of range; use "
                         f"{MIN_TEMPERATURE} to {MAX_TEMPERATURE:g} (1 leaves the router as it is)")
        if self.routers is not None:
            shape = tuple(self.routers.shape)
            if len(shape) != 3 or shape[:2] != (layers, experts):
                found.append(f"the swapped-in routers have shape {shape}, this MoE needs ({layers}, "
                             f"{experts}, hidden): compute them from a recipe with {experts} experts on "
                             "the same base")
        return found

    def check(self, layers: int, experts: int) -> None:
        """Raise InterventionError listing every problem (see `problems`)."""
        found = self.problems(layers, experts)
        if found:
            raise InterventionError("; ".join(found))

    def describe(self, names: list[str] | None = None) -> str:
        """In words, for labels: "e2 (story) forced on layers 10-20 · e3 banned · top-1"."""
        parts = [f"{_name(f.expert, names)} forced on {f.layers_text()}" for f in self.force]
        parts += [f"{_name(e, names)} banned" for e in self.ban]
        parts += [f"{_name(e, names)} ablated" for e in self.ablate]
        if self.top_k is not None:
            parts.append(f"top-{self.top_k}")
        if self.temperature != 1.0:
            parts.append(f"router temperature {self.temperature:g}")
        if self.routers is not None or self.routers_from:
            parts.append(f"routers from {self.routers_from or 'elsewhere'}")
        return " · ".join(parts) if parts else "no intervention"

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON values (the CLI's `intervention` object); the routers by their source only."""
        return {"force": [f.to_dict() for f in self.force], "ban": list(self.ban),
                "ablate": list(self.ablate), "top_k": self.top_k, "temperature": self.temperature,
                "routers": self.routers_from or ("swapped" if self.routers is not None else "saved")}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Intervention:
        """The inverse of to_dict, routers left out (a description cannot carry their weights)."""
        force = []
        for item in data.get("force") or []:
            layers = item.get("layers")
            force.append(Force(int(item["expert"]), *(layers if layers else (None, None))))
        top_k = data.get("top_k")
        return cls(tuple(force), tuple(data.get("ban") or ()), tuple(data.get("ablate") or ()),
                   None if top_k is None else int(top_k), float(data.get("temperature", 1.0)))


NO_INTERVENTION = Intervention()
