"""Hugging Face backend: a folder with config.json or a hub id, through transformers (plan.py decides, model.py loads
and streams, fast_decode.py is the static-cache decode loop, fused_projections.py joins GPTQ/AWQ projections)."""
from __future__ import annotations

from ...settings import Settings
from ..base import LoadPlan
from ..checkpoint import Checkpoint
from .plan import HFOptions as Options
from .plan import check, plan

NAME = "hf"
USES_TORCH = True     # the plan needs torch's view of the GPUs
OWN_FLAGS = ()        # flags that only this backend takes

__all__ = ["NAME", "USES_TORCH", "OWN_FLAGS", "Options", "claims", "check", "plan", "load"]


def claims(s: Settings, ckpt: Checkpoint | None) -> str | None:
    """Plain, GPTQ and AWQ folders and hub ids (ExLlama's formats are claimed before this backend is asked)."""
    if ckpt is None or ckpt.kind == "gguf":
        return None
    if ckpt.is_dir and ckpt.quant_method:
        return f"{ckpt.found}, quantized with {ckpt.quant_method}"
    return ckpt.found


def load(p: LoadPlan[Options]):
    from .model import HFModel
    return HFModel(p)
