"""llama.cpp rows of bench/decode.py: random weights of a public model's shape as GGUF F16, Q8_0 or Q4_K_M,
measured through quantchat's llama.cpp backend with the same timings as the other rows.

  python bench/decode_gguf.py --model=llama2-7b --type=Q4_K_M --bandwidth=2.9e12 --workdir=/tmp/bench-models

Prints one JSON row. A process of its own that never imports torch: torch and a CUDA build of llama.cpp clash in
one process (docs/backends.md); bench/decode.py starts it with the bandwidth it measured in the same run.
The F16 file is written here directly (speed does not depend on the values, so one random tensor per shape
serves every layer) with a placeholder SentencePiece-style vocabulary of the model's size, then llama.cpp's own
quantizer makes Q8_0 and Q4_K_M from it.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# llama_cpp before numpy (which gguf imports): on the H100 machine a CUDA build of llama.cpp segfaulted loading any
# model in a process that had imported numpy first (docs/backends.md)
import llama_cpp  # noqa: E402

from bench.decode import SHAPES, timed_stream, timings  # noqa: E402

FILE_TYPES = {"F16": 1, "Q8_0": 7, "Q4_K_M": 15}  # llama.cpp's llama_ftype values (gguf.LlamaFileType)


def write_random_gguf(shape: dict, path: Path) -> Path:
    import gguf
    import numpy as np
    if path.exists():
        return path
    hidden, layers, vocab = shape["hidden_size"], shape["num_hidden_layers"], shape["vocab_size"]
    heads, kv_heads, ffn = shape["num_attention_heads"], shape["num_key_value_heads"], shape["intermediate_size"]
    kv = hidden // heads * kv_heads
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(shape["max_position_embeddings"])
    writer.add_embedding_length(hidden)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_freq_base(shape["rope_theta"])
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_file_type(FILE_TYPES["F16"])
    # the vocabulary: unknown, BOS, EOS, the 256 byte tokens (any text tokenizes), then placeholder pieces
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    tokens += [f"\u2581t{i}" for i in range(vocab - len(tokens))]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL] + \
        [gguf.TokenType.BYTE] * 256 + [gguf.TokenType.NORMAL] * (vocab - 259)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * vocab)
    writer.add_token_types(types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    rng = np.random.default_rng(0)
    random = {}

    def tensor(rows: int, cols: int | None = None):  # one random array per shape, shared by every layer
        key = (rows, cols)
        if key not in random:
            random[key] = np.ones(rows, dtype=np.float32) if cols is None else \
                (rng.standard_normal((rows, cols), dtype=np.float32) * 0.02).astype(np.float16)
        return random[key]

    writer.add_tensor("token_embd.weight", tensor(vocab, hidden))
    for i in range(layers):
        for name, array in (("attn_norm", tensor(hidden)), ("attn_q", tensor(hidden, hidden)),
                            ("attn_k", tensor(kv, hidden)), ("attn_v", tensor(kv, hidden)),
                            ("attn_output", tensor(hidden, hidden)), ("ffn_norm", tensor(hidden)),
                            ("ffn_gate", tensor(ffn, hidden)), ("ffn_up", tensor(ffn, hidden)),
                            ("ffn_down", tensor(hidden, ffn))):
            writer.add_tensor(f"blk.{i}.{name}.weight", array)
    writer.add_tensor("output_norm.weight", tensor(hidden))
    writer.add_tensor("output.weight", tensor(vocab, hidden))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def gguf_of(model_name: str, kind: str, workdir: Path) -> Path:
    """The model's GGUF of that type, written (F16) or quantized by llama.cpp on first use."""
    workdir.mkdir(parents=True, exist_ok=True)
    f16 = write_random_gguf(SHAPES[model_name], workdir / f"{model_name}-F16.gguf")
    if kind == "F16":
        return f16
    out = workdir / f"{model_name}-{kind}.gguf"
    if not out.exists():
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = FILE_TYPES[kind]
        params.nthread = os.cpu_count() or 1
        if llama_cpp.llama_model_quantize(str(f16).encode(), str(out).encode(), ctypes.byref(params)) != 0:
            raise RuntimeError(f"llama.cpp could not quantize {f16} to {kind}")
    return out


def gpu_used_bytes() -> int | None:
    if not shutil.which("nvidia-smi"):
        return None
    from bench.launcher import gpu_used_bytes as used
    return used()


def measure(model_name: str, kind: str, bandwidth: float, workdir: Path) -> dict:
    from quantchat import loaders
    from quantchat.cli import parse_flags
    from quantchat.settings import from_flags
    path = gguf_of(model_name, kind, workdir)
    before = gpu_used_bytes()
    settings = from_flags(parse_flags([f"--base_model={path}", "--max_seq_len=4096"]))
    started = time.perf_counter()
    model = loaders.load(loaders.plan(settings))
    load_s = time.perf_counter() - started
    results = {"model": model_name, "row": f"llama.cpp {kind}", "decode": model.info.devices,
               "quantization": model.info.quantization, "dtype": model.info.dtype, "load_s": round(load_s, 1)}
    results.update(timings(model, timed_stream, load_s, bandwidth))
    after = gpu_used_bytes()
    if before is not None and after is not None:  # the driver's count: includes llama.cpp's CUDA context
        results["peak_gpu_gib"] = round((after - before) / 2**30, 2)
    from bench.decode import bytes_per_token
    results["bytes_per_token_gib"] = round(bytes_per_token(model, 16) / 2**30, 3)
    model.close()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(SHAPES), required=True)
    parser.add_argument("--type", choices=sorted(FILE_TYPES), required=True)
    parser.add_argument("--bandwidth", type=float, required=True, help="bytes per second, measured by decode.py")
    parser.add_argument("--workdir", default="/tmp/bench-models")
    a = parser.parse_args()
    print(json.dumps(measure(a.model, a.type, a.bandwidth, Path(a.workdir))))


if __name__ == "__main__":
    main()
