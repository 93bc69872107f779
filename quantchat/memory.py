"""Memory a Hugging Face model needs on its GPU, known before loading: weights, KV cache, activations.

Checked against peaks measured on an H100 (bench/results/decode-h100.json; tests/test_memory.py) and against
the usual guidance for Llama-2 7B/13B/70B (~14/26/140 GB fp16, ~7/13/70 GB int8, ~4-5/7-9/35-40 GB 4-bit).
"""
from __future__ import annotations

from dataclasses import dataclass

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
CUDA_CONTEXT = 512 * 2**20   # the driver's context, cuBLAS and cuDNN: outside torch's allocator, about this much
PREFILL_CHUNK = 2048         # tokens whose activations exist at once during a long prompt's prefill


@dataclass
class MemoryEstimate:
    weights: int
    kv_cache: int          # at the context the estimate was made for
    activations: int       # the largest prefill's hidden states and MLP intermediates
    context_tokens: int

    @property
    def allocated(self) -> int:
        """What torch's allocator holds at the peak (torch.cuda.max_memory_allocated)."""
        return self.weights + self.kv_cache + self.activations

    @property
    def total(self) -> int:
        """What the GPU must have free: the allocator's peak plus the CUDA context."""
        return self.allocated + CUDA_CONTEXT


def _size(c: dict, key: str) -> int | None:
    """A shape number of the config: a whole number above 0, else None (missing, null or damaged)."""
    value = c.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def shapes_from_config(c: dict) -> list[tuple[str, int]] | None:
    """Parameter counts of a Llama-family decoder, for hub ids whose files are not on disk."""
    hidden, layers, vocab, inter = (_size(c, k) for k in ("hidden_size", "num_hidden_layers", "vocab_size",
                                                          "intermediate_size"))
    if not (hidden and layers and vocab and inter):
        return None
    heads = _size(c, "num_attention_heads") or 1
    head_dim = _size(c, "head_dim") or hidden // heads
    kv = _size(c, "num_key_value_heads") or heads
    per_layer = hidden * head_dim * (2 * heads + 2 * kv) + 3 * hidden * inter
    shapes = [("model.embed_tokens.weight", vocab * hidden), ("model.layers.linear", per_layer * layers)]
    if not c.get("tie_word_embeddings", False):
        shapes.append(("lm_head.weight", vocab * hidden))
    return shapes


def packed_bytes_per_weight(quant_config: dict) -> float | None:
    """Bytes per weight of a GPTQ/AWQ-style packed Linear layer (bits and group_size from its quantization_config);
    None where the config does not say its bits."""
    if not quant_config.get("bits"):
        return None
    bits = float(quant_config["bits"])
    group = quant_config.get("group_size") or 0
    # an fp16 scale and a packed zero point per group (group_size -1: one group per column)
    per_group = (2 + bits / 8) / group if group and group > 0 else 0.0
    return bits / 8 + per_group


def weight_bytes(shapes: list[tuple[str, int]], dtype: str, linear_bytes: float | None = None) -> int:
    """Bytes of the loaded weights; `linear_bytes` per weight of the quantized Linear layers (None: the model's
    dtype). Quantization covers the Linear layers: not embeddings nor lm_head."""
    total = 0.0
    for name, count in shapes:
        linear = count > 0 and not any(k in name for k in ("embed", "lm_head", "wte", "wpe"))
        if linear and linear_bytes is not None:
            total += count * linear_bytes
        else:
            total += abs(count) * DTYPE_BYTES[dtype]
    return int(total)


def kv_cache_bytes(c: dict, context: int, dtype_bytes: float, batch: int = 1) -> int | None:
    heads, hidden, layers = _size(c, "num_attention_heads"), _size(c, "hidden_size"), _size(c, "num_hidden_layers")
    if not (heads and layers and (hidden or _size(c, "head_dim"))):
        return None
    head_dim = _size(c, "head_dim") or hidden // heads
    kv = _size(c, "num_key_value_heads") or heads
    return int(2 * layers * kv * head_dim * context * dtype_bytes * batch)


def activation_bytes(c: dict, context: int, dtype_bytes: float) -> int:
    """The largest prefill step: the residual stream and attention projections (about six hidden-sized tensors)
    and the MLP's gate, up and activated intermediates, for up to PREFILL_CHUNK tokens."""
    tokens = min(context, PREFILL_CHUNK)
    hidden, inter = _size(c, "hidden_size") or 0, _size(c, "intermediate_size") or 0
    return int(tokens * (6 * hidden + 3 * inter) * dtype_bytes)


def estimate(config: dict, shapes: list[tuple[str, int]], dtype: str, linear_bytes: float | None, context: int,
             batch: int = 1) -> MemoryEstimate | None:
    """The whole estimate for `context` tokens (prompt and answer) in each of `batch` sequences; `linear_bytes` as
    for weight_bytes."""
    kv = kv_cache_bytes(config, context, DTYPE_BYTES[dtype], batch)
    if kv is None:
        return None
    return MemoryEstimate(weight_bytes(shapes, dtype, linear_bytes), kv,
                          activation_bytes(config, context, DTYPE_BYTES[dtype]), context)
