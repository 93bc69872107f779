"""Fast decoding for Hugging Face models: gpt-fast's recipe over transformers' own modules.

A static KV cache (fixed addresses, so the step can be replayed), the one-token step compiled by torch.compile
(Inductor's fused kernels) and then captured whole in a CUDA graph, the next token chosen on the GPU
(repetition penalty, temperature, top-k, top-p), and one host wait per token, for the token id that streaming
needs, while the GPU already runs the next step. A prompt of up to PROMPT_STEP_TOKENS (or what a chat's next turn
adds to the cached history) goes through a captured step of that width, padded; a longer one is prefilled eagerly
(its length changes every request). Attention reads the cache only
up to the smallest window (256, 512, ... positions) that holds the sequence so far, with one captured graph per
window. Compiling takes minutes for a 7B model, so the Hugging Face
backend warms this path up in the background and answers with generate until it is ready (loaders/hf.py).

The graph is captured by hand (torch.cuda.CUDAGraph) rather than by mode="reduce-overhead", which records one
graph per piece between graph breaks and returns to Python between them: any code the compiler cannot trace would
break the step into pieces (4-bit layers did, before they became one operator each: compiled_4bit.py). A captured
graph replays every kernel of every piece with no Python at all. All GPU work runs in one worker thread, shared by every
model in the process, so each decoder's static cache serves one request at a time.

Greedy output equals `generate`'s token for token (tests/test_fast_decode.py), with the same logits
processors in the same order: repetition penalty, min_new_tokens, then temperature, top-k, top-p.

With --speculative, a second captured step checks several tokens at once: the token just chosen and up to
--num_speculative_tokens guesses from prompt lookup (speculative.py). Its width is fixed (guesses are padded), so
that one graph per window serves every step; at batch 1 it reads the weights once, as the one-token step does
(bench/results/verify-captured-h200-run1.json, -run2.json: 1.36x and 1.12x a one-token step for 9 tokens, the
Llama-3-8B shape on an H200; the rest is attention and launches; 1.42-1.47x for the built-in 0.5B's shape, whose
steps are bound by their launches, verify-captured-h200-qwen05.json).
"""
from __future__ import annotations

import contextlib
import queue
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from ...constraints import TokenGuide
from ...speculative import DraftControl, DraftRecord, PromptLookup, answer_control
from ..base import Either, GenerationReport, GenParams, reusable_prefix, shared_prefix
from . import attention
from .sampling import choose_token, seen_after_each
from .static_cache import full_attention_config, window_lengths, windowed_static_cache

DEFAULT_CACHE_TOKENS = 8192  # the static cache's length unless the context is shorter (KV memory is allocated up front)


_JOBS: queue.Queue | None = None
_JOBS_LOCK = threading.Lock()


def _decode_thread() -> queue.Queue:
    """The one thread that runs every fast decoder's GPU work (started on first use)."""
    global _JOBS
    with _JOBS_LOCK:
        if _JOBS is None:
            _JOBS = queue.Queue()
            threading.Thread(target=_serve, args=(_JOBS,), name="fast-decode", daemon=True).start()
        return _JOBS


def _serve(jobs: queue.Queue) -> None:
    while True:
        jobs.get()()


@dataclass
class _Answer:
    """One answer's decoding state, shared by the one-token loop and the speculative one."""
    prompt_tokens: int
    params: GenParams
    cancel: threading.Event
    emit: Callable[[int], None]
    seen: object                        # bool [vocab] on the device: the tokens the repetition penalty counts
    eos: object                         # the end-of-sequence ids on the device
    allowed: AllowedTokens | None       # constrained output's mask
    lookup: PromptLookup | None         # --speculative: the guesses
    control: DraftControl | None
    fed: list[int] = field(default_factory=list)  # the answer's tokens whose keys and values are in the cache


class FastDecoder:
    # coordinate descent tuning (gpt-fast's setting) turns each batch-1 matmul into a tuned Triton reduction fused
    # with its neighbours (the norm before it, the activation): 174 against 158 tokens/s for the Llama-2-7B shape
    # on an H100 (docs/benchmarks.md), for about 40 s more compilation
    COMPILE_OPTIONS = {"coordinate_descent_tuning": True}
    # the captured steps' attention: cuDNN (torch's first choice on Hopper), whose per-shape plan each window's
    # graph builds once at warm-up, where the rest of the process leaves it out (hf.attention_without_shape_plans)
    CUDNN_DECODE_ATTENTION = True
    # a prompt of at most this many tokens (or the rest of one that continues the cache: a chat's next turn) goes
    # through a captured step of this width, padded, instead of an eager prefill, which at batch 1 is bound by its
    # launches. Llama-3-8B shape, bf16, an H200, one run each way (bench/results/prefix-cache-h200-step0.json and
    # -step64.json): a 24-token prompt's first token after 8.1 ms instead of 56.7, a follow-up turn over a 7,100-token
    # chat after 20.8-21.8 ms instead of 64.9-123.3. CUDA and compiled only: on a CPU a padded step costs its width
    PROMPT_STEP_TOKENS = 64
    # the steps over several tokens, which warm-up compiles and checks on their own, and what is off without each
    _WIDE_STEPS = (("verify", "speculative decoding is off"), ("prompt", "prompts are prefilled eagerly"))

    def __init__(self, model, eos_ids: set[int], cache_tokens: int, compile: bool, prefix_cache: bool = True,
                 speculative_tokens: int = 0, draft: FastDecoder | None = None, prompt_step_tokens: int | None = None):
        import torch
        self.torch, self.model, self.eos_ids = torch, model, sorted(eos_ids)
        self.cache_tokens = cache_tokens
        # --prefix_cache: the tokens whose keys and values the static cache holds from the last answer (its prompt
        # and the tokens fed back); a prompt that starts with them prefills only the rest. One conversation is kept:
        # the cache's memory is allocated once, for one sequence.
        self.prefix_cache = prefix_cache
        self.cached: list[int] = []
        # --speculative: the last answer's prompt lookup (its prompt and answer indexed), which the next turn of the
        # conversation continues instead of indexing the history again
        self.lookup: PromptLookup | None = None
        self.device = model.get_input_embeddings().weight.device
        self.vocab = model.get_output_embeddings().weight.shape[0]
        text = full_attention_config(model.config)  # (the text model's config, every layer full-length)
        # one position more than the largest window: a slice of the whole cache would be contiguous, which the
        # compiler specialises on (a second compilation)
        self.cache = windowed_static_cache(text, cache_tokens + 1)
        # attention reads the cache only up to the smallest window that holds the sequence so far, not all of it
        self.windows = {n: torch.empty(n, dtype=torch.int8, device=self.device) for n in window_lengths(cache_tokens)}
        for marker in self.windows.values():
            torch._dynamo.maybe_mark_dynamic(marker, 0)  # one compilation may serve every window
        self.compiled = compile
        self._step = self._compiled(self._forward_one)
        self.graphs: dict = {}  # window: the captured step (CUDA only), replayed from the static buffers below
        self._token_in = self._position_in = None
        self._logits_out: dict = {}
        # --speculative: the step over the chosen token and up to `verify_width - 1` guesses, one graph per window
        self.verify_width = speculative_tokens + 1 if speculative_tokens else 0
        # compiled on CUDA: grouped heads without copies of the keys and values, and the verify step's attention
        # through flex attention's decoding kernel, 2.7-5x faster than cuDNN's for a few queries (attention.py)
        own_attention = compile and self.device.type == "cuda" and attention.use_fast_path_attention(model)
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        self._flex_fits = own_attention and attention.FLEX_IN_VERIFY_STEPS and attention.flex_fits(head_dim, model.dtype)
        self.draft = draft  # --draft_model's own decoder, whose greedy tokens are the guesses (else prompt lookup)
        self.draft_record = DraftRecord() if draft else None
        self._verify = self._compiled(self._forward_many)
        self.verify_graphs: dict = {}
        self._verify_in: tuple = ()
        self._verify_out: dict = {}
        # short prompts through a captured step: compiled on CUDA (elsewhere when asked for, as the CPU tests do: on a
        # CPU a padded step costs its width in compute)
        if prompt_step_tokens is None:
            prompt_step_tokens = self.PROMPT_STEP_TOKENS if compile and self.device.type == "cuda" else 0
        self.prompt_width = min(prompt_step_tokens, cache_tokens)
        self._prompt = self._compiled(self._forward_prompt)
        self.prompt_graphs: dict = {}
        self._prompt_in: tuple = ()
        self._prompt_out: dict = {}

    @property
    def flex_verify(self) -> bool:
        """Whether verify steps run (and attention.py gives them flex attention): for the model panel and benches."""
        return bool(self.verify_width) and self._flex_fits

    def _compiled(self, forward):
        return self.torch.compile(forward, fullgraph=False, options=self.COMPILE_OPTIONS) if self.compiled else forward

    # --- runs in the worker thread
    def _forward(self, tokens, positions, keep=0):
        """Logits [n, vocab] of `tokens` [1, n] at `positions` [n] (keep: of the last `keep` only, or of the rows
        a tensor names), their keys and values written at those positions."""
        for layer in self.cache.layers:
            layer.positions = positions
        out = self.model(input_ids=tokens, position_ids=positions.view(1, -1), cache_position=positions,
                         past_key_values=self.cache, use_cache=True, logits_to_keep=keep)
        return out.logits[0].float()

    # two functions, so that the compiler keeps one specialised graph for each width instead of one generic graph
    def _forward_one(self, token, position):
        return self._forward(token, position)

    def _forward_many(self, tokens, positions):
        return self._forward(tokens, positions)

    def _forward_prompt(self, tokens, positions, last):
        return self._forward(tokens, positions, keep=last)

    def _window_for(self, tokens: int) -> int:
        """The smallest attention window that holds `tokens` positions."""
        return next(n for n in self.windows if n >= tokens)

    def _use_window(self, window: int) -> None:
        """Let attention read the first `window` cache positions (a captured graph has its window built in)."""
        for layer in self.cache.layers:
            layer.window = self.windows[window]

    def _prefill(self, ids, tokens: list[int], report: GenerationReport):
        """The last prompt token's logits, the prompt's keys and values in the cache (`tokens`: ids as a list): where
        the cache holds a prefix of this prompt (--prefix_cache), only the rest is evaluated. An earlier answer's keys
        past that prefix stay where they are: attention masks every position past the one being computed."""
        torch = self.torch
        report.reused_tokens = reuse = reusable_prefix(self.cached, tokens) if self.prefix_cache else 0
        self.cached = []  # (until this answer is done: one that fails leaves nothing to reuse)
        if not reuse:
            self.cache.reset()
        if len(tokens) - reuse <= self.prompt_width and reuse + self.prompt_width <= self.cache_tokens:
            return self._prompt_logits(tokens[reuse:], reuse)
        self._use_window(self._window_for(ids.shape[1]))
        positions = torch.arange(reuse, ids.shape[1], device=self.device)
        return self._forward(ids[:, reuse:], positions, keep=1)

    def _next_logits(self, token, position, tokens: int):
        """The step's logits for token at position (`tokens` long with it): a captured graph's replay if any."""
        window = self._window_for(tokens)
        graph = self.graphs.get(window)
        if graph is None:
            self._use_window(window)
            return self._step(token.view(1, 1), position)
        self._token_in.copy_(token.view(1, 1))
        self._position_in.copy_(position)
        graph.replay()
        return self._logits_out[window]  # read before the next replay, which overwrites it (same stream, in order)

    def _verify_logits(self, tokens: list[int], position: int, captured: bool = True):
        """Logits [n, vocab] of `tokens` (the token just chosen and guesses after it) at `position` on. A compiled
        step pads them to its one width (n = verify_width)."""
        width = self.verify_width if self.compiled else len(tokens)
        inputs, positions, window = self._padded(tokens, position, width)
        return self._run(self._verify, self.verify_graphs if captured else {}, self._verify_in, self._verify_out,
                         (inputs, positions), window)

    def _prompt_logits(self, tokens: list[int], position: int, captured: bool = True):
        """Logits [1, vocab] of the last of `tokens` (a prompt, or the rest of one), their keys and values written
        from `position` on, through the prompt step (padded to its width)."""
        inputs, positions, window = self._padded(tokens, position, self.prompt_width)
        return self._run(self._prompt, self.prompt_graphs if captured else {}, self._prompt_in, self._prompt_out,
                         (inputs, positions, self.torch.tensor([len(tokens) - 1])), window)

    def _padded(self, tokens: list[int], position: int, width: int):
        """A step's inputs for `tokens` at `position` on, padded to `width` with the last token, and its window. The
        padding's keys and values land past the sequence, where attention masks them until later tokens overwrite
        them."""
        torch = self.torch
        inputs = torch.tensor([tokens + tokens[-1:] * (width - len(tokens))])
        return inputs, torch.arange(position, position + width), self._window_for(position + width)

    def _run(self, step, graphs: dict, buffers: tuple, outputs: dict, values: tuple, window: int):
        """A step's output for `values` (host tensors) in `window`: its captured graph replayed from `buffers`, or
        the (compiled) step itself where no graph is captured."""
        graph = graphs.get(window)
        if graph is None:
            self._use_window(window)
            return step(*(value.to(self.device) for value in values))
        for buffer, value in zip(buffers, values, strict=True):
            buffer.copy_(value, non_blocking=True)
        graph.replay()
        return outputs[window]

    def _capture(self) -> None:
        """Record the (already compiled) steps into CUDA graphs, one per window and width. Any host sync inside a
        step fails here, at load, not per token: in the one-token step it takes the fast path down; a wide step runs
        uncaptured (compiled, launched op by op) in the windows where it failed, and replayed in the others. The
        capture overwrites the cache: nothing in it is reused after."""
        torch = self.torch
        self.cached = []
        with torch.inference_mode():
            self._token_in = torch.zeros((1, 1), dtype=torch.long, device=self.device)
            self._position_in = torch.zeros(1, dtype=torch.long, device=self.device)
            steps = [(None, self._step, (self._token_in, self._position_in), self.graphs, self._logits_out)]
            if self.verify_width:
                self._verify_in = (torch.zeros((1, self.verify_width), dtype=torch.long, device=self.device),
                                   torch.arange(self.verify_width, device=self.device))
                steps.append(("verify", self._verify, self._verify_in, self.verify_graphs, self._verify_out))
            if self.prompt_width:
                self._prompt_in = (torch.zeros((1, self.prompt_width), dtype=torch.long, device=self.device),
                                   torch.arange(self.prompt_width, device=self.device),
                                   torch.zeros(1, dtype=torch.long, device=self.device))
                steps.append(("prompt", self._prompt, self._prompt_in, self.prompt_graphs, self._prompt_out))
            for window in self.windows:
                self._use_window(window)
                for wide, step, inputs, graphs, outputs in steps:
                    if inputs[0].shape[1] > window:  # (a step wider than the window never runs in it)
                        continue
                    try:
                        graphs[window], outputs[window] = self._captured(step, inputs)
                    except Exception as e:
                        if not wide:
                            raise
                        # (the split attention's prompt step failed so in one test model's windows of 2,048 and
                        # more on an H200, where turning the step off everywhere cost every prompt its replay)
                        print(f"warning: the {wide} step {_failed(f'capture in the {window}-position window', e)}: "
                              "it runs uncaptured in that window", file=sys.stderr)

    def _captured(self, step, inputs: tuple):
        """`step` over `inputs` recorded in a CUDA graph, and its output (overwritten by each replay)."""
        torch = self.torch
        side = torch.cuda.Stream()  # torch asks for a few runs on a side stream before capturing
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                step(*inputs)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):  # other threads use the GPU
            output = step(*inputs)
        graph.replay()  # CUDA uploads a graph on its first launch: here, not on a user's first turn in its window
        return graph, output

    def _decode(self, ids, params: GenParams, cancel: threading.Event, emit: Callable[[int | None], None],
                guide: TokenGuide | None = None) -> None:
        """Prefill, then one token a step; with --speculative (not for constrained output), whenever prompt lookup
        has guesses for what follows, checking them several to a step while that pays."""
        torch = self.torch
        with torch.inference_mode():
            seen = torch.zeros(self.vocab, dtype=torch.bool, device=self.device)
            seen[ids[0]] = True
            speculating = bool(self.verify_width) and not guide
            tokens = ids[0].tolist()
            lookup, self.lookup = self.lookup, None  # (until this answer is done)
            a = _Answer(ids.shape[1], params, cancel, emit, seen,
                        torch.tensor(self.eos_ids, device=self.device, dtype=torch.long),
                        AllowedTokens(guide, self.vocab, self.device, self.eos_ids) if guide else None,
                        (DraftModel(self.draft, tokens) if self.draft else PromptLookup.over(tokens, lookup))
                        if speculating else None,
                        answer_control(self.verify_width - 1, self.draft_record) if speculating else None)
            params.report.speculation = a.control.stats if speculating else None
            logits = self._prefill(ids, tokens, params.report)
            token = choose_token(a.allowed.mask(logits) if a.allowed else logits, seen, a.eos, params, 0)
            i = 0  # the answer's token i is chosen (token, on the device), not yet streamed or fed
            while token is not None:
                token, i = self._one_token_a_step(a, token, i)
                if token is not None:  # (prompt lookup has guesses)
                    token, i = self._speculate(a, int(token), i)
            self.cached = tokens + a.fed
            self.lookup = a.lookup if isinstance(a.lookup, PromptLookup) else None

    def _one_token_a_step(self, a: _Answer, token, start: int):
        """From the answer's token `start` on, one token a step. One step ahead: step i+1 is queued on the GPU before
        token i is read on the host, so the GPU does not wait for the host's per-token work (the id's copy,
        streaming, the next launch). A stop wastes one step. Returns (the next token, its index) where prompt lookup
        has guesses to check (speculating), or (None, _) at the end.

        With a guide (constrained output), the host reads token i while step i+1 runs, computes which tokens may
        follow it, and the mask reaches the GPU before token i+1 is chosen: the GPU waits only where the mask takes
        longer than a step."""
        torch, params = self.torch, a.params
        cuda = self.device.type == "cuda"
        position = torch.tensor([a.prompt_tokens + start], device=self.device)  # advanced on the device
        host = torch.empty(1, dtype=torch.long, pin_memory=cuda)
        copied = torch.cuda.Event() if cuda else None
        clock = time.perf_counter()
        for i in range(start, params.max_new_tokens):
            host.copy_(token, non_blocking=cuda)
            if copied:
                copied.record()
            length = a.prompt_tokens + i + 1  # the sequence's length with the next step's token
            more = i + 1 < params.max_new_tokens and length < self.cache_tokens
            if more:
                a.seen.index_fill_(0, token, True)
                logits = self._next_logits(token, position, length)
                position += 1
                if a.allowed:
                    if copied:
                        copied.synchronize()
                    logits = a.allowed.after(int(host[0]), logits)
                token = choose_token(logits, a.seen, a.eos, params, i + 1)
            if copied:
                copied.synchronize()  # the one wait per token: streaming needs the id on the host
            token_id = int(host[0])
            if more:
                a.fed.append(token_id)
            a.emit(token_id)
            if token_id in self.eos_ids or a.cancel.is_set() or not more:
                return None, i
            if a.lookup:
                a.lookup.extend([token_id])
                now = time.perf_counter()
                a.control.step_done(0, 0, now - clock)  # (one token per host read, the steps overlapping)
                clock = now
                if a.control.guessing and a.lookup.has_guess():
                    return token, i + 1  # (the step in flight already chose it)
        return None, params.max_new_tokens

    def _speculate(self, a: _Answer, token_id: int, i: int):
        """Steps over the chosen token and the guesses prompt lookup makes after it; each position's token is chosen
        from its own logits by the same sampler, and guesses count up to the first one that differs from it. Waits
        for the host each step (acceptance decides where the next step starts). Returns (the next token on the
        device, its index) once the lookup has no guesses or guessing stops paying (DraftControl), or (None, _) at
        the end."""
        torch, params, control = self.torch, a.params, a.control
        while True:
            a.emit(token_id)
            position = a.prompt_tokens + i
            if token_id in self.eos_ids or a.cancel.is_set() or i + 1 >= params.max_new_tokens or \
                    position + 1 >= self.cache_tokens:
                return None, i
            a.lookup.extend([token_id])
            # a compiled step checks verify_width tokens whatever the guesses, and prompt lookup's cost nothing; an
            # eager step (the CPU) pays by the token, and a draft model by the guess
            most = self.verify_width - 1 if self.compiled and not self.draft else control.length
            room = min(most, params.max_new_tokens - i - 2, self.cache_tokens - position - 1,
                       self.cache_tokens + 1 - position - self.verify_width)  # (the padded step fits the cache)
            started = time.perf_counter()  # (a draft model's guesses cost time too)
            guesses = a.lookup.draft(room) if room > 0 and control.guessing else []
            inputs = torch.tensor([token_id, *guesses], device=self.device)
            if not guesses:  # this token's step, then one token a step again
                a.seen.index_fill_(0, inputs, True)
                logits = self._next_logits(inputs, torch.tensor([position], device=self.device), position + 1)
                a.fed.append(token_id)
                return choose_token(logits, a.seen, a.eos, params, i + 1), i + 1
            rows = seen_after_each(a.seen, inputs) if params.repetition_penalty != 1.0 else a.seen
            logits = self._verify_logits([token_id, *guesses], position)[: len(inputs)]
            chosen = choose_token(logits, rows, a.eos, params, i + 1).tolist()
            pairs = enumerate(zip(guesses, chosen, strict=False))
            kept = next((n for n, (guess, pick) in pairs if guess != pick), len(guesses))
            control.step_done(len(guesses), kept, time.perf_counter() - started)
            a.fed += [token_id, *guesses[:kept]]
            a.seen.index_fill_(0, inputs[: kept + 1], True)
            for guess in guesses[:kept]:
                a.emit(guess)
                if guess in self.eos_ids or a.cancel.is_set():
                    return None, i
            a.lookup.extend(guesses[:kept])
            token_id, i = chosen[kept], i + kept + 1

    # --- called from any thread
    def fits(self, prompt_tokens: int, params: GenParams) -> bool:
        return params.num_beams == 1 and prompt_tokens + params.max_new_tokens <= self.cache_tokens

    def tokens(self, ids, params: GenParams, cancel: threading.Event, guide: TokenGuide | None = None) -> Iterator[int]:
        """Token ids as the worker makes them; leaving the loop early stops the worker at the next token."""
        out: queue.Queue = queue.Queue()
        stop = threading.Event()
        failure: list[BaseException] = []
        either = Either(cancel, stop)

        def job():
            try:
                self._decode(ids, params, either, out.put, guide)
            except BaseException as e:  # re-raised in the consuming thread
                failure.append(e)
            finally:
                out.put(None)

        _decode_thread().put(job)
        try:
            while (token := out.get()) is not None and not cancel.is_set():  # (the worker may be ahead)
                yield token
        finally:
            stop.set()
            while token is not None:  # wait for the worker to finish with the cache
                token = out.get()
        if failure:
            raise failure.pop()

    def warm_up(self) -> None:
        """Compile the steps now, so the first user does not wait for them, and on CUDA capture them; the captured
        graphs must then give the tokens the uncaptured steps gave, or they are not used. A draft model's record
        starts after it: the warm-up's answers time compilation, not the draft."""
        try:
            self._warm_up()
        finally:
            self.draft_record = DraftRecord() if self.draft else None

    def _warm_up(self) -> None:
        params = GenParams(max_new_tokens=8, repetition_penalty=1.0)
        # a prompt longer than the prompt step (where the cache has room): prefilled eagerly, which allocates the
        # cache before a compiled step would trace its allocation (and compile again once it is allocated)
        length = max(4, min(self.prompt_width + 4, self.cache_tokens - params.max_new_tokens))
        ids = (self.torch.arange(length, device=self.device) % self.vocab).view(1, -1)
        with self._decode_attention():  # the steps compile here, with the attention they are then captured with
            plain = list(self.tokens(ids, params, threading.Event()))
            self._compile_wide_steps()
            if not (self.compiled and self.device.type == "cuda"):
                return
            # compared once compiled and tuned, and with the prompt's attention alike on both sides: with random
            # weights, near ties flipped a later token where the first run or the prefill's kernels differed
            plain = list(self.tokens(ids, params, threading.Event()))
            _in_worker(self._capture)
            replayed = list(self.tokens(ids, params, threading.Event()))
        if replayed != plain:
            self.graphs.clear()
            raise RuntimeError(f"the captured CUDA graph gave other tokens ({replayed}) than the step ({plain})")
        self._check_wide_graphs()
        if self.prefix_cache:  # a prompt that continues the cache: its attention kernels load now, not on a user's
            # first follow-up turn (which took 111 ms for a 7,133-token chat on an H200, then 65-80)
            list(self.tokens(self.torch.tensor([[*self.cached, 4, 5]], device=self.device), params, threading.Event()))

    def _choices(self, logits_of, captured: bool = False) -> list[int]:
        """The greedy tokens of a verify or prompt step (`logits_of`) over a fixed input after the warm-up's prompt
        (compiling it first). It overwrites cached positions: nothing in the cache is reused after it."""
        self.cached = []
        with self.torch.inference_mode():
            return logits_of([0, 1, 2], 4, captured=captured).argmax(dim=-1).tolist()

    def _compile_wide_steps(self) -> None:
        """Compile the verify and prompt steps, each on its own: one the compiler fails on is turned off, and
        the rest of the fast path stays (a 64-wide prompt step through flex attention failed to compile on an H200
        and, compiled with the rest, took the whole fast path down)."""
        for step, off in self._WIDE_STEPS:
            if getattr(self, f"{step}_width"):
                logits_of = getattr(self, f"_{step}_logits")
                try:
                    _in_worker(lambda f=logits_of: self._choices(f))
                except Exception as e:
                    self._turn_off(step, _failed("compile", e), off)

    def _check_wide_graphs(self) -> None:
        """The captured verify and prompt steps must choose what the uncaptured ones do over the same cache, or
        that step is not used."""
        for step, off in self._WIDE_STEPS:
            if not getattr(self, f"{step}_graphs"):
                continue
            logits_of = getattr(self, f"_{step}_logits")
            plain, replayed = _in_worker(lambda f=logits_of: (self._choices(f), self._choices(f, captured=True)))
            if plain != replayed:
                self._turn_off(step, f"chose {replayed} where the step chose {plain} when captured", off)

    def _turn_off(self, step: str, why: str, off: str) -> None:
        getattr(self, f"{step}_graphs").clear()
        setattr(self, f"{step}_width", 0)  # (verify_width, prompt_width)
        print(f"warning: the {step} step {why}: {off} for this model", file=sys.stderr)

    @contextlib.contextmanager
    def _decode_attention(self):
        """cuDNN attention allowed while the step compiles and is captured, then the process's setting again.
        (The setting is process-wide: a generate running beside the warm-up may also use cuDNN meanwhile.)"""
        backends = self.torch.backends.cuda
        before = backends.cudnn_sdp_enabled()
        backends.enable_cudnn_sdp(before or (self.CUDNN_DECODE_ATTENTION and self.device.type == "cuda"))
        try:
            yield
        finally:
            backends.enable_cudnn_sdp(before)


class DraftModel:
    """--draft_model on the fast path: guesses from the draft model's own decoder, its greedy tokens after the text so
    far (PromptLookup's interface). Its static cache keeps the text it has seen: the tokens it has not (mostly the
    base model's own token after the guesses it kept) go through its one-token step, a long stretch through its
    prefill; the guesses are chained on the device, with one wait for all of them."""
    LONGEST_CATCH_UP = 16  # new tokens fed one step each; more are prefilled

    def __init__(self, decoder: FastDecoder, tokens: list[int]):
        self.decoder, self.tokens = decoder, list(tokens)

    def extend(self, tokens: list[int]) -> None:
        self.tokens += tokens

    def has_guess(self) -> bool:
        return True

    def draft(self, k: int) -> list[int]:
        d, torch, n = self.decoder, self.decoder.torch, len(self.tokens)
        if not k or n + k >= d.cache_tokens:
            return []
        shared = min(shared_prefix(d.cached, self.tokens), n - 1)  # (the last token is fed again: its logits)
        if not shared or n - shared > self.LONGEST_CATCH_UP:
            logits = d._prefill(torch.tensor([self.tokens], device=d.device), self.tokens, GenerationReport())
        else:
            for at in range(shared, n):
                logits = d._next_logits(torch.tensor([self.tokens[at]], device=d.device),
                                        torch.tensor([at], device=d.device), at + 1)
        guesses = [logits.argmax(dim=-1)]
        position = torch.tensor([n], device=d.device)
        for i in range(k - 1):
            logits = d._next_logits(guesses[-1], position, n + i + 1)
            position += 1
            guesses.append(logits.argmax(dim=-1))
        chosen = torch.cat(guesses).tolist()  # (the one wait)
        d.cached = self.tokens + chosen[:-1]
        return chosen


class AllowedTokens:
    """A guide's mask on the device: computed on the host into pinned memory, copied without a wait, unpacked from
    bits to a bool per token on the device (the fast path's, and generate's logits processor)."""

    def __init__(self, guide: TokenGuide, vocab: int, device, eos_ids: list[int]):
        import torch
        self.guide, self.vocab, self.eos_ids = guide, vocab, set(eos_ids)
        self.host = torch.empty(len(guide.bits), dtype=torch.int32, pin_memory=device.type == "cuda")
        self.device_bits = torch.empty_like(self.host, device=device)
        self.shifts = torch.arange(32, dtype=torch.int32, device=device)

    def mask(self, logits):
        self.guide.mask(self.host.numpy())
        self.device_bits.copy_(self.host, non_blocking=True)
        allowed = ((self.device_bits.unsqueeze(-1) >> self.shifts) & 1).view(-1)[: self.vocab].bool()
        return logits.masked_fill(~allowed, float("-inf"))

    def after(self, token: int, logits):
        """The logits of the step after `token`, masked to what the grammar allows there. After an end-of-sequence
        token the answer is over and that step is thrown away: its logits pass as they are."""
        if token in self.eos_ids:
            return logits
        self.guide.advance(token)
        return self.mask(logits)


def _failed(what: str, e: Exception) -> str:
    return f"failed to {what} ({type(e).__name__}: {str(e).strip()[:160]})"


def _in_worker(function: Callable[[], object]):
    """Run function in the decode thread and wait for it; its result is returned, its exception raised here."""
    done: queue.Queue = queue.Queue()

    def job():
        try:
            done.put((function(), None))
        except BaseException as e:
            done.put((None, e))

    _decode_thread().put(job)
    result, error = done.get()
    if error is not None:
        raise error
    return result
