"""What the gates stage hands on: gate tensors, their bytes for a build, and diagnostics.

`Gates` is the tensor form (computed with torch, used by the preview and by routers
swapped in place); `RouterGates` is the form a build writes and that crosses from a gates
child process (bytes, already cast); `GateDiagnostics` is plain numbers for cards, plots
and the CLI. Nothing here imports torch, so a plain build can hold these types.

Dimensions: L layers, E experts, H hidden.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import Tensor

CONDITION_WARN = 5.0  # mergekit's threshold for "experts may not be distinguishable"


@dataclass
class GateDiagnostics:
    condition_numbers: list[float]  # per layer, smax / smin of the (E, H) matrix; inf when singular
    cosine: list[list[list[float]]]  # (L, E, E) expert-expert cosine similarity per layer
    mean_cosine: list[list[float]]  # (E, E) averaged over layers
    warnings: list[str]

    def to_dict(self) -> dict[str, Any]:
        """Plain lists for JSON; an infinite condition number becomes None (JSON has no inf)."""
        return {
            "condition_numbers": [c if math.isfinite(c) else None for c in self.condition_numbers],
            "cosine": self.cosine,
            "mean_cosine": self.mean_cosine,
            "warnings": list(self.warnings),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GateDiagnostics:
        """The inverse of to_dict: None becomes an infinite condition number again."""
        conditions = [math.inf if c is None else float(c) for c in data["condition_numbers"]]
        return cls(conditions, data["cosine"], data["mean_cosine"], list(data["warnings"]))

    def off_diagonal_cosine(self, layer: int) -> float:
        """Mean cosine between distinct experts at `layer` (0 with a single expert)."""
        rows = self.cosine[layer]
        experts = len(rows)
        total = sum(v for i, row in enumerate(rows) for j, v in enumerate(row) if i != j)
        return total / max(experts * (experts - 1), 1)


@dataclass
class HeldOutScore:
    """How often the router picks each expert for its own theme's held-out tokens
    (`workbench.gates.score`): top-1 and top-k hit rates next to chance (1/E, k/E) and
    perfect (1). None where there was nothing to score."""

    mode: str
    center: bool
    experts: int
    k: int
    top1: float | None  # mean over scored experts and layers
    topk: float | None
    top1_per_layer: list[float]  # (L,) mean over scored experts; empty when nothing was scored
    topk_per_layer: list[float]
    per_expert_top1: list[float | None]  # (E,) mean over layers; None: nothing of it was held out
    per_expert_topk: list[float | None]
    matrix: list[list[float]]  # (E, E) row i: where expert i's held-out tokens went first, mean over layers
    tokens: list[int]  # (E,) held-out tokens scored per expert (x layers)
    held_out: str  # what was held out, in words

    @property
    def chance_top1(self) -> float:
        return 1.0 / self.experts

    @property
    def chance_topk(self) -> float:
        return min(self.k, self.experts) / self.experts

    def rates(self, digits: int = 3) -> str:
        """'top-1 0.822 (chance 0.250), top-2 0.925 (chance 0.500)'; top-1 alone for a top-1 MoE."""
        top1 = f"top-1 {self.top1:.{digits}f} (chance {self.chance_top1:.{digits}f})"
        if self.k == 1:
            return top1
        return f"{top1}, top-{self.k} {self.topk:.{digits}f} (chance {self.chance_topk:.{digits}f})"

    def to_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "center_gates": self.center, "experts": self.experts, "k": self.k,
                "top1": self.top1, "topk": self.topk, "chance_top1": self.chance_top1,
                "chance_topk": self.chance_topk, "perfect": 1.0,
                "top1_per_layer": self.top1_per_layer, "topk_per_layer": self.topk_per_layer,
                "per_expert_top1": self.per_expert_top1, "per_expert_topk": self.per_expert_topk,
                "matrix": self.matrix, "tokens": self.tokens, "held_out": self.held_out}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> HeldOutScore:
        lists = ("top1_per_layer", "topk_per_layer", "per_expert_top1", "per_expert_topk", "matrix", "tokens")
        return cls(data["mode"], bool(data["center_gates"]), int(data["experts"]), int(data["k"]),
                   data["top1"], data["topk"], *(data[key] for key in lists), data["held_out"])


@dataclass(frozen=True)
class RouterGates:
    """What a build needs of its gates: the routers' bytes, in order, and what to report."""

    mode: str
    shape: tuple[int, int, int]  # (L, E, H)
    dtype: str  # safetensors code of `rows`: "BF16", "F16", "F32" or "F64"
    rows: list[bytes]  # rows[l]: layer l's (E, H) router weight, little-endian, row-major
    diagnostics: GateDiagnostics
    gates: Gates | None = None  # the tensors, where this process computed or was given them
    score: HeldOutScore | None = None  # the held-out routing score, where it was computed
    # shared_rows[l]: layer l's (1, H) Qwen2-MoE shared_expert_gate, as `rows`; None without one
    shared_rows: list[bytes] | None = None


@dataclass
class Gates:
    vectors: Tensor  # (L, E, H) float32 on CPU; vectors[l] is layer l's router weight
    mode: str
    diagnostics: GateDiagnostics
    score: HeldOutScore | None = None  # set by workbench.gates.score.scored_gates
    # (L, H) float32: the shared expert's gate row per layer (Recipe.shared_gate_recipe), or None
    shared: Tensor | None = None
