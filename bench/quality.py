"""Quality of each quantization of one model: perplexity on the held-out text that ships with quantchat
(quantchat/data/heldout.txt), against the unquantized model, plus one greedy answer per row as a coherence check.

  python bench/quality.py --model=DIR --gguf=FILE --work=DIR --out=bench/results/quality-h100.json \
      [--rows=reference,int8,nf4,gptq,awq,exllama-gptq,exl3,gguf]
  python bench/quality.py --table=bench/results/quality-h100.json

Every row loads through quantchat's own flags (--load_8bit, --load_gptq=model, --load_exllama ...), so the table
measures what users load. Checkpoints are written by quantize.py into --work on first use. Perplexity is taken
over windows of 512 tokens, each starting with BOS, with the unquantized model's tokenizer for every row.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import subprocess
import sys
import time
import traceback
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from quantchat import loaders  # noqa: E402
from quantchat.assembly import build_engine  # noqa: E402
from quantchat.loaders.base import GenParams  # noqa: E402
from quantchat.quantize import DATA  # noqa: E402
from quantchat.settings import from_flags  # noqa: E402

WINDOW = 512
QUESTION = "What is the capital of France? Answer in one sentence."
ROWS = {  # name: (flags beyond --base_model, which checkpoint, how it was made)
    "reference": ({}, "model", "unquantized (bf16 on a GPU, fp32 on the CPU)"),
    "int8": ({"load_8bit": True}, "model", "bitsandbytes int8"),
    "nf4": ({"load_4bit": True}, "model", "bitsandbytes NF4 + double quantization"),
    "gptq": ({"load_gptq": "model"}, "gptq", "GPTQ 4-bit, group 128 (quantize.py, gptqmodel)"),
    "awq": ({"load_awq": "model"}, "awq", "AWQ 4-bit, group 128 (quantize.py, gptqmodel)"),  # fails on Gemma 3
    "exllama-gptq": ({"load_exllama": True}, "gptq", "the GPTQ checkpoint through exllamav2"),
    "exl3": ({"load_exllama": True}, "exl3", "EXL3 4.0 bits per weight (quantize.py, exllamav3)"),
    "gguf": ({"llamacpp_dict": {"logits_all": True}}, "gguf", "the GGUF itself (Q4_K_M, llama.cpp)"),
}


def windows(ids: list[int], bos: int) -> list[list[int]]:
    return [[bos] + ids[i:i + WINDOW - 1] for i in range(0, len(ids), WINDOW - 1) if len(ids[i:i + WINDOW - 1]) > 1]


def logits(model, window: list[int]):
    """The loaded backend's own logits for each position of the window but the last, as float32 on its device."""
    import torch
    kind = type(model).__name__
    if kind == "HFModel":
        ids = torch.tensor([window], device=model.device)
        with torch.inference_mode():
            return model.model(ids).logits[0, :-1].float()
    if kind == "LlamaCppModel":
        llm = model.llm
        llm.reset()
        llm.eval(window)
        return torch.from_numpy(llm.scores[:len(window) - 1].copy()).float()
    if kind == "ExLlamaModel":
        inner = model._generator.model
        ids = torch.tensor([window])
        with torch.inference_mode():
            out = inner.forward(ids) if model.library == "exllamav2" else inner.forward(ids, {})
        return out[0, :-1, :inner.config.vocab_size].float()  # exllamav2 pads the vocabulary to a multiple of 32
    raise TypeError(kind)


def log_probs(model, window: list[int]) -> list[float]:
    """Log-probability of each token of the window after the first."""
    import torch
    scores = logits(model, window)
    targets = torch.tensor(window[1:], device=scores.device)
    return torch.log_softmax(scores, -1).gather(1, targets[:, None])[:, 0].tolist()


def checkpoint_for(which: str, a) -> str:
    if which == "model":
        return a.model
    if which == "gguf":
        return a.gguf
    out = Path(a.work) / which
    if not (out / "config.json").is_file():
        started = time.time()
        # a subprocess: a quantizer that fails inside its worker threads can end its whole process
        run = subprocess.run([sys.executable, str(ROOT / "quantize.py"), f"--base_model={a.model}", f"--method={which}",
                              f"--out={out}", "--bits=4", "--group_size=128", f"--samples={a.samples}"],
                             capture_output=True, text=True, check=False)
        if run.returncode != 0:
            errors = [line for line in run.stderr.splitlines() if "Error" in line] or run.stderr.splitlines()[-1:]
            raise RuntimeError(f"quantize.py --method={which} failed: {errors[-1] if errors else run.returncode}")
        (Path(a.work) / f"{which}.seconds").write_text(f"{time.time() - started:.1f}")
    return str(out)


def measure(name: str, a, heldout_ids: list[int], bos: int) -> dict:
    flags, which, how = ROWS[name]
    row = {"row": name, "how": how}
    try:
        base = checkpoint_for(which, a)
        seconds = Path(a.work) / f"{which}.seconds"
        if seconds.is_file():
            row["quantize_s"] = float(seconds.read_text())
        # Hugging Face rows: --fast_decode=False, as perplexity needs no decode loop and its compilation adds load time
        hf_row = which != "gguf" and "load_exllama" not in flags
        settings = from_flags({"base_model": base, **flags, **({"fast_decode": False} if hf_row else {})})
        plan = loaders.plan(settings)
        started = time.time()
        model = loaders.load(plan)
        row.update(load_s=round(time.time() - started, 1), backend=model.info.backend,
                   quantization=model.info.quantization)
        total, count = 0.0, 0
        for window in windows(heldout_ids, bos):
            values = log_probs(model, window)
            total -= sum(values)
            count += len(values)
        row.update(perplexity=round(math.exp(total / count), 3), tokens=count)
        reply = build_engine(settings, model).chat([{"role": "user", "content": QUESTION}],
                                                   GenParams(max_new_tokens=24, repetition_penalty=1.0))
        row["answer"] = "".join(reply).strip()
        model.close()
    except Exception as e:  # one failing row must not lose the others
        row["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}"
        traceback.print_exc()
    print(json.dumps(row), flush=True)
    return row


def versions() -> dict:
    found = {}
    for package in ("torch", "transformers", "gptqmodel", "bitsandbytes", "exllamav2", "exllamav3",
                    "llama-cpp-python"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            pass
    return found


def table(result: dict) -> str:
    reference = next((r.get("perplexity") for r in result["rows"] if r["row"] == "reference"), None)
    samples = f"; quantized with {result['samples']} calibration passages" if "samples" in result else ""
    lines = [f"Held-out text: {result['tokens']} tokens; machine: {result['machine']}; {result['date']}{samples}.", "",
             "| row | how | perplexity | vs unquantized | quantize s | load s | greedy answer |",
             "|---|---|---:|---:|---:|---:|---|"]
    for r in result["rows"]:
        ppl = r.get("perplexity")
        delta = f"{(ppl / reference - 1) * 100:+.1f}%" if ppl and reference and r["row"] != "reference" else ""
        answer = (r.get("answer") or r.get("error", "")).replace("|", "\\|").replace("\n", " ")[:90]
        lines.append(f"| {r['row']} | {r['how']} | {ppl if ppl else 'failed'} | {delta} | {r.get('quantize_s', '')} "
                     f"| {r.get('load_s', '')} | {answer} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="the unquantized model folder (safetensors)")
    parser.add_argument("--gguf", help="the GGUF the model was dequantized from")
    parser.add_argument("--work", default="/tmp/quantchat-quality")
    parser.add_argument("--rows", default=",".join(ROWS))
    parser.add_argument("--samples", type=int, default=128, help="calibration passages of 512 tokens")
    parser.add_argument("--out")
    parser.add_argument("--table", help="print the Markdown table of a result file")
    a = parser.parse_args()
    if a.table:
        print(table(json.loads(Path(a.table).read_text())))
        return
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(a.model)
    heldout = tokenizer((DATA / "heldout.txt").read_text(encoding="utf-8"), add_special_tokens=False).input_ids
    Path(a.work).mkdir(parents=True, exist_ok=True)
    import torch
    machine = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({platform.processor() or 'x86'})"
    result = {"date": time.strftime("%Y-%m-%d"), "machine": machine, "versions": versions(), "tokens": len(heldout),
              "window": WINDOW, "model": a.model, "samples": a.samples, "rows": []}
    for name in a.rows.split(","):
        result["rows"].append(measure(name, a, heldout, tokenizer.bos_token_id))
        if a.out:  # after every row, so that a run cut short keeps what it measured
            Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
    print(table(result))


if __name__ == "__main__":
    main()
