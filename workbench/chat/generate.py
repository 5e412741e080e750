"""Streaming generation: prefill, one decode step, sampling, and the loop that ties them.

The engine speaks token ids; `ReplyStream` turns them into text deltas for a consumer (the
CLI prints them, a Gradio handler yields them). Each forward runs under the model's compute
lock, one token at a time, so sessions interleave and a stop request lands between tokens;
during a long prefill a pre-hook on every decoder layer checks the cancel token too, so a
stop takes effect within one layer's time, not one prompt's. Sampling uses its own
`torch.Generator` seeded per reply: the same seed and settings give the same reply.

Legend: T tokens, V vocabulary.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn

from workbench.chat.request import ChatError, ChatPrompt, SamplingSettings, prepare
from workbench.errors import Cancelled
from workbench.progress import CancelToken
from workbench.routing import (
    Intervention,
    RouterRecorder,
    RouterTrace,
    Steering,
    find_routers,
    router_hooks,
    steering_for,
)

log = logging.getLogger(__name__)


@dataclass
class ReplyStats:
    prompt_tokens: int
    new_tokens: int  # tokens sampled, a final end-of-turn token included
    time_to_first_token_s: float  # from the start of the prefill to the first sampled token
    tokens_per_s: float  # decode speed: tokens after the first / time after the first
    total_s: float
    finish_reason: str  # "stop" (end-of-turn token), "length" (max_new_tokens) or "cancelled"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Reply:
    model: str
    text: str
    token_ids: list[int]  # generated ids, the end-of-turn token left out
    stats: ReplyStats
    trace: RouterTrace | None = None  # prompt + reply routing, when traced on a MoE
    intervention: Intervention | None = None  # what its routers ran under; None: the saved routers


def stop_ids(entry: Any) -> set[int]:
    """End-of-turn ids: the tokenizer's EOS and those the generation config lists."""
    ids: set[int] = set()
    config = getattr(entry.model, "generation_config", None)
    for value in (getattr(entry.tokenizer, "eos_token_id", None), getattr(config, "eos_token_id", None)):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return ids


@contextmanager
def cancel_hooks(model: nn.Module, cancel: CancelToken) -> Iterator[None]:
    """Check `cancel` before every decoder layer inside the block (raises Cancelled mid-forward)."""
    layers = getattr(getattr(model, "model", None), "layers", None) or []
    handles = [layer.register_forward_pre_hook(lambda module, args: cancel.check()) for layer in layers]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def forward_step(entry: Any, ids: Tensor, cache: Any, *, prefill: bool, cancel: CancelToken,
                 recorder: RouterRecorder | None = None, steering: Steering | None = None) -> Tensor:
    """One forward of (1, T) new ids over the KV cache -> next-token logits (V,) float32.

    `steering` (this request's intervention) applies inside the compute lock, to this forward
    only: the forwards of other requests, interleaved token by token, route as saved."""
    with entry.lock, ExitStack() as stack:
        cancel.check()
        if steering is not None:
            stack.enter_context(steering.applied())
        if prefill:
            stack.enter_context(cancel_hooks(entry.model, cancel))
        if recorder is not None:
            stack.enter_context(router_hooks(entry.model, recorder))
            recorder.begin_step(ids.shape[1], prefill=prefill)
        stack.enter_context(torch.inference_mode())
        out = entry.model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        return out.logits[0, -1].float()


def penalise(logits: Tensor, seen: Tensor, penalty: float) -> Tensor:
    """transformers' repetition penalty: divide positive, multiply negative logits of seen ids."""
    if penalty == 1.0 or seen.numel() == 0:
        return logits
    picked = logits[seen]
    logits = logits.clone()
    logits[seen] = torch.where(picked > 0, picked / penalty, picked * penalty)
    return logits


def sample(logits: Tensor, settings: SamplingSettings, generator: torch.Generator) -> int:
    """Next token id from (V,) logits: greedy at temperature 0, else temperature, top-k, top-p."""
    if settings.temperature == 0:
        return int(torch.argmax(logits))
    logits = logits / settings.temperature
    if 0 < settings.top_k < logits.shape[0]:
        kth = torch.topk(logits, settings.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if settings.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        # Drop a token once the mass before it already reaches top_p; the best token always stays.
        drop = (cumulative - torch.softmax(sorted_logits, dim=-1)) >= settings.top_p
        logits = logits.masked_fill(drop.scatter(0, order, drop), float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def text_delta(tokenizer: Any, ids: list[int], shown: str, *, final: bool = False) -> tuple[str, str]:
    """(new text since `shown`, text shown after it) for the reply ids so far.

    Half a multi-byte character (decoded as U+FFFD at the end) is held back until complete,
    or until `final`. A decoder that rewrites earlier text (rare) is not replayed: the
    Reply's text is always the full, final one.
    """
    text = tokenizer.decode(ids, skip_special_tokens=True)
    if (final or not text.endswith("\ufffd")) and text.startswith(shown):
        return text[len(shown):], text
    return "", shown


class ReplyStream:
    """Iterate for text deltas of one reply; `result` holds the Reply once iteration ends.

    Raises Cancelled (after setting `result`, finish_reason "cancelled") when `cancel` is set.
    With `intervention`, every forward of this reply routes under it (checked here, before any
    token); the model stays as it is for every other request.
    """

    def __init__(self, entry: Any, prompt: ChatPrompt, settings: SamplingSettings, *,
                 cancel: CancelToken | None = None, trace: bool = False,
                 intervention: Intervention | None = None) -> None:
        settings.check()
        if trace and not find_routers(entry.model):
            raise ChatError(f"{entry.ref} is not a MoE: there are no routers to trace")
        active = intervention is not None and intervention.active
        if active and not find_routers(entry.model):
            raise ChatError(f"{entry.ref} is not a MoE: there are no routers to steer")
        self.steering = steering_for(entry.model, intervention)
        self.intervention = intervention if active else None
        self.entry, self.prompt, self.settings = entry, prompt, settings
        self.cancel = cancel or CancelToken()
        self.recorder = RouterRecorder(len(find_routers(entry.model))) if trace else None
        self.result: Reply | None = None
        self._stops = stop_ids(entry)

    def _tokens(self, cache: Any) -> Iterator[int]:
        """Sampled ids, one forward each: the prompt's prefill, then one decode step per token;
        ends after max_new_tokens or after yielding an end-of-turn id."""
        entry, settings = self.entry, self.settings
        generator = torch.Generator(device=entry.device).manual_seed(settings.seed)
        seen = torch.tensor(self.prompt.token_ids, device=entry.device)  # (T,) for the penalty
        step_ids = seen.unsqueeze(0)  # (1, T) the prompt, then (1, 1) the last token
        for step in range(self.prompt.max_new_tokens):
            logits = forward_step(entry, step_ids, cache, prefill=step == 0, cancel=self.cancel,
                                  recorder=self.recorder, steering=self.steering)
            token = sample(penalise(logits, seen, settings.repetition_penalty), settings, generator)
            yield token
            if token in self._stops:
                return
            seen = torch.cat([seen, seen.new_tensor([token])])
            step_ids = seen[-1:].unsqueeze(0)

    def __iter__(self) -> Iterator[str]:
        from transformers import DynamicCache  # lazy: importing this module stays cheap

        cache = DynamicCache(config=self.entry.model.config)
        tokenizer = self.entry.tokenizer
        new: list[int] = []
        shown, reason, first_at = "", "error", None
        started = time.perf_counter()
        try:
            for token in self._tokens(cache):
                first_at = first_at or time.perf_counter()
                new.append(token)
                if token not in self._stops:
                    delta, shown = text_delta(tokenizer, new, shown)
                    if delta:
                        yield delta
            reason = "stop" if new and new[-1] in self._stops else "length"
            delta, shown = text_delta(tokenizer, new[:-1] if reason == "stop" else new, shown, final=True)
            if delta:
                yield delta
        except (Cancelled, GeneratorExit):  # a stop request, or the consumer stopped reading
            reason = "cancelled"
            raise
        except torch.OutOfMemoryError as exc:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            raise ChatError(f"out of memory while generating with {self.entry.ref}: shorten the "
                            "conversation or max_new_tokens, or unload other models") from exc
        finally:
            self._finish(new, reason, started, first_at, cache)

    def _finish(self, new: list[int], reason: str, started: float, first_at: float | None,
                cache: Any) -> None:
        ended = time.perf_counter()
        first = first_at or ended
        rate = (len(new) - 1) / (ended - first) if len(new) > 1 and ended > first else 0.0
        stats = ReplyStats(len(self.prompt.token_ids), len(new), first - started, rate, ended - started,
                           reason)
        kept = new[:-1] if reason == "stop" else new
        text = self.entry.tokenizer.decode(kept, skip_special_tokens=True)
        self.result = Reply(self.entry.ref, text, kept, stats, self._trace(kept, reason, cache),
                            self.intervention)

    def _trace(self, kept: list[int], reason: str, cache: Any) -> RouterTrace | None:
        recorder = self.recorder
        if recorder is None or not recorder.complete():
            return None  # not traced, or stopped half-way through the prompt
        if reason == "length" and kept:
            # The last sampled token was never read back; one more step routes it for the trace.
            last = torch.tensor([[kept[-1]]], device=self.entry.device)
            forward_step(self.entry, last, cache, prefill=False, cancel=CancelToken(), recorder=recorder,
                         steering=self.steering)
        read = (self.prompt.token_ids + kept)[: len(recorder.prefill)]
        described = self.intervention.to_dict() if self.intervention is not None else None
        return recorder.finish(read, self.entry.tokenizer, self.entry.expert_names, model=self.entry.ref,
                               intervention=described)


def chat_streams(model: Any, messages: str | Sequence[dict[str, str]], settings: SamplingSettings, *,
                 base: Any = None, cancel: CancelToken | None = None, trace: bool = False,
                 intervention: Intervention | None = None) -> list[ReplyStream]:
    """Streams for `model` and, when given, `base`, on one rendered prompt (the base's template).

    Every check runs here, before any token: a bad request raises ChatError. `trace` and
    `intervention` apply to `model`; one `cancel` token stops both.
    """
    entries = [model] + ([base] if base is not None else [])
    order = entries[::-1]  # the template comes from the base when there is one
    prompts = prepare(messages, settings, [e.tokenizer for e in order], [e.context_length for e in order])
    prompts = prompts[::-1]
    cancel = cancel or CancelToken()
    return [ReplyStream(entry, prompt, settings, cancel=cancel, trace=trace and i == 0,
                        intervention=intervention if i == 0 else None)
            for i, (entry, prompt) in enumerate(zip(entries, prompts, strict=True))]


def reply_logits(entry: Any, prompt_ids: list[int], reply_ids: list[int], *,
                 intervention: Intervention | None = None) -> Tensor:
    """Teacher-forced next-token logits (R, V) float32 on the CPU: row j is the model's
    distribution for reply token j given everything before it (under `intervention`, if any)."""
    if not reply_ids:
        return torch.zeros(0, 0)
    steering = steering_for(entry.model, intervention)
    ids = torch.tensor([prompt_ids + reply_ids], device=entry.device)
    with entry.lock, ExitStack() as stack:
        if steering is not None:
            stack.enter_context(steering.applied())
        stack.enter_context(torch.inference_mode())
        out = entry.model(input_ids=ids, use_cache=False, logits_to_keep=len(reply_ids) + 1)
    return out.logits[0, :-1].float().cpu()
