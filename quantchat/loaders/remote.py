"""A model served by a running engine (vLLM, TGI, llama.cpp's server, Ollama ...) through its OpenAI-compatible API.

--inference_server forms, as in h2oGPT:
  vllm:HOST:PORT             text completions; quantchat renders the prompt format
  vllm_chat:HOST:PORT        chat completions; the server applies its chat template
  openai:URL, openai_chat:URL  the same two against any OpenAI-compatible base URL (openai_chat alone: api.openai.com)
  http(s)://HOST:PORT[/v1]   chat completions
"""
from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

from ..errors import UsageError, UserError, missing_package
from ..machine import Machine
from ..settings import Settings
from ..tools import ToolCall
from .base import GenParams, LoadPlan, ModelInfo
from .checkpoint import Checkpoint

NAME = "remote"
USES_TORCH = False
OWN_FLAGS = ()
DEFAULT_CONTEXT = 4096
OPENAI_URL = "https://api.openai.com/v1"


def parse_inference_server(value: str) -> tuple[str, str]:
    """(base URL ending in /v1, 'chat' or 'completions')."""
    kind, _, rest = value.partition(":")
    if kind in ("http", "https"):
        return _v1(value), "chat"
    if kind in ("vllm", "vllm_chat"):
        if not rest:
            raise UsageError(f"--inference_server={value}: write {kind}:HOST:PORT or {kind}:http://HOST:PORT")
        url = rest if rest.startswith(("http://", "https://")) else f"http://{rest}"
        return _v1(url), "chat" if kind == "vllm_chat" else "completions"
    if kind in ("openai", "openai_chat"):
        return _v1(rest) if rest else OPENAI_URL, "chat" if kind == "openai_chat" else "completions"
    raise UsageError(f"--inference_server={value} is not understood: use vllm:HOST:PORT, vllm_chat:HOST:PORT, "
                     "openai_chat:URL or an http(s):// base URL")


def _v1(url: str) -> str:
    url = url.rstrip("/")
    return url if url.endswith("/v1") else url + "/v1"


def _client(base_url: str, api_key: str | None):
    try:
        import openai
    except ImportError:
        raise missing_package("openai", "remote", "--inference_server") from None
    return openai.OpenAI(base_url=base_url, api_key=api_key or "none", timeout=600.0, max_retries=0)


def _explain(error: Exception, base_url: str) -> UserError:
    import openai
    if isinstance(error, openai.AuthenticationError):
        return UserError(f"the inference server at {base_url} refused the API key: set --inference_server_api_key")
    if isinstance(error, openai.APIConnectionError):
        return UserError(f"cannot reach the inference server at {base_url}: is it running, and is the address right?")
    if isinstance(error, openai.NotFoundError):
        return UserError(f"the inference server at {base_url} does not know that path or model: {error}")
    if isinstance(error, openai.APIStatusError):
        return UserError(f"the inference server at {base_url} answered {error.status_code}: {error.message}")
    return UserError(f"the inference server at {base_url} failed: {error}")


# what the openai client raises reading a reply of another shape than the OpenAI API's (it checks no types)
MALFORMED = (ValueError, AttributeError, TypeError, KeyError, IndexError)


def _malformed(base_url: str, what: str, error: Exception) -> UserError:
    return UserError(f"the inference server at {base_url} sent a {what} that is not in the OpenAI format "
                     f"({error.__class__.__name__}: {str(error)[:120]})")


def _context_length(card) -> int | None:
    """vLLM says max_model_len; others context_length; llama.cpp's server puts n_ctx under meta."""
    data = card.model_dump() if hasattr(card, "model_dump") else dict(card)
    meta = data.get("meta") if isinstance(data.get("meta"), dict) else {}
    for value in (data.get("max_model_len"), data.get("context_length"), meta.get("n_ctx"), meta.get("n_ctx_train")):
        if isinstance(value, int) and value > 0:
            return value
    return None


@dataclass(frozen=True)
class Options:
    base_url: str                          # ends in /v1
    api: Literal["chat", "completions"]
    api_key: str | None


def claims(s: Settings, ckpt: Checkpoint | None) -> str | None:
    if not s.inference_server:
        return None
    base_url, api = parse_inference_server(s.inference_server)
    return f"--inference_server: {'chat' if api == 'chat' else 'text'} completions at {base_url}"


def check(s: Settings, ckpt: Checkpoint | None) -> None:
    if s.lora_weights or s.load_8bit or s.load_4bit or s.draft_model:
        raise UsageError("--lora_weights, --load_8bit, --load_4bit and --draft_model apply to local models: with "
                         "--inference_server the server decides how the model is loaded and decoded")


def plan(s: Settings, ckpt: Checkpoint | None, machine: Machine, why: str) -> LoadPlan[Options]:
    import openai
    base_url, api = parse_inference_server(s.inference_server)
    client = _client(base_url, s.inference_server_api_key)
    try:
        cards = client.with_options(timeout=15.0).models.list().data
        names = [c.id for c in cards]
    except openai.OpenAIError as e:
        raise _explain(e, base_url) from None
    except MALFORMED as e:
        raise _malformed(base_url, "list of models", e) from None
    if not all(isinstance(name, str) and name for name in names):
        raise _malformed(base_url, "list of models", ValueError("a model without an id"))
    if s.base_model and s.base_model not in names:
        raise UserError(f"the inference server at {base_url} serves {', '.join(names) or 'no models'}, "
                        f"not {s.base_model}")
    if not names:
        raise UserError(f"the inference server at {base_url} lists no models")
    card = cards[names.index(s.base_model)] if s.base_model else cards[0]
    notes = []
    context = s.max_seq_len or _context_length(card)
    if context is None:
        context = DEFAULT_CONTEXT
        notes.append(f"the server does not say its context length: assuming {DEFAULT_CONTEXT} tokens "
                     "(set --max_seq_len)")
    return LoadPlan(NAME, why, card.id, f"remote ({base_url})", "remote", "as served", context, None, None,
                    Options(base_url, api, s.inference_server_api_key), notes)


def load(p: LoadPlan[Options]) -> RemoteModel:
    return RemoteModel(p)


class RemoteModel:
    """Streams from the server; with the chat API it takes messages, and the server applies its chat template."""

    def __init__(self, p: LoadPlan[Options]):
        self.client = _client(p.options.base_url, p.options.api_key)
        self.base_url = p.options.base_url
        self.takes_messages = p.options.api == "chat"
        self.name = p.model
        self.info = ModelInfo(f"remote ({p.options.api} completions)", p.model, p.devices, p.dtype,
                              p.quantization, p.context_length)

    def count_tokens(self, text: str) -> int:
        # The API has no tokenizer endpoint in common: about 3 characters a token errs on the long side,
        # so fitting the history into the context stays safe.
        return len(text) // 3 + 1

    def _request(self, params: GenParams) -> dict:
        request = {"model": self.name, "max_tokens": params.max_new_tokens, "stream": True,
                   "temperature": params.temperature if params.do_sample else 0.0,
                   "extra_body": {"top_k": params.top_k, "repetition_penalty": params.repetition_penalty,
                                  "repeat_penalty": params.repetition_penalty}}  # vLLM's name, llama.cpp's name
        if params.do_sample:
            request["top_p"] = params.top_p
        if params.seed is not None:
            request["seed"] = params.seed
        return request

    def stream(self, prompt: str, params: GenParams, cancel: threading.Event) -> Iterator[str]:
        yield from self._pieces(lambda: self.client.completions.create(prompt=prompt, **self._request(params)),
                                lambda chunk: [chunk.choices[0].text] if chunk.choices else [], cancel)

    def stream_chat(self, messages: list[dict], params: GenParams, cancel: threading.Event,
                    request: dict | None = None) -> Iterator[str | ToolCall]:
        """Text pieces, and each tool call the server makes (once the stream has moved past it). `request`: the
        OpenAI fields the client sent that the server handles itself (tools, tool_choice, response_format)."""
        calls: dict[int, dict] = {}   # the calls streamed so far, by index: id, name, arguments so far

        def pieces(chunk) -> list[str | ToolCall]:
            if not chunk.choices:
                return []
            delta = chunk.choices[0].delta
            for part in delta.tool_calls or []:
                call = calls.setdefault(part.index, {"id": "", "name": "", "arguments": ""})
                call["id"] = part.id or call["id"]
                if part.function:
                    call["name"] += part.function.name or ""
                    call["arguments"] += part.function.arguments or ""
            return [delta.content] if delta.content else []

        yield from self._pieces(lambda: self.client.chat.completions.create(
            messages=messages, **self._request(params), **(request or {})), pieces, cancel)
        for _, call in sorted(calls.items()):
            yield ToolCall(call["name"], call["arguments"] or "{}", **({"id": call["id"]} if call["id"] else {}))

    def _pieces(self, start, pieces_of, cancel: threading.Event) -> Iterator[str]:
        """The text of each streamed chunk (servers send one token a chunk); closing the stream stops the server."""
        import openai
        try:
            stream = start()
        except openai.OpenAIError as e:
            raise _explain(e, self.base_url) from None
        try:
            for chunk in stream:
                if cancel.is_set():
                    break
                yield from (piece for piece in pieces_of(chunk) if piece)
        except openai.OpenAIError as e:
            raise _explain(e, self.base_url) from None
        except MALFORMED as e:
            raise _malformed(self.base_url, "streamed chunk", e) from None
        finally:
            stream.close()

    def close(self) -> None:
        self.client.close()
