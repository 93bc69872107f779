"""The chat engine every front end shares.

It renders the prompt, fits the conversation into the context window, queues concurrent requests
(first come, first served), streams text, stops on stop strings, max_time or cancel, and times each answer.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from .constraints import Constraint, check
from .documents.passages import Passage, question_with_context
from .errors import UserError
from .generation import check_generation
from .history import History
from .loaders.base import ChatModel, GenParams
from .prompter import Message, Prompter
from .speculative import SpeculationStats
from .tools import ToolCall, ToolCallStream, Tools

# Defaults where neither the flags nor the request say (h2oGPT's, except max_new_tokens' cap)
DEFAULT_MAX_MAX_NEW_TOKENS = 4096
DEFAULT_MAX_MAX_TIME = 1800.0
DEFAULT_TOP_K_DOCS = 4
MOST_PASSAGES = 100  # top_k_docs=-1: as many as fit, out of at most this many


@dataclass
class Stats:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    queue_s: float = 0.0          # waiting for an earlier request to finish
    ttft_s: float | None = None   # from the start of generation to the first token
    total_s: float = 0.0
    finish_reason: str = ""       # eos, length, stop, time, cancelled, error
    dropped_turns: int = 0
    score: float | None = None    # the reward model's rating of the answer (--score_model)
    reused_tokens: int | None = None  # prompt tokens continued from the backend's cache, not evaluated again
    speculation: SpeculationStats | None = None  # guessed tokens checked and kept (backends that speculate)

    @property
    def tokens_per_s(self) -> float | None:
        """Decode speed: tokens after the first, over the time after the first."""
        if self.ttft_s is None or self.completion_tokens < 2 or self.total_s <= self.ttft_s:
            return None
        return (self.completion_tokens - 1) / (self.total_s - self.ttft_s)

    def line(self) -> str:
        speed = f"{self.tokens_per_s:.1f} tokens/s" if self.tokens_per_s else "- tokens/s"
        ttft = f"{self.ttft_s * 1000:.0f} ms to first token" if self.ttft_s is not None else "no tokens"
        reused = f" · {self.reused_tokens} of {self.prompt_tokens} prompt tokens reused" if self.reused_tokens else ""
        score = f" · score {self.score:.2f}" if self.score is not None else ""
        guesses = f" · {self.speculation.line()}" if self.speculation and self.speculation.shown else ""
        return f"{speed} · {ttft} · {self.completion_tokens} tokens · {self.finish_reason}{reused}{guesses}{score}"


class Turnstile:
    """A first-come, first-served lock with `slots` holders at once and a visible queue depth."""

    def __init__(self, slots: int = 1):
        self._cond = threading.Condition()
        self._slots = slots
        self._next_ticket = 0
        self._serving = 0      # tickets below this number have been admitted
        self._active = 0
        self._skipped: set[int] = set()

    @property
    def waiting(self) -> int:
        with self._cond:
            return self._next_ticket - self._serving - len(self._skipped)

    def acquire(self, cancel: threading.Event) -> bool:
        """Wait for our turn; False when cancelled while waiting (the ticket is then skipped)."""
        with self._cond:
            ticket = self._next_ticket
            self._next_ticket += 1
            while not (ticket == self._serving and self._active < self._slots):
                if cancel.is_set():
                    self._skipped.add(ticket)
                    self._skip_abandoned()
                    return False
                self._cond.wait(timeout=0.05)
            self._serving += 1
            self._active += 1
            self._skip_abandoned()
            return True

    def _skip_abandoned(self) -> None:
        while self._serving in self._skipped:
            self._skipped.discard(self._serving)
            self._serving += 1
        self._cond.notify_all()

    def release(self) -> None:
        with self._cond:
            self._active -= 1
            self._cond.notify_all()

    def wait_idle(self, timeout: float) -> bool:
        """Wait until no holder is left; whether that happened within `timeout` seconds."""
        with self._cond:
            return self._cond.wait_for(lambda: self._active == 0, timeout)


@dataclass
class Fitted:
    """A conversation fitted into the context: what the model is given, and what was given up to fit it."""
    prompt: str
    messages: list[Message]
    tokens: int
    dropped: int
    params: GenParams
    notices: list[str]


@dataclass
class Limits:
    """Caps that no request can exceed."""
    context_length: int
    max_max_new_tokens: int = DEFAULT_MAX_MAX_NEW_TOKENS
    max_max_time: float = DEFAULT_MAX_MAX_TIME


class Reply:
    """One answer: iterate for text deltas; afterwards `.text`, `.tool_calls`, `.stats` and `.notices` are set.
    `events()` yields the tool calls too, each once it is complete (tools.ToolCall), between the text deltas.
    `.sources` holds the document passages the answer was given (documents Q&A), best first.

    Leaving the loop early (a client that disconnects, Ctrl-C) ends the generation and frees its place.
    """

    def __init__(self, chunks: Iterator[str | ToolCall], stats: Stats, notices: list[str], sources: list[Passage]):
        self.text = ""
        self.tool_calls: list[ToolCall] = []
        self.stats = stats
        self.notices = notices
        self.sources = sources
        self._chunks = chunks

    def events(self) -> Iterator[str | ToolCall]:
        try:
            for chunk in self._chunks:
                if isinstance(chunk, ToolCall):
                    self.tool_calls.append(chunk)
                else:
                    self.text += chunk
                yield chunk
        finally:
            self._chunks.close()

    def __iter__(self) -> Iterator[str]:
        events = self.events()
        try:
            yield from (chunk for chunk in events if isinstance(chunk, str))
        finally:
            events.close()

    def finish(self) -> str:
        """Consume the whole answer; returns its text."""
        for _ in self.events():
            pass
        return self.text


@dataclass
class ChatEngine:
    model: ChatModel
    prompter: Prompter
    defaults: GenParams = field(default_factory=GenParams)
    limits: Limits | None = None
    verbose: bool = False
    log: Callable[[str], None] = print
    slots: int = 1
    history: History | None = None  # --save_dir: every finished answer is appended to its history.jsonl
    scorer: Any = None            # --score_model: has score(question, answer) -> float
    top_k_docs: int = DEFAULT_TOP_K_DOCS  # passages per question in documents Q&A; -1: as many as fit

    def __post_init__(self):
        self.limits = self.limits or Limits(self.model.info.context_length)
        self.queue = Turnstile(self.slots)
        self._running: set[threading.Event] = set()   # the cancel events of the generations under way
        self._closing = threading.Event()

    def stop_all(self, timeout: float = 30.0) -> bool:
        """Cancel every generation, refuse new ones and wait until none runs (before the model is freed: freeing it
        under a running generation crashes the process). False if one was still running after `timeout`."""
        self._closing.set()
        for cancel in list(self._running):
            cancel.set()
        return self.queue.wait_idle(timeout)

    @property
    def queue_depth(self) -> int:
        return self.queue.waiting

    def params(self, **overrides: Any) -> GenParams:
        """Request settings over the defaults, with None meaning 'the default', capped by the limits."""
        known = {f.name for f in fields(GenParams)}
        unknown = set(overrides) - known
        if unknown:
            raise UserError(f"unknown generation settings: {sorted(unknown)}")
        p = replace(self.defaults, **{k: v for k, v in overrides.items() if v is not None})
        check_generation(asdict(p))
        p.max_new_tokens = min(p.max_new_tokens, self.limits.max_max_new_tokens)
        p.max_time = min(p.max_time, self.limits.max_max_time)
        p.min_new_tokens = min(max(p.min_new_tokens, 0), p.max_new_tokens)
        if p.temperature == 0:
            p.do_sample = False
        return p

    def fit(self, messages: list[Message], params: GenParams, tools: list[dict] | None = None) -> Fitted:
        """Drop the oldest turns until the prompt and the answer fit into the context."""
        context = self.limits.context_length
        system = [m for m in messages if m["role"] == "system"]
        turns = [m for m in messages if m["role"] != "system"]
        if not turns or turns[-1]["role"] not in ("user", "tool") or not str(turns[-1]["content"]).strip():
            raise UserError("the last message must be a non-empty user message (or a tool's result)")
        dropped, notices = 0, []
        while True:
            prompt = self.prompter.render(system + turns, tools)
            n = self.model.count_tokens(prompt)
            # the oldest exchange goes: a user turn and what follows it up to the next (answers, tool calls and
            # their results together: a tool's result without its call would mislead the model)
            cut = next((i for i in range(1, len(turns)) if turns[i]["role"] == "user"), None)
            if n + params.max_new_tokens <= context or cut is None:
                break
            turns, dropped = turns[cut:], dropped + cut
        if dropped:
            notices.append(f"dropped the {dropped} oldest message(s) to fit the {context}-token context")
        params = self._room_for_answer("message", n, params, notices)
        return Fitted(prompt, system + turns, n, dropped, params, notices)

    def _room_for_answer(self, what: str, n_prompt: int, params: GenParams, notices: list[str]) -> GenParams:
        """Refuse a prompt that fills the context; shorten the answer to what is left of it, saying so."""
        context = self.limits.context_length
        if n_prompt >= context:
            raise UserError(f"the {what} is {n_prompt} tokens, and the context holds {context}: shorten it")
        if n_prompt + params.max_new_tokens > context:
            notices.append(f"answer limited to {context - n_prompt} tokens by the {context}-token context")
            return replace(params, max_new_tokens=context - n_prompt)
        return params

    def fit_with_passages(self, messages: list[Message], passages: list[Passage], params: GenParams,
                          tools: list[dict] | None = None) -> tuple[Fitted, list[Passage]]:
        """The last question with its passages in front; the weakest passages go until the answer fits too."""
        if not passages:
            return self.fit(messages, params, tools), []
        context = self.limits.context_length
        for n in range(len(passages), -1, -1):
            asked = {"role": "user", "content": question_with_context(messages[-1]["content"], passages[:n])}
            try:
                fitted = self.fit([*messages[:-1], asked], params, tools)
            except UserError:
                if n:
                    continue
                raise
            if n == 0 or fitted.tokens + params.max_new_tokens <= context:
                break
        if n < len(passages):
            fitted.notices.append(f"used {n} of the {len(passages)} passages found, to fit the {context}-token context")
        return fitted, passages[:n]

    def chat(self, messages: list[Message], params: GenParams | None = None, cancel: threading.Event | None = None,
             documents: Any = None, tools: Tools | None = None, answer_format: Constraint | None = None) -> Reply:
        """Answer the conversation. Errors a user causes raise UserError before the first token.

        documents: a collection (documents Q&A): the passages nearest to the last question go into the prompt,
        and the reply lists them as its sources.
        tools: functions the model may call (rendered by its chat template; calls come back as tools.ToolCall).
        answer_format: a grammar the answer must follow (response_format's JSON schema).
        """
        params = params or self.params()
        if self.prompter.system_prompt and not any(m["role"] == "system" for m in messages):
            messages = [{"role": "system", "content": self.prompter.system_prompt}, *messages]
        passages: list[Passage] = []
        if documents is not None and messages and messages[-1]["role"] == "user":
            k = self.top_k_docs if self.top_k_docs > 0 else MOST_PASSAGES
            passages = documents.search(str(messages[-1]["content"]), k)
        offered = tools.offered() if tools else None
        fitted, passages = self.fit_with_passages(messages, passages, params, offered)
        if documents is not None and not passages:
            fitted.notices.append(f"no passages from {documents.name}: answered without documents")
        params = replace(fitted.params, stop=list(dict.fromkeys([*params.stop, *self.prompter.stop])))
        cancel = cancel or threading.Event()
        if getattr(self.model, "takes_messages", False):  # a chat API: the server applies its template
            request = {**(tools.request() if tools else {}), **dict(answer_format.request if answer_format else ())}

            def tokens() -> Iterator[str]:   # (and tool calls, as the server sends them)
                return self.model.stream_chat(fitted.messages, params, cancel, request)
        else:
            constraint = answer_format or (self.prompter.tool_format.constraint(tools) if offered else None)
            params = replace(params, constraint=self._enforceable(constraint, params))

            def tokens() -> Iterator[str]:
                return self.model.stream(fitted.prompt, params, cancel)
        return self._reply(tokens, fitted.prompt, params, cancel, fitted.notices, messages,
                           Stats(prompt_tokens=fitted.tokens, dropped_turns=fitted.dropped), passages,
                           ToolCallStream(self.prompter.tool_format, tools.names() if tools else None)
                           if self.prompter.tool_format else None)

    def _enforceable(self, constraint: Constraint | None, params: GenParams) -> Constraint | None:
        """The constraint, once the backend is known to follow it and its grammar compiles (else one line)."""
        if constraint is None:
            return None
        if params.num_beams > 1 or params.min_new_tokens:
            raise UserError(f"{constraint.what} is enforced token by token: it needs num_beams=1 and min_new_tokens=0")
        tokenizer = getattr(self.model, "lltokenizer", None)
        if tokenizer is None:
            raise UserError(f"the {self.model.info.backend} backend cannot constrain its output, so {constraint.what} "
                            "cannot be guaranteed: use the llama.cpp or Hugging Face backend")
        check(constraint, tokenizer)
        return constraint

    def complete(self, prompt: str, params: GenParams | None = None, cancel: threading.Event | None = None) -> Reply:
        """Continue raw text: no prompt format, no history to fit (a prompt too long for the context is refused)."""
        n_prompt = self.model.count_tokens(prompt)
        notices: list[str] = []
        params = self._room_for_answer("prompt", n_prompt, params or self.params(), notices)
        cancel = cancel or threading.Event()
        return self._reply(lambda: self.model.stream(prompt, params, cancel), prompt, params, cancel, notices,
                           [{"role": "prompt", "content": prompt}], Stats(prompt_tokens=n_prompt))

    def _reply(self, tokens: Callable[[], Iterator[str]], prompt: str, params: GenParams, cancel: threading.Event,
               notices: list[str], saved_as: list[Message], stats: Stats, sources: list[Passage] | None = None,
               tool_calls: ToolCallStream | None = None) -> Reply:
        """Queue, generate and time one answer; nothing runs until the Reply is iterated."""
        if self.verbose:
            self.log(f"prompt ({stats.prompt_tokens} tokens):\n{prompt}")

        def run() -> Iterator[str]:
            asked = time.perf_counter()
            self._running.add(cancel)
            if self._closing.is_set():
                cancel.set()
            if not self.queue.acquire(cancel):
                self._running.discard(cancel)
                stats.finish_reason = "cancelled"
                return
            start = time.perf_counter()
            stats.queue_s = start - asked
            answer: list[str] = []
            calls: list[ToolCall] = []
            try:
                for chunk in _with_tool_calls(self._generate(tokens(), params, cancel, stats, start), tool_calls):
                    (calls if isinstance(chunk, ToolCall) else answer).append(chunk)
                    yield chunk
            finally:
                stats.total_s = time.perf_counter() - start
                stats.speculation = params.report.speculation
                self._running.discard(cancel)
                self.queue.release()
                if self.scorer and answer and stats.finish_reason != "error":
                    question = next((m["content"] for m in reversed(saved_as) if m["role"] in ("user", "prompt")), "")
                    stats.score = self.scorer.score(question, "".join(answer))
                if self.verbose:
                    self.log(stats.line())
                if self.history:
                    self._save(saved_as, "".join(answer), calls, params, stats, sources or [])

        return Reply(run(), stats, notices, sources or [])

    def _save(self, messages: list[Message], answer: str, calls: list[ToolCall], params: GenParams, stats: Stats,
              sources: list[Passage]) -> None:
        """One JSON line per answer: the conversation, the answer, the settings, the model, the timings
        and (documents Q&A) the sources."""
        record = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "model": self.model.info.model,
                  "backend": self.model.info.backend, "messages": messages, "answer": answer,
                  "params": {**{k: v for k, v in asdict(replace(params, constraint=None)).items() if k != "report"},
                             "constraint": params.constraint.what if params.constraint else None},
                  "stats": {**asdict(stats), "tokens_per_s": stats.tokens_per_s}}
        if sources:
            record["sources"] = [p.as_dict() for p in sources]
        if calls:
            record["tool_calls"] = [c.as_openai() for c in calls]
        self.history.append(record)

    def _generate(self, tokens: Iterator[str], params: GenParams, cancel: threading.Event, stats: Stats,
                  start: float) -> Iterator[str]:
        stop_strings = [s for s in params.stop if s]
        hold = max((len(s) for s in stop_strings), default=1) - 1
        text, sent = "", 0  # all text so far; how much of it has been handed out
        stats.finish_reason = "eos"
        try:
            for piece in tokens:
                if stats.ttft_s is None:
                    stats.ttft_s = time.perf_counter() - start
                    stats.reused_tokens = params.report.reused_tokens
                if isinstance(piece, ToolCall):  # a remote engine's call, read by the server
                    yield piece
                    continue
                stats.completion_tokens += 1
                text += piece
                cut = min((i for i in (text.find(s, max(sent - hold, 0)) for s in stop_strings) if i >= 0),
                          default=-1)
                if cut >= 0:
                    stats.finish_reason = "stop"
                    if cut > sent:
                        yield text[sent:cut]
                    return
                # hold back a tail that could be the start of a stop string
                safe = len(text) - hold if stop_strings else len(text)
                if safe > sent:
                    yield text[sent:safe]
                    sent = safe
                if cancel.is_set():
                    stats.finish_reason = "cancelled"
                    break
                if time.perf_counter() - start > params.max_time:
                    stats.finish_reason = "time"
                    break
            else:
                if cancel.is_set():
                    stats.finish_reason = "cancelled"
                elif stats.completion_tokens >= params.max_new_tokens:
                    stats.finish_reason = "length"
        except BaseException:
            stats.finish_reason = "error"
            raise
        finally:
            tokens.close()
        if len(text) > sent:
            yield text[sent:]


def _with_tool_calls(chunks: Iterator[str], calls: ToolCallStream | None) -> Iterator[str | ToolCall]:
    """The answer's text with the model's tool calls (in its template's format) taken out as ToolCall events."""
    if calls is None:
        yield from chunks
        return
    try:
        for chunk in chunks:
            yield from calls.feed(chunk)
        yield from calls.close()
    finally:
        chunks.close()
