"""What a captured CUDA graph's first replay costs beyond later ones (CUDA uploads a graph to the device on its first
launch), for graphs of about a decode step's kernel count: the fast path captures a graph per window and step, and a
graph first replayed for a user (a follow-up's prompt step in a large window) pays that on the user's time.

    python bench/first_replay.py --out=bench/results/first-replay-h200.json   (on a GPU)
"""
from __future__ import annotations

import argparse
import json
import statistics
import time


def timed_replay(graph, torch) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    graph.replay()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3


def main() -> None:
    import torch
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=120, help="3 kernels each (matmul, SiLU, sum)")
    parser.add_argument("--graphs", type=int, default=6)
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    x = torch.randn(1, 1024, device="cuda", dtype=torch.bfloat16)
    weights = [torch.randn(1024, 1024, device="cuda", dtype=torch.bfloat16) / 32 for _ in range(args.layers)]

    def step():
        h = x
        for w in weights:
            h = h + torch.nn.functional.silu(h @ w)
        return h

    for _ in range(3):  # (kernels loaded, the allocator warm, as before the fast path's capture)
        step()
    graphs = []
    for _ in range(args.graphs):
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
        graphs.append(graph)
    first = [timed_replay(g, torch) for g in graphs]
    second = [timed_replay(g, torch) for g in graphs]
    later = [timed_replay(g, torch) for g in graphs for _ in range(20)]
    result = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "kernels_per_graph": 3 * args.layers,
              "first_replay_ms": [round(t, 3) for t in first], "second_replay_ms": [round(t, 3) for t in second],
              "later_replay_median_ms": round(statistics.median(later), 3)}
    print(json.dumps(result))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
