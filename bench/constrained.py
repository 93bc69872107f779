"""Decode speed with a JSON-schema constraint against without: what the grammar's token masks cost.

  python bench/constrained.py --backend llamacpp --out bench/results/constrained-cpu-builtin.json
      the built-in model (Qwen2.5-Coder-0.5B-Instruct Q4_K_M, 151,936 tokens) on this machine's llama.cpp
  python bench/constrained.py --backend hf --tokenizer .gpu/qwen-tokenizer --out bench/results/constrained-h200-8b.json
      on a GPU: random weights of Llama-3-8B's shape with Qwen2.5's tokenizer (its 151,936-token vocabulary, so each
      mask spans a real vocabulary), bf16, the fast decode path (static cache + CUDA graph)

Each run answers the same prompt free and under a schema (an object holding an array of strings: the mask is widest
inside strings), greedy, the same number of new tokens, and reports decode tokens/s after the first token. Rows
alternate, best of `--repeats`.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from bench.decode import SHAPES, gpu_name, installed, timed_tokens  # noqa: E402
from quantchat.constraints import json_schema  # noqa: E402
from quantchat.loaders.base import GenParams  # noqa: E402

SCHEMA = {"type": "object", "properties": {"cities": {"type": "array", "items": {"type": "string"}}},
          "required": ["cities"]}
QUESTION = "List as many cities of the world as you can, as JSON: {\"cities\": [...]}."


def random_model(shape: str, tokenizer_dir: str, folder: Path) -> Path:
    """Random bf16 weights of `shape` with the given tokenizer's vocabulary (embedding padded to a multiple of 64)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    if (folder / "config.json").exists():
        return folder
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    vocab = (len(tokenizer) + 63) // 64 * 64
    config = LlamaConfig(**{**SHAPES[shape], "vocab_size": vocab}, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False, dtype="bfloat16")
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    del model
    torch.cuda.empty_cache()
    return folder


def load(args):
    from test_settings import settings

    from quantchat import loaders
    if args.backend == "llamacpp":
        return loaders.load(loaders.plan(settings("--max_seq_len=2048")))
    path = random_model(args.shape, args.tokenizer, Path(args.workdir) / f"{args.shape}-qwen-vocab")
    model = loaders.load(loaders.plan(settings(f"--base_model={path}", "--max_seq_len=2048", "--fast_decode=True")))
    started = time.perf_counter()
    assert model.wait_for_fast_decode(), model.info.decode
    print(f"fast decode ready after {time.perf_counter() - started:.0f} s: {model.info.decode}", file=sys.stderr)
    return model


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--backend", choices=["llamacpp", "hf"], default="llamacpp")
    parser.add_argument("--shape", default="llama3-8b")
    parser.add_argument("--tokenizer", default=".gpu/qwen-tokenizer")
    parser.add_argument("--workdir", default="/tmp/bench-models")
    parser.add_argument("--new_tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out")
    args = parser.parse_args()

    from quantchat.prompter import TemplatePrompter
    model = load(args)
    prompt = TemplatePrompter(model.info.chat_template, model.info.bos_token, model.info.eos_token).render(
        [{"role": "user", "content": QUESTION}])
    constraint = json_schema(SCHEMA, "the benchmark's schema")
    model.lltokenizer  # built once (about a second), not timed  # noqa: B018
    rows = {"free": GenParams(max_new_tokens=args.new_tokens, repetition_penalty=1.0),
            "json_schema": GenParams(max_new_tokens=args.new_tokens, repetition_penalty=1.0, constraint=constraint)}
    runs: dict[str, list[dict]] = {name: [] for name in rows}
    for _ in range(args.repeats + 1):  # the first round warms up, untimed
        for name, params in rows.items():
            pieces: list[str] = []
            ttft, speed, count = timed_tokens(piece for piece in model.stream(prompt, params, threading.Event())
                                              if pieces.append(piece) is None)
            runs[name].append({"ttft_s": round(ttft, 4), "tokens_per_s": round(speed, 2), "tokens": count,
                               "text_start": "".join(pieces)[:120]})
    best = {name: max(r["tokens_per_s"] for r in rs[1:]) for name, rs in runs.items()}
    result = {"backend": args.backend, "model": model.info.model, "decode": model.info.decode,
              "vocabulary": model.lltokenizer.vocab_size, "new_tokens": args.new_tokens, "schema": SCHEMA,
              "machine": platform.node(), "gpu": gpu_name(), "llguidance": installed("llguidance"),
              "runs": runs, "best_tokens_per_s": best,
              "constrained_over_free": round(best["json_schema"] / best["free"], 4)}
    print(json.dumps({k: result[k] for k in ("decode", "best_tokens_per_s", "constrained_over_free")}, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    model.close()


if __name__ == "__main__":
    main()
