"""What --base_model names, read once from small files: a GGUF file, a model folder (its config.json and
quantization) or a hub id; and, for h2oGPT's --load_gptq=NAME and --load_awq=NAME, a view of the folder in which
NAME.safetensors is the weight file transformers looks for. The backends' plans take the Checkpoint read here."""
from __future__ import annotations

import json
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from .. import packaged_models
from ..errors import UsageError, UserError
from ..settings import Settings
from . import download


@dataclass(frozen=True)
class Checkpoint:
    path: str                                  # the GGUF file, the model folder, or the hub id
    kind: Literal["gguf", "folder", "hub"]
    found: str                                 # how it was found, e.g. "a .gguf file"
    config: dict = field(default_factory=dict)  # config.json (a hub id's when it could be fetched); {} for GGUF
    quantization: dict | None = None           # quantization_config, quant_method lower-cased
    pending_download: str = ""                 # --dry_run of a GGUF not yet fetched: what would be downloaded

    @property
    def quant_method(self) -> str | None:
        return self.quantization["quant_method"] if self.quantization else None

    @property
    def is_dir(self) -> bool:
        return self.kind == "folder"

    def holds(self) -> str:
        """'X holds a checkpoint quantized with gptq' / 'X holds an unquantized checkpoint', for error lines."""
        m = self.quant_method
        return f"{self.path} holds " + (f"a checkpoint quantized with {m}" if m else "an unquantized checkpoint")


def find_gguf(name: str, llamacpp_path: str) -> str:
    for candidate in (Path(name).expanduser(), Path(llamacpp_path).expanduser() / name):
        if candidate.is_file():
            return str(candidate)
    raise UserError(f"GGUF file not found: {name} (looked here and in --llamacpp_path={llamacpp_path})")


def _remote_gguf(remote: download.RemoteGGUF, s: Settings, found: str) -> Checkpoint:
    """A GGUF from the hub or a URL: fetched into --llamacpp_path, or with --dry_run only described."""
    fetched = download.fetch(remote, s.llamacpp_path, dry_run=s.dry_run)
    pending = fetched.note() if s.dry_run and fetched.bytes_to_download != 0 else ""
    return Checkpoint(fetched.path, "gguf", f"{found}: {fetched.source}", pending_download=pending)


MAX_JSON_BYTES = 16 * 2**20   # a model's config files are kilobytes
# config.json's shape numbers: each a whole number above 0 and at most this (a damaged or hostile file otherwise
# divides by zero, or plans terabytes)
CONFIG_NUMBERS = {"hidden_size": 2**20, "num_hidden_layers": 2**14, "vocab_size": 2**24, "intermediate_size": 2**22,
                  "num_attention_heads": 2**14, "num_key_value_heads": 2**14, "head_dim": 2**16,
                  "max_position_embeddings": 2**27}


def read_json_object(path: Path) -> dict:
    """A small JSON file that must hold an object; one line naming the file and what is wrong otherwise."""
    damaged = f"{path} cannot be read as a JSON object"
    try:
        if not path.is_file():  # (a FIFO would block the read; a folder or a link loop cannot be read)
            raise UserError(f"{damaged}: it is not a regular file")
        if path.stat().st_size > MAX_JSON_BYTES:
            raise UserError(f"{damaged}: it is larger than {MAX_JSON_BYTES // 2**20} MiB")
        value = json.loads(path.read_text(encoding="utf-8"))
    except UserError:
        raise
    except (OSError, ValueError, RecursionError) as e:
        raise UserError(f"{damaged} ({e.__class__.__name__}): the model folder is damaged or incomplete") from None
    if not isinstance(value, dict):
        raise UserError(f"{damaged}: it holds a {type(value).__name__}; the model folder is damaged")
    return value


def read_config(folder: Path) -> dict:
    config = read_json_object(folder / "config.json")
    for part in (config, config.get("text_config")):
        if not isinstance(part, dict):
            continue
        for key, most in CONFIG_NUMBERS.items():
            value = part.get(key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= most):
                raise UserError(f"{folder}/config.json: {key} is {value!r}, not a whole number between 1 and {most}: "
                                "the model folder is damaged")
    return config


def check_weight_index(folder: Path, basename: str = "model") -> None:
    """A sharded checkpoint's index, where the folder has one (model.safetensors.index.json, or NAME's for
    --load_gptq=NAME), must carry its metadata and list .safetensors files of its folder by name, as transformers
    reads it: one line naming the file otherwise (transformers would open a listed '../x' outside the folder, or stop
    at a KeyError). Other indexes a repository may hold (Mistral's consolidated.safetensors.index.json) are not
    transformers' to read."""
    index = folder / f"{basename}.safetensors.index.json"
    if not index.exists():
        return
    content = read_json_object(index)
    weight_map = content.get("weight_map")
    damaged = f"{index} is not a usable index of weight files"
    if not isinstance(content.get("metadata"), dict) or not isinstance(weight_map, dict) or not weight_map:
        raise UserError(f"{damaged}: it needs a 'metadata' object and a 'weight_map' of tensor names to files; "
                        "the model folder is damaged")
    for name in set(weight_map.values()):
        if not (isinstance(name, str) and name == Path(name).name and name.endswith(".safetensors")
                and (folder / name).is_file()):
            raise UserError(f"{damaged}: it lists {str(name)[:80]!r}, which is not a .safetensors file in the "
                            "folder; the model folder is damaged or incomplete")


def _hub_config(name: str, s: Settings) -> dict:
    """A hub id's config.json through transformers (which fetches it, or finds it in its cache); {} when that fails
    (offline, private, a typo: the load itself will say which) or transformers is not installed."""
    try:
        from transformers import AutoConfig
        return AutoConfig.from_pretrained(name, revision=s.revision, trust_remote_code=s.trust_remote_code).to_dict()
    except Exception:
        return {}


def read_checkpoint(s: Settings) -> Checkpoint:
    """What --base_model (or --model_path_llama) names, from what is on disk; no weights are read."""
    name = s.base_model.strip()
    if not name:
        return Checkpoint(str(packaged_models.assemble()), "gguf",
                          f"no --base_model: the built-in {packaged_models.BUILTIN.name} GGUF")
    if name == "llama":
        # h2oGPT's default file where --model_path_llama is not given
        wanted = s.model_path_llama or download.H2OGPT_DEFAULT_LLAMA
        remote = download.parse(wanted, s.revision)
        if remote:
            return _remote_gguf(remote, s, "--base_model=llama" + (" with --model_path_llama" if s.model_path_llama
                                                                     else " (h2oGPT's default GGUF)"))
        return Checkpoint(find_gguf(wanted, s.llamacpp_path), "gguf", "--base_model=llama with --model_path_llama")
    is_url = re.match(r"https?://", name) is not None
    if name.lower().endswith(".gguf") or is_url:
        remote = download.parse(name, s.revision) if is_url else None  # ("models/x.gguf" is a path, not a repo)
        if remote:
            return _remote_gguf(remote, s, "a GGUF URL")
        return Checkpoint(find_gguf(name, s.llamacpp_path), "gguf", "a .gguf file")
    path = Path(name).expanduser()
    if path.is_dir():
        if (path / "config.json").is_file():
            config = read_config(path)
            check_weight_index(path)
            return Checkpoint(str(path), "folder", "a folder with config.json", config, quantization(path, config))
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return Checkpoint(str(ggufs[0]), "gguf", "a folder holding one .gguf file")
        if ggufs:
            raise UsageError(f"{path} holds several .gguf files ({', '.join(g.name for g in ggufs)}): "
                             "name one in --base_model")
        raise UserError(f"{path} is not a model folder: it has neither config.json nor a .gguf file")
    if path.exists():
        raise UserError(f"{name} is a file but not a .gguf: give a model folder, a .gguf file or a hub id")
    remote = download.parse(name, s.revision)
    if remote:  # OWNER/REPO-GGUF or OWNER/REPO:QUANT
        return _remote_gguf(remote, s, "a GGUF repository on the hub")
    if re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", name) and not name.startswith((".", "~")):
        config = _hub_config(name, s)
        saved = config.get("quantization_config")
        return Checkpoint(name, "hub", "a Hugging Face hub id (no such local path)", config,
                          _normalized(name, saved, "") if saved else None)
    raise UserError(f"model not found: {name} is neither an existing path nor a hub id (owner/name)")


WEIGHT_SHARD = re.compile(r"-\d{5}-of-\d{5}\.safetensors$")  # one of the files an index lists, not a name to pass


def quantization(folder: Path, config: dict) -> dict | None:
    """The checkpoint's quantization settings: config.json's quantization_config, or the quantize_config.json
    that AutoGPTQ-era folders keep beside it (quant_method gptq unless it says otherwise)."""
    saved = config.get("quantization_config")
    if saved:
        return _normalized(folder, saved, "")
    legacy = folder / "quantize_config.json"
    if legacy.is_file():
        return _normalized(folder, read_json_object(legacy), "gptq")
    return None


def _normalized(where, saved, default_method: str) -> dict:
    """Quantization settings as the plans read them (quant_method lower-cased), or one line saying what is wrong
    with them: from a folder's files or a hub id's config alike."""
    if not isinstance(saved, dict):
        raise UserError(f"{where}: quantization_config is not an object; the model's config is damaged")
    q = {**saved, "quant_method": str(saved.get("quant_method", default_method)).lower()}
    bits, group = q.get("bits"), q.get("group_size")
    if bits is not None and (isinstance(bits, bool) or not isinstance(bits, (int, float)) or not 0 < bits <= 16):
        raise UserError(f"{where}: the quantization's bits is {bits!r}, not a number between 1 and 16")
    if group is not None and (isinstance(group, bool) or not isinstance(group, int) or group == 0 or group < -1):
        raise UserError(f"{where}: the quantization's group_size is {group!r}, not -1 or a whole number above 0")
    return q


def describe(q: dict) -> str:
    """'gptq 4-bit, group 128' / 'exl3 4.0 bits per weight'."""
    method, bits = q["quant_method"], q.get("bits")
    if method in ("exl2", "exl3"):
        return f"{method} {bits} bits per weight" if bits else method
    group = q.get("group_size")
    size = f", group {group}" if group and group > 0 else (", one group per column" if group == -1 else "")
    return f"{method} {bits}-bit{size}" if bits else method


def weight_view(folder: Path, basename: str, q: dict) -> Path:
    """The folder as transformers expects it: NAME.safetensors (or the shards NAME.safetensors.index.json lists) seen
    as model.safetensors and the quantization in config.json. Made of symbolic links in a temporary folder; the files
    themselves are not copied or changed."""
    weights, index = folder / f"{basename}.safetensors", folder / f"{basename}.safetensors.index.json"
    if not weights.is_file() and not index.is_file():
        found = ", ".join(sorted({p.name.removesuffix(".index.json").removesuffix(".safetensors")
                                  for p in folder.glob("*.safetensors*") if not WEIGHT_SHARD.search(p.name)})) or "none"
        raise UserError(f"{folder} has no {basename}.safetensors (weight files there: {found}); pass the weight "
                        "file's name without .safetensors, e.g. --load_gptq=model")
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text())
    if basename == "model" and config.get("quantization_config"):
        return folder  # already what transformers reads
    check_weight_index(folder, basename)
    view = Path(tempfile.mkdtemp(prefix="quantchat-view-"))
    named = {"config.json", "model.safetensors", "model.safetensors.index.json", weights.name, index.name}
    for item in folder.iterdir():  # the shards an index names keep their own names
        if item.name not in named and (item.suffix != ".safetensors" or index.is_file()):
            os.symlink(item.resolve(), view / item.name)
    chosen = index if index.is_file() else weights
    os.symlink(chosen.resolve(), view / chosen.name.replace(basename, "model", 1))
    config["quantization_config"] = {k: v for k, v in q.items() if v is not None}
    (view / "config.json").write_text(json.dumps(config, indent=2))
    return view
