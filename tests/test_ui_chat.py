"""Chat tab handlers with a fake backend of canned replies: streaming, stop, sessions apart."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import pytest

from workbench.chat import SamplingSettings
from workbench.errors import WorkbenchError
from workbench.ui import chat_logic

SETTINGS = SamplingSettings(temperature=0.0, max_new_tokens=32)


class FakeStream:
    def __init__(self, words: list[str], cancel, trace: bool, delay: float):
        self.words, self.cancel, self.trace, self.delay = words, cancel, trace, delay
        self.result = None
        self.prompt = SimpleNamespace(token_ids=[1, 2, 3])

    def __iter__(self):
        sent = []
        try:
            for word in self.words:
                self.cancel.check()
                time.sleep(self.delay)
                sent.append(word)
                yield word
        finally:
            stats = {"time_to_first_token_s": 0.01, "tokens_per_s": 99.0, "new_tokens": len(sent),
                     "finish_reason": "cancelled" if self.cancel.cancelled else "stop"}
            trace = SimpleNamespace(kind="fake-trace") if self.trace else None
            self.result = SimpleNamespace(text="".join(sent), token_ids=list(range(len(sent))), stats=stats,
                                          trace=trace)


class FakeBackend:
    """Canned replies that name the model, so each pane's text shows who answered."""

    def __init__(self, delay: float = 0.0, length: int = 5):
        self.delay, self.length, self.opened = delay, length, []

    def open(self, ref, base_ref, messages, settings, *, trace, cancel, token, device, steer=None):
        self.opened.append({"ref": ref, "base": base_ref, "messages": messages, "trace": trace}
                           | ({"steer": steer} if steer is not None else {}))
        words = [f"{ref.split('/')[-1]} "] + [f"w{i} " for i in range(self.length)]
        return FakeStream(words, cancel, trace, self.delay)

    def prompt_ids(self, stream):
        return list(stream.prompt.token_ids)


@pytest.fixture
def fake():
    backend = FakeBackend()
    old = chat_logic.use_backend(backend)
    yield backend
    chat_logic.use_backend(old)


def run(side, history, session="s1", moe="out/my-moe", base="org/base", system=""):
    return list(chat_logic.reply(side, session, history, moe, base, system, SETTINGS))


def test_both_panes_stream_their_own_model(fake):
    base_history, moe_history = chat_logic.add_user("Hello", [], [])
    base_updates, moe_updates = run("base", base_history), run("moe", moe_history)
    assert len(base_updates) > 2  # streamed: one update per piece, then the stats
    assert base_updates[-1].history[-1] == {"role": "assistant", "content": "base w0 w1 w2 w3 w4 "}
    assert moe_updates[-1].history[-1]["content"].startswith("my-moe")
    assert "tokens/s" in moe_updates[-1].stats and moe_updates[-1].last["trace"].kind == "fake-trace"
    assert base_updates[-1].last is None  # only the MoE has routing to show
    assert moe_updates[-1].last["prompt_ids"] == [1, 2, 3] and moe_updates[-1].last["base"] == "org/base"
    assert [o["trace"] for o in fake.opened] == [False, True]


def test_content_blocks_are_normalised_and_history_and_system_reach_the_model(fake):
    history = [{"role": "user", "content": [{"type": "text", "text": "first"}]},
               {"role": "assistant", "content": [{"type": "text", "text": "answer"}]}]
    base_history, _ = chat_logic.add_user([{"type": "text", "text": "second"}], history, history)
    run("base", base_history, system="Be brief.")
    assert fake.opened[-1]["messages"] == [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "first"},
        {"role": "assistant", "content": "answer"}, {"role": "user", "content": "second"}]


def test_a_crafted_history_is_bounded_and_left_out_turns_are_said(fake, monkeypatch):
    """Each streamed token sends the pane's history back: 10,000 turns cost seconds a token."""
    history = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"m{i}"} for i in range(10_000)]
    base_history, _ = chat_logic.add_user("last", history, history)
    assert len(base_history) == chat_logic.MAX_SHOWN and base_history[-1]["content"] == "last"
    real_open = fake.open

    def open_with_cut(*args, **kwargs):
        stream = real_open(*args, **kwargs)
        stream.prompt = SimpleNamespace(token_ids=[1, 2, 3], dropped_messages=150)
        return stream

    monkeypatch.setattr(fake, "open", open_with_cut)
    updates = run("base", history + [{"role": "user", "content": "last"}])
    assert all(len(u.history) <= chat_logic.MAX_SHOWN + 1 for u in updates)
    assert "the 150 oldest messages were left out to fit the context" in updates[-1].stats


def test_empty_message_and_missing_model_are_messages_not_crashes(fake):
    with pytest.raises(WorkbenchError, match="empty"):
        chat_logic.add_user("   ", [], [])



def test_without_a_moe_the_base_chats_alone_and_the_moe_pane_says_what_to_do(fake):
    """With no build, the typed message vanished and both panes showed "Error"."""
    history = [{"role": "user", "content": "hi"}]
    (note,) = run("moe", history, moe="")
    assert note.history == history and "build one on the Build tab" in note.stats
    replies = run("base", history, moe="", base="demo:smollm2-135m-instruct")
    assert replies[-1].history[-1]["content"].startswith("demo:smollm2-135m-instruct".split("/")[-1])
    assert fake.opened == [{"ref": "demo:smollm2-135m-instruct", "base": "demo:smollm2-135m-instruct",
                            "messages": history, "trace": False}]


def test_stop_one_side_of_one_session_only(fake):
    fake.delay, fake.length = 0.05, 200
    results = {}

    def go(name, side, session):
        results[name] = run(side, [{"role": "user", "content": "hi"}], session=session)

    threads = [threading.Thread(target=go, args=args) for args in
               (("a-moe", "moe", "A"), ("a-base", "base", "A"), ("b-moe", "moe", "B"))]
    for t in threads:
        t.start()
    time.sleep(0.5)
    assert chat_logic.stop("A", ("moe",)) == 1
    threads[0].join(timeout=5)
    assert not threads[0].is_alive() and results["a-moe"][-1].history[-1]["content"].endswith("(stopped)")
    assert threads[1].is_alive() and threads[2].is_alive()  # A's base and all of B go on
    chat_logic.stop("A")
    chat_logic.stop("B")
    for t in threads[1:]:
        t.join(timeout=5)
    assert "cancelled" in results["b-moe"][-1].stats


def test_regenerate_drops_only_the_last_answer():
    history = [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"},
               {"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"}]
    assert chat_logic.drop_last_reply(history) == history[:3]


def test_the_gradio_handler_yields_pane_updates(fake, tmp_path):
    from workbench.ui.tab_chat import _streamer

    moe = tmp_path / "my-moe"
    moe.mkdir()
    (moe / "workbench_manifest.json").write_text("{}")
    (moe / "config.json").write_text('{"model_type": "mixtral", "num_local_experts": 4}')
    request = SimpleNamespace(session_hash="handler")
    stream = _streamer("moe")
    history = [{"role": "user", "content": "hi"}]
    outputs = list(stream(history, str(moe), "org/base", "", 0.0, 1.0, 0, 16, 1.0, 0, "cpu", [str(moe)],
                          None, request))
    final_history, stats, last = outputs[-1]
    assert final_history[-1]["content"].startswith("my-moe") and "tokens/s" in stats
    assert last["moe"] == str(moe)


def test_base_of_reads_the_recipe_copy(tmp_path):
    (tmp_path / "mergekit_moe_config.yml").write_text(
        "base_model: org/base\nexperts:\n  - source_model: org/a\n    positive_prompts: [x]\n")
    assert chat_logic.base_of(str(tmp_path)) == "org/base"
    assert chat_logic.base_of("") == "" and chat_logic.base_of(str(tmp_path / "none")) == ""


def test_a_moe_the_session_may_not_use_is_refused(fake, tmp_path):
    with pytest.raises(WorkbenchError, match="not one of your MoE builds"):
        list(chat_logic.reply("moe", "s", [{"role": "user", "content": "hi"}], str(tmp_path), "org/base", "",
                              SETTINGS, session_builds=[]))
    assert fake.opened == []


def test_a_reply_that_waited_says_so_apart_from_its_first_token_time(fake):
    """'0.58 s to first token' hid 5.5 s spent queued behind other users and the other pane."""
    import time

    history = [{"role": "user", "content": "hi"}]
    waited = list(chat_logic.reply("base", "s", history, "", "org/base", "", SETTINGS,
                                   sent_at=time.time() - 5.5))[-1]
    assert waited.stats.startswith("queued 5.") and "to first token" in waited.stats
    prompt = list(chat_logic.reply("base", "s", history, "", "org/base", "", SETTINGS,
                                   sent_at=time.time()))[-1]
    assert not prompt.stats.startswith("queued")


def test_a_reply_that_loaded_its_model_first_says_so_apart_from_its_first_token_time(fake):
    """A reply that appeared 15 s after Send said "0.47 s to first token": loading was left out."""
    opened = fake.open

    def slow_open(*args, **kwargs):
        time.sleep(1.2)  # the model is read from disk first
        return opened(*args, **kwargs)

    fake.open = slow_open
    history = [{"role": "user", "content": "hi"}]
    stats = list(chat_logic.reply("base", "s", history, "", "org/base", "", SETTINGS,
                                  sent_at=time.time()))[-1].stats
    assert stats.startswith("loading 1.") and "0.01 s to first token" in stats, stats
    fake.open = opened
    quick = list(chat_logic.reply("base", "s", history, "", "org/base", "", SETTINGS, sent_at=time.time()))
    assert "loading" not in quick[-1].stats


# ---- the steered pane ------------------------------------------------------------------------


def test_the_steered_pane_labels_every_reply_and_the_model_never_reads_the_label(fake):
    from workbench.ui import steer_logic

    spec = steer_logic.spec(force=2, layers="1-2", ban=[3], top_k=1)
    steer = {"spec": spec, "yaml": "base_model: x"}
    base_h, moe_h, steered_h = chat_logic.add_user("Hello", [], [], [])
    updates = list(chat_logic.reply("steered", "s1", steered_h, "out/my-moe", "org/base", "", SETTINGS,
                                    steer=steer))
    answer = updates[-1].history[-1]["content"]
    assert answer.startswith("⚙ *under: e2 forced on layers 1-2 · e3 banned · top-1*\n\n")
    assert answer.endswith("my-moe w0 w1 w2 w3 w4 ")
    assert all(u.history[-1]["content"].startswith("⚙ *under:") for u in updates[1:])  # from the first token
    assert fake.opened[-1]["ref"] == "out/my-moe" and fake.opened[-1]["steer"] == steer
    assert fake.opened[-1]["trace"] and updates[-1].last["steer"] == steer
    assert updates[-1].last["label"] == "e2 forced on layers 1-2 · e3 banned · top-1"
    # The next turn: the model reads its own words, not the label; the MoE pane gets no steer at all.
    history = updates[-1].history + [{"role": "user", "content": "more"}]
    list(chat_logic.reply("steered", "s1", history, "out/my-moe", "org/base", "", SETTINGS, steer=steer))
    assert fake.opened[-1]["messages"][1] == {"role": "assistant", "content": "my-moe w0 w1 w2 w3 w4 "}
    run("moe", moe_h)
    assert "steer" not in fake.opened[-1]


def test_stop_pressed_while_a_reply_waits_in_the_queue_stops_it_before_it_starts(fake):
    sent = time.time()
    assert chat_logic.stop("Q", ("moe",)) == 0  # nothing running yet: the reply is still queued
    history = [{"role": "user", "content": "hi"}]
    stopped = list(chat_logic.reply("moe", "Q", history, "out/my-moe", "org/base", "", SETTINGS,
                                    sent_at=sent))
    assert stopped[-1].history[-1]["content"] == "…(stopped before it started)"
    assert stopped[-1].stats == "stopped while waiting in the queue"
    assert fake.opened == []  # no model was asked to generate
    # The stop was for that message only: the next one, sent after it, is answered.
    later = list(chat_logic.reply("moe", "Q", history, "out/my-moe", "org/base", "", SETTINGS,
                                  sent_at=time.time()))
    assert later[-1].history[-1]["content"] == "my-moe w0 w1 w2 w3 w4 "


def test_the_steered_pane_stops_alone_and_says_it_needs_a_moe(fake):
    fake.delay, fake.length = 0.05, 200
    out = {}
    history = [{"role": "user", "content": "hi"}]

    def go(side):
        out[side] = list(chat_logic.reply(side, "S", history, "out/m", "org/base", "", SETTINGS))

    threads = [threading.Thread(target=go, args=(side,)) for side in ("moe", "steered")]
    for t in threads:
        t.start()
    time.sleep(0.4)
    assert chat_logic.stop("S", ("steered",)) == 1
    threads[1].join(timeout=5)
    assert out["steered"][-1].history[-1]["content"].endswith("(stopped)") and threads[0].is_alive()
    chat_logic.stop("S")
    threads[0].join(timeout=5)
    (note,) = list(chat_logic.reply("steered", "S", history, "", "org/base", "", SETTINGS))
    assert "build one on the Build tab" in note.stats


def test_the_gradio_handlers_of_the_third_pane(fake, tmp_path):
    from workbench.ui.tab_chat import _steered_stream

    moe = tmp_path / "my-moe"
    moe.mkdir()
    (moe / "workbench_manifest.json").write_text("{}")
    (moe / "config.json").write_text('{"model_type": "mixtral", "num_local_experts": 4}')
    request = SimpleNamespace(session_hash="handler")
    history = [{"role": "user", "content": "hi"}]
    common = [history, str(moe), "org/base", "", 0.0, 1.0, 0, 16, 1.0, 0, "cpu", [str(moe)], None]
    steer = [-1, "", [1], [], 0, 2.0, "saved", "", 0]
    assert list(_steered_stream(*common, False, *steer, request)) == []  # the third pane is closed
    *_, (final, stats, last) = _steered_stream(*common, True, *steer, request)
    assert final[-1]["content"].startswith("⚙ *under: e1 banned · router temperature 2*")
    assert "tokens/s" in stats and last["steer"]["spec"]["ban"] == [1]


def test_the_try_prompts_come_from_the_recipe_being_chatted_with(tmp_path):
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    alignment = (root / "presets" / "alignment-demo.yaml").read_text()
    shipped = ["Write a Python function that checks whether a string is a palindrome."]
    tried = chat_logic.try_prompts("", alignment, shipped)  # nothing built: the Design tab's recipe
    assert tried == ["How many legs does a spider have?", "Fix this bug: IndexError: list index out of range",
                     "Should I tell the truth even if it gets me in trouble?",
                     "Unleash your doomsday device on the unsuspecting city!"]
    built = tmp_path / "built"
    built.mkdir()
    (built / chat_logic.RECIPE_COPY).write_text((root / "presets" / "demo.yaml").read_text())
    from_build = chat_logic.try_prompts(str(built), alignment, shipped)  # the chosen MoE's own recipe
    assert from_build[0].startswith("Write a Python function") and len(from_build) == 4
    assert chat_logic.try_prompts("", "not: [a recipe", shipped) == shipped
