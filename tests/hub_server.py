"""A stand-in for the Hugging Face hub on 127.0.0.1: the few routes huggingface_hub uses to list a repository and
download a file (HEAD and ranged GET on /OWNER/REPO/resolve/REV/FILE), for download tests without a network.
Point huggingface_hub at it with HF_ENDPOINT. It can stall the first download of a file part-way (as a download
does that the user interrupts, or that dies with its machine), and it records every request."""
from __future__ import annotations

import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class StandInHub:
    def __init__(self, repos: dict[str, dict[str, Path]]):
        """repos: {"owner/name": {"file.gguf": path on disk}}."""
        self.repos = repos
        self.requests: list[tuple[str, str, str]] = []   # (method, path, Range header)
        self.stall_first_download_at: int | None = None  # bytes sent before the first GET of a file stalls
        self.stalled = threading.Event()                 # set once that GET has sent its bytes and stalls
        self._release = threading.Event()
        self._stall_done: set[str] = set()
        self._etags = {}
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_HEAD(self):
                hub._serve(self, body=False)

            def do_GET(self):
                hub._serve(self, body=True)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> StandInHub:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._release.set()
        self.server.shutdown()
        self.server.server_close()

    def downloads(self, name: str) -> list[str]:
        """The Range header of each GET of `name` ("" for a whole-file GET)."""
        return [r for m, p, r in self.requests if m == "GET" and p.endswith("/" + name)]

    def _etag(self, path: Path) -> str:
        if path not in self._etags:
            self._etags[path] = hashlib.sha256(path.read_bytes()).hexdigest()
        return self._etags[path]

    def _serve(self, h: BaseHTTPRequestHandler, body: bool) -> None:
        path = h.path.split("?")[0]
        self.requests.append((h.command, path, h.headers.get("Range", "")))
        tree = re.fullmatch(r"/api/models/([^/]+/[^/]+)/tree/([^/]+)(/.*)?", path)
        if tree and tree.group(1) in self.repos:
            files = self.repos[tree.group(1)]
            listing = [{"type": "file", "oid": hashlib.sha1(n.encode()).hexdigest(), "size": p.stat().st_size,
                        "path": n} for n, p in files.items()]
            return self._send(h, 200, json.dumps(listing).encode(), {"Content-Type": "application/json"}, body)
        resolve = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
        if not resolve or resolve.group(1) not in self.repos:
            return self._send(h, 404, b'{"error": "Repository not found"}',
                              {"Content-Type": "application/json", "X-Error-Code": "RepoNotFound"}, body)
        file = self.repos[resolve.group(1)].get(resolve.group(3))
        if file is None:
            return self._send(h, 404, b'{"error": "Entry not found"}',
                              {"Content-Type": "application/json", "X-Error-Code": "EntryNotFound"}, body)
        data = file.read_bytes()
        headers = {"X-Repo-Commit": COMMIT, "ETag": f'"{self._etag(file)}"', "Accept-Ranges": "bytes",
                   "Content-Type": "application/octet-stream"}
        start = 0
        match = re.fullmatch(r"bytes=(\d+)-", h.headers.get("Range", ""))
        if match and body:
            start = int(match.group(1))
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        status = 206 if start else 200
        if not body:
            headers["Content-Length"] = str(len(data))
            return self._send(h, status, b"", headers, body=False)
        if self.stall_first_download_at and not start and file.name not in self._stall_done:
            self._stall_done.add(file.name)
            headers["Content-Length"] = str(len(data))
            self._send(h, 200, data[:self.stall_first_download_at], headers, body=True, length_set=True)
            h.wfile.flush()
            self.stalled.set()
            self._release.wait(120)  # the rest never comes: the client is stopped meanwhile
            h.close_connection = True
            return
        self._send(h, status, data[start:], headers, body)

    @staticmethod
    def _send(h, status: int, payload: bytes, headers: dict, body: bool, length_set: bool = False) -> None:
        h.send_response(status)
        for k, v in headers.items():
            h.send_header(k, v)
        if not length_set and "Content-Length" not in headers:
            h.send_header("Content-Length", str(len(payload)))
        h.end_headers()
        if body:
            try:
                h.wfile.write(payload)
            except (BrokenPipeError, ConnectionResetError):
                pass
