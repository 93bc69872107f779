"""Quantized checkpoints of the real Gemma 3 270M on a CUDA GPU: quantize.py writes them, generate.py's flags load
them, the answers stay close to the unquantized model's, and exllama serves concurrent chats without mixing them.
exllamav2 does not know text-only Gemma 3 and exllamav3 1.6.5 cannot read it, so the exllama tests use a small
Llama taught two answers and quantized here."""
from __future__ import annotations

import importlib.util
import math
import threading
from pathlib import Path

import pytest
from conftest import CACHE

from bench.quality import log_probs, logits, windows
from quantchat import loaders
from quantchat.assembly import build_engine
from quantchat.loaders.base import GenParams
from quantchat.quantize import DATA
from quantchat.quantize import main as quantize
from quantchat.settings import from_flags

pytestmark = pytest.mark.gpu


def needs(library: str):
    return pytest.mark.skipif(importlib.util.find_spec(library) is None, reason=f"{library} not installed")


def quantized(gemma_hf, method: str) -> str:
    out = CACHE / "quant" / method  # where bench/gpu_quant.sh's quality run writes them too
    if not (out / "config.json").is_file():
        quantize(base_model=str(gemma_hf), method=method, out=str(out))
    return str(out)


def perplexity(model, tokenizer) -> float:
    ids = tokenizer((DATA / "heldout.txt").read_text(), add_special_tokens=False).input_ids
    values = [v for w in windows(ids, tokenizer.bos_token_id) for v in log_probs(model, w)]
    return math.exp(-sum(values) / len(values))


@pytest.fixture(scope="module")
def reference_perplexity(gemma_hf):
    from transformers import AutoTokenizer
    model = loaders.load(loaders.plan(from_flags({"base_model": str(gemma_hf), "fast_decode": False})))
    try:
        return perplexity(model, AutoTokenizer.from_pretrained(gemma_hf))
    finally:
        model.close()


def load_and_check(flags: dict, gemma_hf, reference_perplexity):
    from transformers import AutoTokenizer
    settings = from_flags(flags)
    model = loaders.load(loaders.plan(settings))
    ppl = perplexity(model, AutoTokenizer.from_pretrained(gemma_hf))
    print(flags, model.info.quantization, f"perplexity {ppl:.2f} vs {reference_perplexity:.2f}")
    # GPTQ 4-bit cost Gemma 270M 34% on the H100 (docs/quantization.md); a broken kernel or packing costs far more
    assert ppl < reference_perplexity * 1.35, (ppl, reference_perplexity)
    return settings, model


def test_gptq_quantize_then_load_through_its_flag(gemma_hf, reference_perplexity):
    settings, model = load_and_check({"base_model": quantized(gemma_hf, "gptq"), "load_gptq": "model"},
                                     gemma_hf, reference_perplexity)
    try:
        assert "kernel MarlinLinear" in model.info.quantization
        reply = build_engine(settings, model).chat([{"role": "user", "content": "Name three colours."}],
                                                   GenParams(max_new_tokens=32))
        text = "".join(reply)
        assert len(text.split()) >= 3 and "\ufffd" not in text
    finally:
        model.close()


def close_to_source(quantized_folder: str, flags: dict, source: Path) -> None:
    """A quantized small Llama through its flag: logits close to those of the model it came from."""
    import torch
    model = loaders.load(loaders.plan(from_flags({"base_model": quantized_folder, "fast_decode": False, **flags})))
    reference = loaders.load(loaders.plan(from_flags({"base_model": str(source), "fast_decode": False})))
    window = reference.tokenizer("the cat sat on the mat and the dog ran").input_ids
    try:
        a, b = logits(model, window).cuda(), logits(reference, window).cuda()
        similarity = torch.nn.functional.cosine_similarity(a, b, dim=-1).mean().item()
        print(flags, model.info.quantization, f"cosine similarity to the source model's logits {similarity:.3f}")
        assert similarity > 0.9  # a wrong kernel or packing gives unrelated logits (about 0 for random weights)
    finally:
        model.close()
        reference.close()


# What the small Llama below is taught to answer: learnt answers win by about 8 logits, so they survive 4-bit
# quantization, and the exllama kernels' run-to-run rounding (their split-K sums are atomic adds, in no fixed order)
# cannot flip a token, as it did between near-tied tokens of an untrained model.
TAUGHT = {"Write a sentence about the sea.": "The sea is wide and grey, and the waves roll in from the west.",
          "List four fruits.": "Apples, pears, plums and figs."}


def teach(folder: Path, steps: int = 100) -> None:
    """Train the model on TAUGHT's chats (prompt in the model's template, answer, end of sequence): seconds."""
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM
    tokenizer = AutoTokenizer.from_pretrained(folder)
    rows = [tokenizer(tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                                    tokenize=False) + a, add_special_tokens=False).input_ids
            + [tokenizer.eos_token_id] for q, a in TAUGHT.items()]
    n = max(map(len, rows))
    ids = torch.tensor([r + [tokenizer.eos_token_id] * (n - len(r)) for r in rows])
    labels = torch.tensor([r + [-100] * (n - len(r)) for r in rows])
    model = LlamaForCausalLM.from_pretrained(folder).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(steps):
        model(input_ids=ids, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(folder)


@pytest.fixture(scope="module")
def llama_512(tmp_path_factory) -> Path:
    """A small Llama (hidden 512, vocabulary 512) taught two answers: an architecture both exllamas know,
    quantized in seconds."""
    from conftest import build_tiny_llama
    folder = build_tiny_llama(tmp_path_factory.mktemp("llama512") / "base", hidden_size=512, vocab_size=512)
    teach(folder)
    return folder


def quantized_llama(llama_512: Path, method: str) -> str:
    out = llama_512.parent / method
    if not (out / "config.json").is_file():
        quantize(base_model=str(llama_512), method=method, out=str(out), samples=16, sample_tokens=256)
    return str(out)


def test_awq_on_the_gpu_kernel(llama_512):
    """gptqmodel 7.6's AWQ cannot quantize Gemma 3 (its rotary embedding call lacks layer_type): a small Llama
    checks that an AWQ checkpoint loads on a CUDA kernel and stays close to the model it came from."""
    folder = quantized_llama(llama_512, "awq")
    model = loaders.load(loaders.plan(from_flags({"base_model": folder, "load_awq": "model"})))
    print(model.info.quantization)
    assert "TorchAten" not in model.info.quantization
    model.close()
    close_to_source(folder, {"load_awq": "model"}, llama_512)


def chats_match_solo(settings, model) -> list[str]:
    """Alone, each chat gets its taught answer; two chats at once through one model get the same answers."""
    engine = build_engine(settings, model)
    questions = list(TAUGHT)

    def ask(question):
        return "".join(engine.chat([{"role": "user", "content": question}], GenParams(max_new_tokens=48)))

    alone = [ask(q) for q in questions]
    assert alone == list(TAUGHT.values())
    together: dict[int, str] = {}
    threads = [threading.Thread(target=lambda i=i: together.__setitem__(i, ask(questions[i]))) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [together[0], together[1]] == alone
    return alone


@needs("gptqmodel")
@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_fused_projections_on_the_marlin_kernels(llama_512, method, monkeypatch):
    """q/k/v and gate/up fused on gptqmodel's CUDA kernels: the taught answers come back through generate (while
    the fast path warms up beside it) and through the fast path, alone and two at once, and the logits match
    the separate layers'; the model compiles as one graph."""
    import torch
    from torch._dynamo.testing import CompileCounter

    from quantchat.loaders.hf import fused_projections
    flags = {"base_model": quantized_llama(llama_512, method), f"load_{method}": "model", "concurrency_count": 2}
    settings = from_flags(flags)
    model = loaders.load(loaders.plan(settings))
    assert "Marlin" in model.info.quantization, model.info.quantization
    assert model.info.quantization.endswith("q/k/v and gate/up fused"), model.info.quantization
    chats_match_solo(settings, model)
    assert model.wait_for_fast_decode(600), model.info.decode
    chats_match_solo(settings, model)
    ids = model.tokenizer(" ".join(TAUGHT.values()), return_tensors="pt").input_ids.to(model.device)
    graphs = CompileCounter()
    with torch.inference_mode():
        fused = model.model(ids).logits.float()
        torch.compile(model.model, backend=graphs)(ids)
    assert graphs.frame_count == 1  # traced whole: each Marlin layer is one operator (compiled_4bit.py)
    model.close()
    monkeypatch.setattr(fused_projections, "fuse_projections", lambda model: 0)
    separate_model = loaders.load(loaders.plan(from_flags({**flags, "fast_decode": False})))
    assert not separate_model.info.quantization.endswith("fused")
    with torch.inference_mode():
        separate = separate_model.model(ids).logits.float()
    separate_model.close()
    assert (fused.argmax(-1) == separate.argmax(-1)).float().mean() > 0.9
    torch.testing.assert_close(fused, separate, rtol=0.05, atol=0.05 * separate.abs().max().item())


@pytest.mark.parametrize("method, library", [pytest.param("gptq", "exllamav2", marks=needs("exllamav2")),
                                             pytest.param("exl3", "exllamav3", marks=needs("exllamav3"))])
def test_exllama_close_to_source_and_concurrent_chats_match_solo(llama_512, method, library):
    """GPTQ through exllamav2, EXL3 through exllamav3. exllamav3 1.6.5 cannot read text-only Gemma 3 folders (it
    looks for '.model.embed_tokens': an empty key prefix), so both are checked on the small Llama."""
    folder = quantized_llama(llama_512, method)
    close_to_source(folder, {"load_exllama": True}, llama_512)
    settings = from_flags({"base_model": folder, "load_exllama": True, "concurrency_count": 2})
    model = loaders.load(loaders.plan(settings))
    try:
        assert model.info.backend.startswith(f"exllama ({library}")
        chats_match_solo(settings, model)
        follow_up_reuses_the_history(settings, model)
    finally:
        model.close()


def follow_up_reuses_the_history(settings, model) -> None:
    """A chat's second turn continues from the library's cached pages, and the timing line says how many prompt
    tokens were reused (a system message of about 300 tokens: at least one whole page of 256)."""
    engine = build_engine(settings, model)
    system = "one two three four five six seven "
    while model.count_tokens(system) < 300:
        system += "eight nine ten "
    history = [{"role": "system", "content": system}, {"role": "user", "content": list(TAUGHT)[0]}]
    history.append({"role": "assistant", "content": engine.chat(history, GenParams(max_new_tokens=16)).finish()})
    history.append({"role": "user", "content": list(TAUGHT)[1]})
    second = engine.chat(history, GenParams(max_new_tokens=16))
    second.finish()
    assert second.stats.reused_tokens >= 256, second.stats
    assert f"{second.stats.reused_tokens} of {second.stats.prompt_tokens} prompt tokens reused" in second.stats.line()


@needs("exllamav2")
def test_exl2_quantize_then_load_without_a_flag(llama_512):
    """quantize.py --method=exl2 (exllamav2's converter, our calibration text); the folder is found to be EXL2
    from its config.json and loads through exllamav2 without --load_exllama."""
    folder = quantized_llama(llama_512, "exl2")
    plan = loaders.plan(from_flags({"base_model": folder}))
    assert plan.backend == "exllama" and "exl2" in plan.quantization
    close_to_source(folder, {}, llama_512)


@needs("exllamav2")
def test_exllamav2_refuses_an_architecture_it_does_not_know(gemma_hf):
    from quantchat.errors import UserError
    with pytest.raises(UserError, match="does not support Gemma3ForCausalLM.*--load_gptq"):
        loaders.load(loaders.plan(from_flags({"base_model": quantized(gemma_hf, "gptq"), "load_exllama": True})))


@needs("exllamav2")
def test_exllamav2_rope_alpha_reaches_the_model(llama_512):
    """h2oGPT's --rope_scaling="{'alpha_value':4}" for exllama: NTK scaling, the context four times the trained."""
    import torch
    folder = quantized_llama(llama_512, "gptq")
    window = list(range(1, 300))
    scores = {}
    for alpha in (1, 4):
        flags = {"base_model": folder, "load_exllama": True, **({"rope_scaling": {"alpha_value": alpha}}
                                                                  if alpha > 1 else {})}
        model = loaders.load(loaders.plan(from_flags(flags)))
        try:
            assert model.info.context_length == 512 * alpha
            scores[alpha] = logits(model, window).cuda()
        finally:
            model.close()
    # the first position has no rotation to scale; later ones do
    assert torch.allclose(scores[1][0], scores[4][0], atol=1e-2)
    assert not torch.allclose(scores[1][-1], scores[4][-1], atol=1e-2)
