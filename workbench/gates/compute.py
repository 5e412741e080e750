"""Router gates: one (E, H) router matrix per layer, derived from each expert's prompts.

Legend: L layers, E experts, B prompts in a set, T tokens, H hidden size, V vocabulary.

The math follows mergekit-moe (docs/recipe.md, "Gate math"): each prompt set is tokenised as
one left-padded batch, a state per layer is averaged over the prompts, and an expert's
gate row is normalise(m(positives) - m(negatives)). The forwards are ours to arrange: for
the last-position modes every set shares as few forwards as fit (left padding keeps each
prompt's last state independent of its batch), and every forward stops once the states
are captured (`workbench.gates.forward`).
Modes:

- `hidden`: the residual stream entering layer l, at each prompt's last token.
- `hidden_avg`: the same stream averaged over all positions, pad included (as mergekit
  does; pad positions attend to nothing real, so their values depend on the attention
  implementation; the model loads with transformers' default, as mergekit's does).
- `cheap_embed`: the sum of the set's token embeddings; the same row on every layer.
- `random` / `uniform_random`: seeded noise; prompts are ignored.
- `fitted` (workbench extension): per layer, a linear router fitted on the router input of
  every token of every prompt (`workbench.gates.fit`, states from `workbench.gates.bank`).
- `center_gates` (workbench extension, prompt-mean modes): the mean raw row over experts is
  subtracted before normalising, which removes the direction common to all text.
- `router_input` (workbench extension): the state the router of layer l really sees.
  A Mixtral router scores the output of layer l's post_attention_layernorm (after
  attention, RMS-normed and scaled by the norm's weight), whereas `hidden` gates come
  from the residual stream before the layer; the two differ in direction, so `hidden`
  gates are matched against a vector the router never sees. This mode captures the real
  router input with forward hooks, at the last position. It is a separate mode so that
  `hidden` keeps mergekit's meaning and the two can be compared.

States are reduced in float32 whatever the model's dtype (mergekit stays in bf16), and the
result is float32 on the CPU. This module reads the base model and never writes a file.
"""

from __future__ import annotations

import gc
import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from workbench.errors import GateError
from workbench.gates.forward import (
    LAST_POSITION_MODES,
    last_states_by_set,
    layer_inputs,
    load_base,
    load_tokenizer,
    read_embedding,
)
from workbench.gates.prompts import expert_batches
from workbench.gates.rows import diagnose as diagnose_array
from workbench.gates.rows import noise
from workbench.gates.types import GateDiagnostics, Gates
from workbench.progress import CancelToken, Progress, ProgressFn, ignore_progress
from workbench.recipe import PROMPTLESS_MODES, Recipe

log = logging.getLogger(__name__)

# ---- pure math -------------------------------------------------------------------------


def normalise(v: Tensor) -> Tensor:
    """v / max(||v||_2, 1e-8) along the last dimension."""
    return v / v.norm(p=2, dim=-1, keepdim=True).clamp(min=1e-8)


def combine_rows(pos: Sequence[Tensor], neg: Sequence[Tensor | None], *, center: bool) -> Tensor:
    """Each expert's mean positive and negative state (..., H) -> gate rows (..., E, H):
    normalise(m(P) - m(N)), the negative term only where there are negatives (mergekit).

    Centred, an expert without negatives is measured from the mean positive state over all
    experts instead of from zero: its row then loses the direction common to all text,
    as the rows of experts with negatives already do. With no negatives anywhere this is
    subtracting the mean row over experts before normalising.
    """
    mean = torch.stack(list(pos)).mean(dim=0) if center else None
    raw = [p - n if n is not None else p - mean if mean is not None else p
           for p, n in zip(pos, neg, strict=True)]
    return normalise(torch.stack(raw, dim=-2))


def reduce_states(states: Tensor, attention_mask: Tensor, *, average: bool) -> Tensor:
    """(L, B, T, H) states of one left-padded batch -> (L, H): last position or all positions,
    then the mean over prompts."""
    if not bool(attention_mask[:, -1].all()):
        raise ValueError("prompt batch is not left-padded: the last position of some prompt is padding")
    if average:
        # Every row has T positions, so the mean of per-prompt means is the mean over (B, T).
        return states.mean(dim=(1, 2), dtype=torch.float32)
    return states[:, :, -1, :].mean(dim=1, dtype=torch.float32)


def prompt_states(hidden_states: Sequence[Tensor], attention_mask: Tensor, *, average: bool) -> Tensor:
    """transformers' hidden_states (L + 1 tensors of (B, T, H)) -> (L, H).

    Entry l is the residual stream entering decoder layer l; the last entry is the final
    norm's output, which feeds no router, so it is dropped.
    """
    return reduce_states(torch.stack(tuple(hidden_states[:-1])), attention_mask, average=average)


def cheap_embedding(embed: Tensor, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """Unit-length sum of the embeddings (V, H) of every non-pad token in (B, T) -> (H,)."""
    rows = embed[input_ids].to(torch.float32)  # (B, T, H)
    return normalise((rows * attention_mask.unsqueeze(-1)).sum(dim=(0, 1)))


def diagnose(vectors: Tensor, *, shift_invariant: bool = False) -> GateDiagnostics:
    """Condition number and expert-expert cosine per layer of (L, E, H) gates
    (`workbench.gates.rows.diagnose`)."""
    return diagnose_array(vectors.detach().to("cpu", torch.float64).numpy(), shift_invariant=shift_invariant)


def _dimensions(model: torch.nn.Module | None, base_path: Path) -> tuple[int, int]:
    """(L, H) of the base model, from the loaded model or config.json."""
    try:
        if model is not None:
            config = model.config.to_dict()
        else:
            config = json.loads((base_path / "config.json").read_text())
        return int(config["num_hidden_layers"]), int(config["hidden_size"])
    except (OSError, ValueError, KeyError) as exc:
        raise GateError(f"cannot read layers and hidden size from {base_path}/config.json: {exc!r}") from exc


def _expert_states(
    batches: list[tuple[dict, dict | None]],
    state: Callable[[dict[str, Tensor]], Tensor],
    on_progress: ProgressFn,
    cancel: CancelToken,
) -> tuple[list[Tensor], list[Tensor | None]]:
    """Each expert's positive and negative set state, (L, H) or (H,); a progress event per
    set, a cancel check before each."""
    pos, neg = [], []
    total, done = sum(1 + (neg is not None) for _, neg in batches), 0
    for e, pair in enumerate(batches):
        states = []
        for label, batch in zip(("positive", "negative"), pair, strict=True):
            if batch is None:
                continue
            cancel.check()
            states.append(state(batch))
            done += 1
            on_progress(Progress("gates", done / total, f"expert {e + 1}/{len(batches)}: {label} prompts"))
        pos.append(states[0])
        neg.append(states[1] if len(states) > 1 else None)
    return pos, neg


def compute_gates(
    recipe: Recipe,
    base_path: Path,
    *,
    device: str = "auto",
    seed: int = 0,
    on_progress: ProgressFn = ignore_progress,
    cancel: CancelToken | None = None,
    model: torch.nn.Module | None = None,
    tokenizer: Any = None,
    memo: dict | None = None,
    bank: Any = None,
) -> Gates:
    """Router gates (L, E, H) for `recipe` from the base model at `base_path`.

    A passed-in model/tokenizer is used where it is (its device and dtype) and left
    loaded; otherwise the base loads on pick_device(device) and is freed afterwards.
    One progress event per prompt set; `cancel` is checked before each set. `bank`, for
    `fitted`, is the recipe's prompt bank when the caller has it. `memo` keeps
    `hidden_avg` set states by their prompts between calls on the same model (a set's
    state depends on nothing else), for held-out folds that share most sets.
    """
    cancel = cancel or CancelToken()
    mode = recipe.gate_mode
    if mode in PROMPTLESS_MODES:
        layers, hidden = _dimensions(model, base_path)
        # numpy's noise, the same that a build without torch writes (workbench.gates.rows)
        vectors = torch.from_numpy(noise(mode, (layers, len(recipe.experts), hidden), seed))
        on_progress(Progress("gates", 1.0, f"{mode} gates, seed {seed}"))
        return Gates(vectors, mode, diagnose(vectors))

    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(base_path, chat=recipe.chats)
    if mode == "fitted":
        return _fitted(recipe, base_path, device, model, tokenizer, on_progress, cancel, bank)
    batches = expert_batches(recipe, tokenizer)
    cancel.check()
    owned = model is None and mode != "cheap_embed"
    if mode == "cheap_embed":
        layers, _ = _dimensions(model, base_path)
        weight = model.get_input_embeddings().weight if model is not None else None
        # A streamed base keeps its weights on the meta device between forwards: read the file.
        embed = weight.detach().cpu() if weight is not None and weight.device.type != "meta" \
            else read_embedding(base_path)

        def state(batch: dict[str, Tensor]) -> Tensor:
            return cheap_embedding(embed, batch["input_ids"], batch["attention_mask"])
    else:
        if model is None:
            on_progress(Progress("gates", 0.0, "loading the base model"))
            model = load_base(base_path, device)
        sets = sum(1 + (neg is not None) for _, neg in batches)
        on_progress(Progress("gates", 0.0, f"running {sets} prompt sets through the base model"))
        if mode in LAST_POSITION_MODES:
            rows_of = last_states_by_set(model, mode, batches, cancel)  # id -> (L, B, H)

            def state(batch: dict[str, Tensor]) -> Tensor:
                return rows_of[id(batch)].mean(dim=1)
        else:  # hidden_avg: every position, pad included, as mergekit averages
            known = memo if memo is not None else {}

            def state(batch: dict[str, Tensor]) -> Tensor:
                key = tuple(map(tuple, batch["input_ids"].tolist()))
                if key not in known:
                    mask = batch["attention_mask"]
                    # Reduced layer by layer as the forward goes: (B, T, H) -> (H,), never (L, B, T, H).
                    known[key] = layer_inputs(model, batch,
                                              lambda h: reduce_states(h[None], mask, average=True)[0])
                return known[key]
    try:
        pos, neg = _expert_states(batches, state, on_progress, cancel)
    finally:
        if owned:
            del model  # the closure's reference goes with it
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    vectors = combine_rows(pos, neg, center=bool(recipe.center_gates)).to(torch.float32)
    if mode == "cheap_embed":  # (E, H) -> (L, E, H)
        vectors = vectors.unsqueeze(0).repeat(layers, 1, 1)
    return _done(vectors, mode, shift_invariant=bool(recipe.center_gates))


def shared_gate(recipe: Recipe, base_path: Path, *, device: str = "auto", seed: int = 0,
                model: torch.nn.Module | None = None, tokenizer: Any = None,
                cancel: CancelToken | None = None) -> Tensor | None:
    """(L, H) rows of Qwen2-MoE's shared_expert_gate, or None where the recipe has none: the
    gate row of a recipe holding only the shared expert (`Recipe.shared_gate_recipe`), as
    mergekit computes it beside the routed rows; noise from its own stream in prompt-free modes."""
    alone = recipe.shared_gate_recipe()
    if alone is None:
        return None
    if alone.gate_mode in PROMPTLESS_MODES:
        layers, hidden = _dimensions(model, base_path)
        return torch.from_numpy(noise(alone.gate_mode, (layers, 1, hidden), seed, stream=1))[:, 0]
    return compute_gates(alone, base_path, device=device, seed=seed, model=model, tokenizer=tokenizer,
                         cancel=cancel).vectors[:, 0].contiguous()


def _done(vectors: Tensor, mode: str, *, shift_invariant: bool) -> Gates:
    """Gates with their diagnostics; rows that sum to zero (fitted, centred) are judged as a
    softmax sees them."""
    gates = Gates(vectors.contiguous(), mode, diagnose(vectors, shift_invariant=shift_invariant))
    log.info("gates %s: %s, %d warning(s)", mode, tuple(vectors.shape), len(gates.diagnostics.warnings))
    return gates


def _fitted(recipe: Recipe, base_path: Path, device: str, model: torch.nn.Module | None, tokenizer: Any,
            on_progress: ProgressFn, cancel: CancelToken, bank: Any = None) -> Gates:
    """`fitted` gates: every prompt's router inputs (probes left out), then the fitted router.
    A prompt bank already collected with `model` (its probes are never fitted on) is used as it is."""
    from workbench.gates.bank import collect
    from workbench.gates.fit import fit_bank
    from workbench.gates.forward import NoRouterInput, input_device

    owned = model is None
    if owned:
        on_progress(Progress("gates", 0.0, "loading the base model"))
        model = load_base(base_path, device)
    try:
        if bank is None:
            bank = collect(model, tokenizer, recipe, probes=False, cancel=cancel,
                           on_progress=lambda e: on_progress(Progress("gates", 0.8 * e.fraction, e.message)))
        where = input_device(model)  # the fit runs where the base does
    except NoRouterInput as exc:
        raise GateError(f"gate_mode fitted: {exc}; use gate_mode hidden") from exc
    finally:
        if owned:
            del model
            gc.collect()
    on_progress(Progress("gates", 0.8, f"fitting a router on {sum(p.tokens.shape[1] for p in bank.prompts)} "
                                       f"prompt tokens per layer"))
    cancel.check()
    return _done(fit_bank(bank, device=where), "fitted", shift_invariant=True)
