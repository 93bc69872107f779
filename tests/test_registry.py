"""The backend registry: a backend is one module and one row, and the whole command line runs through it."""
import io
import json
import subprocess
import sys
from pathlib import Path

import fake_backend
import pytest

from quantchat import loaders
from quantchat.cli import main
from quantchat.machine import GPU, Machine

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def fake_model(tmp_path, monkeypatch):
    monkeypatch.setattr(loaders, "BACKENDS", [fake_backend, *loaders.BACKENDS])
    (tmp_path / "config.json").write_text(json.dumps({"model_type": fake_backend.MODEL_TYPE, "prefix": "echo:"}))
    return tmp_path


def test_the_terminal_chat_runs_end_to_end_on_a_registered_backend(fake_model, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello there, model\n/exit\n"))  # what the terminal chat reads
    assert main([f"--base_model={fake_model}", "--cli=True", "--max_new_tokens=3"]) == 0
    out, err = capsys.readouterr()
    assert "echo: hello there," in out and "model" not in out.split("echo:")[1].split("\n")[0]  # 3 tokens at most
    assert "3 tokens · length" in out
    assert "backend                   fake  (a folder whose config.json says quantchat-fake)" in err


def test_a_backends_own_flag_checks_run(fake_model, capsys):
    assert main([f"--base_model={fake_model}", "--load_4bit=True", "--dry_run=True"]) == 2
    assert capsys.readouterr().err.strip() == "error: --load_4bit: the fake backend has no weights to quantize"


def test_a_flag_that_belongs_to_another_backend_is_refused(fake_model, capsys):
    assert main([f"--base_model={fake_model}", "--exllama_dict={'alpha_value': 2}", "--dry_run=True"]) == 2
    assert "--exllama_dict applies to the exllama backend" in capsys.readouterr().err


def test_the_command_line_imports_no_backend_library(fake_model):
    """The fake backend needs neither torch nor llama.cpp, so a whole run imports neither; nor does the API (an
    API-only server) import Gradio."""
    code = ("import sys; sys.path.insert(0, 'tests'); import fake_backend; from quantchat import loaders;"
            "import quantchat.api;"
            "loaders.BACKENDS.insert(0, fake_backend); from quantchat.cli import main;"
            f"code = main(['--base_model={fake_model}', '--cli=True']);"
            "print(code, sorted(m for m in ('torch', 'llama_cpp', 'transformers', 'gradio') if m in sys.modules))")
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         input="hi\n/exit\n")
    assert run.stdout.strip().endswith("0 []"), run.stdout + run.stderr   # exit code 0, none of them imported


def test_plans_take_the_machine_they_are_given(tiny_llama):
    """No GPU, one bf16 GPU, one fp16-only GPU: dtype and devices follow the Machine, nothing is patched."""
    from test_settings import settings
    s = settings(f"--base_model={tiny_llama}")
    cpu = loaders.plan(s, Machine())
    h200 = loaders.plan(s, Machine(gpus=(GPU(0, "H200", 141 * 2**30, 140 * 2**30, True),)))
    t4 = loaders.plan(s, Machine(gpus=(GPU(0, "T4", 16 * 2**30, 15 * 2**30, False),)))
    mps = loaders.plan(s, Machine(mps=True))
    assert (cpu.devices, cpu.dtype) == ("cpu", "float32")
    assert (h200.devices, h200.dtype, h200.options.device_map) == ("cuda:0 (H200)", "bfloat16", {"": 0})
    assert (t4.dtype, mps.devices, mps.dtype) == ("float16", "mps", "float16")
    with pytest.raises(loaders.UserError, match="only 1 GPU"):
        loaders.plan(settings(f"--base_model={tiny_llama}", "--gpu_id=1"), Machine(gpus=(GPU(0, "H200", 141 * 2**30,
                                                                                             None, True),)))


def test_nvidia_smi_listing_follows_cuda_visible_devices(tmp_path, monkeypatch):
    """nvidia-smi lists every GPU of the host; CUDA numbers only the visible ones, in CUDA_VISIBLE_DEVICES' order."""
    smi = tmp_path / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho '0, GPU-aaa, NVIDIA A, 81559, 80000, 9.0'\n"
                   "echo '1, GPU-bbb, NVIDIA B, 16384, 1000, 7.5'\n")
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:/usr/bin:/bin")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    both = Machine.probe()
    assert [(g.index, g.name, g.bf16) for g in both.gpus] == [(0, "NVIDIA A", True), (1, "NVIDIA B", False)]
    assert both.free_gpu_bytes(0) == 80000 * 2**20 and both.free_gpu_bytes(5) is None
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    assert [(g.index, g.name) for g in Machine.probe().gpus] == [(0, "NVIDIA B")]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-bbb,GPU-aaa")
    assert [g.name for g in Machine.probe().gpus] == ["NVIDIA B", "NVIDIA A"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert Machine.probe().gpus == ()
