"""llama.cpp on CUDA: every layer on the GPU, generating from the real Gemma 3 270M GGUF.

Run in a process that has not imported torch (bench/gpu_tests.sh runs it apart from tests/test_gpu_hf.py).
"""
import sys
import threading

import pytest
from test_settings import settings

from quantchat import loaders
from quantchat.loaders.base import GenParams

pytestmark = pytest.mark.gpu
GREEDY = GenParams(max_new_tokens=12, do_sample=False, repetition_penalty=1.0)


def test_llamacpp_puts_every_layer_on_the_gpu(gemma_gguf, capfd):
    assert "torch" not in sys.modules
    plan = loaders.plan(settings(f"--base_model={gemma_gguf}", "--max_seq_len=2048"))
    assert plan.devices == "GPU 0: 18 of 18 layers" and plan.options.llama_kwargs["n_gpu_layers"] == -1
    model = loaders.load(plan)
    try:
        assert "llama.cpp: 18 of 18 layers on the GPU" in capfd.readouterr().err
        text = "".join(model.stream("Water boils at", GREEDY, threading.Event()))
        assert "100 degrees Celsius" in text, text
    finally:
        model.close()


def test_partial_offload_keeps_the_rest_on_the_cpu(gemma_gguf):
    plan = loaders.plan(settings(f"--base_model={gemma_gguf}", "--n_gpu_layers=6", "--max_seq_len=512"))
    assert plan.devices == "GPU 0: 6 of 18 layers, the rest on the CPU"
    model = loaders.load(plan)
    try:
        text = "".join(model.stream("Water boils at", GREEDY, threading.Event()))
        assert "100 degrees Celsius" in text, text
    finally:
        model.close()
