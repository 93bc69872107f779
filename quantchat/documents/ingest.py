"""Keep a collection in step with files: split each into passages, embed new or changed ones, drop deleted ones."""
from __future__ import annotations

import hashlib
import shutil
import textwrap
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UserError
from .passages import Passage
from .readers import Section, UnreadableDocument, read_document
from .store import Collection

Progress = Callable[[int, int, str], None]  # (files done, files in all, the file now)
SUPPORTED_TYPES = ".pdf .docx .html .csv .txt .md and source code"


@dataclass
class IngestReport:
    added: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    unchanged: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file, why)

    def summary(self, name: str) -> str:
        return (f"{name}: {len(self.added)} added, {len(self.updated)} updated, {len(self.removed)} removed, "
                f"{self.unchanged} unchanged, {len(self.skipped)} skipped")


def split_passages(sections: list[Section], source: str, chunk_size: int) -> list[Passage]:
    """Consecutive lines gathered into passages of at most chunk_size characters (longer lines are wrapped)."""
    passages = []
    for section in sections:
        lines: list[tuple[int, str]] = []  # (number, text) of the passage being gathered
        for number, text in section.lines:
            for piece in textwrap.wrap(text.strip(), chunk_size, break_on_hyphens=False):
                if lines and sum(len(t) + 1 for _, t in lines) + len(piece) > chunk_size:
                    passages.append(_passage(lines, source, section))
                    lines = []
                lines.append((number, piece))
        if lines:
            passages.append(_passage(lines, source, section))
    return passages


def _passage(lines: list[tuple[int, str]], source: str, section: Section) -> Passage:
    return Passage("\n".join(text for _, text in lines), source, section.unit, lines[0][0], lines[-1][0], section.page)


def document_files(folder: Path) -> list[Path]:
    """Every file under folder, hidden files and folders (.git ...) left out."""
    return sorted(p for p in folder.rglob("*")
                  if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def ingest_file(path: Path, source: str, collection: Collection, chunk_size: int, report: IngestReport,
                stored: dict[str, str]) -> None:
    """Embed one file under the name `source` unless the collection holds that content already."""
    try:
        sha = sha256_of(path)
        if stored.get(source) == sha:
            report.unchanged += 1
            return
        passages = split_passages(read_document(path), source, chunk_size)
    except (UnreadableDocument, OSError) as e:
        report.skipped.append((source, str(e)))
        if source in stored:  # the file changed into something unreadable: its old passages are stale
            collection.remove(source)
            report.removed.append(source)
        return
    collection.replace(source, sha, passages)
    (report.updated if source in stored else report.added).append(source)
    stored[source] = sha


def documents_folder(path: str | Path) -> Path:
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise UserError(f"--user_path={folder}: no such folder; create it and put your documents in it "
                        f"({SUPPORTED_TYPES})")
    return folder


def sync_folder(folder: str | Path, collection: Collection, chunk_size: int,
                progress: Progress | None = None) -> IngestReport:
    """Make the collection hold exactly the readable documents under folder (recursively)."""
    folder = documents_folder(folder)
    files = document_files(folder)
    stored = collection.files()
    report = IngestReport()
    for i, path in enumerate(files):
        if progress:
            progress(i, len(files), path.name)
        ingest_file(path, path.relative_to(folder).as_posix(), collection, chunk_size, report, stored)
    on_disk = {path.relative_to(folder).as_posix() for path in files}
    for source in sorted(set(stored) - on_disk):
        collection.remove(source)
        report.removed.append(source)
    if progress:
        progress(len(files), len(files), "")
    if not collection.count():
        raise UserError(f"--user_path={folder} holds no readable documents ({SUPPORTED_TYPES}): add some, or use "
                        "--langchain_mode=MyData and upload files in the web UI")
    return report


def safe_upload_name(name: str) -> str:
    """A relative name for an added file: no folder above it, nothing hidden, no absolute path."""
    parts = [part.strip() for part in name.replace("\\", "/").split("/") if part.strip() not in ("", ".")]
    if not parts or any(part == ".." or part.startswith(".") for part in parts):
        raise UnreadableDocument("a hidden file or a name that leaves its folder")
    return "/".join(parts)


def add_uploads(paths: list[str | Path], collection: Collection, chunk_size: int, copy_into: str | Path | None = None,
                progress: Progress | None = None, names: list[str] | None = None) -> IngestReport:
    """Files a user hands over (web UI uploads, /add in the terminal) go into the collection.

    With copy_into (UserData's folder) each file is first copied there, under a new name rather than over a
    different file, so that the folder stays the collection's source and a restart keeps it.
    """
    report = IngestReport()
    stored = collection.files()
    for i, path in enumerate(map(Path, paths)):
        given = names[i] if names else path.name
        if progress:
            progress(i, len(paths), given)
        try:
            name = safe_upload_name(given)
        except UnreadableDocument as e:
            report.skipped.append((given, str(e)))
            continue
        if copy_into is not None:
            target = _free_name(Path(copy_into), name, path)
            if not target.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, target)
            path, name = target, target.relative_to(copy_into).as_posix()
        ingest_file(path, name, collection, chunk_size, report, stored)
    if progress:
        progress(len(paths), len(paths), "")
    return report


def _free_name(folder: Path, name: str, content: Path) -> Path:
    """folder/name, or folder/name (2) ... when a different file already has that name (same content: the same)."""
    target, n, wanted = folder / name, 1, sha256_of(content)
    while target.exists() and sha256_of(target) != wanted:
        n += 1
        target = (folder / name).with_name(f"{Path(name).stem} ({n}){Path(name).suffix}")
    return target
