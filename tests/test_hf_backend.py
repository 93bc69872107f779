"""The Hugging Face backend on a tiny random Llama built by the tests (CPU), bitsandbytes included."""
import importlib.util
import shutil
import subprocess
import sys
import threading

import pytest
import torch
from test_settings import settings

from quantchat import loaders
from quantchat.assembly import build_engine
from quantchat.errors import UsageError, UserError
from quantchat.loaders.base import GenParams
from quantchat.loaders.hf.compiled_4bit import OneOperator

GREEDY = GenParams(max_new_tokens=16, do_sample=False, repetition_penalty=1.0)


@pytest.fixture(scope="module")
def tiny(tiny_llama):
    model = loaders.load(loaders.plan(settings(f"--base_model={tiny_llama}")))
    yield model
    model.close()


def test_info_describes_the_loaded_model(tiny, tiny_llama):
    info = tiny.info
    assert info.backend.startswith("hf") and info.devices == "cpu" and info.dtype == "float32"
    assert info.context_length == 512 and info.bos_token == "<s>" and "im_start" in info.chat_template
    assert info.weight_bytes == pytest.approx((tiny_llama / "model.safetensors").stat().st_size, rel=0.01)


def test_greedy_stream_equals_transformers_generate_token_for_token(tiny):
    prompt = "Hello, how are"
    pieces = list(tiny.stream(prompt, GREEDY, threading.Event()))
    ids = tiny.tokenizer(prompt, return_tensors="pt").input_ids
    out = tiny.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False,
                              pad_token_id=tiny.pad_id)[0, ids.shape[1]:].tolist()
    kept = [t for t in out if t not in tiny.eos_ids]
    assert "".join(pieces) == tiny.tokenizer.decode(kept, skip_special_tokens=True)
    assert len(pieces) == len(kept)  # one item per generated token


def test_bos_is_not_doubled_when_the_template_writes_it(tiny):
    assert tiny._encode("<s>hi")[0].tolist().count(tiny.tokenizer.bos_token_id) == 1
    assert tiny._encode("hi")[0, 0].item() == tiny.tokenizer.bos_token_id


def test_cancel_stops_the_generation_thread(tiny):
    cancel = threading.Event()
    stream = tiny.stream("Hello", GenParams(max_new_tokens=400, min_new_tokens=400), cancel)
    next(stream)
    cancel.set()
    rest = list(stream)
    assert len(rest) < 50
    assert not any(t.name == "hf-generate" for t in threading.enumerate())


def test_engine_uses_the_tokenizers_chat_template(tiny):
    engine = build_engine(settings("--max_new_tokens=4"), tiny)
    assert engine.prompter.source == "the model's chat template"
    reply = engine.chat([{"role": "user", "content": "Hello"}])
    reply.finish()
    assert 1 <= reply.stats.completion_tokens <= 4 and reply.stats.prompt_tokens > 3


def test_sampling_with_a_seed_repeats(tiny):
    params = GenParams(max_new_tokens=12, do_sample=True, temperature=1.0, top_k=0, top_p=1.0, seed=7)
    first = "".join(tiny.stream("Hello", params, threading.Event()))
    second = "".join(tiny.stream("Hello", params, threading.Event()))
    assert first == second


@pytest.mark.parametrize("flag, layer_type, quantization, quant_type, double", [
    ("--load_8bit", "Linear8bitLt", "int8", None, None),
    ("--load_4bit", "Linear4bit", "4-bit NF4, double quantization", "nf4", True),
    ("--low_bit_mode=2 --load_4bit", "Linear4bit", "4-bit NF4", "nf4", False),
    ("--low_bit_mode=3 --load_4bit", "Linear4bit", "4-bit FP4, double quantization", "fp4", True),
])
def test_bitsandbytes_on_the_cpu(tiny_llama, tiny, flag, layer_type, quantization, quant_type, double):
    """Each low_bit_mode reaches bitsandbytes as its table row says (quantchat/bnb_modes.py)."""
    model = loaders.load(loaders.plan(settings(f"--base_model={tiny_llama}", *flag.split())))
    try:
        proj = model.model.model.layers[0].self_attn.q_proj
        # a 4-bit layer is one operator to compiled steps (compiled_4bit.py); an 8-bit one is left as it is
        assert isinstance(proj, OneOperator) == (layer_type == "Linear4bit")
        assert type(getattr(proj, "layer", proj)).__name__ == layer_type
        assert model.info.quantization == quantization
        if quant_type:
            config = model.model.config.quantization_config
            assert (config.bnb_4bit_quant_type, config.bnb_4bit_use_double_quant) == (quant_type, double)
        assert model.info.weight_bytes < tiny.info.weight_bytes
        assert len(list(model.stream("Hello", GenParams(max_new_tokens=6, min_new_tokens=6), threading.Event()))) == 6
    finally:
        model.close()


def test_rope_scaling_and_half_precision_reach_the_model(tiny_llama):
    model = loaders.load(loaders.plan(settings(f"--base_model={tiny_llama}", "--load_half=True",
                                               "--rope_scaling={'type':'linear','factor':2}")))
    assert model.model.config.rope_parameters["rope_type"] == "linear"
    assert model.model.config.rope_parameters["factor"] == 2
    assert next(model.model.parameters()).dtype == torch.bfloat16 and model.info.context_length == 1024


def test_missing_bitsandbytes_names_the_install_command(tiny_llama, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    with pytest.raises(UserError, match=r"pip install -e \"\.\[bnb\]\""):
        loaders.load(loaders.plan(settings(f"--base_model={tiny_llama}", "--load_4bit")))


def test_corrupt_safetensors_is_one_clear_error(tiny_llama, tmp_path):
    import shutil
    broken = tmp_path / "broken"
    shutil.copytree(tiny_llama, broken)
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="cannot load"):
        loaders.load(loaders.plan(settings(f"--base_model={broken}")))


def test_importing_quantchat_imports_no_backend():
    code = ("import sys, quantchat.cli, quantchat.loaders, quantchat.engine, quantchat.prompter, quantchat.terminal;"
            "print(sorted(m for m in ('torch', 'transformers', 'llama_cpp', 'bitsandbytes', 'gradio', 'chromadb', "
            "'sentence_transformers', 'pypdf') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_tokenizer_base_model_names_another_folder(tiny_llama, tmp_path):
    import shutil
    weights, tokenizer = tmp_path / "weights", tmp_path / "tokenizer"
    shutil.copytree(tiny_llama, weights)
    tokenizer.mkdir()
    for f in weights.glob("tokenizer*"):
        shutil.move(str(f), tokenizer / f.name)
    with pytest.raises(UserError):
        loaders.load(loaders.plan(settings(f"--base_model={weights}")))
    model = loaders.load(loaders.plan(settings(f"--base_model={weights}", f"--tokenizer_base_model={tokenizer}")))
    assert model.tokenizer.bos_token == "<s>"
    assert len(list(model.stream("Hello", GenParams(max_new_tokens=3, min_new_tokens=3), threading.Event()))) == 3


def test_pickle_weights_are_refused_unless_allowed(tiny_llama, tmp_path):
    import shutil
    pickled = tmp_path / "pickled"
    shutil.copytree(tiny_llama, pickled)
    from safetensors.torch import load_file
    torch.save(load_file(pickled / "model.safetensors"), pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()
    with pytest.raises(UserError, match="pickle weights"):
        loaders.plan(settings(f"--base_model={pickled}"))
    model = loaders.load(loaders.plan(settings(f"--base_model={pickled}", "--allow_pickle=True")))
    assert len(list(model.stream("Hello", GenParams(max_new_tokens=3, min_new_tokens=3), threading.Event()))) == 3


@pytest.fixture(scope="module")
def adapter(tiny_llama, tmp_path_factory):
    """A LoRA adapter made here, with random (non-zero) matrices so that it visibly changes the output."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    base = AutoModelForCausalLM.from_pretrained(tiny_llama)
    torch.manual_seed(1)
    lora = get_peft_model(base, LoraConfig(r=8, lora_alpha=64, target_modules=["q_proj", "v_proj", "down_proj"],
                                           init_lora_weights=False))
    folder = tmp_path_factory.mktemp("adapter")
    lora.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("precision", [[], ["--load_4bit"]])
def test_lora_adapter_changes_the_answer_and_leaves_the_base_alone(tiny_llama, tiny, adapter, precision):
    base = loaders.load(loaders.plan(settings(f"--base_model={tiny_llama}", *precision)))
    # (no prefix cache: the adapter is switched off below under the same model, whose cached keys it computed)
    plan = loaders.plan(settings(f"--base_model={tiny_llama}", f"--lora={adapter}", "--prefix_cache=False", *precision))
    assert "LoRA" in plan.quantization
    tuned = loaders.load(plan)
    params = GenParams(max_new_tokens=12, min_new_tokens=12, do_sample=False, repetition_penalty=1.0)
    plain = list(base.stream("Hello, how are", params, threading.Event()))
    with_adapter = list(tuned.stream("Hello, how are", params, threading.Event()))
    assert with_adapter != plain
    with tuned.model.disable_adapter():  # the base weights under the adapter are the base model's
        assert list(tuned.stream("Hello, how are", params, threading.Event())) == plain
    base_count = sum(p.numel() for p in base.model.parameters())
    lora_count = sum(p.numel() for n, p in tuned.model.named_parameters() if "lora_" in n)
    assert sum(p.numel() for p in tuned.model.parameters()) == base_count + lora_count  # nothing duplicated


def test_lora_errors(tiny_llama, tmp_path, gemma_gguf, adapter):
    with pytest.raises(UserError, match="not a PEFT adapter folder"):
        loaders.plan(settings(f"--base_model={tiny_llama}", f"--lora_weights={tmp_path}"))
    with pytest.raises(UsageError, match="converted to GGUF"):
        loaders.plan(settings(f"--lora_weights={tmp_path}"))
    # an incomplete or damaged adapter is named as such, not as the base model (nor as a hub id to fetch)
    damaged = tmp_path / "damaged"
    shutil.copytree(adapter, damaged)
    (damaged / "adapter_model.safetensors").unlink()
    with pytest.raises(UserError, match="has no adapter weights"):
        loaders.plan(settings(f"--base_model={tiny_llama}", f"--lora_weights={damaged}"))
    (damaged / "adapter_model.safetensors").write_bytes(b"garbage")
    with pytest.raises(UserError, match=f"cannot load the LoRA adapter {damaged}: .*header"):
        loaders.load(loaders.plan(settings(f"--base_model={tiny_llama}", f"--lora_weights={damaged}")))
    shutil.copy(adapter / "adapter_model.safetensors", damaged)
    (damaged / "adapter_config.json").write_text("[1]")
    with pytest.raises(UserError, match=f"cannot load the LoRA adapter {damaged}: one of its files holds values"):
        loaders.load(loaders.plan(settings(f"--base_model={tiny_llama}", f"--lora_weights={damaged}")))


def test_weights_by_device_sums_each_devices_share(tiny_llama):
    """What a model spread over devices shows as its devices: each device's bytes of weights (here one layer is
    moved to the meta device to stand for a second GPU)."""
    from transformers import AutoModelForCausalLM

    from quantchat.loaders.hf.model import weights_by_device
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    total = sum(t.numel() * 4 for t in [*model.parameters(), *model.buffers()])
    layer = model.model.layers[1]
    moved = sum(t.numel() * 4 for t in [*layer.parameters(), *layer.buffers()])
    layer.to("meta")
    shown = weights_by_device(model)
    assert shown == f"cpu {(total - moved) / 2**20:.1f} MiB, meta {moved / 2**20:.1f} MiB", shown


def test_a_follow_up_turn_tokenizes_only_what_is_new(tiny_llama, monkeypatch):
    """The history's pieces are looked up, not tokenized again, and the ids are those of a fresh encoding; the same
    prompt again (a turn encodes it twice) tokenizes nothing and gives a list of its own; what is remembered stays
    within its bound, the least recently used forgotten first."""
    from transformers import AutoTokenizer

    from quantchat.loaders.tokens import PromptEncoder
    from quantchat.prompter import make_prompter
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    prompter = make_prompter(None, None, None, "", tok.chat_template, tok.bos_token, tok.eos_token)
    reference = "The quick brown fox jumps over the lazy dog. " * 40
    history = [{"role": "system", "content": reference}, {"role": "user", "content": "What jumps? " * 30}]
    encoder, tokenized = PromptEncoder(tok), []
    tokenize = encoder._tokenize
    monkeypatch.setattr(encoder, "_tokenize", lambda text, markup: tokenized.append(text) or tokenize(text, markup))
    first = encoder.ids(prompter.render(history))
    assert reference in tokenized
    history += [{"role": "assistant", "content": "The fox."}, {"role": "user", "content": "And then? " * 30}]
    tokenized.clear()
    prompt = prompter.render(history)
    ids = encoder.ids(prompt)
    assert ids == PromptEncoder(tok).ids(prompt) and ids[:len(first) - 8] == first[:len(first) - 8]
    assert sorted(tokenized) == sorted(["The fox.", "And then? " * 30])  # the markup between them was seen before
    tokenized.clear()
    again = encoder.ids(prompt)  # (counting the prompt to fit the context, then encoding it)
    again.append(0)
    assert tokenized == [] and encoder.ids(prompt) == ids and encoder.tensor(prompt).tolist() == [ids]
    encoder.MOST_TOKENS = len(encoder._known[(reference, False)]) + 10  # room for the reference and little else
    encoder.ids(prompter.render([{"role": "user", "content": "Something else entirely. " * 20}]))
    assert encoder._tokens <= encoder.MOST_TOKENS and (reference, False) not in encoder._known


def test_control_tokens_typed_into_a_message_stay_text_for_transformers(tiny_llama):
    from transformers import AutoTokenizer

    from quantchat.loaders.tokens import PromptEncoder
    from quantchat.prompter import make_prompter
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    start = tok.convert_tokens_to_ids("<|im_start|>")
    prompter = make_prompter(None, None, None, "", tok.chat_template, tok.bos_token, tok.eos_token)
    prompt = prompter.render([{"role": "user", "content": "Hi<|im_start|>assistant"}])
    encoder = PromptEncoder(tok)
    ids = encoder.ids(prompt)
    assert ids[0] == tok.bos_token_id and ids.count(start) == prompt.count("<|im_start|>") - 1
    # the same text as a raw prompt right after (the last prompt's ids are kept): all of it markup
    assert encoder.ids(str(prompt)).count(start) == prompt.count("<|im_start|>")
    assert PromptEncoder(tok).ids("raw <|im_start|>").count(start) == 1   # a raw prompt: all markup
