"""What each compiler or kernel option buys the fast decode path: one process per variant, on the GPU machine.

  python bench/ablation.py --variants=baseline,no-coordinate-descent,sdpa-math   (lines in $OUT/ablation.jsonl)

A variant is a name or names joined by "+" (options combined); "baseline" is the fast path as shipped. Each
process builds random weights of the Llama-2-7B shape straight on the GPU (speed does not depend on the values),
builds the fast decoder as the Hugging Face backend does, and reports: compile + capture time, decode tokens/s
for 128 tokens (best of 3) and 512, time to first token for a prompt of about 2,048 tokens (best of 3 new lengths), and
where a decode step's GPU time goes (kernels per token, top kernels).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def apply(option: str, decoder_class) -> None:
    """Set one option for this process, before the decoder is built."""
    import torch
    if option == "baseline":
        return
    if option == "no-coordinate-descent":  # the compiler's default tuning instead of the decoder's
        decoder_class.COMPILE_OPTIONS = {}
    elif option == "cudnn-attention":  # torch's own order of attention backends (cuDNN first on Hopper) throughout
        torch.backends.cuda.enable_cudnn_sdp(True)
    elif option == "no-cudnn-decode":  # the captured steps' attention as the rest of the process's: no cuDNN
        decoder_class.CUDNN_DECODE_ATTENTION = False
    elif option == "sdpa-efficient":
        torch.backends.cuda.enable_cudnn_sdp(False)
        torch.backends.cuda.enable_flash_sdp(False)
    elif option == "sdpa-math":  # attention left to the compiler
        torch.backends.cuda.enable_cudnn_sdp(False)
        torch.backends.cuda.enable_flash_sdp(False)
        torch.backends.cuda.enable_mem_efficient_sdp(False)
    elif option == "layers-compiled":  # each decoder layer compiled alone (one compilation serves all), the rest eager
        init = decoder_class.__init__

        def layers_compiled(self, model, *args, **kwargs):
            init(self, model, *args, **kwargs)
            for layer in model.model.layers:
                layer.compile()
            self._step = self._forward_one
        decoder_class.__init__ = layers_compiled
    else:
        raise SystemExit(f"unknown option {option}")


def run_variant(variant: str, shape: str) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from bench.decode import SHAPES, exact_greedy, installed, profiled, timed_tokens
    from quantchat.loaders.hf.fast_decode import FastDecoder
    from quantchat.loaders.hf.model import attention_without_shape_plans
    attention_without_shape_plans(torch)  # as the Hugging Face backend sets it at load
    for option in variant.split("+"):
        apply(option, FastDecoder)
    torch.manual_seed(0)
    config = LlamaConfig(**SHAPES[shape], tie_word_embeddings=False)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    started = time.perf_counter()
    fast = FastDecoder(model, {2}, 4096, compile=True)
    fast.warm_up()
    warm_s = time.perf_counter() - started

    def timed(ids, new):
        return timed_tokens(fast.tokens(ids, exact_greedy(new), threading.Event()))

    short = torch.randint(3, 32000, (1, 16), device="cuda")
    speed = max(timed(short, 128)[1] for _ in range(3))
    speed_512 = timed(short, 512)[1]
    # three prompt lengths new to the process, as decode.py's (a backend may set up per shape)
    ttft = min(timed(torch.randint(3, 32000, (1, 2048 - 8 * i), device="cuda"), 1)[0] for i in range(3))
    return {"variant": variant, "shape": shape, "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
            "transformers": installed("transformers"), "date": time.strftime("%Y-%m-%d"),
            "graphs": len(fast.graphs), "warm_s": round(warm_s, 1),
            "decode_128_tokens_per_s": round(speed, 1), "decode_512_tokens_per_s": round(speed_512, 1),
            "ttft_2048_ms": round(ttft * 1000, 1),
            "profile": profiled(lambda: timed(short, 32), 32)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--variants", default="baseline")
    parser.add_argument("--shape", default="llama2-7b")
    parser.add_argument("--one", action="store_true", help="(internal) run the one variant in this process")
    # on the GPU machine $OUT is the folder whose files come back
    parser.add_argument("--out", default=os.path.join(os.environ.get("OUT", "/tmp"), "ablation.jsonl"))
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_variant(args.variants, args.shape)))
        return
    for variant in args.variants.split(","):
        started = time.perf_counter()
        # a compiler cache of its own: the cache key does not cover every option (attention backends)
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": f"/tmp/inductor-{variant}"}
        run = subprocess.run([sys.executable, __file__, "--one", f"--variants={variant}", f"--shape={args.shape}"],
                             capture_output=True, text=True, check=False, env=env)
        line = run.stdout.strip().splitlines()[-1] if run.returncode == 0 else json.dumps(
            {"variant": variant, "error": run.stderr.strip().splitlines()[-3:]})
        with open(args.out, "a") as out:
            out.write(line + "\n")
        print(f"{variant}: {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
