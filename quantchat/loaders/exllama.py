"""ExLlama backend: GPTQ and EXL2 folders through exllamav2, EXL3 folders through exllamav3 (CUDA only).

Prompts are encoded and answers decoded with the model's Hugging Face tokenizer, as in the hf backend, so chat
templates and special tokens behave the same on every backend. One generation runs at a time per model: the
generator's queue, cache pages and sampler state are not shared between threads, so concurrent chats wait for
each other instead of risking mixed answers.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from .. import memory
from ..errors import UsageError, UserError, missing_package
from ..machine import Machine
from ..settings import Settings, gpu_split
from . import checkpoint
from .base import GenParams, LoadPlan, ModelInfo
from .checkpoint import Checkpoint
from .tokens import Detokenizer, PromptEncoder, eos_ids

NAME = "exllama"
USES_TORCH = False  # the plan reads files only; the libraries bring torch at load
OWN_FLAGS = ("exllama_dict",)
FORMATS = ("gptq", "exl2", "exl3")


@dataclass(frozen=True)
class Options:
    method: str                                  # gptq, exl2 or exl3
    library: Literal["exllamav2", "exllamav3"]
    alpha: float                                 # NTK RoPE scaling (1.0: none)
    compress: float                              # linear RoPE scaling (1.0: none)
    max_seq_len: int | None
    split: list[float] | None                    # GB of weights per GPU (set_auto_map)
    gpu_id: int
    revision: str | None
    tokenizer: str
    trust_remote_code: bool


def claims(s: Settings, ckpt: Checkpoint | None) -> str | None:
    """EXL2 and EXL3 folders, and anything --load_exllama names (check() refuses what ExLlama cannot load)."""
    if ckpt is None or ckpt.kind == "gguf":
        return None
    if s.load_exllama:
        if ckpt.kind == "hub":
            return "--load_exllama with a Hugging Face hub id (downloaded at load)"
        return f"--load_exllama with a {ckpt.quant_method} folder"
    if ckpt.quant_method in ("exl2", "exl3"):
        return f"quantization_config says {ckpt.quant_method}: ExLlama"
    return None


def check(s: Settings, ckpt: Checkpoint) -> None:
    if ckpt.is_dir and ckpt.quant_method not in FORMATS:
        raise UserError(f"--load_exllama loads GPTQ, EXL2 and EXL3 folders, and {ckpt.holds()}: drop --load_exllama")
    if s.draft_model:
        raise UsageError("--draft_model is not wired to ExLlama's own draft support here: drop it, or load the model "
                         "as GGUF (llama.cpp) or a Hugging Face folder")


def rope_settings(s: Settings, method: str) -> tuple[float, float]:
    """(NTK alpha, linear compression) from exllama_dict and --rope_scaling; 1.0 means unchanged."""
    alpha = float(s.exllama_dict.get("alpha_value", 1.0))
    compress = float(s.exllama_dict.get("compress_pos_emb", 1.0))
    rope = s.rope_scaling or {}
    kind = rope.get("type", rope.get("rope_type"))
    if "alpha_value" in rope:
        alpha = float(rope["alpha_value"])
    elif kind == "linear":
        compress = float(rope["factor"])
    elif rope:
        raise UsageError(f"--rope_scaling type {kind!r} is not available through ExLlama: use "
                         "\"{'alpha_value': A}\" (NTK) or \"{'type': 'linear', 'factor': F}\"")
    if method == "exl3" and (alpha, compress) != (1.0, 1.0):
        raise UsageError("exllamav3 takes RoPE scaling from the model's config.json only: drop alpha_value / "
                         "compress_pos_emb / --rope_scaling, or edit rope_scaling in config.json")
    return alpha, compress


def plan(s: Settings, ckpt: Checkpoint, machine: Machine, why: str) -> LoadPlan[Options]:
    model, config, q = ckpt.path, ckpt.config, ckpt.quantization
    method = q["quant_method"] if q else "gptq"  # a hub id given with --load_exllama: h2oGPT's GPTQ repositories
    alpha, compress = rope_settings(s, method)
    trained = config.get("max_position_embeddings")
    context = s.exllama_dict.get("max_seq_len") or s.max_seq_len or \
        (int(trained * compress * (alpha if alpha > 1 else 1)) if trained else None)
    split = gpu_split(s.exllama_dict)
    library = "exllamav3" if method == "exl3" else "exllamav2"
    devices = f"{len(split)} GPUs, {', '.join(f'{gb:g} GB' for gb in split)} of weights each" if split \
        else f"cuda:{s.gpu_id}" + (" (exllama fills it, then the next GPUs)" if not s.use_gpu_id else "")
    weights = None
    if q and q.get("bits"):
        shapes = memory.shapes_from_config(config)
        weights = shapes and memory.weight_bytes(shapes, "float16", memory.packed_bytes_per_weight(q))
    kv = memory.kv_cache_bytes(config, context, 2) if context and config else None
    options = Options(method=method, library=library, alpha=alpha, compress=compress, max_seq_len=context, split=split,
                      gpu_id=s.gpu_id, revision=s.revision, tokenizer=s.tokenizer_base_model or model,
                      trust_remote_code=s.trust_remote_code)
    quant = checkpoint.describe(q) if q else "gptq (from the hub repository)"
    return LoadPlan(NAME, why, model, devices, "float16", f"{quant} via {library}", context, weights, kv, options)


def load(p: LoadPlan[Options]) -> ExLlamaModel:
    return ExLlamaModel(p)


class ExLlamaModel:
    def __init__(self, p: LoadPlan[Options]):
        o = p.options
        library = o.library
        if importlib.util.find_spec(library) is None:
            raise missing_package(library, "exllama", f"--load_exllama with a {o.method} folder")
        import torch
        if not torch.cuda.is_available():
            raise UserError(f"{library} runs on CUDA GPUs only, and none is visible: use --load_gptq on the CPU, "
                            "or a GGUF file")
        from transformers import AutoTokenizer
        folder = p.model
        if not Path(folder).is_dir():
            from huggingface_hub import snapshot_download
            folder = snapshot_download(p.model, revision=o.revision)
        self.tokenizer = AutoTokenizer.from_pretrained(o.tokenizer, trust_remote_code=o.trust_remote_code)
        self.prompts = PromptEncoder(self.tokenizer)
        self.torch = torch
        self.library = library
        self.lock = threading.Lock()
        try:
            self._generator, version = (self._load_v3 if library == "exllamav3" else self._load_v2)(folder, o)
        except torch.cuda.OutOfMemoryError:
            raise UserError(f"{p.model} does not fit in GPU memory: lower max_seq_len in --exllama_dict, or split "
                            "it over GPUs with set_auto_map") from None
        tok = self.tokenizer
        self.eos_ids = eos_ids(tok.eos_token_id, *self._config_eos(folder))
        template = tok.chat_template if isinstance(tok.chat_template, str) else None
        self.info = ModelInfo(f"exllama ({library} {version})", p.model, p.devices, "float16", p.quantization,
                              o.max_seq_len or 2048, p.weight_bytes, template, tok.bos_token or "",
                              tok.eos_token or "")

    @staticmethod
    def _config_eos(folder: str) -> list[int]:
        import json
        ids = []
        for name in ("config.json", "generation_config.json"):
            try:
                value = json.loads((Path(folder) / name).read_text()).get("eos_token_id")
            except (OSError, ValueError):
                continue
            ids += value if isinstance(value, list) else [value]
        return ids

    def _load_v2(self, folder: str, o: Options):
        import exllamav2
        from exllamav2 import ExLlamaV2, ExLlamaV2Cache, ExLlamaV2Config
        from exllamav2.generator import ExLlamaV2DynamicGenerator
        config = ExLlamaV2Config(folder)
        if config.arch.arch_string != config.architecture:  # it loads an architecture it does not know as a Llama
            raise UserError(f"exllamav2 {exllamav2.__version__} does not support {config.architecture}: load this "
                            "folder with --load_gptq (transformers) instead of --load_exllama")
        from exllamav2.attn import has_flash_attn, has_flash_attn_with_paged
        if not has_flash_attn:  # exllamav2 0.3.2's SDPA path drops the causal mask of a prompt: its matmul path
            config.no_sdpa = True  # keeps it (the answers were wrong without this)
        config.scale_alpha_value, config.scale_pos_emb = o.alpha, o.compress
        if o.max_seq_len:
            config.max_seq_len = o.max_seq_len
        model = ExLlamaV2(config)
        if o.split:
            model.load(gpu_split=o.split, progress=False)
            cache = ExLlamaV2Cache(model, max_seq_len=config.max_seq_len)
        else:  # the cache is allocated as the layers are placed, so that both fit
            cache = ExLlamaV2Cache(model, max_seq_len=config.max_seq_len, lazy=True)
            with self.torch.cuda.device(o.gpu_id):
                model.load_autosplit(cache, progress=False)
        from exllamav2 import ExLlamaV2Tokenizer
        # paged attention (batching of jobs) needs flash-attn; without it one job at a time, which the lock gives
        generator = ExLlamaV2DynamicGenerator(model=model, cache=cache, tokenizer=ExLlamaV2Tokenizer(config),
                                              paged=has_flash_attn_with_paged)
        return generator, exllamav2.__version__

    def _load_v3(self, folder: str, o: Options):
        from exllamav3 import Cache, Config, Generator, Model, Tokenizer
        config = Config.from_directory(folder)
        model = Model.from_config(config)
        context = o.max_seq_len or 8192
        cache_tokens = max(256, -(-context // 256) * 256)  # whole pages of 256 tokens
        cache = Cache(model, max_num_tokens=cache_tokens)
        with self.torch.cuda.device(o.gpu_id):
            # loading runs a prefill of max_chunk_size tokens through the cache, which must hold it
            model.load(use_per_device=o.split, progressbar=False, max_chunk_size=min(2048, cache_tokens))
        generator = Generator(model=model, cache=cache, tokenizer=Tokenizer.from_config(config))
        return generator, importlib.metadata.version("exllamav3")

    def _job(self, ids, params: GenParams):
        """A generation job of the loaded library, with generate's sampling settings."""
        stop = sorted(self.eos_ids)
        common = {"input_ids": ids, "max_new_tokens": params.max_new_tokens, "min_new_tokens": params.min_new_tokens,
                  "stop_conditions": stop, "seed": params.seed}
        if self.library == "exllamav3":
            from exllamav3 import ComboSampler, Job
            sampling = {"temperature": params.temperature, "top_k": params.top_k, "top_p": params.top_p} \
                if params.do_sample else {"temperature": 0.0}
            return Job(sampler=ComboSampler(rep_p=params.repetition_penalty, **sampling), **common)
        from exllamav2.generator import ExLlamaV2DynamicJob, ExLlamaV2Sampler
        settings = ExLlamaV2Sampler.Settings(temperature=params.temperature, top_k=params.top_k, top_p=params.top_p,
                                             token_repetition_penalty=params.repetition_penalty) \
            if params.do_sample else ExLlamaV2Sampler.Settings.greedy(
                token_repetition_penalty=params.repetition_penalty)
        return ExLlamaV2DynamicJob(gen_settings=settings, **common)

    def count_tokens(self, text: str) -> int:
        return len(self.prompts.ids(text))

    def stream(self, prompt: str, params: GenParams, cancel: threading.Event) -> Iterator[str]:
        if params.num_beams > 1:
            raise UserError("beam search (num_beams > 1) runs on the Hugging Face backend only; use num_beams=1")
        ids = self.prompts.tensor(prompt)
        detok = Detokenizer(self.tokenizer)
        deadline = time.monotonic() + params.max_time
        with self.lock:
            job = self._job(ids, params)
            self._generator.enqueue(job)
            try:
                finished = False
                while not finished and not cancel.is_set() and time.monotonic() < deadline:
                    for result in self._generator.iterate():
                        if result.get("stage") != "streaming":
                            continue
                        params.report.reused_tokens = self._reused(job)  # (known once the prefill has run)
                        tokens = result.get("token_ids")
                        for token in ([] if tokens is None else tokens.reshape(-1).tolist()):
                            if token not in self.eos_ids:
                                yield detok.add(token)
                        finished = result["eos"]
            finally:
                if self._generator.num_remaining_jobs():
                    self._generator.cancel(job)

    def _reused(self, job) -> int:
        """Prompt tokens the library's generator continued from its cache instead of evaluating them: whole pages
        matched, and tokens matched within a page (both libraries' jobs count them so, and report their sum at the
        end of the job as "cached_tokens")."""
        if self.library == "exllamav3":
            from exllamav3.constants import PAGE_SIZE
            page = PAGE_SIZE
        else:
            page = self._generator.page_size
        return job.cached_pages * page + job.cached_tokens

    def close(self) -> None:
        del self._generator
        self.torch.cuda.empty_cache()
