"""The fast path's attention on CUDA: flex attention in the compiled verify step, PyTorch's SDPA everywhere else.

A verify step of speculative decoding asks attention for several queries (the token and its guesses) over the
cache. SDPA sends that to cuDNN's prefill kernel, which is slow for a handful of queries: one layer of the
Llama-3-8B shape on an H200 took 51.5 µs for 9 queries over 2,048 cached positions and 173.6 µs over 8,192, where
flex attention's decoding kernel took 19.1 and 34.9 (bench/results/kernels-h200.json). Inside a compiled step
transformers' SDPA call also copies the keys and values once per query head group (SDPA takes grouped heads only
without a mask), which flex reads as they are.

Where flex is not used, and why:
- the one-token step: torch 2.11's Inductor failed to compile the one-query flex kernel fused into the step on an
  H200 (the 8B shape in bf16; the tiny test Llama in fp32: "XBLOCK is not defined"), which took the fast path
  down with it;
- fp32: flex multiplies fp32 in TF32 unless matmuls are set to full precision, and the answers parted from
  SDPA's at logit gaps of 5e-4 to 1.6e-3 on the H200;
- everything that runs eagerly (prefill, generate): flex attention is fast only compiled.

The model runs under its own attention name, registered with transformers: every call that flex does not take
goes to transformers' SDPA function with SDPA's masks, unchanged. The flex call applies the same boolean mask that
SDPA would get (causal, and a sliding window where the model has one), so both compute the same attention, summed
in another order.
"""
from __future__ import annotations

NAME = "quantchat_sdpa_flex_verify"
BLOCK = 128  # flex attention's key/value block: the windows the fast path hands attention are multiples of it
# head sizes flex's kernels take at the sizes of a decode step (16 and 128 ran on an H200); 256 (Gemma 3) was not
# tried and stays on SDPA
HEAD_DIMS = (16, 32, 64, 128)


def use_flex_in_verify_steps(model) -> bool:
    """Switch a model that runs SDPA to SDPA-or-flex (above); False where it runs another attention or cannot
    switch."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    if model.config._attn_implementation != "sdpa" or not model._can_set_attn_implementation():
        return False
    AttentionInterface.register(NAME, sdpa_or_flex)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    model.set_attn_implementation(NAME)
    return model.config._attn_implementation == NAME


def sdpa_or_flex(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None,
                 **kwargs):
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    if torch.compiler.is_compiling() and _flex_takes(query, key, attention_mask, dropout, kwargs):
        return _flex(query, key, value, attention_mask, scaling), None
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  **kwargs)


def _flex_takes(query, key, attention_mask, dropout: float, extra: dict) -> bool:
    """Several queries of one sequence in half precision over a cache window of whole blocks, a boolean mask (no
    mask would mean SDPA's own causal rule, which counts from the cache's start), and nothing that flex's plain call
    would drop (a soft cap, attention sinks, a position bias, dropout)."""
    import torch
    plain = not dropout and all(extra.get(name) is None for name in ("softcap", "s_aux", "sinks", "position_bias"))
    mask_fits = attention_mask is not None and attention_mask.dtype == torch.bool and \
        attention_mask.shape[:2] == (1, 1)
    return (plain and mask_fits and query.shape[0] == 1 and query.shape[2] > 1 and key.shape[2] % BLOCK == 0
            and query.shape[-1] in HEAD_DIMS and query.dtype in (torch.bfloat16, torch.float16))  # (not fp32: above)


def _flex(query, key, value, attention_mask, scaling: float | None):
    """Attention [1, queries, heads, dim] (SDPA's function's layout) through flex attention: every key block is
    visited and the boolean mask applied inside each (the mask changes every step; its blocks' layout does not)."""
    import torch
    from torch.nn.attention.flex_attention import BlockMask, flex_attention
    queries, keys = query.shape[2], key.shape[2]
    allowed = attention_mask[0, 0]

    def mask_mod(batch, head, q, kv):
        return allowed[q, kv]
    blocks = keys // BLOCK
    block_mask = BlockMask.from_kv_blocks(
        torch.full((1, 1, 1), blocks, dtype=torch.int32, device=query.device),
        torch.arange(blocks, dtype=torch.int32, device=query.device).view(1, 1, 1, blocks),
        BLOCK_SIZE=BLOCK, mask_mod=mask_mod, seq_lengths=(queries, keys))
    out = flex_attention(query, key, value, block_mask=block_mask, scale=scaling,
                         enable_gqa=query.shape[1] != key.shape[1])
    return out.transpose(1, 2).contiguous()
