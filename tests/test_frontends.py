"""The terminal chat and the web UI, on real models: the web UI is driven through gradio_client."""
import io
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import FakeModel, close_web_ui, free_port, wait_until_up
from test_settings import settings

from quantchat import loaders
from quantchat.assembly import build_engine
from quantchat.engine import ChatEngine
from quantchat.prompter import FORMATS, Prompter
from quantchat.terminal import run_terminal

ROOT = Path(__file__).resolve().parent.parent


def scripted(lines):
    feed = iter(lines)

    def read(prompt):
        try:
            return next(feed)
        except StopIteration:
            raise EOFError from None
    return read


def test_terminal_multi_turn_reset_and_exit():
    model = FakeModel(["Hi", " there"])
    engine = ChatEngine(model, Prompter("plain", FORMATS["plain"]))
    out = io.StringIO()
    run_terminal(engine, read=scripted(["first", "second", "/reset", "third", "/exit", "never"]), out=out)
    text = out.getvalue()
    assert text.count("Hi there") == 3 and "(new conversation)" in text and "tokens/s" in text
    assert "first" in model.prompts[1] and "second" in model.prompts[1]  # the history went along
    assert "first" not in model.prompts[2]                                # /reset forgot it
    assert len(model.prompts) == 3                                        # nothing after /exit


def test_terminal_reports_errors_and_keeps_going():
    engine = ChatEngine(FakeModel(["ok"], context=8), Prompter("plain", FORMATS["plain"]))
    out = io.StringIO()
    run_terminal(engine, read=scripted(["word " * 20, "short"]), out=out)
    assert "error: the message is" in out.getvalue() and "ok" in out.getvalue()


def test_ctrl_c_before_the_answer_begins_drops_the_question_and_the_chat_goes_on(monkeypatch):
    """Ctrl-C while the engine prepares an answer (retrieving passages, fitting a long history) ended the chat with
    a NameError on the first turn, and on later turns recorded the previous answer as this question's."""
    model = FakeModel(["Hi", " there"])
    engine = ChatEngine(model, Prompter("plain", FORMATS["plain"]))
    chat, asked = engine.chat, []

    def interrupted_at_the_second_question(messages, **kw):
        asked.append(messages[-1]["content"])
        if len(asked) == 2:
            raise KeyboardInterrupt
        return chat(messages, **kw)
    monkeypatch.setattr(engine, "chat", interrupted_at_the_second_question)
    out = io.StringIO()
    run_terminal(engine, read=scripted(["first", "second", "third"]), out=out)
    assert "(cancelled)" in out.getvalue() and out.getvalue().count("Hi there") == 2
    assert "first" in model.prompts[1] and "third" in model.prompts[1] and "second" not in model.prompts[1]
    assert model.prompts[1].count("Hi there") == 1   # the first answer once, nothing recorded for the second question

    asked.clear()
    monkeypatch.setattr(engine, "chat", lambda messages, **kw: (_ for _ in ()).throw(KeyboardInterrupt))
    run_terminal(engine, read=scripted(["only"]), out=out)   # at the first question: no earlier answer to mistake
    assert out.getvalue().count("(cancelled)") == 2


def test_generate_cli_chats_with_the_builtin_model():
    run = subprocess.run([sys.executable, "generate.py", "--cli=True", "--max_new_tokens=32", "--max_seq_len=512"],
                         cwd=ROOT, input="What is the capital of France?\n/exit\n", capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr
    answer = run.stdout.split(">>> ")[1]
    assert "Paris" in answer and "tokens · eos" in answer              # the model ended its own turn
    assert "prompt format: the model's chat template" in run.stderr


def text(message: dict) -> str:
    """A chat message's text (Gradio returns content as a list of typed parts)."""
    content = message["content"]
    return content if isinstance(content, str) else "".join(part.get("text", "") for part in content)


@pytest.fixture(scope="module")
def web(gemma_gguf):
    from gradio_client import Client

    from quantchat.webui import WebUI
    model = loaders.load(loaders.plan(settings(f"--base_model={gemma_gguf}", "--max_seq_len=512")))
    engine = build_engine(settings("--max_new_tokens=8"), model)
    port = free_port()
    demo = WebUI(engine).launch("127.0.0.1", port, share=False, block=False)
    yield Client(f"http://127.0.0.1:{port}/", verbose=False), engine
    close_web_ui(demo)
    model.close()


def test_web_ui_streams_an_answer_with_its_timings(web):
    client, engine = web
    client.predict(api_name="/clear")
    job = client.submit("The capital of France is", api_name="/send")
    updates = list(job)
    chat = job.result()[0]
    assert len(updates) >= 3  # streamed: several updates before the last
    assert [m["role"] for m in chat] == ["user", "assistant"]
    assert "tokens/s" in text(chat[1]) and "8 tokens · length" in text(chat[1])


def test_web_ui_regenerate_undo_and_clear(web):
    client, _ = web
    client.predict(api_name="/clear")
    first = client.predict("Once upon a time", api_name="/send")[0]
    again = client.predict(api_name="/regenerate")  # State outputs are not part of the API
    assert [m["role"] for m in again] == ["user", "assistant"]
    assert text(again[1]).split("\n\n<sub>")[0] == text(first[1]).split("\n\n<sub>")[0]  # greedy
    second = client.predict("And then", api_name="/send")[0]
    assert len(second) == 4
    assert len(client.predict(api_name="/undo")) == 2
    assert client.predict(api_name="/clear") == []


def test_web_ui_settings_change_the_answer_length(web):
    client, _ = web
    client.predict(api_name="/clear")
    chat = client.predict("Hello", "", 3, api_name="/send")[0]
    assert "3 tokens · length" in text(chat[1])


def test_web_ui_reports_a_user_error_in_the_chat_and_stays_up(web):
    client, _ = web
    client.predict(api_name="/clear")
    chat = client.predict("word " * 600, api_name="/send")[0]
    assert "shorten it" in text(chat[-1])
    chat = client.predict("Hello", api_name="/send")[0]
    assert [m["role"] for m in chat] == ["user", "assistant"]  # the failed message left the history
    assert text(chat[0]) == "Hello" and "tokens/s" in text(chat[1])


def test_web_ui_stop_ends_the_answer_and_frees_the_model(web):
    import time
    client, engine = web
    client.predict(api_name="/clear")
    job = client.submit("Once upon a time", "", 2000, api_name="/send")  # ~500 tokens (the context): seconds
    deadline = time.time() + 60
    while not job.outputs() and time.time() < deadline:
        time.sleep(0.05)
    assert job.outputs(), "no streamed output arrived"
    started = time.perf_counter()
    client.predict(api_name="/stop")
    chat = client.predict("Hello", api_name="/send")[0]  # waits for the model to be free
    assert time.perf_counter() - started < 3  # the stopped answer did not run on
    assert "8 tokens · length" in text(chat[-1])


def test_exposure_warnings_and_auth_parsing(tmp_path):
    from quantchat.auth import read_auth
    from quantchat.errors import UserError
    from quantchat.webui import exposure_warnings
    assert exposure_warnings("localhost", False, None) == []
    assert "without --auth" in exposure_warnings("0.0.0.0", False, None)[0]
    assert exposure_warnings("0.0.0.0", False, [("a", "b")]) == []
    assert "public link" in exposure_warnings("127.0.0.1", True, None)[0]
    logins = tmp_path / "auth.json"
    logins.write_text('[["alice", "secret"]]')
    assert read_auth(str(logins)) == [("alice", "secret")] and read_auth([("bob", "pw")]) == [("bob", "pw")]
    logins.write_text("not json")
    with pytest.raises(UserError, match="JSON list"):
        read_auth(str(logins))


def test_ctrl_c_shuts_the_web_ui_down_cleanly(gemma_gguf):
    import signal

    port = free_port()
    # as at a terminal: a test run started in the background inherits an ignored SIGINT, which Python keeps
    process = subprocess.Popen([sys.executable, "generate.py", f"--server_port={port}", "--max_seq_len=256"],
                               cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    wait_until_up(f"http://127.0.0.1:{port}/")
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=30)
    # gradio closes its server on Ctrl-C and returns (0); a Ctrl-C that lands before it blocks ends in main (130)
    assert process.returncode in (0, 130) and "Traceback" not in err
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))  # the port is free again


def test_export_and_import_a_chat(tmp_path):
    import json

    from quantchat.webui import WebUI
    history = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!", "stats": "1 tokens/s"}]
    ui = WebUI(ChatEngine(FakeModel(["Hi"]), Prompter("plain", FORMATS["plain"])))
    path = ui.export_chat([history])
    assert ui.export_chat([history]) == path and Path(path).parent == ui.export_dir   # one file, written over
    assert json.loads(open(path).read()) == [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    display, state = WebUI.import_chat(path, [[]])
    assert state == [[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]]
    assert len(display) == 2
    bad = tmp_path / "bad.json"
    bad.write_text('{"not": "a list"}')
    kept = [[{"role": "user", "content": "keep me"}]]
    assert WebUI.import_chat(str(bad), kept)[1] == kept  # a bad file changes nothing


def test_model_lock_dry_run_plans_each_model(capsys, tiny_llama):
    from quantchat.cli import main
    lock = f"[{{'base_model': '{tiny_llama}'}}, {{'max_seq_len': 1024}}]"
    assert main([f"--model_lock={lock}", "--load_4bit=False", "--dry_run=True"]) == 0
    out = capsys.readouterr().out
    assert "model 1 of 2" in out and "model 2 of 2" in out and "backend                   hf" in out
    assert "llamacpp" in out and "1024 tokens" in out


def test_model_lock_web_ui_asks_every_model(gemma_gguf, tiny_llama):
    from gradio_client import Client

    from quantchat.webui import WebUI
    gemma = loaders.load(loaders.plan(settings("--max_seq_len=512")))
    tiny = loaders.load(loaders.plan(settings(f"--base_model={tiny_llama}")))
    engines = [build_engine(settings("--max_new_tokens=6"), gemma), build_engine(settings("--max_new_tokens=4"), tiny)]
    port = free_port()
    demo = WebUI(engines).launch("127.0.0.1", port, share=False, block=False)
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        first, second, _ = client.predict("The capital of France is", api_name="/send")
        assert [m["role"] for m in first] == [m["role"] for m in second] == ["user", "assistant"]
        assert "6 tokens · length" in text(first[1])
        assert "tokens · " in text(second[1]) and text(first[1]) != text(second[1])
        first, second = client.predict(api_name="/undo")
        assert first == second == []
    finally:
        close_web_ui(demo)
        gemma.close()
        tiny.close()


def test_no_usage_reports_to_gradio_unless_asked(web, monkeypatch):
    """Gradio sends usage reports to its servers by default; a local launcher keeps to itself."""
    from quantchat.webui import WebUI
    _, engine = web
    monkeypatch.delenv("GRADIO_ANALYTICS_ENABLED", raising=False)
    assert WebUI(engine).build().analytics_enabled is False  # (GRADIO_ANALYTICS_ENABLED=True turns them on)


def test_logins_are_throttled_after_wrong_passwords():
    from quantchat.webui import Logins
    now = [1000.0]
    logins = Logins([("ann", "secret")], clock=lambda: now[0])
    assert logins("ann", "secret") and not logins("ann", "guess") and not logins("bob", "secret")
    for _ in range(Logins.MAX_FAILURES):
        assert not logins("ann", "guess")
    assert not logins("ann", "secret")              # locked: even the right password waits
    now[0] += Logins.LOCK_S * 2 + 1
    assert logins("ann", "secret")                  # the lock ends, and a right password clears the count


def test_with_auth_a_request_without_a_login_reaches_no_session(tmp_path):
    """Gradio leaves the heartbeat (which ends a session and drops its uploads) and cancel open without a login;
    with --auth they answer 401, and handlers act only for a request that carries a login. Wrong passwords for a
    user are throttled on the login form itself."""
    import httpx

    from quantchat.webui import WebUI
    engine = ChatEngine(FakeModel(["Hi"]), Prompter("plain", FORMATS["plain"]))
    port = free_port()
    ui = WebUI(engine)
    demo = ui.launch("127.0.0.1", port, share=False, auth=[("ann", "secret")], block=False)
    try:
        url = f"http://127.0.0.1:{port}"
        assert httpx.get(f"{url}/gradio_api/heartbeat/abc123", timeout=10).status_code == 401
        assert httpx.post(f"{url}/gradio_api/cancel", json={"session_hash": "abc123", "fn_index": 0,
                                                            "event_id": "x"}, timeout=10).status_code == 401
        ended = []
        ui.library = type("Library", (), {"store": type("Store", (), {"drop_session": ended.append})()})()
        anonymous = type("Request", (), {"username": None, "session_hash": "abc123"})()
        ui.end_session(anonymous)
        assert ended == []                                                   # nothing dropped without a login
        ui.end_session(type("Request", (), {"username": "ann", "session_hash": "abc123"})())
        assert ended == ["ann\0abc123"]
        tries = [httpx.post(f"{url}/login", data={"username": "ann", "password": "guess"}, timeout=10).status_code
                 for _ in range(6)]
        right = httpx.post(f"{url}/login", data={"username": "ann", "password": "secret"}, timeout=10)
        assert set(tries) == {400} and right.status_code == 400              # locked for now, right or wrong
    finally:
        close_web_ui(demo)


def test_sessions_whose_keys_differ_only_in_punctuation_keep_apart(tmp_path):
    pytest.importorskip("chromadb")
    from quantchat.documents.store import DocumentStore

    class Nothing:
        name = "none"
    store = DocumentStore(str(tmp_path / "db"), Nothing())
    assert store.my_data("ann\0a-b_c").name != store.my_data("ann\0abc").name
    assert store.my_data("ann\0abc") is store.my_data("ann\0abc")


def test_importing_a_deeply_nested_chat_is_refused_not_a_crash(tmp_path):
    from quantchat.webui import WebUI
    nested = tmp_path / "nested.json"
    nested.write_text("[" * 100_000 + "]" * 100_000)
    before = [[{"role": "user", "content": "kept"}]]
    display, state = WebUI.import_chat(str(nested), before)
    assert state == before   # the conversation stays as it was


def test_a_tool_call_is_shown_in_the_terminal_and_the_web_ui_never_run():
    import threading

    from test_tools import HERMES_TEMPLATE

    from quantchat.prompter import make_prompter
    from quantchat.webui import WebUI
    call = ["Checking.", "\n<tool", "_call>\n", '{"name": "forecast", ', '"arguments": {"days": 2}}', "\n</tool_call>"]
    engine = ChatEngine(FakeModel(call), make_prompter(None, None, HERMES_TEMPLATE, "", None))
    out = io.StringIO()
    run_terminal(engine, read=scripted(["weather?"]), out=out)
    assert 'Checking.\n[tool call: forecast({"days": 2})]' in out.getvalue() and "<tool_call>" not in out.getvalue()
    settings_tuple = (64, 0.0, 1.0, 40, 1.0, False, 60.0)
    *_, (display, history) = WebUI(engine).answer(engine, [{"role": "user", "content": "weather?"}], "", settings_tuple,
                                                  threading.Event(), keep_on_error=False)
    assert history[-1]["content"] == "Checking." and history[-1]["tool_calls"] == ['tool call: forecast({"days": 2})']
    assert '🔧 `tool call: forecast({"days": 2})`' in display[-1]["content"]
