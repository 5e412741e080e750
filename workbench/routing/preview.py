"""Routing preview without a build: a recipe's gates applied to the base model's own states.

A Mixtral router of layer l scores the output of that layer's post_attention_layernorm
(the post-attention residual stream, RMS-normed and scaled), so the preview runs the BASE
model once over the text, captures that output at every layer, and routes it exactly as
the built MoE's router would: softmax(h @ G_l^T) in float32, top-k, renormalised.

- For a MoE whose experts are all copies of the base, every layer's input equals the base's,
  so the preview IS the built model's routing (tests check the top-k ids match everywhere).
- With real experts, layer 0 is exact and later layers are an estimate: from layer 1 on,
  the MoE's residual stream carries the experts' MLP outputs instead of the base's.

Legend: T tokens, L layers, E experts, k experts per token, H hidden.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from workbench.gates import router_inputs
from workbench.models import TemplateFailure, user_turn
from workbench.routing.trace import RouterTrace, TraceError, encode_text, route, token_strings


def route_states(states: list[Tensor], vectors: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """L states (1, T, H) and gates (L, E, H) -> probs (T, L, E), top-k weights and ids (T, L, k).

    The gate rows are cast to the states' dtype and device first, as loading the built MoE
    does, and the logits come from the same F.linear call the router makes.
    """
    probs, weights, ids = [], [], []
    for layer, h in enumerate(states):
        flat = h.reshape(-1, h.shape[-1])  # (T, H)
        logits = nn.functional.linear(flat, vectors[layer].to(flat.device, flat.dtype))  # (T, E)
        p = torch.softmax(logits.float(), dim=-1)
        w, i = route(p, k)
        probs.append(p.cpu())
        weights.append(w.cpu())
        ids.append(i.cpu())
    return torch.stack(probs, 1), torch.stack(weights, 1), torch.stack(ids, 1)


def preview_routing(gates: Any, entry: Any, text: str, k: int, *, expert_names: list[str] | None = None,
                    add_special_tokens: bool = True, chat: bool = False) -> RouterTrace:
    """Route `text` with `gates` (a `Gates`, vectors (L, E, H)) over the base model `entry`
    (a `LoadedModel`), without building; the trace's source is "preview". With `chat` the text
    is a user's message, routed as the chat template renders it (a recipe's `prompt_template:
    chat`: the routers were made from such renderings)."""
    vectors = gates.vectors
    layers, experts, hidden = vectors.shape
    if not 1 <= k <= experts:
        raise TraceError(f"experts_per_token is {k} but the gates have {experts} experts; use 1 to {experts}")
    config = entry.model.config
    if (layers, hidden) != (config.num_hidden_layers, config.hidden_size):
        raise TraceError(f"the gates are for {layers} layers x hidden {hidden} but the base model has "
                         f"{config.num_hidden_layers} x {config.hidden_size}: recompute the gates from "
                         "this base")
    names = expert_names or [f"expert {e}" for e in range(experts)]
    if chat and text.strip():
        try:
            text, add_special_tokens = user_turn(entry.tokenizer, text), False
        except TemplateFailure as exc:
            raise TraceError(str(exc)) from exc
    ids = encode_text(entry.tokenizer, text, add_special_tokens=add_special_tokens,
                      limit=entry.context_length)
    input_ids = torch.tensor([ids], device=entry.device)
    with entry.lock, router_inputs(entry.model) as states, torch.inference_mode():
        entry.model(input_ids=input_ids, use_cache=False, logits_to_keep=1)
        probs, weights, top = route_states(states, vectors, k)
    prefill = torch.ones(len(ids), dtype=torch.bool)
    return RouterTrace(token_strings(entry.tokenizer, ids), ids, probs, top, weights, prefill, names,
                       "preview", entry.ref)
