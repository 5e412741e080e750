"""Every router prompt's states, from one pass of base forwards: what fitted gates are fitted
on and what held-out scores route.

Per prompt (positive, negative or probe, of each expert) the bank keeps, at every layer:

- `last`: the residual stream entering the layer at the prompt's last token (`hidden` gates);
- `router_last`: the router's real input (the post_attention_layernorm output) there;
- `tokens`: the router input at the prompt's tokens but its first (the BOS, or the chat
  template's first token, the same in every prompt), at most a budget of them;
- `opening`: how many of `tokens` come first in every prompt (with `prompt_template: chat`,
  the template's system prompt and user header). Causal attention gives them the same states
  in every prompt. The fit keeps them, labelled with every expert at once: they teach the
  router to prefer no expert on the template's own text, and without them the tokens where a
  reply starts (the template's `<|im_start|>assistant`) went to the hero or the villain after
  plain questions of the alignment demo (BENCHMARKS.md). The held-out score leaves them out:
  no router can send them to every expert;
- `embed_sum`: the sum of its token embeddings, BOS included (`cheap_embed`, as mergekit sums).

Prompts share forwards as the gates' own do (left padding keeps each prompt's states
independent of its batch; `workbench.gates.forward`), so a streamed base reads its weights once.

Memory: the token states are the bank's bulk, L x H floats per token. Above `TOKEN_BYTES` in
all, each prompt keeps an evenly spread share of its tokens (always its last), so a bank of a
70B base costs what one of a 7B does.

Legend: L layers, H hidden size, T tokens of one prompt, B prompts of a forward.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from workbench.gates.forward import (
    StopForward,
    decoder_layers,
    merged_forwards,
    router_inputs,
    run_forward,
)
from workbench.gates.prompts import tokenize_prompts
from workbench.progress import CancelToken, Progress, ProgressFn, ignore_progress

TOKEN_BYTES = 512 * 2**20  # float32 router-input states kept over all prompts at most
KINDS = ("positive", "negative", "probe")


@dataclass
class PromptStates:
    expert: int
    kind: str  # "positive" | "negative" | "probe"
    index: int  # the prompt's place in its list
    text: str
    last: Tensor  # (L, H) residual stream entering each layer, last token
    router_last: Tensor  # (L, H) router input of each layer, last token
    tokens: Tensor  # (L, T', H) router inputs at the kept tokens (the first left out)
    embed_sum: Tensor  # (H,) sum of the prompt's token embeddings, BOS included
    opening: int = 0  # how many of `tokens` every prompt begins with (same states everywhere)

    @property
    def own_tokens(self) -> Tensor:
        """(L, T'', H) `tokens` without the shared opening: what a held-out score routes."""
        return self.tokens[:, min(self.opening, self.tokens.shape[1] - 1):]


@dataclass
class PromptBank:
    experts: int
    layers: int
    hidden: int
    prompts: list[PromptStates] = field(default_factory=list)

    def of(self, expert: int, kind: str) -> list[PromptStates]:
        return [p for p in self.prompts if p.expert == expert and p.kind == kind]


def prompt_sets(recipe: Any, *, probes: bool = True) -> list[tuple[int, str, list[str]]]:
    """(expert, kind, prompts) for every non-empty prompt list of the recipe, in order."""
    out = []
    for e, expert in enumerate(recipe.experts):
        lists = {"positive": expert.positive_prompts, "negative": expert.negative_prompts,
                 "probe": expert.probe_prompts if probes else None}
        out += [(e, kind, list(lists[kind])) for kind in KINDS if lists[kind]]
    return out


def collect(model: nn.Module, tokenizer: Any, recipe: Any, *, probes: bool = True,
            cancel: CancelToken | None = None, on_progress: ProgressFn = ignore_progress,
            token_bytes: int = TOKEN_BYTES) -> PromptBank:
    """The bank of every prompt of `recipe` (probe prompts too, unless `probes` is False)."""
    cancel = cancel or CancelToken()
    layers, hidden = int(model.config.num_hidden_layers), int(model.config.hidden_size)
    labels, sets = [], []
    for e, kind, prompts in prompt_sets(recipe, probes=probes):
        sets.append(tokenize_prompts(tokenizer, prompts, where=f"experts[{e}].{kind}_prompts",
                                     chat=recipe.chats))
        labels += [(e, kind, j, text) for j, text in enumerate(prompts)]
    shared = shared_opening(sets)
    skip = min(shared, 1)  # the first token attends to nothing: the same state in every prompt
    keep = kept_positions(sets, skip, token_bytes // (4 * layers * hidden))
    bank = PromptBank(len(recipe.experts), layers, hidden)
    for rows, merged in merged_forwards(model, sets, cancel):
        width = merged["input_ids"].shape[1]
        real = merged["attention_mask"].sum(dim=1).tolist()  # tokens of each row, pads excluded
        at = [[width - n + i for i in keep[k][r]] for (k, r), n in zip(rows, real, strict=True)]
        for (k, r), states in zip(rows, _forward(model, merged, at, real), strict=True):
            opening = sum(1 for i in keep[k][r] if skip <= i < shared)
            bank.prompts.append(PromptStates(*labels[len(bank.prompts)], *states, opening=opening))
        on_progress(Progress("gates", len(bank.prompts) / len(labels),
                             f"{len(bank.prompts)}/{len(labels)} prompts through the base model"))
    return bank


def shared_opening(sets: Sequence[dict[str, Tensor]]) -> int:
    """How many first tokens every prompt of every set has in common (pads excluded)."""
    rows = [row[mask.bool()].tolist() for batch in sets
            for row, mask in zip(batch["input_ids"], batch["attention_mask"], strict=True)]
    if not rows:
        return 0
    first, shared = rows[0], min(len(row) for row in rows)
    for row in rows[1:]:
        shared = next((i for i in range(shared) if row[i] != first[i]), shared)
    return shared


def kept_positions(sets: Sequence[dict[str, Tensor]], skip: int, budget: int) -> list[list[list[int]]]:
    """[set][row] -> the token positions (from the prompt's first token) whose router input is
    kept: all but the first `skip` of a prompt longer than that, thinned evenly (last token
    always kept) when all prompts together have more than `budget` tokens."""
    lengths = [[int(n) for n in batch["attention_mask"].sum(dim=1)] for batch in sets]
    spans = [[range(skip if n > skip else 0, n) for n in row] for row in lengths]
    total = sum(len(span) for row in spans for span in row)
    share = min(1.0, max(budget, 1) / max(total, 1))
    return [[_spread(span, share) for span in row] for row in spans]


def _spread(span: range, share: float) -> list[int]:
    """About share x len(span) positions of `span`, evenly spaced, its last always among them."""
    count = max(1, math.floor(len(span) * share))
    if count >= len(span):
        return list(span)
    step = len(span) / count
    return sorted({span[len(span) - 1 - math.floor(i * step)] for i in range(count)})


def _forward(model: nn.Module, batch: dict[str, Tensor], at: Sequence[Sequence[int]],
             real: Sequence[int]) -> Iterable[tuple[Tensor, Tensor, Tensor, Tensor]]:
    """One forward over `batch`, stopped after the last layer's router input: per row b,
    ((L, H) residual stream at the last token, (L, H) router input there, (L, len(at[b]), H)
    router inputs at positions at[b], (H,) sum of the embeddings of its real[b] tokens),
    float32 on the CPU. The embeddings come from the forward (a streamed base keeps none)."""
    layers = decoder_layers(model)
    streams: list[Tensor] = []
    sums: list[Tensor] = []

    def embedded(module: nn.Module, args: Any, output: Tensor) -> None:
        width = output.shape[1]
        sums.extend(output[b, width - n:].float().sum(dim=0).cpu() for b, n in enumerate(real))

    def stream(module: nn.Module, args: tuple, kwargs: dict) -> None:
        streams.append((args[0] if args else kwargs["hidden_states"])[:, -1, :].float().cpu())

    def select(output: Tensor) -> tuple[Tensor, list[Tensor]]:
        return output[:, -1, :].float().cpu(), [output[b, list(p)].float().cpu() for b, p in enumerate(at)]

    def stop(module: nn.Module, args: Any, output: Tensor) -> None:
        raise StopForward

    handles = [layer.register_forward_pre_hook(stream, with_kwargs=True) for layer in layers]
    handles.append(model.get_input_embeddings().register_forward_hook(embedded))
    try:
        with router_inputs(model, select=select) as captured:
            # Registered after router_inputs' own hook: hooks run in order, so the capture comes first.
            handles.append(layers[-1].post_attention_layernorm.register_forward_hook(stop))
            run_forward(model, batch)
    finally:
        for handle in handles:
            handle.remove()
    last = torch.stack(streams, dim=1)  # (B, L, H)
    router_last = torch.stack([c[0] for c in captured], dim=1)  # (B, L, H)
    for b in range(len(at)):
        yield last[b], router_last[b], torch.stack([c[1][b] for c in captured]), sums[b]
