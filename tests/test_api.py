"""The OpenAI-compatible API on the built-in Gemma model: the official openai client, and plain HTTP for errors."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
from conftest import free_port, wait_until_up
from test_settings import settings

from quantchat import loaders
from quantchat.api import OpenAIServer, serve
from quantchat.assembly import build_engine

ROOT = Path(__file__).resolve().parent.parent
KEY = "sk-test-key"


@pytest.fixture(scope="module")
def engine(gemma_gguf):
    model = loaders.load(loaders.plan(settings(f"--base_model={gemma_gguf}", "--max_seq_len=512")))
    yield build_engine(settings("--max_new_tokens=8"), model)
    model.close()


def start(engine, keys=None):
    server = OpenAIServer(keys)
    port = free_port()
    serve(server, "127.0.0.1", port)
    if engine is not None:
        server.ready(engine)
    return server, f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def api(engine):
    server, url = start(engine)
    yield url
    server.uvicorn.should_exit = True


@pytest.fixture(scope="module")
def client(api):
    return openai.OpenAI(base_url=f"{api}/v1", api_key="unused")


def test_health_is_503_while_loading_then_200(engine):
    server, url = start(None)
    try:
        assert httpx.get(f"{url}/health").status_code == 503
        error = httpx.post(f"{url}/v1/chat/completions", json={"messages": []})
        assert error.status_code == 503 and error.json()["error"]["code"] == "loading"
        server.ready(engine)
        health = httpx.get(f"{url}/health")
        assert health.status_code == 200 and health.json()["status"] == "ok"
    finally:
        server.uvicorn.should_exit = True


def test_chat_not_streamed_with_usage(client, engine):
    answer = client.chat.completions.create(model="anything", messages=[{"role": "user", "content": "Water boils at"}],
                                            temperature=0)
    assert answer.choices[0].message.role == "assistant" and answer.choices[0].message.content
    assert answer.choices[0].finish_reason == "length" and answer.usage.completion_tokens == 8
    assert answer.usage.prompt_tokens > 2 and answer.model == engine.model.info.model


def test_chat_streamed_equals_not_streamed(client):
    messages = [{"role": "user", "content": "Once upon a time"}]
    whole = client.chat.completions.create(model="m", messages=messages, temperature=0, max_tokens=12)
    chunks = list(client.chat.completions.create(model="m", messages=messages, temperature=0, max_tokens=12,
                                                 stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert len(chunks) >= 5 and chunks[-1].usage.completion_tokens == 12
    assert chunks[-1].choices[0].finish_reason == "length"


def test_completions_continue_raw_text(client):
    answer = client.completions.create(model="m", prompt="Water boils at", max_tokens=8, temperature=0)
    assert "100 degrees" in answer.choices[0].text and answer.usage.completion_tokens == 8
    streamed = client.completions.create(model="m", prompt="Water boils at", max_tokens=8, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == answer.choices[0].text


def test_stop_strings_and_models(client, engine):
    answer = client.completions.create(model="m", prompt="Water boils at", max_tokens=12, temperature=0, stop=["Celsius"])
    assert "Celsius" not in answer.choices[0].text and answer.choices[0].finish_reason == "stop"
    models = client.models.list().data
    assert [m.id for m in models] == [engine.model.info.model]


@pytest.mark.parametrize("body, status, param", [
    (b"{not json", 400, None),
    ({"messages": [{"role": "user", "content": "hi"}], "n": 2}, 400, "n"),
    ({"messages": [{"role": "user", "content": "hi"}], "logit_bias": {"1": 5}}, 400, "logit_bias"),
    ({"messages": [{"role": "user", "content": "hi"}], "frequency_penalty": 0.5}, 400, "frequency_penalty"),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}, 400, "temperature"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": -5}, 400, None),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": 1e9}, 400, None),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": "8"}, 400, "max_tokens"),  # strict types
    ({"messages": [{"role": "user", "content": "hi"}], "stream": "yes"}, 400, "stream"),
    ({"messages": [{"role": "user", "content": "hi"}], "stop": ["x"] * 17}, 400, "stop"),
    ({"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]}, 400, "tools"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400, "messages"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}, 400, "messages"),
    ({"messages": [{"role": "user", "content": "hi"}], "response_format": "json"}, 400, "response_format"),
    ({"messages": [{"role": "user", "content": "hi"}], "top_k": 10**12}, 400, None),
    ({"messages": [{"role": "user", "content": "hi"}], "top_k": -1}, 400, None),
    ({"messages": [{"role": "user", "content": "hi"}], "repetition_penalty": -1}, 400, None),
    ({"messages": [{"role": "user", "content": "hi"}], "seed": -5}, 400, None),
    ({"messages": [{"role": "user", "content": "hi"}] * 2000}, 400, "messages"),         # bounded, prepared aside
    (b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', 400, None),
    (b'{"messages": [{"role": "user", "content": "\\ud800"}]}', 400, None),            # an unpaired surrogate
    (b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", 400, None),            # nests too deep
    ({"messages": []}, 400, "messages"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, 400, "messages"),
    ({"messages": [{"role": "user", "content": "word " * 700}]}, 400, None),
    ({"messages": [{"role": "user", "content": "x" * (5 * 2**20)}]}, 413, None),
])
def test_bad_requests_get_openai_shaped_errors(api, body, status, param):
    response = httpx.post(f"{api}/v1/chat/completions", content=body if isinstance(body, bytes) else json.dumps(body),
                          headers={"content-type": "application/json"})
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["message"] and error["type"] == "invalid_request_error" and error["param"] == param


def test_api_keys(engine):
    server, url = start(engine, [KEY])
    try:
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{url}/v1", api_key="wrong").models.list()
        assert httpx.get(f"{url}/v1/models").status_code == 401
        ok = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY)
        assert ok.completions.create(model="m", prompt="Hi", max_tokens=2).usage.completion_tokens == 2
    finally:
        server.uvicorn.should_exit = True


def test_the_web_uis_logins_are_the_apis_keys_without_openai_api_key(tmp_path):
    """--auth alone: one file of logins for the web UI and the API (Bearer USER:PASSWORD), and the API may then
    listen beyond loopback; --openai_api_key, where given, is the API's own."""
    from quantchat.cli import start_api
    logins = tmp_path / "logins.json"
    logins.write_text('[["alice", "s3cret"]]')
    port = free_port()
    api, _ = start_api(settings("--openai_server=True", f"--openai_port={port}", f"--auth={logins}",
                                "--server_name=0.0.0.0"))
    try:
        url = f"http://127.0.0.1:{port}/v1/models"
        assert httpx.get(url).status_code == 401
        assert httpx.get(url, headers={"Authorization": "Bearer alice:wrong"}).status_code == 401
        assert httpx.get(url, headers={"Authorization": "Bearer alice:s3cret"}).status_code == 503  # (still loading)
        assert api.uvicorn.config.host == "0.0.0.0"
    finally:
        api.uvicorn.should_exit = True
    port = free_port()
    api, _ = start_api(settings("--openai_server=True", f"--openai_port={port}", f"--auth={logins}",
                                f"--openai_api_key={KEY}"))
    try:
        url = f"http://127.0.0.1:{port}/v1/models"
        assert httpx.get(url, headers={"Authorization": "Bearer alice:s3cret"}).status_code == 401
        assert httpx.get(url, headers={"Authorization": f"Bearer {KEY}"}).status_code == 503
    finally:
        api.uvicorn.should_exit = True


def test_client_that_disconnects_mid_stream_frees_the_model(api, engine):
    body = {"messages": [{"role": "user", "content": "Tell a long story"}], "max_tokens": 480, "stream": True}
    with httpx.stream("POST", f"{api}/v1/chat/completions", json=body) as response:
        for line in response.iter_lines():
            if line.startswith("data: ") and '"content": "' in line and '"content": ""' not in line:
                break  # the first real token: now hang up
    started = time.perf_counter()
    quick = httpx.post(f"{api}/v1/completions", json={"prompt": "Hi", "max_tokens": 4}, timeout=30)
    assert quick.status_code == 200 and time.perf_counter() - started < 3  # not behind ~480 tokens
    assert engine.queue_depth == 0


def test_metrics_count_requests_tokens_and_timings(api, client):
    client.completions.create(model="m", prompt="Hi", max_tokens=3)
    text = httpx.get(f"{api}/metrics").text
    assert 'quantchat_requests_total{endpoint="/v1/completions",status="200"}' in text
    assert 'quantchat_requests_total{endpoint="/v1/chat/completions",status="400"}' in text
    assert "quantchat_completion_tokens_total" in text and "quantchat_time_to_first_token_seconds_bucket" in text
    assert "quantchat_decode_tokens_per_second_count" in text and "quantchat_queue_depth 0.0" in text


def test_generate_serves_the_api_only(gemma_gguf):
    port = free_port()
    process = subprocess.Popen([sys.executable, "generate.py", "--openai_server=True", "--gradio=False",
                                f"--openai_port={port}", "--max_seq_len=256", "--max_new_tokens=4"], cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=os.environ.copy())
    try:
        wait_until_up(f"http://127.0.0.1:{port}/health")
        answer = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json={"prompt": "Hi"}).json()
        assert answer["usage"]["completion_tokens"] == 4
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_api_without_a_key_stays_on_loopback(capsys):
    from quantchat.cli import start_api
    s = settings("--server_name=0.0.0.0", f"--openai_port={free_port()}")
    api, _ = start_api(s)
    try:
        assert api.uvicorn.config.host == "127.0.0.1"
        assert "listens on 127.0.0.1 only" in capsys.readouterr().err
    finally:
        api.uvicorn.should_exit = True


def test_web_ui_and_api_share_one_engine_in_one_process(gemma_gguf):
    from gradio_client import Client
    web_port, api_port = free_port(), free_port()
    process = subprocess.Popen([sys.executable, "generate.py", "--openai_server=True", f"--openai_port={api_port}",
                                f"--server_port={web_port}", "--max_seq_len=256", "--max_new_tokens=4"], cwd=ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until_up(f"http://127.0.0.1:{web_port}/")
        chat = Client(f"http://127.0.0.1:{web_port}/", verbose=False).predict("Hi", api_name="/send")[0]
        assert len(chat) == 2
        api_answer = httpx.post(f"http://127.0.0.1:{api_port}/v1/completions", json={"prompt": "Hi"}).json()
        assert api_answer["usage"]["completion_tokens"] == 4
        metrics = httpx.get(f"http://127.0.0.1:{api_port}/metrics").text
        assert 'quantchat_requests_total{endpoint="/v1/completions",status="200"} 1.0' in metrics
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_api_keys_from_a_file(tmp_path):
    from quantchat.api import read_api_keys
    from quantchat.errors import UserError
    keys = tmp_path / "keys.txt"
    keys.write_text("# team keys\nsk-one\n\nsk-two\n")
    assert read_api_keys(str(keys)) == ["sk-one", "sk-two"] and read_api_keys("sk-inline") == ["sk-inline"]
    keys.write_text("# nothing\n")
    with pytest.raises(UserError, match="holds no keys"):
        read_api_keys(str(keys))
    from quantchat.errors import UsageError
    for mistyped in (str(tmp_path / "no-such-keys.txt"), "./keys", "~/secret.key"):
        with pytest.raises(UsageError, match="no such file"):  # never quietly the key itself
            read_api_keys(mistyped)


def test_with_a_key_neither_the_schema_nor_the_model_path_is_public(engine):
    server, url = start(engine, [KEY])
    try:
        assert httpx.get(f"{url}/openapi.json").status_code == 404
        health = httpx.get(f"{url}/health").json()
        assert health["status"] == "ok" and "model" not in health
    finally:
        server.uvicorn.should_exit = True
    server, url = start(engine)
    try:
        assert httpx.get(f"{url}/health").json()["model"] == Path(engine.model.info.model).name   # a name, no path
    finally:
        server.uvicorn.should_exit = True


def test_an_oversized_body_is_refused_before_it_is_read(api):
    """By its Content-Length, and, sent in chunks without one, as soon as it passes the limit."""
    import socket
    host, port = api.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:   # says 400 MiB, sends none of it
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: " + str(400 * 2**20).encode() + b"\r\n\r\n")
        assert s.recv(200).split(b"\r\n")[0].endswith(b"413 Request Entity Too Large")

    def chunks():
        yield b'{"messages": "'
        for _ in range(64):
            yield b"x" * 2**20
    streamed = httpx.post(f"{api}/v1/chat/completions", content=chunks(), headers={"content-type": "application/json"})
    assert streamed.status_code == 413


def test_a_non_streamed_request_whose_client_hangs_up_stops_its_generation(api, engine):
    body = {"messages": [{"role": "user", "content": "Tell a long story"}], "max_tokens": 480}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{api}/v1/chat/completions", json=body, timeout=1.0)   # the client gives up after a second
    started = time.perf_counter()
    quick = httpx.post(f"{api}/v1/completions", json={"prompt": "Hi", "max_tokens": 4}, timeout=30)
    assert quick.status_code == 200 and time.perf_counter() - started < 3     # not behind ~480 tokens
    assert engine.queue_depth == 0


def test_ctrl_c_during_an_answer_stops_the_server_cleanly(gemma_gguf):
    """SIGINT while the API streams an answer: generations stop first, then the model is freed; exit 0."""
    import signal
    import threading
    port = free_port()
    process = subprocess.Popen([sys.executable, "generate.py", f"--base_model={gemma_gguf}", "--openai_server=True",
                                "--gradio=False", f"--openai_port={port}", "--max_seq_len=1024"], cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    streaming = threading.Event()

    def long_answer():
        body = {"prompt": "Once upon a time", "max_tokens": 900, "stream": True}
        try:
            with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=60) as response:
                for line in response.iter_lines():
                    if '"text": "' in line:
                        streaming.set()
        except httpx.HTTPError:
            pass
    try:
        wait_until_up(f"http://127.0.0.1:{port}/health")
        client = threading.Thread(target=long_answer, daemon=True)
        client.start()
        assert streaming.wait(60)
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=60)
        assert process.returncode == 0, err                       # not -11 (a segmentation fault)
        assert "Traceback" not in err
    finally:
        if process.poll() is None:
            process.kill()
