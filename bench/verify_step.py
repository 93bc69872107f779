"""What checking k guesses costs on a GPU: the weight matmuls of one decode step for k+1 tokens against one token.

A step over k+1 tokens reads the weights once, as a step over one does; this measures how close to "free" the extra
rows are with the GPU's own kernels. The proxy: every linear layer of one step of the model's shape (q, k, v, o,
gate, up, down per layer, and the output layer), bf16 through cuBLAS, captured in one CUDA graph per k and replayed;
attention is left out (under a tenth of a decode step at these lengths, docs/benchmarks.md). With the acceptance
that bench/speculative.py measured per workload, the speed-up prompt lookup would give there is projected: tokens
per step over the step's cost relative to one token (a projection, labelled so).

`--captured` measures the fast path's own captured steps instead, for random weights of each shape in bf16: the
one-token graph against the verify graph (the token and --num_speculative_tokens guesses), both replayed at
positions 1,000 and 7,000 of an 8,192-token cache, attention and everything else included, with each graph's
costliest kernels (torch.profiler) at the first. One load per row: the verify step's attention through flex
attention (the default) or cuDNN (`--attention`), and grouped heads taken by SDPA (the default), packed into the
query rows, or keys and values copied per group as transformers' SDPA function does (`--grouped`). `--shapes` may
name a model folder too.

  python bench/verify_step.py --shapes=llama2-7b,llama3-8b --out=bench/results/verify-step-h200.json   (on the GPU)
  python bench/verify_step.py --captured --shapes=llama3-8b --out=bench/results/verify-captured-h200.json (the GPU)
  python bench/verify_step.py --costs=bench/results/verify-step-h200.json \
      --acceptance=bench/results/speculative-cpu.json --out=bench/results/verify-step-h200.json  (the projection)
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.decode import SHAPES  # noqa: E402


def linear_shapes(shape: dict) -> list[tuple[int, int]]:
    """(in, out) of each linear layer of one decode step."""
    h, inter, layers = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"]
    kv = h * shape["num_key_value_heads"] // shape["num_attention_heads"]
    per_layer = [(h, h), (h, kv), (h, kv), (h, h), (h, inter), (h, inter), (inter, h)]
    return per_layer * layers + [(h, shape["vocab_size"])]


def step_ms(weights, rows: int, replays: int = 50) -> float:
    """Milliseconds of one captured replay of every matmul with `rows` tokens."""
    import torch
    inputs = {w.shape[1]: torch.randn(rows, w.shape[1], device="cuda", dtype=torch.bfloat16) for w in weights}
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for w in weights:  # (cuBLAS picks and loads its kernels before the capture)
            inputs[w.shape[1]] @ w.T
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for w in weights:
            inputs[w.shape[1]] @ w.T
    return replay_ms(graph, replays)


def replay_ms(graph, replays: int) -> float:
    """Milliseconds of one replay of a captured graph, over `replays` after one more."""
    import torch
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / replays


def captured_steps(name: str, guesses: int, flex: bool, grouped: str, positions=(1000, 7000),
                   replays: int = 200) -> dict:
    """Milliseconds of one replay of the fast path's one-token graph and of its verify graph (1 + `guesses` tokens)
    at each of `positions` of an 8,192-token cache, for random weights of shape `name` (or the model folder
    `name`), bf16, and the kernels that take the time at the first position. `flex`: the verify step's attention
    through flex attention (the fast path's default), else cuDNN's as in the one-token step; `grouped`: how
    attention meets grouped heads (quantchat/loaders/hf/attention.GROUPED_HEADS)."""
    import torch

    from bench.decode import write_random_model
    from quantchat import loaders
    from quantchat.cli import parse_flags
    from quantchat.loaders.hf import attention
    from quantchat.settings import from_flags
    folder = Path(name) if Path(name).is_dir() else write_random_model(name, Path(f"/tmp/bench-models/{name}"))
    settings = from_flags(parse_flags([f"--base_model={folder}", "--fast_decode=True", "--max_seq_len=8192",
                                       f"--num_speculative_tokens={guesses}"]))
    attention.FLEX_IN_VERIFY_STEPS, attention.GROUPED_HEADS = flex, grouped
    model = loaders.load(loaders.plan(settings))
    model.wait_for_fast_decode()
    fast = model.fast
    result = {"verify_attention": "flex" if fast.flex_verify else "cuDNN", "grouped_heads": grouped,
              "tokens_checked": fast.verify_width}
    for position in positions:
        window = fast._window_for(position + fast.verify_width)
        with torch.inference_mode():  # (the graphs' input buffers were made under it)
            fast._position_in.fill_(position)
            fast._verify_in[1].copy_(torch.arange(position, position + fast.verify_width))
        one, verify = replay_ms(fast.graphs[window], replays), replay_ms(fast.verify_graphs[window], replays)
        row = {"one_token_ms": round(one, 3), "verify_ms": round(verify, 3), "verify_over_one": round(verify / one, 3),
               "window": window, **host_loops_ms(fast, position)}
        if position == positions[0]:  # (the projection reads the first position's figures)
            result.update(row, position=position, kernels_per_replay={
                "one_token": top_kernels(fast.graphs[window]), "verify": top_kernels(fast.verify_graphs[window])})
        else:
            result[f"at_{position}"] = row
    model.close()
    return result


def host_loops_ms(fast, position: int, steps: int = 100) -> dict:
    """Milliseconds per step of the decoding loops' own work around the graphs, greedy, nothing pipelined: a verify
    step as `_speculate` runs one (its inputs made on the host and copied, the replay, the chosen tokens read back)
    and a one-token step with its token read back. Against the replays alone, what the host adds to each step."""
    import time

    import torch

    from quantchat.loaders.base import GenParams
    from quantchat.loaders.hf.sampling import choose_token
    params = GenParams(max_new_tokens=steps + 8, repetition_penalty=1.0)
    seen = torch.zeros(fast.vocab, dtype=torch.bool, device=fast.device)
    eos = torch.tensor(fast.eos_ids, device=fast.device, dtype=torch.long)
    guessed = list(range(100, 100 + fast.verify_width))

    def verify_step():
        inputs = torch.tensor(guessed, device=fast.device)
        logits = fast._verify_logits(guessed, position)[: len(guessed)]
        choose_token(logits, seen, eos, params, 1).tolist()
        seen.index_fill_(0, inputs, True)

    def one_token_step():
        token = torch.tensor([guessed[0]], device=fast.device)
        logits = fast._next_logits(token, torch.tensor([position], device=fast.device), position + 1)
        choose_token(logits, seen, eos, params, 1).item()

    timed = {}
    with torch.inference_mode():
        for name, step in (("verify_loop_ms", verify_step), ("one_token_loop_ms", one_token_step)):
            step()
            torch.cuda.synchronize()
            started = time.perf_counter()
            for _ in range(steps):
                step()
            timed[name] = round((time.perf_counter() - started) * 1000 / steps, 3)
    return timed


def top_kernels(graph, replays: int = 20, top: int = 12) -> list[dict]:
    """The GPU kernels of one replay with the most time (torch.profiler over `replays` replays), and their total."""
    import torch
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(replays):
            graph.replay()
        torch.cuda.synchronize()
    rows = [e for e in prof.key_averages() if e.device_type.name == "CUDA" and e.self_device_time_total > 0]
    rows.sort(key=lambda e: -e.self_device_time_total)
    listed = [{"kernel": e.key[:90], "per_replay": e.count // replays,
               "us": round(e.self_device_time_total / replays, 1)} for e in rows]
    return [{"kernel": "(all)", "per_replay": sum(r["per_replay"] for r in listed),
             "us": round(sum(r["us"] for r in listed), 1)}, *listed[:top]]


def projected(rows: list[dict], costs: dict[int, float]) -> float | None:
    """The decode speed-up of a workload's answers had each step cost what this GPU's matmuls cost: decode tokens
    over steps weighted by their cost (a step with k guesses costs costs[k] one-token steps; the others one)."""
    guessed = [r["speculative"] for r in rows]
    steps = sum(r["steps"] for r in guessed)
    if not steps:
        return None
    decoded = sum(r["tokens"] - 1 for r in guessed)           # (the first token comes from the prompt's pass)
    plain_steps = decoded - steps - sum(r["kept"] for r in guessed)
    draft = min(max(costs), max(1, round(sum(r["guessed"] for r in guessed) / steps)))
    return round(decoded / (plain_steps + steps * costs[draft]), 2)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shapes", default="llama2-7b,llama3-8b")
    parser.add_argument("--most", type=int, default=8)
    parser.add_argument("--acceptance", help="bench/speculative.py's result file: project the speed-up")
    parser.add_argument("--costs", help="an earlier run's result file: project from its costs, measure nothing")
    parser.add_argument("--captured", action="store_true", help="time the fast path's captured steps instead")
    parser.add_argument("--attention", default="flex,cudnn", help="with --captured: the verify step's, flex, cudnn or both")
    parser.add_argument("--grouped", default="taken", help="with --captured: grouped heads taken, packed, copied")
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.costs:
        result = json.loads(Path(args.costs).read_text())
    else:
        import torch
        result = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "what": __doc__.split("\n\n")[1],
                  "shapes": {}, "projection": {}}
    if args.captured:
        result["what"] = __doc__.split("\n\n")[2]
        for name in args.shapes.split(","):
            for flex, grouped in itertools.product((kind == "flex" for kind in args.attention.split(",")),
                                                   args.grouped.split(",")):
                row = f"{name}, verify attention {'flex' if flex else 'cuDNN'}, grouped heads {grouped}"
                result["shapes"][row] = captured_steps(name, args.most, flex, grouped)
                print(row, {k: v for k, v in result["shapes"][row].items() if k != "kernels_per_replay"}, flush=True)
    for name in [] if args.costs or args.captured else args.shapes.split(","):
        weights = [torch.randn(out, inp, device="cuda", dtype=torch.bfloat16) for inp, out in linear_shapes(SHAPES[name])]
        one = step_ms(weights, 1)
        costs = {k: round(step_ms(weights, k + 1) / one, 3) for k in range(1, args.most + 1)}
        result["shapes"][name] = {"one_token_ms": round(one, 3), "cost_of_k_plus_1_over_1": costs,
                                  "weights_gb": round(sum(w.numel() for w in weights) * 2 / 1e9, 2)}
        print(name, f"one token {one:.3f} ms", costs, flush=True)
        del weights
        torch.cuda.empty_cache()
    if args.acceptance:
        answers = json.loads(Path(args.acceptance).read_text())["answers"]
        result["acceptance_from"] = args.acceptance
        for name, measured in result["shapes"].items():
            # the captured verify step has one width: every step with guesses costs the same
            costs = {k: measured["verify_over_one"] for k in range(1, measured["tokens_checked"])} \
                if "verify_over_one" in measured else {int(k): v for k, v in measured["cost_of_k_plus_1_over_1"].items()}
            result["projection"][name] = {w: projected(rows, costs) for w, rows in answers.items()}
        print(json.dumps(result["projection"], indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
