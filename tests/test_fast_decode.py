"""The static-cache decode loop (loaders/fast_decode.py) on the CPU: the same tokens as generate.

On CUDA the same loop runs with the step compiled into a CUDA graph; tests/test_gpu_hf.py checks that there.
"""
import threading
from pathlib import Path

import pytest
from test_settings import settings

from quantchat import loaders
from quantchat.loaders.base import GenParams


def load(model, *flags):
    return loaders.load(loaders.plan(settings(f"--base_model={model}", *flags)))


def answer(model, prompt, **params):
    return "".join(model.stream(prompt, GenParams(**params), threading.Event()))


@pytest.fixture(scope="module")
def tiny_pair(tiny_llama):
    fast, slow = load(tiny_llama, "--fast_decode=True"), load(tiny_llama)
    assert fast.fast is not None and slow.fast is None
    yield fast, slow
    fast.close()
    slow.close()


@pytest.mark.parametrize("params", [
    {"max_new_tokens": 64},                                   # h2oGPT's default repetition penalty 1.07
    {"max_new_tokens": 64, "repetition_penalty": 1.0},
    {"max_new_tokens": 40, "repetition_penalty": 1.3, "min_new_tokens": 40},
])
def test_greedy_tokens_equal_generate_on_the_tiny_llama(tiny_pair, params):
    fast, slow = tiny_pair
    for prompt in ["The quick brown fox", "Hello, how are you today?", "Numbers: one two"]:
        assert answer(fast, prompt, **params) == answer(slow, prompt, **params)


def test_greedy_tokens_equal_generate_on_gemma(gemma_hf):
    fast, slow = load(gemma_hf, "--fast_decode=True"), load(gemma_hf)
    try:
        for prompt in ["Water boils at", "The three primary colours are", "def fibonacci(n):"]:
            expected = answer(slow, prompt, max_new_tokens=48)
            assert len(expected) > 20
            assert answer(fast, prompt, max_new_tokens=48) == expected
    finally:
        fast.close()
        slow.close()


def test_sampling_is_seeded_and_top_k_1_is_greedy(tiny_pair):
    fast, _ = tiny_pair
    sampled = {"max_new_tokens": 24, "do_sample": True, "temperature": 1.5, "top_p": 0.95, "top_k": 50, "seed": 7}
    assert answer(fast, "Hello", **sampled) == answer(fast, "Hello", **sampled)
    assert answer(fast, "Hello", **{**sampled, "seed": 8}) != answer(fast, "Hello", **sampled)
    assert answer(fast, "Hello", **{**sampled, "top_k": 1}) == answer(fast, "Hello", max_new_tokens=24)


def test_token_choice_matches_transformers_processors():
    import torch
    from transformers import RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    from quantchat.loaders.hf.sampling import choose_token
    torch.manual_seed(0)
    logits = torch.randn(1, 300) * 0.3
    history = torch.tensor([[5, 17, 17, 250]])
    seen = torch.zeros(300, dtype=torch.bool)
    seen[history[0]] = True
    expected = RepetitionPenaltyLogitsProcessor(1.2)(history, logits.clone())
    for warper in (TemperatureLogitsWarper(0.7), TopKLogitsWarper(40), TopPLogitsWarper(0.8)):
        expected = warper(history, expected)
    params = GenParams(do_sample=True, repetition_penalty=1.2, temperature=0.7, top_k=40, top_p=0.8)
    allowed = torch.isfinite(expected[0])
    draws = {int(choose_token(logits, seen, torch.tensor([0]), params, 5)) for _ in range(400)}
    assert draws <= set(torch.nonzero(allowed).view(-1).tolist())     # never outside what transformers keeps
    assert 1 < len(draws) and allowed.sum() < 300 * 0.8   # both cut the tail, and sampling spreads
    greedy = choose_token(logits, seen, torch.tensor([0]), GenParams(repetition_penalty=1.2), 0)
    assert int(greedy) == int(RepetitionPenaltyLogitsProcessor(1.2)(history, logits.clone()).argmax())


def test_cancel_and_early_close_free_the_decoder(tiny_pair):
    fast, _ = tiny_pair
    cancel = threading.Event()
    pieces = []
    for piece in fast.stream("Hello", GenParams(max_new_tokens=200, repetition_penalty=1.0), cancel):
        pieces.append(piece)
        if len(pieces) == 3:
            cancel.set()
    assert 3 <= len(pieces) <= 4
    stream = fast.stream("Hello", GenParams(max_new_tokens=200), threading.Event())
    next(stream)
    stream.close()                                              # a client gone mid-answer
    assert answer(fast, "The quick brown fox", max_new_tokens=8)  # the next request is served


def test_long_requests_fall_back_to_generate(tiny_llama):
    model = load(tiny_llama, "--fast_decode=True", "--max_seq_len=64")
    try:
        assert model.fast.cache_tokens == 64
        assert model.fast.fits(10, GenParams(max_new_tokens=54)) and not model.fast.fits(10, GenParams(max_new_tokens=55))
        assert not model.fast.fits(10, GenParams(max_new_tokens=8, num_beams=2))
        assert answer(model, "Hello", max_new_tokens=60)   # served by generate instead
    finally:
        model.close()


def test_fast_decode_is_off_on_the_cpu_unless_asked(tiny_llama):
    assert loaders.plan(settings(f"--base_model={tiny_llama}")).options.fast_decode is False
    assert loaders.plan(settings(f"--base_model={tiny_llama}", "--fast_decode=True")).options.fast_decode is True


def test_sliding_window_layers_keep_their_window(tmp_path, tiny_llama):
    """A Gemma 3 with an 8-token window: 40 tokens past it, the full-length static cache answers as generate does."""
    import shutil

    import torch
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig
    folder = tmp_path / "tiny-gemma"
    folder.mkdir()
    for f in tiny_llama.glob("tokenizer*"):
        shutil.copy(f, folder)
    config = Gemma3TextConfig(vocab_size=400, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                              num_attention_heads=4, num_key_value_heads=1, head_dim=16, sliding_window=8,
                              layer_types=["sliding_attention", "sliding_attention", "sliding_attention",
                                           "full_attention"], max_position_embeddings=256, bos_token_id=1,
                              eos_token_id=2, pad_token_id=2)
    torch.manual_seed(1)
    Gemma3ForCausalLM(config).save_pretrained(folder)
    fast, slow = load(folder, "--fast_decode=True"), load(folder)
    try:
        for prompt in ["The quick brown fox jumps over the lazy dog.", "Hello"]:
            expected = answer(slow, prompt, max_new_tokens=40, repetition_penalty=1.0)
            assert answer(fast, prompt, max_new_tokens=40, repetition_penalty=1.0) == expected
    finally:
        fast.close()
        slow.close()


def test_fast_decode_default_on_one_gpu_except_int8(tiny_llama):
    from quantchat.machine import GPU, Machine
    gpu = GPU(0, "a GPU", 80 * 2**30, 80 * 2**30, True)
    one, two = Machine(gpus=(gpu,)), Machine(gpus=(gpu, GPU(1, "another", 80 * 2**30, 80 * 2**30, True)))

    def fast_decode(*flags, machine=one):
        return loaders.plan(settings(f"--base_model={tiny_llama}", *flags), machine).options.fast_decode
    assert fast_decode() is True and fast_decode("--load_4bit") is True
    assert fast_decode("--load_8bit") is False and fast_decode("--load_8bit", "--fast_decode=True") is True
    assert fast_decode("--use_gpu_id=False", machine=two) is False


def test_a_compiled_step_broken_into_pieces_still_gives_generates_tokens(tiny_llama):
    """Layers the compiler cannot trace (gptqmodel's Marlin, bitsandbytes) split the compiled step into pieces with
    Python between them; decoding through the pieces must stay exact (on CUDA they are then captured as one graph:
    tests/test_gpu_hf.py). Compiled here on the CPU."""
    import torch

    from quantchat.loaders.hf.fast_decode import FastDecoder
    model = load(tiny_llama)
    hook = model.model.model.layers[0].register_forward_pre_hook(lambda *_: torch._dynamo.graph_break())
    try:
        torch._dynamo.reset()  # compile afresh: the compiler's cache would not notice the hook
        fast = FastDecoder(model.model, model.eos_ids, 64, compile=True)
        fast.warm_up()
        ids = model._encode("The quick brown fox")
        params = GenParams(max_new_tokens=12, min_new_tokens=12, repetition_penalty=1.0)
        assert list(fast.tokens(ids, params, threading.Event())) == list(model._generate(ids, params, threading.Event()))
        assert not fast.graphs  # no CUDA graphs on the CPU
    finally:
        hook.remove()
        model.close()


def test_attention_windows_grow_with_the_sequence_under_one_compilation(tiny_llama):
    """Attention reads the static cache up to the smallest window (256, 512, ...) that holds the sequence; a request
    that crosses windows gives generate's tokens, and the compiled step serves every window without recompiling."""
    from torch._dynamo.utils import counters

    from quantchat.loaders.hf.fast_decode import FastDecoder
    from quantchat.loaders.hf.static_cache import window_lengths
    assert window_lengths(1000) == [256, 512, 1000] and window_lengths(64) == [64]
    model = load(tiny_llama, "--max_seq_len=2048")
    try:
        fast = FastDecoder(model.model, model.eos_ids, 1024, compile=True)
        ids = model._encode("The quick brown fox " * 60)
        assert 256 < ids.shape[1] < 512
        list(fast.tokens(ids, GenParams(max_new_tokens=4), threading.Event()))  # compiles, window 512
        compiled = counters["stats"]["unique_graphs"]
        params = GenParams(max_new_tokens=400, min_new_tokens=400, repetition_penalty=1.0)
        tokens = list(fast.tokens(ids, params, threading.Event()))  # windows 512, then 1024
        assert counters["stats"]["unique_graphs"] == compiled
        assert tokens == list(model._generate(ids, params, threading.Event()))
    finally:
        model.close()


@pytest.mark.parametrize("warm_up_fails", [False, True])
def test_generate_answers_while_the_fast_path_warms_up(tiny_llama, monkeypatch, warm_up_fails):
    """On CUDA the fast path compiles in the background: requests before it is ready are answered by generate, the
    later ones by the fast path; a warm-up that fails leaves generate answering, with the reason shown."""
    from quantchat.loaders.hf import model as hf_model
    from quantchat.loaders.hf.fast_decode import FastDecoder
    gate = threading.Event()
    warm_up = FastDecoder.warm_up

    def slow_warm_up(self):
        gate.wait()
        if warm_up_fails:
            raise RuntimeError("the compiler gave up")
        warm_up(self)
    monkeypatch.setattr(hf_model, "_warm_up_in_background", lambda device: True)
    monkeypatch.setattr(FastDecoder, "warm_up", slow_warm_up)
    slow = load(tiny_llama)
    model = load(tiny_llama, "--fast_decode=True")
    try:
        expected = answer(slow, "The quick brown fox", max_new_tokens=24)
        assert model.fast is None and "compiling" in model.info.decode
        assert answer(model, "The quick brown fox", max_new_tokens=24) == expected
        gate.set()
        assert model.wait_for_fast_decode(timeout=60) is not warm_up_fails
        assert model.fast_ready.is_set()
        if warm_up_fails:
            assert "the compiler gave up" in model.info.decode
        else:
            assert model.info.decode == "static cache"
        assert answer(model, "The quick brown fox", max_new_tokens=24) == expected
    finally:
        gate.set()
        model.close()
        slow.close()


def test_closing_during_the_warm_up_returns_at_once(tiny_llama, monkeypatch):
    """Ctrl-C during the background compilation must not wait for it; the finished warm-up is then dropped."""
    from quantchat.loaders.hf import model as hf_model
    from quantchat.loaders.hf.fast_decode import FastDecoder
    gate = threading.Event()
    warm_up = FastDecoder.warm_up
    monkeypatch.setattr(hf_model, "_warm_up_in_background", lambda device: True)
    monkeypatch.setattr(FastDecoder, "warm_up", lambda self: (gate.wait(), warm_up(self)))
    model = load(tiny_llama, "--fast_decode=True")
    closing = threading.Thread(target=model.close)
    closing.start()
    closing.join(timeout=10)
    assert not closing.is_alive()
    gate.set()
    assert model.wait_for_fast_decode(timeout=60) is False and model.fast is None


@pytest.mark.parametrize("device, captured_with_cudnn", [("cuda", True), ("cpu", False)])
def test_the_captured_step_alone_gets_cudnn_attention(device, captured_with_cudnn):
    """The Hugging Face backend leaves cuDNN out of attention (a plan per new length); the decode step, compiled and
    captured once per window at warm-up, takes it back for that time only. The switch itself works without a GPU."""
    import types

    import torch

    from quantchat.loaders.hf.fast_decode import FastDecoder
    decoder = types.SimpleNamespace(torch=torch, device=torch.device(device), CUDNN_DECODE_ATTENTION=True)
    before = torch.backends.cuda.cudnn_sdp_enabled()
    torch.backends.cuda.enable_cudnn_sdp(False)
    try:
        with FastDecoder._decode_attention(decoder):
            assert torch.backends.cuda.cudnn_sdp_enabled() is captured_with_cudnn
        assert torch.backends.cuda.cudnn_sdp_enabled() is False  # the process's setting again
        decoder.CUDNN_DECODE_ATTENTION = False  # bench/ablation.py's no-cudnn-decode
        with FastDecoder._decode_attention(decoder):
            assert torch.backends.cuda.cudnn_sdp_enabled() is False
    finally:
        torch.backends.cuda.enable_cudnn_sdp(before)


WATER = "Water is a chemical compound of hydrogen and oxygen. " * 12


def conversation(model, turns: list[str], system: str = WATER, **flags) -> tuple[list[str], list[int]]:
    """Greedy answers to a chat of `turns` user messages, and the prompt tokens each answer reused."""
    from quantchat.assembly import build_engine
    engine = build_engine(settings("--max_new_tokens=24", "--temperature=0", *[f"--{k}={v}" for k, v in flags.items()]),
                          model)
    history = [{"role": "system", "content": system}]
    answers, reused = [], []
    for turn in turns:
        history.append({"role": "user", "content": turn})
        reply = engine.chat(history)
        answers.append(reply.finish())
        reused.append(reply.stats.reused_tokens or 0)
        history.append({"role": "assistant", "content": answers[-1]})
    return answers, reused


TURNS = ["What is water made of?", "Why is it wet?", "Say it in five words."]


@pytest.mark.parametrize("prompt_step", [0, 48])
def test_the_fast_path_continues_a_conversation_from_its_cache(gemma_hf, prompt_step, monkeypatch):
    """--prefix_cache: a follow-up turn prefills only what the static cache does not hold, with the same answers
    (Gemma 3's real weights, fp32 on the CPU; the positions past the reused prefix are cleared, not left over). The
    rest goes eagerly, or (as on CUDA) through the prompt step, padded to its width."""
    from quantchat.loaders.hf.fast_decode import FastDecoder
    fresh = load(gemma_hf, "--fast_decode=True", "--prefix_cache=False")
    answers, reused = conversation(fresh, TURNS, prompt_type="gemma")
    fresh.close()
    cached = load(gemma_hf, "--fast_decode=True")
    cached.fast = FastDecoder(cached.model, cached.eos_ids, cached.fast.cache_tokens, compile=False,
                              prompt_step_tokens=prompt_step)
    stepped, step = [], cached.fast._prompt_logits
    monkeypatch.setattr(cached.fast, "_prompt_logits", lambda tokens, at, **kw: stepped.append(len(tokens)) or
                        step(tokens, at, **kw))
    again, reused_again = conversation(cached, TURNS, prompt_type="gemma")
    assert again == answers and reused == [0, 0, 0]
    assert reused_again[0] == 0 and all(n > 150 for n in reused_again[1:]), reused_again
    # the first turn's prompt is longer than the step; each follow-up's rest is not
    assert len(stepped) == (2 if prompt_step else 0) and all(n <= prompt_step for n in stepped), stepped
    other, other_reused = conversation(cached, ["Hello"], system="Be brief.", prompt_type="gemma")
    assert other_reused[0] < 8     # another conversation shares only the template's opening tokens
    cached.close()


def test_logits_after_a_differently_split_prefill_stay_close_in_bf16(gemma_hf):
    """Where reuse cannot keep answers bit-identical (half precision: a token's row rounds one way prefilled among
    others, another decoded alone), the logits after a history whose answer was decoded a token at a time and whose
    rest was prefilled stay within rounding of the prompt evaluated whole, and the greedy choices agree except near
    ties (how often answers then differ: docs/benchmarks.md, bench/prefix_cache.py --models=gemma-hf-bf16)."""
    import torch

    from quantchat.loaders.base import GenerationReport
    model = load(gemma_hf, "--fast_decode=True", "--load_half=True")
    fast = model.fast
    assert model.model.dtype == torch.bfloat16
    text = (Path(__file__).parent.parent / "quantchat" / "data" / "calibration.txt").read_text()[:1200]
    tokens = model.tokenizer(text)["input_ids"]
    ids, answer_from, rest = torch.tensor([tokens]), len(tokens) // 2, 6
    with torch.inference_mode():
        fast.cached = []
        whole = fast._prefill(ids, tokens, GenerationReport())[-1]
        fast.cached = []
        fast._prefill(ids[:, :answer_from], tokens[:answer_from], GenerationReport())
        for position in range(answer_from, len(tokens) - rest):  # an answer, fed back a token at a time
            fast._next_logits(torch.tensor([tokens[position]]), torch.tensor([position]), position + 1)
        fast.cached = tokens[:-rest]
        report = GenerationReport()
        split = fast._prefill(ids, tokens, report)[-1]
    model.close()
    assert report.reused_tokens == len(tokens) - rest and len(tokens) > 200
    scale = whole.abs().max()
    assert scale > 1
    assert (whole - split).abs().max() < 0.05 * scale, ((whole - split).abs().max(), scale)
    top = whole.topk(2).values
    assert whole.argmax() == split.argmax() or top[0] - top[1] < 0.05 * scale


def test_generate_continues_a_conversation_from_its_cache(tiny_llama):
    """The generate path keeps the last answer's DynamicCache and cuts it back to the shared prefix."""
    answers, reused = conversation(load(tiny_llama, "--prefix_cache=False"), TURNS)
    model = load(tiny_llama)
    assert model.fast is None
    again, reused_again = conversation(model, TURNS)
    assert again == answers and reused == [0, 0, 0] and all(n > 100 for n in reused_again[1:]), reused_again


@pytest.mark.parametrize("step", ["verify", "prompt"])
def test_a_wide_step_the_compiler_fails_on_is_turned_off_and_the_fast_path_stays(tiny_llama, step, monkeypatch,
                                                                                 capsys):
    """A verify or prompt step that fails to compile (as a 64-wide prompt step once did on an H200) turns itself
    off at warm-up with a warning; the one-token step stays, with generate's tokens."""
    from quantchat.loaders.hf.fast_decode import FastDecoder

    def fails(self, *args):
        raise RuntimeError("NoValidChoicesError: No choices to select")
    monkeypatch.setattr(FastDecoder, f"_forward_{'many' if step == 'verify' else step}", fails)
    model = load(tiny_llama, "--fast_decode=False")
    try:
        fast = FastDecoder(model.model, model.eos_ids, 256, compile=False, speculative_tokens=4, prompt_step_tokens=16)
        fast.warm_up()
        assert getattr(fast, f"{step}_width") == 0
        assert f"the {step} step failed to compile (RuntimeError: NoValidChoicesError" in capsys.readouterr().err
        ids = model._encode("one two three four five six seven " * 4)
        params = GenParams(max_new_tokens=40, repetition_penalty=1.0)
        assert list(fast.tokens(ids, params, threading.Event())) == list(model._generate(ids, params,
                                                                                         threading.Event()))
    finally:
        model.close()


@pytest.mark.parametrize("step", ["verify", "prompt"])
def test_a_wide_step_that_fails_to_capture_in_a_window_runs_uncaptured_there(tiny_llama, monkeypatch, capsys, step):
    """A verify or prompt step whose CUDA graph cannot be recorded in a window (a host sync in it, a kernel that will
    not be captured) runs uncaptured there, with a warning naming the window, and is replayed in the others; every
    other step is captured in every window. A one-token step that cannot be captured is the fast path's failure.
    (The recording itself is CUDA's: here it stands in.)"""
    from quantchat.loaders.hf.fast_decode import FastDecoder
    model = load(tiny_llama, "--fast_decode=False")
    try:
        fast = FastDecoder(model.model, model.eos_ids, 512, compile=False, speculative_tokens=4, prompt_step_tokens=16)
        failing, failed = getattr(fast, f"_{step}"), []

        def captured(forward, inputs):
            if forward == failing and not failed:  # (the first window, 256)
                failed.append(forward)
                raise RuntimeError("operation not permitted when stream is capturing")
            return "graph", forward(*inputs)
        monkeypatch.setattr(fast, "_captured", captured)
        fast._capture()
        other = "prompt" if step == "verify" else "verify"
        assert set(fast.graphs) == set(getattr(fast, f"{other}_graphs")) == set(fast.windows) == {256, 512}
        assert set(getattr(fast, f"{step}_graphs")) == {512} and getattr(fast, f"{step}_width")
        warning = (f"the {step} step failed to capture in the 256-position window (RuntimeError: operation not "
                   "permitted when stream is capturing): it runs uncaptured in that window")
        assert warning in capsys.readouterr().err
        monkeypatch.setattr(fast, "_captured", lambda forward, inputs: (_ for _ in ()).throw(RuntimeError("sync")))
        with pytest.raises(RuntimeError, match="sync"):
            fast._capture()
    finally:
        model.close()


def test_a_failed_answer_leaves_nothing_to_reuse(tiny_llama, monkeypatch):
    model = load(tiny_llama, "--fast_decode=True")
    conversation(model, TURNS[:1], system="Be brief.")
    assert model.fast.cached
    monkeypatch.setattr(model.fast, "_next_logits", lambda *a: (_ for _ in ()).throw(RuntimeError("broken step")))
    with pytest.raises(RuntimeError, match="broken step"):
        conversation(model, TURNS[:1], system="Be brief.")
    assert model.fast.cached == []


def test_flex_attention_in_a_verify_step_computes_what_sdpa_does(monkeypatch):
    """The compiled verify step's attention (several queries past the cache's start, grouped key/value heads, a
    causal mask, a sliding window) through flex attention equals SDPA's; what flex does not take goes to SDPA."""
    import types

    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from quantchat.loaders.hf import attention
    torch.manual_seed(0)
    module = types.SimpleNamespace(num_key_value_groups=4, is_causal=True, training=False)
    keys = torch.randn(1, 2, 512, 16, dtype=torch.bfloat16), torch.randn(1, 2, 512, 16, dtype=torch.bfloat16)
    positions = torch.arange(300, 309)[:, None]
    causal = torch.arange(512)[None, :] <= positions
    sliding = causal & (torch.arange(512)[None, :] > positions - 64)
    flex = attention._flex
    calls = []
    # groups of 4 and of 7 (Qwen2.5's 14 query heads over 2), whose heads flex takes packed as rows of one query
    for mask, heads in ((causal, 8), (sliding, 8), (causal, 14)):
        module.num_key_value_groups = heads // 2
        query = torch.randn(1, heads, 9, 16, dtype=torch.bfloat16)
        expected, _ = sdpa_attention_forward(module, query, *keys, mask[None, None], scaling=0.25)
        with monkeypatch.context() as m:
            m.setattr(attention, "_flex", lambda *args: calls.append(1) or flex(*args))
            got, _ = attention.attend(module, query, *keys, mask[None, None], True, scaling=0.25)
        assert got.shape == expected.shape and torch.allclose(got.float(), expected.float(), atol=2e-2), \
            (got - expected).abs().max()
    assert len(calls) == 3
    assert attention._flex_takes(query, keys[0], causal[None, None], 0.0, {})
    many = torch.randn(1, 16, 16, 16, dtype=torch.bfloat16)  # 8 heads a group x 16 queries: past flex's decoding kernel
    assert not attention._flex_takes(many, keys[0], torch.ones(1, 1, 16, 512, dtype=torch.bool), 0.0, {})
    assert not attention._flex_takes(query[:, :, :1], keys[0], causal[None, None, :1], 0.0, {})  # one query
    wide = torch.randn(1, 8, attention.FLEX_QUERIES_MOST + 1, 16, dtype=torch.bfloat16)  # (a prompt step)
    assert not attention._flex_takes(wide, keys[0], torch.ones(1, 1, wide.shape[2], 512, dtype=torch.bool), 0.0, {})
    assert not attention._flex_takes(query, keys[0][:, :, :500], causal[None, None, :, :500], 0.0, {})  # part block
    assert not attention._flex_takes(query, keys[0], causal[None, None], 0.0, {"softcap": 30.0})
    assert not attention._flex_takes(query, keys[0], None, 0.0, {})  # SDPA's own causal rule
    assert not attention._flex_takes(query.float(), keys[0].float(), causal[None, None], 0.0, {})  # fp32


@pytest.mark.parametrize("packed", [True, False])
def test_attention_split_over_chunks_of_keys_sums_to_the_attention_over_the_window(packed, monkeypatch):
    """A prompt step's attention split into KEY_CHUNKS chunks of the window (each chunk's output and log-sum-exp, here
    from a plain computation on the CPU; cuDNN's on the GPU tests) equals SDPA over the whole window: groups of 4 and
    7 (their heads packed into the query rows or not), a causal mask and a sliding window, chunks past the sequence
    that no query may see."""
    import torch
    from transformers.integrations.sdpa_attention import repeat_kv

    from quantchat.loaders.hf import attention
    monkeypatch.setattr(attention, "SPLIT_PACKED", packed)

    def plain_with_lse(query, key, value, bias, scaling):
        groups = query.shape[1] // key.shape[1]
        scores = query @ repeat_kv(key, groups).transpose(-1, -2) * scaling + bias
        return torch.softmax(scores, -1) @ repeat_kv(value, groups), torch.logsumexp(scores, -1, keepdim=True)
    torch.manual_seed(0)
    keys = torch.randn(1, 2, 512, 16), torch.randn(1, 2, 512, 16)
    positions = torch.arange(200, 264)[:, None]  # (the last three chunks of 64 lie past every query)
    causal = torch.arange(512)[None, :] <= positions
    for mask in (causal, causal & (torch.arange(512)[None, :] > positions - 100)):
        for heads in (8, 14):
            query = torch.randn(1, heads, 64, 16)
            expected = torch.nn.functional.scaled_dot_product_attention(
                query, *(repeat_kv(t, heads // 2) for t in keys), attn_mask=mask[None, None], scale=0.25)
            got = attention._split_sdpa(query, *keys, mask[None, None], 0.25, chunk_attention=plain_with_lse)
            assert got.shape == expected.transpose(1, 2).shape
            assert torch.allclose(got, expected.transpose(1, 2), atol=1e-5), (got - expected.transpose(1, 2)).abs().max()
    assert not attention._split_takes(query.bfloat16(), keys[0].bfloat16(), causal[None, None], 0.0, {})  # (CUDA only)


def test_grouped_heads_taken_or_packed_compute_what_sdpa_does_with_copied_keys(monkeypatch):
    """One query or a few per head, grouped key/value heads, a causal mask or a sliding window: SDPA taking the groups
    (compiled steps) and the groups packed into the query rows (eager calls) equal transformers' SDPA function,
    which copies keys and values per group; what neither takes goes there."""
    import types

    import torch
    from transformers.integrations.sdpa_attention import repeat_kv

    from quantchat.loaders.hf import attention
    torch.manual_seed(0)
    module = types.SimpleNamespace(num_key_value_groups=4, is_causal=True, training=False)
    keys = torch.randn(2, 2, 300, 16), torch.randn(2, 2, 300, 16)
    ways = {"taken": "_grouped_sdpa", "packed": "_packed_sdpa"}  # (taken by SDPA in compiled steps)
    for queries in (1, 9):
        positions = torch.arange(250, 250 + queries)[:, None]
        causal = torch.arange(300)[None, :] <= positions
        for mask in (causal, causal & (torch.arange(300)[None, :] > positions - 64)):
            query = torch.randn(2, 8, queries, 16)
            # (the reference copies keys and values per group, as transformers does wherever it is given a mask)
            expected = torch.nn.functional.scaled_dot_product_attention(
                query, *(repeat_kv(t, 4) for t in keys), attn_mask=mask[None, None], scale=0.25).transpose(1, 2)
            assert attention._grouped(query, keys[0], mask[None, None], 0.0, {})
            for way, function in ways.items():
                calls, call = [], getattr(attention, function)
                with monkeypatch.context() as m:
                    m.setattr(attention, "_cudnn_fits", lambda q: True)  # (cuDNN's dtypes: the GPU tests)
                    m.setattr(attention, function, lambda *a, calls=calls, call=call: calls.append(1) or call(*a))
                    got, _ = attention.attend(module, query, *keys, mask[None, None], way == "taken", scaling=0.25)
                assert calls == [1] and got.shape == expected.shape
                assert torch.allclose(got, expected, atol=1e-6), (way, (got - expected).abs().max())
    query = torch.randn(2, 8, 9, 16)
    assert not attention._grouped(query, keys[0], None, 0.0, {})  # no mask: transformers lets SDPA take the groups
    assert not attention._grouped(query, torch.cat(keys, 1).repeat(1, 4, 1, 1), causal[None, None], 0.0, {})  # no groups
    assert not attention._grouped(query, keys[0], causal[None, None], 0.1, {})  # dropout
    assert not attention._cudnn_fits(query) and attention._cudnn_fits(query.bfloat16())
    long_prompt = torch.randn(2, 8, 65, 16)  # 260 rows packed: transformers' function
    calls = []
    monkeypatch.setattr(attention, "_packed_sdpa", lambda *a: calls.append(1))
    attention.attend(module, long_prompt, *keys, torch.ones(1, 1, 65, 300, dtype=torch.bool), False)
    assert not calls


def test_a_model_switched_to_the_fast_paths_attention_answers_as_before(tiny_llama, monkeypatch):
    """The switch names the model's attention anew; generate and the compiled prompt and one-token steps (grouped
    heads packed; compiled here on the CPU) give the tokens they gave under SDPA."""
    import torch

    from quantchat.loaders.hf import attention
    from quantchat.loaders.hf.attention import NAME, use_fast_path_attention
    from quantchat.loaders.hf.fast_decode import FastDecoder
    packed, pack = [], attention._packed_sdpa  # (fp32 on the CPU: cuDNN's way is the GPU tests')
    monkeypatch.setattr(attention, "_packed_sdpa", lambda *a: packed.append(torch.compiler.is_compiling()) or pack(*a))
    model = loaders.load(loaders.plan(settings(f"--base_model={tiny_llama}", "--fast_decode=False")))
    try:
        ids = model._encode("The quick brown fox")
        params = GenParams(max_new_tokens=24, min_new_tokens=24, repetition_penalty=1.0)
        before = list(model._generate(ids, params, threading.Event()))
        assert use_fast_path_attention(model.model) and model.model.config._attn_implementation == NAME
        assert list(model._generate(ids, params, threading.Event())) == before
        # (the prompt through the compiled prompt step, as on CUDA)
        fast = FastDecoder(model.model, model.eos_ids, 64, compile=True, prompt_step_tokens=16)
        assert list(fast.tokens(ids, params, threading.Event())) == before
        assert True in packed  # (traced into the compiled steps)
        assert not use_fast_path_attention(model.model)  # (already switched: not SDPA by name any more)
    finally:
        model.close()
