"""Terminal chat (--cli=True): streaming, multi-turn, /reset and /exit; Ctrl-C stops the current answer."""
from __future__ import annotations

import sys
import threading
from collections.abc import Callable
from typing import TextIO

from .engine import ChatEngine
from .errors import UserError

HELP = "Type a message and press Enter. /reset starts a new conversation, /exit quits, Ctrl-C stops an answer."


def run_terminal(engine: ChatEngine, stream_output: bool = True, read: Callable[[str], str] = input,
                 out: TextIO = sys.stdout) -> None:
    history: list[dict] = []
    out.write(f"quantchat: {engine.model.info.model} ({engine.model.info.backend}). {HELP}\n")
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
        history.append({"role": "user", "content": line})
        cancel = threading.Event()
        try:
            reply = engine.chat(history, cancel=cancel)
            for note in reply.notices:
                out.write(f"({note})\n")
            for chunk in reply:
                if stream_output:
                    out.write(chunk)
                    out.flush()
            if not stream_output:
                out.write(reply.text)
        except KeyboardInterrupt:
            cancel.set()
            reply.finish()
        except UserError as e:
            out.write(f"error: {e}\n")
            history.pop()
            continue
        out.write(f"\n[{reply.stats.line()}]\n")
        history.append({"role": "assistant", "content": reply.text})
