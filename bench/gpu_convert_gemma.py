"""Dequantize the Gemma 3 270M GGUF into a Hugging Face folder, where tests/conftest.py expects it.

python bench/gpu_convert_gemma.py GGUF [TOKENIZER_DIR]: a TOKENIZER_DIR replaces the converted tokenizer files
(transformers 5.17 on the GPU machine split the GGUF vocabulary character by character; 5.23 converts it right).
"""
import os
import shutil
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from conftest import CACHE  # noqa: E402

gguf = Path(sys.argv[1])
target = CACHE / "gemma3-270m-from-gguf"
model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
model.hf_quantizer = None  # plain fp32 weights now: let them be saved
del model.config.quantization_config
model.save_pretrained(target)
if len(sys.argv) > 2:
    for name in os.listdir(sys.argv[2]):
        shutil.copy(Path(sys.argv[2]) / name, target)
print("converted into", target)
