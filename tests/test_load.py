"""16 concurrent streamed chats, half through the API and half through the web UI, against the built-in model.

Every answer must be complete and equal to the answer the same request gets alone (greedy); nothing errors;
the process does not grow from one round to the next. Latencies are written to tests/artifacts/load.json.
"""
import json
import resource
import statistics
import threading
import time
from pathlib import Path

import httpx
import pytest
from conftest import close_web_ui, free_port
from test_settings import settings

from quantchat import loaders
from quantchat.api import OpenAIServer, serve
from quantchat.assembly import build_engine
from quantchat.webui import WebUI

USERS = 16
NEW_TOKENS = 16
PROMPTS = [f"Write one sentence about the number {i}." for i in range(USERS)]
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"


@pytest.fixture(scope="module")
def servers(gemma_gguf):
    model = loaders.load(loaders.plan(settings("--max_seq_len=512")))
    engine = build_engine(settings(f"--max_new_tokens={NEW_TOKENS}"), model)
    api = OpenAIServer()
    api_port, web_port = free_port(), free_port()
    serve(api, "127.0.0.1", api_port)
    api.ready(engine)
    demo = WebUI(engine).launch("127.0.0.1", web_port, share=False, block=False)
    yield engine, f"http://127.0.0.1:{api_port}", f"http://127.0.0.1:{web_port}/"
    close_web_ui(demo)
    api.uvicorn.should_exit = True
    model.close()


def ask_api(url: str, prompt: str) -> str:
    body = {"messages": [{"role": "user", "content": prompt}], "temperature": 0, "stream": True}
    text = ""
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=300) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                event = json.loads(line[6:])
                assert "error" not in event, event
                text += event["choices"][0]["delta"].get("content") or ""
    return text


def ask_ui(url: str, prompt: str) -> str:
    from gradio_client import Client
    job = Client(url, verbose=False).submit(prompt, "", NEW_TOKENS, 0.0, api_name="/send")
    updates = list(job)  # streamed updates
    assert updates
    content = job.result()[0][-1]["content"]
    text = content if isinstance(content, str) else "".join(p.get("text", "") for p in content)
    return text.split("\n\n<sub>")[0]


def round_of(users, api_url, web_url):
    results, latencies, errors = {}, {}, []

    def user(i):
        started = time.perf_counter()
        try:
            results[i] = (ask_api if i % 2 == 0 else ask_ui)(api_url if i % 2 == 0 else web_url, PROMPTS[i])
        except Exception as e:  # counted, and the test fails on it
            errors.append(f"user {i}: {e!r}")
        latencies[i] = time.perf_counter() - started

    threads = [threading.Thread(target=user, args=(i,)) for i in range(users)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    return results, latencies, errors


def test_sixteen_concurrent_chats_get_their_own_complete_answers(servers):
    engine, api_url, web_url = servers
    alone = {i: ask_api(api_url, p) for i, p in enumerate(PROMPTS)}
    assert all(alone.values())
    round_of(USERS, api_url, web_url)  # warm-up round: first-use allocations
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    results, latencies, errors = round_of(USERS, api_url, web_url)
    wall = time.perf_counter() - started
    rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert errors == []
    for i in range(USERS):
        assert results[i].strip() == alone[i].strip(), (i, results[i], alone[i])
    assert engine.queue_depth == 0
    assert (rss_after - rss_before) / 1024 < 200  # KiB -> MiB: no growth from one round to the next
    ordered = sorted(latencies.values())
    figures = {"users": USERS, "new_tokens": NEW_TOKENS, "wall_s": round(wall, 2),
               "p50_s": round(statistics.median(ordered), 2),
               "p95_s": round(ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))], 2),
               "max_rss_growth_mib": round((rss_after - rss_before) / 1024, 1), "errors": len(errors)}
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "load.json").write_text(json.dumps(figures, indent=2))
