"""Terminal chat (--cli=True): streaming, multi-turn, /reset and /exit; Ctrl-C stops the current answer.

With documents Q&A each answer is followed by its sources, and /add PATH adds files (or a folder's files)
to the collection in use.
"""
from __future__ import annotations

import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

from .documents.passages import sources_lines
from .engine import ChatEngine
from .errors import UserError
from .tools import ToolCall

HELP = "Type a message and press Enter. /reset starts a new conversation, /exit quits, Ctrl-C stops an answer."
DOCS_HELP = " /add PATH adds a file or a folder's files to the documents."


def add_documents(library, mode: str, argument: str, out: TextIO) -> None:
    """/add PATH: a file, or every file under a folder."""
    from .documents.ingest import document_files
    path = Path(argument.strip()).expanduser()
    if not path.exists():
        out.write(f"error: {path}: no such file or folder\n")
        return
    files = document_files(path) if path.is_dir() else [path]
    names = [p.relative_to(path).as_posix() if path.is_dir() else p.name for p in files]
    report = library.add([str(p) for p in files], mode, names=names)
    for source, why in report.skipped:
        out.write(f"skipped {source}: {why}\n")
    out.write(f"({report.summary(mode)})\n")


def run_terminal(engine: ChatEngine, stream_output: bool = True, read: Callable[[str], str] | None = None,
                 out: TextIO | None = None, library=None) -> None:
    read = read or input        # looked up now, not when this module was imported
    out = out or sys.stdout
    history: list[dict] = []
    mode = library.default_mode if library else "LLM"
    documents = library.collection(mode) if library else None
    out.write(f"quantchat: {engine.model.info.model} ({engine.model.info.backend}). {HELP}"
              f"{DOCS_HELP if documents else ''}\n")
    if documents:
        out.write(f"answering from {mode} ({library.describe()})\n")
    while True:
        try:
            line = read("\n>>> ").strip()
        except (EOFError, KeyboardInterrupt):
            out.write("\n")
            return
        if not line:
            continue
        if line in ("/exit", "/quit"):
            return
        if line == "/reset":
            history.clear()
            out.write("(new conversation)\n")
            continue
        if line.startswith("/add"):
            if documents is None:
                out.write("documents Q&A is off: start with --user_path=DIR or --langchain_mode=MyData\n")
            else:
                add_documents(library, mode, line[4:], out)
            continue
        history.append({"role": "user", "content": line})
        cancel = threading.Event()
        reply = None
        try:
            reply = engine.chat(history, cancel=cancel, documents=documents)
            for note in reply.notices:
                out.write(f"({note})\n")
            for chunk in reply.events():
                if isinstance(chunk, ToolCall):  # shown, never run here
                    out.write(f"\n[{chunk.display()}]\n")
                elif stream_output:
                    out.write(chunk)
                    out.flush()
            if not stream_output:
                out.write(reply.text)
        except KeyboardInterrupt:
            cancel.set()
            if reply is None:  # before the answer began (passages being retrieved, the history fitted): no answer
                out.write("\n(cancelled)\n")
                history.pop()
                continue
            reply.finish()
        except UserError as e:
            out.write(f"error: {e}\n")
            history.pop()
            continue
        out.write(f"\n[{reply.stats.line()}]\n")
        if reply.sources:
            out.write("sources:\n" + "".join(f"  {line}\n" for line in sources_lines(reply.sources)))
        history.append({"role": "assistant", "content": reply.text})
