"""Load time, GPU memory and speed of each backend and precision, measured through the chat engine.

Run on a GPU machine (the llama.cpp row in a process of its own: torch and a CUDA llama.cpp clash in one):
  python bench/launcher.py --gguf=PATH.gguf --hf=CONVERTED_DIR --rows=hf-bf16,hf-int8,hf-nf4 --out=A.json
  python bench/launcher.py --gguf=PATH.gguf --hf=CONVERTED_DIR --rows=llamacpp-gpu --out=B.json
The Hugging Face rows load the same Gemma weights dequantized from the GGUF (tests/conftest.py converts them).
Writes a JSON result file and prints a Markdown table made from it.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.decode import installed  # noqa: E402
from quantchat import loaders  # noqa: E402
from quantchat.assembly import build_engine  # noqa: E402
from quantchat.cli import parse_flags  # noqa: E402
from quantchat.settings import from_flags  # noqa: E402

PROMPT = "Write a long story about a lighthouse keeper who finds a message in a bottle."
NEW_TOKENS = 128


def nvidia_smi(field: str) -> str:
    """Asked of the driver, not of torch: the llama.cpp rows run in processes that must not import torch."""
    return subprocess.run(["nvidia-smi", f"--query-gpu={field}", "--format=csv,noheader,nounits", "-i", "0"],
                          capture_output=True, text=True, check=True).stdout.strip()


def gpu_used_bytes() -> int:
    return int(nvidia_smi("memory.used")) * 2**20


def measure(name: str, argv: list[str], force_fp16: bool = False) -> dict:
    before = gpu_used_bytes()
    settings = from_flags(parse_flags(argv + [f"--max_new_tokens={NEW_TOKENS}", "--min_new_tokens=" + str(NEW_TOKENS),
                                              "--max_seq_len=2048", "--repetition_penalty=1.0"]))
    plan = loaders.plan(settings)
    if force_fp16:
        plan.options, plan.dtype = dataclasses.replace(plan.options, dtype="float16"), "float16"
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
    parser.add_argument("--gguf")
    parser.add_argument("--hf")
    parser.add_argument("--table", help="print the Markdown table of a result file and exit")
    parser.add_argument("--out", default="bench/results/launcher.json")
    parser.add_argument("--rows", default="hf-bf16,hf-int8,hf-nf4", help="llamacpp-gpu must run in its own process")
    args = parser.parse_args()
    if args.table:
        print(table(json.loads(Path(args.table).read_text())))
        return
    if not (args.gguf and args.hf):
        parser.error("--gguf and --hf are required to measure")
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
    result = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "gpu": nvidia_smi("name"),
              "torch": installed("torch"), "transformers": installed("transformers"),
              "llama_cpp_python": installed("llama_cpp_python"), "python": platform.python_version(),
              "model": "Gemma 3 270M (Q4_K_M GGUF; HF rows: the same weights dequantized)",
              "prompt": PROMPT, "new_tokens": NEW_TOKENS, "rows": results}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(table(result))


def table(result: dict) -> str:
    lines = [f"{result['gpu']}, torch {result['torch']}, transformers {result['transformers']}, "
             f"llama-cpp-python {result['llama_cpp_python']}, {result['date']}", "",
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
