"""Decode speed against the memory-bandwidth limit on one GPU: every backend's rows and their peers in one run.

  python bench/decode.py --models=gemma,llama2-7b --out=bench/results/decode-h100.json   (every row)
  python bench/decode.py --models=llama2-7b --rows=hf --profile --out=FILE   (a set: hf, engines, variants, exllamav3)
  python bench/decode.py --models=llama2-7b --rows=hf --prepare   (only write the models and checkpoints)
  python bench/decode.py --table=bench/results/decode-h100.json [--chart=docs/decode-h100.png]

Models: the real Gemma 3 270M (dequantized from its GGUF, where tests/conftest.py caches it) and random weights
with the exact shapes of Llama-2-7B / Llama-3-8B, written once per run (speed does not depend on the values;
their tokenizer is the small one the tests train, whose ids all fall inside the vocabulary).
Per row: load time, peak GPU memory, time to first token for a 2,048-token prompt, prefill tokens/s, decode
tokens/s at batch 1 for 128 and 512 new tokens after a 16-token prompt, and MBU: decode speed as a fraction of
(bandwidth measured in this run) / (bytes read per token: the weights without the input embedding table, plus
the KV cache read at that length).
"""
from __future__ import annotations

import argparse
import gc
import importlib
import json
import platform
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from bench.gpu_watch import GpuWatch, slowdown_note, slowdowns  # noqa: E402

SHAPES = {  # the public configs' shapes
    "llama2-7b": {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
                  "num_key_value_heads": 32, "vocab_size": 32000, "max_position_embeddings": 4096,
                  "rope_theta": 10000.0},
    "llama2-13b": {"hidden_size": 5120, "intermediate_size": 13824, "num_hidden_layers": 40, "num_attention_heads": 40,
                   "num_key_value_heads": 40, "vocab_size": 32000, "max_position_embeddings": 4096,
                   "rope_theta": 10000.0},
    "llama3-8b": {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
                  "num_key_value_heads": 8, "vocab_size": 128256, "max_position_embeddings": 8192,
                  "rope_theta": 500000.0},
    # the built-in model's shape (Qwen2's q/k/v biases as a Llama's attention biases): a small model's steps are
    # bound by their launches, not by the weights
    "qwen2.5-0.5b": {"hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14,
                     "num_key_value_heads": 2, "vocab_size": 151936, "max_position_embeddings": 32768,
                     "rope_theta": 1000000.0, "attention_bias": True},
}
# name: (quantchat flags, peer, checkpoint). A peer row is transformers as shipped (torch's own attention backends),
# loaded through quantchat for the same weights; transformers' own compiled path last (it compiles in the main thread)
ROWS = {
    "quantchat fast decode": (["--fast_decode=True"], None, None),
    "generate eager": (["--fast_decode=False"], None, None),
    "transformers generate eager": (["--fast_decode=False"], "eager", None),
    "NF4 quantchat fast decode": (["--load_4bit=True", "--fast_decode=True"], None, None),
    "NF4 generate eager": (["--load_4bit=True", "--fast_decode=False"], None, None),
    "GPTQ quantchat fast decode": (["--fast_decode=True"], None, "gptq"),
    "GPTQ generate eager": (["--fast_decode=False"], None, "gptq"),
    # gptqmodel's Triton kernel against its Marlin kernel (the default on Ampere and newer)
    "GPTQ triton quantchat fast decode": (["--fast_decode=True", "--gptq_dict={'backend': 'triton'}"], None, "gptq"),
    "AWQ quantchat fast decode": (["--fast_decode=True"], None, "awq"),
    "AWQ generate eager": (["--fast_decode=False"], None, "awq"),
    "int8 generate eager": (["--load_8bit=True", "--fast_decode=False"], None, None),
    "GPTQ exllamav2": (["--load_exllama=True"], None, "gptq"),
    "EXL3 exllamav3": (["--load_exllama=True"], None, "exl3"),
    "generate static cache + compile (transformers' own)": (["--fast_decode=False"], "static", None),
}

# rows that run quantchat with one of its choices undone (in the row's own process), to measure what it brings:
# (module, name, its stand-in)
UNDONE = {"4-bit layers between compiled pieces": ("quantchat.loaders.hf.compiled_4bit", "as_operators",
                                                   lambda model: 0)}
for _undone in UNDONE:
    ROWS[f"GPTQ quantchat fast decode ({_undone})"] = ROWS["GPTQ quantchat fast decode"]
    ROWS[f"NF4 quantchat fast decode ({_undone})"] = ROWS["NF4 quantchat fast decode"]

GGUF_ROWS = {  # random shapes only, measured by bench/decode_gguf.py in a process without torch
    "llama.cpp F16": "F16", "llama.cpp Q8_0": "Q8_0", "llama.cpp Q4_K_M": "Q4_K_M"}
# Named row sets (--rows=hf): every row above fits one run on a GPU of one's own; a lent machine held for 30 minutes
# runs the sets apart, each with the peers its rows are judged against and quantchat's fast bf16 row as an anchor
ROW_SETS = {
    "hf": ["quantchat fast decode", "generate eager", "transformers generate eager", "NF4 quantchat fast decode",
           "NF4 generate eager", "GPTQ quantchat fast decode", "AWQ quantchat fast decode", "int8 generate eager",
           "generate static cache + compile (transformers' own)"],
    "variants": ["GPTQ generate eager", "AWQ generate eager", "GPTQ triton quantchat fast decode"],
    "engines": ["quantchat fast decode", "generate eager", "transformers generate eager", "GPTQ quantchat fast decode",
                "GPTQ exllamav2", *GGUF_ROWS, "generate static cache + compile (transformers' own)"],
    # exllamav3's converter quantizes for real (its format has no mock): minutes for a 7B, so a set of its own
    "exllamav3": ["quantchat fast decode", "EXL3 exllamav3"],
}


def installed(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"


def gpu_name() -> str | None:
    """The CUDA GPU's name; None where torch is not installed or sees no GPU."""
    try:
        import torch
    except ImportError:
        return None
    return torch.cuda.get_device_name() if torch.cuda.is_available() else None


NOMINAL_BANDWIDTH = {  # bytes/s from the makers' data sheets, the figure peers quote MBU against
    "NVIDIA H200": 4.8e12, "NVIDIA H100 80GB HBM3": 3.35e12, "NVIDIA H100 PCIe": 2.0e12,
    "NVIDIA A100-SXM4-80GB": 2.039e12, "NVIDIA GeForce RTX 4090": 1.008e12}


def nominal_bandwidth() -> float | None:
    """The GPU's data-sheet bandwidth; None for a GPU not in NOMINAL_BANDWIDTH."""
    return NOMINAL_BANDWIDTH.get(gpu_name() or "")


def measured_bandwidth() -> float:
    """Bytes per second of a device-to-device copy (read + write), best of 20: the ceiling decoding can reach."""
    import torch
    a = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    best = float("inf")
    for _ in range(20):
        torch.cuda.synchronize()
        start = time.perf_counter()
        b.copy_(a)
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    del a, b
    torch.cuda.empty_cache()
    return 2 * 2**30 / best


def write_random_model(name: str, folder: Path) -> Path:
    """Random fp16 weights of a public model's shape, made on the GPU and saved once."""
    import torch
    from conftest import build_tiny_llama
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    if (folder / "config.json").exists():
        return folder
    tokenizer_dir = build_tiny_llama(folder.with_name(folder.name + "-tok"))
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(**SHAPES[name], bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         tie_word_embeddings=False, dtype="float16")
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).half()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    del model
    torch.cuda.empty_cache()
    return folder


def mock_quantized(folder: Path, method: str) -> Path:
    """A 4-bit checkpoint of the random model, written beside it once: GPTQ or AWQ (group 128) without the search for
    good values, which speed does not depend on (quantchat.quantize.run_gptqmodel's mock), or EXL3 at 4 bits per
    weight through exllamav3's converter, on 8 calibration rows of 256 tokens."""
    from quantchat.quantize import QuantizeArgs, quantize_exl3, run_gptqmodel
    out = folder.with_name(f"{folder.name}-{method}")
    if (out / "config.json").exists():
        return out
    if method == "exl3":
        quantize_exl3(QuantizeArgs(str(folder), "exl3", str(out), bits=4, samples=8, sample_tokens=256))
    else:
        run_gptqmodel(str(folder), method, 4, 128, [list(range(5, 133))], str(out), mock=True)
    return out


def prepare(model_name: str, workdir: Path, rows: list[str]) -> None:
    """The random model and its quantized checkpoints that the rows use, ahead of the run (bench/gpu_fast.sh writes
    them while the kernels compile; the GGUF files are bench/decode_gguf.py's, in a process of their own)."""
    if model_name == "gemma":
        return
    path = write_random_model(model_name, workdir / model_name)
    for checkpoint in sorted({ROWS[row][2] for row in rows if row in ROWS} - {None}):
        started = time.perf_counter()
        mock_quantized(path, checkpoint)
        print(f"{model_name}: {checkpoint} checkpoint ready ({time.perf_counter() - started:.0f} s)", file=sys.stderr)


def exact_greedy(new_tokens: int):
    """Generation settings for timing: greedy, exactly new_tokens, no repetition penalty."""
    from quantchat.loaders.base import GenParams
    return GenParams(max_new_tokens=new_tokens, min_new_tokens=new_tokens, repetition_penalty=1.0)


def timed_tokens(tokens: Iterator) -> tuple[float, float, int]:
    """(time to first token, tokens/s after it, tokens) of a generator, which starts its work when first asked."""
    start = time.perf_counter()
    first, count = None, 0
    for _ in tokens:
        count += 1
        if first is None:
            first = time.perf_counter()
    end = time.perf_counter()
    return first - start, (count - 1) / (end - first), count


def timed_stream(model, prompt: str, new_tokens: int) -> tuple[float, float, int]:
    """(time to first token, decode tokens/s after it, tokens) of one greedy answer of exactly new_tokens."""
    return timed_tokens(model.stream(prompt, exact_greedy(new_tokens), threading.Event()))


def timed_static_generate(model, prompt: str, new_tokens: int) -> tuple[float, float, int]:
    """transformers' own static-cache path (it compiles itself): decode rate from two lengths' difference."""
    import torch

    def run(n: int) -> float:
        ids = model._encode(prompt)
        torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.inference_mode():
            model.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                                 do_sample=False, cache_implementation="static", pad_token_id=model.pad_id)
        torch.cuda.synchronize()
        return time.perf_counter() - start
    run(new_tokens)  # each length compiles its own graphs (the cache's length changes): not timed
    short, full = run(1), run(new_tokens)
    return short, (new_tokens - 1) / (full - short), new_tokens


def bytes_per_token(model, context: int) -> int:
    """Weights read per decode step (the input embedding table is only indexed) plus the KV cache up to context."""
    from quantchat import memory
    if type(model).__name__ == "LlamaCppModel":  # (no torch in its process) the file's tensors, f16 KV cache
        from gguf import GGUFReader
        reader = GGUFReader(model.info.model)
        field = lambda key: int(reader.fields[f"llama.{key}"].contents())  # noqa: E731
        config = {"num_hidden_layers": field("block_count"), "num_attention_heads": field("attention.head_count"),
                  "num_key_value_heads": field("attention.head_count_kv"), "hidden_size": field("embedding_length")}
        weights = sum(int(t.n_bytes) for t in reader.tensors if t.name != "token_embd.weight")
        return weights + memory.kv_cache_bytes(config, context, 2)
    import torch
    if type(model).__name__ == "ExLlamaModel":  # its tensors are not a torch module's: the plan's estimate
        config = json.loads((Path(model.info.model) / "config.json").read_text())
        embedding = config["vocab_size"] * config["hidden_size"] * 2
        return model.info.weight_bytes - embedding + memory.kv_cache_bytes(config, context, 2)
    weights = sum(p.numel() * p.element_size() for p in model.model.parameters())
    weights += sum(b.numel() * b.element_size() for b in model.model.buffers() if b.dtype != torch.bool)
    embedding = model.model.get_input_embeddings().weight
    if embedding is not model.model.get_output_embeddings().weight:
        weights -= embedding.numel() * embedding.element_size()
    return weights + memory.kv_cache_bytes(model.model.config.get_text_config().to_dict(), context, 2)


def long_prompt(model, tokens: int) -> str:
    """Text that the model's tokenizer turns into about `tokens` tokens."""
    from conftest import CORPUS
    text = ""
    while model.count_tokens(text) < tokens:
        text += CORPUS + "\n"
    words = text.split(" ")
    while model.count_tokens(" ".join(words)) > tokens:
        words = words[: int(len(words) * 0.98)]
    return " ".join(words)


def profiled(decode: Callable[[], object], steps: int = 64) -> dict:
    """Where a decode step's time goes, for decode() making `steps` tokens: GPU busy time per token against wall
    time per token, kernels per token, and the top kernels."""
    import torch
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        decode()
        wall = time.perf_counter() - start
    kernels = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    busy = sum(e.self_device_time_total for e in kernels) / 1e6
    top = sorted(kernels, key=lambda e: e.self_device_time_total, reverse=True)[:8]
    return {"wall_ms_per_token": round(wall / steps * 1000, 2), "gpu_busy_ms_per_token": round(busy / steps * 1000, 2),
            "kernels_per_token": round(sum(e.count for e in kernels) / steps, 1),
            "top_kernels": [{"name": e.key[:90], "share": round(e.self_device_time_total / 1e6 / busy, 3),
                             "calls_per_token": round(e.count / steps, 1)} for e in top]}


def timings(model, timed, load_s: float, bandwidth: float, lengths=(128, 512), profile: bool = False) -> dict:
    """The speed fields of a row, for any loaded backend: first token after start (and, for the Hugging Face backend,
    when its fast path was ready), decode speed and MBU per length, TTFT (best of 3, and the first) and prefill speed
    for a 2,048-token prompt (and the profile, for the Hugging Face backend)."""
    results: dict = {}
    loaded = time.perf_counter()
    try:
        short_prompt = long_prompt(model, 16)
        first_ttft, _, _ = timed(model, short_prompt, 8)  # the first request comes while the fast path warms up
        results["start_to_first_token_s"] = round(load_s + first_ttft, 1)
        if hasattr(model, "wait_for_fast_decode"):
            model.wait_for_fast_decode()
            results["start_to_fast_decode_s"] = round(load_s + time.perf_counter() - loaded, 1)
        for new in lengths:
            ttft, speed, _ = timed(model, short_prompt, new)
            results[f"decode_{new}_tokens_per_s"] = round(speed, 1)
            results[f"mbu_{new}"] = round(speed * bytes_per_token(model, 16 + new // 2) / bandwidth, 3)
        if profile:
            results["profile"] = profiled(lambda: timed_stream(model, short_prompt, 64), 64)
        # three prompts of lengths new to the process, as a user's are (kernels may set up per shape); the first
        # prefill of the run also pays one-off set-up, so it is reported apart from the best of 3. Each starts with
        # its own word: a backend that caches prompt prefixes (exllamav2's generator) must not reuse the last one
        prompts = [f"{word} " + long_prompt(model, 2040 - 8 * i) for i, word in enumerate(("One", "Two", "Three"))]
        times = [timed(model, prompt, 2)[0] for prompt in prompts]
        first, ttft = times[0], min(times)
        n = model.count_tokens(prompts[times.index(ttft)])
        results.update({"ttft_2048_ms": round(ttft * 1000, 1), "ttft_2048_first_ms": round(first * 1000, 1),
                        "prefill_tokens_per_s": round(n / ttft), "prompt_tokens": n})
    except Exception as e:  # a row that cannot run says why, and the others go on
        results["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
    return results


def measure_gguf(model_name: str, row: str, bandwidth: float, workdir: str) -> dict:
    command = [sys.executable, str(ROOT / "bench" / "decode_gguf.py"), f"--model={model_name}",
               f"--type={GGUF_ROWS[row]}", f"--bandwidth={bandwidth}", f"--workdir={workdir}"]
    run = subprocess.run(command, capture_output=True, text=True, check=False)
    if run.returncode < 0:  # killed by a signal: its last line of output would not say so
        return {"model": model_name, "row": row, "error": f"killed by {signal.Signals(-run.returncode).name}"}
    if run.returncode != 0:
        lines = run.stderr.strip().splitlines()
        return {"model": model_name, "row": row, "error": (lines[-1] if lines else f"exit {run.returncode}")[:300]}
    return json.loads(run.stdout.strip().splitlines()[-1])


def measure(model_name: str, path: Path, row: str, bandwidth: float, profile: bool = False) -> dict:
    import torch

    from quantchat import loaders
    from quantchat.cli import parse_flags
    from quantchat.settings import from_flags
    flags, peer, checkpoint = ROWS[row]
    for undone, (module, name, stand_in) in UNDONE.items():
        if row.endswith(f"({undone})"):
            setattr(importlib.import_module(module), name, stand_in)
    if checkpoint:
        path = mock_quantized(path, checkpoint)
    settings = from_flags(parse_flags([f"--base_model={path}", "--max_seq_len=4096", *flags]))
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    model = loaders.load(loaders.plan(settings))  # the fast path then compiles and warms up in the background
    load_s = time.perf_counter() - started
    # a peer undoes quantchat's choice of attention backends (quantchat.loaders.hf.model.attention_without_shape_plans) for
    # its own row only: the setting is process-wide, and the rows after it must not depend on the order of the rows
    cudnn_attention = torch.backends.cuda.cudnn_sdp_enabled()
    if peer:
        torch.backends.cuda.enable_cudnn_sdp(True)
    timed = timed_static_generate if peer == "static" else timed_stream
    results = {"model": model_name, "row": row, "quantization": model.info.quantization, "dtype": model.info.dtype,
               "load_s": round(load_s, 1)}
    # rows through generate (the peers too) time 128 tokens: eager generate's cost per token is its per-step
    # overhead, the same at 512 (earlier runs: 9.3 against 9.8 tokens/s), and the compiled peer compiles per length
    through_generate = "--fast_decode=False" in flags
    results.update(timings(model, timed, load_s, bandwidth, lengths=(128,) if through_generate else (128, 512),
                           profile=profile and not peer))  # (the profile follows quantchat's own path)
    results["decode"] = model.info.decode or "generate"  # (once the fast path is warm)
    results["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    results["bytes_per_token_gib"] = round(bytes_per_token(model, 16) / 2**30, 3)
    model.close()
    del model
    torch.backends.cuda.enable_cudnn_sdp(cudnn_attention)
    return results


def table(result: dict) -> str:
    m = result["machine"]
    lines = [f"{m['gpu']} · measured bandwidth {m['bandwidth_gb_s']} GB/s · torch {m['torch']} · transformers "
             f"{m['transformers']} · bitsandbytes {m['bitsandbytes']} · {result['date']}", "",
             "| model | row | load s | first token s | fast path s | peak GiB | TTFT 2048 ms | prefill tok/s "
             "| decode 128 tok/s | decode 512 tok/s | MBU (128) |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        start = f"| {r['model']} | {r['row']} | {r.get('load_s', '-')} | {r.get('start_to_first_token_s', '-')} " \
                f"| {r.get('start_to_fast_decode_s', '-')} | {r.get('peak_gpu_gib', '-')} "
        if "error" in r and "decode_128_tokens_per_s" not in r:
            lines.append(f"{start}| failed: {r['error']} | | | | |")
            continue
        lines.append(f"{start}| {r.get('ttft_2048_ms', '-')} "
                     f"| {r.get('prefill_tokens_per_s', '-')} | {r['decode_128_tokens_per_s']} "
                     f"| {r.get('decode_512_tokens_per_s', '-')} | {r['mbu_128']:.0%} |")
    note = slowdown_note(result["rows"])
    return "\n".join([*lines, "", note] if note else lines)


def chart(result: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [r for r in result["rows"] if "decode_128_tokens_per_s" in r]
    labels = [f"{r['model']}\n{r['row']}" + (" (GPU slowed down)" if slowdowns(r) else "") for r in rows]
    fig, ax = plt.subplots(figsize=(10, 0.45 * len(rows) + 1.5))
    ax.barh(labels, [r["decode_128_tokens_per_s"] for r in rows], color="#f2b705")
    ax.set_xlabel("decode tokens/s, batch 1, 128 new tokens")
    ax.invert_yaxis()
    ax.set_title(f"{result['machine']['gpu']}, {result['date']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default="gemma,llama2-7b")
    parser.add_argument("--rows", default=",".join([*ROWS, *GGUF_ROWS]))
    parser.add_argument("--workdir", default="/tmp/bench-models")
    parser.add_argument("--out")
    parser.add_argument("--table")
    parser.add_argument("--chart")
    parser.add_argument("--profile", action="store_true", help="also profile 64 decode steps per row")
    parser.add_argument("--prepare", action="store_true",
                        help="only write the random models and the checkpoints the rows need (GPTQ, AWQ, EXL3), then stop")
    args = parser.parse_args()
    if args.table:
        result = json.loads(Path(args.table).read_text())
        print(table(result))
        if args.chart:
            chart(result, args.chart)
        return
    rows = [row for name in args.rows.split(",") for row in ROW_SETS.get(name, [name])]
    unknown = [row for row in rows if row not in ROWS and row not in GGUF_ROWS]
    if unknown:
        parser.error(f"unknown rows {unknown}: choose from {[*ROWS, *GGUF_ROWS]} or the sets {[*ROW_SETS]}")
    import torch
    from conftest import CACHE
    if args.prepare:
        for model_name in args.models.split(","):
            prepare(model_name, Path(args.workdir), rows)
        return
    bandwidth = measured_bandwidth()
    result = {"date": time.strftime("%Y-%m-%d"), "rows": [],
              "machine": {"gpu": torch.cuda.get_device_name(0), "bandwidth_gb_s": round(bandwidth / 1e9),
                          "python": platform.python_version(), "torch": torch.__version__,
                          "transformers": installed("transformers"), "bitsandbytes": installed("bitsandbytes"),
                          "gptqmodel": installed("gptqmodel"), "llama_cpp_python": installed("llama_cpp_python")}}
    for model_name in args.models.split(","):
        path = CACHE / "gemma3-270m-from-gguf" if model_name == "gemma" else \
            write_random_model(model_name, Path(args.workdir) / model_name)
        for row in rows:
            if row in GGUF_ROWS and model_name == "gemma":  # its real GGUF is bench/launcher.py's llama.cpp row
                continue
            print(f"{model_name}: {row} ...", file=sys.stderr, flush=True)
            with GpuWatch() as watch:
                result["rows"].append(measure_gguf(model_name, row, bandwidth, args.workdir) if row in GGUF_ROWS
                                      else measure(model_name, path, row, bandwidth, args.profile))
            result["rows"][-1]["gpu_state"] = watch.summary()
            print(json.dumps(result["rows"][-1]), file=sys.stderr, flush=True)
            if args.out:
                Path(args.out).write_text(json.dumps(result, indent=1))
    print(table(result))


if __name__ == "__main__":
    main()
