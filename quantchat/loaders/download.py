"""GGUF files named by a Hugging Face repository or a URL, fetched into --llamacpp_path.

Forms, as h2oGPT and llama.cpp's server write them:
  --base_model=OWNER/REPO-GGUF            the repository's Q4_K_M file (a repository whose name ends in GGUF)
  --base_model=OWNER/REPO:Q5_K_M          the file of that quantization;  OWNER/REPO:NAME.gguf  that file
  --model_path_llama=https://huggingface.co/OWNER/REPO/resolve/main/FILE.gguf   (also as --base_model)
  --base_model=llama                      h2oGPT's default file (H2OGPT_DEFAULT_LLAMA)
  any other http(s) URL of a .gguf file

huggingface_hub does the talking to the hub: it honours HF_ENDPOINT (a mirror), HF_HUB_OFFLINE and the user's token,
and shows a progress bar. The file is written under NAME.incomplete beside its final name, so that a start after an
interrupted download resumes it (huggingface_hub's own hf_hub_download starts over under a new temporary name), and a
file fetched before is not asked for again (a record beside the files says which repository each came from). A file of a
repository split into shards (NAME-00001-of-00003.gguf) comes with all its shards; llama.cpp opens the first.
"""
from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

from ..errors import UserError, missing_package

DEFAULT_QUANT = "Q4_K_M"
# h2oGPT's model_path_llama default, used by --base_model=llama without --model_path_llama
H2OGPT_DEFAULT_LLAMA = ("https://huggingface.co/TheBloke/Llama-2-7b-Chat-GGUF/resolve/main/"
                        "llama-2-7b-chat.Q6_K.gguf?download=true")
HUB_HOSTS = ("huggingface.co", "hf.co")
SHARD = re.compile(r"-(\d{5})-of-(\d{5})\.gguf$", re.I)


@dataclass(frozen=True)
class RemoteGGUF:
    """A GGUF file to fetch: from a hub repository (repo set) or from a plain URL (url set)."""
    repo: str = ""
    revision: str = "main"
    filename: str = ""           # "" for a repository: chosen from its files by `quant`
    quant: str = DEFAULT_QUANT
    url: str = ""

    def describe(self) -> str:
        if self.url:
            return self.url
        return f"{self.repo}" + (f"/{self.filename}" if self.filename else f" ({self.quant})")


def parse(name: str, revision: str | None = None) -> RemoteGGUF | None:
    """The remote GGUF that `name` (--base_model or --model_path_llama) names; None for anything else."""
    if re.match(r"https?://", name):
        url = urlparse(name)
        parts = [unquote(p) for p in url.path.strip("/").split("/")]
        if url.hostname in HUB_HOSTS and len(parts) >= 5 and parts[2] == "resolve":
            return RemoteGGUF(repo=f"{parts[0]}/{parts[1]}", revision=parts[3], filename="/".join(parts[4:]))
        if not url.path.lower().endswith(".gguf"):
            raise UserError(f"{name} does not name a .gguf file: give the URL of a GGUF file, a hub repository "
                            "(OWNER/REPO-GGUF) or a local path")
        return RemoteGGUF(url=name)
    match = re.fullmatch(r"([A-Za-z0-9][\w.-]*/[\w.-]+?)(?::([\w.-]+))?", name)
    if not match or name.startswith((".", "~")):
        return None
    repo, tag = match.groups()
    if tag is None and not repo.lower().endswith("gguf"):
        return None
    if tag and tag.lower().endswith(".gguf"):
        return RemoteGGUF(repo=repo, revision=revision or "main", filename=tag)
    return RemoteGGUF(repo=repo, revision=revision or "main", quant=tag or DEFAULT_QUANT)


def _hub():
    try:
        import huggingface_hub
    except ImportError:
        raise missing_package("huggingface_hub", "llamacpp", "downloading a GGUF file") from None
    return huggingface_hub


def _offline() -> bool:
    from huggingface_hub import constants
    return bool(constants.HF_HUB_OFFLINE)


def _explain(error: Exception, what: str, folder: Path) -> UserError:
    """One line for a failed look-up or download, saying what to do."""
    from huggingface_hub import errors
    if isinstance(error, (errors.OfflineModeIsEnabled, errors.LocalEntryNotFoundError)) or _offline():
        return UserError(f"cannot download {what}: offline (HF_HUB_OFFLINE=1 or no network); download the file into "
                         f"{folder}/ yourself, or pass a local .gguf path")
    if isinstance(error, errors.RepositoryNotFoundError):
        return UserError(f"{what}: no such repository on the hub (or it is private: log in with  hf auth login)")
    if isinstance(error, errors.RevisionNotFoundError):
        return UserError(f"{what}: no such revision (--revision)")
    if isinstance(error, errors.EntryNotFoundError):
        return UserError(f"{what}: the repository has no such file")
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return UserError(f"cannot download {what}: {first} (check the network, or HF_ENDPOINT for a mirror)")


def _matches_quant(filename: str, quant: str) -> bool:
    return re.search(rf"(^|[._\-/]){re.escape(quant)}([._\-]|$)", Path(filename).name, re.I) is not None


def _choose(remote: RemoteGGUF, files: list[str]) -> list[str]:
    """The repository's file(s) for the request: one file, or every shard of a split one."""
    ggufs = sorted(f for f in files if f.lower().endswith(".gguf"))
    if remote.filename:
        chosen = [remote.filename] if remote.filename in ggufs else []
        if not chosen:
            raise UserError(f"{remote.repo} has no file {remote.filename}; its GGUF files: "
                            f"{', '.join(ggufs) or 'none'}")
    else:
        chosen = [f for f in ggufs if _matches_quant(f, remote.quant)]
        if not chosen:
            quants = sorted({m.group(0).strip("._-") for f in ggufs
                             if (m := re.search(r"[._-](I?Q\d\w*|F16|BF16|F32)(?=[._-])", Path(f).name, re.I))})
            raise UserError(f"{remote.repo} has no {remote.quant} GGUF file; choose one of "
                            f"{', '.join(quants) or ', '.join(ggufs) or 'none'} as {remote.repo}:QUANT")
    stems = {SHARD.sub("", f) for f in chosen}
    if len(stems) > 1:
        raise UserError(f"{remote.repo} has several {remote.quant} files ({', '.join(chosen)}): name one as "
                        f"{remote.repo}:FILE.gguf")
    return chosen


SOURCES = ".quantchat-sources"  # beside the downloads: which repository and quantization each file came from


def _source_key(remote: RemoteGGUF) -> str:
    return f"{remote.repo}@{remote.revision}:{remote.filename or remote.quant}"


def _local_match(remote: RemoteGGUF, folder: Path) -> list[str]:
    """The file(s) fetched from this repository earlier, all still there (as recorded beside the downloads)."""
    record = folder / SOURCES
    if not record.is_file():
        return []
    for line in record.read_text().splitlines():
        wanted, _, files = line.partition("\t")
        if wanted == _source_key(remote) and all((folder / f).is_file() for f in files.split(",")):
            return files.split(",")
    return []


def _remember(remote: RemoteGGUF, folder: Path, files: list[str]) -> None:
    key, record = _source_key(remote), folder / SOURCES
    lines = [line for line in (record.read_text().splitlines() if record.is_file() else [])
             if not line.startswith(key + "\t")]
    record.write_text("\n".join([*lines, f"{key}\t{','.join(files)}"]) + "\n")


@dataclass(frozen=True)
class Fetch:
    """What fetch() found or would do: the local file llama.cpp opens, and what a download costs."""
    path: str                    # the first (or only) file; a dry run offline: the repository and quantization
    source: str                  # the repository and file, or the URL
    bytes_to_download: int | None  # 0: all there; None: unknown (offline, or the server did not say)
    folder: str = ""

    def note(self) -> str:
        size = "size unknown" if self.bytes_to_download is None else f"{self.bytes_to_download / 2**30:.2f} GiB"
        return f"would download {self.source} ({size}) into {self.folder}/"


def fetch(remote: RemoteGGUF, llamacpp_path: str, dry_run: bool = False) -> Fetch:
    """Download the file(s) into llamacpp_path (progress on stderr; an interrupted download resumes; a file that is
    there already is not downloaded again). dry_run: only say what would be downloaded."""
    folder = Path(llamacpp_path).expanduser()
    if remote.url:
        return _fetch_url(remote.url, folder, dry_run)
    hub = _hub()
    files = _local_match(remote, folder)
    fetched_before = bool(files)  # then every file is there: nothing to ask the hub
    if not files:
        try:
            listing = hub.list_repo_files(remote.repo, revision=remote.revision) if not remote.filename else \
                [remote.filename]
        except Exception as e:  # offline, not found, refused: one line each
            if dry_run and _offline():  # the plan can still say what would be fetched
                return Fetch(remote.describe(), f"the {remote.quant} file of {remote.repo}", None, str(folder))
            raise _explain(e, remote.describe(), folder) from None
        files = _choose(remote, listing)
    source = f"{remote.repo}/{files[0]}" + (f" and {len(files) - 1} more shards" if len(files) > 1 else "")
    if fetched_before:
        return Fetch(str(folder / files[0]), source, 0, str(folder))
    if dry_run:
        return Fetch(str(folder / files[0]), source, _bytes_to_download(hub, remote, files, folder), str(folder))
    folder.mkdir(parents=True, exist_ok=True)
    for name in files:
        if (folder / name).is_file() and _offline():
            continue
        try:
            _download(hub.hf_hub_url(remote.repo, name, revision=remote.revision), folder / name,
                      f"{remote.repo}/{name}")
        except UserError:
            raise
        except Exception as e:
            raise _explain(e, f"{remote.repo}/{name}", folder) from None
    _remember(remote, folder, files)
    return Fetch(str(folder / files[0]), source, 0, str(folder))


def _partial(target: Path) -> Path:
    """Where a download in progress is kept, under a name that a later start finds again and resumes."""
    return target.with_name(target.name + ".incomplete")


def _bytes_to_download(hub, remote: RemoteGGUF, files: list[str], folder: Path) -> int | None:
    total = 0
    for name in files:
        target = folder / name
        if target.is_file() and _offline():
            continue
        try:
            size = hub.get_hf_file_metadata(hub.hf_hub_url(remote.repo, name, revision=remote.revision)).size
        except Exception:
            return None  # the plan still prints; the download itself will say what is wrong
        if size is None:
            return None
        if not (target.is_file() and target.stat().st_size == size):
            total += size - (_partial(target).stat().st_size if _partial(target).is_file() else 0)
    return total


def _download(url: str, target: Path, shown: str) -> None:
    """One file from the hub, resumed from what an interrupted start left (huggingface_hub's own hf_hub_download
    starts over under a new temporary name), with huggingface_hub's progress bar, headers, token and retries."""
    from huggingface_hub import get_hf_file_metadata
    metadata = get_hf_file_metadata(url)
    if target.is_file() and target.stat().st_size == metadata.size:
        return
    _resume_into(metadata.location, target, shown, metadata.size)


def _resume_into(url: str, target: Path, shown: str, size: int | None = None) -> None:
    """Download `url` to `target` through NAME.incomplete, continuing from what an earlier start left there, with
    huggingface_hub's progress bar and retries; `size`, where known, is checked."""
    from huggingface_hub import file_download
    partial = _partial(target)
    if partial.is_file() and size is not None and partial.stat().st_size > size:
        partial.unlink()  # not the beginning of this file
    print(f"downloading {shown} into {target.parent}/", file=sys.stderr)
    with open(partial, "ab") as f:
        file_download.http_get(url, f, resume_size=f.tell(), expected_size=size, displayed_filename=target.name)
    if size is not None and partial.stat().st_size != size:
        raise UserError(f"the download of {shown} ended early ({partial.stat().st_size} of {size} bytes): "
                        "start again to resume it")
    partial.rename(target)


def _fetch_url(url: str, folder: Path, dry_run: bool) -> Fetch:
    """A .gguf at a plain URL, through huggingface_hub's resuming HTTP download (no hub metadata)."""
    target = folder / Path(unquote(urlparse(url).path)).name
    if target.is_file():
        return Fetch(str(target), url, 0, str(folder))
    if dry_run:
        return Fetch(str(target), url, None, str(folder))
    if _offline():
        raise _explain(RuntimeError("offline"), url, folder)
    folder.mkdir(parents=True, exist_ok=True)
    try:
        _resume_into(url, target, url)
    except UserError:
        raise
    except Exception as e:
        raise _explain(e, url, folder) from None
    return Fetch(str(target), url, 0, str(folder))
