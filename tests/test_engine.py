"""The chat engine on a scripted model: stop strings, caps, time limit, cancel, queueing, history fitting."""
import threading
import time

import pytest
from conftest import FakeModel

from quantchat.engine import ChatEngine, Limits, Turnstile
from quantchat.errors import UserError
from quantchat.loaders.base import GenParams
from quantchat.prompter import FORMATS, Prompter

PLAIN = Prompter("plain", FORMATS["plain"])
CHATML = Prompter("chatml", FORMATS["chatml"], stop=["<|im_end|>"])


def user(text):
    return [{"role": "user", "content": text}]


def engine(script, delay=0.0, context=4096, prompter=PLAIN, **limits):
    return ChatEngine(FakeModel(script, delay, context), prompter, limits=Limits(context, **limits))


def test_streams_every_token_and_counts_them():
    e = engine(["Hel", "lo", " there"])
    reply = e.chat(user("hi"))
    assert list(reply) == ["Hel", "lo", " there"]
    assert reply.text == "Hello there"
    assert reply.stats.completion_tokens == 3 and reply.stats.finish_reason == "eos"
    assert reply.stats.ttft_s is not None and reply.stats.prompt_tokens == 1


def test_stop_string_split_across_tokens_is_cut_and_never_shown():
    e = engine(["Four", ".", "<|im", "_end|>", "junk"], prompter=CHATML)
    reply = e.chat(user("2+2?"))
    shown = "".join(reply)
    assert shown == "Four." and reply.stats.finish_reason == "stop"


def test_request_stop_strings_come_with_the_formats():
    e = engine(["a", "b", "STOP", "c"])
    reply = e.chat(user("x"), e.params(stop=["STOP"]))
    assert reply.finish() == "ab" and reply.stats.finish_reason == "stop"


def test_max_new_tokens_is_capped_by_max_max_new_tokens():
    e = engine(["t"] * 50, max_max_new_tokens=5)
    reply = e.chat(user("x"), e.params(max_new_tokens=40))
    assert reply.finish() == "ttttt" and reply.stats.finish_reason == "length"


def test_max_time_stops_generation():
    e = engine(["t"] * 200, delay=0.01)
    reply = e.chat(user("x"), e.params(max_new_tokens=200, max_time=0.1))
    started = time.perf_counter()
    reply.finish()
    assert time.perf_counter() - started < 1.0
    assert reply.stats.finish_reason == "time" and 3 <= reply.stats.completion_tokens < 100


def test_cancel_stops_mid_answer():
    e = engine(["t"] * 100)
    cancel = threading.Event()
    reply = e.chat(user("x"), e.params(max_new_tokens=100), cancel)
    got = []
    for chunk in reply:
        got.append(chunk)
        if len(got) == 3:
            cancel.set()
    assert reply.stats.finish_reason == "cancelled" and len(got) <= 4


@pytest.mark.parametrize("overrides, message", [
    ({"max_new_tokens": -1}, "at least 1"), ({"temperature": 1e9}, "temperature"), ({"top_p": 0}, "top_p"),
    ({"max_time": 0}, "max_time"), ({"bogus": 1}, "unknown generation settings"),
])
def test_absurd_settings_are_refused(overrides, message):
    with pytest.raises(UserError, match=message):
        engine(["t"]).params(**overrides)


def test_empty_message_is_refused():
    with pytest.raises(UserError, match="non-empty user message"):
        engine(["t"]).chat(user("   "))


def test_oldest_turns_are_dropped_to_fit_the_context():
    e = engine(["ok"], context=40)
    history = []
    for i in range(6):
        history += [{"role": "user", "content": f"question {i} " + "w " * 5},
                    {"role": "assistant", "content": f"answer {i} " + "w " * 5}]
    history.append({"role": "user", "content": "last question"})
    reply = e.chat(history, e.params(max_new_tokens=10))
    reply.finish()
    prompt = e.model.prompts[-1]
    assert "last question" in prompt and "question 0" not in prompt
    assert reply.stats.dropped_turns > 0 and any("dropped" in n for n in reply.notices)
    assert e.model.count_tokens(prompt) + 10 <= 40


def test_message_longer_than_the_context_is_refused():
    e = engine(["t"], context=16)
    with pytest.raises(UserError, match="shorten it"):
        e.chat(user("w " * 40))


def test_answer_is_shortened_when_only_the_last_message_remains():
    e = engine(["t"] * 50, context=20)
    reply = e.chat(user("w " * 15), e.params(max_new_tokens=50))
    assert reply.finish() == "t" * 5 and any("limited to 5" in n for n in reply.notices)


def test_concurrent_chats_queue_and_never_mix():
    """Eight users at once: one generation at a time, each gets exactly its own complete answer."""
    class Echo(FakeModel):
        def stream(self, prompt, params, cancel):
            self.script = [f"[{prompt.strip()}]", "-", "done"]
            yield from super().stream(prompt, params, cancel)

    e = ChatEngine(Echo([], delay=0.005), PLAIN)
    results = {}

    def ask(i):
        results[i] = e.chat(user(f"user{i}")).finish()

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert results == {i: f"[user{i}]-done" for i in range(8)}
    assert e.model.max_active == 1


def test_what_a_backend_reports_stays_with_its_own_request():
    """Two generations at once (slots=2): each answer's timing line gets the reused prompt tokens and guesses its
    own generation reported, not the other's (they travel in the request's GenParams, not on the model)."""
    from quantchat.speculative import SpeculationStats

    class Reporting(FakeModel):
        def stream(self, prompt, params, cancel):
            n = int(prompt.strip()[-1])
            params.report.reused_tokens = 100 * n
            params.report.speculation = SpeculationStats(steps=n, drafted=2 * n, accepted=n)
            yield from super().stream(prompt, params, cancel)

    e = ChatEngine(Reporting(["a"] * 20, delay=0.005), PLAIN, slots=2)
    stats = {}

    def ask(i):
        reply = e.chat(user(f"user{i}"))
        reply.finish()
        stats[i] = reply.stats

    threads = [threading.Thread(target=ask, args=(i,)) for i in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert e.model.max_active == 2
    assert {i: (s.reused_tokens, s.speculation.steps) for i, s in stats.items()} == {1: (100, 1), 2: (200, 2)}


def test_turnstile_is_first_come_first_served_and_skips_the_cancelled():
    gate = Turnstile(1)
    assert gate.acquire(threading.Event())
    order, events = [], {}

    def wait(name):
        events[name] = threading.Event()
        if gate.acquire(events[name]):
            order.append(name)
            gate.release()

    threads = []
    for name in "abc":
        t = threading.Thread(target=wait, args=(name,))
        t.start()
        threads.append(t)
        time.sleep(0.05)  # a arrives before b before c
    assert gate.waiting == 3
    events["b"].set()  # b gives up while queued
    time.sleep(0.1)
    gate.release()
    for t in threads:
        t.join(timeout=5)
    assert order == ["a", "c"]


def test_consumer_that_walks_away_frees_the_queue():
    e = engine(["t"] * 1000, delay=0.001)
    reply = e.chat(user("x"), e.params(max_new_tokens=1000))
    next(iter(reply))
    del reply  # like a client disconnecting mid-stream
    second = e.chat(user("y"), e.params(max_new_tokens=3))
    assert second.finish() == "ttt"


def test_defaults_apply_when_a_request_says_none():
    e = ChatEngine(FakeModel(["t"]), PLAIN, defaults=GenParams(max_new_tokens=7, temperature=0.0))
    p = e.params(max_new_tokens=None)
    assert p.max_new_tokens == 7 and p.do_sample is False


def test_save_dir_appends_one_json_line_per_answer(tmp_path):
    import json

    from quantchat.history import History
    e = ChatEngine(FakeModel(["a", "b"]), PLAIN, history=History(tmp_path / "saved"))
    e.chat(user("first")).finish()
    e.chat(user("second"), e.params(max_new_tokens=1)).finish()
    lines = (tmp_path / "saved" / "history.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["answer"] for r in records] == ["ab", "a"]
    assert records[1]["messages"][-1]["content"] == "second" and records[1]["params"]["max_new_tokens"] == 1
    assert records[0]["stats"]["completion_tokens"] == 2 and records[0]["model"] == "fake"


def test_a_torn_last_record_spoils_only_itself(tmp_path):
    """Power lost mid-write leaves half a line; the next record starts on a line of its own, and readers skip the
    torn one."""
    from quantchat import history
    saved = history.History(tmp_path)
    e = ChatEngine(FakeModel(["a", "b"]), PLAIN, history=saved)
    e.chat(user("first")).finish()
    with open(saved.path, "a", encoding="utf-8") as f:
        f.write('{"time": "2026-12-01", "answer": "cut sho')
    e.chat(user("second")).finish()
    assert [r["messages"][-1]["content"] for r in history.read(saved.path)] == ["first", "second"]


@pytest.mark.parametrize("make", ["a file in the way", "no permission"])
def test_a_save_dir_that_cannot_be_written_is_refused_at_start(tmp_path, make):
    """At start, with one line (exit 1), not after each answer; a save that fails later costs no answer."""
    import os

    from quantchat.history import History
    if make == "a file in the way":
        (tmp_path / "saved").write_text("")
        folder = tmp_path / "saved"
    else:
        if os.geteuid() == 0:
            pytest.skip("root writes anywhere")
        (tmp_path / "locked").mkdir(mode=0o500)
        folder = tmp_path / "locked" / "saved"
    with pytest.raises(UserError, match="--save_dir=.*cannot write history.jsonl there"):
        History(folder).check()


def test_a_failed_save_is_logged_and_the_answer_kept(tmp_path):
    from quantchat.history import History
    logged = []
    saved = History(tmp_path / "saved", log=logged.append)
    saved.check()
    saved.path.unlink()
    saved.path.mkdir()  # (as a full disk or a vanished folder would) the next write fails
    e = ChatEngine(FakeModel(["a", "b"]), PLAIN, history=saved)
    assert e.chat(user("hi")).finish() == "ab"
    assert logged and "was not saved" in logged[0]


def test_stop_all_cancels_what_runs_and_refuses_new_answers():
    e = ChatEngine(FakeModel(["t"] * 1000, delay=0.005), PLAIN)
    running = e.chat(user("x"), e.params(max_new_tokens=1000))
    chunks = iter(running)
    next(chunks)
    stopper = threading.Thread(target=lambda: stopped.append(e.stop_all(timeout=10)))
    stopped: list[bool] = []
    stopper.start()
    list(chunks)  # the consumer sees its answer end
    stopper.join(10)
    assert stopped == [True] and running.stats.finish_reason == "cancelled"
    assert e.chat(user("y")).finish() == ""  # refused once stopping


def test_complete_continues_raw_text_without_a_format():
    e = engine(["x", "y"], prompter=CHATML)
    reply = e.complete("Once upon a time")
    assert reply.finish() == "xy" and e.model.prompts[-1] == "Once upon a time"
    with pytest.raises(UserError, match="shorten it"):
        engine(["t"], context=8).complete("w " * 20)


def test_score_model_rates_each_answer(tiny_reward_model):
    from quantchat.scoring import RewardScorer
    scorer = RewardScorer(str(tiny_reward_model))
    first, again, other = scorer.score("hi", "Hello there"), scorer.score("hi", "Hello there"), scorer.score("hi", "1 2 3")
    assert 0 < first < 1 and first == again and first != other
    e = ChatEngine(FakeModel(["Hello", " there"]), PLAIN, scorer=scorer)
    reply = e.chat(user("hi"))
    reply.finish()
    assert reply.stats.score == pytest.approx(first) and f"score {first:.2f}" in reply.stats.line()


def test_a_model_that_is_not_a_reward_model_is_refused(tiny_llama):
    from quantchat.scoring import RewardScorer
    with pytest.raises(UserError, match="cannot load|not a reward model"):
        RewardScorer(str(tiny_llama))
