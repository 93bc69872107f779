"""Projections that read the same input (attention's q, k and v; the MLP's gate and up) run as one 4-bit matmul.

At batch 1 a 4-bit kernel reads a small matrix far below the GPU's bandwidth: on an H100, gptqmodel's Marlin
reads a 4096x4096 matrix at 0.83 TB/s and a 4096x22016 one at 1.94 TB/s, so 32 Llama-2-7B layers take
2.75 ms with seven matmuls each and 2.12 ms with four (bench/results/kernels-h100.json).

The model's own code is left as it is: it still calls q_proj, k_proj and v_proj, which become slices of one
shared layer. The first slice computes every output; the others reuse them when they get the same input
tensor, and compute again otherwise, so a model that calls them in another order or on other inputs still
gets the right answer. The last result is kept per thread (generate and the fast path's warm-up may run the
model at the same time); while the compiler traces a step, in an object it follows (compiled_4bit.py).

Only gptqmodel's GPTQ/AWQ layers are fused: their packed tensors concatenate along the output dimension.
Each fused layer is checked against its parts on a random input before it replaces them; a layer whose
kernel keeps another layout fails that check and is left as it was.
"""
from __future__ import annotations

import copy
import threading

import torch
from torch import nn

GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))  # transformers' names in Llama-like models
PER_OUTPUT = ("qweight", "qzeros", "scales", "bias")  # gptqmodel's tensors with the output dimension last
SAME_LAYOUT = ("in_features", "bits", "group_size", "desc_act", "sym")


class SharedProjection:
    """One layer computing several projections' outputs side by side."""

    def __init__(self, fused: nn.Module, sizes: list[int]):
        self.fused, self.sizes = fused, sizes
        self.last = threading.local()  # this thread's last (input, outputs)
        self.traced = LastResult()  # the same while the compiler traces a step (it follows this object, not a thread's)


class LastResult:
    """A group's last input and its outputs, until the group's last slice has taken its own."""
    input = outputs = None


class ProjectionSlice(nn.Module):
    def __init__(self, shared: SharedProjection, index: int):
        super().__init__()
        self.shared, self.index = shared, index
        self.fused = shared.fused if index == 0 else None  # registered once, so .to() and memory counts see it
        self.in_features, self.out_features = shared.fused.in_features, shared.sizes[index]

    def forward(self, x):
        if torch.compiler.is_compiling():
            return self._slice(self.shared.traced, x)
        return self._eager(x)

    @torch.compiler.disable
    def _eager(self, x):
        return self._slice(self.shared.last, x)

    def _slice(self, last, x):
        shared = self.shared
        if self.index == 0 or getattr(last, "input", None) is not x:
            last.input, last.outputs = x, shared.fused(x).split(shared.sizes, dim=-1)
        out = last.outputs[self.index]
        if self.index == len(shared.sizes) - 1:  # the activations are not kept past the group's last call
            last.input = last.outputs = None
        return out


def is_gptqmodel_layer(module: nn.Module) -> bool:
    return type(module).__module__.startswith("gptqmodel.nn_modules.qlinear.")


def fuse_projections(model: nn.Module) -> int:
    """Fuse every group of gptqmodel layers that read the same input; returns how many groups were fused."""
    dtype = model.get_input_embeddings().weight.dtype  # the activations' dtype
    fused = 0
    for parent in list(model.modules()):
        for names in GROUPS:
            parts = [getattr(parent, name, None) for name in names]
            if not all(part is not None and is_gptqmodel_layer(part) for part in parts):
                continue
            layer = concatenated(parts)
            if layer is None or not _same_outputs(layer, parts, dtype):
                continue
            shared = SharedProjection(layer, [part.out_features for part in parts])
            for index, name in enumerate(names):
                setattr(parent, name, ProjectionSlice(shared, index))
            fused += 1
    return fused


def concatenated(parts: list[nn.Module]) -> nn.Module | None:
    """One layer whose outputs are the parts' side by side; None where the parts do not share a layout."""
    first = parts[0]
    if any(type(part) is not type(first) or any(getattr(part, key, None) != getattr(first, key, None)
                                                for key in SAME_LAYOUT) for part in parts):
        return None
    if any(hasattr(part, "_hf_hook") for part in parts):  # spread or offloaded by accelerate: its hooks move weights
        return None
    layer = copy.copy(first)
    layer._parameters, layer._buffers = dict(first._parameters), dict(first._buffers)
    with torch.no_grad():
        for name in [*first._parameters, *first._buffers]:
            tensors = [getattr(part, name) for part in parts]
            if tensors[0] is None:
                continue
            if name in PER_OUTPUT:
                if any(t.shape[:-1] != tensors[0].shape[:-1] for t in tensors):
                    return None  # repacked by the kernel into another layout
                value = torch.cat(tensors, dim=-1)
            elif all(t.shape == tensors[0].shape and torch.equal(t, tensors[0]) for t in tensors[1:]):
                continue  # shared by every part (g_idx without act-order, Marlin's workspace ...)
            else:
                return None
            if name in first._parameters:
                layer._parameters[name] = nn.Parameter(value, requires_grad=False)
            else:
                layer._buffers[name] = value
    layer.out_features = sum(part.out_features for part in parts)
    return layer


def _same_outputs(layer: nn.Module, parts: list[nn.Module], dtype: torch.dtype) -> bool:
    """The fused layer gives the parts' outputs on a random input (to rounding: a kernel may split the sum
    differently for a wider matrix); a wrong layout gives unrelated numbers."""
    device = next(t.device for t in [*layer.parameters(), *layer.buffers()])
    random = torch.Generator(device).manual_seed(0)  # leaves the global generator (--seed) alone
    x = torch.randn(1, 4, layer.in_features, dtype=dtype, device=device, generator=random)
    with torch.inference_mode():
        expected = torch.cat([part(x) for part in parts], dim=-1).float()
        got = layer(x).float()
    return got.shape == expected.shape and bool(
        torch.allclose(got, expected, rtol=2e-2, atol=2e-2 * expected.abs().max().item()))
