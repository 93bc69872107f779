"""GGUF files named by a hub repository or a URL: fetched into --llamacpp_path through huggingface_hub, tested
end to end against a stand-in hub on 127.0.0.1 (HF_ENDPOINT) serving the real Gemma GGUF."""
import fcntl
import hashlib
import os
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest
from hub_server import StandInHub

from quantchat.errors import UserError
from quantchat.loaders import download

ROOT = Path(__file__).resolve().parent.parent
REPO = "someone/Gemma-3-270M-GGUF"
FILE = "gemma-3-270m.Q4_K_M.gguf"


@pytest.mark.parametrize("name, expect", [
    ("TheBloke/Mixtral-8x7B-Instruct-v0.1-GGUF", ("TheBloke/Mixtral-8x7B-Instruct-v0.1-GGUF", "", "Q4_K_M", "")),
    ("owner/model:Q5_K_M", ("owner/model", "", "Q5_K_M", "")),
    ("owner/model:model.Q8_0.gguf", ("owner/model", "model.Q8_0.gguf", "Q4_K_M", "")),
    ("https://huggingface.co/TheBloke/Llama-2-7b-Chat-GGUF/resolve/main/llama-2-7b-chat.Q6_K.gguf?download=true",
     ("TheBloke/Llama-2-7b-Chat-GGUF", "llama-2-7b-chat.Q6_K.gguf", "Q4_K_M", "")),
    ("https://example.org/files/m.gguf", ("", "", "Q4_K_M", "https://example.org/files/m.gguf")),
    ("meta-llama/Llama-2-7b-chat-hf", None),
    ("./local/model", None),
])
def test_the_forms_that_name_a_remote_gguf(name, expect):
    remote = download.parse(name)
    assert (remote and (remote.repo, remote.filename, remote.quant, remote.url)) == expect


def test_a_url_that_is_not_a_gguf_is_refused():
    with pytest.raises(UserError, match="does not name a .gguf file"):
        download.parse("https://example.org/model.bin")


def test_choosing_a_file_by_quantization():
    files = ["README.md", "m.Q4_K_M.gguf", "m.Q5_K_M.gguf", "big.Q8_0-00001-of-00002.gguf",
             "big.Q8_0-00002-of-00002.gguf"]
    assert download._choose(download.RemoteGGUF("o/r", quant="q5_k_m"), files) == ["m.Q5_K_M.gguf"]
    assert download._choose(download.RemoteGGUF("o/r", quant="Q8_0"), files) == files[3:]   # every shard
    with pytest.raises(UserError, match="no IQ2_XS GGUF file; choose one of Q4_K_M, Q5_K_M, Q8_0"):
        download._choose(download.RemoteGGUF("o/r", quant="IQ2_XS"), files)


def generate(hub_url: str, folder: Path, *flags: str, offline: bool = False, **popen):
    env = {**os.environ, "HF_ENDPOINT": hub_url, "HF_HOME": str(folder.parent / "hf-home"),
           "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_OFFLINE": "1" if offline else "0"}
    argv = [sys.executable, "generate.py", f"--llamacpp_path={folder}", "--max_seq_len=512", *flags]
    if popen:
        return subprocess.Popen(argv, cwd=ROOT, env=env, text=True, **popen)
    return subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, input="/exit\n", timeout=300)


def read_all(fd: int) -> str:
    chunks = []
    while True:
        try:
            chunk = os.read(fd, 65536)
        except OSError:  # the other end is closed
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(fd)
    return b"".join(chunks).decode(errors="replace")


def test_download_dry_run_resume_reuse_and_offline(gemma_gguf, tmp_path):
    source = Path(gemma_gguf)
    folder = tmp_path / "llamacpp_path"
    with StandInHub({REPO: {FILE: source, "gemma-3-270m.Q8_0.gguf": source, "README.md": source}}) as hub:
        dry = generate(hub.url, folder, f"--base_model={REPO}", "--dry_run=True")
        assert dry.returncode == 0, dry.stderr
        assert f"would download {REPO}/{FILE} ({source.stat().st_size / 2**30:.2f} GiB)" in dry.stdout
        assert not hub.downloads(FILE) and not folder.exists()                 # nothing was downloaded

        # a first start stalls part-way (a download the user stops, or whose machine dies): stop it there
        hub.stall_first_download_at = 50_000_000
        terminal, their_end = os.openpty()  # a terminal (of 100 columns), where progress bars are drawn
        fcntl.ioctl(their_end, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 100, 0, 0))
        first = generate(hub.url, folder, f"--base_model={REPO}", "--cli=True", stdin=subprocess.DEVNULL,
                         stdout=subprocess.DEVNULL, stderr=their_end)
        assert hub.stalled.wait(120)
        incomplete = folder / (FILE + ".incomplete")
        deadline = time.monotonic() + 60
        while not incomplete.is_file() or incomplete.stat().st_size < 50_000_000:
            assert time.monotonic() < deadline, "the partial file did not grow"
            time.sleep(0.2)
        first.kill()
        first.wait()
        os.close(their_end)
        kept = incomplete.stat().st_size
        progress = read_all(terminal)
        assert f"downloading {REPO}/{FILE}" in progress and "MB/s" in progress  # the progress bar was shown

        second = generate(hub.url, folder, f"--base_model={REPO}", "--cli=True")
        assert second.returncode == 0, second.stderr
        assert hub.downloads(FILE)[-1] == f"bytes={kept}-" and kept >= 50_000_000  # resumed, not started over
        assert hashlib.sha256((folder / FILE).read_bytes()).digest() == hashlib.sha256(source.read_bytes()).digest()
        assert "quantchat:" in second.stdout                                    # the chat started on it

        seen = len(hub.requests)
        third = generate(hub.url, folder, f"--base_model={REPO}", "--cli=True")
        assert third.returncode == 0 and len(hub.requests) == seen             # not asked again, not downloaded

        offline = generate(hub.url, folder, f"--base_model={REPO}:Q8_0", "--cli=True", offline=True)
        errors = [line for line in offline.stderr.splitlines() if line.startswith("error")]
        assert offline.returncode == 1 and len(errors) == 1 and "offline" in errors[0], offline.stderr
        missing = generate(hub.url, folder, "--base_model=nobody/Nothing-GGUF", "--cli=True")
        assert missing.returncode == 1 and "no such repository" in missing.stderr


def test_base_model_llama_fetches_h2ogpts_default_file(gemma_gguf, tmp_path):
    """--base_model=llama without --model_path_llama: h2oGPT's default GGUF (a huggingface.co URL), through
    HF_ENDPOINT like any hub file."""
    folder = tmp_path / "llamacpp_path"
    default = {"TheBloke/Llama-2-7b-Chat-GGUF": {"llama-2-7b-chat.Q6_K.gguf": Path(gemma_gguf)}}
    with StandInHub(default) as hub:
        dry = generate(hub.url, folder, "--base_model=llama", "--dry_run=True")
        assert dry.returncode == 0 and "would download TheBloke/Llama-2-7b-Chat-GGUF/llama-2-7b-chat.Q6_K.gguf" \
            in dry.stdout, dry.stdout + dry.stderr
        run = generate(hub.url, folder, "--base_model=llama", "--cli=True")
        assert run.returncode == 0, run.stderr
        assert (folder / "llama-2-7b-chat.Q6_K.gguf").stat().st_size == Path(gemma_gguf).stat().st_size
