"""Batch-1 4-bit matmul kernels and decode attention on the GPU, per shape: which one reads weights fastest.

  python bench/kernels.py --out=bench/results/kernels-h200.json
  python bench/kernels.py --kernels=marlin --out=FILE   (one candidate; a run that waits for Marlin's build)

Matmuls: 32 layers of distinct random weights (so that no matrix is served from the L2 cache) with q/k/v and
gate/up fused, as quantchat/loaders/hf/fused_projections.py runs them, for the Llama-2-7B and Llama-3-8B shapes.
Each layer set is captured in one CUDA graph and replayed, for 1 token (decoding) and for the few tokens of a
speculative verify step. Candidates, all 4-bit with group size 128 and bf16 activations:
  marlin    gptqmodel's Marlin (what GPTQ/AWQ checkpoints ran on before)
  tinygemm  PyTorch's own int4 kernel (aten._weight_int4pack_mm; torchao's int4 weight-only on CUDA)
  gemlite   GemLite's Triton kernels (GEMV for 1 token, split-K GEMM for a few), tuned on this GPU
  nf4       bitsandbytes' NF4 with double quantization (--load_4bit)
  bf16      the unquantized matmul, for scale
GB/s counts the bytes each kernel must read: packed weights plus its scales and zeros. Attention: one layer of the
8B shape (32 query heads, 8 key/value heads) over 512-8,192 cached positions, per backend of PyTorch's SDPA and
flex attention; `--grouped`: grouped heads with a mask (quantchat/loaders/hf/attention.py) taken by SDPA itself,
packed into the query rows, or keys and values copied per group as transformers' SDPA function does, from one query
to a 2,048-token prefill, with cuDNN allowed (the captured steps) and left out (eager prefill); `--split`: cuDNN over
the whole window against the window split into chunks of keys, for the few queries of verify and prompt steps;
`--flash`: what the steps' attention runs now against FlashAttention 2's variable-length entry point, as PyTorch
ships it.
"""
from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.decode import SHAPES, installed, measured_bandwidth, nominal_bandwidth  # noqa: E402

GROUP, LAYERS = 128, 32
MODELS = ("llama2-7b", "llama3-8b")
VERIFY_TOKENS = (1, 2, 3, 5, 9)  # a one-token step and verify steps of k = 1, 2, 4, 8 guesses
CONTEXTS = (512, 2048, 8192)


def fused_shapes(model: str) -> list[tuple[int, int]]:
    """(in, out) of one layer's four matmuls: q/k/v, o, gate/up, down."""
    s = SHAPES[model]
    hidden, ffn = s["hidden_size"], s["intermediate_size"]
    kv = hidden // s["num_attention_heads"] * s["num_key_value_heads"]
    return [(hidden, hidden + 2 * kv), (hidden, hidden), (hidden, 2 * ffn), (ffn, hidden)]


def graph_ms(work, replays: int = 20) -> float:
    """Milliseconds per replay of `work` captured in a CUDA graph."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            work()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        work()
    graph.replay()
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(replays):
        graph.replay()
    torch.cuda.synchronize()
    return (time.perf_counter() - started) / replays * 1e3


def random_gptq(k: int, n: int):
    """A GPTQ-style 4-bit matrix: values 0..15 as (n, k) uint8, bf16 scales per group of 128 inputs."""
    values = torch.randint(0, 16, (n, k), dtype=torch.uint8, device="cuda")
    scales = torch.rand(n, k // GROUP, dtype=torch.bfloat16, device="cuda") * 0.01
    return values, scales


def marlin(k: int, n: int):
    from gptqmodel.nn_modules.qlinear.marlin import MarlinLinear
    layer = MarlinLinear(bits=4, group_size=GROUP, desc_act=False, sym=True, in_features=k, out_features=n,
                         bias=False, dtype=torch.bfloat16)
    layer.qweight.data = torch.randint(-2**31, 2**31 - 1, (k // 8, n), dtype=torch.int32)
    layer.scales.data = torch.rand(k // GROUP, n, dtype=torch.bfloat16) * 0.01
    layer.qzeros.data = torch.zeros(k // GROUP, n // 8, dtype=torch.int32)
    layer.g_idx.data = torch.zeros(k, dtype=torch.int32)
    layer = layer.cuda()
    layer.post_init()  # repacks for Marlin, as at load
    return layer


def tinygemm(k: int, n: int):
    packed = torch.ops.aten._convert_weight_to_int4pack(
        torch.randint(0, 255, (n, k // 2), dtype=torch.uint8, device="cuda"), 8)
    scales_and_zeros = torch.rand(k // GROUP, n, 2, dtype=torch.bfloat16, device="cuda")
    return lambda x: torch.ops.aten._weight_int4pack_mm(x, packed, GROUP, scales_and_zeros)


def gemlite(k: int, n: int):
    from gemlite.helper import A16Wn
    values, scales = random_gptq(k, n)
    zeros = torch.full_like(scales, 8)  # GPTQ's symmetric zero point
    return A16Wn(device="cuda", dtype=torch.bfloat16).from_weights(values, scales, zeros, W_nbits=4, group_size=GROUP)


def nf4(k: int, n: int):
    import bitsandbytes as bnb
    weight, state = bnb.functional.quantize_4bit(torch.randn(n, k, dtype=torch.bfloat16, device="cuda"),
                                                 quant_type="nf4", compress_statistics=True)
    return lambda x: bnb.matmul_4bit(x, weight.t(), quant_state=state)


def bf16(k: int, n: int):
    weight = torch.randn(n, k, dtype=torch.bfloat16, device="cuda")
    return lambda x: torch.nn.functional.linear(x, weight)


KERNELS = {"marlin": marlin, "tinygemm": tinygemm, "gemlite": gemlite, "nf4": nf4, "bf16": bf16}


def bytes_read(kernel: str, k: int, n: int) -> int:
    """What one matmul must read: the packed weights and what dequantizes them."""
    if kernel == "bf16":
        return 2 * k * n
    if kernel == "nf4":  # one 8-bit absmax per 64 weights (double quantization), fp32 per 256 of those
        return k * n // 2 + k * n // 64 + k * n // 64 // 256 * 4
    per_group = {"marlin": 2, "gemlite": 4, "tinygemm": 4}[kernel]  # scales (and zeros) per group of 128
    return k * n // 2 + k // GROUP * n * per_group


def measure_matmuls(kernel: str, model: str, bandwidth: float) -> dict:
    shapes = fused_shapes(model)
    make = KERNELS[kernel]
    started = time.perf_counter()
    layers = [[make(k, n) for k, n in shapes] for _ in range(LAYERS)]
    inputs = {tokens: {k: torch.randn(tokens, k, device="cuda", dtype=torch.bfloat16) for k, _ in shapes}
              for tokens in VERIFY_TOKENS}
    total_bytes = LAYERS * sum(bytes_read(kernel, k, n) for k, n in shapes)
    steps = {}
    for tokens in VERIFY_TOKENS:
        def every_layer(x=inputs[tokens], layers=layers):
            for layer in layers:
                for (k, _), matmul in zip(shapes, layer, strict=True):
                    matmul(x[k])
        ms = graph_ms(every_layer)
        steps[tokens] = {"ms": round(ms, 3), "gb_s": round(total_bytes / ms / 1e6)}
    one = steps[1]["ms"]
    for step in steps.values():
        step["over_one_token"] = round(step["ms"] / one, 2)
    per_shape = {}
    for index, (k, n) in enumerate(shapes):
        same = [layer[index] for layer in layers]
        ms = graph_ms(lambda same=same, x=inputs[1][k]: [matmul(x) for matmul in same])
        per_shape[f"{k}x{n}"] = {"us": round(ms / LAYERS * 1e3, 1),
                                 "gb_s": round(bytes_read(kernel, k, n) * LAYERS / ms / 1e6)}
    result = {"bytes_per_token": total_bytes, "tokens": steps, "shapes": per_shape,
              "of_measured_bandwidth": round(total_bytes / (steps[1]["ms"] / 1e3) / bandwidth, 3),
              "setup_s": round(time.perf_counter() - started, 1)}
    del layers
    torch.cuda.empty_cache()
    return result


def attention_inputs(queries: int, context: int, filled: int | None = None):
    """One layer of the 8B shape's attention in bf16 (32 query heads, 8 key/value heads): queries at the last of
    `filled` (all `context`) cached positions, and the boolean mask that lets each see the cache up to itself."""
    s = SHAPES["llama3-8b"]
    heads, kv_heads = s["num_attention_heads"], s["num_key_value_heads"]
    dim = s["hidden_size"] // heads
    q = torch.randn(1, heads, queries, dim, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(1, kv_heads, context, dim, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    filled = filled or context
    mask = (torch.arange(context, device="cuda")[None, :]
            <= torch.arange(filled - queries, filled, device="cuda")[:, None])[None, None]
    return q, k, v, mask


def call_us(call) -> float | str:
    """Microseconds per call of `call` captured in a CUDA graph, or why no kernel took its inputs."""
    try:
        return round(graph_ms(call, replays=200) * 1e3, 1)
    except RuntimeError as e:
        return str(e).splitlines()[0][:100]


def attention_row(flex, q, k, v, mask) -> dict:
    """Microseconds per call of each attention backend (attention_inputs)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.flex_attention import create_block_mask
    queries, context = q.shape[2], k.shape[2]
    offset = context - queries
    backends = {"sdpa flash": SDPBackend.FLASH_ATTENTION, "sdpa cudnn": SDPBackend.CUDNN_ATTENTION,
                "sdpa efficient": SDPBackend.EFFICIENT_ATTENTION, "sdpa math": SDPBackend.MATH}
    row = {}
    for name, backend in backends.items():
        for masked in (False, True) if queries == 1 else (True,):
            def call(backend=backend, masked=masked):
                with sdpa_kernel(backend):
                    torch.nn.functional.scaled_dot_product_attention(
                        q, k, v, attn_mask=mask if masked else None, enable_gqa=True)
            row[f"{name}{' masked' if masked else ''}"] = call_us(call)
    block_mask = create_block_mask(lambda b, h, qi, ki: ki <= qi + offset, None, None, queries, context)
    try:
        flex(q, k, v, block_mask=block_mask, enable_gqa=True)
        row["flex attention"] = round(
            graph_ms(lambda: flex(q, k, v, block_mask=block_mask, enable_gqa=True), replays=200) * 1e3, 1)
    except Exception as e:  # noqa: BLE001 - a compile failure is a result here
        row["flex attention"] = f"{type(e).__name__}: {str(e).splitlines()[0][:100]}"
    return row


def measure_attention() -> dict:
    """One layer of the 8B shape's decode attention, microseconds per call, per backend and context length."""
    from torch.nn.attention.flex_attention import flex_attention
    flex = torch.compile(flex_attention, dynamic=False)
    result = {}
    for context in CONTEXTS:
        for queries in (1, 9):
            row = attention_row(flex, *attention_inputs(queries, context))
            result[f"{context} cached, {queries} queries"] = row
            print(context, queries, row, flush=True)
    return result


def measure_grouped_attention() -> dict:
    """One layer of the 8B shape's attention over its cache with a mask, microseconds per call: grouped heads taken
    by SDPA, packed, or copied per group, for 1 to 64 queries at 512-8,192 cached positions and a 2,048-token
    prefill, with cuDNN allowed and not."""
    import types

    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from quantchat.loaders.hf.attention import _grouped_sdpa, _packed_sdpa
    cases = [(context, queries) for context in CONTEXTS for queries in (1, 9, 16, 64)] + [(2048, 2048)]
    result = {}
    for context, queries in cases:
        q, k, v, mask = attention_inputs(queries, context)
        module = types.SimpleNamespace(num_key_value_groups=q.shape[1] // k.shape[1], is_causal=True, training=False)
        row = {}
        for cudnn in (True, False):
            torch.backends.cuda.enable_cudnn_sdp(cudnn)
            for name, call in (("taken", functools.partial(_grouped_sdpa, q, k, v, mask, None)),
                               ("packed", functools.partial(_packed_sdpa, q, k, v, mask, None)),
                               ("copied", functools.partial(sdpa_attention_forward, module, q, k, v, mask))):
                row[f"{name}{', cuDNN allowed' if cudnn else ''}"] = call_us(call)
        torch.backends.cuda.enable_cudnn_sdp(True)
        result[f"{context} cached, {queries} queries"] = row
        print(context, queries, row, flush=True)
    return result


def measure_split_attention(chunk_counts=(4, 8, 16)) -> dict:
    """One layer of the 8B shape's attention for a few queries over 2,048 and 8,192 cached positions, microseconds per
    call: cuDNN over the whole window ("taken", as compiled steps ran it before) and split into chunks of keys
    (quantchat/loaders/hf/attention.py), compiled as the steps run it: in 8 chunks, and with the query heads of a group
    packed into the query rows in each of `chunk_counts`, with the largest difference of each from fp32 SDPA."""

    from quantchat.loaders.hf import attention
    compiled = torch.compile(attention._split_sdpa, dynamic=False)  # (traced again per chunk count and packing)
    torch._dynamo.config.recompile_limit = 64  # (one tracing per shape and variant)
    result = {}
    for context in (2048, 8192):
        for queries in (9, 64):
            q, k, v, mask = attention_inputs(queries, context)
            calls = {"taken": functools.partial(attention._grouped_sdpa, q, k, v, mask, None)}
            for chunks, packed in [(8, False)] + [(chunks, True) for chunks in chunk_counts]:
                calls[f"split in {chunks}{', packed' if packed else ''}, compiled"] = functools.partial(
                    _split_as, compiled, chunks, packed, q, k, v, mask)
            row = timed_against_fp32({name: functools.partial(_on_cudnn, call) for name, call in calls.items()},
                                     q, k, v, mask)
            result[f"{context} cached, {queries} queries"] = row
            print(context, queries, row, flush=True)
    return result


def timed_against_fp32(calls: dict, q, k, v, mask) -> dict:
    """Microseconds per call of each of `calls` (name: call over q, k, v, mask) and its largest difference from fp32
    SDPA over the same inputs; a call that fails gives why."""
    from transformers.integrations.sdpa_attention import repeat_kv
    groups = q.shape[1] // k.shape[1]
    expected = torch.nn.functional.scaled_dot_product_attention(
        q.float(), *(repeat_kv(t.float(), groups) for t in (k, v)), attn_mask=mask).transpose(1, 2)
    row = {}
    for name, call in calls.items():
        try:
            difference = float(f"{(call().float() - expected).abs().max():.2g}")
        except Exception as e:  # noqa: BLE001 - a call that fails is a result here
            row[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
            continue
        row[name], row[f"{name}, largest difference"] = call_us(call), difference
    return row


def flash_attention(query, key, value, attention_mask, scaling: float | None = None):
    """FlashAttention 2 as PyTorch ships it, a candidate for the fast path's steps: its variable-length entry point
    stops at a count of keys (`seqused_k`, here from the mask's last row), its causal rule aligned to the last key, so
    the window goes in as it lies in the cache with no mask; for one query it packs a group's heads into rows and
    splits the keys across the GPU (flash-decoding). torch 2.11's takes no page table (2.13's does). Queries
    [1, heads, n, dim] over [1, key/value heads, window, dim], out in SDPA's function's layout [1, n, heads, dim]."""
    queries, keys, device = query.shape[2], key.shape[2], query.device
    used = attention_mask[0, 0, -1].sum(dtype=torch.int32).view(1)  # the last query's position + 1
    out = torch.ops.aten._flash_attention_forward(
        query[0].transpose(0, 1), key[0].transpose(0, 1), value[0].transpose(0, 1),
        torch.arange(0, 2 * queries, queries, dtype=torch.int32, device=device),
        torch.arange(0, 2 * keys, keys, dtype=torch.int32, device=device), queries, keys, 0.0, queries > 1, False,
        scale=scaling, seqused_k=used)[0]
    return out.unsqueeze(0)


def measure_flash_attention() -> dict:
    """One layer of the 8B shape's attention as the fast path's steps call it, compiled, microseconds per call: what
    the product runs now (attention.attend: cuDNN for one query, flex for a verify step, the split for a prompt step
    over a long window) against FlashAttention 2's variable-length entry point (flash_attention), for 1, 9 and 64 queries
    in windows of 512-8,192 positions filled to 7/8 (a window is longer than the text), with the largest difference of
    each from fp32 SDPA."""
    import types

    from quantchat.loaders.hf import attention
    torch._dynamo.config.recompile_limit = 64
    now = torch.compile(lambda *a: attention.attend(*a, True)[0], dynamic=False)
    flash = torch.compile(flash_attention, dynamic=False)
    result = {}
    for context in CONTEXTS:
        filled = context * 7 // 8
        for queries in (1, 9, 64):
            q, k, v, mask = attention_inputs(queries, context, filled)
            module = types.SimpleNamespace(num_key_value_groups=q.shape[1] // k.shape[1], is_causal=True, training=False)
            row = timed_against_fp32({"now": functools.partial(now, module, q, k, v, mask),
                                      "flash": functools.partial(flash, q, k, v, mask, None)}, q, k, v, mask)
            result[f"{context} window, {filled} filled, {queries} queries"] = row
            print(context, queries, row, flush=True)
    return result


def _on_cudnn(call):
    """call() with SDPA on cuDNN alone (the fp32 reference it is compared with needs another backend)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        return call()


def _split_as(split, chunks: int, packed: bool, *args):
    """`split` (attention._split_sdpa, compiled or not) in `chunks` chunks, packed or not: the product reads both as
    module constants (a compiled step traces them), so they are set for the call."""
    from quantchat.loaders.hf import attention
    before = attention.KEY_CHUNKS, attention.SPLIT_PACKED
    attention.KEY_CHUNKS, attention.SPLIT_PACKED = chunks, packed
    try:
        return split(*args, None)
    finally:
        attention.KEY_CHUNKS, attention.SPLIT_PACKED = before


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--kernels", default=",".join(KERNELS), help=f"comma-separated, of {', '.join(KERNELS)}")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--attention", action="store_true", help="also time decode attention")
    parser.add_argument("--grouped", action="store_true", help="also time grouped queries packed against copied")
    parser.add_argument("--split", action="store_true", help="also time attention split into chunks of keys")
    parser.add_argument("--flash", action="store_true", help="also time FlashAttention 2 against what runs now")
    args = parser.parse_args()
    bandwidth = measured_bandwidth()
    result = {"date": time.strftime("%Y-%m-%d"), "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
              "versions": {p: installed(p) for p in ("gptqmodel", "gemlite", "bitsandbytes", "triton")},
              "layers": LAYERS, "group_size": GROUP, "copy_gb_s": round(bandwidth / 1e9),
              "nominal_gb_s": (nominal := nominal_bandwidth()) and round(nominal / 1e9), "matmuls": {}}
    for kernel in filter(None, args.kernels.split(",")):
        for model in args.models.split(","):
            try:
                row = measure_matmuls(kernel, model, bandwidth)
            except Exception as e:  # noqa: BLE001 - a kernel that fails to build or run is a result here
                row = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"}
            result["matmuls"].setdefault(kernel, {})[model] = row
            print(kernel, model, json.dumps(row), flush=True)
            Path(args.out).write_text(json.dumps(result, indent=1))
    if "gemlite" in result["matmuls"]:  # its choices of tile sizes on this GPU, for loading without tuning again
        from gemlite.core import GemLiteLinear
        GemLiteLinear.cache_config(str(Path(args.out).with_suffix(".gemlite-config.json")))
    if args.attention:
        result["attention_us"] = measure_attention()
    if args.grouped:
        result["grouped_attention_us"] = measure_grouped_attention()
    if args.split:
        result["split_attention_us"] = measure_split_attention()
    if args.flash:
        result["flash_attention_us"] = measure_flash_attention()
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
