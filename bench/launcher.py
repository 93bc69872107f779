"""Load time, GPU memory and speed of each backend and precision, measured through the chat engine.

Run on a GPU machine:  python bench/launcher.py --gguf=PATH.gguf --hf=CONVERTED_DIR --out=results/launcher.json
The Hugging Face rows load the same Gemma weights dequantized from the GGUF (tests/conftest.py converts them).
Writes a JSON result file and prints a Markdown table made from it.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from quantchat import loaders  # noqa: E402
from quantchat.generate import build_engine, parse_flags  # noqa: E402
from quantchat.settings import from_flags  # noqa: E402

PROMPT = "Write a long story about a lighthouse keeper who finds a message in a bottle."
NEW_TOKENS = 128


def gpu_used_bytes() -> int:
    import torch
    free, total = torch.cuda.mem_get_info()
    return total - free


def measure(name: str, argv: list[str], force_fp16: bool = False) -> dict:
    import torch
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    before = gpu_used_bytes()
    settings = from_flags(parse_flags(argv + [f"--max_new_tokens={NEW_TOKENS}", "--min_new_tokens=" + str(NEW_TOKENS),
                                              "--max_seq_len=2048", "--repetition_penalty=1.0"]))
    plan = loaders.plan(settings)
    if force_fp16:
        plan.options["dtype"], plan.dtype = "float16", "float16"
    started = time.perf_counter()
    model = loaders.load(plan)
    load_s = time.perf_counter() - started
    engine = build_engine(settings, model)
    engine.chat([{"role": "user", "content": "Hello"}]).finish()  # warm-up: first-call allocations, kernels
    runs = []
    for _ in range(3):
        reply = engine.chat([{"role": "user", "content": PROMPT}])
        reply.finish()
        runs.append(reply.stats)
    best = max(runs, key=lambda s: s.tokens_per_s or 0)
    row = {"name": name, "backend": model.info.backend, "devices": model.info.devices, "dtype": model.info.dtype,
           "quantization": model.info.quantization, "load_s": round(load_s, 2),
           "gpu_memory_gib": round((gpu_used_bytes() - before) / 2**30, 3),
           "weights_gib_planned": round((plan.weight_bytes or 0) / 2**30, 3),
           "ttft_ms": round(best.ttft_s * 1000, 1), "decode_tokens_per_s": round(best.tokens_per_s, 1),
           "completion_tokens": best.completion_tokens, "sample": reply.text[:80]}
    model.close()
    del model, engine
    return row


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--gguf", required=True)
    parser.add_argument("--hf", required=True)
    parser.add_argument("--out", default="bench/results/launcher.json")
    parser.add_argument("--rows", default="hf-bf16,hf-fp16,hf-int8,hf-nf4,llamacpp-gpu")
    args = parser.parse_args()
    import torch
    rows = {
        "hf-bf16": lambda: measure("HF bf16", [f"--base_model={args.hf}"]),
        "hf-fp16": lambda: measure("HF fp16", [f"--base_model={args.hf}"], force_fp16=True),
        "hf-int8": lambda: measure("HF bitsandbytes int8", [f"--base_model={args.hf}", "--load_8bit"]),
        "hf-nf4": lambda: measure("HF bitsandbytes NF4", [f"--base_model={args.hf}", "--load_4bit"]),
        "llamacpp-gpu": lambda: measure("llama.cpp Q4_K_M, all layers on GPU", [f"--base_model={args.gguf}"]),
    }
    results = []
    for key in args.rows.split(","):
        try:
            results.append(rows[key]())
        except Exception as e:  # one failing row must not lose the others
            results.append({"name": key, "error": f"{e.__class__.__name__}: {e}"})
        print(json.dumps(results[-1]), flush=True)
    import transformers
    result = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "gpu": torch.cuda.get_device_name(0),
              "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
              "model": "Gemma 3 270M (Q4_K_M GGUF; HF rows: the same weights dequantized)",
              "prompt": PROMPT, "new_tokens": NEW_TOKENS, "rows": results}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(table(result))


def table(result: dict) -> str:
    lines = [f"{result['gpu']}, torch {result['torch']}, transformers {result['transformers']}, {result['date']}", "",
             "| row | devices | load s | GPU memory GiB | TTFT ms | decode tokens/s |", "|---|---|---|---|---|---|"]
    for r in result["rows"]:
        if "error" in r:
            lines.append(f"| {r['name']} | error: {r['error'][:60]} | | | | |")
        else:
            lines.append(f"| {r['name']} | {r['devices']} | {r['load_s']} | {r['gpu_memory_gib']} | {r['ttft_ms']} | "
                         f"{r['decode_tokens_per_s']} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
