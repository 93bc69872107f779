"""Every command-line flag in one dataclass: name, default, meaning, parsing and validation.

Flag names and meanings follow h2oGPT's generate.py so existing command lines keep working;
docs/flags.md lists each flag and where quantchat deliberately differs.
"""
from __future__ import annotations

import ast
import dataclasses
import difflib
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

from . import bnb_modes
from .auth import read_auth
from .errors import UsageError, UserError
from .generation import check_generation

LOOPBACK = {"localhost", "127.0.0.1", "::1"}  # --server_name values that keep the web UI and API to this machine


def flag(default: Any, help: str, kind: str | None = None):
    """A dataclass field with its help text and value kind (str, bool, int, float, dict, list, text)."""
    if kind is None:
        kind = {bool: "bool", int: "int", float: "float", dict: "dict", list: "list"}.get(type(default), "str")
    factory = (lambda d=default: type(d)(d)) if isinstance(default, (dict, list)) else None
    meta = {"help": help, "kind": kind}
    return field(default_factory=factory, metadata=meta) if factory else field(default=default, metadata=meta)


@dataclass
class Settings:
    # --- which model, and how it is loaded
    base_model: str = flag("", "model: a local folder, a .gguf file, a hub id, or 'llama' with --model_path_llama; "
                               "empty: the built-in Gemma 3 270M GGUF")
    tokenizer_base_model: str = flag("", "tokenizer folder or hub id, when it differs from base_model")
    load_8bit: bool = flag(False, "load weights as int8 with bitsandbytes")
    load_4bit: bool = flag(False, "load weights as 4-bit with bitsandbytes (see low_bit_mode)")
    low_bit_mode: int = flag(1, bnb_modes.help_text())
    load_half: bool | None = flag(None, "True: fp16/bf16 weights even on the CPU; False: fp32; None: automatic", kind="bool?")
    use_flash_attention_2: bool = flag(False, "attention through the flash-attn package (Hugging Face backend)")
    revision: str | None = flag(None, "hub revision (branch, tag or commit) of base_model", kind="str?")
    use_safetensors: bool = flag(False, "only load .safetensors weights")
    trust_remote_code: bool = flag(False, "run Python code shipped with the model repository (h2oGPT: True)")
    allow_pickle: bool = flag(False, "load pickle (.bin/.pt) weights, which can run code when loaded: only if you "
                                     "trust their source")
    offload_folder: str = flag("offline_folder", "where weights that fit neither GPU nor RAM are offloaded")
    use_gpu_id: bool = flag(True, "True: one GPU (gpu_id); False: spread the model over all GPUs")
    gpu_id: int = flag(0, "the GPU used when use_gpu_id is True")
    rope_scaling: dict | None = flag(None, "RoPE scaling, e.g. \"{'type':'dynamic','factor':4}\"", kind="dict?")
    fast_decode: bool | None = flag(None, "Hugging Face models: decode with a static KV cache and a CUDA graph "
                                          "(default: on with one CUDA GPU; True on the CPU: static cache only)",
                                    kind="bool?")
    max_seq_len: int | None = flag(None, "context length in tokens (default: the model's)", kind="int?")
    prefix_cache: bool = flag(True, "continue each answer from the longest cached prefix of its prompt (a chat's "
                                    "history is not evaluated again each turn); False: evaluate every prompt whole")
    speculative: bool = flag(True, "llama.cpp and the Hugging Face fast path: guess the next tokens by looking the "
                                   "last few up earlier in the prompt and answer, and check the guesses in one step "
                                   "(prompt lookup decoding; decoding's answers up to rounding, faster where they "
                                   "quote their input; switches itself off per answer where it is slower); False: "
                                   "one token per step")
    num_speculative_tokens: int = flag(8, "the most tokens one step guesses (--speculative)")
    draft_model: str = flag("", "a small model sharing the base model's vocabulary whose greedy tokens are the "
                                "guesses --speculative checks, instead of prompt lookup (a GGUF file with a GGUF "
                                "base model; a Hugging Face folder with the fast path)")
    model_lock: Any = flag(None, "several models side by side in the web UI: a list of dicts of flags, e.g. "
                                 "\"[{'base_model':'a.gguf'},{'base_model':'org/b','load_4bit':True}]\"", kind="list?")
    lora_weights: str = flag("", "a PEFT LoRA adapter (folder or hub id) applied over base_model (alias: --lora)")
    # --- llama.cpp
    model_path_llama: str = flag("", "GGUF file used with --base_model=llama")
    llamacpp_dict: dict = flag({}, "keyword arguments for llama_cpp.Llama, e.g. \"{'n_gpu_layers':20,'n_batch':512}\"")
    n_gpu_layers: int | None = flag(None, "layers llama.cpp puts on the GPU (default: all, when a GPU build and GPU exist)",
                                    kind="int?")
    pre_layer: int | None = flag(None, "text-generation-webui's name: layers on the GPU, the rest on the CPU "
                                       "(llama.cpp: as n_gpu_layers)", kind="int?")
    llamacpp_path: str = flag("llamacpp_path", "folder searched for GGUF files named by base_model")
    # --- prompts
    prompt_type: str | None = flag(None, "prompt format (plain, llama2, llama3, chatml, ...; default: the model's chat "
                                         "template)", kind="str?")
    prompt_dict: dict | None = flag(None, "a custom prompt format (see docs/prompts.md)", kind="dict?")
    system_prompt: str = flag("", "system prompt; 'auto': the prompt format's default; empty: none", kind="text")
    chat_template: str | None = flag(None, "a Jinja chat template (text or a file) overriding the model's", kind="str?")
    # --- generation
    max_new_tokens: int | None = flag(None, "tokens to generate at most (default 256)", kind="int?")
    max_max_new_tokens: int | None = flag(None, "cap on max_new_tokens any request may ask for (default 4096)", kind="int?")
    min_new_tokens: int | None = flag(None, "tokens to generate at least (default 0)", kind="int?")
    max_time: float | None = flag(None, "seconds a generation may take at most (default 600)", kind="float?")
    max_max_time: float | None = flag(None, "cap on max_time any request may ask for (default 1800)", kind="float?")
    temperature: float | None = flag(None, "sampling temperature (default 0.1; used when do_sample)", kind="float?")
    top_k: int | None = flag(None, "top-k sampling (default 40)", kind="int?")
    top_p: float | None = flag(None, "nucleus sampling (default 0.75)", kind="float?")
    num_beams: int | None = flag(None, "beam search width (default 1; Hugging Face backend only, not streamed)", kind="int?")
    repetition_penalty: float | None = flag(None, "repetition penalty (default 1.07)", kind="float?")
    do_sample: bool | None = flag(None, "sample instead of greedy decoding (default False)", kind="bool?")
    seed: int | None = flag(None, "random seed for sampling", kind="int?")
    # --- front ends
    stream_output: bool = flag(True, "stream answers token by token")
    cli: bool = flag(False, "chat in the terminal instead of the browser")
    gradio: bool = flag(True, "serve the web UI (when not --cli)")
    share: bool = flag(False, "make a public gradio.live link")
    server_name: str = flag("localhost", "address the web UI listens on (h2oGPT: 0.0.0.0)")
    server_port: int | None = flag(None, "web UI port (default: $GRADIO_SERVER_PORT or 7860)", kind="int?")
    auth: Any = flag(None, "web UI logins: \"[('user','pass')]\" or a JSON file of [user, password] pairs", kind="auth?")
    concurrency_count: int = flag(1, "generations run at once per model (llama.cpp and the default path run one)")
    h2ocolors: bool = flag(True, "h2o.ai colours in the web UI")
    verbose: bool = flag(False, "print rendered prompts and timings")
    inference_server: str = flag("", "a running engine to chat with instead of a local model: vllm:HOST:PORT, "
                                     "vllm_chat:HOST:PORT, openai_chat:URL or an http(s) base URL")
    inference_server_api_key: str | None = flag(None, "API key for --inference_server", kind="str?")
    openai_server: bool = flag(False, "also serve the OpenAI-compatible API (/v1/chat/completions ...)")
    openai_port: int = flag(5000, "port of the OpenAI-compatible API")
    openai_api_key: str | None = flag(None, "API key clients must send (or a file of keys, one per line); "
                                            "without one the API listens on localhost only", kind="str?")
    save_dir: str | None = flag(None, "folder where every answer is appended to history.jsonl", kind="str?")
    score_model: str | None = flag(None, "reward model that rates each answer 0-1 (a folder or hub id; 'auto': "
                                         "h2oGPT's DeBERTa reward model; default None: off)", kind="str?")
    # --- documents Q&A
    langchain_mode: str | None = flag(None, "UserData: answer from the documents in --user_path (without it: those "
                                            "earlier runs and uploads stored); MyData: from files uploaded in this web "
                                            "session; LLM or Disabled: plain chat (default: "
                                            "UserData when --user_path is given, else LLM)", kind="str?")
    user_path: str | None = flag(None, "folder of documents (searched recursively) for langchain_mode=UserData",
                                 kind="str?")
    persist_directory: str = flag("db_dir_UserData", "where the UserData collection's database is kept")
    hf_embedding_model: str | None = flag(None, "sentence-transformers embedding model, a folder or hub id (default: "
                                                "sentence-transformers/all-MiniLM-L6-v2, offline from PyPI)",
                                          kind="str?")
    chunk_size: int = flag(512, "characters per document passage")
    top_k_docs: int | None = flag(None, "passages put before each question (default 4; -1: as many as fit)",
                                  kind="int?")
    db_type: str = flag("chroma", "vector database (chroma is the one there is)")
    dry_run: bool = flag(False, "print the load plan (backend, devices, dtype, memory) and exit without reading weights")
    # --- quantized checkpoints (GPTQ, AWQ, ExLlama)
    load_gptq: str = flag("", "load a GPTQ checkpoint: the weight file's base name, e.g. 'model' or "
                              "'gptq_model-4bit-128g' (a folder whose config.json says gptq needs no flag)")
    use_autogptq: bool = flag(False, "accepted for old command lines: GPTQ loads through gptqmodel either way")
    gptq_dict: dict = flag({}, "GPTQ/AWQ loading options: {'backend': KERNEL} picks a gptqmodel kernel "
                               "(default: the fastest for the GPU), {'max_input_length': N}")
    load_awq: str = flag("", "load an AWQ checkpoint: the weight file's base name, e.g. 'model'")
    load_exllama: bool = flag(False, "load a GPTQ or EXL2 folder through exllamav2, an EXL3 folder through exllamav3")
    exllama_dict: dict = flag({}, "ExLlama options: set_auto_map ('20,20': GB per GPU), alpha_value, compress_pos_emb, "
                                  "max_seq_len")

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]


LANGCHAIN_MODES = ["LLM", "UserData", "MyData"]  # "Disabled" means LLM here, as there are no agents


def _parse_literal(text: str) -> Any:
    """JSON or a Python literal, parsed without eval (shell users write both)."""
    try:
        return json.loads(text)
    except ValueError:
        return ast.literal_eval(text)


def coerce(name: str, value: Any, kind: str) -> Any:
    """Turn a value fire parsed (or left as a string) into the flag's kind, or raise UsageError."""
    optional = kind.endswith("?")
    base = kind.rstrip("?")
    if optional and (value is None or (isinstance(value, str) and value.strip() in ("None", "none", "null", ""))):
        return None
    bad = UsageError(f"--{name}={value!r} is not a valid {_KIND_WORDS[base]}")
    if base in ("str", "text"):
        # fire turns --x=123 into an int and --x=a,b into a tuple; a string flag wants the text back
        return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)
    if base == "bool":
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("true", "1", "yes", "on"):
            return True
        if text in ("false", "0", "no", "off"):
            return False
        raise bad
    if base in ("int", "float"):
        if isinstance(value, bool):
            raise bad
        try:
            number = float(value)
        except (TypeError, ValueError, OverflowError):
            raise bad from None
        if not math.isfinite(number):  # nan, inf: no setting means them
            raise bad
        if base == "int":
            if not number.is_integer():
                raise bad
            return int(number)
        return number
    if base in ("dict", "list", "auth"):
        if base == "auth":  # logins, or a file of them: checked now, not when the web UI starts
            if isinstance(value, str) and not value.lstrip().startswith(("[", "(")):
                if not os.path.isfile(value):
                    raise UsageError(f"--auth={value}: no such file; give a JSON file of [user, password] pairs, "
                                     "or the logins themselves: \"[('user','password')]\"")
                _check_logins(value)
                return value  # (the file, read again where it is used)
        if isinstance(value, str):
            try:
                value = _parse_literal(value)
            except (ValueError, SyntaxError):
                raise UsageError(f"--{name}: cannot parse {value!r}; write a dict like "
                                 f"\"{{'key': 1}}\" (JSON or Python literal)" if base == "dict" else
                                 f"--{name}: cannot parse {value!r} as a list") from None
        wanted = dict if base == "dict" else (list, tuple)
        if not isinstance(value, wanted):
            raise bad
        if base == "auth":
            _check_logins(value)
        return value
    raise AssertionError(kind)


def names_a_local_path(path_or_hub_id: str) -> bool:
    """Whether a model flag's value names a local path (a hub id otherwise), so that a missing one is said as such."""
    return bool(path_or_hub_id) and (os.path.exists(os.path.expanduser(path_or_hub_id)) or
                                     path_or_hub_id.startswith((".", "/", "~")))


def names_a_missing_folder(path_or_hub_id: str) -> bool:
    """A local path (not a hub id) where no folder is: a missing path, or a file."""
    return names_a_local_path(path_or_hub_id) and not os.path.isdir(os.path.expanduser(path_or_hub_id))


def _check_logins(auth: Any) -> None:
    """--auth's logins must read as (user, password) pairs now: the web UI would refuse them only as it starts."""
    try:
        read_auth(auth)
    except UserError as e:
        raise UsageError(str(e)) from None


_KIND_WORDS = {"str": "text", "text": "text", "bool": "boolean (True or False)", "int": "whole number",
               "float": "number", "dict": "dict", "list": "list", "auth": "list of (user, password) pairs or a file"}


# other launchers' names for our flags (text-generation-webui's --lora)
FLAG_ALIASES = {"lora": "lora_weights"}


def from_flags(flags: dict[str, Any]) -> Settings:
    """Build Settings from {flag: value} as fire parsed it; unknown names and bad values raise UsageError."""
    fields = {f.name: f for f in dataclasses.fields(Settings)}
    values: dict[str, Any] = {}
    for raw_name, value in flags.items():
        name = raw_name.replace("-", "_")
        name = FLAG_ALIASES.get(name, name)
        if name not in fields:
            close = difflib.get_close_matches(name, fields, n=1, cutoff=0.6)
            hint = f"; did you mean --{close[0]}?" if close else "; run  python generate.py --help  for the list"
            raise UsageError(f"unknown flag --{raw_name}{hint}")
        values[name] = coerce(name, value, fields[name].metadata["kind"])
    settings = Settings(**values)
    validate(settings)
    return settings


def validate(s: Settings) -> None:
    """Clashing flags and out-of-range values: one line each, exit code 2."""
    if s.load_8bit and s.load_4bit:
        raise UsageError("--load_8bit and --load_4bit clash: choose one")
    if s.low_bit_mode not in bnb_modes.LOW_BIT_MODES:
        *first, last = map(str, bnb_modes.LOW_BIT_MODES)
        raise UsageError(f"--low_bit_mode={s.low_bit_mode}: choose {', '.join(first)} or {last}")
    if s.load_half is not None and s.load_8bit:
        raise UsageError("--load_half and --load_8bit clash: int8 weights are not half precision; choose one")
    if s.cli and s.share:
        raise UsageError("--cli and --share clash: share publishes the web UI, which --cli does not start")
    if s.draft_model and not s.speculative:
        raise UsageError("--draft_model and --speculative=False clash: the draft model's guesses are what speculative "
                         "decoding checks; drop one")
    check_generation({name: getattr(s, name) for name in ("max_new_tokens", "min_new_tokens", "max_time", "temperature",
                                                          "top_k", "top_p", "num_beams", "repetition_penalty", "seed")},
                     as_flags=True)
    checks = [  # the other numbers' ranges
        ("max_max_new_tokens", s.max_max_new_tokens, 1, None), ("max_max_time", s.max_max_time, 0.001, None),
        ("max_seq_len", s.max_seq_len, 16, 2**27),
        ("n_gpu_layers", s.n_gpu_layers, -1, None), ("pre_layer", s.pre_layer, 0, None), ("gpu_id", s.gpu_id, 0, None),
        ("server_port", s.server_port, 1, 65535), ("concurrency_count", s.concurrency_count, 1, 1024),
        ("openai_port", s.openai_port, 1, 65535), ("num_speculative_tokens", s.num_speculative_tokens, 1, 64),
    ]
    for name, value, low, high in checks:
        if value is None:
            continue
        if value < low or (high is not None and value > high):
            span = f"between {low} and {high}" if high is not None else f"at least {low}"
            raise UsageError(f"--{name}={value}: must be {span}")
    if s.rope_scaling is not None:
        kind = s.rope_scaling.get("type", s.rope_scaling.get("rope_type"))
        if "alpha_value" not in s.rope_scaling and (kind is None or "factor" not in s.rope_scaling):
            raise UsageError("--rope_scaling needs a type and a factor, e.g. \"{'type':'dynamic','factor':4}\"")
        if kind is not None and kind not in ROPE_TYPES:
            raise UsageError(f"--rope_scaling: type {str(kind)[:40]!r} is not known; use one of {', '.join(ROPE_TYPES)}")
        for key in ("factor", "alpha_value"):
            value = s.rope_scaling.get(key)
            if value is not None and not _positive_number(value, most=1024):
                raise UsageError(f"--rope_scaling: {key} must be a number above 0 and at most 1024, not {value!r}")
    _settle_documents(s)
    for item in s.model_lock or []:
        if not isinstance(item, dict) or not item:
            raise UsageError("--model_lock: each entry is a dict of flags, e.g. {'base_model': 'org/model'}")
        if "model_lock" in item:
            raise UsageError("--model_lock: an entry cannot hold another model_lock")
    _check_quantized(s)


GPTQ_DICT_KEYS = {"backend", "max_input_length"}
# AutoGPTQ's from_quantized options that h2oGPT command lines pass: gptqmodel chooses kernels itself
AUTOGPTQ_KEYS = {"use_triton", "disable_exllama", "disable_exllamav2", "use_marlin", "inject_fused_attention",
                 "inject_fused_mlp", "use_cuda_fp16", "warmup_triton", "trainable", "use_tritonv2"}
EXLLAMA_DICT_KEYS = {"set_auto_map", "gpu_split", "alpha_value", "compress_pos_emb", "max_seq_len"}


def _check_quantized(s: Settings) -> None:
    """Clashes among the quantized-checkpoint flags, and the keys of their dicts."""
    chosen = [name for name in ("load_gptq", "load_awq", "load_exllama") if getattr(s, name)]
    if len(chosen) > 1 and chosen != ["load_gptq", "load_exllama"]:  # h2oGPT: exllama may load a GPTQ folder
        raise UsageError(f"--{chosen[0]} and --{chosen[1]} clash: a checkpoint is GPTQ or AWQ; choose one")
    if chosen and (s.load_8bit or s.load_4bit):
        raise UsageError(f"--{chosen[0]} loads weights that are already quantized: drop --load_8bit/--load_4bit")
    unknown = set(s.gptq_dict) - GPTQ_DICT_KEYS - AUTOGPTQ_KEYS
    if unknown:
        raise UsageError(f"--gptq_dict: unknown key {sorted(unknown)[0]!r}; known: {', '.join(sorted(GPTQ_DICT_KEYS))}")
    unknown = set(s.exllama_dict) - EXLLAMA_DICT_KEYS
    if unknown:
        raise UsageError(f"--exllama_dict: unknown key {sorted(unknown)[0]!r}; known: "
                         f"{', '.join(sorted(EXLLAMA_DICT_KEYS))}")
    for key in ("alpha_value", "compress_pos_emb"):
        value = s.exllama_dict.get(key)
        if value is not None and not _positive_number(value, most=1024):
            raise UsageError(f"--exllama_dict: {key} must be a positive number, not {value!r}")
    gpu_split(s.exllama_dict)  # raises on a malformed split


# --rope_scaling's types, those a factor alone describes (llama.cpp takes linear and yarn; ExLlama alpha_value instead)
ROPE_TYPES = ("linear", "dynamic", "yarn")


def _positive_number(value: Any, most: float) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value) and \
        0 < value <= most


def gpu_split(exllama_dict: dict) -> list[float] | None:
    """h2oGPT's set_auto_map '20,20' (or gpu_split [20, 20]): GB of weights per GPU, in GPU order."""
    value = exllama_dict.get("set_auto_map", exllama_dict.get("gpu_split"))
    if value is None:
        return None
    parts = value.split(",") if isinstance(value, str) else value if isinstance(value, (list, tuple)) else [value]
    try:
        split = [float(part) for part in parts]
    except (TypeError, ValueError):
        split = []
    if not split or any(gb <= 0 for gb in split):
        raise UsageError(f"--exllama_dict: set_auto_map {value!r} is not a list of GB per GPU, e.g. '20,20'")
    return split


def _settle_documents(s: Settings) -> None:
    """langchain_mode from h2oGPT's spellings; UserData when only --user_path is given."""
    mode = (s.langchain_mode or "").strip()
    by_lower = {m.lower(): m for m in LANGCHAIN_MODES} | {"disabled": "LLM", "none": "", "": ""}
    if mode.lower() not in by_lower:
        raise UsageError(f"--langchain_mode={mode}: choose one of {', '.join(LANGCHAIN_MODES)}")
    # UserData without --user_path is the database as earlier runs and uploads left it (as in h2oGPT)
    s.langchain_mode = by_lower[mode.lower()] or ("UserData" if s.user_path else "LLM")
    if s.db_type != "chroma":
        raise UsageError(f"--db_type={s.db_type}: only chroma is supported")
    if s.chunk_size < 64:
        raise UsageError(f"--chunk_size={s.chunk_size}: must be at least 64 characters")
    if s.top_k_docs is not None and (s.top_k_docs == 0 or s.top_k_docs < -1):
        raise UsageError(f"--top_k_docs={s.top_k_docs}: a number of passages (at least 1), or -1 for as many as fit")


def help_text() -> str:
    """The flag list for --help, grouped as in the dataclass."""
    lines = ["usage: python generate.py --base_model=MODEL [--flag=value ...]", ""]
    for f in dataclasses.fields(Settings):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        lines.append(f"  --{f.name:<22} {f.metadata['help']} [default: {default!r}]")
    return "\n".join(lines)
