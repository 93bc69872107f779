"""llama.cpp backend (llama-cpp-python) for GGUF files."""
from __future__ import annotations

import codecs
import contextlib
import difflib
import functools
import inspect
import os
import re
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import memory
from ..constraints import TokenGuide
from ..errors import UsageError, UserError, missing_package
from ..machine import Machine
from ..settings import Settings
from ..speculative import DraftRecord, PromptLookup, answer_control
from .base import GenParams, LoadPlan, ModelInfo, segments
from .checkpoint import Checkpoint

NAME = "llamacpp"
USES_TORCH = False  # llama.cpp brings its own CUDA; loading torch's CUDA libraries first made it crash
OWN_FLAGS = ()

# llama.cpp allocates the whole KV cache up front: without --max_seq_len or n_ctx, use at most this much
DEFAULT_MAX_CONTEXT = 8192
# h2oGPT's llamacpp_dict defaults, where llama-cpp-python still has the key
H2OGPT_DEFAULTS = {"n_batch": 1024, "use_mlock": True}
OBSOLETE_KEYS = {"n_gqa": "GGUF files carry the grouped-query layout themselves"}
# llama.cpp's model option that llama_cpp.Llama does not take, read from --llamacpp_dict here (_extra_buffers)
EXTRA_BUFFERS_KEY = "use_extra_bufts"


def read_gguf_metadata(path: str) -> dict:
    """The GGUF key/value metadata (architecture, context, chat template ...), read without the weights.

    llama.cpp's vocab-only load takes a fraction of a second; numbers come back as text and are converted.
    """
    llama_cpp = _llama_cpp()
    try:
        with _quiet_stderr():
            vocab = llama_cpp.Llama(path, vocab_only=True, verbose=False)
            meta = dict(vocab.metadata)
            vocab.close()
    except (ValueError, RuntimeError, OSError) as e:
        raise UserError(f"{path} is not a readable GGUF file ({e})") from None
    for key, value in meta.items():
        try:
            meta[key] = int(value) if value.lstrip("-").isdigit() else value
        except AttributeError:
            pass
    return meta


@contextlib.contextmanager
def _quiet_stderr():
    """llama.cpp's C code writes to file descriptor 2 even when asked not to: hide it for metadata reads."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def _llama_cpp():
    try:
        import llama_cpp
    except ImportError:
        raise missing_package("llama-cpp-python", "llamacpp", "GGUF models (llama.cpp backend)") from None
    return llama_cpp


def _rope_options(s: Settings) -> dict:
    if not s.rope_scaling:
        return {}
    kind = s.rope_scaling.get("type", s.rope_scaling.get("rope_type"))
    factor = float(s.rope_scaling.get("factor", 1.0))
    if kind == "linear":
        return {"rope_freq_scale": 1.0 / factor}
    if kind == "yarn":
        return {"rope_scaling_type": 2, "rope_freq_scale": 1.0 / factor}  # LLAMA_ROPE_SCALING_TYPE_YARN
    raise UserError(f"llama.cpp cannot do rope_scaling type {kind!r}: use 'linear' or 'yarn', "
                    "or set rope_freq_base in --llamacpp_dict")


def _extra_buffers(user: dict, notes: list[str]) -> bool:
    """Whether llama.cpp may move weights into its extra CPU buffer types at load (repacked for its AMX and
    AVX-512/AVX2 kernels): llamacpp_dict's use_extra_bufts, else llama.cpp's default (on), except in a build with
    Intel AMX (a native build on a Sapphire Rapids CPU or newer). There the AMX matmul crashed the process on the
    first answer of the built-in model on a 2-core Xeon (a segmentation fault in ggml_backend_amx_mul_mat; llama.cpp
    issue 20824, closed without a fix), so the weights stay in plain buffers: the built-in model then decoded at 22-25
    tokens/s there, as on machines without AMX (docs/backends.md)."""
    asked = user.pop(EXTRA_BUFFERS_KEY, None)
    if asked is not None and not isinstance(asked, bool):
        raise UsageError(f"--llamacpp_dict: {EXTRA_BUFFERS_KEY} is True or False, not {asked!r}")
    if asked is not None:
        return asked
    if amx_in_build():
        notes.append(f"llama.cpp's AMX kernels are off (they can crash: llama.cpp issue 20824); "
                     f"--llamacpp_dict=\"{{'{EXTRA_BUFFERS_KEY}': True}}\" turns them on")
        return False
    return True


def amx_in_build() -> bool:
    """The installed llama.cpp was built with Intel AMX kernels (and so runs on a CPU that has AMX)."""
    return b"AMX_INT8 = 1" in _llama_cpp().llama_print_system_info()


_LOADING = threading.Lock()  # (_model_params: one load at a time changes llama.cpp's defaults)


@contextlib.contextmanager
def _model_params(llama_cpp, extra_buffers: bool):
    """llama_cpp.Llama builds its model parameters from llama.cpp's defaults and takes no use_extra_bufts: while it
    loads, the defaults it reads carry ours."""
    if extra_buffers:
        yield
        return
    module = llama_cpp.llama_cpp
    default = module.llama_model_default_params

    def ours():
        params = default()
        params.use_extra_bufts = False
        return params
    with _LOADING:
        module.llama_model_default_params = ours
        try:
            yield
        finally:
            module.llama_model_default_params = default


def _check_keys(options: dict) -> None:
    """Unknown llamacpp_dict keys are typos: say which, with the closest real one."""
    known = set(inspect.signature(_llama_cpp().Llama.__init__).parameters) - {"self", "kwargs"}
    for key in options:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise UsageError(f"--llamacpp_dict: llama_cpp.Llama has no option {key!r}{hint}")


LLAMACPP_RESERVE = memory.CUDA_CONTEXT + 512 * 2**20  # compute buffers: about this much at 2k-8k contexts


# Host memory for the saved states of conversations other than the live one (an LRU): two users taking turns then
# do not evict each other's history on every message
STATE_CACHE_BYTES = 2 * 2**30
MIN_SAVED_TOKENS = 256  # a context shorter than this is cheaper to evaluate again than to keep
# A shorter shared prefix (a template's opening, a short system prompt) is evaluated again: it saves little, and a
# prompt split differently can change a near-tied greedy token (docs/benchmarks.md, "Prefix reuse")
MIN_REUSED_TOKENS = 256


@dataclass(frozen=True)
class Options:
    llama_kwargs: dict[str, Any]  # llama_cpp.Llama's keyword arguments, checked against its signature at plan time
    prefix_cache: bool = True     # --prefix_cache
    speculative_tokens: int = 8   # the most tokens one step guesses (--num_speculative_tokens); 0: --speculative=False
    draft_kwargs: dict[str, Any] | None = None  # --draft_model: llama_cpp.Llama's arguments for the draft model
    extra_buffers: bool = True    # llama.cpp's use_extra_bufts, for both models (_extra_buffers)


def claims(s: Settings, ckpt: Checkpoint | None) -> str | None:
    return ckpt.found if ckpt and ckpt.kind == "gguf" else None


def check(s: Settings, ckpt: Checkpoint) -> None:
    """Flags that do not apply to a GGUF file."""
    quant_flag = next((f for f in ("load_gptq", "load_awq", "load_exllama") if getattr(s, f)), None)
    if quant_flag:
        raise UsageError(f"--{quant_flag} loads a model folder, and {ckpt.path} is a GGUF file (quantized already): "
                         f"drop --{quant_flag}")
    if s.load_8bit or s.load_4bit:
        raise UsageError("--load_8bit/--load_4bit do not apply to a GGUF file: its quantization is fixed by the "
                         "file; pick a GGUF of another type (Q8_0, Q4_K_M ...) instead")
    if s.lora_weights and not s.lora_weights.endswith(".gguf"):
        raise UsageError("--lora_weights with a GGUF model takes a LoRA adapter converted to GGUF "
                         "(llama.cpp's convert_lora_to_gguf.py); a PEFT folder needs a Hugging Face base model")
    if s.num_beams and s.num_beams > 1:
        raise UsageError("--num_beams: llama.cpp does not do beam search; drop the flag (greedy or sampling)")
    draft = Path(s.draft_model).expanduser() if s.draft_model else None
    if draft and not (draft.is_file() and draft.suffix == ".gguf"):
        raise UserError(f"--draft_model={s.draft_model} is not a GGUF file here: give the path of a small GGUF model "
                        "that shares the base model's vocabulary (e.g. a 0.5B of the same family)")


def plan(s: Settings, ckpt: Checkpoint, machine: Machine, why: str) -> LoadPlan[Options]:
    path = ckpt.path
    if ckpt.pending_download:
        return _plan_before_download(s, ckpt, why)
    meta = read_gguf_metadata(path)
    file_bytes = os.path.getsize(path)
    arch = meta.get("general.architecture", "llama")
    trained = meta.get(f"{arch}.context_length")
    notes: list[str] = []
    user = dict(s.llamacpp_dict)
    for key, reason in OBSOLETE_KEYS.items():
        if user.pop(key, None) is not None:
            notes.append(f"llamacpp_dict key {key!r} ignored: {reason}")
    extra_buffers = _extra_buffers(user, notes)
    for key in ("n_batch", "n_ubatch"):  # (0 failed as "Failed to create llama_context", text as a TypeError)
        value = user.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise UsageError(f"--llamacpp_dict: {key} must be a whole number of at least 1, not {value!r}")
    context = user.get("n_ctx") or s.max_seq_len or min(trained or 2048, DEFAULT_MAX_CONTEXT)
    if isinstance(context, bool) or not isinstance(context, int) or not 16 <= context <= 2**27:
        raise UsageError(f"--llamacpp_dict: n_ctx must be a whole number between 16 and {2**27}, not {context!r}")
    gpu = bool(_llama_cpp().llama_supports_gpu_offload())
    layers = meta.get(f"{arch}.block_count")
    kv = kv_cache_bytes(meta, context)
    asked = next((v for v in (s.n_gpu_layers, s.pre_layer, user.get("n_gpu_layers")) if v is not None), None)
    n_gpu_layers = asked if asked is not None else (-1 if gpu else 0)
    if asked is None and gpu and layers:
        fit = layers_that_fit(file_bytes, kv or 0, layers, machine.free_gpu_bytes(s.gpu_id))
        if fit is not None and fit < layers:
            n_gpu_layers = fit
            notes.append(f"the model and its {context}-token KV cache need more than the GPU's free memory: {fit} of "
                         f"{layers} layers on the GPU, the rest on the CPU (slower; a smaller GGUF type or a "
                         "shorter --max_seq_len keeps it all on the GPU)")
    if asked and not gpu:
        notes.append(f"{asked} GPU layers asked for, but this llama-cpp-python build has no GPU support: "
                     "everything runs on the CPU (reinstall with CMAKE_ARGS=\"-DGGML_CUDA=on\", see docs/backends.md)")
    on_gpu = 0 if not gpu else (layers if n_gpu_layers < 0 or (layers and n_gpu_layers >= layers) else n_gpu_layers)
    draft_kwargs = None
    if s.draft_model and s.speculative:
        draft_path = str(Path(s.draft_model).expanduser())
        draft_kwargs = {**H2OGPT_DEFAULTS, "model_path": draft_path, "n_ctx": context, "n_gpu_layers": -1 if on_gpu
                        else 0, "main_gpu": s.gpu_id, "verbose": s.verbose, "n_batch": min(H2OGPT_DEFAULTS["n_batch"],
                                                                                             context)}
        draft_bytes = os.path.getsize(draft_path) + (kv_cache_bytes(read_gguf_metadata(draft_path), context) or 0)
        notes.append(f"draft model {Path(draft_path).name}: {draft_bytes / 2**30:.2f} GiB more with its KV cache, on "
                     f"{'the GPU' if on_gpu else 'the CPU'}")
    need = (kv or 0) + file_bytes + (draft_bytes if draft_kwargs else 0)
    if not on_gpu and machine.ram_bytes and need > machine.ram_bytes:  # llama.cpp allocates it all up front
        raise UserError(f"{path} with a {context}-token KV cache needs {need / 2**30:.1f} GiB, more than this "
                        f"machine's {machine.ram_bytes / 2**30:.1f} GiB of memory: lower --max_seq_len")
    if on_gpu:
        devices = f"GPU {s.gpu_id}: {on_gpu} of {layers} layers" + ("" if on_gpu == layers else ", the rest on the CPU")
    else:
        devices = "cpu"
    if trained and context > trained and not s.rope_scaling:
        notes.append(f"context {context} is longer than the {trained} tokens the model was trained on")
    kwargs = {**H2OGPT_DEFAULTS, "model_path": path, "n_ctx": context, "n_gpu_layers": n_gpu_layers,
              "main_gpu": s.gpu_id, "verbose": s.verbose, **_rope_options(s), **user}
    if s.lora_weights:
        kwargs["lora_path"] = s.lora_weights
    kwargs["n_ctx"], kwargs["n_gpu_layers"] = context, n_gpu_layers
    kwargs["n_batch"] = min(kwargs["n_batch"], context)
    if s.seed is not None:
        kwargs.setdefault("seed", s.seed)
    _check_keys(kwargs)
    file_type = meta.get("general.file_type")
    quant = _file_type_name(file_type)
    return LoadPlan(NAME, why, path, devices, "as stored in the file", quant, context,
                    file_bytes, kv, Options(kwargs, s.prefix_cache, s.num_speculative_tokens if s.speculative else 0,
                                            draft_kwargs, extra_buffers), notes, (on_gpu, layers))


def _plan_before_download(s: Settings, ckpt: Checkpoint, why: str) -> LoadPlan[Options]:
    """--dry_run of a GGUF that is not here yet: what the flags and the file's name say; the rest (context, layers,
    exact size) is read from the file once it is downloaded."""
    named = re.search(r"(?<![A-Za-z0-9])(I?Q\d\w*|BF16|F16|F32)(?=[^A-Za-z0-9]|$)", Path(ckpt.path).name, re.I)
    quant = named.group(1) if named else ""
    context = s.llamacpp_dict.get("n_ctx") or s.max_seq_len
    notes = [ckpt.pending_download]
    if not context:
        notes.append("context length: read from the file once it is downloaded (at most "
                     f"{DEFAULT_MAX_CONTEXT} tokens unless --max_seq_len says)")
    return LoadPlan(NAME, why, ckpt.path, "read from the file once it is downloaded", "as stored in the file",
                    f"GGUF {quant.upper()}" if quant else "GGUF", context, None, None, Options({}), notes)


def kv_cache_bytes(meta: dict, context: int) -> int | None:
    """The f16 KV cache of `context` tokens for the model a GGUF's metadata describes; None where it does not say."""
    arch = meta.get("general.architecture", "llama")
    layers, heads_kv = meta.get(f"{arch}.block_count"), meta.get(f"{arch}.attention.head_count_kv")
    key_len = meta.get(f"{arch}.attention.key_length") or (
        meta.get(f"{arch}.embedding_length", 0) // max(meta.get(f"{arch}.attention.head_count", 1), 1))
    value_len = meta.get(f"{arch}.attention.value_length") or key_len
    return int(layers * heads_kv * (key_len + value_len) * context * 2) if layers and heads_kv and key_len else None


def layers_that_fit(file_bytes: int, kv_bytes: int, layers: int, free: int | None) -> int | None:
    """How many of the repeating layers (each with its share of the weights and KV cache) fit in `free` bytes,
    after llama.cpp's compute buffers and the CUDA context; None when the free memory is not known."""
    if free is None:
        return None
    per_layer = (file_bytes + kv_bytes) / (layers + 1)  # the embeddings and output layer count about one layer
    room = free - LLAMACPP_RESERVE - per_layer            # the output layer goes to the GPU with the last layers
    return max(0, min(layers, int(room // per_layer)))


def _file_type_name(file_type) -> str:
    names = {getattr(llama_cpp, n): n.replace("LLAMA_FTYPE_", "").replace("MOSTLY_", "")
             for llama_cpp in [_llama_cpp()] for n in dir(llama_cpp) if n.startswith("LLAMA_FTYPE_")}
    return f"GGUF {names.get(file_type, f'file type {file_type}')}"


def load(p: LoadPlan[Options]) -> LlamaCppModel:
    return LlamaCppModel(p)


class LlamaCppModel:
    def __init__(self, p: LoadPlan[Options]):
        llama_cpp = _llama_cpp()
        try:
            with contextlib.nullcontext() if p.options.llama_kwargs["verbose"] else _quiet_stderr(), \
                    _model_params(llama_cpp, p.options.extra_buffers):
                self.llm = llama_cpp.Llama(**p.options.llama_kwargs)
        except (ValueError, RuntimeError, OSError) as e:
            raise UserError(f"llama.cpp cannot load {p.model}: {e} (is the file complete? run with --verbose=True "
                            "to see llama.cpp's log)") from None
        self.draft = self._load_draft(llama_cpp, p) if p.options.draft_kwargs else None
        self.draft_record = DraftRecord() if self.draft else None
        meta = self.llm.metadata
        self.vocab = self.llm._model.vocab
        self.is_eog = llama_cpp.llama_vocab_is_eog
        self.bos = self._token_text(self.llm.token_bos())
        print("llama.cpp: {} of {} layers on the GPU".format(*p.gpu_layers), file=sys.stderr)
        self.info = ModelInfo(f"llama.cpp (llama-cpp-python {llama_cpp.__version__})", p.model, p.devices, p.dtype,
                              p.quantization, self.llm.n_ctx(), p.weight_bytes, meta.get("tokenizer.chat_template"),
                              self.bos, self._token_text(self.llm.token_eos()))
        self._lock = threading.Lock()
        self.prefix_cache = p.options.prefix_cache
        self.states = llama_cpp.LlamaRAMCache(STATE_CACHE_BYTES) if self.prefix_cache else None
        self.saved_bytes = 0  # what the saved states hold (/metrics reads it from another thread)
        # --speculative: the last answer's prompt lookup, which the conversation's next turn continues
        self.lookup: PromptLookup | None = None
        self.speculative_tokens = p.options.speculative_tokens

    def _load_draft(self, llama_cpp, p: LoadPlan[Options]):
        """--draft_model, loaded and checked: its guesses are token ids, so its vocabulary must be the base model's
        token for token."""
        kwargs = p.options.draft_kwargs
        try:
            with contextlib.nullcontext() if kwargs["verbose"] else _quiet_stderr(), \
                    _model_params(llama_cpp, p.options.extra_buffers):
                draft = llama_cpp.Llama(**kwargs)
        except (ValueError, RuntimeError, OSError) as e:
            raise UserError(f"llama.cpp cannot load the draft model {kwargs['model_path']}: {e}") from None
        ours, theirs = self.llm._model, draft._model
        differ = next((i for i in range(max(ours.n_vocab(), theirs.n_vocab())) if i >= ours.n_vocab() or
                       i >= theirs.n_vocab() or ours.token_get_text(i) != theirs.token_get_text(i)), None)
        if differ is not None:
            draft.close()
            raise UserError(f"--draft_model={kwargs['model_path']} has another vocabulary than {p.model} (token "
                            f"{differ} differs; {theirs.n_vocab()} against {ours.n_vocab()} tokens): a draft model "
                            "must share the base model's tokenizer, e.g. a smaller model of the same family")
        return draft

    def _token_text(self, token: int) -> str:
        if token < 0:
            return ""
        return self.llm.detokenize([token], special=True).decode("utf-8", errors="ignore")

    def count_tokens(self, text: str) -> int:
        return len(self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=True))

    def tokenize(self, prompt: str) -> list[int]:
        """The prompt's tokens: the conversation's own text as plain text, so that control tokens typed into a
        message stay text (base.Prompt); BOS first unless the template wrote it."""
        add_bos = not (self.bos and prompt.startswith(self.bos))
        tokens: list[int] = []
        for i, (text, markup) in enumerate(segments(prompt)):
            tokens += self.llm.tokenize(text.encode("utf-8"), add_bos=add_bos and i == 0, special=markup)
        return tokens

    def stream(self, prompt: str, params: GenParams, cancel: threading.Event) -> Iterator[str]:
        tokens = self.tokenize(prompt)
        if len(tokens) >= self.llm.n_ctx():
            raise UserError(f"the prompt is {len(tokens)} tokens; the context holds {self.llm.n_ctx()}")
        budget = min(params.max_new_tokens, self.llm.n_ctx() - len(tokens))
        if params.seed is not None:
            self.llm.set_seed(params.seed)
        temp = params.temperature if params.do_sample else 0.0  # 0: greedy
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        guided = self._guided(params, len(tokens)) if params.constraint else None
        with self._lock:  # one llama.cpp context: one generation at a time
            reused = params.report.reused_tokens = self._continue_from_longest_prefix(tokens)
            if self.speculative_tokens and not guided:
                ids = self._speculating(tokens, reused, params, temp)
            else:
                ids = self.llm.generate(tokens, temp=temp, top_p=params.top_p, top_k=params.top_k, min_p=0.0,
                                        repeat_penalty=params.repetition_penalty, reset=True, logits_processor=guided)
            generated = 0
            for token in ids:
                if cancel.is_set() or self.is_eog(self.vocab, token):
                    break
                generated += 1
                yield decoder.decode(self.llm.detokenize([token], special=False))
                if generated >= budget:
                    break

    def _speculating(self, tokens: list[int], reused: int, params: GenParams, temp: float) -> Iterator[int]:
        """The answer's token ids, with guesses from prompt lookup checked several to a step (speculative.py): the
        sampler and its settings are generate()'s, and each position's token is the one it chooses there, so the
        answer is decoding's own. Works below generate(), on llama-cpp-python's batch and sampler (0.3.x)."""
        llm = self.llm
        if reused:  # (as generate() does with the prefix _continue_from_longest_prefix left)
            llm._ctx.kv_cache_seq_rm(-1, reused, -1)
            llm.n_tokens = reused
        llm.eval(tokens[reused:])
        sampler = llm._init_sampler(top_k=params.top_k, top_p=params.top_p, min_p=0.0, temp=temp,
                                    repeat_penalty=params.repetition_penalty)
        control = answer_control(self.speculative_tokens, self.draft_record)
        params.report.speculation = control.stats
        lookup, self.lookup = self.lookup, None  # (until this answer is done)
        lookup = DraftModel(self.draft, tokens) if self.draft else PromptLookup.over(tokens, lookup)
        token = sampler.sample(llm._ctx, -1)
        try:
            while True:
                yield token
                lookup.extend([token])
                started = time.perf_counter()
                room = llm.n_ctx() - llm.n_tokens - 1
                batch = [token, *(lookup.draft(min(control.length, room)) if control.guessing and room > 0 else [])]
                at = llm.n_tokens
                llm._batch.set_batch(batch=batch, n_past=at, logits_all=True)  # logits at every position: each checks
                llm._ctx.decode(llm._batch)
                llm.input_ids[at:at + len(batch)] = batch
                chosen = []
                for i in range(len(batch)):  # the token chosen after batch[i]; the guess batch[i + 1] stands if equal
                    chosen.append(sampler.sample(llm._ctx, i))
                    if i + 1 == len(batch) or chosen[-1] != batch[i + 1]:
                        break
                llm.n_tokens = at + len(chosen)  # the cache keeps the tokens whose next token was chosen
                llm._ctx.kv_cache_seq_rm(-1, llm.n_tokens, -1)
                control.step_done(len(batch) - 1, len(chosen) - 1, time.perf_counter() - started)
                *kept, token = chosen
                yield from kept
                lookup.extend(kept)
        finally:  # (the consumer closes this generator when the answer is done)
            self.lookup = lookup if isinstance(lookup, PromptLookup) else None

    @functools.cached_property
    def lltokenizer(self):
        """The vocabulary as llguidance sees it, for constrained output (about a second to build, so once)."""
        import warnings

        from llguidance.llamacpp import lltokenizer_from_vocab
        with warnings.catch_warnings():  # (it calls a deprecated alias once per token)
            warnings.simplefilter("ignore", DeprecationWarning)
            return lltokenizer_from_vocab(self.vocab)

    def _guided(self, params: GenParams, prompt_tokens: int):
        """A logits processor that lets only the tokens params.constraint allows through: llama-cpp-python calls it
        before each token with every token so far, so it first advances past the ones it has not seen."""
        from llama_cpp import LogitsProcessorList
        guide = TokenGuide(params.constraint, self.lltokenizer, self.llm.n_vocab())
        seen = prompt_tokens

        def allowed_only(input_ids, scores):
            nonlocal seen
            for token in input_ids[seen:]:
                guide.advance(int(token))
            seen = len(input_ids)
            guide.mask_scores(scores)
            return scores

        return LogitsProcessorList([allowed_only])

    def _continue_from_longest_prefix(self, tokens: list[int]) -> int:
        """Put the context in the state that shares the longest prefix with `tokens`: the live one, or one saved
        for another conversation (the live one is saved first when the new prompt leaves it behind). llama.cpp's
        generate() then evaluates only the rest. Returns how many prompt tokens are reused."""
        if not self.prefix_cache:
            self.llm.reset()
            return 0
        from llama_cpp import Llama
        live_ids = self.llm._input_ids.tolist()
        live = Llama.longest_token_prefix(live_ids, tokens)
        if live < len(live_ids) and len(live_ids) >= MIN_SAVED_TOKENS:
            self.states[live_ids] = self._saved_state()  # another conversation: keep this one for its next turn
            self.saved_bytes = self.states.cache_size
        try:
            saved = self.states[tokens]
        except KeyError:
            saved = None
        if saved is not None and Llama.longest_token_prefix(saved.input_ids.tolist(), tokens) > live:
            self.llm.load_state(saved)
        reused = min(Llama.longest_token_prefix(self.llm._input_ids.tolist(), tokens), len(tokens) - 1)
        if reused < MIN_REUSED_TOKENS:
            self.llm.reset()
            return 0
        return reused  # generate() keeps this prefix and evaluates the rest

    def prefix_cache_bytes(self) -> int:
        """Host memory held by the saved conversation states (--prefix_cache)."""
        return self.saved_bytes

    def _saved_state(self):
        """The context's state (its KV cache), as llama-cpp-python's save_state() makes it but without its copy of
        the score rows: those are up to n_batch x the vocabulary (622 MB for Qwen2.5's 151,936 tokens), uncounted by
        its cache's size limit, and not needed: generate() evaluates the last prompt token again after a state is
        loaded. With them, saving a 600-token context of the built-in model on two CPU cores took 0.92 s the first
        time and 0.21 s at best, without them 4-6 ms; the KV cache was 7.4 MB, the rows 365 MB
        (bench/results/prefix-state-save-cpu.json). A save happens wherever a conversation leaves the live context
        behind (documents Q&A, users taking turns)."""
        import ctypes

        import llama_cpp
        import numpy as np
        llm, ctx = self.llm, self.llm._ctx.ctx
        size = llama_cpp.llama_state_get_size(ctx)
        data = (ctypes.c_uint8 * size)()
        n_bytes = llama_cpp.llama_state_get_data(ctx, data, size)
        return llama_cpp.LlamaState(input_ids=llm.input_ids.copy(), n_tokens=llm.n_tokens,
                                    scores=np.zeros((1, llm.n_vocab()), dtype=np.single),  # (broadcast on load)
                                    llama_state=ctypes.string_at(data, n_bytes), llama_state_size=n_bytes,
                                    seed=llm._seed)

    def close(self) -> None:
        self.llm.close()
        if self.draft:
            self.draft.close()


class DraftModel:
    """Guesses from --draft_model: its greedy tokens after the text so far (PromptLookup's interface). Its KV cache
    keeps the longest prefix it shares with the text (the guesses the base model kept stay), so each guess
    evaluates only what is new: usually the base model's own token, then one step per guess."""

    def __init__(self, llm, tokens: list[int]):
        self.llm, self.tokens = llm, list(tokens)
        self.greedy = llm._init_sampler(temp=0.0, top_k=1, top_p=1.0, min_p=0.0)
        self._catch_up()  # the prompt, evaluated with the base model's (before the answer's clock starts)

    def extend(self, tokens: list[int]) -> None:
        self.tokens += tokens

    def _catch_up(self) -> None:
        from llama_cpp import Llama
        llm = self.llm
        # (the last token is evaluated again: its logits start the guesses)
        shared = min(Llama.longest_token_prefix(llm._input_ids.tolist(), self.tokens), len(self.tokens) - 1)
        llm._ctx.kv_cache_seq_rm(-1, shared, -1)
        llm.n_tokens = shared
        llm.eval(self.tokens[shared:])

    def draft(self, k: int) -> list[int]:
        llm, guesses = self.llm, []
        if len(self.tokens) + k >= llm.n_ctx():
            return guesses
        self._catch_up()
        for _ in range(k):
            guesses.append(self.greedy.sample(llm._ctx, -1))
            if len(guesses) < k:
                llm.eval(guesses[-1:])
        return guesses
