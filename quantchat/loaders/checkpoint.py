"""What a model folder holds: its quantization (read from small files only) and, for h2oGPT's --load_gptq=NAME and
--load_awq=NAME, a view of the folder in which NAME.safetensors is the weight file transformers looks for."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from ..errors import UserError


def quantization(folder: Path, config: dict) -> dict | None:
    """The checkpoint's quantization settings: config.json's quantization_config, or the quantize_config.json
    that AutoGPTQ-era folders keep beside it (quant_method gptq unless it says otherwise)."""
    saved = config.get("quantization_config")
    if saved:
        return {**saved, "quant_method": str(saved.get("quant_method", "")).lower()}
    legacy = folder / "quantize_config.json"
    if legacy.is_file():
        try:
            settings = json.loads(legacy.read_text())
        except ValueError:
            raise UserError(f"{legacy} cannot be read as JSON: the model folder is damaged or incomplete") from None
        return {**settings, "quant_method": str(settings.get("quant_method", "gptq")).lower()}
    return None


def describe(q: dict) -> str:
    """'gptq 4-bit, group 128' / 'exl3 4.0 bits per weight'."""
    method, bits = q["quant_method"], q.get("bits")
    if method in ("exl2", "exl3"):
        return f"{method} {bits} bits per weight" if bits else method
    group = q.get("group_size")
    size = f", group {group}" if group and group > 0 else (", one group per column" if group == -1 else "")
    return f"{method} {bits}-bit{size}" if bits else method


def weight_view(folder: Path, basename: str, q: dict) -> Path:
    """The folder as transformers expects it: NAME.safetensors seen as model.safetensors and the quantization in
    config.json. Made of symbolic links in a temporary folder; the files themselves are not copied or changed."""
    weights = folder / f"{basename}.safetensors"
    if not weights.is_file():
        found = ", ".join(sorted(p.stem for p in folder.glob("*.safetensors"))) or "none"
        raise UserError(f"{folder} has no {basename}.safetensors (weight files there: {found}); pass the weight "
                        "file's name without .safetensors, e.g. --load_gptq=model")
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text())
    if weights.name == "model.safetensors" and config.get("quantization_config"):
        return folder  # already what transformers reads
    view = Path(tempfile.mkdtemp(prefix="quantchat-view-"))
    for item in folder.iterdir():
        if item.suffix != ".safetensors" and item.name not in ("config.json", "model.safetensors.index.json"):
            os.symlink(item.resolve(), view / item.name)
    os.symlink(weights.resolve(), view / "model.safetensors")
    config["quantization_config"] = {k: v for k, v in q.items() if v is not None}
    (view / "config.json").write_text(json.dumps(config, indent=2))
    return view
