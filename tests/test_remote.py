"""--inference_server against a real OpenAI-compatible server started here: llama-cpp-python's (tests/llamacpp_server.py),
with the Gemma GGUF."""
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from conftest import free_port, wait_until_up
from test_settings import settings

from quantchat import loaders
from quantchat.assembly import build_engine
from quantchat.cli import main
from quantchat.errors import UsageError, UserError
from quantchat.loaders.base import GenParams
from quantchat.loaders.remote import parse_inference_server

KEY = "sk-remote"


@pytest.fixture(scope="module")
def server(gemma_gguf):
    port = free_port()
    process = subprocess.Popen([sys.executable, str(Path(__file__).parent / "llamacpp_server.py"), "--model", gemma_gguf,
                                "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "512", "--api_key", KEY,
                                "--chat_format", "gemma"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_until_up(f"http://127.0.0.1:{port}/v1/models", ready=lambda response: True)
    yield f"127.0.0.1:{port}"
    process.terminate()
    process.wait(timeout=30)


@pytest.mark.parametrize("value, url, api", [
    ("vllm:gpu-box:5000", "http://gpu-box:5000/v1", "completions"),
    ("vllm_chat:http://gpu-box:5000", "http://gpu-box:5000/v1", "chat"),
    ("http://127.0.0.1:8080/v1/", "http://127.0.0.1:8080/v1", "chat"),
    ("openai_chat", "https://api.openai.com/v1", "chat"),
    ("openai:http://h:1", "http://h:1/v1", "completions"),
])
def test_inference_server_forms(value, url, api):
    assert parse_inference_server(value) == (url, api)


def test_unknown_form_is_a_usage_error():
    with pytest.raises(UsageError, match="not understood"):
        parse_inference_server("tgi-ish:thing")


def test_dry_run_shows_the_remote_model(server, gemma_gguf, capsys):
    assert main([f"--inference_server=vllm_chat:{server}", f"--inference_server_api_key={KEY}",
                 "--max_seq_len=512", "--dry_run=True"]) == 0
    out = capsys.readouterr().out
    assert gemma_gguf in out and "512 tokens" in out and "chat completions" in out


def test_unreachable_server_and_wrong_key_are_one_line_errors(server):
    with pytest.raises(UserError, match="cannot reach the inference server"):
        loaders.plan(settings(f"--inference_server=vllm:127.0.0.1:{free_port()}"))
    with pytest.raises(UserError, match="refused the API key"):
        loaders.plan(settings(f"--inference_server=vllm:{server}", "--inference_server_api_key=wrong"))


def test_text_completions_render_our_prompt_and_match_local_llamacpp(server, gemma_gguf):
    remote = loaders.load(loaders.plan(settings(f"--inference_server=vllm:{server}",
                                                f"--inference_server_api_key={KEY}")))
    local = loaders.load(loaders.plan(settings(f"--base_model={gemma_gguf}", "--max_seq_len=512")))
    try:
        params = GenParams(max_new_tokens=8, do_sample=False, repetition_penalty=1.0)
        from_server = "".join(remote.stream("Water boils at", params, threading.Event()))
        assert from_server == "".join(local.stream("Water boils at", params, threading.Event()))
        assert "100 degrees" in from_server
    finally:
        remote.close()
        local.close()


def test_chat_through_the_engine_streams_and_stops(server):
    model = loaders.load(loaders.plan(settings(f"--inference_server=vllm_chat:{server}",
                                               f"--inference_server_api_key={KEY}", "--max_seq_len=512")))
    engine = build_engine(settings("--max_new_tokens=6"), model)
    assert engine.prompter.source == "the server's chat template"
    reply = engine.chat([{"role": "user", "content": "Hello"}])
    pieces = list(reply)
    assert len(pieces) >= 2 and reply.stats.finish_reason == "length" and reply.stats.completion_tokens == 6
    cancel = threading.Event()
    long = engine.chat([{"role": "user", "content": "Tell a story"}], engine.params(max_new_tokens=300), cancel)
    for _ in long:
        cancel.set()
    assert long.stats.finish_reason == "cancelled" and long.stats.completion_tokens < 20
    model.close()


def test_terminal_chat_through_a_remote_server(server):
    run = subprocess.run([sys.executable, "generate.py", "--cli=True", f"--inference_server=vllm_chat:{server}",
                          f"--inference_server_api_key={KEY}", "--max_new_tokens=5"],
                         cwd=Path(__file__).resolve().parent.parent, input="Hello\n/exit\n", capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "5 tokens · length" in run.stdout and "remote (chat completions)" in run.stdout


def test_base_model_names_the_served_model(server, gemma_gguf):
    plan = loaders.plan(settings(f"--inference_server=vllm:{server}", f"--inference_server_api_key={KEY}",
                                 f"--base_model={gemma_gguf}"))
    assert plan.model == gemma_gguf and plan.backend == "remote"
    with pytest.raises(UserError, match="not some/other-model"):
        loaders.plan(settings(f"--inference_server=vllm:{server}", f"--inference_server_api_key={KEY}",
                              "--base_model=some/other-model"))


class MalformedServer:
    """A stand-in engine on 127.0.0.1 whose replies are valid HTTP but not the OpenAI API's shapes."""

    def __init__(self):
        import json
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
        owner = self
        self.models: object = {"object": "list", "data": [{"id": "m", "object": "model", "meta": "not an object"}]}
        self.chunk = ""

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, content_type: str, body: bytes):
                self.send_response(200)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                models = owner.models
                self._send("application/json", models if isinstance(models, bytes) else json.dumps(models).encode())

            def do_POST(self):
                self.rfile.read(int(self.headers["Content-Length"]))
                self._send("text/event-stream", f"data: {owner.chunk}\n\ndata: [DONE]\n\n".encode())

        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.http.serve_forever, daemon=True).start()
        self.address = f"http://127.0.0.1:{self.http.server_address[1]}"


@pytest.fixture
def malformed_server():
    server = MalformedServer()
    yield server
    server.http.shutdown()


CHUNK = '{"id": "1", "object": "chat.completion.chunk", "created": 0, "model": "m", "choices": %s}'


def test_replies_in_another_shape_are_one_line_and_the_next_request_is_served(malformed_server):
    """A server (or a proxy before it) that answers outside the OpenAI format: one line naming the server, never a
    traceback, and the model keeps answering the next request."""
    model = loaders.load(loaders.plan(settings(f"--inference_server={malformed_server.address}")))
    assert model.info.context_length == 4096  # (its meta, not an object, is left out)

    def answer() -> str:
        return "".join(model.stream_chat([{"role": "user", "content": "hi"}], GenParams(max_new_tokens=4),
                                         threading.Event()))

    for chunk, message in [("{not json", "streamed chunk .*JSONDecodeError"),
                           (CHUNK % '[{"index": 0}]', "streamed chunk .*AttributeError"),
                           (CHUNK % '"x"', "streamed chunk .*AttributeError")]:
        malformed_server.chunk = chunk
        with pytest.raises(UserError, match=f"inference server at {malformed_server.address}/v1 sent a {message}"):
            answer()
    malformed_server.chunk = CHUNK % '[{"index": 0, "delta": {"content": "fine"}}]'
    assert answer() == "fine"

    for models, message in [(b"{oops", "JSONDecodeError"), ({"data": "x"}, "AttributeError"),
                            ({"data": [{"object": "model"}]}, "a model without an id")]:
        malformed_server.models = models
        with pytest.raises(UserError, match=f"sent a list of models that is not in the OpenAI format .*{message}"):
            loaders.plan(settings(f"--inference_server={malformed_server.address}"))
