"""Command lines from h2oGPT's own GPU and llama.cpp docs, as written there: each plans with --dry_run=True, offline,
exits 0 and names the backend that would load it. (The lines are split as a shell splits them; the docs' stray
backquote in --save_dir='save` is left out.)"""
import json
import shlex

import pytest

from quantchat.cli import main

LINES = [
    ("--base_model=h2oai/h2ogpt-oig-oasst1-512-6_9b --load_8bit=True", "hf"),
    ("--base_model=HuggingFaceH4/zephyr-7b-beta --load_8bit=True", "hf"),
    ("--base_model=h2oai/h2ogpt-oig-oasst1-512-6_9b --load_8bit=True --langchain_mode=UserData --user_path=user_path",
     "hf"),
    ("--base_model=TheBloke/Nous-Hermes-13B-GPTQ --score_model=None --load_gptq=model --use_safetensors=True "
     "--prompt_type=instruct --langchain_mode=UserData", "hf"),
    ("--base_model=Llama-2-70B-chat-GPTQ --load_gptq=gptq_model-4bit--1g --use_safetensors=True --prompt_type=llama2 "
     "--save_dir=save", "hf"),
    ("--base_model=TheBloke/Llama-2-7b-Chat-GPTQ --load_gptq=model --use_safetensors=True --prompt_type=llama2 "
     "--save_dir=save", "hf"),
    ("--base_model=meta-llama/Llama-2-70b-chat-hf --prompt_type=llama2 --rope_scaling=\"{'type': 'linear', 'factor': 4}\" "
     "--use_gpu_id=False --save_dir=savemeta70b", "hf"),
    ("--base_model=TheBloke/Llama-2-7b-Chat-GPTQ --load_gptq=model --use_safetensors=True --prompt_type=llama2 "
     "--score_model=None --save_dir=7bgptqrope4 --rope_scaling=\"{'type':'dynamic', 'factor':4}\" "
     "--max_max_new_tokens=15000 --max_new_tokens=15000 --max_time=12000", "hf"),
    ("--base_model=TheBloke/Llama-2-13B-chat-AWQ --score_model=None --load_awq=model --use_safetensors=True "
     "--prompt_type=llama2", "hf"),
    ("--base_model=TheBloke/Llama-2-70B-chat-AWQ --score_model=None --load_awq=model --use_safetensors=True "
     "--prompt_type=llama2", "hf"),
    ("--base_model=TheBloke/Llama-2-7b-Chat-GPTQ --load_gptq=model --use_safetensors=True --prompt_type=llama2 "
     "--save_dir=save --load_exllama=True --revision=gptq-4bit-32g-actorder_True --rope_scaling=\"{'alpha_value':4}\"",
     "exllama"),
    ("--base_model=TheBloke/Nous-Hermes-Llama2-GPTQ --load_gptq=model --use_safetensors=True --prompt_type=llama2 "
     "--save_dir=save --load_exllama=True --revision=gptq-4bit-32g-actorder_True --rope_scaling=\"{'alpha_value':4}\"",
     "exllama"),
    ("--base_model=TheBloke/Llama-2-70B-chat-GPTQ --load_gptq=gptq_model-4bit-128g --use_safetensors=True "
     "--prompt_type=llama2 --load_exllama=True --revision=main", "exllama"),
    ("--base_model=TheBloke/Llama-2-70B-chat-GPTQ --load_exllama=True --use_safetensors=True --use_gpu_id=False "
     "--load_gptq=main --prompt_type=llama2 --exllama_dict=\"{'set_auto_map':'20,20'}\"", "exllama"),
    ("--base_model=HuggingFaceH4/zephyr-7b-beta --prompt_type=zephyr --score_model=None --user_path=user_path", "hf"),
    ("--base_model=llama --prompt_type=wizard2 --score_model=None --langchain_mode='UserData' --user_path=user_path",
     "llamacpp"),
    ("--base_model=llama --llamacpp_dict=\"{'n_gpu_layers':20}\"", "llamacpp"),
    ("--base_model=llama --prompt_type=mistral --model_path_llama=https://huggingface.co/TheBloke/Mistral-7B-Instruct-"
     "v0.1-GGUF/resolve/main/mistral-7b-instruct-v0.1.Q4_K_M.gguf --max_seq_len=4096 --score_model=None", "llamacpp"),
    ("--base_model=TheBloke/Mixtral-8x7B-Instruct-v0.1-GGUF --prompt_type=mistral --max_seq_len=4096 "
     "--score_model=None", "llamacpp"),
    ("--base_model=llama --prompt_type=llama2 --score_model=None --langchain_mode=UserData --user_path=user_path "
     "--model_path_llama=https://huggingface.co/TheBloke/Llama-2-7b-Chat-GGUF/resolve/main/llama-2-7b-chat.Q6_K.gguf"
     "?download=true --max_seq_len=4096", "llamacpp"),
]


def make_local_70b_gptq(folder):
    """The 70B GPTQ line names a local folder: its config and AutoGPTQ's quantize_config (no weights are read)."""
    folder.mkdir()
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 8192,
              "intermediate_size": 28672, "num_hidden_layers": 80, "num_attention_heads": 64,
              "num_key_value_heads": 8, "vocab_size": 32000, "max_position_embeddings": 4096}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "quantize_config.json").write_text(json.dumps({"bits": 4, "group_size": -1, "desc_act": True}))
    (folder / "gptq_model-4bit--1g.safetensors").write_bytes(b"")


@pytest.mark.parametrize("line, backend", LINES, ids=[line[:60] for line, _ in LINES])
def test_h2ogpt_command_line_plans_offline(line, backend, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "user_path").mkdir()
    make_local_70b_gptq(tmp_path / "Llama-2-70B-chat-GPTQ")
    argv = shlex.split(line)
    assert main([*argv, "--dry_run=True"]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert f"backend                   {backend}  (" in out, out
    if "--base_model=llama" in line or "GGUF" in line:
        assert "note: would download" in out and "size unknown" in out   # offline: named, not fetched
