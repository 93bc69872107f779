"""The web UI in a real browser: headless Chromium (Debian's) driven by Playwright, against generate.py.

Screenshots land in tests/artifacts/. Needs /usr/bin/chromium (.ci/run installs it).
"""
import contextlib
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import close_web_ui, free_port, wait_until_up

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "tests" / "artifacts"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# Chromium's own connections are refused on a closed network: keep it from making them
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]

pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs Chromium: apt-get install chromium")


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        yield browser
        browser.close()


@contextlib.contextmanager
def web_ui(browser, *flags: str):
    """generate.py's web UI with these flags, and a browser page on it; stopped afterwards."""
    port = free_port()
    server = subprocess.Popen([sys.executable, "generate.py", f"--server_port={port}", *flags], cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/"
    wait_until_up(url)
    page = browser.new_page(viewport={"width": 1280, "height": 860})
    page.goto(url)
    page.wait_for_selector("#message textarea")
    try:
        yield page
    finally:
        page.close()
        server.terminate()
        server.wait(timeout=30)


@pytest.fixture(scope="module")
def page(gemma_gguf, browser):
    """The UI's mechanics on a base model (Gemma 3 270M), which writes on until max_new_tokens."""
    with web_ui(browser, f"--base_model={gemma_gguf}", "--max_new_tokens=24", "--max_seq_len=1024") as page:
        yield page


def test_a_first_chat_with_the_builtin_model(browser):
    """What a new user sees first: the built-in instruct model answers a question and ends its turn itself.
    The screenshot is README's (docs/screenshot.png is copied from tests/artifacts/first-chat.png)."""
    with web_ui(browser, "--max_seq_len=2048") as page:
        send(page, "What is the capital of France?")
        answer = wait_for_stats(page)
        assert "Paris" in answer and "· eos" in answer, answer
        page.screenshot(path=str(ARTIFACTS / "first-chat.png"))


def bot_texts(page) -> list[str]:
    return page.locator('#chat [data-testid="bot"]').all_inner_texts()


def send(page, text: str) -> None:
    page.fill("#message textarea", text)
    page.click("#send")


def wait_for_stats(page, answers: int = 1, timeout: float = 60.0) -> str:
    """The last answer's text once `answers` answers are shown and the last one is finished."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        texts = bot_texts(page)
        if len(texts) == answers and "tokens/s" in texts[-1]:
            return texts[-1]
        time.sleep(0.05)
    raise AssertionError(f"no finished answer; chat shows {bot_texts(page)}")


def test_a_message_streams_and_shows_its_speed(page):
    send(page, "The capital of France is")
    seen = set()
    deadline = time.time() + 60
    while time.time() < deadline:
        texts = bot_texts(page)
        if texts:
            seen.add(len(texts[-1]))
            if "tokens/s" in texts[-1]:
                break
        time.sleep(0.02)
    final = bot_texts(page)[-1]
    assert "tokens/s" in final and "ms to first token" in final and "24 tokens · length" in final
    assert len(seen) >= 3  # the answer grew in steps: streamed
    page.screenshot(path=str(ARTIFACTS / "chat.png"))


def test_regenerate_replaces_the_answer(page):
    before = bot_texts(page)
    page.click("#regenerate")
    page.wait_for_function("!document.querySelector('#chat [data-testid=\"bot\"]') || "
                           "!document.querySelector('#chat [data-testid=\"bot\"]').innerText.includes('tokens/s')")
    after = wait_for_stats(page)
    assert len(bot_texts(page)) == len(before) == 1
    assert after.split("tokens/s")[0].rsplit("\n", 1)[0] == before[-1].split("tokens/s")[0].rsplit("\n", 1)[0]


def test_undo_and_clear(page):
    send(page, "And then")
    wait_for_stats(page, answers=2)
    page.click("#undo")
    page.wait_for_function("document.querySelectorAll('#chat [data-testid=\"bot\"]').length == 1")
    page.click("#clear")
    page.wait_for_function("document.querySelectorAll('#chat [data-testid=\"bot\"]').length == 0")


def test_a_setting_changes_the_answer(page):
    page.click("#clear")
    set_max_new_tokens(page, 5)
    send(page, "Once upon a time")
    assert "5 tokens · length" in wait_for_stats(page)


def set_max_new_tokens(page, value: int) -> None:
    if not page.locator("#max-new-tokens").is_visible():
        page.click("#settings button, #settings .label-wrap")
    box = page.locator("#max-new-tokens input[type=number]")
    slider_shows = f"document.querySelector('#max-new-tokens input[type=range]').value == '{value}'"
    # the slider takes the typed number on its own schedule, and on a busy machine a number typed before the
    # component settles can be lost: type it again until the range input shows it
    for attempt in range(3):
        box.fill(str(value))
        box.press("Enter")
        box.blur()
        try:
            page.wait_for_function(slider_shows, timeout=10_000)
            break
        except Exception:
            if attempt == 2:
                raise
    time.sleep(0.3)


def test_stop_ends_the_answer_mid_stream(page):
    page.click("#clear")
    set_max_new_tokens(page, 600)
    send(page, "Tell me a very long story about a lighthouse keeper.")
    page.wait_for_function("document.querySelectorAll('#chat [data-testid=\"bot\"]').length == 1 && "
                           "document.querySelector('#chat [data-testid=\"bot\"]').innerText.length > 20")
    page.click("#stop")
    stopped = wait_for_stats(page, answers=1, timeout=10)  # the timing line comes at once, not after 600 tokens
    assert "cancelled" in stopped and "600 tokens" not in stopped
    time.sleep(1.0)
    assert bot_texts(page)[-1] == stopped  # nothing more arrives
    page.screenshot(path=str(ARTIFACTS / "stopped.png"))
    set_max_new_tokens(page, 8)
    send(page, "Hello")  # the model is free again
    assert "8 tokens · length" in wait_for_stats(page, answers=2)


def test_documents_upload_and_answer_with_sources(gemma_gguf, browser, tmp_path):
    """MyData: a file uploaded in the browser, read with a progress line, and the answer citing it."""
    notes = tmp_path / "lighthouse.txt"
    notes.write_text("Keeper's log.\nThe Skerry Point lighthouse was built in 1871 from Aberdeen granite.\n")
    port = free_port()
    server = subprocess.Popen([sys.executable, "generate.py", f"--server_port={port}", "--max_new_tokens=16",
                               "--langchain_mode=MyData", f"--persist_directory={tmp_path / 'db'}"],
                              cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until_up(f"http://127.0.0.1:{port}/")
        page = browser.new_page(viewport={"width": 1280, "height": 960})
        page.goto(f"http://127.0.0.1:{port}/")
        page.wait_for_selector("#doc-upload input[type=file]", state="attached")
        page.set_input_files("#doc-upload input[type=file]", str(notes))
        page.wait_for_function("document.querySelector('#doc-status').innerText.includes('1 added')", timeout=60000)
        assert "MyData: 1 file, 1 passages" in page.locator("#doc-status").inner_text()
        send(page, "When was the Skerry Point lighthouse built?")
        answer = wait_for_stats(page)
        assert "Sources" in answer and "[1] lighthouse.txt, lines 1-2" in answer
        page.screenshot(path=str(ARTIFACTS / "documents.png"))
        page.close()
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_the_model_panel_shows_the_decode_path_as_it_is_at_each_page_load(browser):
    """The Hugging Face backend's fast path warms up after the UI is up: a page loaded later shows it ready."""
    from conftest import FakeModel
    from test_settings import settings

    from quantchat.assembly import build_engine
    from quantchat.webui import WebUI
    model = FakeModel(["Hi"])
    model.info.decode = "generate until the compiled decode path is ready (compiling)"
    port = free_port()
    demo = WebUI(build_engine(settings(), model)).launch("127.0.0.1", port, share=False, block=False)
    page = browser.new_page()
    try:
        page.goto(f"http://127.0.0.1:{port}/")
        page.wait_for_function("document.querySelector('#model-panel')?.innerText.includes('compiling')")
        model.info.decode = "static cache + CUDA graphs"
        page.reload()
        page.wait_for_function("document.querySelector('#model-panel')?.innerText.includes('CUDA graphs')")
        assert "compiling" not in page.locator("#model-panel").inner_text()
    finally:
        page.close()
        close_web_ui(demo)
