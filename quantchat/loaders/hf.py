"""Hugging Face backend: transformers + accelerate; bitsandbytes for --load_8bit / --load_4bit; gptqmodel's kernels
for GPTQ and AWQ checkpoints (--load_gptq, --load_awq, or a folder whose config.json says so)."""
from __future__ import annotations

import gc
import importlib.util
import json
import queue
import struct
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .. import memory
from ..errors import UsageError, UserError, missing_package
from ..settings import AUTOGPTQ_KEYS, Settings
from . import checkpoint
from .base import Either, GenParams, LoadPlan, ModelInfo, human_bytes

_SAFETENSORS_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I8": 1, "U8": 1, "F8_E4M3": 1, "F8_E5M2": 1,
                      "I32": 4, "I64": 8, "I16": 2, "BOOL": 1}


# ----------------------------------------------------------------------------------------------- planning

def _text_config(config: dict) -> dict:
    """Multimodal configs keep the language model's shape under text_config."""
    return {**config, **config.get("text_config", {})}


def _load_config(model: str, s: Settings) -> dict | None:
    folder = Path(model)
    if folder.is_dir():
        from . import read_config
        return _text_config(read_config(folder))
    try:  # a hub id: transformers fetches (or finds in its cache) config.json only
        from transformers import AutoConfig
        config = AutoConfig.from_pretrained(model, revision=s.revision, trust_remote_code=s.trust_remote_code)
        return _text_config(config.to_dict())
    except Exception:  # offline, private or a typo: the load itself will say which
        return None


def _safetensors_shapes(folder: Path) -> list[tuple[str, int]] | None:
    """(tensor name, element count) from the headers of every .safetensors file: no weights are read."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        return None
    shapes = []
    for file in files:
        with open(file, "rb") as f:
            header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
        for name, meta in header.items():
            if name != "__metadata__":
                count = 1
                for dim in meta["shape"]:
                    count *= dim
                shapes.append((name, count if len(meta["shape"]) == 2 else -count))  # negative: not a matrix
    return shapes


def _bnb_description(s: Settings) -> str:
    if s.load_8bit:
        return "int8"
    if not s.load_4bit:
        return "none"
    return {0: "4-bit FP4 (bitsandbytes defaults)", 1: "4-bit NF4, double quantization", 2: "4-bit NF4",
            3: "4-bit FP4, double quantization", 4: "4-bit NF4, double quantization"}[s.low_bit_mode]


def _placement(s: Settings) -> tuple[str, Any, str, list[str]]:
    """(devices shown to the user, accelerate device_map, dtype name, notes)."""
    import torch
    notes = []
    if torch.cuda.is_available():
        count = torch.cuda.device_count()
        half = "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
        dtype = "float32" if s.load_half is False else half
        if s.use_gpu_id or count == 1:
            if s.gpu_id >= count:
                raise UserError(f"--gpu_id={s.gpu_id}, but only {count} GPU(s) are visible "
                                "(check CUDA_VISIBLE_DEVICES)")
            return f"cuda:{s.gpu_id} ({torch.cuda.get_device_name(s.gpu_id)})", {"": s.gpu_id}, dtype, notes
        return f"{count} GPUs, balanced (cuda:0-{count - 1})", "balanced", dtype, notes
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return "mps", {"": "mps"}, "float32" if s.load_half is False else "float16", notes
    notes.append("no GPU found: running on the CPU, which is slow for models beyond a few hundred million parameters")
    return "cpu", {"": "cpu"}, "bfloat16" if s.load_half else "float32", notes


def _rope(config: dict, s: Settings) -> dict | None:
    """h2oGPT's {'type': 'dynamic', 'factor': 4} as transformers 5's rope_parameters."""
    if not s.rope_scaling:
        return None
    if "alpha_value" in s.rope_scaling:
        raise UserError("--rope_scaling with alpha_value is ExLlama's NTK scaling: the Hugging Face backend takes "
                        "{'type': 'dynamic'|'linear'|'yarn', 'factor': F}")
    rope = {k: v for k, v in s.rope_scaling.items() if k != "type"}
    rope["rope_type"] = s.rope_scaling.get("type", s.rope_scaling.get("rope_type"))
    base = config.get("rope_parameters") or {"rope_theta": config.get("rope_theta", 10000.0)}
    return {**base, **rope}


def attention_without_shape_plans(torch) -> None:
    """On CUDA, leave cuDNN out of PyTorch's attention (SDPA) backends. torch 2.11 sends masked attention on Hopper
    and newer to cuDNN first, which builds an execution plan for every new sequence length: a prompt of a new
    length, and every step of generate (its cache grows by one), pays for a plan. Flash and memory-efficient
    attention, next in torch's order, have no plans. Process-wide, as torch keeps this setting."""
    if torch.cuda.is_available():
        torch.backends.cuda.enable_cudnn_sdp(False)


def _one_gpu(device_map) -> bool:
    return isinstance(device_map, dict) and str(next(iter(device_map.values()))) not in ("cpu", "mps")


def _warm_up_in_background(device) -> bool:
    """On CUDA the fast path's compilation takes minutes (about 2 for a 7B model on an H100): generate answers the
    requests that come before it is ready. On the CPU nothing is compiled and the warm-up takes seconds."""
    return device.type == "cuda"


def _fast_decode_by_default(device_map, s: Settings) -> bool:
    """One GPU, in the precisions measured with it (docs/benchmarks.md): bf16/fp16 and 4-bit. bitsandbytes' int8
    layers were not measured under the compiler, and a failed compilation would cost every load its time."""
    return _one_gpu(device_map) and not s.load_8bit


MIN_CONTEXT = 2048  # below this a shorter context is a worse plan than offloading weights


def _fit_one_gpu(need: memory.MemoryEstimate, config: dict, dtype: str, quant: str, shapes, s: Settings,
                 notes: list[str]):
    """(estimate, context, max_memory) for a model that may not fit its GPU: first a shorter context (unless
    --max_seq_len was given), then weights offloaded to the CPU through accelerate's max_memory; unchanged when it
    fits or the free memory is unknown."""
    free = memory.free_gpu_bytes(s.gpu_id)
    if free is None or need.total <= free:
        return need, need.context_tokens, None
    gib = lambda n: f"{n / 2**30:.1f} GiB"  # noqa: E731
    fixed = memory.CUDA_CONTEXT + need.activations
    per_token = need.kv_cache / need.context_tokens
    tokens = int((free - fixed - need.weights) / per_token) // 256 * 256
    if not s.max_seq_len and tokens >= MIN_CONTEXT:
        notes.append(f"the model needs {gib(need.total)} at its full context of {need.context_tokens} tokens and GPU "
                     f"{s.gpu_id} has {gib(free)} free: context shortened to {tokens} tokens (--max_seq_len sets it)")
        return memory.estimate(config, shapes, dtype, quant, tokens), tokens, None
    on_gpu = free - fixed - need.kv_cache
    if on_gpu <= 0:
        raise UserError(f"GPU {s.gpu_id} has {gib(free)} free, less than the KV cache and buffers need "
                        f"({gib(fixed + need.kv_cache)}): lower --max_seq_len")
    notes.append(f"the model needs {gib(need.total)} and GPU {s.gpu_id} has {gib(free)} free: "
                 f"{gib(need.weights - on_gpu)} of weights stay on the CPU (much slower; --load_4bit=True or "
                 "--use_gpu_id=False over several GPUs would keep them on GPUs)")
    return need, need.context_tokens, {s.gpu_id: on_gpu, "cpu": 2**50}


SPILLED = " + CPU (weights that do not fit)"  # said of the devices where accelerate keeps some weights on the CPU


def _gpu_count() -> int:
    import torch
    return torch.cuda.device_count()


def _spread_over_gpus(need: memory.MemoryEstimate, count: int, notes: list[str]) -> tuple[str, dict | None]:
    """(per-GPU placement shown to the user, accelerate's max_memory) over several GPUs (--use_gpu_id=False).
    accelerate balances the layers; each GPU also holds its layers' share of the KV cache, a prefill's activations
    and a CUDA context. Weights that no GPU has room for stay on the CPU, with a note."""
    besides_weights = need.kv_cache // count + need.activations + memory.CUDA_CONTEXT  # on each GPU
    share = need.weights // count + besides_weights
    free = [memory.free_gpu_bytes(gpu) for gpu in range(count)]
    placement = ", ".join(f"cuda:{gpu} {human_bytes(share)}" + (f" of {human_bytes(f)} free" if f else "")
                          for gpu, f in enumerate(free))
    if None in free:
        return placement, None
    for_weights = {gpu: max(0, f - besides_weights) for gpu, f in enumerate(free)}
    if sum(for_weights.values()) >= need.weights:
        return placement, for_weights
    notes.append(f"the model needs {human_bytes(need.weights)} of weights and the {count} GPUs have room for "
                 f"{human_bytes(sum(for_weights.values()))}: the rest stays on the CPU (much slower; --load_4bit=True "
                 "would keep it on the GPUs)")
    return placement, {**for_weights, "cpu": 2**50}


def plan(s: Settings, model: str, why: str) -> LoadPlan:
    if s.pre_layer is not None:
        raise UsageError("--pre_layer (layers on the GPU) applies to GGUF models here; a Hugging Face model that does "
                         "not fit one GPU loads with --load_4bit=True, or over several GPUs with --use_gpu_id=False")
    devices, device_map, dtype, notes = _placement(s)
    quant = _bnb_description(s)
    config = _load_config(model, s) or {}
    folder = Path(model)
    saved = checkpoint.quantization(folder, config) if folder.is_dir() else config.get("quantization_config")
    if saved and quant != "none":
        raise UserError(f"{model} is already quantized ({saved.get('quant_method')}): drop --load_8bit/--load_4bit")
    if saved:
        config["quantization_config"] = saved  # AutoGPTQ-era folders keep it in quantize_config.json
        quant = checkpoint.describe(saved)
        notes += _gptq_notes(s)
    if s.lora_weights:
        adapter = Path(s.lora_weights).expanduser()
        if (adapter.exists() or s.lora_weights.startswith((".", "/", "~"))) and \
                not (adapter / "adapter_config.json").is_file():
            raise UserError(f"--lora_weights={s.lora_weights} is not a PEFT adapter folder (no adapter_config.json)")
        quant += f" + LoRA {adapter.name}"
    rope = _rope(config, s)
    trained = config.get("max_position_embeddings")
    if s.max_seq_len:
        context = s.max_seq_len
    elif trained and rope and rope.get("factor"):
        context = int(trained * rope["factor"])
    else:
        context = trained
    if folder.is_dir() and not s.allow_pickle and not any(folder.glob("*.safetensors")) and \
            any(any(folder.glob(pattern)) for pattern in ("*.bin", "*.pt", "*.pth")):
        raise UserError(f"{folder} holds only pickle weights (.bin/.pt), which can run code when loaded: convert "
                        "them to safetensors, or pass --allow_pickle=True if you trust their source")
    # a quantized checkpoint's tensors are packed: count its parameters from the config's shapes instead
    shapes = (_safetensors_shapes(folder) if folder.is_dir() and not saved else None) or \
        memory.shapes_from_config(config)
    need = memory.estimate(config, shapes, dtype, quant, context) if shapes and context else None
    max_memory = None
    if need and _one_gpu(device_map):
        need, context, max_memory = _fit_one_gpu(need, config, dtype, quant, shapes, s, notes)
        if max_memory:
            device_map, devices = "auto", devices + SPILLED
    elif need and device_map == "balanced" and (count := _gpu_count()) > 1:
        placement, max_memory = _spread_over_gpus(need, count, notes)
        devices = f"{devices}: {placement}" + (SPILLED if "cpu" in (max_memory or {}) else "")
    options = {"device_map": device_map, "max_memory": max_memory, "dtype": dtype, "rope_parameters": rope,
               "max_seq_len": context,
               "tokenizer": s.tokenizer_base_model or model, "revision": s.revision,
               # pickle weights only where the user allowed them (transformers then refuses .bin files)
               "use_safetensors": True if s.use_safetensors or not s.allow_pickle else None,
               "trust_remote_code": s.trust_remote_code,
               "offload_folder": s.offload_folder, "flash_attention_2": s.use_flash_attention_2,
               "load_8bit": s.load_8bit, "load_4bit": s.load_4bit, "low_bit_mode": s.low_bit_mode,
               "lora_weights": s.lora_weights,
               # a hub id whose config could not be read: the flag says what the checkpoint is
               "quantization": saved or ({"quant_method": "gptq"} if s.load_gptq else
                                         {"quant_method": "awq"} if s.load_awq else None),
               "weight_basename": s.load_gptq or s.load_awq, "gptq_dict": s.gptq_dict,
               "fast_decode": s.fast_decode if s.fast_decode is not None else _fast_decode_by_default(device_map, s)}
    return LoadPlan("hf", why, model, devices, dtype, quant, context, need and need.weights, need and need.kv_cache,
                    options, notes, activation_bytes=need and need.activations)


def _gptq_notes(s: Settings) -> list[str]:
    notes = []
    if s.use_autogptq:
        notes.append("--use_autogptq: AutoGPTQ is archived upstream; this GPTQ checkpoint loads through gptqmodel")
    old = sorted(AUTOGPTQ_KEYS & set(s.gptq_dict))
    if old:
        notes.append(f"--gptq_dict: {', '.join(old)} (AutoGPTQ options) ignored: gptqmodel picks the kernel; "
                     "{'backend': NAME} chooses one")
    return notes


# ----------------------------------------------------------------------------------------------- loading

def _quantized_kwargs(p: LoadPlan) -> tuple[str, dict]:
    """(folder to load, from_pretrained arguments) for a GPTQ or AWQ checkpoint: gptqmodel must be installed, the
    named weight file is presented as model.safetensors, and a kernel named in gptq_dict is passed on."""
    o = p.options
    saved = o["quantization"]
    method = saved["quant_method"]
    if importlib.util.find_spec("gptqmodel") is None:
        raise missing_package("gptqmodel", "gptq", f"a {method.upper()} checkpoint")
    if method == "gptq" and importlib.util.find_spec("optimum") is None:
        raise missing_package("optimum", "gptq", "a GPTQ checkpoint")
    folder = Path(p.model)
    if not folder.is_dir() and o["weight_basename"] not in ("", "model"):
        from huggingface_hub import snapshot_download  # a hub repository with an AutoGPTQ-style file name

        from . import read_config
        folder = Path(snapshot_download(p.model, revision=o["revision"]))
        saved = checkpoint.quantization(folder, read_config(folder)) or saved
    path = p.model
    if folder.is_dir():
        path = str(checkpoint.weight_view(folder, o["weight_basename"] or "model", saved))
    loading = {k: v for k, v in o["gptq_dict"].items() if k in ("backend", "max_input_length")}
    if method == "gptq" and "backend" not in loading and p.devices.startswith("cuda"):
        # gptqmodel's own choice on Hopper, Machete, fetches CUTLASS sources from the internet on first use;
        # Marlin compiles offline (about 20 s, once) and runs on Ampere and newer
        loading["backend"] = "marlin"
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


def _bnb_config(o: dict, compute_dtype):
    from transformers import BitsAndBytesConfig
    if o["load_8bit"]:
        return BitsAndBytesConfig(load_in_8bit=True)
    mode = o["low_bit_mode"]
    if mode == 0:
        return BitsAndBytesConfig(load_in_4bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=compute_dtype,
                              bnb_4bit_quant_type="fp4" if mode == 3 else "nf4",
                              bnb_4bit_use_double_quant=mode in (1, 3, 4))


def _with_adapter(model, adapter: str, common: dict):
    """The adapter's small matrices beside the base weights, which are shared, not copied."""
    try:
        from peft import PeftModel
    except ImportError:
        raise missing_package("peft", "lora", "--lora_weights") from None
    return PeftModel.from_pretrained(model, adapter, is_trainable=False, revision=common["revision"]).eval()


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


def count_tokens(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False).input_ids)


def weights_by_device(model) -> str:
    """Each device's share of the weights as loaded, e.g. 'cuda:0 6.31 GiB, cuda:1 6.28 GiB' (a model that
    accelerate spread over devices)."""
    import itertools
    totals: dict[str, int] = {}
    for t in itertools.chain(model.parameters(), model.buffers()):
        totals[str(t.device)] = totals.get(str(t.device), 0) + t.numel() * t.element_size()
    return ", ".join(f"{device} {human_bytes(n)}" for device, n in sorted(totals.items()))


def encode_prompt(tokenizer, prompt: str):
    """A rendered prompt's token ids (1 x n): the tokenizer adds BOS unless the chat template already wrote it."""
    bos = tokenizer.bos_token
    return tokenizer(prompt, add_special_tokens=not (bos and prompt.startswith(bos)), return_tensors="pt").input_ids


class Detokenizer:
    """Incremental decoding: emits text only once it is stable (no half UTF-8 character, no merge pending)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = self.read = 0

    def add(self, token: int) -> str:
        self.ids.append(token)
        before = self.tokenizer.decode(self.ids[self.prefix:self.read], skip_special_tokens=True)
        after = self.tokenizer.decode(self.ids[self.prefix:], skip_special_tokens=True)
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return after[len(before):]
        return ""


class HFModel:
    def __init__(self, p: LoadPlan):
        import torch
        import transformers
        from safetensors import SafetensorError
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
        o = p.options
        self.torch = torch
        attention_without_shape_plans(torch)
        dtype = getattr(torch, o["dtype"])
        common = {"revision": o["revision"], "trust_remote_code": o["trust_remote_code"]}
        kwargs: dict[str, Any] = {"dtype": dtype, "device_map": o["device_map"], "offload_folder": o["offload_folder"],
                                  "use_safetensors": o["use_safetensors"], **common}
        if o["max_memory"]:
            kwargs["max_memory"] = o["max_memory"]
        path = p.model
        if o["quantization"]:
            path, extra = _quantized_kwargs(p)
            kwargs.update(extra)
        if o["load_8bit"] or o["load_4bit"]:
            if importlib.util.find_spec("bitsandbytes") is None:
                raise missing_package("bitsandbytes", "bnb", "--load_8bit/--load_4bit")
            kwargs["quantization_config"] = _bnb_config(o, dtype)
        if o["flash_attention_2"]:
            if importlib.util.find_spec("flash_attn") is None:
                raise missing_package("flash-attn", "flash", "--use_flash_attention_2")
            kwargs["attn_implementation"] = "flash_attention_2"
        transformers.logging.set_verbosity_error()
        try:
            config = AutoConfig.from_pretrained(path, **common)
            if o["rope_parameters"]:
                config.rope_parameters = o["rope_parameters"]
            self.tokenizer = AutoTokenizer.from_pretrained(o["tokenizer"], **common)
            self.model = AutoModelForCausalLM.from_pretrained(path, config=config, **kwargs).eval()
            if o["lora_weights"]:
                self.model = _with_adapter(self.model, o["lora_weights"], common)
        except torch.cuda.OutOfMemoryError:
            raise UserError(f"{p.model} does not fit in GPU memory: try --load_4bit=True, --load_8bit=True or "
                            "--use_gpu_id=False to spread it over all GPUs") from None
        except (OSError, ValueError, RuntimeError, SafetensorError) as e:  # missing, damaged or mismatched files
            first = str(e).strip().splitlines()[0] if str(e).strip() else e.__class__.__name__
            raise UserError(f"cannot load {p.model}: {first}") from None
        tok = self.tokenizer
        self.eos_ids = set(_as_list(self.model.generation_config.eos_token_id)) | set(_as_list(tok.eos_token_id))
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else next(iter(self.eos_ids), 0)
        footprint = self.model.get_memory_footprint()
        device_map = getattr(self.model, "hf_device_map", None)
        devices = p.devices if not device_map or len(set(device_map.values())) <= 1 else \
            f"{weights_by_device(self.model)} of weights"
        template = tok.chat_template if isinstance(tok.chat_template, str) else None
        quant = p.quantization
        if o["quantization"]:
            from .fused_projections import fuse_projections
            kernels = quantized_kernels(self.model)
            quant += f", kernel {kernels}"
            if fuse_projections(self.model):
                quant += ", q/k/v and gate/up fused"
            print(f"{o['quantization']['quant_method'].upper()} layers run on gptqmodel's {kernels}")
        self.info = ModelInfo(f"hf (transformers {transformers.__version__})", p.model, devices, p.dtype,
                              quant, p.context_length or 2048, footprint, template,
                              tok.bos_token or "", tok.eos_token or "")
        self.device = self.model.get_input_embeddings().weight.device
        self.fast = None  # the fast decode path once it is warm; until then (or where it fails) generate answers
        self.fast_ready = threading.Event()  # set when the fast path is warm or has failed
        self._closed = False
        if not o["fast_decode"]:
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
            fast = FastDecoder(self.model, self.eos_ids, min(self.info.context_length, DEFAULT_CACHE_TOKENS),
                               compile=self.device.type == "cuda")
            fast.warm_up()
        except Exception as e:  # a model whose code the static cache or the compiler cannot take
            where = traceback.extract_tb(e.__traceback__)[-1]
            first = str(e).strip().splitlines()[0][:160] if str(e).strip() else ""
            why = f"{type(e).__name__} {first} at {Path(where.filename).name}:{where.lineno}"
            print(f"warning: fast decoding is not available for this model ({why}); decoding with generate",
                  file=sys.stderr)
            self.info.decode = f"generate (fast decoding failed: {why})"
            return None
        self.info.decode = "static cache + CUDA graphs" if fast.graphs else "static cache"
        return fast

    def count_tokens(self, text: str) -> int:
        return count_tokens(self.tokenizer, text)

    def _encode(self, prompt: str):
        return encode_prompt(self.tokenizer, prompt).to(self.device)

    def _generation_kwargs(self, params: GenParams, cancel: threading.Event) -> dict:
        from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList

        class Cancelled(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                return cancel.is_set()

        sampling = {"temperature": params.temperature, "top_p": params.top_p, "top_k": params.top_k} \
            if params.do_sample else {}
        config = GenerationConfig(max_new_tokens=params.max_new_tokens, min_new_tokens=params.min_new_tokens,
                                  do_sample=params.do_sample, num_beams=params.num_beams,
                                  repetition_penalty=params.repetition_penalty, eos_token_id=sorted(self.eos_ids),
                                  pad_token_id=self.pad_id, **sampling)
        return {"generation_config": config, "stopping_criteria": StoppingCriteriaList([Cancelled()])}

    def stream(self, prompt: str, params: GenParams, cancel: threading.Event) -> Iterator[str]:
        torch = self.torch
        ids = self._encode(prompt)
        if params.seed is not None:
            torch.manual_seed(params.seed)
        tokens = self.fast.tokens(ids, params, cancel) if self.fast and self.fast.fits(ids.shape[1], params) \
            else self._generate(ids, params, cancel)
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

    def _generate(self, ids, params: GenParams, cancel: threading.Event) -> Iterator[int]:
        """Token ids from transformers' generate, run in a worker thread (beam search, several GPUs, the CPU)."""
        torch = self.torch
        stop = threading.Event()
        kwargs = self._generation_kwargs(params, Either(cancel, stop))
        streamer = _TokenQueue()
        failure: list[BaseException] = []

        def run():
            try:
                with torch.inference_mode():
                    out = self.model.generate(ids, attention_mask=torch.ones_like(ids),
                                              streamer=streamer if params.num_beams == 1 else None, **kwargs)
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
            if self.torch.cuda.is_available():
                self.torch.cuda.empty_cache()


def _as_list(value) -> list[int]:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]
