"""How well a recipe's gates route its themes, scored on prompts they were not made from.

Held out by default: each expert's positive prompts are split into folds (leave-one-out up
to `FOLDS` prompts); the gates of fold f are made without fold f's prompts, then route them.
Each expert's `probe_prompts` are routed by the gates of the whole recipe (they are never
fitted on). An expert with a single positive prompt and no probes has nothing to score.

A token scores a top-1 hit at a layer when its expert is the router's first choice there, a
top-k hit when it is among the k chosen. Hit rates are per expert (so a long prompt does not
outweigh the others), then averaged over the scored experts and over the layers. A router
that ignores its input scores 1/E (top-1) and k/E (top-k); identical prompt sets score
exactly that. Tokens are routed on the base's own router inputs, so the score is exact for
experts that copy the base and an estimate past layer 0 otherwise (as the preview is).

`compare_modes` scores every applicable mode side by side, with the time each mode's gates
take for the whole recipe, and `advice` says in words what a score's numbers mean.

Legend: L layers, E experts, k experts per token, T tokens, H hidden size.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from workbench.gates.bank import PromptBank, PromptStates, collect
from workbench.gates.compute import combine_rows, compute_gates, normalise, shared_gate
from workbench.gates.fit import fit_bank
from workbench.gates.forward import load_base, load_tokenizer
from workbench.gates.rows import noise
from workbench.gates.types import Gates, HeldOutScore
from workbench.progress import CancelToken, Progress, ProgressFn, ignore_progress
from workbench.recipe import PROMPT_MEAN_MODES, PROMPTLESS_MODES, Recipe

FOLDS = 5  # folds over each expert's positive prompts; fewer prompts: leave-one-out
# The modes a comparison scores: mergekit's and router_input, each as it is and centred,
# fitted, and random as the floor a router that ignores its input reaches.
COMPARED = (("hidden", False), ("hidden", True), ("hidden_avg", False), ("hidden_avg", True),
            ("cheap_embed", False), ("cheap_embed", True), ("router_input", False), ("router_input", True),
            ("fitted", False), ("random", False))


def mode_label(mode: str, center: bool) -> str:
    return f"{mode} centred" if center else mode


def folds(bank: PromptBank) -> list[list[tuple[int, int]]]:
    """[fold] -> the (expert, positive prompt index) pairs it holds out; an expert with one
    positive prompt is in none (its gate would have nothing to come from)."""
    counts = [len(bank.of(e, "positive")) for e in range(bank.experts)]
    k = min(FOLDS, max([n for n in counts if n > 1], default=0))
    return [[(e, j) for e, n in enumerate(counts) if n > 1 for j in range(n) if j % k == f] for f in range(k)]


def bank_gates(mode: str, center: bool, bank: PromptBank, *, held: set[tuple[int, int]] = frozenset(),
               seed: int = 0) -> Tensor:
    """(L, E, H) gates of `mode` from the bank's states, leaving out the `held` (expert,
    positive index) prompts. The same math as `compute_gates` (combine_rows, fit_bank)."""
    shape = (bank.layers, bank.experts, bank.hidden)
    if mode in PROMPTLESS_MODES:
        return torch.from_numpy(noise(mode, shape, seed))
    if mode == "fitted":
        return fit_bank(bank, held=held)
    pos = [[p for p in bank.of(e, "positive") if (e, p.index) not in held] for e in range(bank.experts)]
    neg = [bank.of(e, "negative") for e in range(bank.experts)]
    state: Callable[[list[PromptStates]], Tensor] = {
        "hidden": lambda ps: torch.stack([p.last for p in ps]).mean(0),
        "router_input": lambda ps: torch.stack([p.router_last for p in ps]).mean(0),
        "cheap_embed": lambda ps: normalise(torch.stack([p.embed_sum for p in ps]).sum(0)),
    }[mode]
    rows = combine_rows([state(p) for p in pos], [state(n) if n else None for n in neg], center=center)
    if mode == "cheap_embed":  # (E, H): the same rows on every layer
        rows = rows.unsqueeze(0).expand(bank.layers, -1, -1)
    return rows.contiguous()


@dataclass
class _Tally:
    experts: int
    layers: int
    k: int
    top1: Tensor = field(init=False)  # (E, L) hits
    topk: Tensor = field(init=False)
    confusion: Tensor = field(init=False)  # (E, L, E) where each expert's tokens went first
    tokens: Tensor = field(init=False)  # (E,)

    def __post_init__(self) -> None:
        e, layers = self.experts, self.layers
        self.top1, self.topk = torch.zeros(e, layers), torch.zeros(e, layers)
        self.confusion, self.tokens = torch.zeros(e, layers, e), torch.zeros(e)

    def add(self, expert: int, tokens: Tensor, gates: Tensor) -> None:
        """Route (L, T, H) states of one of `expert`'s prompts with (L, E, H) gates."""
        logits = torch.bmm(tokens, gates.transpose(1, 2).to(tokens.dtype))  # (L, T, E)
        chosen = logits.topk(self.k, dim=-1).indices  # (L, T, k), best first
        self.top1[expert] += (chosen[..., 0] == expert).sum(-1)
        self.topk[expert] += (chosen == expert).any(-1).sum(-1)
        self.confusion[expert].scatter_add_(1, chosen[..., 0], torch.ones(chosen.shape[:2]))
        self.tokens[expert] += tokens.shape[1]

    def score(self, mode: str, center: bool, how: str) -> HeldOutScore:
        scored = [e for e in range(self.experts) if self.tokens[e] > 0]
        n = self.tokens.clamp(min=1)[:, None]
        top1, topk = self.top1 / n, self.topk / n  # (E, L) hit rates
        matrix = (self.confusion / n[:, :, None]).mean(1)  # (E, E), each scored row sums to 1

        def mean(rates: Tensor) -> list[float] | None:
            return rates[scored].mean(0).tolist() if scored else None
        per_layer1, per_layerk = mean(top1), mean(topk)
        return HeldOutScore(
            mode=mode, center=center, experts=self.experts, k=self.k,
            top1=sum(per_layer1) / self.layers if per_layer1 else None,
            topk=sum(per_layerk) / self.layers if per_layerk else None,
            top1_per_layer=per_layer1 or [], topk_per_layer=per_layerk or [],
            per_expert_top1=[float(top1[e].mean()) if e in scored else None for e in range(self.experts)],
            per_expert_topk=[float(topk[e].mean()) if e in scored else None for e in range(self.experts)],
            matrix=matrix.tolist(), tokens=[int(t) for t in self.tokens], held_out=how)


def heldout_score(recipe: Recipe, bank: PromptBank, *, mode: str | None = None, center: bool | None = None,
                  full: Tensor | None = None, seed: int = 0, fold_gates: Callable | None = None,
                  cancel: CancelToken | None = None) -> HeldOutScore:
    """The held-out score of `mode` (default: the recipe's) on the bank's prompts. `full` is
    the whole recipe's gates (for the probes; computed from the bank when not given);
    `fold_gates(held)` makes a fold's gates where the bank cannot (hidden_avg)."""
    cancel = cancel or CancelToken()
    mode = mode or recipe.gate_mode
    center = bool(recipe.center_gates) if center is None else center
    center = center and mode in PROMPT_MEAN_MODES

    def gates_without(held: set[tuple[int, int]]) -> Tensor:
        if fold_gates is not None:
            return fold_gates(held)
        return bank_gates(mode, center, bank, held=held, seed=seed)

    tally = _Tally(bank.experts, bank.layers, recipe.experts_per_token)
    split = folds(bank)
    for held in split:
        cancel.check()
        gates = gates_without(set(held))
        seen = _texts(bank, set(held))
        for e, j in held:
            prompt = bank.of(e, "positive")[j]
            if prompt.text not in seen:  # the same text in the fold's own prompts is not held out
                tally.add(e, prompt.own_tokens, gates)
    seen = _texts(bank, set())
    probes = [p for p in bank.prompts if p.kind == "probe" and p.text not in seen]
    if probes:
        full = full if full is not None else gates_without(set())
        for p in probes:
            tally.add(p.expert, p.own_tokens, full)
    how = " and ".join(filter(None, [
        f"{len(split)}-fold over each expert's positive prompts" if split else "",
        f"{len(probes)} probe prompts" if probes else ""])) or "nothing held out"
    return tally.score(mode, center, how)


def _texts(bank: PromptBank, held: set[tuple[int, int]]) -> set[str]:
    """The texts gates made without the `held` positive prompts come from."""
    return {p.text for p in bank.prompts if p.kind == "negative"
            or (p.kind == "positive" and (p.expert, p.index) not in held)}


def fold_recipe(recipe: Recipe, held: set[tuple[int, int]], mode: str, center: bool) -> Recipe:
    """The recipe without the held-out positive prompts, in `mode`: what a fold's gates come from."""
    experts = [e.model_copy(update={"positive_prompts": [p for j, p in enumerate(e.positive_prompts or [])
                                                         if (i, j) not in held]})
               for i, e in enumerate(recipe.experts)]
    return recipe.model_copy(update={"experts": experts, "gate_mode": mode, "center_gates": center or None})


def _forward_folds(recipe: Recipe, mode: str, center: bool, model: Any, tokenizer: Any, base_path: Path,
                   seed: int, memo: dict | None = None) -> Callable[[set[tuple[int, int]]], Tensor]:
    """Fold gates by the real forwards, for a mode whose rows the bank cannot rebuild; a set
    that several folds share (every negative set) runs once per `memo`."""
    memo = {} if memo is None else memo

    def make(held: set[tuple[int, int]]) -> Tensor:
        return compute_gates(fold_recipe(recipe, held, mode, center), base_path, seed=seed, model=model,
                             tokenizer=tokenizer, memo=memo).vectors
    return make


def score_recipe(recipe: Recipe, base_path: Path, gates: Gates, *, model: Any, tokenizer: Any,
                 bank: PromptBank | None = None, seed: int = 0, cancel: CancelToken | None = None,
                 on_progress: ProgressFn = ignore_progress) -> HeldOutScore:
    """The held-out score of a recipe's own gates (`gates`, already computed for the whole recipe)."""
    bank = bank or collect(model, tokenizer, recipe, cancel=cancel, on_progress=on_progress)
    mode, center = recipe.gate_mode, bool(recipe.center_gates)
    on_progress(Progress("gates", 1.0, "scoring the gates on held-out prompts"))
    make = _forward_folds(recipe, mode, center, model, tokenizer, base_path, seed) \
        if mode == "hidden_avg" else None
    return heldout_score(recipe, bank, full=gates.vectors, seed=seed, fold_gates=make, cancel=cancel)


def scored_gates(recipe: Recipe, base_path: Path, *, device: str = "auto", seed: int = 0,
                 on_progress: ProgressFn = ignore_progress, cancel: CancelToken | None = None) -> Gates:
    """compute_gates with the base loaded once for the gates and their held-out score
    (`Gates.score`). Prompt-free modes are noise, not scored (a build writes them without
    loading the base; `compare_modes` scores random as the floor)."""
    cancel = cancel or CancelToken()
    if recipe.gate_mode in PROMPTLESS_MODES:
        gates = compute_gates(recipe, base_path, device=device, seed=seed, on_progress=on_progress,
                              cancel=cancel)
        gates.shared = shared_gate(recipe, base_path, seed=seed)
        return gates
    on_progress(Progress("gates", 0.0, "loading the base model"))
    model, tokenizer = load_base(base_path, device), load_tokenizer(base_path, chat=recipe.chats)
    try:
        # Fitted gates and the score read the same prompt bank: its forwards run once.
        bank = collect(model, tokenizer, recipe, cancel=cancel, on_progress=on_progress) \
            if recipe.gate_mode == "fitted" else None
        gates = compute_gates(recipe, base_path, seed=seed, on_progress=on_progress, cancel=cancel,
                              model=model, tokenizer=tokenizer, bank=bank)
        gates.score = score_recipe(recipe, base_path, gates, model=model, tokenizer=tokenizer, bank=bank,
                                   seed=seed, cancel=cancel)
        gates.shared = shared_gate(recipe, base_path, seed=seed, model=model, tokenizer=tokenizer,
                                   cancel=cancel)
        return gates
    finally:
        del model
        gc.collect()


@dataclass
class ModeResult:
    mode: str
    center: bool
    score: HeldOutScore
    seconds: float  # this mode's gates for the whole recipe, forwards included, base loaded
    gates: Gates

    @property
    def label(self) -> str:
        return mode_label(self.mode, self.center)

    def to_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "center_gates": self.center, "label": self.label, "seconds": self.seconds,
                "score": self.score.to_dict(), "gates": self.gates.diagnostics.to_dict()}


def compare_modes(recipe: Recipe, base_path: Path, *, model: Any = None, tokenizer: Any = None,
                  device: str = "auto", seed: int = 0, cancel: CancelToken | None = None,
                  on_progress: ProgressFn = ignore_progress) -> list[ModeResult]:
    """Every mode of `COMPARED`, scored held out on the recipe's prompts, best first (top-1,
    then top-k; random, the floor, always last). Without `model`, the base loads on `device`
    for the comparison and is freed after it."""
    if model is None:
        on_progress(Progress("compare", 0.0, "loading the base model"))
        model, tokenizer = load_base(base_path, device), load_tokenizer(base_path, chat=recipe.chats)
        try:
            return compare_modes(recipe, base_path, model=model, tokenizer=tokenizer, seed=seed,
                                 cancel=cancel, on_progress=on_progress)
        finally:
            del model
            gc.collect()
    cancel = cancel or CancelToken()
    on_progress(Progress("compare", 0.0, "running every prompt through the base model"))
    bank = collect(model, tokenizer, recipe, cancel=cancel)
    results, memo = [], {}  # hidden_avg's fold sets, shared by its plain and centred variants
    for i, (mode, center) in enumerate(COMPARED):
        cancel.check()
        on_progress(Progress("compare", i / len(COMPARED), f"scoring {mode_label(mode, center)}"))
        variant = recipe.model_copy(update={"gate_mode": mode, "center_gates": center or None})
        started = time.perf_counter()
        gates = compute_gates(variant, base_path, seed=seed, model=model, tokenizer=tokenizer, cancel=cancel)
        seconds = time.perf_counter() - started
        make = _forward_folds(recipe, mode, center, model, tokenizer, base_path, seed, memo) \
            if mode == "hidden_avg" else None
        score = heldout_score(variant, bank, full=gates.vectors, seed=seed, fold_gates=make, cancel=cancel)
        results.append(ModeResult(mode, center, score, seconds, gates))
    on_progress(Progress("compare", 1.0, "done"))
    return sorted(results, key=lambda r: (r.mode == "random", -(r.score.top1 or 0), -(r.score.topk or 0)))
