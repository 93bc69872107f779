"""Speculative decoding by prompt lookup (quantchat/speculative.py): the guesses, the switch, and the same answers
as decoding one token a step: on llama.cpp with the built-in model, on the Hugging Face fast path with Gemma 3's
real weights (eager) and a tiny Llama (compiled). The captured verify step runs on CUDA in tests/test_gpu_hf.py."""
import threading

import pytest
from test_fast_decode import answer, load
from test_settings import settings

from quantchat import loaders
from quantchat.assembly import build_engine
from quantchat.errors import UsageError, UserError
from quantchat.loaders.base import GenParams
from quantchat.machine import Machine
from quantchat.speculative import DraftControl, DraftRecord, PromptLookup, answer_control


def test_prompt_lookup_proposes_what_followed_the_latest_match():
    lookup = PromptLookup([1, 2, 3, 4, 5, 6, 9, 2, 3, 4, 7, 8])
    assert lookup.draft(3) == []                          # "4 7 8" and "7 8" ... never seen before: no guess
    lookup.extend([2, 3, 4])
    assert lookup.draft(2) == [7, 8]                       # "2 3 4" last came before "7 8 ..."
    assert lookup.draft(10) == [7, 8, 2, 3, 4]             # (up to the end of the text)
    lookup.extend([7, 8, 2, 3, 4, 7])
    assert lookup.draft(1) == [8]
    assert PromptLookup([5, 5]).draft(4) == []             # too short for a 3-token match


def test_a_lookup_follows_the_next_prompt_as_if_indexed_afresh():
    """A chat's next turn continues the last answer's lookup: cut back to the prefix the new prompt shares with it
    (an answer the template renders otherwise), extended by the rest, its index that of a fresh lookup."""
    import random
    rng = random.Random(0)
    history = [rng.randrange(6) for _ in range(300)]  # (a small vocabulary: n-grams recur)
    for next_prompt in (history + [1, 2, 3, 4],                  # the history continued
                        history[:250] + [5, 0, 5, 1, 2, 3] * 9,   # its last 50 tokens rendered otherwise
                        history[:-1]):                           # shorter
        lookup = PromptLookup(history)
        followed = lookup.follow(next_prompt)
        fresh = PromptLookup(next_prompt)
        assert followed is lookup and followed.tokens == fresh.tokens and followed.last_end == fresh.last_end
        assert followed.draft(5) == fresh.draft(5)
    other = PromptLookup.over([0] * 400, PromptLookup(history))  # another conversation: indexed afresh
    assert other.tokens == [0] * 400 and other.last_end == PromptLookup([0] * 400).last_end
    assert PromptLookup.over(history, None).last_end == PromptLookup(history).last_end


def test_a_conversations_next_turn_continues_its_lookup(tiny_llama, pair, monkeypatch):
    """On the fast path and on llama.cpp, the next turn's lookup is the last answer's, followed on: the history is
    not indexed again (a new lookup only for a new conversation)."""
    made = []
    init = PromptLookup.__init__
    monkeypatch.setattr(PromptLookup, "__init__", lambda self, *a, **k: made.append(1) or init(self, *a, **k))
    fast = load(tiny_llama, "--fast_decode=True")
    try:
        made.clear()  # (the warm-up's answers)
        first = "one two three four five six seven " * 12
        reply = answer(fast, first, max_new_tokens=20)
        prompt = fast._encode(first)[0].tolist()
        indexed = fast.fast.lookup.tokens  # the prompt and the answer (less its last token, never looked up from)
        assert len(made) == 1 and indexed[:len(prompt)] == prompt and len(indexed) == len(prompt) + 19
        kept = fast.fast.lookup
        answer(fast, first + reply + " eight nine", max_new_tokens=20)
        assert len(made) == 1 and fast.fast.lookup is kept
        answer(fast, "Something else entirely.", max_new_tokens=5)
        assert len(made) == 2
    finally:
        fast.close()
    engine = pair[True]
    history = [{"role": "user", "content": REWRITE}]
    history.append({"role": "assistant", "content": engine.chat(history).finish()})
    assert len(made) == 3
    history.append({"role": "user", "content": "Again, shorter."})
    engine.chat(history).finish()
    assert len(made) == 3, "the second turn indexed its history again"


def test_shared_prefix_finds_the_first_difference():
    from quantchat.loaders.base import shared_prefix
    a = list(range(1000))
    for at in (0, 1, 2, 511, 512, 998, 999):
        assert shared_prefix(a, a[:at] + [-1] + a[at + 1:]) == at
    assert shared_prefix(a, a) == 1000 and shared_prefix(a, a[:700]) == shared_prefix(a[:700], a) == 700
    assert shared_prefix([], a) == shared_prefix([5], [6]) == 0


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
    assert fast.guessing                                      # (prompt lookup: steps without a guess come anyway)
    fast.step_done(drafted=0, accepted=0, seconds=0.001)
    assert fast.on and fast.stats.tokens_per_step == 5.0
    drafting = DraftControl(patience=2, probe_plain_steps=True)  # a draft model always has guesses
    for _ in range(2):
        assert drafting.guessing
        drafting.step_done(drafted=3, accepted=0, seconds=0.003)
    assert not drafting.guessing                               # two steps without, to compare against
    drafting.step_done(drafted=0, accepted=0, seconds=0.001)
    drafting.step_done(drafted=0, accepted=0, seconds=0.001)
    assert not drafting.on                                     # 3 ms a token against 1: off


def losing_answer(control: DraftControl) -> None:
    """An answer whose guesses cost 3 ms a token against 1 without (DraftControl's default patience of 4 each)."""
    while control.guessing:
        control.step_done(drafted=3, accepted=0, seconds=0.003)
    while control.on:
        control.step_done(drafted=0, accepted=0, seconds=0.001)


def test_a_draft_model_that_keeps_losing_rests_for_growing_stretches_of_answers():
    record = DraftRecord(losses=3, first_rest=2, longest_rest=4)
    for _ in range(3):
        control = answer_control(8, record)
        assert control.guessing and control.probe_plain_steps
        losing_answer(control)
        assert control.stats.switched_off
    for _ in range(2):                                   # three losses in a row: the next two answers rest
        control = answer_control(8, record)
        assert not control.guessing and control.stats.resting and control.stats.shown
        control.step_done(drafted=0, accepted=0, seconds=0.001)
        assert "slower in the last answers" in control.stats.line() and not control.stats.switched_off
    losing_answer(answer_control(8, record))             # the next one looks again and loses: twice as long a rest
    assert [answer_control(8, record).stats.resting for _ in range(5)] == [True] * 4 + [False]
    losing_answer(answer_control(8, record))             # (at most longest_rest)
    assert record.resting == 4
    record.resting = 0
    paying = answer_control(8, record)
    while paying.guessing:                               # 5 tokens in 2 ms against 1 ms a token: it pays
        paying.step_done(drafted=4, accepted=4, seconds=0.002)
    for _ in range(4):
        paying.step_done(drafted=0, accepted=0, seconds=0.001)
    assert paying.on and record.lost_in_a_row == 0 and record.rest == 0
    losing_answer(answer_control(8, record))             # one loss after a paying answer: no rest yet
    assert answer_control(8, record).guessing
    assert answer_control(8, None).record is None and not answer_control(8, None).probe_plain_steps  # prompt lookup


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


def test_a_draft_model_guesses_and_the_answer_stays_decodings(pair):
    """--draft_model: a second llama.cpp model's greedy tokens are the guesses (here the built-in model drafting for
    itself: nearly every guess is kept), checked as prompt lookup's are; its cache follows the text, so a second
    answer drafts from where the first left it."""
    from quantchat.packaged_models import assemble
    asked = [{"role": "user", "content": REWRITE}]
    model = loaders.load(loaders.plan(settings(f"--draft_model={assemble()}", "--max_seq_len=2048")))
    try:
        assert model.draft is not None
        engine = build_engine(settings("--max_new_tokens=64"), model)
        for _ in range(2):
            reply = engine.chat(asked, engine.params(temperature=0))
            assert reply.finish() == pair[False].chat(asked, pair[False].params(temperature=0)).finish()
            spec = reply.stats.speculation
            assert spec.accepted > 2 * spec.steps and spec.drafted < 2 * spec.accepted, spec
        for _ in range(3):  # three answers in a row found the draft slower: the next one does without it
            model.draft_record.judged(paying=False)
        reply = engine.chat(asked, engine.params(temperature=0))
        assert reply.finish() == pair[False].chat(asked, pair[False].params(temperature=0)).finish()
        assert reply.stats.speculation.resting and not reply.stats.speculation.drafted
        assert "no guesses: the draft model was slower" in reply.stats.line()
    finally:
        model.close()


def test_a_draft_model_with_another_vocabulary_is_refused(gemma_gguf):
    with pytest.raises(UserError, match="another vocabulary") as refused:
        loaders.load(loaders.plan(settings(f"--draft_model={gemma_gguf}", "--max_seq_len=512")))
    assert "\n" not in str(refused.value) and "same family" in str(refused.value)


def test_a_draft_model_is_refused_where_it_cannot_serve(tmp_path, tiny_llama, gemma_gguf, gemma_hf):
    with pytest.raises(UserError, match="not a GGUF file here"):      # a GGUF base model takes a GGUF draft
        loaders.plan(settings(f"--draft_model={tmp_path / 'missing.gguf'}"))
    with pytest.raises(UsageError, match="is a GGUF file"):           # and a Hugging Face one a folder
        loaders.plan(settings(f"--base_model={tiny_llama}", f"--draft_model={gemma_gguf}"))
    with pytest.raises(UsageError, match="--fast_decode=False turns it off"):
        loaders.plan(settings(f"--base_model={tiny_llama}", f"--draft_model={tiny_llama}", "--fast_decode=False"))
    with pytest.raises(UsageError, match="off by default without one GPU"):  # (not loaded only to sit unused)
        loaders.plan(settings(f"--base_model={tiny_llama}", f"--draft_model={tiny_llama}"), Machine())
    with pytest.raises(UserError, match="another vocabulary") as refused:
        loaders.load(loaders.plan(settings(f"--base_model={gemma_hf}", f"--draft_model={tiny_llama}",
                                           "--fast_decode=True")))
    assert "\n" not in str(refused.value)


def test_a_draft_model_on_the_fast_path_keeps_generates_greedy_tokens(gemma_hf):
    """The fast path with --draft_model (Gemma 3 drafting for itself, fp32 on the CPU): the guesses are the draft's
    greedy tokens, nearly all kept, and the answer is generate's; the draft's cache follows the text from answer to
    answer."""
    fast = load(gemma_hf, "--fast_decode=True", f"--draft_model={gemma_hf}")
    slow = load(gemma_hf)
    try:
        assert fast.fast.draft is not None
        for prompt in [CODE, "Water boils at", "Water boils at"]:
            asked = GenParams(max_new_tokens=40)
            assert "".join(fast.stream(prompt, asked, threading.Event())) == answer(slow, prompt, max_new_tokens=40)
            spec = asked.report.speculation
            assert spec.accepted > 2 * spec.steps and spec.drafted < 2 * spec.accepted, spec
        for _ in range(3):  # three answers in a row found the draft slower: the next one does without it
            fast.fast.draft_record.judged(paying=False)
        asked = GenParams(max_new_tokens=40)
        assert "".join(fast.stream(CODE, asked, threading.Event())) == answer(slow, CODE, max_new_tokens=40)
        assert asked.report.speculation.resting and not asked.report.speculation.drafted
    finally:
        fast.close()
        slow.close()


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
        assert metrics["quantchat_speculative_resting_answers_total"] == 0  # (prompt lookup never rests)
    finally:
        server.uvicorn.should_exit = True


CODE = ("Rename total to subtotal in this function:\n\ndef price(items):\n    total = 0\n    for item in items:\n"
        "        total += item.price * item.count\n    return total\n\nAnswer:\n\ndef price(items):\n")


@pytest.mark.parametrize("params, copies", [
    ({"max_new_tokens": 48}, True),  # h2oGPT's repetition penalty 1.07
    ({"max_new_tokens": 40, "min_new_tokens": 40, "repetition_penalty": 1.3}, False)])  # (a penalty that big: no copy)
def test_the_fast_path_speculates_with_generates_greedy_tokens(gemma_hf, params, copies):
    """Guesses checked several to a step give generate's greedy answer (the repetition penalty and min_new_tokens
    applied per checked position), with several guesses kept a step on prompts the answer copies from."""
    fast, slow = load(gemma_hf, "--fast_decode=True"), load(gemma_hf)
    try:
        for prompt in [CODE, REWRITE, "Water boils at"]:
            expected = answer(slow, prompt, **params)
            asked = GenParams(**params)
            assert "".join(fast.stream(prompt, asked, threading.Event())) == expected
            if prompt == CODE and copies:
                spec = asked.report.speculation
                assert spec.steps and spec.accepted > spec.steps, spec
    finally:
        fast.close()
        slow.close()


def test_the_compiled_verify_step_pads_guesses_to_one_width_under_one_compilation(tiny_llama):
    """Compiled (here on the CPU; captured on CUDA), the verify step has one width whatever the guesses, and one
    compilation serves every attention window; the tokens stay generate's."""
    from torch._dynamo.utils import counters

    from quantchat.loaders.hf.fast_decode import FastDecoder
    model = load(tiny_llama, "--max_seq_len=2048")
    try:
        fast = FastDecoder(model.model, model.eos_ids, 1024, compile=True, speculative_tokens=4)
        fast.warm_up()  # compiles both steps
        compiled = counters["stats"]["unique_graphs"]
        ids = model._encode("one two three four five six seven " * 20)
        params = GenParams(max_new_tokens=350, min_new_tokens=350, repetition_penalty=1.0)  # windows 256, 512, 1024
        assert ids.shape[1] < 256 < 512 < ids.shape[1] + 350
        tokens = list(fast.tokens(ids, params, threading.Event()))
        assert counters["stats"]["unique_graphs"] == compiled
        assert tokens == list(model._generate(ids, params, threading.Event()))
        assert params.report.speculation.accepted > params.report.speculation.steps > 0
    finally:
        model.close()


def test_sampled_speculation_keeps_the_distribution(tiny_llama, monkeypatch):
    """With sampling, a guess stands where the sampler, drawing at its position, draws it: the answer's tokens keep
    decoding's distribution. Here every step guesses the greedy answer's tokens at the positions guessed; how often
    the sampled answers hold them must match decoding's share (a rule that kept guesses more easily would raise it)."""
    import math

    from quantchat.speculative import PromptLookup
    fast = load(tiny_llama, "--fast_decode=True", "--num_speculative_tokens=2")
    plain = load(tiny_llama, "--fast_decode=True", "--speculative=False")
    prompt, runs = "The quick brown fox", 400
    params = GenParams(max_new_tokens=4, do_sample=True, temperature=1.0, top_k=3, top_p=0.95, repetition_penalty=1.0)
    ids = fast._encode(prompt)
    greedy = list(plain.fast.tokens(ids, GenParams(max_new_tokens=8, repetition_penalty=1.0), threading.Event()))
    monkeypatch.setattr(PromptLookup, "draft", lambda self, k: greedy[len(self.tokens) - ids.shape[1]:][:k])
    try:
        shares, checked = [], 0
        for model in (fast, plain):
            hits = 0
            for seed in range(runs):
                model.torch.manual_seed(seed)
                tokens = list(model.fast.tokens(ids, params, threading.Event()))
                hits += sum(a == b for a, b in zip(tokens[1:], greedy[1:4], strict=False))
                checked += params.report.speculation.drafted if params.report.speculation else 0
            shares.append(hits / (3 * runs))
        assert checked >= runs  # (every answer checked guesses)
        pooled = sum(shares) / 2
        z = abs(shares[0] - shares[1]) / math.sqrt(pooled * (1 - pooled) * 2 / (3 * runs))
        assert 0.05 < pooled < 0.95 and z < 4, (shares, z)
    finally:
        fast.close()
        plain.close()


def test_checked_rows_choose_what_one_row_a_step_would():
    """choose_token over a verify step's rows: row i counts the tokens up to the step's i-th as seen (repetition
    penalty) and may end the answer only from min_new_tokens on, as one row a step does."""
    import torch

    from quantchat.loaders.hf.sampling import choose_token, seen_after_each
    torch.manual_seed(0)
    vocab, eos = 50, torch.tensor([7])
    logits = torch.randn(5, vocab)
    logits[:, 7] = 10.0   # the end token leads every row
    logits[2, 11] = 9.0   # row 2: a token seen by then (the step's token 1), which the penalty lowers
    inputs = torch.tensor([3, 11, 4, 5, 6])
    seen = torch.zeros(vocab, dtype=torch.bool)
    seen[[1, 2]] = True
    params = GenParams(repetition_penalty=3.0, min_new_tokens=7)
    rows = choose_token(logits, seen_after_each(seen, inputs), eos, params, step=4).tolist()
    one_by_one = []
    for i in range(5):
        seen_i = seen.clone()
        seen_i[inputs[: i + 1]] = True
        one_by_one += choose_token(logits[i:i + 1], seen_i, eos, params, step=4 + i).tolist()
    assert rows == one_by_one
    assert rows[3:] == [7, 7] and 7 not in rows[:3]   # tokens 7 and 8 may end the answer, 4-6 may not
