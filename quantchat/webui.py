"""The web UI (Gradio): streaming chat, Stop, Regenerate, Undo, Clear, settings, model panel, timings;
with documents Q&A a collection picker, uploads with progress, and each answer's sources."""
from __future__ import annotations

import atexit
import hashlib
import json
import os
import shutil
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

import gradio as gr

from .auth import read_auth
from .documents.passages import sources_lines
from .engine import ChatEngine
from .errors import UserError
from .settings import LOOPBACK
from .tools import ToolCall

SETTINGS = ["max_new_tokens", "temperature", "top_p", "top_k", "repetition_penalty", "do_sample", "max_time"]


class Logins:
    """--auth's users for Gradio's login form: passwords compared in constant time, and after MAX_FAILURES wrong
    passwords for a name, that name is refused for a while (doubling, up to LOCK_MAX_S), so that passwords cannot be
    tried by the thousand."""
    MAX_FAILURES = 5
    LOCK_S, LOCK_MAX_S = 30.0, 900.0
    MAX_NAMES = 10_000   # failures remembered for at most this many names

    def __init__(self, pairs: list[tuple[str, str]], clock=None):
        import time
        self.passwords = dict(pairs)
        self.clock = clock or time.monotonic
        self.failures: dict[str, tuple[int, float]] = {}   # name -> (wrong passwords in a row, refused until)
        self._lock = threading.Lock()

    def __call__(self, username: str, password: str) -> bool:
        import hmac
        with self._lock:
            count, until = self.failures.get(username, (0, 0.0))
            if self.clock() < until:
                return False
            known = self.passwords.get(username)
            ok = hmac.compare_digest((known or "\0").encode(), str(password).encode()) and known is not None
            if ok:
                self.failures.pop(username, None)
                return True
            count += 1
            lock = min(self.LOCK_S * 2 ** (count - self.MAX_FAILURES), self.LOCK_MAX_S) \
                if count >= self.MAX_FAILURES else 0.0
            if len(self.failures) >= self.MAX_NAMES:
                self.failures.pop(next(iter(self.failures)))
            self.failures[username] = (count, self.clock() + lock)
            return False


class LoginRequired:
    """With --auth, Gradio leaves two routes open to requests without a login: the heartbeat (whose end runs the
    session's unload handler) and cancel. Here they answer 401 unless the request carries a login."""
    PATHS = ("/gradio_api/heartbeat/", "/gradio_api/cancel")

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith(self.PATHS):
            from starlette.requests import Request
            from starlette.responses import JSONResponse
            app, cookies = scope["app"], Request(scope).cookies
            token = cookies.get(f"access-token-{app.cookie_id}") or cookies.get(f"access-token-unsecure-{app.cookie_id}")
            if app.auth is not None and app.tokens.get(token) is None:
                await JSONResponse({"detail": "Not authenticated"}, status_code=401)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def exposure_warnings(server_name: str, share: bool, logins) -> list[str]:
    """Listening beyond loopback, or on a public link, without logins: say so."""
    warnings = []
    if server_name not in LOOPBACK and not logins:
        warnings.append(f"the web UI listens on {server_name} without --auth: anyone who reaches this machine "
                        "can use the model")
    if share and not logins:
        warnings.append("--share publishes the web UI on a public link without --auth")
    return warnings


def _display(history: list[dict]) -> list[dict]:
    """Chat messages for the Chatbot: each answer carries its sources and timing line below it."""
    shown = []
    for m in history:
        content = m["content"]
        if m.get("tool_calls"):  # shown, never run here
            content += "".join(f"\n\n🔧 `{line}`" for line in m["tool_calls"])
        if m.get("sources"):
            content += "\n\n**Sources**\n\n" + "\n".join(f"- {line}" for line in m["sources"])
        if m.get("stats"):
            content += f"\n\n<sub>{m['stats']}</sub>"
        shown.append({"role": m["role"], "content": content})
    return shown


class WebUI:
    """One chat column per engine (several with --model_lock); every message goes to each model in turn."""

    def __init__(self, engines: ChatEngine | list[ChatEngine], system_prompt: str = "", title: str = "quantchat",
                 h2ocolors: bool = True, library=None):
        self.engines = engines if isinstance(engines, list) else [engines]
        self.library = library  # documents Q&A (documents.library.Library), or None
        self.engine = self.engines[0]  # its defaults and limits set the sliders
        self.system_prompt = system_prompt
        self.title = title
        self.h2ocolors = h2ocolors
        self.cancels: dict[str, threading.Event] = {}
        self.logins: Logins | None = None   # set by launch() from --auth
        self.export_dir = Path(tempfile.mkdtemp(prefix="quantchat-exports-"))
        atexit.register(shutil.rmtree, self.export_dir, ignore_errors=True)

    # --- handlers (plain functions of their inputs, so tests can call them too); `chats` holds one
    # conversation per engine
    def answer(self, engine: ChatEngine, history: list[dict], system: str, settings: tuple, cancel: threading.Event,
               keep_on_error: bool, documents=None):
        """Stream one engine's answer to the last user message in `history`; yields (display, history).

        On an error the chat shows it, and the history goes back to what it was (keep_on_error: with the
        user's message, as for Regenerate; without it, as for a message that failed).
        """
        overrides = dict(zip(SETTINGS, settings, strict=True))
        for key in ("max_new_tokens", "top_k"):
            overrides[key] = int(overrides[key])
        messages = ([{"role": "system", "content": system}] if system.strip() else []) + \
                   [{"role": m["role"], "content": m["content"]} for m in history]
        answer = {"role": "assistant", "content": ""}
        try:
            reply = engine.chat(messages, engine.params(**overrides), cancel, documents)
            for chunk in reply.events():
                if isinstance(chunk, ToolCall):
                    answer["tool_calls"] = [*answer.get("tool_calls", []), chunk.display()]
                else:
                    answer["content"] += chunk
                yield _display([*history, answer]), [*history, answer]
        except UserError as e:
            yield _display([*history, {"role": "assistant", "content": f"⚠️ {e}"}]), \
                history if keep_on_error else history[:-1]
            return
        answer["stats"] = " · ".join([reply.stats.line(), *reply.notices])
        answer["sources"] = sources_lines(reply.sources)
        yield _display([*history, answer]), [*history, answer]

    def answer_all(self, chats: list[list[dict]], system: str, settings: tuple, mode: str, session: str,
                   keep_on_error: bool):
        """Each engine answers in turn; yields (display per engine ..., chats). Stop ends all of them."""
        cancel = self.cancels[session] = threading.Event()
        chats = [list(history) for history in chats]
        displays = [_display(history) for history in chats]
        try:
            documents = self.library.collection(mode, session) if self.library else None
        except UserError as e:
            gr.Warning(str(e))
            yield (*displays, chats)
            return
        for i, engine in enumerate(self.engines):
            if cancel.is_set():
                break
            for displays[i], chats[i] in self.answer(engine, chats[i], system, settings, cancel, keep_on_error,
                                                     documents):
                yield (*displays, [list(history) for history in chats])

    def send(self, message: str, chats: list[list[dict]], system: str, max_new_tokens, temperature, top_p, top_k,
             repetition_penalty, do_sample, max_time, mode: str = "LLM", request: gr.Request = None):
        settings = (max_new_tokens, temperature, top_p, top_k, repetition_penalty, do_sample, max_time)
        message = (message or "").strip()
        if not message:
            yield (*[_display(history) for history in chats], chats, "")
            return
        chats = [[*history, {"role": "user", "content": message}] for history in chats]
        for update in self.answer_all(chats, system, settings, mode, _session(request), keep_on_error=False):
            yield (*update, "")

    def regenerate(self, chats: list[list[dict]], system: str, max_new_tokens, temperature, top_p, top_k,
                   repetition_penalty, do_sample, max_time, mode: str = "LLM", request: gr.Request = None):
        settings = (max_new_tokens, temperature, top_p, top_k, repetition_penalty, do_sample, max_time)
        chats = [_without_answer(history) for history in chats]
        if not any(chats):
            yield (*[[] for _ in chats], chats)
            return
        yield from self.answer_all(chats, system, settings, mode, _session(request), keep_on_error=True)

    def add_documents(self, files: list[str] | None, mode: str, request: gr.Request = None,
                      progress=gr.Progress()):  # noqa: B008 (gradio injects progress through this default)
        """Uploads into the chosen collection (MyData when plain chat is chosen); yields (status, mode, files)."""
        session = _session(request)
        if not files:
            return self.library.describe(session), mode, None
        mode = mode if mode != "LLM" else "MyData"
        paths = [getattr(f, "name", f) for f in files]
        try:
            report = self.library.add(paths, mode, session,  # (each upload keeps its own file name)
                                      progress=lambda done, total, name: progress(
                                          done / max(total, 1), desc=f"reading {name}" if name else "done"))
        except UserError as e:
            gr.Warning(str(e))
            return self.library.describe(session), mode, None
        skipped = "".join(f"\n- skipped {source}: {why}" for source, why in report.skipped)
        return f"{report.summary(mode)}{skipped}\n\n{self.library.describe(session)}", mode, None

    def end_session(self, request: gr.Request = None) -> None:
        """A closed browser tab: its MyData uploads go."""
        if self.library and _signed_in(request, self.logins):
            self.library.store.drop_session(_session(request))

    def stop(self, request: gr.Request = None) -> None:
        if not _signed_in(request, self.logins):
            return
        event = self.cancels.get(_session(request))
        if event:
            event.set()

    def export_chat(self, chats: list[list[dict]], request: gr.Request = None) -> str:
        """The conversation (with the first model's answers) as a JSON file: [{"role", "content"}, ...]. One file
        per session, written over by its next export, in a folder removed when the UI closes (Gradio serves its own
        copy)."""
        key = hashlib.sha256(_session(request).encode("utf-8", "surrogatepass")).hexdigest()[:16]
        path = self.export_dir / f"chat-{key}.json"
        path.write_text(json.dumps([{"role": m["role"], "content": m["content"]} for m in chats[0]],
                                   ensure_ascii=False, indent=1), encoding="utf-8")
        return str(path)

    @staticmethod
    def import_chat(path: str, chats: list[list[dict]]):
        """A conversation exported before (or any JSON list of role/content messages) replaces every chat."""
        try:
            with open(path, encoding="utf-8") as f:
                loaded = json.load(f)
            messages = [{"role": str(m["role"]), "content": str(m["content"])} for m in loaded]
            if any(m["role"] not in ("user", "assistant") for m in messages):
                raise ValueError("roles must be user or assistant")
        except (OSError, ValueError, TypeError, KeyError, RecursionError) as e:
            gr.Warning(f"cannot import that file: {str(e)[:200] or type(e).__name__}")
            return (*[_display(history) for history in chats], chats)
        return (*[_display(messages) for _ in chats], [list(messages) for _ in chats])

    @staticmethod
    def undo(chats: list[list[dict]]):
        chats = [_without_answer(history)[:-1] if history else [] for history in chats]
        return (*[_display(history) for history in chats], chats)

    def model_panel(self) -> str:
        panels = []
        for i, engine in enumerate(self.engines):
            rows = "\n".join(f"| {k} | {v} |" for k, v in engine.model.info.summary())
            head = f"model {i + 1}" if len(self.engines) > 1 else "model"
            panels.append(f"| | {head} |\n|---|---|\n{rows}\n\nprompt format: {engine.prompter.source}")
        return "\n\n".join(panels)

    def build(self) -> gr.Blocks:
        p = self.engine.defaults
        limits = self.engine.limits
        several = len(self.engines) > 1
        # Gradio reports usage to its servers unless told not to: a local launcher keeps to itself unless the user
        # turns it on
        reports = os.environ.get("GRADIO_ANALYTICS_ENABLED", "False") == "True"
        with gr.Blocks(title=self.title, analytics_enabled=reports) as demo:
            gr.Markdown(f"## {self.title}")
            chats = gr.State([[] for _ in self.engines])
            with gr.Row():
                with gr.Column(scale=4):
                    with gr.Row():
                        chatbots = [gr.Chatbot(label=f"{i + 1}: {Path(e.model.info.model).name}" if several else "chat",
                                               height=520, elem_id="chat" if i == 0 else f"chat-{i + 1}")
                                    for i, e in enumerate(self.engines)]
                    message = gr.Textbox(placeholder="Ask anything; Enter sends", show_label=False, elem_id="message")
                    with gr.Row():
                        send = gr.Button("Send", variant="primary", elem_id="send")
                        stop = gr.Button("Stop", elem_id="stop")
                        regenerate = gr.Button("Regenerate", elem_id="regenerate")
                        undo = gr.Button("Undo", elem_id="undo")
                        clear = gr.Button("Clear", elem_id="clear")
                    with gr.Row():
                        export = gr.Button("Export chat", elem_id="export", size="sm")
                        upload = gr.UploadButton("Import chat", file_types=[".json"], elem_id="import", size="sm")
                    exported = gr.File(label="exported chat", visible=True, elem_id="exported")
                with gr.Column(scale=2):
                    with gr.Accordion("Model", open=True):
                        # (a function: each page load shows the current state, e.g. the fast path once warm)
                        gr.Markdown(self.model_panel, elem_id="model-panel")
                    mode = self._documents_panel() if self.library else gr.State("LLM")
                    with gr.Accordion("Settings", open=False, elem_id="settings"):
                        system = gr.Textbox(self.system_prompt, label="system prompt", lines=3)
                        controls = [
                            gr.Slider(1, limits.max_max_new_tokens, p.max_new_tokens, step=1, label="max new tokens",
                                      elem_id="max-new-tokens"),
                            gr.Slider(0, 2, p.temperature, step=0.01, label="temperature"),
                            gr.Slider(0.01, 1, p.top_p, step=0.01, label="top p"),
                            gr.Slider(0, 200, p.top_k, step=1, label="top k"),
                            gr.Slider(1, 2, p.repetition_penalty, step=0.01, label="repetition penalty"),
                            gr.Checkbox(p.do_sample, label="sample (off: greedy)"),
                            gr.Slider(1, limits.max_max_time, p.max_time, step=1, label="max time (s)"),
                        ]
            inputs = [message, chats, system, *controls, mode]
            shown = [*chatbots, chats]
            send.click(self.send, inputs, [*shown, message], api_name="send", concurrency_limit=None)
            message.submit(self.send, inputs, [*shown, message], api_name=False, concurrency_limit=None)
            regenerate.click(self.regenerate, [chats, system, *controls, mode], shown, api_name="regenerate",
                             concurrency_limit=None)
            # Stop sets this session's cancel event: the engine ends the answer at the next token, and the
            # answer keeps what it had, with its timing line (gradio's own cancelling would drop that last update)
            stop.click(self.stop, None, None, api_name="stop", concurrency_limit=None)
            undo.click(self.undo, [chats], shown, api_name="undo")
            clear.click(lambda: (*[[] for _ in self.engines], [[] for _ in self.engines]), None, shown,
                        api_name="clear")
            export.click(self.export_chat, [chats], [exported], api_name="export")
            upload.upload(self.import_chat, [upload, chats], shown, api_name="import")
            demo.unload(self.end_session)
        return demo

    def _documents_panel(self):
        """Collection picker, upload box and status; returns the picker (an input of every chat event)."""
        from .documents.readers import suffixes
        with gr.Accordion("Documents", open=True, elem_id="documents"):
            mode = gr.Radio(self.library.modes(), value=self.library.default_mode, label="answer from",
                            elem_id="collection")
            files = gr.File(file_count="multiple", file_types=suffixes(), label="add documents",
                            elem_id="doc-upload")
            status = gr.Markdown(self.library.describe(), elem_id="doc-status")
        files.upload(self.add_documents, [files, mode], [status, mode, files], api_name="add_documents",
                     concurrency_limit=None)
        return mode

    def launch(self, server_name: str, server_port: int, share: bool, auth: Any = None, block: bool = True):
        pairs = read_auth(auth)
        for warning in exposure_warnings(server_name, share, pairs):
            print(f"warning: {warning}", file=sys.stderr)
        self.logins = Logins(pairs) if pairs else None
        demo = self.build()
        demo.queue(default_concurrency_limit=None)
        try:
            from starlette.middleware import Middleware
            theme = gr.themes.Soft(primary_hue="yellow") if self.h2ocolors else gr.themes.Soft()
            demo.launch(server_name=server_name, server_port=server_port, share=share, auth=self.logins, theme=theme,
                        prevent_thread_lock=not block, show_error=True,
                        app_kwargs={"middleware": [Middleware(LoginRequired)]} if self.logins else None)
        except OSError as e:
            raise UserError(f"cannot listen on {server_name}:{server_port} ({e}): choose another --server_port") \
                from None
        return demo


def _without_answer(history: list[dict]) -> list[dict]:
    history = list(history)
    while history and history[-1]["role"] == "assistant":
        history.pop()
    return history


def _session(request) -> str:
    """A session's key: its login name and Gradio's session hash, whole (the client picks the hash: with logins,
    another user's hash alone does not reach that user's data)."""
    return f"{getattr(request, 'username', None) or ''}\0{getattr(request, 'session_hash', None) or 'default'}"


def _signed_in(request, logins) -> bool:
    """Without --auth anyone may act; with it, only a request that carries a login."""
    return logins is None or bool(getattr(request, "username", None))
