"""The small interface every backend implements, and the plan that chooses one."""
from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Generic, Protocol, TypeVar

if TYPE_CHECKING:
    from ..constraints import Constraint
    from ..speculative import SpeculationStats


def human_bytes(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


class Prompt(str):
    """A rendered prompt that knows which of its characters came from the conversation (user, system, assistant and
    tool text, document passages) rather than from the prompt format. Backends tokenize those as plain text, so that
    control tokens typed into a message (<|im_start|>, <end_of_turn> ...) stay text and cannot forge a turn; only
    the template's own markup may become special tokens. A plain str (a raw completion's prompt) is all markup."""
    untrusted: tuple[tuple[int, int], ...] = ()   # (start, end) character spans, in order, not overlapping

    @classmethod
    def marking(cls, text: str, contents: list[str]) -> Prompt:
        """`text` with each of `contents` (in the order rendered) marked where it was written; a content the template
        changed beyond recognition stays unmarked."""
        spans, pos = [], 0
        for content in contents:
            for needle in (content, content.strip()):
                at = text.find(needle, pos) if needle else -1
                if at >= 0:
                    spans.append((at, at + len(needle)))
                    pos = at + len(needle)
                    break
        prompt = cls(text)
        prompt.untrusted = tuple(spans)
        return prompt


def segments(prompt: str) -> list[tuple[str, bool]]:
    """The prompt in order as (text, is_markup) pieces; a plain str is one piece of markup."""
    pieces, pos = [], 0
    for start, end in getattr(prompt, "untrusted", ()):
        if start > pos:
            pieces.append((prompt[pos:start], True))
        pieces.append((prompt[start:end], False))
        pos = end
    if pos < len(prompt) or not pieces:
        pieces.append((prompt[pos:], True))
    return pieces


def reusable_prefix(cached: list[int], prompt: list[int]) -> int:
    """How many leading tokens of `prompt` a cache holding `cached` can skip: the prefix they share, less the
    prompt's last token at least, whose logits choose the first new token. 0 where they share less than half the
    prompt: attention over a rest that continues a cache runs with an explicit mask, which on a GPU took longer for
    a 7,084-token rest than the causal kernel for the whole 7,093 tokens (489 against 258 ms, an H200)."""
    shared = shared_prefix(cached, prompt)
    return min(shared, len(prompt) - 1) if 2 * shared >= len(prompt) else 0


def shared_prefix(a: list[int], b: list[int]) -> int:
    """How many leading tokens `a` and `b` have in common, found by halving with slice comparisons (C loops): a
    6,000-token history's comparison took 0.8 ms token by token in Python."""
    low, high = 0, min(len(a), len(b))  # a[:low] == b[:low]; the first difference is before `high`, if any
    if a[:high] == b[:high]:
        return high
    while high - low > 1:
        middle = (low + high) // 2
        if a[low:middle] == b[low:middle]:
            low = middle
        else:
            high = middle
    return low


class Either:
    """is_set() of either event: the caller's cancel, or a backend's own stop when the consumer goes away."""

    def __init__(self, a: threading.Event, b: threading.Event):
        self.a, self.b = a, b

    def is_set(self) -> bool:
        return self.a.is_set() or self.b.is_set()


@dataclass
class GenerationReport:
    """What a backend tells about one generation besides its text, written as it goes. It travels in the request's
    GenParams, so that concurrent requests each read their own."""
    reused_tokens: int = 0                       # prompt tokens continued from the backend's cache (--prefix_cache)
    speculation: SpeculationStats | None = None  # guesses checked and kept (--speculative)


@dataclass
class GenParams:
    """Generation settings after defaults and caps are applied (see engine.resolve_params)."""
    max_new_tokens: int = 256
    min_new_tokens: int = 0
    temperature: float = 0.1
    top_p: float = 0.75
    top_k: int = 40
    repetition_penalty: float = 1.07
    do_sample: bool = False
    num_beams: int = 1
    max_time: float = 600.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    constraint: Constraint | None = None   # the grammar the answer must follow (a JSON schema, a tool call)
    # (not an argument: every GenParams, dataclasses.replace's copies too, gets its own)
    report: GenerationReport = field(default_factory=GenerationReport, init=False, compare=False, repr=False)


@dataclass
class ModelInfo:
    """What the UI's model panel and --dry_run show."""
    backend: str
    model: str
    devices: str
    dtype: str
    quantization: str
    context_length: int
    weight_bytes: int | None = None
    chat_template: str | None = None   # the model's own Jinja template, if it has one
    bos_token: str = ""
    eos_token: str = ""
    decode: str = ""                   # how tokens are made, where it matters (the HF backend's fast path)

    def summary(self) -> list[tuple[str, str]]:
        size = human_bytes(self.weight_bytes) if self.weight_bytes else "unknown"
        rows = [("backend", self.backend), ("model", self.model), ("devices", self.devices), ("dtype", self.dtype),
                ("quantization", self.quantization), ("context", f"{self.context_length} tokens"),
                ("weights in memory", size)]
        return rows + ([("decoding", self.decode)] if self.decode else [])


Options = TypeVar("Options")


@dataclass
class LoadPlan(Generic[Options]):
    """Everything decided before any weight is read; --dry_run prints it. `options` is the backend's own typed
    dataclass of load arguments (e.g. loaders.hf.HFOptions)."""
    backend: str                 # a name in loaders.BACKENDS
    reason: str                  # why this backend was chosen
    model: str                   # path or hub id
    devices: str
    dtype: str
    quantization: str
    context_length: int | None
    weight_bytes: int | None     # estimate of the weights' size in memory
    kv_cache_bytes: int | None   # estimate of the KV cache at full context
    options: Options             # backend-specific load arguments
    notes: list[str] = field(default_factory=list)          # warnings to show the user
    gpu_layers: tuple[int, int] | None = None               # (layers on the GPU, all layers) where known
    activation_bytes: int | None = None                     # estimate of the largest prefill's activations

    def describe(self) -> str:
        def gib(n: int | None) -> str:
            return human_bytes(n) if n else "unknown"
        rows = [("backend", f"{self.backend}  ({self.reason})"), ("model", self.model), ("devices", self.devices),
                ("dtype", self.dtype), ("quantization", self.quantization),
                ("context length", f"{self.context_length} tokens" if self.context_length else "unknown"),
                ("weights (estimate)", gib(self.weight_bytes)), ("KV cache at full context", gib(self.kv_cache_bytes))]
        if self.activation_bytes and self.weight_bytes and self.kv_cache_bytes:
            from ..memory import MemoryEstimate
            need = MemoryEstimate(self.weight_bytes, self.kv_cache_bytes, self.activation_bytes, self.context_length)
            on_gpu = not self.devices.startswith(("cpu", "mps"))
            total = need.total if on_gpu else need.allocated
            rows += [("activations (prefill)", gib(self.activation_bytes)),
                     ("total (estimate)", gib(total) + (" with the CUDA context" if on_gpu else ""))]
        text = "\n".join(f"  {k:<26}{v}" for k, v in rows)
        return "load plan:\n" + text + "".join(f"\n  note: {n}" for n in self.notes)


class ChatModel(Protocol):
    """A loaded model. `stream` yields the text of each generated token, one item per token.

    A backend that can follow `params.constraint` (constraints.py) has an `lltokenizer` attribute: its vocabulary
    as llguidance sees it; the engine refuses constrained requests to backends without one."""
    info: ModelInfo

    def count_tokens(self, text: str) -> int: ...

    def stream(self, prompt: str, params: GenParams, cancel: threading.Event) -> Iterator[str]: ...

    def close(self) -> None: ...
