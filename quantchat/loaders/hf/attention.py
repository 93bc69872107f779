"""The fast path's attention on CUDA: grouped heads without copies, and flex attention in the compiled verify step.

Grouped-query models (Llama 3, Qwen, Gemma: several query heads share one key/value head) meet SDPA with a mask
wherever the fast path attends over its cache window. Given a mask, transformers' SDPA function copies the keys and
values once per query head group (it lets SDPA take the groups only without a mask, and packs them itself only for
one query outside the compiler): in the captured one-token step of the Llama-3-8B shape on an H200 those copies took
260-489 µs a step at a 1,024-position window (two runs), and grow with it: at 7,000 positions the step took 7.74 ms
with them and 5.75 without (bench/results/verify-captured-h200-grouped.json). Instead, per call (one layer of the 8B
shape on an H200, bench/results/attention-grouped-h200.json and kernels-h200.json):
- in the compiled steps (half precision, captured with cuDNN allowed), SDPA takes the groups itself with the mask
  (`enable_gqa`), which cuDNN runs: 13.3-17.9 µs for one query over 512-8,192 positions, no copy;
- elsewhere (an eager prefill that continues the cache; cuDNN is left out there), the query heads of a group become
  rows of one query ("packed"), which SDPA's efficient kernel takes with the mask: for 9-64 queries 97-105 µs over
  2,048 positions against 132-143 copied. A long prompt (more than PACKED_ROWS_MOST rows) stays with transformers:
  a 2,048-token prefill took 648 µs packed against 604 copied.

A verify step of speculative decoding asks attention for several queries (the token and its guesses) over the
cache. SDPA sends that to cuDNN's prefill kernel, which is slow for a handful of queries: 51.5 µs for 9 queries
over 2,048 cached positions and 173.6 µs over 8,192, where flex attention's decoding kernel took 19.1 and 34.9.
The query heads of a group go to flex as rows of one query ("packed"), so that its decoding kernel takes any
group size: Inductor gives grouped heads to that kernel only where a group is a power of two, and otherwise to its
prefill kernel, one block per query head, which for Qwen2.5-0.5B's groups of 7 made the verify step's attention
3.97 of its 5.29 ms at 1,000 positions and the step 25x a one-token step at 7,000 (bench/results/
verify-captured-h200-qwen05-before.json).

A prompt step (up to 64 new tokens: a short prompt, or a chat's next turn) asks for more queries than flex's
decoding kernel takes. cuDNN's kernel gives one block of the GPU to each query head and walks the whole window in
it: 32 blocks for the Llama-3-8B shape on an H200's 132 multiprocessors, 184 µs a layer for 64 queries over 8,192
positions where reading those keys and values takes about 10. Over a long window such steps split the keys into
KEY_CHUNKS chunks handed to cuDNN as a batch ("split", as flash-decoding does), the query heads of a group packed into
the rows of one query as for flex: each chunk's attention comes back with its log-sum-exp, and the chunks are summed
weighted by it, which is the attention over the whole window.

Where flex is not used, and why:
- the one-token step: torch 2.11's Inductor failed to compile the one-query flex kernel fused into the step on an
  H200 (the 8B shape in bf16; the tiny test Llama in fp32: "XBLOCK is not defined"), which took the fast path
  down with it;
- fp32: flex multiplies fp32 in TF32 unless matmuls are set to full precision, and the answers parted from
  SDPA's at logit gaps of 5e-4 to 1.6e-3 on the H200;
- everything that runs eagerly (prefill, generate): flex attention is fast only compiled.

The model runs under its own attention name, registered with transformers: every call that none of these takes
goes to transformers' SDPA function with SDPA's masks, unchanged. All apply the boolean mask SDPA would get (causal,
and a sliding window where the model has one), so all compute the same attention, summed in another order.
"""
from __future__ import annotations

NAME = "quantchat_fast_path"
# what the registered attention does (bench/verify_step.py times the others): the verify step's attention through
# flex attention, and grouped heads "taken" by SDPA in compiled steps and packed elsewhere, or "packed" everywhere, or
# "copied" per group as transformers does
FLEX_IN_VERIFY_STEPS = True
GROUPED_HEADS = "taken"
PACKED_ROWS_MOST = 256  # a group's heads times the queries; measured better packed up to 4 x 64 (above)
BLOCK = 128  # flex attention's key/value block: the windows the fast path hands attention are multiples of it
# head sizes flex's kernels take at the sizes of a decode step (16 and 128 ran on an H200); 256 (Gemma 3) was not
# tried and stays on SDPA
HEAD_DIMS = (16, 32, 64, 128)
# the most queries flex serves: a verify step's width (9 measured). 64 (the captured prompt step of the Llama-3-8B
# shape, bf16) failed to compile on an H200 with torch 2.11 (Inductor: "NoValidChoicesError: No choices to select"
# for the flex kernel) and took the fast path down; steps that wide go to SDPA, which takes the groups itself
FLEX_QUERIES_MOST = 16
# flex's decoding kernel serves fewer query rows than this (Inductor's rule); packed, a group's heads times the queries
FLEX_DECODING_ROWS = 128
# steps over several queries that flex does not take split a window of at least SPLIT_FROM positions into this
# many chunks of keys (0: no split). A fixed count, whatever the window, keeps one compilation for every window. One
# layer of the Llama-3-8B shape on an H200, 64 queries, compiled (bench/results/attention-split-packed-h200.json):
# 52.7 µs against 185.4 unsplit over 8,192 positions, 29.8 against 57.0 over 2,048; 4 chunks were faster over 2,048
# (27.0), 16 for 9 queries over 8,192 (33.6 against 37.0); for 64 queries, 8 has the least time summed over both
KEY_CHUNKS = 8
SPLIT_FROM = 2048
# head sizes the split ran at on an H200 (64 and 128 in its GPU tests, 128 in the bench and the 8B's captured prompt
# step, 64 in Qwen2.5-0.5B's); others stay unsplit
SPLIT_HEAD_DIMS = (64, 128)
# the query heads of a group packed into the query rows of each chunk (_packed), so that cuDNN reads a chunk of keys
# and values once per key/value head instead of once per query head: 52.7 µs against 69.6 unpacked in the case above,
# 37.0 against 57.2 for 9 queries (same file). bench/kernels.py --split times both
SPLIT_PACKED = True


def use_fast_path_attention(model) -> bool:
    """Switch a model that runs SDPA to the fast path's attention (above); False where it runs another attention or
    cannot switch."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    if model.config._attn_implementation != "sdpa" or not model._can_set_attn_implementation():
        return False
    AttentionInterface.register(NAME, fast_path_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    model.set_attn_implementation(NAME)
    return model.config._attn_implementation == NAME


def fast_path_attention(module, query, key, value, attention_mask, dropout: float = 0.0,
                        scaling: float | None = None, **kwargs):
    import torch
    return attend(module, query, key, value, attention_mask, torch.compiler.is_compiling(), dropout, scaling, **kwargs)


def attend(module, query, key, value, attention_mask, compiling: bool, dropout: float = 0.0,
           scaling: float | None = None, **kwargs):
    """The attention of one layer's call (the module's rules above), in SDPA's function's layout and return."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    if FLEX_IN_VERIFY_STEPS and compiling and _flex_takes(query, key, attention_mask, dropout, kwargs):
        return _flex(query, key, value, attention_mask, scaling), None
    if KEY_CHUNKS and compiling and _split_takes(query, key, attention_mask, dropout, kwargs):
        return _split_sdpa(query, key, value, attention_mask, scaling), None
    if GROUPED_HEADS != "copied" and _grouped(query, key, attention_mask, dropout, kwargs):
        if GROUPED_HEADS == "taken" and compiling and _cudnn_fits(query):
            return _grouped_sdpa(query, key, value, attention_mask, scaling), None
        if query.shape[1] // key.shape[1] * query.shape[2] <= PACKED_ROWS_MOST:
            return _packed_sdpa(query, key, value, attention_mask, scaling), None
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  **kwargs)


def _plain(dropout: float, extra: dict) -> bool:
    """Nothing that a plain attention call would drop: a soft cap, attention sinks, a position bias, dropout."""
    return not dropout and all(extra.get(name) is None for name in ("softcap", "s_aux", "sinks", "position_bias"))


def _grouped(query, key, attention_mask, dropout: float, extra: dict) -> bool:
    """Grouped heads with one mask for every head (without a mask transformers lets SDPA take the groups itself)."""
    return (_plain(dropout, extra) and attention_mask is not None and attention_mask.shape[1] == 1
            and query.shape[1] != key.shape[1] and query.shape[1] % key.shape[1] == 0)


def _cudnn_fits(query) -> bool:
    """cuDNN's attention takes it: half precision (it has no fp32 kernel, and without it SDPA would fall back to its
    math, which copies the groups again); head sizes up to 128 (256, Gemma 3's, was not measured)."""
    import torch
    return query.dtype in (torch.bfloat16, torch.float16) and query.shape[-1] <= 128


def _grouped_sdpa(query, key, value, attention_mask, scaling: float | None):
    """SDPA taking the groups itself, in SDPA's function's layout [batch, queries, heads, dim]."""
    import torch
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask[:, :, :, :key.shape[2]], scale=scaling, enable_gqa=True)
    return out.transpose(1, 2).contiguous()


def _packed(query, kv_heads: int):
    """Query heads [batch, heads, queries, dim] packed per key/value head: [batch, key/value heads, group x queries,
    dim]. Query head h goes with key/value head h // group (as transformers' repeat_kv pairs them), its rows after
    those of the heads before it in the group: row = head in group x queries + query."""
    batch, heads, queries, dim = query.shape
    return query.reshape(batch, kv_heads, heads // kv_heads * queries, dim)


def _packed_mask(mask, groups: int):
    """A mask [rows, 1, queries, keys] for query heads packed per key/value head (_packed): each head of a group
    repeats the queries' rows, [rows, 1, groups x queries, keys]."""
    return mask[:, :, None].expand(-1, -1, groups, -1, -1).flatten(2, 3)


def _unpacked(out, query):
    """Packed attention output back in SDPA's function's layout, [batch, queries, heads, dim]."""
    return out.reshape(query.shape).transpose(1, 2).contiguous()


def _packed_sdpa(query, key, value, attention_mask, scaling: float | None):
    """SDPA over the query heads packed per key/value head (_packed), in SDPA's function's layout."""
    import torch
    queries, kv_heads, keys = query.shape[2], key.shape[1], key.shape[2]
    groups = query.shape[1] // kv_heads
    mask = attention_mask[:, :, :, :keys]
    if queries > 1:  # (one query's mask row serves every head of the group as it is)
        mask = _packed_mask(mask, groups)
    out = torch.nn.functional.scaled_dot_product_attention(_packed(query, kv_heads), key, value, attn_mask=mask,
                                                           scale=scaling)
    return _unpacked(out, query)


def flex_fits(head_dim: int, dtype) -> bool:
    """Flex attention's verify step serves this head size and precision (not fp32: above)."""
    import torch
    return head_dim in HEAD_DIMS and dtype in (torch.bfloat16, torch.float16)


def _one_boolean_mask(attention_mask) -> bool:
    """A boolean mask shared by the batch's one sequence and every head (no mask would mean SDPA's own causal rule,
    which counts from the cache's start)."""
    import torch
    return attention_mask is not None and attention_mask.dtype == torch.bool and attention_mask.shape[:2] == (1, 1)


def _flex_takes(query, key, attention_mask, dropout: float, extra: dict) -> bool:
    """Several queries (up to FLEX_QUERIES_MOST) of one sequence over a cache window of whole blocks, few enough rows
    packed for flex's decoding kernel, one boolean mask, and nothing a plain call drops."""
    heads, queries, kv_heads = query.shape[1], query.shape[2], key.shape[1]
    packed_rows_fit = heads % kv_heads == 0 and heads // kv_heads * queries < FLEX_DECODING_ROWS
    return (_plain(dropout, extra) and _one_boolean_mask(attention_mask) and query.shape[0] == 1
            and 1 < queries <= FLEX_QUERIES_MOST and packed_rows_fit and key.shape[2] % BLOCK == 0
            and flex_fits(query.shape[-1], query.dtype))


def _flex(query, key, value, attention_mask, scaling: float | None):
    """Attention [1, queries, heads, dim] (SDPA's function's layout) through flex attention's decoding kernel, the
    query heads packed per key/value head (_packed): every key block is visited and the boolean mask applied inside
    each (the mask changes every step; its blocks' layout does not)."""
    import torch
    from torch.nn.attention.flex_attention import BlockMask, flex_attention
    queries, keys = query.shape[2], key.shape[2]
    packed = _packed(query, key.shape[1])
    allowed = attention_mask[0, 0]

    def mask_mod(batch, head, row, kv):
        return allowed[row % queries, kv]
    blocks = keys // BLOCK
    block_mask = BlockMask.from_kv_blocks(
        torch.full((1, 1, 1), blocks, dtype=torch.int32, device=query.device),
        torch.arange(blocks, dtype=torch.int32, device=query.device).view(1, 1, 1, blocks),
        BLOCK_SIZE=BLOCK, mask_mod=mask_mod, seq_lengths=(packed.shape[2], keys))
    return _unpacked(flex_attention(packed, key, value, block_mask=block_mask, scale=scaling), query)


def _split_takes(query, key, attention_mask, dropout: float, extra: dict) -> bool:
    """Several queries of one sequence, grouped or not, on cuDNN (CUDA, half precision, SPLIT_HEAD_DIMS), over a
    window of at least SPLIT_FROM positions that KEY_CHUNKS chunks of whole 8-position rows divide (cuDNN's
    alignment), a boolean mask."""
    keys = key.shape[2]
    return (_plain(dropout, extra) and _one_boolean_mask(attention_mask) and query.is_cuda and _cudnn_fits(query)
            and query.shape[0] == 1 and query.shape[2] > 1 and query.shape[1] % key.shape[1] == 0
            and query.shape[-1] in SPLIT_HEAD_DIMS and keys >= SPLIT_FROM and keys % (KEY_CHUNKS * 8) == 0)


def _cudnn_with_lse(query, key, value, bias, scaling: float | None):
    """cuDNN's attention (grouped heads taken as they are) and its log-sum-exp per query row: [batch, heads, queries,
    dim] and [batch, heads, queries, 1] (fp32). SDPA does not return the log-sum-exp; its cuDNN kernel does, through
    this private op (alike in torch 2.11, the GPU's, and 2.13); a release that changes it fails the wide steps' compilation,
    which turns them off at warm-up (fast_decode.py), not the fast path."""
    import torch
    out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(
        query, key, value, bias, True, 0.0, False, False, scale=scaling)[:2]
    return out, lse.reshape(*out.shape[:3], 1)


def _split_sdpa(query, key, value, attention_mask, scaling: float | None, chunk_attention=_cudnn_with_lse):
    """Attention over KEY_CHUNKS chunks of the window as one batch (`chunk_attention`: each chunk's output and
    log-sum-exp), summed weighted by the chunks' share of the softmax, in SDPA's function's layout. With SPLIT_PACKED
    the query heads of a group go in as rows of one query (_packed), so that each chunk of keys and values is read
    once per key/value head rather than once per query head. A chunk with no position a query may see (past the
    sequence so far) gets the smallest finite bias instead of minus infinity: its share is then exactly 0 instead of
    a NaN from a softmax over nothing."""
    import torch
    kv_heads, keys = key.shape[1], key.shape[2]
    chunk = keys // KEY_CHUNKS

    def chunked(t):  # [rows, keys, ...] -> [chunks, rows, chunk, ...], a view (of the cache, for keys and values)
        return t.unflatten(1, (KEY_CHUNKS, chunk)).transpose(0, 1)
    allowed = chunked(attention_mask[0, 0, :, :keys])[:, None]  # [chunks, 1, queries, chunk]
    rows = query
    if SPLIT_PACKED:
        rows, allowed = _packed(query, kv_heads), _packed_mask(allowed, query.shape[1] // kv_heads)
    bias = torch.where(allowed, 0.0, torch.finfo(query.dtype).min).to(query.dtype).contiguous()
    out, lse = chunk_attention(rows.expand(KEY_CHUNKS, *rows.shape[1:]).contiguous(), chunked(key[0]),
                               chunked(value[0]), bias, scaling)
    share = torch.softmax(lse.float(), dim=0)  # [chunks, heads or key/value heads, rows, 1]
    merged = (out.float() * share).sum(0, keepdim=True).to(query.dtype)
    return _unpacked(merged, query) if SPLIT_PACKED else merged.transpose(1, 2).contiguous()
