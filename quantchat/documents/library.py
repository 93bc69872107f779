"""What the front ends ask of documents Q&A: which collections there are, the one a chat uses, adding files."""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError
from .ingest import IngestReport, Progress, add_uploads, documents_folder, sync_folder
from .store import MY_DATA, USER_DATA, Collection, DocumentStore, Embedder

LLM = "LLM"


@dataclass
class Library:
    store: DocumentStore
    default_mode: str              # the collection a new chat uses: LLM, UserData or MyData
    user_path: Path | None         # UserData's folder, kept in step at start; None: UserData is the database alone
    chunk_size: int = 512

    @property
    def user_data(self) -> bool:
        """UserData is on offer: with its folder, or asked for by name (h2oGPT: the persistent collection)."""
        return self.user_path is not None or self.default_mode == USER_DATA

    def modes(self) -> list[str]:
        return [LLM, *([USER_DATA] if self.user_data else []), MY_DATA]

    def collection(self, mode: str | None, session: str = "default") -> Collection | None:
        """The collection behind a langchain_mode (None for plain chat)."""
        mode = mode or LLM
        if mode == LLM:
            return None
        if mode == USER_DATA and self.user_data:
            return self.store.user_data
        if mode == MY_DATA:
            return self.store.my_data(session)
        raise UserError(f"langchain_mode {mode!r} is not available here; choose one of {', '.join(self.modes())}")

    def sync(self, progress: Progress | None = None) -> IngestReport:
        """Bring UserData in step with its folder (new and changed files embedded, deleted ones dropped)."""
        return sync_folder(self.user_path, self.store.user_data, self.chunk_size, progress)

    def add(self, paths: list[str], mode: str, session: str = "default", progress: Progress | None = None,
            names: list[str] | None = None) -> IngestReport:
        """Uploaded files into a collection; into UserData they are copied into its folder first (without one, the
        database keeps their passages)."""
        if mode == LLM:
            raise UserError("choose a collection (UserData or MyData) to add documents to")
        collection = self.collection(mode, session)
        copy_into = self.user_path if mode == USER_DATA else None
        return add_uploads(paths, collection, self.chunk_size, copy_into, progress, names)

    def describe(self, session: str = "default") -> str:
        """'UserData: 12 files, 340 passages · MyData: empty' for the UI."""
        parts = []
        for mode in self.modes()[1:]:
            collection = self.collection(mode, session)
            files, passages = len(collection.files()), collection.count()
            parts.append(f"{mode}: {files} file{'s' * (files != 1)}, {passages} passages" if passages else f"{mode}: empty")
        return " · ".join(parts)


def open_library(langchain_mode: str, user_path: str | None, persist_directory: str, embedding_model: str | None,
                 chunk_size: int) -> Library:
    """The document store, UserData brought up to date with its folder (with a progress bar)."""
    folder = documents_folder(user_path) if user_path else None  # checked before the embedding model loads
    library = Library(DocumentStore(persist_directory, Embedder(embedding_model)), langchain_mode, folder, chunk_size)
    if folder is not None:
        report = library.sync(_progress_bar())
        for source, why in report.skipped:
            print(f"skipped {source}: {why}", file=sys.stderr)
        print(f"documents: {report.summary(USER_DATA)} ({library.describe()}) in {persist_directory}", file=sys.stderr)
    elif library.user_data:  # h2oGPT's UserData without --user_path: the database as it was left
        empty = not library.store.user_data.count()
        print(f"documents: UserData from {persist_directory} ({library.describe()})" +
              (": add documents by uploading them in the web UI, with /add PATH in the terminal, or start with "
               "--user_path=DIR" if empty else ""), file=sys.stderr)
    return library


def _progress_bar() -> Progress:
    from tqdm import tqdm
    bar = None

    def update(done: int, total: int, name: str) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, desc="reading documents", unit="file", file=sys.stderr, leave=False)
        bar.n = done
        bar.set_postfix_str(name, refresh=True)
        if done == total:
            bar.close()
    return update
