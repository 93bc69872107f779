"""Choose a backend from the files (not the name), plan the load, and load.

A backend is one module (or package) in this folder and one row in BACKENDS. It exports:
  NAME        the name plans and the model panel show
  USES_TORCH  whether its plan needs torch's view of the GPUs (Machine.probe(torch_view=True))
  OWN_FLAGS   flags only it takes (refused, with one line, when another backend is chosen)
  Options     a dataclass of its load arguments: LoadPlan[Options].options
  claims(settings, checkpoint) -> why | None     whether it loads this checkpoint, and why
  check(settings, checkpoint)                    its flag rules: raise UsageError/UserError
  plan(settings, checkpoint, machine, why) -> LoadPlan[Options]    reads small files only; no side effects
  load(plan) -> ChatModel                        reads the weights; imports its library here, not before

BACKENDS is asked in order and the first that claims the checkpoint loads it. Backend modules import their
libraries inside functions, so importing quantchat imports none of them.
"""
from __future__ import annotations

from types import ModuleType

from ..errors import UsageError, UserError
from ..machine import Machine
from ..settings import Settings
from . import exllama, hf, llamacpp, remote
from .base import ChatModel, GenParams, LoadPlan, ModelInfo
from .checkpoint import Checkpoint, read_checkpoint

__all__ = ["BACKENDS", "plan", "load", "choose", "ChatModel", "GenParams", "LoadPlan", "ModelInfo", "Checkpoint"]

# in the order asked: ExLlama's formats before the Hugging Face folders that look like them
BACKENDS: list[ModuleType] = [remote, exllama, llamacpp, hf]


def backend(name: str) -> ModuleType:
    for module in BACKENDS:
        if module.NAME == name:
            return module
    raise KeyError(name)


def choose(s: Settings) -> tuple[ModuleType, Checkpoint | None, str]:
    """(backend, checkpoint, why) for the settings; the checkpoint is None for a remote engine."""
    ckpt = None if s.inference_server else read_checkpoint(s)
    for module in BACKENDS:
        why = module.claims(s, ckpt)
        if why:
            return module, ckpt, why
    raise UserError(f"no backend loads {ckpt.path if ckpt else s.base_model}")


def _check_own_flags(s: Settings, chosen: ModuleType, model: str) -> None:
    """A flag that only another backend takes is a mistake worth one line, not a silent no-op."""
    defaults = Settings()
    for module in BACKENDS:
        for flag in module.OWN_FLAGS if module is not chosen else ():
            if getattr(s, flag) != getattr(defaults, flag):
                raise UsageError(f"--{flag} applies to the {module.NAME} backend, and {model} loads through "
                                 f"{chosen.NAME}: drop --{flag}" +
                                 (" or add --load_exllama=True" if module is exllama else ""))


def plan(s: Settings, machine: Machine | None = None) -> LoadPlan:
    """The load plan; `machine` is probed here when not given (tests give one)."""
    module, ckpt, why = choose(s)
    _check_own_flags(s, module, ckpt.path if ckpt else s.inference_server)
    module.check(s, ckpt)
    return module.plan(s, ckpt, machine or Machine.probe(torch_view=module.USES_TORCH), why)


def load(p: LoadPlan) -> ChatModel:
    return backend(p.backend).load(p)
