"""--save_dir: every finished answer appended to history.jsonl, one JSON record per line.

The folder is checked when the server starts, not after the first answer; a save that fails later (a full disk)
is logged and never costs the user the answer. A record always starts on a line of its own, so a line torn by a
power loss spoils only itself, and readers skip it.
"""
from __future__ import annotations

import json
import os
import sys
import threading
from collections.abc import Callable
from pathlib import Path

from .errors import UserError

FILE_NAME = "history.jsonl"


class History:
    def __init__(self, folder: str | Path, log: Callable[[str], None] | None = None):
        self.path = Path(folder).expanduser() / FILE_NAME
        self.log = log or (lambda text: print(text, file=sys.stderr))
        self._lock = threading.Lock()

    def check(self) -> None:
        """The folder can be made and the file appended to: one line saying what to do, now, if not."""
        folder = self.path.parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8"):
                pass
        except OSError as e:
            raise UserError(f"--save_dir={folder}: cannot write {FILE_NAME} there ({e.strerror or e}); choose a "
                            "folder you can write to") from None

    def append(self, record: dict) -> bool:
        """Add one record; False (and a logged line) when it could not be written."""
        line = json.dumps(record, ensure_ascii=False) + "\n"
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self._lock, open(self.path, "a+b") as f:
                if f.tell() and not _ends_with_newline(f):
                    line = "\n" + line  # the last record was torn: start this one on its own line
                f.write(line.encode("utf-8"))
            return True
        except OSError as e:
            self.log(f"warning: the answer was not saved to {self.path} ({e.strerror or e})")
            return False


def _ends_with_newline(f) -> bool:
    f.seek(-1, os.SEEK_END)
    return f.read(1) == b"\n"


def read(path: str | Path) -> list[dict]:
    """The records of a history.jsonl; a torn or damaged line is skipped."""
    records = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict):
                records.append(record)
    return records
