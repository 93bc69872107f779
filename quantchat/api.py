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
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from .engine import ChatEngine, Reply
from .errors import UserError

MAX_BODY_BYTES = 4 * 2**20
COMMON = {"model", "max_tokens", "temperature", "top_p", "stop", "seed", "n", "stream", "stream_options", "user",
          "top_k", "repetition_penalty", "frequency_penalty", "presence_penalty", "logprobs"}
CHAT_ONLY = {"messages", "max_completion_tokens", "response_format", "tools", "tool_choice", "functions",
             "function_call", "top_logprobs", "parallel_tool_calls", "langchain_mode"}
COMPLETION_ONLY = {"prompt", "echo", "best_of", "suffix"}
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
    """--openai_api_key: one key, or a file with one key per line."""
    if not value:
        return []
    if os.path.isfile(value):
        with open(value, encoding="utf-8") as f:
            keys = [line.strip() for line in f if line.strip() and not line.startswith("#")]
        if not keys:
            raise UserError(f"--openai_api_key={value}: the file holds no keys")
        return keys
    return [value]


class Metrics:
    def __init__(self, queue_depth):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("quantchat_requests", "API requests", ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("quantchat_prompt_tokens", "prompt tokens processed", registry=r)
        self.completion_tokens = Counter("quantchat_completion_tokens", "tokens generated", registry=r)
        self.errors = Counter("quantchat_errors", "requests that ended in an error", ["type"], registry=r)
        self.ttft = Histogram("quantchat_time_to_first_token_seconds", "time to first token", registry=r,
                              buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
        self.speed = Histogram("quantchat_decode_tokens_per_second", "decode speed per answer", registry=r,
                               buckets=(1, 5, 10, 25, 50, 100, 200, 400, 800, 1600))
        Gauge("quantchat_queue_depth", "requests waiting for the model", registry=r).set_function(queue_depth)

    def answered(self, reply: Reply) -> None:
        s = reply.stats
        self.prompt_tokens.inc(s.prompt_tokens)
        self.completion_tokens.inc(s.completion_tokens)
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
        self.metrics = Metrics(lambda: self.engine.queue_depth if self.engine else 0)
        self.app = self._build()

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

    async def _body(self, request: Request) -> dict:
        raw = await request.body()
        if len(raw) > MAX_BODY_BYTES:
            raise ApiError(413, f"request body is larger than {MAX_BODY_BYTES // 2**20} MiB")
        try:
            body = json.loads(raw)
        except ValueError:
            raise ApiError(400, "the request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        return body

    def _params(self, body: dict, allowed: set[str]):
        unknown = sorted(set(body) - allowed)
        if unknown:
            raise ApiError(400, f"unsupported parameter: {unknown[0]}", param=unknown[0])
        if body.get("n", 1) != 1:
            raise ApiError(400, "only n=1 is supported", param="n")
        for name in ("frequency_penalty", "presence_penalty"):
            if body.get(name):
                raise ApiError(400, f"{name} is not supported; use repetition_penalty", param=name)
        for name in ("logprobs", "echo", "tools", "functions", "suffix"):
            if body.get(name):
                raise ApiError(400, f"{name} is not supported", param=name)
        if body.get("best_of", 1) != 1:
            raise ApiError(400, "only best_of=1 is supported", param="best_of")
        if (body.get("response_format") or {"type": "text"}).get("type") != "text":
            raise ApiError(400, "only response_format type 'text' is supported", param="response_format")
        stop = body.get("stop") or []
        stop = [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop) or len(stop) > 16:
            raise ApiError(400, "stop must be a string or a list of at most 16 strings", param="stop")
        length = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
        temperature = _number(body, "temperature", float)
        overrides = {"max_new_tokens": _number(body, length, int), "temperature": temperature,
                     "top_p": _number(body, "top_p", float), "top_k": _number(body, "top_k", int),
                     "repetition_penalty": _number(body, "repetition_penalty", float),
                     "seed": _number(body, "seed", int), "stop": stop,
                     "do_sample": None if temperature is None else temperature > 0}
        try:
            return self.engine.params(**overrides)
        except UserError as e:
            raise ApiError(400, str(e)) from None

    @staticmethod
    def _messages(body: dict) -> list[dict]:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ApiError(400, "messages must be a non-empty list", param="messages")
        out = []
        for m in messages:
            if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant", "developer"):
                raise ApiError(400, "each message needs a role: system, user or assistant", param="messages")
            content = m.get("content")
            if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
                if not all(isinstance(p, dict) and p.get("type") == "text" for p in content):
                    raise ApiError(400, "only text content is supported", param="messages")
                content = "".join(p.get("text", "") for p in content)
            if not isinstance(content, str):
                raise ApiError(400, "message content must be text", param="messages")
            out.append({"role": "system" if m["role"] == "developer" else m["role"], "content": content})
        return out

    # --- the app
    def _build(self) -> FastAPI:
        app = FastAPI(title="quantchat OpenAI-compatible API", docs_url=None, redoc_url=None)

        @app.exception_handler(ApiError)
        async def api_error(request: Request, error: ApiError):
            self.metrics.errors.labels(error.kind).inc()
            self.metrics.requests.labels(request.url.path, str(error.status)).inc()
            return error.response()

        @app.get("/health")
        async def health():
            if self.engine is None:
                return JSONResponse({"status": "loading"}, status_code=503)
            return {"status": "ok", "model": self.engine.model.info.model, "queue_depth": self.engine.queue_depth}

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
        body = await self._body(request)
        params = self._params(body, COMMON | (CHAT_ONLY if chat else COMPLETION_ONLY))
        cancel = threading.Event()
        documents = self._documents(body.get("langchain_mode")) if chat else None
        try:
            if chat:
                reply = engine.chat(self._messages(body), params, cancel, documents)
            else:
                prompt = body.get("prompt")
                if isinstance(prompt, list) and len(prompt) == 1:
                    prompt = prompt[0]
                if not isinstance(prompt, str) or not prompt:
                    raise ApiError(400, "prompt must be a non-empty string", param="prompt")
                reply = engine.complete(prompt, params, cancel)
        except UserError as e:
            raise ApiError(400, str(e)) from None
        meta = {"id": ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24], "created": int(time.time()),
                "model": engine.model.info.model}
        sources = {"sources": [p.as_dict() for p in reply.sources]} if documents is not None else {}
        endpoint = request.url.path
        if body.get("stream"):
            return StreamingResponse(self._events(reply, cancel, meta, chat, endpoint, sources),
                                     media_type="text/event-stream")
        try:
            text = await asyncio.to_thread(reply.finish)
        except UserError as e:
            raise ApiError(500, str(e), kind="server_error") from None
        finally:
            cancel.set()  # when this request task is cancelled (client gone), stop the generation
        self.metrics.answered(reply)
        self.metrics.requests.labels(endpoint, "200").inc()
        choice = {"index": 0, "finish_reason": FINISH.get(reply.stats.finish_reason, "stop")}
        choice.update({"message": {"role": "assistant", "content": text}} if chat else {"text": text, "logprobs": None})
        return {**meta, "object": "chat.completion" if chat else "text_completion", "choices": [choice],
                "usage": _usage(reply), **sources}

    async def _events(self, reply: Reply, cancel: threading.Event, meta: dict, chat: bool,
                      endpoint: str, sources: dict) -> AsyncIterator[str]:
        """Server-sent events; the generation runs in a thread and stops when the client goes away."""
        loop = asyncio.get_running_loop()
        chunks: asyncio.Queue = asyncio.Queue()

        def produce():
            try:
                for text in reply:
                    loop.call_soon_threadsafe(chunks.put_nowait, ("text", text))
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
        try:
            if chat:
                yield event({"role": "assistant", "content": ""})
            while True:
                kind, value = await chunks.get()
                if kind == "text":
                    if value:
                        yield event({"content": value})
                elif kind == "error":
                    self.metrics.errors.labels("server_error").inc()
                    yield "data: " + json.dumps({"error": {"message": str(value), "type": "server_error"}}) + "\n\n"
                    break
                else:
                    self.metrics.answered(reply)
                    self.metrics.requests.labels(endpoint, "200").inc()
                    yield event(None, FINISH.get(reply.stats.finish_reason, "stop"), usage=_usage(reply), **sources)
                    break
            yield "data: [DONE]\n\n"
        finally:
            cancel.set()  # a client that disconnected: stop generating and free the model


def _number(body: dict, name: str, kind: type) -> int | float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int,) if kind is int else (int, float)):
        raise ApiError(400, f"{name} must be a {'whole number' if kind is int else 'number'}", param=name)
    return value


def _usage(reply: Reply) -> dict:
    s = reply.stats
    return {"prompt_tokens": s.prompt_tokens, "completion_tokens": s.completion_tokens,
            "total_tokens": s.prompt_tokens + s.completion_tokens}


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
