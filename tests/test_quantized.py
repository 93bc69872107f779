"""Quantized checkpoints on the CPU: detection from files, h2oGPT's flags and their errors, and GPTQ and AWQ
checkpoints that quantize.py writes and generate.py loads through gptqmodel's CPU kernels."""
from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from conftest import build_tiny_llama
from test_settings import settings

from quantchat import loaders
from quantchat.errors import UsageError, UserError
from quantchat.loaders import checkpoint, exllama
from quantchat.quantize import main as quantize
from quantchat.settings import gpu_split

ROOT = Path(__file__).resolve().parent.parent
needs_gptqmodel = pytest.mark.skipif(importlib.util.find_spec("gptqmodel") is None, reason="gptqmodel not installed")


def with_quantization(tiny_llama, folder: Path, method: str, **extra) -> Path:
    shutil.copytree(tiny_llama, folder)
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": method, "bits": 4, "group_size": 32, **extra}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("method, flags, backend", [
    ("gptq", [], "hf"), ("awq", [], "hf"), ("gptq", ["--load_gptq=model"], "hf"),
    ("exl2", [], "exllama"), ("exl3", [], "exllama"), ("gptq", ["--load_exllama"], "exllama"),
])
def test_backend_follows_the_checkpoint(tiny_llama, tmp_path, method, flags, backend):
    folder = with_quantization(tiny_llama, tmp_path / method, method)
    found, _, why = loaders.choose(settings(f"--base_model={folder}", *flags))
    assert found.NAME == backend and method in why


def test_the_plan_names_the_4bit_kernel_on_cuda(tiny_llama, tmp_path):
    """GPTQ on a GPU runs on Marlin (the fastest measured), and the plan says so; a kernel the user names, AWQ, and
    the CPU are left to gptqmodel."""
    from quantchat.machine import GPU, Machine
    gpu = Machine(gpus=(GPU(0, "a GPU", 80 * 2**30, 70 * 2**30, True),))
    gptq = with_quantization(tiny_llama, tmp_path / "gptq", "gptq")
    p = loaders.plan(settings(f"--base_model={gptq}"), gpu)
    assert p.options.gptq_dict == {"backend": "marlin"} and any("Marlin kernel" in n for n in p.notes), p.notes
    named = loaders.plan(settings(f"--base_model={gptq}", "--gptq_dict={'backend': 'triton'}"), gpu)
    assert named.options.gptq_dict == {"backend": "triton"} and not any("Marlin" in n for n in named.notes)
    assert "backend" not in loaders.plan(settings(f"--base_model={gptq}"), Machine(gpus=())).options.gptq_dict
    awq = with_quantization(tiny_llama, tmp_path / "awq", "awq")
    assert "backend" not in loaders.plan(settings(f"--base_model={awq}"), gpu).options.gptq_dict


@pytest.mark.parametrize("method, flags, message", [
    ("gptq", ["--load_awq=model"], "expects a AWQ checkpoint, and .* quantized with gptq"),
    ("awq", ["--load_exllama"], "--load_exllama loads GPTQ, EXL2 and EXL3 folders"),
])
def test_flag_that_does_not_match_the_checkpoint(tiny_llama, tmp_path, method, flags, message):
    folder = with_quantization(tiny_llama, tmp_path / "q", method)
    with pytest.raises(UserError, match=message):
        loaders.plan(settings(f"--base_model={folder}", *flags))
    with pytest.raises(UserError, match="unquantized checkpoint"):
        loaders.plan(settings(f"--base_model={tiny_llama}", "--load_gptq=model"))


def test_a_gguf_file_refuses_the_quantized_flags(gemma_gguf):
    with pytest.raises(UsageError, match="GGUF file .*drop --load_gptq"):
        loaders.plan(settings(f"--base_model={gemma_gguf}", "--load_gptq=model"))


def test_autogptq_folder_is_read_from_quantize_config_and_its_weight_name(tiny_llama, tmp_path):
    folder = tmp_path / "old"
    shutil.copytree(tiny_llama, folder)
    (folder / "model.safetensors").rename(folder / "gptq_model-4bit-128g.safetensors")
    (folder / "quantize_config.json").write_text(json.dumps({"bits": 4, "group_size": 128, "desc_act": False}))
    q = checkpoint.quantization(folder, json.loads((folder / "config.json").read_text()))
    assert q["quant_method"] == "gptq" and checkpoint.describe(q) == "gptq 4-bit, group 128"
    view = checkpoint.weight_view(folder, "gptq_model-4bit-128g", q)
    assert (view / "model.safetensors").resolve() == (folder / "gptq_model-4bit-128g.safetensors").resolve()
    assert json.loads((view / "config.json").read_text())["quantization_config"]["bits"] == 4
    assert (view / "tokenizer.json").is_symlink() and not (view / "gptq_model-4bit-128g.safetensors").exists()
    with pytest.raises(UserError, match="no model.safetensors .*gptq_model-4bit-128g"):
        checkpoint.weight_view(folder, "model", q)


def sharded(folder: Path, out: Path, basename: str) -> Path:
    """The checkpoint with its weights in two shards and an index, as larger checkpoints are saved."""
    from safetensors.torch import load_file, save_file
    shutil.copytree(folder, out)
    tensors = load_file(out / "model.safetensors")
    (out / "model.safetensors").unlink()
    names = sorted(tensors)
    weight_map = {}
    for number, part in enumerate((names[: len(names) // 2], names[len(names) // 2:]), start=1):
        shard = f"{basename}-{number:05d}-of-00002.safetensors"
        save_file({n: tensors[n] for n in part}, out / shard, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, shard))
    (out / f"{basename}.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return out


@needs_gptqmodel
def test_a_sharded_gptq_checkpoint_loads_by_its_index(tmp_path):
    """Checkpoints too large for one file come as shards and NAME.safetensors.index.json: --load_gptq=NAME names
    the index, as it names the one file otherwise (and the folder alone loads as a single file's does); all give the
    single file's greedy answer."""
    from bench.decode import mock_quantized
    whole = mock_quantized(build_tiny_llama(tmp_path / "random", hidden_size=128), "gptq")
    modern = sharded(whole, tmp_path / "shards", "model")
    older = sharded(whole, tmp_path / "autogptq", "gptq_model-4bit-128g")  # the quantization in quantize_config.json
    config = json.loads((older / "config.json").read_text())
    (older / "quantize_config.json").write_text(json.dumps(config.pop("quantization_config")))
    (older / "config.json").write_text(json.dumps(config))

    def answer(folder: Path, name: str | None) -> str:
        flags = [f"--load_gptq={name}"] if name else []  # (a GPTQ folder loads without the flag too)
        model = loaders.load(loaders.plan(settings(f"--base_model={folder}", *flags)))
        try:
            return "".join(model.stream("the cat sat", loaders.GenParams(max_new_tokens=8), threading.Event()))
        finally:
            model.close()

    expected = answer(whole, "model")
    assert expected and answer(modern, "model") == expected and answer(modern, None) == expected
    assert answer(older, "gptq_model-4bit-128g") == expected
    with pytest.raises(UserError, match=r"no model.safetensors \(weight files there: gptq_model-4bit-128g\)"):
        checkpoint.weight_view(older, "model", {"quant_method": "gptq", "bits": 4})


def test_exllama_plan_rope_and_gpu_split(tiny_llama, tmp_path):
    folder = with_quantization(tiny_llama, tmp_path / "exl2", "exl2", bits=4.25)
    p = loaders.plan(settings(f"--base_model={folder}", "--load_exllama",
                              "--exllama_dict={'set_auto_map': '20,20', 'alpha_value': 2}"))
    assert p.backend == "exllama" and p.options.library == "exllamav2" and p.options.split == [20.0, 20.0]
    assert p.options.alpha == 2.0 and p.context_length == 1024 and "exl2 4.25 bits per weight" in p.quantization
    assert "2 GPUs" in p.devices
    assert exllama.rope_settings(settings("--rope_scaling={'type':'linear','factor':2}"), "gptq") == (1.0, 2.0)
    assert exllama.rope_settings(settings("--rope_scaling={'alpha_value':4}"), "gptq") == (4.0, 1.0)
    with pytest.raises(UsageError, match="not available through ExLlama"):
        exllama.rope_settings(settings("--rope_scaling={'type':'dynamic','factor':2}"), "gptq")
    with pytest.raises(UsageError, match="exllamav3 takes RoPE scaling from the model's config.json"):
        exllama.rope_settings(settings("--rope_scaling={'alpha_value':4}"), "exl3")
    assert gpu_split({"gpu_split": [10, 30.5]}) == [10.0, 30.5] and gpu_split({}) is None
    # an EXL2 folder takes exllama_dict without --load_exllama; a plain folder refuses it
    assert loaders.plan(settings(f"--base_model={folder}", "--exllama_dict={'max_seq_len': 2048}")).context_length == 2048
    with pytest.raises(UsageError, match="--exllama_dict applies to the exllama backend"):
        loaders.plan(settings(f"--base_model={tiny_llama}", "--exllama_dict={'alpha_value': 2}"))


@pytest.mark.skipif(importlib.util.find_spec("exllamav2") is not None, reason="exllamav2 is installed")
def test_missing_exllama_is_one_line_with_the_install_command(tiny_llama, tmp_path):
    folder = with_quantization(tiny_llama, tmp_path / "exl2", "exl2")
    run = subprocess.run([sys.executable, "generate.py", f"--base_model={folder}", "--cli=True"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    lines = run.stderr.strip().splitlines()
    assert run.returncode == 1 and lines[-1].startswith("error: ") and 'pip install -e ".[exllama]"' in lines[-1]


def test_missing_gptqmodel_is_one_line(tiny_llama, tmp_path, monkeypatch):
    folder = with_quantization(tiny_llama, tmp_path / "q", "gptq")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gptqmodel" else real(name, *a))
    with pytest.raises(UserError, match=r'needs the package .gptqmodel.*pip install -e "\.\[gptq\]"'):
        loaders.load(loaders.plan(settings(f"--base_model={folder}")))


@pytest.mark.parametrize("args, message", [
    ({"method": "hqq"}, "choose one of gptq, awq, exl2, exl3"),
    ({"method": "exl2", "bits": 1.5}, "exl2 takes 2 to 8 bits"),
    ({"base_model": "/nonexistent"}, "not a model folder"),
    ({"bits": 5}, "takes 2, 3, 4 or 8"),
    ({"method": "awq", "bits": 8}, "4-bit weights only"),
    ({"calibration": "/nonexistent.txt"}, "no such file"),
    ({"out": ""}, "--out: name the new folder"),
    ({"out": "FILE"}, "exists and is not an empty folder"),  # (a traceback before: NotADirectoryError)
    ({"samples": -1}, "take 1 to 100,000 samples"),  # (accepted before)
    ({"base_model": "DAMAGED"}, "model.safetensors is not a readable safetensors file"),  # (gptqmodel's traceback)
])
def test_quantize_refuses_bad_arguments(tiny_llama, tmp_path, capsys, args, message):
    """One line and a non-zero exit, before the long run starts."""
    (tmp_path / "a-file").write_text("x")
    damaged = tmp_path / "damaged"
    shutil.copytree(tiny_llama, damaged)
    (damaged / "model.safetensors").write_bytes(b"\x01\x02")
    stand_ins = {"FILE": str(tmp_path / "a-file"), "DAMAGED": str(damaged)}
    args = {key: stand_ins.get(value, value) if isinstance(value, str) else value for key, value in args.items()}
    with pytest.raises(SystemExit) as stop:
        quantize(**{"base_model": str(tiny_llama), "method": "gptq", "out": str(tmp_path / "out"), **args})
    assert stop.value.code in (1, 2) and message in capsys.readouterr().err


@pytest.mark.parametrize("method, package", [("exl2", "exllamav2"), ("exl3", "exllamav3")])
def test_quantize_names_the_missing_exllama_package(tiny_llama, tmp_path, capsys, monkeypatch, method, package):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == package else real(name, *a))
    with pytest.raises(SystemExit) as stop:
        quantize(base_model=str(tiny_llama), method=method, out=str(tmp_path / "out"))
    assert stop.value.code == 1
    assert f"--method={method} needs the package '{package}'" in capsys.readouterr().err


def last_logits(folder: Path, text: str):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with torch.inference_mode():
        return model(tokenizer(text, return_tensors="pt").input_ids).logits[0].float()


@needs_gptqmodel
@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_quantize_then_chat_through_the_flag_on_the_cpu(tmp_path_factory, method, capsys):
    import torch
    base = build_tiny_llama(tmp_path_factory.mktemp("base"), hidden_size=128)  # AWQ wants 64-multiple outputs
    out = tmp_path_factory.mktemp("q") / method
    quantize(base_model=str(base), method=method, out=str(out), group_size=32, samples=8, sample_tokens=128)
    assert f"wrote a {method} checkpoint" in capsys.readouterr().out
    with pytest.raises(SystemExit):  # the folder is quantized already
        quantize(base_model=str(out), method=method, out=str(tmp_path_factory.mktemp("again") / "x"))
    model = loaders.load(loaders.plan(settings(f"--base_model={out}", f"--load_{method}=model")))
    assert model.info.quantization.startswith(f"{method} 4-bit, group 32, kernel ")
    text = "the cat sat on the mat and the dog"
    ids = model.tokenizer(text, return_tensors="pt").input_ids
    with torch.inference_mode():
        quantized = model.model(ids).logits[0].float()
    reference = last_logits(base, text)
    other = last_logits(build_tiny_llama(tmp_path_factory.mktemp("other"), seed=1, hidden_size=128), text)
    same = torch.nn.functional.cosine_similarity(quantized, reference, dim=-1).mean().item()
    unrelated = torch.nn.functional.cosine_similarity(other, reference, dim=-1).mean().item()
    # 4-bit noise leaves the logits close to the model they came from, far closer than another model's
    assert same > 0.9 and same > unrelated + 0.3, (same, unrelated)
    # the fast decode path's static cache (uncompiled on the CPU) gives generate's greedy tokens with these layers
    params = loaders.GenParams(max_new_tokens=24)
    by_generate = "".join(model.stream(text, params, threading.Event()))
    model.close()
    fast = loaders.load(loaders.plan(settings(f"--base_model={out}", "--fast_decode=True")))
    assert fast.info.decode == "static cache" and len(by_generate) > 0
    assert "".join(fast.stream(text, params, threading.Event())) == by_generate
    fast.close()
    # RoPE scaling reaches the quantized model as it does an unquantized one
    scaled = loaders.load(loaders.plan(settings(f"--base_model={out}", "--rope_scaling={'type':'linear','factor':2}")))
    assert scaled.info.context_length == 1024 and scaled.model.config.rope_parameters["factor"] == 2
    with torch.inference_mode():
        rescaled = scaled.model(ids).logits[0].float()
    assert not torch.allclose(rescaled, quantized, atol=1e-4)  # the same weights read positions differently
    scaled.close()


@needs_gptqmodel
@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_speed_bench_mock_checkpoints_load(tmp_path, method):
    """bench/decode.py's GPTQ/AWQ rows use mock-quantized random models: they must load through the flags."""
    from bench.decode import mock_quantized
    base = build_tiny_llama(tmp_path / "random", hidden_size=128)
    out = mock_quantized(base, method)
    assert out == tmp_path / f"random-{method}" and mock_quantized(base, method) == out  # written once
    model = loaders.load(loaders.plan(settings(f"--base_model={out}", f"--load_{method}=model")))
    assert model.info.quantization.startswith(f"{method} 4-bit, group 128, kernel ")
    model.close()


def build_tiny_gemma3(folder: Path) -> Path:
    """A random text-only Gemma 3 (one sliding-window and one full-attention layer) with the test tokenizer."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig
    tokenizer = build_tiny_llama(folder.with_name(folder.name + "-tok"))
    shutil.copytree(tokenizer, folder, ignore=shutil.ignore_patterns("config.json", "*.safetensors"))
    ids = json.loads((tokenizer / "config.json").read_text())
    config = Gemma3TextConfig(vocab_size=ids["vocab_size"], hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                              num_attention_heads=2, num_key_value_heads=1, head_dim=64, sliding_window=64,
                              layer_types=["sliding_attention", "full_attention"], max_position_embeddings=512,
                              bos_token_id=ids["bos_token_id"], eos_token_id=ids["eos_token_id"], pad_token_id=0)
    Gemma3ForCausalLM(config).save_pretrained(folder)
    return folder


def test_awq_refuses_text_only_gemma3(tmp_path, capsys):
    """gptqmodel's AWQ turns a Gemma 3 into noise (or dies half-way): refused with one line before any work."""
    with pytest.raises(SystemExit) as stop:
        quantize(base_model=str(build_tiny_gemma3(tmp_path / "gemma3")), method="awq", out=str(tmp_path / "awq"))
    assert stop.value.code != 0
    assert "AWQ cannot quantize text-only Gemma 3 yet: use --method=gptq" in capsys.readouterr().err
