"""The llama.cpp backend on the real Gemma 3 270M GGUF, and the same weights through transformers."""
import sys
import threading

import pytest
from test_settings import settings

from quantchat import loaders
from quantchat.assembly import build_engine
from quantchat.errors import UserError
from quantchat.loaders.base import GenParams

GREEDY = GenParams(max_new_tokens=12, do_sample=False, repetition_penalty=1.0)
PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def gemma(gemma_gguf):
    model = loaders.load(loaders.plan(settings(f"--base_model={gemma_gguf}", "--max_seq_len=512")))
    yield model
    model.close()


def test_a_gguf_loads_with_what_it_is(gemma):
    info = gemma.info
    assert info.backend.startswith("llama.cpp") and info.quantization == "GGUF Q4_K_M"
    assert info.context_length == 512 and info.chat_template is None and info.bos_token == "<bos>"


def test_load_says_how_many_layers_went_to_the_gpu(gemma_gguf, capfd):
    import llama_cpp
    model = loaders.load(loaders.plan(settings(f"--base_model={gemma_gguf}", "--max_seq_len=256")))
    model.close()
    on_gpu = 18 if llama_cpp.llama_supports_gpu_offload() else 0
    assert f"llama.cpp: {on_gpu} of 18 layers on the GPU" in capfd.readouterr().err


def test_greedy_is_repeatable_and_yields_one_item_per_token(gemma):
    first = list(gemma.stream(PROMPT, GREEDY, threading.Event()))
    second = list(gemma.stream(PROMPT, GREEDY, threading.Event()))
    assert first == second and len(first) == 12
    assert gemma.count_tokens("".join(first)) == pytest.approx(12, abs=2)


def test_cancel_stops_llamacpp(gemma):
    cancel = threading.Event()
    stream = gemma.stream(PROMPT, GenParams(max_new_tokens=200), cancel)
    next(stream)
    cancel.set()
    assert list(stream) == []


def test_engine_on_a_base_model_falls_back_to_plain_with_a_warning(gemma):
    engine = build_engine(settings("--max_new_tokens=8"), gemma)
    assert engine.prompter.source == "plain (fallback)"
    reply = engine.chat([{"role": "user", "content": PROMPT}])
    text = reply.finish()
    assert text and reply.stats.completion_tokens == 8 and reply.stats.finish_reason == "length"
    assert reply.stats.tokens_per_s and reply.stats.tokens_per_s > 1


def test_gemma_prompt_type_renders_the_turn_format(gemma):
    engine = build_engine(settings("--prompt_type=gemma", "--max_new_tokens=4"), gemma)
    engine.chat([{"role": "user", "content": "Hi"}]).finish()
    assert engine.model.count_tokens("<start_of_turn>") == 1  # a special token, not text


def test_prompt_longer_than_the_context_is_refused(gemma):
    engine = build_engine(settings("--max_new_tokens=8"), gemma)
    with pytest.raises(UserError, match="shorten it"):
        engine.chat([{"role": "user", "content": "word " * 600}])


def test_gpu_layers_on_a_cpu_build_are_warned_about(gemma_gguf):
    import llama_cpp
    if llama_cpp.llama_supports_gpu_offload():
        pytest.skip("this llama-cpp-python build has GPU support")
    plan = loaders.plan(settings("--n_gpu_layers=20"))
    assert plan.devices == "cpu" and any("no GPU support" in n for n in plan.notes)


def test_amx_builds_load_weights_into_plain_buffers_unless_asked(gemma_gguf, monkeypatch):
    """llama.cpp's AMX matmul crashed the process on a Sapphire Rapids CPU (llamacpp._extra_buffers): a build with
    AMX loads with use_extra_bufts off, with a note saying how to turn it on; --llamacpp_dict decides where given;
    llama.cpp's own defaults are back once the model is loaded."""
    import llama_cpp

    from quantchat.errors import UsageError
    from quantchat.loaders import llamacpp
    amx = llamacpp.amx_in_build()
    plan = loaders.plan(settings(f"--base_model={gemma_gguf}", "--max_seq_len=256"))
    assert plan.options.extra_buffers is not amx
    assert any("AMX kernels are off" in note for note in plan.notes) is amx
    for asked in (True, False):
        plan = loaders.plan(settings(f"--base_model={gemma_gguf}", f"--llamacpp_dict={{'use_extra_bufts': {asked}}}"))
        assert plan.options.extra_buffers is asked and "use_extra_bufts" not in plan.options.llama_kwargs
    with pytest.raises(UsageError, match="use_extra_bufts is True or False"):
        loaders.plan(settings(f"--base_model={gemma_gguf}", "--llamacpp_dict={'use_extra_bufts': 'no'}"))
    seen = []
    monkeypatch.setattr(llama_cpp, "Llama", lambda **kwargs: seen.append(
        llama_cpp.llama_cpp.llama_model_default_params().use_extra_bufts) or pytest.fail("loaded"))
    with pytest.raises(pytest.fail.Exception):
        llamacpp.LlamaCppModel(plan)  # (the last plan: use_extra_bufts False)
    assert seen == [False] and llama_cpp.llama_cpp.llama_model_default_params().use_extra_bufts


def test_missing_llama_cpp_names_the_install_command(monkeypatch, gemma_gguf):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)
    with pytest.raises(UserError, match=r"pip install -e \"\.\[llamacpp\]\""):
        loaders.plan(settings())


def test_same_gguf_in_both_backends_agrees_on_greedy_tokens(gemma, gemma_hf):
    """llama.cpp computes on the Q4_K_M blocks; transformers on the same weights dequantized to fp32.

    Where two candidates are nearly tied the backends may part ways later in an answer; the first tokens agree.
    """
    hf = loaders.load(loaders.plan(settings(f"--base_model={gemma_hf}")))
    prompts = [PROMPT, "Once upon a time", "def fibonacci(n):", "The three primary colors are", "Water boils at",
               "import numpy as np"]
    try:
        params = GenParams(max_new_tokens=12, do_sample=False, repetition_penalty=1.0)
        agreed = []
        for prompt in prompts:
            from_llamacpp = list(gemma.stream(prompt, params, threading.Event()))
            from_hf = list(hf.stream(prompt, params, threading.Event()))
            assert from_llamacpp[:4] == from_hf[:4], (prompt, from_llamacpp, from_hf)
            agreed.append(next((i for i, (a, b) in enumerate(zip(from_llamacpp, from_hf, strict=False)) if a != b), 12))
        assert sum(agreed) >= 0.75 * 12 * len(prompts), agreed
    finally:
        hf.close()


def test_a_gguf_model_never_imports_torch(gemma_gguf):
    """torch and a CUDA build of llama.cpp segfault in one process (docs/backends.md): keep them apart."""
    import subprocess
    code = ("import sys, threading; from quantchat import loaders; from quantchat.cli import parse_flags;"
            "from quantchat.settings import from_flags; from quantchat.loaders.base import GenParams;"
            "m = loaders.load(loaders.plan(from_flags(parse_flags(['--max_seq_len=256']))));"
            "list(m.stream('Hi', GenParams(max_new_tokens=2), threading.Event()));"
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == "False"


def test_the_command_line_loads_llama_cpp_before_numpy(gemma_gguf):
    """A CUDA build of llama.cpp segfaulted loading a model in a process that had imported numpy first
    (docs/backends.md): the terminal chat on a GGUF must load llama.cpp's library before numpy."""
    import subprocess
    code = ("import sys; from quantchat.cli import main;"
            "code = main(['--base_model=' + sys.argv[1], '--cli=True', '--max_seq_len=256']);"
            "names = list(sys.modules); print(code, names.index('llama_cpp.llama_cpp') < names.index('numpy'))")
    out = subprocess.run([sys.executable, "-c", code, gemma_gguf], input="", capture_output=True, text=True,
                         check=True, timeout=120)
    assert out.stdout.strip().splitlines()[-1].endswith("0 True"), out.stdout


def test_speed_bench_gguf_rows_on_a_tiny_shape(tmp_path, monkeypatch):
    """bench/decode.py's llama.cpp rows: the random GGUF is written, llama.cpp quantizes it, and the row is timed
    through quantchat's llama.cpp backend, its bytes per token read from the file (here a tiny shape)."""
    from bench import decode_gguf
    monkeypatch.setitem(decode_gguf.SHAPES, "tiny", {
        "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 512, "max_position_embeddings": 4096, "rope_theta": 10000.0})
    bandwidth = 1e3  # bytes/s: small, so that MBU keeps its digits and gives back the bytes read per token
    rows = {kind: decode_gguf.measure("tiny", kind, bandwidth, tmp_path) for kind in ("F16", "Q4_K_M")}
    for row in rows.values():
        assert "error" not in row, row
        assert row["decode_128_tokens_per_s"] > 0 and row["decode_512_tokens_per_s"] > 0
        assert 1900 <= row["prompt_tokens"] <= 2048 and 0 < row["ttft_2048_ms"] <= row["ttft_2048_first_ms"]
    assert "Q4_K" in rows["Q4_K_M"]["quantization"], rows["Q4_K_M"]["quantization"]
    read = {kind: row["mbu_128"] * bandwidth / row["decode_128_tokens_per_s"] for kind, row in rows.items()}
    # 4.5-5 bits against 16 for the layers: the quantized file reads well under half the bytes per token
    assert read["Q4_K_M"] < 0.5 * read["F16"], read


REFERENCE = " ".join(f"Fact {i}: the ferry number {i} leaves pier {i % 7} at {i % 12 + 1} o'clock." for i in range(50))


def test_a_follow_up_turn_continues_from_the_cached_history(gemma_gguf):
    """The second turn evaluates only what is new; a second conversation in between is swapped out and back in
    (its state saved in host memory) rather than evaluated again; /metrics shows the saved states' bytes."""
    import httpx
    from test_api import start
    model = loaders.load(loaders.plan(settings(f"--base_model={gemma_gguf}", "--max_seq_len=2048")))
    try:
        engine = build_engine(settings("--max_new_tokens=8", "--prompt_type=gemma"), model)
        first = [{"role": "user", "content": REFERENCE + "\n\nWhen does ferry 3 leave?"}]
        reply = engine.chat(first)
        first += [{"role": "assistant", "content": reply.finish()}, {"role": "user", "content": "And ferry 5?"}]
        assert not reply.stats.reused_tokens                              # nothing cached yet
        follow_up = engine.chat(first)
        follow_up.finish()
        assert follow_up.stats.reused_tokens > 0.9 * reply.stats.prompt_tokens
        assert f"{follow_up.stats.reused_tokens} of {follow_up.stats.prompt_tokens} prompt tokens reused" in \
            follow_up.stats.line()
        other = [{"role": "user", "content": REFERENCE.replace("ferry", "train") + "\n\nWhen does train 2 leave?"}]
        other_reply = engine.chat(other)
        other_reply.finish()
        assert not other_reply.stats.reused_tokens                        # another conversation: evaluated whole
        first += [{"role": "assistant", "content": follow_up.text}, {"role": "user", "content": "And ferry 6?"}]
        back = engine.chat(first)
        back.finish()
        assert back.stats.reused_tokens > 0.9 * follow_up.stats.prompt_tokens  # its saved state came back
        # a saved state is its KV cache: no copy of the vocabulary-wide score rows (622 MB each for Qwen2.5)
        assert model.states.cache_state and all(s.scores.shape[0] == 1 for s in model.states.cache_state.values())
        server, url = start(engine)  # /metrics shows what the saved states hold
        try:
            shown = next(float(line.split()[1]) for line in httpx.get(f"{url}/metrics").text.splitlines()
                         if line.startswith("quantchat_prefix_cache_bytes "))
            assert shown == sum(s.llama_state_size for s in model.states.cache_state.values()) > 0
        finally:
            server.uvicorn.should_exit = True
    finally:
        model.close()


def test_prefix_cache_off_evaluates_every_prompt_whole(gemma_gguf):
    model = loaders.load(loaders.plan(settings(f"--base_model={gemma_gguf}", "--max_seq_len=2048",
                                               "--prefix_cache=False")))
    try:
        engine = build_engine(settings("--max_new_tokens=4", "--prompt_type=gemma"), model)
        history = [{"role": "user", "content": REFERENCE + "\n\nWhen does ferry 3 leave?"}]
        for _ in range(2):
            reply = engine.chat(history)
            history += [{"role": "assistant", "content": reply.finish()}, {"role": "user", "content": "And 4?"}]
            assert not reply.stats.reused_tokens
    finally:
        model.close()


def test_logits_after_a_differently_split_prefill_stay_close(gemma):
    """What reuse changes: a history evaluated in other batches (the answer one token at a time, as it was
    generated) gives logits within float rounding of one evaluated whole; greedy choices agree except near ties."""
    import numpy as np
    llm = gemma.llm

    def last_logits():
        return np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),)).copy()
    tokens = gemma.tokenize(PROMPT + " Paris. It is known for the Eiffel Tower and the Louvre museum, and")
    llm.reset()
    llm.eval(tokens)
    whole = last_logits()
    llm.reset()
    llm.eval(tokens[:6])
    for token in tokens[6:-4]:
        llm.eval([token])
    llm.eval(tokens[-4:])
    split = last_logits()
    llm.reset()
    assert np.abs(whole).max() > 1
    assert np.abs(whole - split).max() < 0.05 * np.abs(whole).max()
    assert list(np.argsort(whole)[-5:]) == list(np.argsort(split)[-5:]) or \
        np.sort(whole)[-1] - np.sort(whole)[-2] < 0.05 * np.abs(whole).max()
