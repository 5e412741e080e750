"""Tracing a text, or a prompt and its reply, through a built MoE in one forward.

The trace records what the routers decided; under an `Intervention` it records what they
decided under it (the override runs first, the trace hooks read its outputs), and the
trace says which intervention that was.

Legend: T tokens.
"""

from __future__ import annotations

from contextlib import ExitStack
from typing import Any

import torch

from workbench.routing.intervene import steering_for
from workbench.routing.steer import Intervention
from workbench.routing.trace import (
    MAX_TRACE_TOKENS,
    RouterRecorder,
    RouterTrace,
    TraceError,
    encode_text,
    find_routers,
    router_hooks,
)


def trace_text(entry: Any, text: str, *, add_special_tokens: bool = True,
               intervention: Intervention | None = None) -> RouterTrace:
    """Route `text` through a built MoE (a `LoadedModel`) in one forward and record every layer."""
    ids = encode_text(entry.tokenizer, text, add_special_tokens=add_special_tokens,
                      limit=entry.context_length)
    return trace_ids(entry, ids, intervention=intervention)


def trace_ids(entry: Any, ids: list[int], *, intervention: Intervention | None = None) -> RouterTrace:
    """Route (T,) token ids through a built MoE in one forward (a reply teacher-forced after its
    prompt), under `intervention` when it is given and active."""
    cap = min(entry.context_length, MAX_TRACE_TOKENS)
    if not 1 <= len(ids) <= cap:
        raise TraceError(f"{len(ids)} tokens to route; routing takes 1 to {cap} tokens")
    steering = steering_for(entry.model, intervention)
    recorder = RouterRecorder(len(find_routers(entry.model)) or entry.layers)
    input_ids = torch.tensor([list(ids)], device=entry.device)
    with entry.lock, ExitStack() as stack:
        if steering is not None:
            stack.enter_context(steering.applied())
        stack.enter_context(router_hooks(entry.model, recorder))
        stack.enter_context(torch.inference_mode())
        recorder.begin_step(len(ids), prefill=True)
        entry.model(input_ids=input_ids, use_cache=False, logits_to_keep=1)
    described = steering.intervention.to_dict() if steering is not None else None
    return recorder.finish(list(ids), entry.tokenizer, entry.expert_names, model=entry.ref,
                           intervention=described)
