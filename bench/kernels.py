"""Batch-1 4-bit matmuls of the Llama-2-7B shape on the GPU: the projections separate or fused.

  python bench/kernels.py --out=bench/results/kernels-h100.json

32 layers of distinct random weights (so that no matrix is served from the L2 cache), each layer's matmuls
captured in one CUDA graph and replayed: gptqmodel's Marlin (the GPTQ/AWQ kernel quantchat loads on CUDA) with
seven matmuls per layer (q, k, v, o, gate, up, down) and with four (q/k/v and gate/up fused, as
quantchat/loaders/hf/fused_projections.py runs them), then the same for PyTorch's own int4 kernel (tinygemm, what
torchao's int4 weight-only uses), and the time of each matrix shape alone. Group size 128, bf16 activations.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.decode import measured_bandwidth  # noqa: E402

HIDDEN, FFN, LAYERS, GROUP = 4096, 11008, 32, 128
LAYOUTS = {"separate": [(HIDDEN, HIDDEN)] * 4 + [(HIDDEN, FFN)] * 2 + [(FFN, HIDDEN)],
           "fused": [(HIDDEN, 3 * HIDDEN), (HIDDEN, HIDDEN), (HIDDEN, 2 * FFN), (FFN, HIDDEN)]}


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


def marlin_layer(k: int, n: int):
    """A GPTQ 4-bit layer with random packed weights, repacked for Marlin as at load."""
    from gptqmodel.nn_modules.qlinear.marlin import MarlinLinear
    layer = MarlinLinear(bits=4, group_size=GROUP, desc_act=False, sym=True, in_features=k, out_features=n,
                         bias=False, dtype=torch.bfloat16)
    layer.qweight.data = torch.randint(-2**31, 2**31 - 1, (k // 8, n), dtype=torch.int32)
    layer.scales.data = torch.rand(k // GROUP, n, dtype=torch.bfloat16) * 0.01
    layer.qzeros.data = torch.zeros(k // GROUP, n // 8, dtype=torch.int32)
    layer.g_idx.data = torch.zeros(k, dtype=torch.int32)
    layer = layer.cuda()
    layer.post_init()
    return layer


def tinygemm_layer(k: int, n: int):
    """PyTorch's int4 kernel: a weight packed for it and its scales and zeros, as one callable."""
    packed = torch.ops.aten._convert_weight_to_int4pack(
        torch.randint(0, 255, (n, k // 2), dtype=torch.uint8, device="cuda"), 8)
    scales_and_zeros = torch.rand(k // GROUP, n, 2, dtype=torch.bfloat16, device="cuda")
    return lambda x: torch.ops.aten._weight_int4pack_mm(x, packed, GROUP, scales_and_zeros)


def weight_bytes(shapes, scale_bytes: int) -> int:
    return sum(k * n // 2 + k // GROUP * n * scale_bytes for k, n in shapes)


def measure(make, scale_bytes: int) -> dict:
    inputs = {k: torch.randn(1, k, device="cuda", dtype=torch.bfloat16) for k in (HIDDEN, FFN)}
    result = {}
    for name, shapes in LAYOUTS.items():
        layers = [[(k, make(k, n)) for k, n in shapes] for _ in range(LAYERS)]

        def every_layer(layers=layers):
            for layer in layers:
                for k, matmul in layer:
                    matmul(inputs[k])
        ms = graph_ms(every_layer)
        per_shape = {}
        for k, n in dict.fromkeys(shapes):
            same = [matmul for layer in layers for (kk, matmul), shape in zip(layer, shapes, strict=True)
                    if shape == (k, n)][:LAYERS]
            shape_ms = graph_ms(lambda same=same, k=k: [matmul(inputs[k]) for matmul in same])
            per_shape[f"{k}x{n}"] = {"us": round(shape_ms / len(same) * 1e3, 1),
                                     "tb_s": round(weight_bytes([(k, n)], scale_bytes) * len(same) / shape_ms / 1e9, 2)}
        result[name] = {"ms_per_token": round(ms, 3),
                        "tb_s": round(weight_bytes(shapes, scale_bytes) * LAYERS / ms / 1e9, 2), "shapes": per_shape}
        print(name, result[name], flush=True)
        del layers
        torch.cuda.empty_cache()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    out = parser.parse_args().out
    from importlib.metadata import version
    result = {"date": time.strftime("%Y-%m-%d"), "gpu": torch.cuda.get_device_name(),
              "torch": torch.__version__, "gptqmodel": version("gptqmodel"),
              "shape": f"Llama-2-7B: {LAYERS} layers, hidden {HIDDEN}, MLP {FFN}, group {GROUP}, batch 1",
              "copy_tb_s": round(measured_bandwidth() / 1e12, 2),  # the ceiling, measured as bench/decode.py does
              "marlin": measure(marlin_layer, scale_bytes=2), "tinygemm": measure(tinygemm_layer, scale_bytes=4)}
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
