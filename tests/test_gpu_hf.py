"""Hugging Face backend on CUDA: placement and precisions, each generating from the real Gemma 3 270M weights.

Run apart from tests/test_gpu_llamacpp.py (bench/gpu_tests.sh does): torch and a CUDA llama.cpp clash in one process.
"""
import dataclasses
import threading

import pytest
from test_settings import settings

from quantchat import loaders
from quantchat.errors import UserError
from quantchat.loaders.base import GenerationReport, GenParams

pytestmark = pytest.mark.gpu


def greedy(model, prompt="Water boils at", n=12) -> str:
    params = GenParams(max_new_tokens=n, do_sample=False, repetition_penalty=1.0)
    return "".join(model.stream(prompt, params, threading.Event()))


@pytest.mark.parametrize("flags, dtype, quantization, layer", [
    ([], "bfloat16", "none", "Linear"),
    (["--load_8bit"], "bfloat16", "int8", "Linear8bitLt"),
    (["--load_4bit"], "bfloat16", "4-bit NF4, double quantization", "Linear4bit"),
    (["--load_4bit", "--low_bit_mode=2"], "bfloat16", "4-bit NF4", "Linear4bit"),
])
def test_hugging_face_on_cuda(gemma_hf, flags, dtype, quantization, layer):
    import torch
    plan = loaders.plan(settings(f"--base_model={gemma_hf}", *flags))
    assert plan.devices.startswith("cuda:0") and plan.dtype == dtype and plan.quantization == quantization
    model = loaders.load(plan)
    try:
        proj = model.model.model.layers[0].self_attn.q_proj
        proj = getattr(proj, "layer", proj)  # (a 4-bit layer is one operator to compiled steps: compiled_4bit.py)
        assert type(proj).__name__ == layer and proj.weight.device.type == "cuda"
        assert model.device.type == "cuda"
        text = greedy(model)
        # coherent: the sentence goes on about temperature; 4-bit re-quantization may change the figure
        assert "degrees" in text, text
        if not flags:
            assert "100 degrees Celsius" in text, text
    finally:
        model.close()
        torch.cuda.empty_cache()


def test_hugging_face_fp16_on_cuda(tiny_llama):
    """fp16 is what GPUs without bf16 get. (Gemma 3 itself overflows in fp16 and answers nothing: docs/backends.md.)"""
    import torch
    plan = loaders.plan(settings(f"--base_model={tiny_llama}"))
    plan.options, plan.dtype = dataclasses.replace(plan.options, dtype="float16"), "float16"
    model = loaders.load(plan)
    try:
        assert next(model.model.parameters()).dtype == torch.float16 and model.device.type == "cuda"
        params = GenParams(max_new_tokens=8, min_new_tokens=8, do_sample=False)
        assert len(list(model.stream("Hello", params, threading.Event()))) == 8
    finally:
        model.close()


def test_a_gpu_that_is_not_there_is_one_clear_error(gemma_hf):
    with pytest.raises(UserError, match="only 1 GPU"):
        loaders.plan(settings(f"--base_model={gemma_hf}", "--gpu_id=7"))


def test_out_of_memory_during_generation_is_reported_freed_and_survived(tmp_path):
    """A prompt of millions of tokens cannot fit in 80 GB of activations: the user gets one line, the memory
    comes back, and the next request works."""
    import torch
    from conftest import build_tiny_llama
    from transformers import LlamaConfig, LlamaForCausalLM

    from quantchat.assembly import build_engine
    from quantchat.errors import UserError
    folder = build_tiny_llama(tmp_path / "wide")
    config = LlamaConfig.from_pretrained(folder)
    config.update({"hidden_size": 2048, "intermediate_size": 8192, "num_attention_heads": 16,
                   "num_key_value_heads": 16, "max_position_embeddings": 16_000_000})
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(folder)
    model = loaders.load(loaders.plan(settings(f"--base_model={folder}", "--max_seq_len=16000000")))
    engine = build_engine(settings("--max_new_tokens=4"), model)
    baseline = torch.cuda.memory_allocated()
    with pytest.raises(UserError, match="ran out of memory"):
        engine.chat([{"role": "user", "content": "hello " * 2_000_000}]).finish()
    assert torch.cuda.memory_allocated() <= baseline + 2**30  # the failed request's tensors are gone
    reply = engine.chat([{"role": "user", "content": "hello"}], engine.params(min_new_tokens=4))
    reply.finish()
    assert reply.stats.completion_tokens == 4 and engine.queue_depth == 0
    model.close()


def greedy_tokens(model, prompt: str, n: int, reports: list[GenerationReport] | None = None) -> list[int]:
    """Token ids of a greedy answer of exactly n tokens, from whichever path the model takes (its report appended
    to `reports`)."""
    ids = model._encode(prompt)
    params = GenParams(max_new_tokens=n, min_new_tokens=n, repetition_penalty=1.0)
    if reports is not None:
        reports.append(params.report)
    tokens = model.fast.tokens(ids, params, threading.Event()) if model.fast else \
        model._generate(ids, params, threading.Event())
    return list(tokens)


def assert_equal_up_to_a_rounding_tie(fast, slow, prompt: str, n: int) -> None:
    """Greedy tokens of both paths equal, or parting only where the eager model's two candidates are within two
    bf16 steps of each other (1/64 of the logit): there the fused kernels' rounding decides, not a bug."""
    assert_parting_only_at_a_tie(slow, prompt, greedy_tokens(fast, prompt, n), greedy_tokens(slow, prompt, n), 1 / 64)


def assert_parting_only_at_a_tie(model, prompt: str, got: list[int], expected: list[int], within: float) -> None:
    """`got` equals `expected`, or parts from it only where the eager model's two candidates lie within `within`
    of the logit: there the kernels' rounding decides, not a bug."""
    import torch
    if got == expected:
        return
    i = next(i for i, (x, y) in enumerate(zip(got, expected, strict=False)) if x != y)
    ids = torch.cat([model._encode(prompt), torch.tensor([expected[:i]], device=model.device)], dim=1)
    with torch.inference_mode():
        logits = model.model(input_ids=ids).logits[0, -1].float()
    gap = abs(float(logits[got[i]] - logits[expected[i]]))
    assert gap <= abs(float(logits[expected[i]])) * within, f"parted at token {i} of {len(got)}: logit gap {gap:.3g}"


@pytest.mark.parametrize("flags", [[], ["--load_4bit"]])
def test_fast_decode_equals_generate_on_gemma(gemma_hf, flags):
    """bf16: token for token. NF4: the same, except where a rounding tie decides (seen once in 768 tokens)."""
    fast = loaders.load(loaders.plan(settings(f"--base_model={gemma_hf}", "--fast_decode=True", *flags)))
    slow = loaders.load(loaders.plan(settings(f"--base_model={gemma_hf}", "--fast_decode=False", *flags)))
    try:
        assert fast.wait_for_fast_decode() and fast.info.decode == "static cache + CUDA graphs", fast.info.decode
        # prompts and generate without cuDNN attention (a plan per new length); the captured steps had it
        assert not fast.torch.backends.cuda.cudnn_sdp_enabled()
        for prompt in ["Water boils at", "The three primary colours are", "def fibonacci(n):"]:
            if flags:
                assert_equal_up_to_a_rounding_tie(fast, slow, prompt, 256)
            else:
                assert greedy_tokens(fast, prompt, 256) == greedy_tokens(slow, prompt, 256)
    finally:
        fast.close()
        slow.close()


def test_fast_decode_equals_generate_on_a_7b_shape():
    from pathlib import Path

    from bench.decode import write_random_model
    folder = write_random_model("llama2-7b", Path("/tmp/bench-models/llama2-7b"))
    # fp32: random weights give near-tied logits, which bf16 rounding (fused differently when compiled) can flip
    fast = loaders.load(loaders.plan(settings(f"--base_model={folder}", "--fast_decode=True", "--max_seq_len=1024",
                                              "--load_half=False")))
    try:
        assert fast.wait_for_fast_decode() and fast.fast.graphs, fast.info.decode
        fast_tokens = greedy_tokens(fast, "The quick brown fox", 256)
        fast.fast = None  # the same weights, through generate
        assert greedy_tokens(fast, "The quick brown fox", 256) == fast_tokens
    finally:
        fast.close()


@pytest.mark.parametrize("half", [False, True])
def test_the_captured_verify_step_keeps_generates_tokens(tiny_llama, half):
    """--speculative on CUDA: guesses are checked by a captured step of one width in every window. fp32: its attention
    on SDPA, generate's tokens exactly (random weights near-tie where bf16 kernels round differently); bf16: on flex
    attention, generate's tokens up to a bf16 rounding tie."""
    model = loaders.load(loaders.plan(settings(f"--base_model={tiny_llama}", "--fast_decode=True",
                                               f"--load_half={half}", "--max_seq_len=1024")))
    try:
        assert model.wait_for_fast_decode() and set(model.fast.verify_graphs) == set(model.fast.graphs)
        assert model.fast.flex_verify == half, model.info.decode
        prompt = "one two three four five six seven " * 20
        reports: list[GenerationReport] = []
        tokens = greedy_tokens(model, prompt, 400, reports)  # (windows 256, 512 and 1024)
        spec = reports[0].speculation
        assert spec.accepted > spec.steps > 0, spec
        model.fast = None
        expected = greedy_tokens(model, prompt, 400)
        if half:
            assert_parting_only_at_a_tie(model, prompt, tokens, expected, 1 / 64)
        else:
            assert tokens == expected
    finally:
        model.close()


def test_short_prompts_and_follow_ups_go_through_the_captured_prompt_step(tiny_llama, monkeypatch):
    """A prompt, or the rest of one that continues the cache, of up to 64 tokens prefilled by a captured step, padded
    to that width (FastDecoder.PROMPT_STEP_TOKENS, 64 by default on CUDA): generate's tokens exactly
    (fp32), for a short prompt, a long one (prefilled eagerly) and its follow-up."""
    from quantchat.loaders.hf.fast_decode import FastDecoder
    monkeypatch.setattr(FastDecoder, "PROMPT_STEP_TOKENS", 64)
    model = loaders.load(loaders.plan(settings(f"--base_model={tiny_llama}", "--fast_decode=True",
                                               "--load_half=False", "--max_seq_len=1024")))
    try:
        assert model.wait_for_fast_decode() and set(model.fast.prompt_graphs) == set(model.fast.graphs)
        long = "one two three four five six seven " * 20
        prompts = ["The quick brown fox", long, long + " eight nine ten"]
        reports: list[GenerationReport] = []
        fast = [greedy_tokens(model, prompt, 40, reports) for prompt in prompts]
        assert [r.reused_tokens for r in reports][2] > 100, [r.reused_tokens for r in reports]
        model.fast = None
        assert [greedy_tokens(model, prompt, 40) for prompt in prompts] == fast
    finally:
        model.close()


@pytest.mark.parametrize("packed", [True, False])
def test_attention_split_over_chunks_of_keys_on_cudnn_equals_sdpa(packed, monkeypatch):
    """The split attention of wide steps (attention.py) on cuDNN, eager and compiled, over an 8,192-position window
    of which 7,000-odd are filled: as close to fp32 SDPA over the whole window as cuDNN's unsplit attention is;
    Llama-3-8B's heads (groups of 4, 64 queries) and Qwen2.5-0.5B's (groups of 7, 9 queries), the heads of a group
    packed into the query rows or not."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from transformers.integrations.sdpa_attention import repeat_kv

    from quantchat.loaders.hf import attention
    monkeypatch.setattr(attention, "SPLIT_PACKED", packed)
    torch.manual_seed(0)
    split = torch.compile(attention._split_sdpa)
    for heads, kv_heads, dim, queries in ((32, 8, 128, 64), (14, 2, 64, 9)):
        # (queries 3x a unit vector's size: attention peaked on some keys, so a chunk weighted wrongly shows)
        q = torch.randn(1, heads, queries, dim, device="cuda", dtype=torch.bfloat16) * 3
        k, v = (torch.randn(1, kv_heads, 8192, dim, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        positions = torch.arange(7000, 7000 + queries, device="cuda")[:, None]
        mask = (torch.arange(8192, device="cuda")[None, :] <= positions)[None, None]
        expected = torch.nn.functional.scaled_dot_product_attention(
            q.float(), *(repeat_kv(t.float(), heads // kv_heads) for t in (k, v)), attn_mask=mask).transpose(1, 2)
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            unsplit = (attention._grouped_sdpa(q, k, v, mask, None).float() - expected).abs().max()
        assert attention._split_takes(q, k, mask, 0.0, {})
        for got in (attention._split_sdpa(q, k, v, mask, None), split(q, k, v, mask, None)):
            assert got.shape == expected.shape
            assert (got.float() - expected).abs().max() <= 2 * unsplit + 1e-3, (got.float() - expected).abs().max()
    assert not attention._split_takes(q[:, :, :1], k, mask[:, :, :1], 0.0, {})  # one query: cuDNN's own decoding
    assert not attention._split_takes(q, k[:, :, :1024], mask[..., :1024], 0.0, {})  # a short window


@pytest.mark.parametrize("key_chunks, kv_heads", [(8, 2), (0, 2), (8, 1)])
def test_wide_steps_in_half_precision_keep_generates_tokens(tmp_path, monkeypatch, key_chunks, kv_heads):
    """bf16, head size 64, the product's SPLIT_FROM: captured prompt steps in every window, whose attention splits the
    windows of 2,048 positions and more into chunks of keys (or not: key_chunks 0), answer a short prompt, a
    3,000-token one and its follow-up with generate's tokens, up to a bf16 rounding tie. (On an H200 the unsplit case
    passed and the split one failed: its prompt step did not capture in the 2,048-position window,
    bench/results/gpu-tests-wide-steps-h200.log, as with windows split from 512 before; Qwen2.5-0.5B's steps, head
    size 64 too, captured split. kv_heads 1 packs a group of 4 heads, as Llama-3-8B's, into 256 rows instead of 128.)"""
    import torch

    from quantchat.loaders.hf import attention
    from quantchat.loaders.hf.fast_decode import FastDecoder
    monkeypatch.setattr(FastDecoder, "PROMPT_STEP_TOKENS", 64)
    monkeypatch.setattr(attention, "KEY_CHUNKS", key_chunks)
    split, call = [], attention._split_sdpa
    monkeypatch.setattr(attention, "_split_sdpa", lambda *a: split.append(torch.compiler.is_compiling()) or call(*a))
    from conftest import build_tiny_llama
    folder = build_tiny_llama(tmp_path / "heads-of-64", hidden_size=256, kv_heads=kv_heads)
    model = loaders.load(loaders.plan(settings(f"--base_model={folder}", "--fast_decode=True", "--load_half=True",
                                               "--max_seq_len=4096")))
    try:
        assert model.wait_for_fast_decode() and set(model.fast.prompt_graphs) == set(model.fast.graphs), \
            model.info.decode
        assert (True in split) == bool(key_chunks)  # (traced into the captured steps of windows 2,048 and 4,096)
        long = "one two three four five six seven " * 300  # (about 3,000 tokens)
        prompts = ["The quick brown fox", long, long + " eight nine ten"]  # (the follow-up in window 4,096)
        reports: list[GenerationReport] = []
        fast = [greedy_tokens(model, prompt, 40, reports) for prompt in prompts]
        assert reports[2].reused_tokens > 2048, [r.reused_tokens for r in reports]
        model.fast = None
        for prompt, tokens in zip(prompts, fast, strict=True):
            assert_parting_only_at_a_tie(model, prompt, tokens, greedy_tokens(model, prompt, 40), 1 / 64)
    finally:
        model.close()


def test_a_draft_models_captured_steps_keep_generates_tokens(tiny_llama):
    """--draft_model on CUDA: the draft's own captured steps chain its guesses on the device; the answers stay
    generate's (fp32; the tiny Llama drafting for itself)."""
    model = loaders.load(loaders.plan(settings(f"--base_model={tiny_llama}", "--fast_decode=True", "--load_half=False",
                                               "--max_seq_len=1024", f"--draft_model={tiny_llama}")))
    try:
        assert model.wait_for_fast_decode() and model.fast.draft.graphs and model.fast.verify_graphs
        reports: list[GenerationReport] = []
        tokens = greedy_tokens(model, "The quick brown fox", 300, reports)
        assert reports[0].speculation.accepted > reports[0].speculation.steps > 0, reports[0].speculation
        model.fast = None
        assert greedy_tokens(model, "The quick brown fox", 300) == tokens
    finally:
        model.close()


def test_a_step_broken_into_pieces_is_captured_whole(tiny_llama):
    """A layer the compiler cannot trace (as gptqmodel's Marlin and bitsandbytes are) breaks the compiled step;
    the hand-captured CUDA graph still holds every piece, and replaying it gives generate's tokens."""
    import torch

    from quantchat.loaders.hf.fast_decode import FastDecoder
    model = loaders.load(loaders.plan(settings(f"--base_model={tiny_llama}", "--fast_decode=False",
                                               "--load_half=False")))
    hook = model.model.model.layers[0].register_forward_pre_hook(lambda *_: torch._dynamo.graph_break())
    try:
        torch._dynamo.reset()
        fast = FastDecoder(model.model, model.eos_ids, 256, compile=True)
        fast.warm_up()
        assert fast.graphs
        model.fast = fast
        tokens = greedy_tokens(model, "The quick brown fox", 64)
        model.fast = None
        assert tokens == greedy_tokens(model, "The quick brown fox", 64)
    finally:
        hook.remove()
        model.close()


def test_constrained_output_through_the_captured_graph(tiny_llama):
    """The mask is applied outside the captured step: a random model sampling hot still writes only JSON that fits
    the schema, with graphs in use and a different mask every token."""
    import json

    from quantchat.constraints import json_schema
    model = loaders.load(loaders.plan(settings(f"--base_model={tiny_llama}", "--fast_decode=True")))
    try:
        assert model.wait_for_fast_decode() and model.fast.graphs
        schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99},
                                                   "unit": {"enum": ["kg", "lb"]}},
                  "required": ["n", "unit"], "additionalProperties": False}
        for seed in range(5):
            params = GenParams(max_new_tokens=64, do_sample=True, temperature=1.5, seed=seed,
                               constraint=json_schema(schema, "test"))
            answer = json.loads("".join(model.stream("Hello", params, threading.Event())))
            assert set(answer) == {"n", "unit"} and 0 <= answer["n"] <= 99 and answer["unit"] in ("kg", "lb")
    finally:
        model.close()


@pytest.mark.skipif(not __import__("torch").cuda.is_available() or __import__("torch").cuda.device_count() < 2,
                    reason="needs two GPUs")
def test_use_gpu_id_false_spreads_the_model_as_planned():
    """--use_gpu_id=False over two GPUs: each GPU holds about the share of the weights that the plan showed, and the
    model answers."""
    import re
    from pathlib import Path

    from bench.decode import write_random_model
    folder = write_random_model("llama2-7b", Path("/tmp/bench-models/llama2-7b"))
    p = loaders.plan(settings(f"--base_model={folder}", "--use_gpu_id=False"))
    model = loaders.load(p)
    try:
        loaded = dict(re.findall(r"(cuda:\d) ([\d.]+) GiB", model.info.devices))
        assert set(loaded) == {"cuda:0", "cuda:1"}, model.info.devices
        for gib in loaded.values():  # accelerate balances by layers: within 10% of half the weights
            assert abs(float(gib) * 2**30 - p.weight_bytes / 2) < 0.1 * p.weight_bytes / 2, model.info.devices
        assert len(greedy_tokens(model, "The quick brown fox", 16)) == 16
    finally:
        model.close()
