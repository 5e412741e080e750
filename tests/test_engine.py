"""The model registry and streaming generation, on pico models and a pico MoE built from them."""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from workbench.build import build
from workbench.chat import ReplyStream, SamplingSettings, chat_streams, engine, prepare, reply_logits
from workbench.chat.engine import COMPUTE_LOCK, Registry, install_decode_path
from workbench.chat.generate import sample
from workbench.chat.request import ChatError
from workbench.chat.share import unique_bytes
from workbench.errors import Cancelled, SourceError, WorkbenchError
from workbench.progress import CancelToken
from workbench.recipe import Expert, Recipe

PROMPTS = [["def add(a, b): return a + b"], ["Solve 2x + 3 = 7 for x."], ["Once upon a time a dragon"],
           ["Hello! How are you doing today?"]]
SAMPLED = SamplingSettings(temperature=1.0, top_p=0.95, top_k=50, max_new_tokens=24, seed=7)


def build_moe(base: Path, out: Path, experts: list[Path] | None = None, k: int = 2) -> Path:
    experts = experts or [base] * 4
    recipe = Recipe(base_model=str(base), experts_per_token=k, dtype="float32", experts=[
        Expert(source_model=str(e), positive_prompts=PROMPTS[i % 4]) for i, e in enumerate(experts)])
    return build(recipe, out, device="cpu").path


@pytest.fixture(scope="module")
def base(pico_factory) -> Path:
    return pico_factory("engine-base", seed=3)


@pytest.fixture(scope="module")
def moe(base, tmp_path_factory) -> Path:
    return build_moe(base, tmp_path_factory.mktemp("engine") / "identity-moe")


@pytest.fixture(scope="module")
def reg() -> Registry:
    return Registry()


def ask(entry, text: str, settings: SamplingSettings = SAMPLED, **kwargs) -> ReplyStream:
    (prompt,) = prepare(text, settings, [entry.tokenizer], [entry.context_length])
    return ReplyStream(entry, prompt, settings, **kwargs)


def run(stream: ReplyStream) -> str:
    return "".join(stream)


# ---- registry --------------------------------------------------------------------------


def test_two_concurrent_gets_load_once(base, monkeypatch):
    calls = []
    real = engine.load_model

    def slow_load(*args, **kwargs):
        calls.append(args)
        time.sleep(0.3)  # both threads are inside get() while the first one loads
        return real(*args, **kwargs)

    monkeypatch.setattr(engine, "load_model", slow_load)
    registry, got = Registry(), []
    threads = [threading.Thread(target=lambda: got.append(registry.get(str(base), device="cpu")))
               for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert len(calls) == 1 and len(got) == 2 and got[0] is got[1]


def test_two_spellings_of_one_folder_are_one_model(base):
    registry = Registry()
    first = registry.get(str(base), device="cpu")
    assert registry.get(str(base) + "/", device="cpu") is first
    assert registry.get(str(base.parent / "." / base.name), device="cpu") is first
    assert len(registry.loaded()) == 1


def test_unload_frees_the_model(base):
    registry = Registry()
    entry = registry.get(str(base), device="cpu")
    alive = weakref.ref(entry.model)
    del entry
    assert registry.unload(str(base)) == 1
    assert registry.loaded() == [] and alive() is None
    assert registry.unload(str(base)) == 0


def test_the_registry_is_bounded_and_unloads_the_least_recently_used(pico_factory):
    """Loaded models were never evicted: every model anyone chatted with stayed in memory."""
    a, b, c = (pico_factory(name, seed=i + 1) for i, name in enumerate(("lru-a", "lru-b", "lru-c")))
    one = Registry().get(str(a), device="cpu")
    size = unique_bytes([one.model])
    registry = Registry(max_bytes=int(size * 2.5))  # room for two of these models, not three
    first = registry.get(str(a), device="cpu")
    alive = weakref.ref(first.model)
    del first, one
    registry.get(str(b), device="cpu")
    registry.get(str(a), device="cpu")  # a is now the most recently used
    registry.get(str(c), device="cpu")  # over the bound: b goes
    assert sorted(e.ref for e in registry.loaded()) == sorted([str(a), str(c)])
    assert registry.resident_bytes() <= registry.max_bytes and alive() is not None
    registry.get(str(b), device="cpu")  # a is the oldest now
    assert sorted(e.ref for e in registry.loaded()) == sorted([str(b), str(c)]) and alive() is None
    tiny = Registry(max_bytes=1)
    assert tiny.get(str(a), device="cpu") is not None and len(tiny.loaded()) == 1  # the one asked for stays


def test_the_bound_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv("MOE_WORKBENCH_MODEL_GB", "1.5")
    assert Registry().max_bytes == 1_500_000_000
    monkeypatch.setenv("MOE_WORKBENCH_MODEL_GB", "lots")
    with pytest.raises(SourceError, match="MOE_WORKBENCH_MODEL_GB='lots' is not a number of GB"):
        Registry()
    monkeypatch.delenv("MOE_WORKBENCH_MODEL_GB")
    assert Registry().max_bytes > 1e9  # half this machine's memory


def test_unknown_model_is_a_clear_error_and_leaves_nothing(tmp_path):
    registry = Registry()
    with pytest.raises(SourceError, match="missing"):
        registry.get(str(tmp_path / "missing"), device="cpu")
    assert registry.loaded() == []


def test_moe_and_base_share_tensors_and_cost_about_the_moe_alone(base, moe):
    alone_moe, alone_base = Registry(), Registry()
    moe_bytes = alone_moe.get(str(moe), device="cpu") and alone_moe.resident_bytes()
    base_bytes = alone_base.get(str(base), device="cpu") and alone_base.resident_bytes()
    reference = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()

    both = Registry()
    b = both.get(str(base), device="cpu")
    m = both.get(str(moe), device="cpu")
    shared = both.resident_bytes()
    assert shared < 1.02 * moe_bytes < 0.9 * (moe_bytes + base_bytes)
    embed_b, embed_m = b.model.get_input_embeddings().weight, m.model.get_input_embeddings().weight
    assert embed_b.data_ptr() == embed_m.data_ptr()
    # The base's MLP now lives inside the MoE's expert tensors: it must still compute the same.
    ids = torch.tensor([[0, 17, 42, 99, 150, 7]])
    with torch.no_grad():
        assert torch.allclose(b.model(ids).logits, reference(ids).logits, atol=1e-5)
        assert torch.allclose(m.model(ids).logits, reference(ids).logits, atol=1e-4)


def test_unequal_models_share_nothing(pico_factory):
    first, second = pico_factory("share-a", seed=11), pico_factory("share-b", seed=12)
    registry = Registry()
    a = registry.get(str(first), device="cpu")
    b = registry.get(str(second), device="cpu")
    pointers = {p.data_ptr(): name for name, p in a.model.named_parameters()}
    shared = {name: p for name, p in b.model.named_parameters() if p.data_ptr() in pointers}
    # Only the norms (all ones in both random models) are equal, so only they are shared.
    assert shared and all(name.endswith("norm.weight") for name in shared)
    assert all(torch.equal(p, dict(a.model.named_parameters())[name]) for name, p in shared.items())
    saved = sum(p.numel() * p.element_size() for p in shared.values())
    assert registry.resident_bytes() == unique_bytes([a.model]) + unique_bytes([b.model]) - saved


def test_moe_entry_knows_its_experts(reg, base, moe):
    entry = reg.get(str(moe), device="cpu")
    # No names in the recipe: each expert is called by its first prompt (the build's recipe copy).
    assert entry.is_moe and entry.top_k == 2 and len(entry.expert_names) == 4
    assert len(set(entry.expert_names)) == 4 and str(base) not in entry.expert_names
    assert entry.base_ref == str(base) and not reg.get(str(base), device="cpu").is_moe


def test_decode_path_equals_transformers_experts(base, pico_factory, tmp_path):
    others = [pico_factory("expert", seed=s) for s in (21, 22, 23)]
    folder = build_moe(base, tmp_path / "mixed", experts=[base, *others])
    plain = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    fast = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    assert install_decode_path(fast) == 3
    ids = torch.tensor([[0, 5, 77, 130, 9]])
    from transformers import DynamicCache

    caches = [DynamicCache(config=plain.config), DynamicCache(config=fast.config)]
    with torch.no_grad():
        pairs = list(zip((plain, fast), caches, strict=True))
        outs = [m(ids, past_key_values=c, use_cache=True).logits for m, c in pairs]
        assert torch.equal(outs[0], outs[1])  # prompts keep transformers' own path
        for token in (44, 200, 3):
            step = torch.tensor([[token]])
            a, b = (m(step, past_key_values=c, use_cache=True).logits for m, c in pairs)
            assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)


# ---- generation ------------------------------------------------------------------------


def test_greedy_reply_equals_transformers_generate(reg, moe):
    entry = reg.get(str(moe), device="cpu")
    greedy = SamplingSettings(temperature=0, max_new_tokens=12)
    stream = ask(entry, "Once upon a time", greedy)
    run(stream)
    ids = torch.tensor([stream.prompt.token_ids])
    expected = entry.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12,
                                    do_sample=False, eos_token_id=None)[0, ids.shape[1]:].tolist()
    assert stream.result.token_ids == expected


def test_same_seed_same_reply_other_seed_other_reply(reg, moe):
    entry = reg.get(str(moe), device="cpu")
    first, again = ask(entry, "Hello there"), ask(entry, "Hello there")
    other = ask(entry, "Hello there", SamplingSettings(**{**SAMPLED.to_dict(), "seed": 8}))
    texts = [run(s) for s in (first, again, other)]
    assert first.result.token_ids == again.result.token_ids and texts[0] == texts[1]
    assert other.result.token_ids != first.result.token_ids


def test_streamed_deltas_add_up_to_the_reply_and_stats_are_filled(reg, moe):
    entry = reg.get(str(moe), device="cpu")
    stream = ask(entry, "Tell me a story")
    text = run(stream)
    stats = stream.result.stats
    assert text == stream.result.text
    assert stats.new_tokens == len(stream.result.token_ids) == SAMPLED.max_new_tokens
    assert stats.finish_reason == "length" and stats.prompt_tokens == len(stream.prompt.token_ids)
    assert 0 < stats.time_to_first_token_s <= stats.total_s and stats.tokens_per_s > 0


def test_end_of_turn_token_stops_the_reply(reg, base):
    entry = reg.get(str(base), device="cpu")
    greedy = SamplingSettings(temperature=0, max_new_tokens=10)
    first = ask(entry, "Hi", greedy)
    run(first)
    entry.model.generation_config.eos_token_id = first.result.token_ids[2]
    try:
        stopped = ask(entry, "Hi", greedy)
        run(stopped)
    finally:
        entry.model.generation_config.eos_token_id = entry.tokenizer.eos_token_id
    assert stopped.result.stats.finish_reason == "stop"
    assert stopped.result.token_ids == first.result.token_ids[:2]  # the stop token is not part of it


def test_tracing_does_not_change_the_tokens(reg, moe):
    entry = reg.get(str(moe), device="cpu")
    plain, traced = ask(entry, "Solve 2x + 3 = 7"), ask(entry, "Solve 2x + 3 = 7", trace=True)
    run(plain), run(traced)
    assert traced.result.token_ids == plain.result.token_ids and traced.result.trace is not None
    assert plain.result.trace is None


def test_stop_mid_stream_frees_the_worker(reg, moe):
    entry = reg.get(str(moe), device="cpu")
    cancel, seen, errors = CancelToken(), [], []
    long = SamplingSettings(temperature=1.0, max_new_tokens=200, seed=1)
    stream = ask(entry, "Write a long story", long, cancel=cancel)

    def worker() -> None:
        try:
            for delta in stream:
                seen.append(delta)
                time.sleep(0.01)
        except Cancelled as exc:
            errors.append(exc)

    thread = threading.Thread(target=worker)
    thread.start()
    while len(seen) < 3 and thread.is_alive():
        time.sleep(0.005)
    stopped_at = time.monotonic()
    cancel.cancel()
    thread.join(5)
    assert not thread.is_alive() and time.monotonic() - stopped_at < 2
    assert errors and stream.result.stats.finish_reason == "cancelled"
    assert stream.result.stats.new_tokens < 200
    assert COMPUTE_LOCK.acquire(blocking=False)  # nothing holds the lock any more
    COMPUTE_LOCK.release()
    assert run(ask(entry, "Still there?"))  # and the next request works


def test_stop_during_the_prompt_interrupts_the_forward(reg, moe):
    entry = reg.get(str(moe), device="cpu")
    cancel, ran = CancelToken(), []
    layers = entry.model.model.layers
    hooks = [layer.register_forward_hook(lambda m, a, o, i=i: ran.append(i))
             for i, layer in enumerate(layers)]
    hooks.append(layers[0].register_forward_hook(lambda *a: cancel.cancel()))
    try:
        with pytest.raises(Cancelled):
            run(ask(entry, "Hello", cancel=cancel))
    finally:
        for hook in hooks:
            hook.remove()
    assert ran == [0]  # layer 1 never finished: the stop landed inside the prompt's forward


def test_bad_requests_fail_before_any_forward(reg, base):
    entry = reg.get(str(base), device="cpu")
    calls = []
    hook = entry.model.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(ChatError, match="empty"):
            ask(entry, "   ")
        with pytest.raises(ChatError, match="context"):
            ask(entry, "word " * 400)  # the pico context is 256 tokens
        with pytest.raises(ChatError, match="temperature"):
            ask(entry, "hi", SamplingSettings(temperature=-1))
        with pytest.raises(ChatError, match="top_p"):
            ask(entry, "hi", SamplingSettings(top_p=0))
    finally:
        hook.remove()
    assert calls == [] and issubclass(ChatError, WorkbenchError)


def test_old_history_is_dropped_to_fit_the_context(reg, base):
    entry = reg.get(str(base), device="cpu")
    history = [{"role": "user", "content": "story " * 60}, {"role": "assistant", "content": "ok " * 60},
               {"role": "user", "content": "and now?"}]
    (prompt,) = prepare(history, SAMPLED, [entry.tokenizer], [entry.context_length])
    assert prompt.dropped_messages >= 1 and "and now?" in prompt.text
    assert len(prompt.token_ids) + prompt.max_new_tokens <= entry.context_length


def test_a_huge_crafted_history_is_cut_in_a_few_renders(reg, base, monkeypatch):
    """64 messages of 7,999 characters once took 87 s: one render and tokenising per dropped
    message, and a prompt as long as the whole context."""
    from workbench.chat import request

    entry = reg.get(str(base), device="cpu")
    renders = []
    real = request.render
    monkeypatch.setattr(request, "render", lambda tok, convo: renders.append(len(convo)) or real(tok, convo))
    history = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"turn {i} " + "x w " * 150}
               for i in range(63)] + [{"role": "user", "content": "and now?"}]
    (prompt,) = prepare(history, SAMPLED, [entry.tokenizer], [100_000])  # a context past the server's cap
    assert len(prompt.token_ids) <= request.MAX_PROMPT_TOKENS
    assert "and now?" in prompt.text and "turn 62" in prompt.text and 40 <= prompt.dropped_messages < 63
    assert len(renders) <= 10  # a binary search, not one render per dropped message


def test_both_sides_get_the_same_rendered_prompt(reg, base, moe):
    b, m = reg.get(str(base), device="cpu"), reg.get(str(moe), device="cpu")
    for_base, for_moe = prepare("Hi there", SAMPLED, [b.tokenizer, m.tokenizer],
                                [b.context_length, m.context_length])
    assert for_base.text == for_moe.text and for_base.token_ids == for_moe.token_ids
    assert for_base.text.endswith("assistant\n")


def interleave(streams: Sequence[ReplyStream]) -> Iterator[tuple[int, str]]:
    """Run several replies side by side, one token of each in turn, as two panes share a worker:
    yields (stream index, delta)."""
    active = {i: iter(s) for i, s in enumerate(streams)}
    while active:
        for i in list(active):
            try:
                yield i, next(active[i])
            except StopIteration:
                del active[i]


def test_side_by_side_streams_interleave_token_by_token(reg, base, moe):
    b, m = reg.get(str(base), device="cpu"), reg.get(str(moe), device="cpu")
    streams = chat_streams(m, "Hi", SAMPLED, base=b, trace=True)
    assert streams[0].prompt.text == streams[1].prompt.text and streams[0].cancel is streams[1].cancel
    order = [i for i, _ in interleave(streams)]
    assert order[:4] == [0, 1, 0, 1]
    # Identical experts: the identity MoE and its base give the same reply for the same seed.
    assert streams[0].result.token_ids == streams[1].result.token_ids
    assert streams[0].result.trace is not None and streams[1].result.trace is None


def test_top_k_and_top_p_cut_the_candidates():
    logits = torch.tensor([5.0, 4.0, 0.0, -1.0])
    wide = SamplingSettings(temperature=5.0, top_k=2)
    picks = {sample(logits, wide, torch.Generator().manual_seed(s)) for s in range(40)}
    assert picks == {0, 1}
    nucleus = SamplingSettings(temperature=1.0, top_k=0, top_p=0.5)
    assert {sample(logits, nucleus, torch.Generator().manual_seed(s)) for s in range(40)} == {0}


def test_reply_logits_score_each_reply_token(reg, base):
    entry = reg.get(str(base), device="cpu")
    stream = ask(entry, "Hi", SamplingSettings(temperature=0, max_new_tokens=6))
    run(stream)
    logits = reply_logits(entry, stream.prompt.token_ids, stream.result.token_ids)
    assert logits.shape == (6, entry.model.config.vocab_size)
    assert logits.argmax(-1).tolist() == stream.result.token_ids  # greedy: each token is the argmax
