"""A backend the tests register (loaders.BACKENDS): one module, one row, as docs/architecture.md says a backend is.

It claims model folders whose config.json says model_type "quantchat-fake", and answers by repeating the last user
message of the rendered prompt, one word a token: the command line, plan, load, engine and front end all run for real,
with neither torch nor llama.cpp imported.
"""
from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass

from quantchat.errors import UsageError
from quantchat.loaders.base import GenParams, LoadPlan, ModelInfo

NAME = "fake"
USES_TORCH = False
OWN_FLAGS = ()
MODEL_TYPE = "quantchat-fake"
TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}assistant:{% endif %}")


@dataclass(frozen=True)
class Options:
    prefix: str   # said before the echoed words


def claims(s, ckpt) -> str | None:
    if ckpt is not None and ckpt.kind == "folder" and ckpt.config.get("model_type") == MODEL_TYPE:
        return "a folder whose config.json says quantchat-fake"
    return None


def check(s, ckpt) -> None:
    if s.load_4bit:
        raise UsageError("--load_4bit: the fake backend has no weights to quantize")


def plan(s, ckpt, machine, why: str) -> LoadPlan[Options]:
    context = s.max_seq_len or ckpt.config.get("max_position_embeddings", 256)
    return LoadPlan(NAME, why, ckpt.path, "nowhere", "none", "none", context, 0, 0,
                    Options(ckpt.config.get("prefix", "you said:")))


def load(p: LoadPlan[Options]) -> FakeBackendModel:
    return FakeBackendModel(p)


class FakeBackendModel:
    def __init__(self, p: LoadPlan[Options]):
        self.prefix = p.options.prefix
        self.info = ModelInfo(NAME, p.model, p.devices, p.dtype, p.quantization, p.context_length, 0, TEMPLATE)

    def count_tokens(self, text: str) -> int:
        return len(text.split())

    def stream(self, prompt: str, params: GenParams, cancel: threading.Event) -> Iterator[str]:
        said = prompt.rsplit("user: ", 1)[-1].split("\n", 1)[0]
        for i, word in enumerate([self.prefix, *said.split()][:params.max_new_tokens]):
            if cancel.is_set():
                return
            yield word if i == 0 else " " + word

    def close(self) -> None:
        pass
