"""Backend detection from files, dry-run plans, and the errors for paths that are not models."""
import re
import shutil
from pathlib import Path

import pytest
from test_settings import settings

from quantchat import loaders
from quantchat.cli import main
from quantchat.errors import UsageError, UserError

ROOT = Path(__file__).resolve().parent.parent


def test_no_base_model_is_the_builtin_instruct_gguf():
    from quantchat import packaged_models
    p = loaders.plan(settings())
    assert p.backend == "llamacpp" and p.model == str(packaged_models.assemble()) and "built-in Qwen2.5" in p.reason
    assert p.quantization == "GGUF Q4_K_M" and p.context_length == 8192
    assert p.weight_bytes == packaged_models.BUILTIN.size


def test_gguf_file_in_llamacpp_path_and_llama_with_model_path(gemma_gguf, tmp_path):
    shutil.copy(gemma_gguf, tmp_path / "g.gguf")
    p = loaders.plan(settings("--base_model=g.gguf", f"--llamacpp_path={tmp_path}"))
    assert p.backend == "llamacpp" and p.model == str(tmp_path / "g.gguf")
    p = loaders.plan(settings("--base_model=llama", f"--model_path_llama={tmp_path / 'g.gguf'}"))
    assert p.backend == "llamacpp" and "model_path_llama" in p.reason
    assert loaders.plan(settings(f"--base_model={tmp_path}")).reason == "a folder holding one .gguf file"


def test_llamacpp_options_follow_flags(gemma_gguf):
    p = loaders.plan(settings(f"--base_model={gemma_gguf}", "--max_seq_len=1024",
                              "--llamacpp_dict={'n_batch': 256, 'n_gqa': 8}", "--n_gpu_layers=0"))
    kwargs = p.options.llama_kwargs
    assert kwargs["n_ctx"] == 1024 and kwargs["n_batch"] == 256 and kwargs["n_gpu_layers"] == 0
    assert "n_gqa" not in kwargs and any("n_gqa" in n for n in p.notes)
    assert p.kv_cache_bytes == 18 * 1 * (256 + 256) * 1024 * 2  # gemma3 270m: 18 layers, 1 KV head of 256


def test_gguf_flags_that_do_not_apply(gemma_gguf):
    with pytest.raises(UsageError, match="fixed by the file"):
        loaders.plan(settings(f"--base_model={gemma_gguf}", "--load_4bit"))
    with pytest.raises(UserError, match="rope_scaling type 'dynamic'"):
        loaders.plan(settings(f"--base_model={gemma_gguf}", "--rope_scaling={'type':'dynamic','factor':2}"))
    p = loaders.plan(settings(f"--base_model={gemma_gguf}", "--rope_scaling={'type':'linear','factor':2}"))
    assert p.options.llama_kwargs["rope_freq_scale"] == 0.5


def test_hf_folder_plan_counts_weights_from_safetensors_headers(tiny_llama):
    fp32 = loaders.plan(settings(f"--base_model={tiny_llama}"))
    assert fp32.backend == "hf" and fp32.reason == "a folder with config.json"
    assert fp32.dtype == "float32" and fp32.devices == "cpu" and fp32.context_length == 512
    file_bytes = (tiny_llama / "model.safetensors").stat().st_size
    assert abs(fp32.weight_bytes - file_bytes) / file_bytes < 0.01  # fp32 on disk, fp32 in memory
    half = loaders.plan(settings(f"--base_model={tiny_llama}", "--load_half=True"))
    int8 = loaders.plan(settings(f"--base_model={tiny_llama}", "--load_8bit"))
    nf4 = loaders.plan(settings(f"--base_model={tiny_llama}", "--load_4bit"))
    assert half.dtype == "bfloat16" and half.weight_bytes == pytest.approx(fp32.weight_bytes / 2, rel=0.01)
    assert nf4.weight_bytes < int8.weight_bytes < fp32.weight_bytes
    assert int8.quantization == "int8" and nf4.quantization == "4-bit NF4, double quantization"


def test_rope_scaling_and_max_seq_len_set_the_context(tiny_llama):
    p = loaders.plan(settings(f"--base_model={tiny_llama}", "--rope_scaling={'type':'linear','factor':4}"))
    assert p.context_length == 2048 and p.options.rope_parameters["rope_type"] == "linear"
    assert loaders.plan(settings(f"--base_model={tiny_llama}", "--max_seq_len=300")).context_length == 300


@pytest.mark.parametrize("make, message", [
    (lambda p: p / "missing", "neither an existing path"),
    (lambda p: (p / "empty").mkdir() or p / "empty", "not a model folder"),
    (lambda p: (p / "notes.txt").write_text("x") and p / "notes.txt", "a file but not a .gguf"),
    (lambda p: (p / "broken.gguf").write_bytes(b"GGUF\x03\x00garbage") and p / "broken.gguf", "not a readable GGUF"),
    (lambda p: (p / "bad").mkdir() or (p / "bad" / "config.json").write_text("{oops") and p / "bad", "cannot be read"),
])
def test_paths_that_are_not_models(tmp_path, make, message):
    with pytest.raises(UserError, match=message):
        loaders.plan(settings(f"--base_model={make(tmp_path)}"))


def test_hub_id_is_planned_for_hugging_face_without_files():
    p = loaders.plan(settings("--base_model=someone/some-model-7b"))
    assert p.backend == "hf" and "hub id" in p.reason


def test_dry_run_prints_the_plan_and_exits_0(capsys, tiny_llama):
    assert main([f"--base_model={tiny_llama}", "--load_4bit", "--dry_run=True"]) == 0
    out = capsys.readouterr().out
    for field in ("backend", "devices", "dtype", "quantization", "context length", "weights (estimate)"):
        assert field in out


def test_a_wrong_prompt_type_or_score_model_is_said_before_the_model_loads(capsys, tiny_llama, monkeypatch):
    """A load can take minutes: a misspelt --prompt_type or a missing --score_model folder is refused before it
    (and by --dry_run), as the other flags are; --model_lock entries alike."""
    monkeypatch.setattr(loaders, "load", lambda plan: pytest.fail("the model was loaded"))
    assert main([f"--base_model={tiny_llama}", "--prompt_type=chatmll", "--cli=True"]) == 2
    assert "--prompt_type='chatmll' is not known; did you mean 'chatml'?" in capsys.readouterr().err
    lock = str([{"base_model": str(tiny_llama)}, {"base_model": str(tiny_llama), "prompt_type": "lama2"}])
    assert main([f"--model_lock={lock}", "--dry_run=True"]) == 2
    assert "did you mean 'llama2'?" in capsys.readouterr().err
    assert main([f"--base_model={tiny_llama}", "--score_model=/nowhere/reward", "--cli=True"]) == 1
    assert "--score_model=/nowhere/reward is not a folder" in capsys.readouterr().err


def test_a_tokenizer_path_that_is_not_a_folder_is_named(tiny_llama):
    """It was taken for a hub id inside the load, whose error named the base model."""
    for given in ("/nonexistent", str(tiny_llama / "config.json")):
        with pytest.raises(UserError, match=f"--tokenizer_base_model={given} is not a folder"):
            loaders.plan(settings(f"--base_model={tiny_llama}", f"--tokenizer_base_model={given}"))
    assert loaders.plan(settings(f"--base_model={tiny_llama}", f"--tokenizer_base_model={tiny_llama}")).backend == "hf"


def flags_doc_command_lines() -> list[str]:
    text = (ROOT / "docs" / "flags.md").read_text()
    lines = [m.group(1) for m in re.finditer(r"^\s*(python generate\.py[^\n]*)$", text, re.M)]
    assert len(lines) >= 10
    return lines


@pytest.mark.parametrize("line", flags_doc_command_lines())
def test_every_command_line_in_the_flags_doc_passes_dry_run(line, capsys):
    import shlex
    argv = shlex.split(line)[2:]
    assert main(argv + ["--dry_run=True"]) == 0, capsys.readouterr().err


def test_beam_search_is_refused_for_gguf(gemma_gguf):
    with pytest.raises(UsageError, match="beam search"):
        loaders.plan(settings("--num_beams=4"))


def test_unreadable_model_paths(tmp_path):
    (tmp_path / "dangling.gguf").symlink_to(tmp_path / "gone.gguf")
    with pytest.raises(UserError, match="GGUF file not found"):
        loaders.plan(settings(f"--base_model={tmp_path / 'dangling.gguf'}"))
    (tmp_path / "folder.gguf").mkdir()
    with pytest.raises(UserError, match="GGUF file not found"):
        loaders.plan(settings(f"--base_model={tmp_path / 'folder.gguf'}"))


def gpu_with_free(free: int):
    from quantchat.machine import GPU, Machine
    return Machine(gpus=(GPU(0, "a GPU", 80 * 2**30, free, True),))


def test_gguf_layers_fit_the_free_gpu_memory(monkeypatch, gemma_gguf):
    """With a GPU build and too little free memory, some layers stay on the CPU, and the plan says so."""
    import llama_cpp

    from quantchat.loaders import llamacpp
    monkeypatch.setattr(llama_cpp, "llama_supports_gpu_offload", lambda: True)  # the library's build, not the machine
    size = Path(gemma_gguf).stat().st_size
    p = loaders.plan(settings(f"--base_model={gemma_gguf}", "--max_seq_len=2048"),
                     gpu_with_free(llamacpp.LLAMACPP_RESERVE + size // 2))
    on_gpu, layers = p.gpu_layers
    assert layers == 18 and 0 < on_gpu < 18 and p.options.llama_kwargs["n_gpu_layers"] == on_gpu
    assert any(f"{on_gpu} of 18 layers on the GPU, the rest on the CPU" in n for n in p.notes)
    plenty = gpu_with_free(80 * 2**30)                                            # everything on the GPU
    assert loaders.plan(settings(f"--base_model={gemma_gguf}"), plenty).gpu_layers == (18, 18)
    pre = loaders.plan(settings(f"--base_model={gemma_gguf}", "--pre_layer=5"), plenty)  # text-generation-webui's flag
    assert pre.gpu_layers == (5, 18) and pre.options.llama_kwargs["n_gpu_layers"] == 5


def test_layers_that_fit():
    from quantchat.loaders.llamacpp import LLAMACPP_RESERVE, layers_that_fit
    gib = 2**30
    assert layers_that_fit(8 * gib, 0, 31, None) is None                        # free memory unknown: no decision
    assert layers_that_fit(8 * gib, 0, 31, LLAMACPP_RESERVE + 9 * gib) == 31
    assert layers_that_fit(8 * gib, 0, 31, LLAMACPP_RESERVE + 4 * gib) == 15    # half the file: about half the layers
    assert layers_that_fit(8 * gib, 0, 31, LLAMACPP_RESERVE) == 0


def test_pre_layer_is_for_gguf_models(tiny_llama):
    with pytest.raises(UsageError, match="--pre_layer .* applies to GGUF models"):
        loaders.plan(settings(f"--base_model={tiny_llama}", "--pre_layer=10"))
