"""The Hugging Face model: transformers + accelerate; bitsandbytes for --load_8bit / --load_4bit; gptqmodel's kernels
for GPTQ and AWQ checkpoints. Loads what the plan (plan.py) decided, streams with the fast decode path once it is warm
(fast_decode.py) and with transformers' generate until then or where it cannot run."""
from __future__ import annotations

import contextlib
import functools
import gc
import importlib.util
import queue
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ...constraints import TokenGuide
from ...errors import UserError, missing_package
from .. import checkpoint
from ..base import Either, GenParams, LoadPlan, ModelInfo, human_bytes, reusable_prefix
from ..tokens import Detokenizer, PromptEncoder, eos_ids
from .plan import HFOptions


def attention_without_shape_plans(torch) -> None:
    """On CUDA, leave cuDNN out of PyTorch's attention (SDPA) backends. torch 2.11 sends masked attention on Hopper
    and newer to cuDNN first, which builds an execution plan for every new sequence length: a prompt of a new
    length, and every step of generate (its cache grows by one), pays for a plan. Flash and memory-efficient
    attention, next in torch's order, have no plans. Process-wide, as torch keeps this setting."""
    if torch.cuda.is_available():
        torch.backends.cuda.enable_cudnn_sdp(False)


def _warm_up_in_background(device) -> bool:
    """On CUDA the fast path's compilation takes minutes (about 2 for a 7B model on an H100): generate answers the
    requests that come before it is ready. On the CPU nothing is compiled and the warm-up takes seconds."""
    return device.type == "cuda"


def from_pretrained_arguments(p: LoadPlan[HFOptions], torch) -> tuple[str, dict[str, Any]]:
    """(folder or hub id to load, from_pretrained's keyword arguments) for the plan; a missing optional package
    (bitsandbytes, gptqmodel, flash-attn) is one clear error here, before anything loads."""
    o = p.options
    kwargs: dict[str, Any] = {"dtype": getattr(torch, o.dtype), "device_map": o.device_map,
                              "offload_folder": o.offload_folder, "use_safetensors": o.use_safetensors,
                              "revision": o.revision, "trust_remote_code": o.trust_remote_code}
    if o.max_memory:
        kwargs["max_memory"] = o.max_memory
    path = p.model
    if o.quantization:
        path, extra = _quantized_kwargs(p)
        kwargs.update(extra)
    if o.bnb:
        if importlib.util.find_spec("bitsandbytes") is None:
            raise missing_package("bitsandbytes", "bnb", "--load_8bit/--load_4bit")
        kwargs["quantization_config"] = _bnb_config(o, kwargs["dtype"])
    if o.flash_attention_2:
        if importlib.util.find_spec("flash_attn") is None:
            raise missing_package("flash-attn", "flash", "--use_flash_attention_2")
        kwargs["attn_implementation"] = "flash_attention_2"
    return path, kwargs


def load_weights(p: LoadPlan[HFOptions]):
    """(model, tokenizer) as the plan says, with the LoRA adapter applied; load failures as one line each."""
    import torch
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    o = p.options
    path, kwargs = from_pretrained_arguments(p, torch)
    common = {"revision": o.revision, "trust_remote_code": o.trust_remote_code}
    transformers.logging.set_verbosity_error()
    try:
        with _one_line(p.model, torch):
            config = AutoConfig.from_pretrained(path, **common)
            if o.rope_parameters:
                config.rope_parameters = o.rope_parameters
            tokenizer = AutoTokenizer.from_pretrained(o.tokenizer, **common)
            model = AutoModelForCausalLM.from_pretrained(path, config=config, **kwargs).eval()
        if o.lora_weights:
            with _one_line(f"the LoRA adapter {o.lora_weights}", torch):
                model = _with_adapter(model, o.lora_weights, common)
    except torch.cuda.OutOfMemoryError:
        raise UserError(f"{p.model} does not fit in GPU memory: try --load_4bit=True, --load_8bit=True or "
                        "--use_gpu_id=False to spread it over all GPUs") from None
    return model, tokenizer


@contextlib.contextmanager
def _one_line(what: str, torch):
    """Failures to load `what` (missing, damaged or mismatched files) as one line naming it; running out of GPU
    memory is left to the caller, which says what to try."""
    from safetensors import SafetensorError
    try:
        yield
    except torch.cuda.OutOfMemoryError:
        raise
    except (OSError, ValueError, RuntimeError, SafetensorError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else e.__class__.__name__
        raise UserError(f"cannot load {what}: {first}") from None
    except (TypeError, KeyError, AttributeError) as e:  # a file of the right syntax holding the wrong kinds of values
        raise UserError(f"cannot load {what}: one of its files holds values of the wrong kind "
                        f"({e.__class__.__name__}: {str(e).strip()[:200]}); it is damaged") from None


def _quantized_kwargs(p: LoadPlan[HFOptions]) -> tuple[str, dict]:
    """(folder to load, from_pretrained arguments) for a GPTQ or AWQ checkpoint: gptqmodel must be installed, the
    named weight file is presented as model.safetensors, and the kernel in the plan's gptq_dict is passed on."""
    o = p.options
    saved = o.quantization
    method = saved["quant_method"]
    if importlib.util.find_spec("gptqmodel") is None:
        raise missing_package("gptqmodel", "gptq", f"a {method.upper()} checkpoint")
    if method == "gptq" and importlib.util.find_spec("optimum") is None:
        raise missing_package("optimum", "gptq", "a GPTQ checkpoint")
    folder = Path(p.model)
    if not folder.is_dir() and o.weight_basename not in ("", "model"):
        from huggingface_hub import snapshot_download  # a hub repository with an AutoGPTQ-style file name
        folder = Path(snapshot_download(p.model, revision=o.revision))
        saved = checkpoint.quantization(folder, checkpoint.read_config(folder)) or saved
    path = p.model
    if folder.is_dir():
        path = str(checkpoint.weight_view(folder, o.weight_basename or "model", saved))
    loading = {k: v for k, v in o.gptq_dict.items() if k in ("backend", "max_input_length")}  # (the plan's kernel)
    if not loading:
        return path, {}
    from transformers import AwqConfig, GPTQConfig
    if method == "gptq":
        return path, {"quantization_config": GPTQConfig(bits=saved.get("bits", 4), **loading)}
    loading.pop("max_input_length", None)
    return path, {"quantization_config": AwqConfig(bits=saved.get("bits", 4), **loading)}


def quantized_kernels(model) -> str:
    """The gptqmodel kernel classes that run the model's quantized layers, e.g. 'MarlinLinear'."""
    from .fused_projections import is_gptqmodel_layer
    names = sorted({type(m).__name__ for m in model.modules() if is_gptqmodel_layer(m)})
    return ", ".join(names) or "none found"


def _bnb_config(o: HFOptions, compute_dtype):
    from transformers import BitsAndBytesConfig
    mode = o.bnb
    if mode.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    if not mode.compute_in_model_dtype:  # h2oGPT's low_bit_mode 0: bitsandbytes' own defaults throughout
        return BitsAndBytesConfig(load_in_4bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=compute_dtype,
                              bnb_4bit_quant_type=mode.quant_type, bnb_4bit_use_double_quant=mode.double_quant)


def _with_adapter(model, adapter: str, common: dict):
    """The adapter's small matrices beside the base weights, which are shared, not copied."""
    try:
        from peft import PeftModel
    except ImportError:
        raise missing_package("peft", "lora", "--lora_weights") from None
    return PeftModel.from_pretrained(model, adapter, is_trainable=False, revision=common["revision"]).eval()


def weights_by_device(model) -> str:
    """Each device's share of the weights as loaded, e.g. 'cuda:0 6.31 GiB, cuda:1 6.28 GiB' (a model that
    accelerate spread over devices)."""
    import itertools
    totals: dict[str, int] = {}
    for t in itertools.chain(model.parameters(), model.buffers()):
        totals[str(t.device)] = totals.get(str(t.device), 0) + t.numel() * t.element_size()
    return ", ".join(f"{device} {human_bytes(n)}" for device, n in sorted(totals.items()))


class _TokenQueue:
    """A transformers streamer that hands each generated token id to the consuming thread."""

    def __init__(self):
        self.tokens: queue.Queue[int | None] = queue.Queue()
        self.prompt_seen = False

    def put(self, value) -> None:
        if not self.prompt_seen:  # generate() first puts the prompt
            self.prompt_seen = True
            return
        for token in value.reshape(-1).tolist():
            self.tokens.put(token)

    def end(self) -> None:
        self.tokens.put(None)


class HFModel:
    def __init__(self, p: LoadPlan[HFOptions]):
        import torch
        import transformers
        o = p.options
        self.torch = torch
        attention_without_shape_plans(torch)
        self.model, self.tokenizer = load_weights(p)
        self.prompts = PromptEncoder(self.tokenizer)
        self.draft = self._load_draft(o.draft) if o.draft else None  # --draft_model's weights
        tok = self.tokenizer
        self.eos_ids = eos_ids(self.model.generation_config.eos_token_id, tok.eos_token_id)
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else next(iter(self.eos_ids), 0)
        device_map = getattr(self.model, "hf_device_map", None)
        devices = p.devices if not device_map or len(set(device_map.values())) <= 1 else \
            f"{weights_by_device(self.model)} of weights"
        template = tok.chat_template if isinstance(tok.chat_template, str) else None
        quant = p.quantization
        if o.quantization:
            from .fused_projections import fuse_projections
            kernels = quantized_kernels(self.model)
            quant += f", kernel {kernels}"
            if fuse_projections(self.model):
                quant += ", q/k/v and gate/up fused"
            print(f"{o.quantization['quant_method'].upper()} layers run on gptqmodel's {kernels}")
        from .compiled_4bit import as_operators
        as_operators(self.model)  # (after fusing: the fused layers are wrapped too)
        self.info = ModelInfo(f"hf (transformers {transformers.__version__})", p.model, devices, p.dtype,
                              quant, p.context_length or 2048, self.model.get_memory_footprint(), template,
                              tok.bos_token or "", tok.eos_token or "")
        self.device = self.model.get_input_embeddings().weight.device
        self.prefix_cache = o.prefix_cache
        self._kept = None  # generate's keys and values of the last answer, with their tokens (--prefix_cache)
        self.speculative_tokens = o.speculative_tokens
        self._start_fast_decode(o.fast_decode)

    def _load_draft(self, draft: LoadPlan[HFOptions]):
        """--draft_model, loaded and checked: its guesses are token ids, so its vocabulary must be the base model's."""
        model, tokenizer = load_weights(draft)
        ours, theirs = self.tokenizer.get_vocab(), tokenizer.get_vocab()
        if ours != theirs:
            differ = next((t for t in sorted(ours.keys() | theirs.keys()) if ours.get(t) != theirs.get(t)), None)
            raise UserError(f"--draft_model={draft.model} has another vocabulary than the base model ({len(theirs)} "
                            f"against {len(ours)} tokens; {differ!r} differs): a draft model must share the base "
                            "model's tokenizer, e.g. a smaller model of the same family")
        return model

    def _start_fast_decode(self, wanted: bool) -> None:
        """The fast path: off, built now (the CPU: seconds), or compiled in the background (CUDA: minutes), with
        generate answering until it is ready."""
        self.fast = None  # the fast decode path once it is warm; until then (or where it fails) generate answers
        self.fast_ready = threading.Event()  # set when the fast path is warm or has failed
        self._closed = False
        if not wanted:
            self.fast_ready.set()
        elif _warm_up_in_background(self.device):
            self.info.decode = "generate until the compiled decode path is ready (compiling)"
            threading.Thread(target=self._warm_up_fast_decoder, kwargs={"announce": True}, name="fast-decode-warm-up",
                             daemon=True).start()
        else:
            self._warm_up_fast_decoder()

    def _warm_up_fast_decoder(self, announce: bool = False) -> None:
        """Build the fast path; with announce (a background warm-up), say on stderr when it is ready."""
        started = time.perf_counter()
        try:
            fast = self._fast_decoder()
            self.fast = None if self._closed else fast  # closed while compiling: its memory goes with this thread
        finally:
            self.fast_ready.set()
        if self.fast and announce:
            print(f"fast decoding ready ({self.info.decode}) after {time.perf_counter() - started:.0f} s",
                  file=sys.stderr)

    def _fast_decoder(self):
        """The static-cache decode loop, compiled and warmed up; None (with a warning) where it cannot run."""
        import traceback

        from .fast_decode import DEFAULT_CACHE_TOKENS, FastDecoder
        try:
            cache_tokens, compile = min(self.info.context_length, DEFAULT_CACHE_TOKENS), self.device.type == "cuda"
            draft = None
            if self.draft:
                draft = FastDecoder(self.draft, self.eos_ids, cache_tokens, compile=compile)
                draft.warm_up()
            fast = FastDecoder(self.model, self.eos_ids, cache_tokens, compile=compile, prefix_cache=self.prefix_cache,
                               speculative_tokens=self.speculative_tokens, draft=draft)
            fast.warm_up()
        except Exception as e:  # a model whose code the static cache or the compiler cannot take
            where = traceback.extract_tb(e.__traceback__)[-1]
            first = str(e).strip().splitlines()[0][:160] if str(e).strip() else ""
            why = f"{type(e).__name__} {first} at {Path(where.filename).name}:{where.lineno}"
            print(f"warning: fast decoding is not available for this model ({why}); decoding with generate",
                  file=sys.stderr)
            self.info.decode = f"generate (fast decoding failed: {why})"
            return None
        self.info.decode = ("static cache + CUDA graphs" if fast.graphs else "static cache") + \
            (", flex attention in verify steps" if fast.flex_verify else "")
        return fast

    def count_tokens(self, text: str) -> int:
        return len(self.prompts.ids(text))

    def _encode(self, prompt: str):
        return self.prompts.tensor(prompt).to(self.device)

    @functools.cached_property
    def lltokenizer(self):
        """The vocabulary as llguidance sees it, for constrained output (about a second to build, so once)."""
        from llguidance.hf import from_tokenizer
        return from_tokenizer(self.tokenizer, n_vocab=self.vocab_size, eos_token=sorted(self.eos_ids))

    @property
    def vocab_size(self) -> int:
        return self.model.get_output_embeddings().weight.shape[0]

    def _generation_kwargs(self, params: GenParams, cancel: threading.Event, guide: TokenGuide | None) -> dict:
        from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

        class Cancelled(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                return cancel.is_set()

        sampling = {"temperature": params.temperature, "top_p": params.top_p, "top_k": params.top_k} \
            if params.do_sample else {}
        config = GenerationConfig(max_new_tokens=params.max_new_tokens, min_new_tokens=params.min_new_tokens,
                                  do_sample=params.do_sample, num_beams=params.num_beams,
                                  repetition_penalty=params.repetition_penalty, eos_token_id=sorted(self.eos_ids),
                                  pad_token_id=self.pad_id, **sampling)
        kwargs = {"generation_config": config, "stopping_criteria": StoppingCriteriaList([Cancelled()])}
        if guide:
            from .fast_decode import AllowedTokens
            vocab, eos = self.vocab_size, sorted(self.eos_ids)

            class AllowedOnly(LogitsProcessor):
                """Only the tokens the constraint allows; first advances past the token chosen last."""
                seen = allowed = None

                def __call__(self, input_ids, scores):
                    if self.seen is None:
                        self.allowed = AllowedTokens(guide, vocab, scores.device, eos)
                    for token in input_ids[0, self.seen or input_ids.shape[1]:].tolist():
                        guide.advance(token)
                    self.seen = input_ids.shape[1]
                    return self.allowed.mask(scores)

            kwargs["logits_processor"] = LogitsProcessorList([AllowedOnly()])
        return kwargs

    def stream(self, prompt: str, params: GenParams, cancel: threading.Event) -> Iterator[str]:
        torch = self.torch
        ids = self._encode(prompt)
        if params.seed is not None:
            torch.manual_seed(params.seed)
        guide = TokenGuide(params.constraint, self.lltokenizer, self.vocab_size) if params.constraint else None
        fast = self.fast if self.fast and self.fast.fits(ids.shape[1], params) else None
        tokens = fast.tokens(ids, params, cancel, guide) if fast else self._generate(ids, params, cancel, guide)
        detok = Detokenizer(self.tokenizer)
        try:
            for token in tokens:
                if token not in self.eos_ids:
                    yield detok.add(token)
        except torch.cuda.OutOfMemoryError as error:
            # the traceback holds the failed step's tensors: drop it before giving the memory back
            error.__traceback__ = None
            del error
            gc.collect()
            torch.cuda.empty_cache()
            raise UserError("the GPU ran out of memory during this generation: ask for fewer new tokens "
                            "or a shorter conversation") from None
        finally:
            tokens.close()

    def _generate(self, ids, params: GenParams, cancel: threading.Event,
                  guide: TokenGuide | None = None) -> Iterator[int]:
        """Token ids from transformers' generate, run in a worker thread (beam search, several GPUs, the CPU)."""
        torch = self.torch
        stop = threading.Event()
        kwargs = self._generation_kwargs(params, Either(cancel, stop), guide)
        streamer = _TokenQueue()
        failure: list[BaseException] = []
        cache = self._continue_from_kept(ids, params)

        def run():
            try:
                with torch.inference_mode():
                    out = self.model.generate(ids, attention_mask=torch.ones_like(ids), past_key_values=cache,
                                              streamer=streamer if params.num_beams == 1 else None, **kwargs)
                if cache is not None:  # its keys and values: the prompt and the answer but its last token
                    self._kept = (out[0, :cache.get_seq_length()].tolist(), cache)
                if params.num_beams > 1:  # beam search cannot stream: hand over the finished sequence
                    streamer.put(ids)
                    streamer.put(out[0, ids.shape[1]:])
            except BaseException as e:  # re-raised in the consuming thread
                failure.append(e)
            finally:
                streamer.end()

        worker = threading.Thread(target=run, name="hf-generate", daemon=True)
        worker.start()
        try:
            while (token := streamer.tokens.get()) is not None:
                yield token
        finally:
            stop.set()
            worker.join()
        if failure:
            raise failure.pop()

    def _continue_from_kept(self, ids, params: GenParams):
        """generate's cache for this prompt (--prefix_cache): the last answer's, cut back to the prefix this prompt
        shares with it (generate then prefills only the rest), else a new one; None for beam search."""
        from transformers import DynamicCache
        kept, self._kept = self._kept, None
        if not self.prefix_cache or params.num_beams > 1:
            return None
        if kept:
            kept_tokens, cache = kept
            reused = reusable_prefix(kept_tokens, ids[0].tolist())
            # a sliding-window layer has dropped what lies before its window: only full-attention caches go back
            if reused and all(type(layer).__name__ == "DynamicLayer" for layer in cache.layers):
                cache.crop(reused - cache.get_seq_length())  # (a negative count: tokens removed from the end)
                params.report.reused_tokens = reused
                return cache
        return DynamicCache(config=self.model.config)

    def wait_for_fast_decode(self, timeout: float | None = None) -> bool:
        """Wait until the fast decode path is warm or has failed; whether it is in use."""
        self.fast_ready.wait(timeout)
        return self.fast is not None

    def close(self) -> None:
        """Returns at once, also during the background warm-up (Ctrl-C must not wait for a compilation): the
        warm-up's thread then holds the model until it ends and drops what it built."""
        self._closed = True
        self.fast = None  # (it holds the model, its cache and its graph)
        if self.fast_ready.is_set():
            del self.model
            self.draft = None
            if self.torch.cuda.is_available():
                self.torch.cuda.empty_cache()

