"""4-bit layers (gptqmodel's GPTQ/AWQ, bitsandbytes' NF4/FP4) as one operator each in the fast path's compiled steps,
so the compiler traces the step whole instead of stopping at every 4-bit layer.

torch.compile cannot trace gptqmodel's layers (Python around the kernel: a scratch-buffer context, dtype checks) or
bitsandbytes' (its quantization state), and the fused projections' slices (fused_projections.py) kept their state
outside it. Each such layer ended a compiled piece: a Llama-2-7B GPTQ step ran as hundreds of pieces, 477 kernels
a token against bf16's 351, with the pointwise work between two 4-bit matmuls (SiLU, the product with up, the
residual sum) in kernels of its own instead of fused (bench/results/decode-h100-7b-hf.json: `triton_poi_fused_silu_0`,
`_mul_0`, `_add_0`, one per layer each).

Here each layer's call is a custom operator (`quantchat::four_bit_linear`) that the compiler takes as one opaque call
of known output shape, and the slices keep their state where the compiler follows it while tracing. Outside
compilation (generate, the warm-up's checks) the layers run as before.
"""
from __future__ import annotations

import itertools
import weakref

import torch
from torch import nn

from .fused_projections import ProjectionSlice, is_gptqmodel_layer

# the layers the operator runs, by number (weakly: a closed model's layers go with it)
_LAYERS: weakref.WeakValueDictionary[int, nn.Module] = weakref.WeakValueDictionary()
_NUMBERS = itertools.count()


@torch.library.custom_op("quantchat::four_bit_linear", mutates_args=())
def four_bit_linear(x: torch.Tensor, layer: int) -> torch.Tensor:
    return _LAYERS[layer](x)


@four_bit_linear.register_fake
def _(x: torch.Tensor, layer: int) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], _LAYERS[layer].out_features))


def is_four_bit_layer(module: nn.Module) -> bool:
    """A layer the compiler stops at: gptqmodel's, or bitsandbytes' 4-bit."""
    return is_gptqmodel_layer(module) or (type(module).__name__ == "Linear4bit"
                                          and type(module).__module__.startswith("bitsandbytes."))


class OneOperator(nn.Module):
    """A 4-bit layer that compiled code calls through `four_bit_linear`."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer
        self.in_features, self.out_features = layer.in_features, layer.out_features
        self.number = next(_NUMBERS)
        _LAYERS[self.number] = layer

    def forward(self, x):
        if torch.compiler.is_compiling():
            return torch.ops.quantchat.four_bit_linear(x, self.number)
        return self.layer(x)


def as_operators(model: nn.Module) -> int:
    """Wrap every 4-bit layer of the model, the fused projections' shared layers included; returns how many."""
    wrapped = 0
    for parent in list(model.modules()):
        if isinstance(parent, ProjectionSlice) and parent.index == 0 and is_four_bit_layer(parent.shared.fused):
            parent.shared.fused = parent.fused = OneOperator(parent.shared.fused)
            wrapped += 1
        for name, child in list(parent.named_children()):
            if is_four_bit_layer(child) and not isinstance(parent, (ProjectionSlice, OneOperator)):
                setattr(parent, name, OneOperator(child))
                wrapped += 1
    return wrapped
