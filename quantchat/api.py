"""OpenAI-compatible HTTP API over the chat engine (--openai_server=True, port --openai_port).

POST /v1/chat/completions and /v1/completions (streamed as server-sent events, or not), GET /v1/models,
GET /health (503 while the model loads), GET /metrics (Prometheus). Errors have OpenAI's JSON shape.
It shares the engine, its queue and its cancel with the web UI: a client that disconnects mid-stream
stops its generation and frees its place. With documents Q&A, chat requests answer from UserData (or
"langchain_mode": "LLM" for plain chat) and the response carries "sources" (in the last chunk when streamed).
"""
from __future__ import annotations

import asyncio
import json
import os
import threading
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import ValidationError

from . import api_models
from .engine import ChatEngine, Reply
from .errors import UsageError, UserError
from .tools import ToolCall

MAX_BODY_BYTES = 4 * 2**20
R = TypeVar("R", bound=api_models.Request)
FINISH = {"eos": "stop", "stop": "stop", "cancelled": "stop", "length": "length", "time": "length"}


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.code = status, message, param, kind, code

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status)


def read_api_keys(value: str | None) -> list[str]:
    """--openai_api_key: one key, or a file with one key per line. A value that looks like a path must be a file:
    a mistyped path must not quietly become the key."""
    if not value:
        return []
    if _looks_like_a_path(value) and not os.path.isfile(value):
        raise UsageError(f"--openai_api_key={value}: no such file (a value with a / or a file suffix is read as a "
                         "file of keys): give the file's path, or the key itself")
    if os.path.isfile(value):
        with open(value, encoding="utf-8") as f:
            keys = [line.strip() for line in f if line.strip() and not line.startswith("#")]
        if not keys:
            raise UserError(f"--openai_api_key={value}: the file holds no keys")
        return keys
    return [value]


def _looks_like_a_path(value: str) -> bool:
    return "/" in value or "\\" in value or value.startswith(("~", ".")) or \
        value.lower().endswith((".txt", ".key", ".keys", ".json", ".env"))


class Metrics:
    def __init__(self, queue_depth, prefix_cache_bytes):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("quantchat_requests", "API requests", ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("quantchat_prompt_tokens", "prompt tokens processed", registry=r)
        self.reused_tokens = Counter("quantchat_prompt_tokens_reused", "prompt tokens continued from the cache, not "
                                     "evaluated again", registry=r)
        self.completion_tokens = Counter("quantchat_completion_tokens", "tokens generated", registry=r)
        self.guesses = Counter("quantchat_speculative_guesses", "guessed tokens checked (--speculative)", registry=r)
        self.guesses_kept = Counter("quantchat_speculative_guesses_kept", "guessed tokens kept", registry=r)
        self.guess_steps = Counter("quantchat_speculative_steps", "model steps that checked guesses", registry=r)
        self.resting = Counter("quantchat_speculative_resting_answers", "answers in which a draft model did not guess, "
                               "slower in the answers before", registry=r)
        self.errors = Counter("quantchat_errors", "requests that ended in an error", ["type"], registry=r)
        self.ttft = Histogram("quantchat_time_to_first_token_seconds", "time to first token", registry=r,
                              buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
        self.speed = Histogram("quantchat_decode_tokens_per_second", "decode speed per answer", registry=r,
                               buckets=(1, 5, 10, 25, 50, 100, 200, 400, 800, 1600))
        Gauge("quantchat_queue_depth", "requests waiting for the model", registry=r).set_function(queue_depth)
        Gauge("quantchat_prefix_cache_bytes", "memory held by saved conversation states for reuse (llama.cpp's, in "
              "host memory)", registry=r).set_function(prefix_cache_bytes)

    def answered(self, reply: Reply) -> None:
        s = reply.stats
        self.prompt_tokens.inc(s.prompt_tokens)
        self.reused_tokens.inc(s.reused_tokens or 0)
        self.completion_tokens.inc(s.completion_tokens)
        if s.speculation:
            self.guesses.inc(s.speculation.drafted)
            self.guesses_kept.inc(s.speculation.accepted)
            self.guess_steps.inc(s.speculation.steps)
            self.resting.inc(s.speculation.resting)
        if s.ttft_s is not None:
            self.ttft.observe(s.ttft_s)
        if s.tokens_per_s:
            self.speed.observe(s.tokens_per_s)


class OpenAIServer:
    """The API app. `ready(engine)` switches /health to 200 once the model has loaded."""

    def __init__(self, api_keys: list[str] | None = None):
        self.engine: ChatEngine | None = None
        self.library = None  # documents Q&A
        self.api_keys = set(api_keys or [])
        self.metrics = Metrics(lambda: self.engine.queue_depth if self.engine else 0, self._prefix_cache_bytes)
        self.app = self._build()

    def _prefix_cache_bytes(self) -> int:
        """The backend's saved conversation states, where it keeps any (llama.cpp)."""
        keeps = getattr(self.engine.model, "prefix_cache_bytes", None) if self.engine else None
        return keeps() if keeps else 0

    def ready(self, engine: ChatEngine, library=None) -> None:
        self.library = library
        self.engine = engine

    def _documents(self, mode):
        """The collection a chat request answers from: its langchain_mode, else the server's (MyData is the web UI's)."""
        if mode is None:
            mode = self.library.default_mode if self.library else "LLM"
            mode = "LLM" if mode == "MyData" else mode
        if mode in ("LLM", "Disabled"):
            return None
        if mode == "MyData":
            raise ApiError(400, "MyData holds a web UI session's uploads; the API answers from UserData or LLM",
                           param="langchain_mode")
        if self.library is None:
            raise ApiError(400, "documents Q&A is off on this server (start it with --user_path=DIR)",
                           param="langchain_mode")
        try:
            return self.library.collection(mode)
        except UserError as e:
            raise ApiError(400, str(e), param="langchain_mode") from None

    # --- request checking
    def _check_key(self, request: Request) -> None:
        if not self.api_keys:
            return
        header = request.headers.get("authorization", "")
        if not header.startswith("Bearer ") or header[7:].strip() not in self.api_keys:
            raise ApiError(401, "Incorrect API key provided.", kind="invalid_request_error", code="invalid_api_key")

    async def _request(self, request: Request, model: type[R]) -> R:
        """The body parsed and checked by its pydantic model; any failure is a 4xx naming the field. An oversized
        body is refused by its Content-Length, or as soon as it grows past the limit: never read whole."""
        too_large = ApiError(413, f"request body is larger than {MAX_BODY_BYTES // 2**20} MiB")
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
            raise too_large
        raw = bytearray()
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > MAX_BODY_BYTES:
                raise too_large
        try:
            body = json.loads(raw)
            json.dumps(body, ensure_ascii=False).encode("utf-8")  # text that is not Unicode: an unpaired surrogate
        except (ValueError, RecursionError):  # (UnicodeError is a ValueError)
            raise ApiError(400, "the request body is not valid JSON (or nests too deep, or holds text that is not "
                                "valid Unicode)") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        try:
            return model.model_validate(body)
        except ValidationError as e:
            raise _invalid(e) from None

    def _params(self, body: api_models.Request):
        try:
            return self.engine.params(**body.generation())
        except UserError as e:
            raise ApiError(400, str(e)) from None

    # --- the app
    def _build(self) -> FastAPI:
        # the schema says what the server offers: not to callers without a key, where a key is set
        app = FastAPI(title="quantchat OpenAI-compatible API", docs_url=None, redoc_url=None,
                      openapi_url=None if self.api_keys else "/openapi.json")

        @app.exception_handler(ApiError)
        async def api_error(request: Request, error: ApiError):
            self.metrics.errors.labels(error.kind).inc()
            self.metrics.requests.labels(request.url.path, str(error.status)).inc()
            return error.response()

        @app.get("/health")
        async def health():
            if self.engine is None:
                return JSONResponse({"status": "loading"}, status_code=503)
            status = {"status": "ok", "queue_depth": self.engine.queue_depth}
            # without a key anyone may ask: the model's name then, never its path on this machine
            return status if self.api_keys else {**status, "model": Path(self.engine.model.info.model).name}

        @app.get("/metrics")
        async def metrics():
            return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)

        @app.get("/v1/models")
        async def models(request: Request):
            self._check_key(request)
            engine = self._engine()
            info = engine.model.info
            return {"object": "list", "data": [{"id": info.model, "object": "model", "created": 0,
                                                "owned_by": "quantchat", "context_length": info.context_length}]}

        @app.post("/v1/chat/completions")
        async def chat(request: Request):
            return await self._complete(request, chat=True)

        @app.post("/v1/completions")
        async def completions(request: Request):
            return await self._complete(request, chat=False)

        return app

    def _engine(self) -> ChatEngine:
        if self.engine is None:
            raise ApiError(503, "the model is still loading; retry shortly", kind="server_error", code="loading")
        return self.engine

    async def _complete(self, request: Request, chat: bool):
        self._check_key(request)
        engine = self._engine()
        body = await self._request(request, api_models.ChatRequest if chat else api_models.CompletionRequest)
        params = self._params(body)
        cancel = threading.Event()
        documents = self._documents(body.langchain_mode) if chat else None
        try:  # rendering and fitting a long conversation takes time: off the event loop, so others are served
            if chat:
                reply = await asyncio.to_thread(engine.chat, [m.as_dict() for m in body.messages], params, cancel,
                                                documents, body.offered_tools(), body.answer_format())
            else:
                reply = await asyncio.to_thread(engine.complete, body.text(), params, cancel)
        except UserError as e:
            raise ApiError(400, str(e)) from None
        meta = {"id": ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24], "created": int(time.time()),
                "model": engine.model.info.model}
        sources = {"sources": [p.as_dict() for p in reply.sources]} if documents is not None else {}
        endpoint = request.url.path
        if body.stream:
            return StreamingResponse(self._events(reply, cancel, meta, chat, endpoint, sources),
                                     media_type="text/event-stream")
        try:
            text = await self._until_done_or_gone(request, reply, cancel)
        except UserError as e:
            raise ApiError(500, str(e), kind="server_error") from None
        finally:
            cancel.set()  # when this request task is cancelled (client gone), stop the generation
        self.metrics.answered(reply)
        self.metrics.requests.labels(endpoint, "200").inc()
        choice = {"index": 0, "finish_reason": _finish_reason(reply)}
        if chat:
            message = {"role": "assistant", "content": text}
            if reply.tool_calls:
                message.update(content=text or None, tool_calls=[c.as_openai() for c in reply.tool_calls])
            choice["message"] = message
        else:
            choice.update({"text": text, "logprobs": None})
        return {**meta, "object": "chat.completion" if chat else "text_completion", "choices": [choice],
                "usage": _usage(reply), **sources}

    @staticmethod
    async def _until_done_or_gone(request: Request, reply: Reply, cancel: threading.Event) -> str:
        """The whole answer of a non-streamed request; a client that hangs up meanwhile stops its generation."""
        answer = asyncio.ensure_future(asyncio.to_thread(reply.finish))
        while not answer.done():
            await asyncio.wait({answer}, timeout=0.25)
            if not answer.done() and await request.is_disconnected():
                cancel.set()
        return answer.result()

    async def _events(self, reply: Reply, cancel: threading.Event, meta: dict, chat: bool,
                      endpoint: str, sources: dict) -> AsyncIterator[str]:
        """Server-sent events; the generation runs in a thread and stops when the client goes away."""
        loop = asyncio.get_running_loop()
        chunks: asyncio.Queue = asyncio.Queue()

        def produce():
            try:
                for item in reply.events():
                    loop.call_soon_threadsafe(chunks.put_nowait, ("text", item))
                loop.call_soon_threadsafe(chunks.put_nowait, ("end", None))
            except Exception as e:  # delivered to the client as an error event
                loop.call_soon_threadsafe(chunks.put_nowait, ("error", e))

        obj = "chat.completion.chunk" if chat else "text_completion"

        def event(delta: dict | None, finish: str | None = None, **extra: Any) -> str:
            choice = {"index": 0, "finish_reason": finish}
            if chat:
                choice["delta"] = delta or {}
            else:
                choice.update({"text": (delta or {}).get("content", ""), "logprobs": None})
            return "data: " + json.dumps({**meta, "object": obj, "choices": [choice], **extra}) + "\n\n"

        threading.Thread(target=produce, name="api-stream", daemon=True).start()
        calls = 0  # tool calls sent so far
        try:
            if chat:
                yield event({"role": "assistant", "content": ""})
            while True:
                kind, value = await chunks.get()
                if kind == "text" and isinstance(value, ToolCall):  # OpenAI's shape: the call, then its arguments
                    index, calls = calls, calls + 1
                    yield event({"tool_calls": [{"index": index, "id": value.id, "type": "function",
                                                 "function": {"name": value.name, "arguments": ""}}]})
                    yield event({"tool_calls": [{"index": index, "function": {"arguments": value.arguments}}]})
                elif kind == "text":
                    if value:
                        yield event({"content": value})
                elif kind == "error":
                    self.metrics.errors.labels("server_error").inc()
                    yield "data: " + json.dumps({"error": {"message": str(value), "type": "server_error"}}) + "\n\n"
                    break
                else:
                    self.metrics.answered(reply)
                    self.metrics.requests.labels(endpoint, "200").inc()
                    yield event(None, _finish_reason(reply), usage=_usage(reply), **sources)
                    break
            yield "data: [DONE]\n\n"
        finally:
            cancel.set()  # a client that disconnected: stop generating and free the model


def _invalid(error: ValidationError) -> ApiError:
    """The first problem pydantic found, as OpenAI words it: the field is the error's param."""
    first = error.errors()[0]
    param = str(first["loc"][0]) if first["loc"] else None
    cause = (first.get("ctx") or {}).get("error")
    if isinstance(cause, api_models.Unsupported):
        return ApiError(400, str(cause), param=cause.param or param)
    if first["type"] == "extra_forbidden":
        return ApiError(400, f"unsupported parameter: {param}", param=param)
    if param == "messages" and first["type"] == "too_long":
        return ApiError(400, f"at most {api_models.MAX_MESSAGES} messages per request", param=param)
    if param == "messages":
        return ApiError(400, "messages must be a non-empty list of {role: system, user or assistant; content: text}",
                        param=param)
    return ApiError(400, f"{param}: {first['msg']}", param=param)


def _finish_reason(reply: Reply) -> str:
    if reply.tool_calls and reply.stats.finish_reason in ("eos", "stop"):
        return "tool_calls"
    return FINISH.get(reply.stats.finish_reason, "stop")


def _usage(reply: Reply) -> dict:
    s = reply.stats
    return {"prompt_tokens": s.prompt_tokens, "completion_tokens": s.completion_tokens,
            "total_tokens": s.prompt_tokens + s.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": s.reused_tokens or 0}}  # (OpenAI's name for reused tokens)


def serve(server: OpenAIServer, host: str, port: int) -> threading.Thread:
    """Run the API with uvicorn in a background thread; raise UserError if it cannot listen."""
    import uvicorn
    config = uvicorn.Config(server.app, host=host, port=port, log_level="warning", access_log=False)
    web = uvicorn.Server(config)
    thread = threading.Thread(target=web.run, name="openai-api", daemon=True)
    thread.start()
    while not web.started:
        if not thread.is_alive():
            raise UserError(f"the API cannot listen on {host}:{port}: choose another --openai_port")
        time.sleep(0.02)
    server.uvicorn = web
    return thread
