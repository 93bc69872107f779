"""q/k/v and gate/up of gptqmodel's 4-bit layers run as one matmul each (quantchat/loaders/fused_projections.py)."""
from __future__ import annotations

import threading

import pytest
import torch
from conftest import build_tiny_llama
from test_quantized import needs_gptqmodel
from test_settings import settings
from torch import nn

from quantchat import loaders
from quantchat.loaders.hf.compiled_4bit import OneOperator, as_operators
from quantchat.loaders.hf.fused_projections import ProjectionSlice, SharedProjection, fuse_projections


def counted_slices(sizes=(6, 3, 3)):
    """Slices of one nn.Linear that counts its calls, and the separate layers they stand for."""
    torch.manual_seed(0)
    fused = nn.Linear(8, sum(sizes), bias=False)
    calls = []
    fused.register_forward_hook(lambda *_: calls.append(1))
    shared = SharedProjection(fused, list(sizes))
    return [ProjectionSlice(shared, i) for i in range(len(sizes))], fused.weight.split(list(sizes)), calls


def test_the_slices_of_one_input_share_one_matmul():
    (q, k, v), weights, calls = counted_slices()
    x = torch.randn(2, 8)
    outs = [q(x), k(x), v(x)]
    assert len(calls) == 1
    for out, weight in zip(outs, weights, strict=True):
        torch.testing.assert_close(out, x @ weight.T)
    assert q.shared.last.input is None  # the last slice lets the activations go


def test_a_slice_called_on_another_input_computes_its_own():
    (q, k, v), weights, calls = counted_slices()
    x, y = torch.randn(1, 8), torch.randn(1, 8)
    q(x)
    torch.testing.assert_close(k(y), y @ weights[1].T)  # not x's result
    torch.testing.assert_close(v(y), y @ weights[2].T)
    assert len(calls) == 2
    torch.testing.assert_close(v(x), x @ weights[2].T)  # out of order: computed again, still right


def test_each_thread_keeps_its_own_last_result():
    """generate and the fast path's warm-up may run the model at once: one thread's q must not hand its
    outputs to another thread's k."""
    (q, k, v), weights, calls = counted_slices()
    x, y = torch.randn(1, 8), torch.randn(1, 8)
    q(x)
    other = threading.Thread(target=lambda: (q(y), k(y), v(y)))
    other.start()
    other.join()
    torch.testing.assert_close(k(x), x @ weights[1].T)
    torch.testing.assert_close(v(x), x @ weights[2].T)
    assert len(calls) == 2  # one per thread: this thread's k and v reused its own q's matmul


@needs_gptqmodel
@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_fused_4bit_layers_give_the_separate_layers_logits(tmp_path, method):
    from transformers import AutoModelForCausalLM

    from bench.decode import mock_quantized
    folder = mock_quantized(build_tiny_llama(tmp_path / "random", hidden_size=128), method)
    model, reference = (AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float16).eval() for _ in range(2))
    ids = torch.tensor([[1, 5, 9, 200, 33, 7]])
    with torch.inference_mode():
        separate = reference(ids).logits.float()
    layers = len(model.model.layers)
    assert fuse_projections(model) == 2 * layers  # q/k/v and gate/up in every layer
    assert isinstance(model.model.layers[0].self_attn.k_proj, ProjectionSlice)
    assert isinstance(model.model.layers[0].mlp.up_proj, ProjectionSlice)
    with torch.inference_mode():
        fused = model(ids).logits.float()
    torch.testing.assert_close(fused, separate, rtol=1e-2, atol=1e-2 * separate.abs().max().item())
    assert fuse_projections(model) == 0  # nothing left to fuse


@needs_gptqmodel
def test_the_loader_says_the_projections_are_fused(tmp_path):
    from bench.decode import mock_quantized
    folder = mock_quantized(build_tiny_llama(tmp_path / "random", hidden_size=128), "gptq")
    model = loaders.load(loaders.plan(settings(f"--base_model={folder}", "--load_gptq=model")))
    assert model.info.quantization.endswith(", q/k/v and gate/up fused"), model.info.quantization
    layer = model.model.model.layers[0]
    assert isinstance(layer.self_attn.o_proj, OneOperator) and isinstance(layer.self_attn.q_proj.fused, OneOperator)
    assert "".join(model.stream("the cat sat", loaders.GenParams(max_new_tokens=8), threading.Event()))
    model.close()


@needs_gptqmodel
def test_a_compiled_step_traces_the_4bit_layers_whole(tmp_path):
    """Each gptqmodel layer is one operator to the compiler, and the fused projections' slices are traced: the
    model compiles as one graph (it stopped at every 4-bit layer and slice: 17 graphs for these 2 layers) and gives
    the separate layers' logits."""
    from torch._dynamo.testing import CompileCounter
    from transformers import AutoModelForCausalLM

    from bench.decode import mock_quantized
    folder = mock_quantized(build_tiny_llama(tmp_path / "random", hidden_size=128), "gptq")
    model, reference = (AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float16).eval() for _ in range(2))
    ids = torch.tensor([[1, 5, 9, 200, 33, 7]])
    layers = len(model.model.layers)
    assert fuse_projections(model) == 2 * layers
    assert as_operators(model) == 4 * layers  # the fused q/k/v and gate/up, o and down
    assert as_operators(model) == 0  # nothing left to wrap
    graphs = CompileCounter()
    torch._dynamo.reset()
    with torch.inference_mode():
        compiled = torch.compile(model, backend=graphs)(ids).logits.float()
        expected = reference(ids).logits.float()
        uncompiled = model(ids).logits.float()  # (the layers as they were)
    assert graphs.frame_count == 1
    for got in (compiled, uncompiled):
        torch.testing.assert_close(got, expected, rtol=1e-2, atol=1e-2 * expected.abs().max().item())
