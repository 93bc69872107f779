"""CUDA placement and precisions on the GPU machine, each generating from the real Gemma 3 270M weights."""
import threading

import pytest

from quantchat import loaders
from quantchat.errors import UserError
from quantchat.loaders.base import GenParams
from test_settings import settings

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
        assert type(proj).__name__ == layer and proj.weight.device.type == "cuda"
        assert model.device.type == "cuda"
        text = greedy(model)
        assert "100" in text and "Celsius" in text, text
    finally:
        model.close()
        torch.cuda.empty_cache()


def test_hugging_face_fp16_on_cuda(gemma_hf):
    plan = loaders.plan(settings(f"--base_model={gemma_hf}"))
    plan.options["dtype"], plan.dtype = "float16", "float16"  # what a GPU without bf16 gets
    model = loaders.load(plan)
    try:
        text = greedy(model)
        assert "100" in text and "Celsius" in text, text
    finally:
        model.close()


def test_llamacpp_puts_every_layer_on_the_gpu(gemma_gguf):
    plan = loaders.plan(settings(f"--base_model={gemma_gguf}", "--max_seq_len=2048"))
    assert plan.devices == "GPU 0: 18 of 18 layers" and plan.options["n_gpu_layers"] == -1
    model = loaders.load(plan)
    try:
        text = greedy(model)
        assert "100" in text and "Celsius" in text, text
    finally:
        model.close()


def test_a_gpu_that_is_not_there_is_one_clear_error(gemma_hf):
    with pytest.raises(UserError, match="only 1 GPU"):
        loaders.plan(settings(f"--base_model={gemma_hf}", "--gpu_id=7"))
