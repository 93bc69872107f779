"""Dequantize a GGUF into a Hugging Face folder that the Hugging Face backend (and its fast path) loads.

python bench/convert_gguf.py GGUF TARGET [--dtype=bfloat16] [--tokenizer=DIR]
DIR's files replace the converted tokenizer's (transformers 5.17 on the GPU machine split the Gemma GGUF's
vocabulary character by character; 5.23 converts it right). The tests and bench/prefix_cache.py call
`converted_once`.
"""
import argparse
import shutil
from pathlib import Path


def convert(gguf: Path, target: Path, dtype: str = "float32", tokenizer: Path | None = None) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=getattr(torch, dtype))
    model.hf_quantizer = None  # plain weights now: let them be saved
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(target)
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(target)
    for name in tokenizer.iterdir() if tokenizer else ():
        shutil.copy(name, target)


def converted_once(gguf: Path, folder: Path) -> Path:
    """`folder` holding the GGUF's weights in fp32, converted the first time it is asked for (written beside it,
    then renamed: an interrupted conversion leaves no folder that looks complete)."""
    if not (folder / "model.safetensors").exists():
        partial = folder.with_suffix(".partial")
        convert(Path(gguf), partial)
        partial.rename(folder)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("gguf", type=Path)
    parser.add_argument("target", type=Path)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--tokenizer", type=Path)
    args = parser.parse_args()
    convert(args.gguf, args.target, args.dtype, args.tokenizer)
    print("converted into", args.target)


if __name__ == "__main__":
    main()
