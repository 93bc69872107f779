"""Dequantize a GGUF into a Hugging Face folder that the Hugging Face backend (and its fast path) loads.

python bench/convert_gguf.py GGUF TARGET [--dtype=bfloat16] [--tokenizer=DIR]
DIR's files replace the converted tokenizer's (transformers 5.17 on the GPU machine split the Gemma GGUF's
vocabulary character by character; 5.23 converts it right).
"""
import argparse
import shutil
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

parser = argparse.ArgumentParser()
parser.add_argument("gguf", type=Path)
parser.add_argument("target", type=Path)
parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
parser.add_argument("--tokenizer", type=Path)
args = parser.parse_args()
model = AutoModelForCausalLM.from_pretrained(args.gguf.parent, gguf_file=args.gguf.name, dtype=getattr(torch, args.dtype))
model.hf_quantizer = None  # plain weights now: let them be saved
if hasattr(model.config, "quantization_config"):
    del model.config.quantization_config
model.save_pretrained(args.target)
AutoTokenizer.from_pretrained(args.gguf.parent, gguf_file=args.gguf.name).save_pretrained(args.target)
for name in args.tokenizer.iterdir() if args.tokenizer else ():
    shutil.copy(name, args.target)
print("converted into", args.target)
