"""python quantize.py --base_model=DIR --method=gptq|awq|exl2|exl3 --out=DIR [--bits=4 --group_size=128 --calibration=FILE]

Writes a quantized checkpoint that generate.py loads: GPTQ and AWQ with gptqmodel (the maintained successor of
AutoGPTQ and AutoAWQ), EXL2 with exllamav2's converter, EXL3 with exllamav3's. The calibration text defaults to the one shipped in
quantchat/data/calibration.txt, so nothing is downloaded.
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .errors import UsageError, UserError, missing_package
from .loaders import checkpoint
from .loaders.hf.plan import safetensors_shapes

DATA = Path(__file__).parent / "data"
DEFAULT_CALIBRATION = DATA / "calibration.txt"
METHODS = ("gptq", "awq", "exl2", "exl3")


@dataclass
class QuantizeArgs:
    base_model: str
    method: str
    out: str
    bits: float = 4
    group_size: int = 128
    calibration: str = str(DEFAULT_CALIBRATION)
    samples: int = 128          # calibration passages (GPTQ/AWQ) or rows (EXL2/EXL3)
    sample_tokens: int = 512    # tokens per passage


def check(a: QuantizeArgs) -> None:
    if a.method not in METHODS:
        raise UsageError(f"--method={a.method}: choose one of {', '.join(METHODS)}")
    if not a.out:
        raise UsageError("--out: name the new folder to write the quantized checkpoint into")
    base = Path(a.base_model)
    if not (base / "config.json").is_file():
        raise UserError(f"--base_model={a.base_model} is not a model folder with config.json (quantizing reads "
                        "unquantized safetensors weights; convert a GGUF with bench/convert_gguf.py first)")
    # the checks a load makes, in one line each (damaged headers, configs and indexes), before the long run
    config = checkpoint.read_config(base)
    checkpoint.check_weight_index(base)
    if not safetensors_shapes(base):
        raise UserError(f"{base} has no .safetensors weights to quantize")
    if checkpoint.quantization(base, config):
        raise UserError(f"{base} is quantized already: quantize the unquantized model")
    if a.method == "awq" and config.get("model_type") == "gemma3_text":
        # gptqmodel 7.6's AWQ search calls Gemma 3's rotary embedding without its layer type, and scales Gemma 3's
        # RMSNorm, which multiplies by (1 + weight), as if it multiplied by weight: with both put right by hand
        # the result still answered noise (docs/quantization.md)
        raise UserError("gptqmodel's AWQ cannot quantize text-only Gemma 3 yet: use --method=gptq")
    if not Path(a.calibration).is_file():
        raise UserError(f"--calibration={a.calibration}: no such file")
    if a.method in ("gptq", "awq") and (a.bits not in (2, 3, 4, 8) or int(a.bits) != a.bits):
        raise UsageError(f"--bits={a.bits}: {a.method} takes 2, 3, 4 or 8")
    if a.method == "awq" and a.bits != 4:
        raise UsageError("--method=awq writes 4-bit weights only: use --bits=4")
    if a.method == "exl3" and not 1 <= a.bits <= 8:
        raise UsageError(f"--bits={a.bits}: exl3 takes 1 to 8 bits per weight (fractions allowed)")
    if a.method == "exl2" and not 2 <= a.bits <= 8:
        raise UsageError(f"--bits={a.bits}: exl2 takes 2 to 8 bits per weight (fractions allowed)")
    if a.group_size != -1 and a.group_size < 16:
        raise UsageError(f"--group_size={a.group_size}: 32, 64, 128 ... or -1 (one group per column)")
    if not 1 <= a.samples <= 100_000 or not 16 <= a.sample_tokens <= 2**17:
        raise UsageError(f"--samples={a.samples}, --sample_tokens={a.sample_tokens}: take 1 to 100,000 samples of 16 "
                         f"to {2**17} tokens")
    out = Path(a.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--out={a.out} exists and is not an empty folder: choose a new folder")


def calibration_passages(path: str, tokenizer, count: int, tokens: int) -> list[list[int]]:
    """Token windows cut from the calibration text, taken evenly across it; the last may be shorter."""
    ids = tokenizer(Path(path).read_text(encoding="utf-8"), add_special_tokens=False).input_ids
    if len(ids) < 64:
        raise UserError(f"--calibration={path} is too short to calibrate on (fewer than 64 tokens)")
    starts = range(0, max(1, len(ids) - tokens + 1), max(1, (len(ids) - tokens) // max(1, count - 1) or 1))
    return [ids[s:s + tokens] for s in list(starts)[:count]]


def quantize_gptqmodel(a: QuantizeArgs) -> None:
    if importlib.util.find_spec("gptqmodel") is None:
        raise missing_package("gptqmodel", "gptq", f"--method={a.method}")
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(a.base_model)
    passages = calibration_passages(a.calibration, tokenizer, a.samples, a.sample_tokens)
    run_gptqmodel(a.base_model, a.method, int(a.bits), a.group_size, passages, a.out)
    tokenizer.save_pretrained(a.out)


def run_gptqmodel(base_model: str, method: str, bits: int, group_size: int, passages: list[list[int]], out: str,
                  mock: bool = False) -> None:
    """GPTQ or AWQ with gptqmodel on the first GPU, or the CPU without one. mock: skip the search for good values
    (a checkpoint of the right layout for speed measurements, bench/decode.py): GPTQ's mock quantization, and for
    AWQ, which has none, gptqmodel's round-to-nearest fallback for every layer it can send there."""
    # gptqmodel sizes its CPU thread pools from the core count and refuses fewer than two workers
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(max(2, (os.cpu_count() or 2) // 2)))
    import torch
    from gptqmodel import GPTQModel, QuantizeConfig
    from gptqmodel.quantization.config import FORMAT, METHOD
    from gptqmodel.utils.backend import BACKEND
    extra = {"quant_method": METHOD.AWQ, "format": FORMAT.GEMM} if method == "awq" else {}
    if mock and method == "awq":
        # a calibration-coverage threshold no layer reaches: the layers skip AWQ's scale and clip search
        from gptqmodel.quantization.config import Fallback
        extra["fallback"] = Fallback(threshold=2**62)
    config = QuantizeConfig(bits=bits, group_size=group_size, mock_quantization=mock, **extra)
    on_gpu = torch.cuda.is_available()
    model = GPTQModel.load(base_model, config, device="cuda:0" if on_gpu else "cpu")
    # AWQ's default search kernels are CUDA-only; its plain torch kernel runs anywhere
    backend = BACKEND.AUTO if on_gpu or method == "gptq" else BACKEND.AWQ_TORCH
    model.quantize([{"input_ids": p, "attention_mask": [1] * len(p)} for p in passages], batch_size=1,
                   backend=backend)
    model.save(out)


def quantize_exl3(a: QuantizeArgs) -> None:
    if importlib.util.find_spec("exllamav3") is None:
        raise missing_package("exllamav3", "exllama", "--method=exl3")
    import torch
    from safetensors.torch import save_file
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(a.base_model)
    rows = calibration_passages(a.calibration, tokenizer, a.samples, a.sample_tokens)
    rows = [r for r in rows if len(r) == a.sample_tokens] or rows[:1]
    work = Path(tempfile.mkdtemp(prefix="quantchat-exl3-"))
    cal = work / "calibration.safetensors"
    save_file({"input_ids": torch.tensor([r[:len(rows[-1])] for r in rows])}, str(cal))
    run_converter("exllamav3.conversion.convert_model", ["-i", a.base_model, "-o", a.out, "-w", str(work / "job"),
                                                         "-b", str(a.bits), "-cd", str(cal), "-cr", str(len(rows)),
                                                         "-cc", str(len(rows[-1]))])


def quantize_exl2(a: QuantizeArgs) -> None:
    """exllamav2's converter reads calibration text from a parquet file and tokenizes it itself."""
    if importlib.util.find_spec("exllamav2") is None:
        raise missing_package("exllamav2", "exllama", "--method=exl2")
    import pandas
    work = Path(tempfile.mkdtemp(prefix="quantchat-exl2-"))
    cal = work / "calibration.parquet"
    pandas.DataFrame({"text": [Path(a.calibration).read_text(encoding="utf-8")]}).to_parquet(cal, engine="fastparquet")
    rows, length = str(a.samples), str(a.sample_tokens)
    run_converter("exllamav2.conversion.convert_exl2", ["-i", a.base_model, "-o", str(work / "job"), "-cf", a.out,
                                                        "-b", str(a.bits), "-c", str(cal), "-r", rows, "-mr", rows,
                                                        "-l", length, "-ml", length])


def run_converter(module: str, arguments: list[str]) -> None:
    """An exllama converter in a process of its own, its progress shown as it goes."""
    command = [sys.executable, "-m", module, *arguments]
    if subprocess.run(command, check=False).returncode != 0:
        raise UserError(f"{module.split('.')[0]}'s converter failed (its output is above); command: "
                        f"{' '.join(command)}")


def main(base_model: str = "", method: str = "", out: str = "", bits: float = 4, group_size: int = 128,
         calibration: str = str(DEFAULT_CALIBRATION), samples: int = 128, sample_tokens: int = 512) -> None:
    args = QuantizeArgs(base_model, method, out, bits, group_size, calibration, samples, sample_tokens)
    try:
        check(args)
        {"exl2": quantize_exl2, "exl3": quantize_exl3}.get(method, quantize_gptqmodel)(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(e.exit_code) from None
    print(f"wrote a {method} checkpoint to {out}: chat with  python generate.py --base_model={out}"
          + (" --load_exllama=True" if method.startswith("exl") else ""))


def cli() -> None:
    import fire
    fire.Fire(main)
