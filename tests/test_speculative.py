"""Speculative decoding by prompt lookup (quantchat/speculative.py): the guesses, the switch, and on llama.cpp with the
built-in model the same answers as decoding one token a step."""
import pytest
from test_settings import settings

from quantchat import loaders
from quantchat.assembly import build_engine
from quantchat.speculative import DraftControl, PromptLookup


def test_prompt_lookup_proposes_what_followed_the_latest_match():
    lookup = PromptLookup([1, 2, 3, 4, 5, 6, 9, 2, 3, 4, 7, 8])
    assert lookup.draft(3) == []                          # "4 7 8" and "7 8" ... never seen before: no guess
    lookup.extend([2, 3, 4])
    assert lookup.draft(2) == [7, 8]                       # "2 3 4" last came before "7 8 ..."
    assert lookup.draft(10) == [7, 8, 2, 3, 4]             # (up to the end of the text)
    lookup.extend([7, 8, 2, 3, 4, 7])
    assert lookup.draft(1) == [8]
    assert PromptLookup([5, 5]).draft(4) == []             # too short for a 3-token match


def test_the_draft_length_follows_acceptance_and_the_switch_follows_the_clock():
    control = DraftControl(most=8, patience=2)
    control.step_done(drafted=2, accepted=2, seconds=0.01)
    assert control.length == 3 and control.on
    control.step_done(drafted=3, accepted=0, seconds=0.01)
    assert control.length == 1
    control.step_done(drafted=0, accepted=0, seconds=0.001)  # steps without a guess: 1 ms a token
    assert control.on                                         # (not yet two of each)
    control.step_done(drafted=0, accepted=0, seconds=0.001)
    assert not control.on and control.stats.switched_off     # guessing cost 20/4 = 5 ms a token: off
    assert control.stats.steps == 2 and control.stats.drafted == 5 and control.stats.accepted == 2
    fast = DraftControl(patience=1)
    fast.step_done(drafted=4, accepted=4, seconds=0.002)      # 5 tokens in 2 ms
    fast.step_done(drafted=0, accepted=0, seconds=0.001)
    assert fast.on and fast.stats.tokens_per_step == 5.0


REWRITE = ("Copy this text exactly, word for word:\n\nThe engine renders the prompt, fits the conversation into the "
           "context window, queues concurrent requests, streams text, stops on stop strings, and times each answer. "
           "Every front end goes through the same engine; no front end talks to a backend directly.")


@pytest.fixture(scope="module")
def pair():
    models = {flag: loaders.load(loaders.plan(settings(f"--speculative={flag}", "--max_seq_len=2048")))
              for flag in (True, False)}
    yield {flag: build_engine(settings("--max_new_tokens=64"), model) for flag, model in models.items()}
    for model in models.values():
        model.close()


@pytest.mark.parametrize("sampling", [{"temperature": 0}, {"temperature": 0.7, "seed": 7}])
def test_speculation_keeps_the_answer_decoding_gives(pair, sampling):
    """The built-in model copying a passage: guesses are kept many to a step, and the answer is the one decoding a
    token a step gives, greedy or sampled with a seed (each position's token is drawn by the same sampler)."""
    asked = [{"role": "user", "content": REWRITE}]
    plain = pair[False].chat(asked, pair[False].params(**sampling))
    guessed = pair[True].chat(asked, pair[True].params(**sampling))
    assert guessed.finish() == plain.finish()
    assert plain.stats.speculation is None
    spec = guessed.stats.speculation
    assert spec.steps and spec.accepted > spec.steps, spec  # more than one guess kept a step on average
    assert f"{spec.accepted} of {spec.drafted} guessed tokens kept" in guessed.stats.line()


def test_constrained_answers_decode_one_token_a_step(pair):
    from quantchat.constraints import json_schema
    reply = pair[True].chat([{"role": "user", "content": REWRITE}],
                            answer_format=json_schema({"type": "object"}, "response_format"))
    reply.finish()
    assert reply.stats.speculation is None   # constrained answers decode a token a step


def test_metrics_count_the_guesses(pair):
    import httpx
    from test_api import start
    server, url = start(pair[True])
    try:
        body = {"messages": [{"role": "user", "content": REWRITE}], "max_tokens": 32, "temperature": 0}
        assert httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120).status_code == 200
        metrics = {line.split()[0]: float(line.split()[1]) for line in httpx.get(f"{url}/metrics").text.splitlines()
                   if line.startswith("quantchat_speculative")}
        assert metrics["quantchat_speculative_guesses_kept_total"] > metrics["quantchat_speculative_steps_total"] > 0
        assert metrics["quantchat_speculative_guesses_total"] >= metrics["quantchat_speculative_guesses_kept_total"]
    finally:
        server.uvicorn.should_exit = True
