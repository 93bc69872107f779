"""The Hugging Face load plan: flags and checkpoint facts to devices, dtype, quantization, context and memory.

Side-effect free: it reads the checkpoint's small files (safetensors headers) and the Machine it is given, and
imports neither torch nor transformers.
"""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ... import bnb_modes, memory
from ...bnb_modes import BnbMode
from ...errors import UsageError, UserError
from ...machine import Machine
from ...settings import AUTOGPTQ_KEYS, Settings, names_a_local_path, names_a_missing_folder
from ..base import LoadPlan, human_bytes
from ..checkpoint import Checkpoint, describe

MIN_CONTEXT = 2048  # below this a shorter context is a worse plan than offloading weights
SPILLED = " + CPU (weights that do not fit)"  # said of the devices where accelerate keeps some weights on the CPU


@dataclass(frozen=True)
class HFOptions:
    """from_pretrained's arguments and what the backend does around them."""
    device_map: Any                  # accelerate's: {"": 0}, {"": "cpu"}, "balanced" or "auto"
    max_memory: dict | None          # accelerate's per-device cap, where the model does not fit as it is
    dtype: str                       # torch dtype name
    rope_parameters: dict | None     # transformers 5's form of --rope_scaling
    tokenizer: str
    revision: str | None
    use_safetensors: bool | None     # None: pickle weights allowed (--allow_pickle)
    trust_remote_code: bool
    offload_folder: str
    flash_attention_2: bool
    bnb: BnbMode | None              # --load_8bit / --load_4bit
    lora_weights: str
    quantization: dict | None        # a GPTQ/AWQ checkpoint's quantization_config
    weight_basename: str             # --load_gptq/--load_awq=NAME: NAME.safetensors holds the weights
    gptq_dict: dict
    fast_decode: bool
    prefix_cache: bool = True        # --prefix_cache: keep the last conversation's keys and values
    speculative_tokens: int = 0      # the fast path's most guesses a step (--num_speculative_tokens); 0: --speculative=False
    draft: LoadPlan[HFOptions] | None = None  # --draft_model: its own load plan (the fast path's guesses)


def check(s: Settings, ckpt: Checkpoint) -> None:
    """Flags that contradict each other or the checkpoint, for a Hugging Face load."""
    if s.pre_layer is not None:
        raise UsageError("--pre_layer (layers on the GPU) applies to GGUF models here; a Hugging Face model that does "
                         "not fit one GPU loads with --load_4bit=True, or over several GPUs with --use_gpu_id=False")
    if ckpt.is_dir:
        for wanted, flag in (("gptq", s.load_gptq), ("awq", s.load_awq)):
            if flag and ckpt.quant_method != wanted:
                raise UserError(f"--load_{wanted} expects a {wanted.upper()} checkpoint, and {ckpt.holds()}")
    if ckpt.quantization and (s.load_8bit or s.load_4bit):
        raise UserError(f"{ckpt.path} is already quantized ({ckpt.quant_method}): drop --load_8bit/--load_4bit")
    if names_a_missing_folder(s.tokenizer_base_model):
        raise UserError(f"--tokenizer_base_model={s.tokenizer_base_model} is not a folder (give the folder that holds "
                        "the tokenizer's files, or a hub id)")
    if s.lora_weights:
        adapter = Path(s.lora_weights).expanduser()
        if names_a_local_path(s.lora_weights):
            if not (adapter / "adapter_config.json").is_file():
                raise UserError(f"--lora_weights={s.lora_weights} is not a PEFT adapter folder (no adapter_config.json)")
            if not any((adapter / f"adapter_model.{kind}").is_file() for kind in ("safetensors", "bin")):
                raise UserError(f"--lora_weights={s.lora_weights} has no adapter weights (adapter_model.safetensors): "
                                "the adapter folder is incomplete")
    folder = Path(ckpt.path)
    if ckpt.is_dir and not s.allow_pickle and not any(folder.glob("*.safetensors")) and \
            any(any(folder.glob(pattern)) for pattern in ("*.bin", "*.pt", "*.pth")):
        raise UserError(f"{folder} holds only pickle weights (.bin/.pt), which can run code when loaded: convert "
                        "them to safetensors, or pass --allow_pickle=True if you trust their source")


def plan(s: Settings, ckpt: Checkpoint, machine: Machine, why: str) -> LoadPlan[HFOptions]:
    devices, device_map, dtype, notes = placement(s, machine)
    bnb = bnb_modes.chosen(s.load_8bit, s.load_4bit, s.low_bit_mode)
    config = text_config(ckpt.config)
    saved = ckpt.quantization
    quant = bnb.description if bnb else describe(saved) if saved else "none"
    gptq_dict = s.gptq_dict
    if saved:
        notes += _gptq_notes(s)
        gptq_dict = _kernel_choice(saved, s.gptq_dict, devices, notes)
    if s.lora_weights:
        quant += f" + LoRA {Path(s.lora_weights).expanduser().name}"
    rope = _rope(config, s)
    trained = config.get("max_position_embeddings")
    if s.max_seq_len:
        context = s.max_seq_len
    elif trained and rope and rope.get("factor"):
        context = int(trained * rope["factor"])
    else:
        context = trained
    # a quantized checkpoint's tensors are packed: count its parameters from the config's shapes instead
    shapes = (safetensors_shapes(Path(ckpt.path)) if ckpt.is_dir and not saved else None) or \
        memory.shapes_from_config(config)
    linear_bytes = bnb.bytes_per_weight if bnb else memory.packed_bytes_per_weight(saved) if saved else None
    need = memory.estimate(config, shapes, dtype, linear_bytes, context) if shapes and context else None
    max_memory = None
    if need and one_gpu(device_map):
        need, context, max_memory = _fit_one_gpu(need, config, dtype, linear_bytes, shapes, s, machine, notes)
        if max_memory:
            device_map, devices = "auto", devices + SPILLED
    elif need and device_map == "balanced" and len(machine.gpus) > 1:
        placed, max_memory = _spread_over_gpus(need, machine, notes)
        devices = f"{devices}: {placed}" + (SPILLED if "cpu" in (max_memory or {}) else "")
    fast_decode = s.fast_decode if s.fast_decode is not None else fast_decode_by_default(device_map, bnb)
    draft = _draft_plan(s, machine) if s.draft_model and s.speculative else None
    if draft and not fast_decode:
        why = "--fast_decode=False turns it off" if s.fast_decode is False else \
            "it is off by default without one GPU and with --load_8bit"
        raise UsageError(f"--draft_model guesses for the fast decode path, and {why}: add --fast_decode=True or drop "
                         "--draft_model")
    options = HFOptions(
        device_map=device_map, max_memory=max_memory, dtype=dtype, rope_parameters=rope,
        tokenizer=s.tokenizer_base_model or ckpt.path, revision=s.revision,
        # pickle weights only where the user allowed them (transformers then refuses .bin files)
        use_safetensors=True if s.use_safetensors or not s.allow_pickle else None,
        trust_remote_code=s.trust_remote_code, offload_folder=s.offload_folder,
        flash_attention_2=s.use_flash_attention_2, bnb=bnb, lora_weights=s.lora_weights,
        # a hub id whose config could not be read: the flag says what the checkpoint is
        quantization=saved or ({"quant_method": "gptq"} if s.load_gptq else
                               {"quant_method": "awq"} if s.load_awq else None),
        weight_basename=s.load_gptq or s.load_awq, gptq_dict=gptq_dict,
        fast_decode=fast_decode,
        prefix_cache=s.prefix_cache, speculative_tokens=s.num_speculative_tokens if s.speculative else 0,
        draft=draft)
    return LoadPlan("hf", why, ckpt.path, devices, dtype, quant, context, need and need.weights,
                    need and need.kv_cache, options, notes, activation_bytes=need and need.activations)


def _draft_plan(s: Settings, machine: Machine) -> LoadPlan[HFOptions]:
    """--draft_model's own plan: a Hugging Face model loaded as the base model is (precision, device, 4/8-bit)."""
    from dataclasses import replace

    from ..checkpoint import read_checkpoint
    drafting = replace(s, base_model=s.draft_model, draft_model="", lora_weights="", load_gptq="", load_awq="",
                       tokenizer_base_model="", fast_decode=True)
    ckpt = read_checkpoint(drafting)
    if ckpt.kind == "gguf":
        raise UsageError(f"--draft_model={s.draft_model} is a GGUF file, and {s.base_model} loads through the Hugging "
                         "Face backend: give a Hugging Face model folder (or a GGUF base model)")
    check(drafting, ckpt)
    return plan(drafting, ckpt, machine, "--draft_model")


def text_config(config: dict) -> dict:
    """Multimodal configs keep the language model's shape under text_config."""
    inner = config.get("text_config")
    return {**config, **inner} if isinstance(inner, dict) else config


MAX_HEADER_BYTES = 100 * 2**20  # safetensors' own limit on a header


def safetensors_shapes(folder: Path) -> list[tuple[str, int]] | None:
    """(tensor name, element count) from the headers of every .safetensors file: no weights are read. A header
    that is short, claims more than the file or the format allows, or is not a JSON object of shapes is one line
    naming the file."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        return None
    shapes = []
    for file in files:
        damaged = f"{file} is not a readable safetensors file"
        if not file.is_file():  # a folder, a FIFO (its read would block), a link loop
            raise UserError(f"{damaged}: it is not a regular file")
        size = file.stat().st_size
        with open(file, "rb") as f:
            start = f.read(8)
            length = struct.unpack("<Q", start)[0] if len(start) == 8 else None
            if length is None or length > min(size - 8, MAX_HEADER_BYTES):
                raise UserError(f"{damaged}: its header is cut short or claims {length} bytes (the file has {size})")
            try:
                header = json.loads(f.read(length))
            except (ValueError, RecursionError):
                header = None
        if not isinstance(header, dict):
            raise UserError(f"{damaged}: its header is not a JSON object")
        for name, meta in header.items():
            if name == "__metadata__":
                continue
            shape = meta.get("shape") if isinstance(meta, dict) else None
            if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                                      for d in shape):
                raise UserError(f"{damaged}: tensor {name[:80]!r} has no valid shape")
            count = 1
            for dim in shape:
                count *= dim
            shapes.append((name, count if len(shape) == 2 else -count))  # negative: not a matrix
    return shapes


def placement(s: Settings, machine: Machine) -> tuple[str, Any, str, list[str]]:
    """(devices shown to the user, accelerate device_map, dtype name, notes)."""
    notes: list[str] = []
    if machine.gpus:
        count = len(machine.gpus)
        if s.use_gpu_id or count == 1:
            gpu = machine.gpu(s.gpu_id)
            if gpu is None:
                raise UserError(f"--gpu_id={s.gpu_id}, but only {count} GPU(s) are visible "
                                "(check CUDA_VISIBLE_DEVICES)")
            half = "bfloat16" if gpu.bf16 else "float16"
            return f"cuda:{s.gpu_id} ({gpu.name})", {"": s.gpu_id}, "float32" if s.load_half is False else half, notes
        half = "bfloat16" if all(g.bf16 for g in machine.gpus) else "float16"
        return (f"{count} GPUs, balanced (cuda:0-{count - 1})", "balanced", "float32" if s.load_half is False else half,
                notes)
    if machine.mps:
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
    base = config.get("rope_parameters")
    base = base if isinstance(base, dict) else {"rope_theta": config.get("rope_theta", 10000.0)}
    return {**base, **rope}


def one_gpu(device_map) -> bool:
    return isinstance(device_map, dict) and str(next(iter(device_map.values()))) not in ("cpu", "mps")


def fast_decode_by_default(device_map, bnb: BnbMode | None) -> bool:
    """One GPU, in the precisions measured with it (docs/benchmarks.md): bf16/fp16 and 4-bit. bitsandbytes' int8
    layers were not measured under the compiler, and a failed compilation would cost every load its time."""
    return one_gpu(device_map) and bnb is not bnb_modes.INT8


def _fit_one_gpu(need: memory.MemoryEstimate, config: dict, dtype: str, linear_bytes: float | None, shapes,
                 s: Settings, machine: Machine, notes: list[str]):
    """(estimate, context, max_memory) for a model that may not fit its GPU: first a shorter context (unless
    --max_seq_len was given), then weights offloaded to the CPU through accelerate's max_memory; unchanged when it
    fits or the free memory is unknown."""
    free = machine.free_gpu_bytes(s.gpu_id)
    if free is None or need.total <= free:
        return need, need.context_tokens, None
    gib = lambda n: f"{n / 2**30:.1f} GiB"  # noqa: E731
    fixed = memory.CUDA_CONTEXT + need.activations
    per_token = need.kv_cache / need.context_tokens
    tokens = int((free - fixed - need.weights) / per_token) // 256 * 256
    if not s.max_seq_len and tokens >= MIN_CONTEXT:
        notes.append(f"the model needs {gib(need.total)} at its full context of {need.context_tokens} tokens and GPU "
                     f"{s.gpu_id} has {gib(free)} free: context shortened to {tokens} tokens (--max_seq_len sets it)")
        return memory.estimate(config, shapes, dtype, linear_bytes, tokens), tokens, None
    on_gpu = free - fixed - need.kv_cache
    if on_gpu <= 0:
        raise UserError(f"GPU {s.gpu_id} has {gib(free)} free, less than the KV cache and buffers need "
                        f"({gib(fixed + need.kv_cache)}): lower --max_seq_len")
    notes.append(f"the model needs {gib(need.total)} and GPU {s.gpu_id} has {gib(free)} free: "
                 f"{gib(need.weights - on_gpu)} of weights stay on the CPU (much slower; --load_4bit=True or "
                 "--use_gpu_id=False over several GPUs would keep them on GPUs)")
    return need, need.context_tokens, {s.gpu_id: on_gpu, "cpu": 2**50}


def _spread_over_gpus(need: memory.MemoryEstimate, machine: Machine, notes: list[str]) -> tuple[str, dict | None]:
    """(per-GPU placement shown to the user, accelerate's max_memory) over several GPUs (--use_gpu_id=False).
    accelerate balances the layers; each GPU also holds its layers' share of the KV cache, a prefill's activations
    and a CUDA context. Weights that no GPU has room for stay on the CPU, with a note."""
    count = len(machine.gpus)
    besides_weights = need.kv_cache // count + need.activations + memory.CUDA_CONTEXT  # on each GPU
    share = need.weights // count + besides_weights
    free = [gpu.free_bytes for gpu in machine.gpus]
    placed = ", ".join(f"cuda:{gpu} {human_bytes(share)}" + (f" of {human_bytes(f)} free" if f else "")
                       for gpu, f in enumerate(free))
    if None in free:
        return placed, None
    for_weights = {gpu: max(0, f - besides_weights) for gpu, f in enumerate(free)}
    if sum(for_weights.values()) >= need.weights:
        return placed, for_weights
    notes.append(f"the model needs {human_bytes(need.weights)} of weights and the {count} GPUs have room for "
                 f"{human_bytes(sum(for_weights.values()))}: the rest stays on the CPU (much slower; --load_4bit=True "
                 "would keep it on the GPUs)")
    return placed, {**for_weights, "cpu": 2**50}


def _kernel_choice(saved: dict, gptq_dict: dict, devices: str, notes: list[str]) -> dict:
    """--gptq_dict with the 4-bit kernel this plan runs GPTQ on: gptqmodel's Marlin on CUDA unless the user named
    one. Measured on an H200 at batch 1 (bench/results/kernels-h200*.json): Marlin's matmuls take 1.95 ms a
    Llama-2-7B token against 2.03 for PyTorch's int4 kernel and 2.40 for GemLite's, and a verify step of 9 tokens
    costs 1.12x one token on it against 2.2x on the others. gptqmodel's own choice on Hopper, Machete, fetches
    CUTLASS sources from the internet on first use."""
    if saved.get("quant_method") != "gptq" or "backend" in gptq_dict or not devices.startswith("cuda"):
        return gptq_dict
    notes.append("GPTQ layers run on gptqmodel's Marlin kernel, the fastest measured at batch 1 and for speculative "
                 "verify steps (docs/benchmarks.md); --gptq_dict=\"{'backend': NAME}\" picks another")
    return {**gptq_dict, "backend": "marlin"}


def _gptq_notes(s: Settings) -> list[str]:
    notes = []
    if s.use_autogptq:
        notes.append("--use_autogptq: AutoGPTQ is archived upstream; this GPTQ checkpoint loads through gptqmodel")
    old = sorted(AUTOGPTQ_KEYS & set(s.gptq_dict))
    if old:
        notes.append(f"--gptq_dict: {', '.join(old)} (AutoGPTQ options) ignored: gptqmodel picks the kernel; "
                     "{'backend': NAME} chooses one")
    return notes
