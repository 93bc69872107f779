"""Flag parsing as h2oGPT users write it, and the one-line errors for what they get wrong."""
import subprocess
import sys
from pathlib import Path

import pytest

from quantchat.cli import parse_flags
from quantchat.errors import UsageError
from quantchat.settings import Settings, from_flags

ROOT = Path(__file__).resolve().parent.parent


def settings(*argv: str) -> Settings:
    return from_flags(parse_flags(list(argv)))


def test_defaults_follow_h2ogpt_except_safety():
    s = settings()
    assert (s.base_model, s.load_8bit, s.load_4bit, s.low_bit_mode, s.use_gpu_id, s.gpu_id) == ("", False, False, 1,
                                                                                             True, 0)
    assert s.trust_remote_code is False and s.share is False and s.server_name == "localhost"
    assert s.score_model is None and s.offload_folder == "offline_folder" and s.llamacpp_path == "llamacpp_path"


def test_h2ogpt_command_line_values():
    s = settings("--base_model=h2oai/h2ogpt-4096-llama2-7b-chat", "--load_8bit", "--prompt_type=llama2",
                 "--max_seq_len=4096", "--temperature=0.7", "--use_gpu_id=False", "--gpu_id=1",
                 "--system_prompt=You are Bob, a bot.", "--n_gpu_layers=20")
    assert s.base_model == "h2oai/h2ogpt-4096-llama2-7b-chat" and s.load_8bit is True
    assert (s.prompt_type, s.max_seq_len, s.temperature, s.use_gpu_id, s.gpu_id) == ("llama2", 4096, 0.7, False, 1)
    assert s.system_prompt == "You are Bob, a bot." and s.n_gpu_layers == 20


@pytest.mark.parametrize("text", ["{'type':'dynamic', 'factor':4}", '{"type": "dynamic", "factor": 4}'])
def test_dict_flags_accept_python_and_json(text):
    assert settings(f"--rope_scaling={text}").rope_scaling == {"type": "dynamic", "factor": 4}


def test_llamacpp_dict_and_space_separated_value():
    s = settings("--llamacpp_dict", "{'n_gpu_layers':20, 'n_batch': 128}")
    assert s.llamacpp_dict == {"n_gpu_layers": 20, "n_batch": 128}


@pytest.mark.parametrize("argv, message", [
    (["--rope_scaling={'type':'dynamic', 'factor':4"], "cannot parse"),
    (["--llamacpp_dict=[1, 2]"], "not a valid dict"),
    (["--lod_8bit"], "did you mean --load_8bit"),
    (["--load_8bit", "--load_4bit"], "clash"),
    (["--low_bit_mode=7"], "choose 0, 1, 2, 3 or 4"),
    (["--temperature=hot"], "not a valid number"),
    (["--top_p=1.5"], "between"),
    (["--temperature=nan"], "not a valid number"), (["--repetition_penalty=inf"], "not a valid number"),
    (["--top_k=-1"], "between 0 and 1000000"), (["--seed=-5"], "between 0 and"),
    (["--rope_scaling={'type': 'linear', 'factor': 0}"], "factor must be a number above 0"),
    (["--load_exllama", "--exllama_dict={'alpha_value': 1e400}"], "positive number"),
    (["--max_new_tokens=-3"], "at least 1"),
    (["--load_8bit=maybe"], "boolean"),
    (["--rope_scaling={'factor': 2}"], "needs a type and a factor"),
    (["--rope_scaling={'type': 'weird', 'factor': 2}"], "type 'weird' is not known; use one of linear, dynamic"),
    (["--load_gptq=model", "--load_4bit"], "already quantized"),
    (["--load_gptq=model", "--load_awq=model"], "clash"),
    (["--gptq_dict={'bogus': 1}"], "unknown key 'bogus'"),
    (["--load_exllama", "--exllama_dict={'alpha': 2}"], "unknown key 'alpha'"),
    (["--load_exllama", "--exllama_dict={'alpha_value': -2}"], "positive number"),
    (["--load_exllama", "--exllama_dict={'set_auto_map': '20,x'}"], "GB per GPU"),
    (["--langchain_mode=Wiki"], "choose one of LLM, UserData, MyData"),
    (["--user_path=docs", "--db_type=faiss"], "only chroma"),
    (["--user_path=docs", "--top_k_docs=0"], "-1 for as many as fit"),
    (["--chunk_size=10"], "at least 64"),
    (["--model_lock=[1, 2]"], "each entry is a dict"),
    (["--num_speculative_tokens=0"], "between 1 and 64"), (["--speculative=often"], "boolean"),
    (["--draft_model=small.gguf", "--speculative=False"], "clash"),
    # logins are checked with the flag, not when the web UI starts
    (["--auth=[('alice',)]"], "write it as \\[\\('user', 'password'\\)"),
    (["--auth=/nowhere/logins.json"], "--auth=/nowhere/logins.json: no such file"),
])
def test_usage_errors(argv, message):
    with pytest.raises(UsageError, match=message):
        settings(*argv)


def test_langchain_modes_in_h2ogpt_spellings():
    assert settings("--langchain_mode=LLM", "--score_model=None").langchain_mode == "LLM"
    assert settings("--langchain_mode=Disabled").langchain_mode == "LLM"
    assert settings().langchain_mode == "LLM"
    assert settings("--user_path=docs").langchain_mode == "UserData"   # h2oGPT: a user_path means UserData
    assert settings("--langchain_mode=mydata").langchain_mode == "MyData"
    assert settings("--langchain_mode=LLM", "--user_path=docs").langchain_mode == "LLM"


def test_bad_command_line_exits_2_with_one_line():
    run = subprocess.run([sys.executable, "generate.py", "--load_8bit", "--load_4bit"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    assert run.stderr.strip().splitlines() == ["error: --load_8bit and --load_4bit clash: choose one"]


def test_help_lists_every_flag():
    run = subprocess.run([sys.executable, "generate.py", "--help"], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0
    for name in Settings.names():
        assert f"--{name} " in run.stdout
