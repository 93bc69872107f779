"""Damaged or hostile model files, and a fuzzing pass over them and over the API's request bodies: every case ends
in one line that names the file (or an OpenAI-shaped 4xx), never a traceback, a hang or a 500."""
import json
import os
import shutil
import struct
import threading
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_settings import settings as flags

from quantchat import loaders
from quantchat.errors import UserError
from quantchat.machine import Machine

CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
          "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 400,
          "max_position_embeddings": 512}


def folder_with(tmp_path: Path, config=None, weights: bytes | None = None) -> Path:
    folder = tmp_path / "model"
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(json.dumps(CONFIG if config is None else config))
    if weights is not None:
        (folder / "model.safetensors").write_bytes(weights)
    return folder


def plan(folder: Path, *more: str):
    return loaders.plan(flags(f"--base_model={folder}", *more), Machine())


def header(value: bytes, claimed: int | None = None) -> bytes:
    return struct.pack("<Q", len(value) if claimed is None else claimed) + value


@pytest.mark.parametrize("weights, message", [
    (b"\x01\x02\x03", "header is cut short"),
    (header(b"{}", claimed=2**60), "claims 1152921504606846976 bytes"),
    (header(b"[1, 2, 3]"), "header is not a JSON object"),
    (header(b"{oops"), "header is not a JSON object"),
    (header(json.dumps({"w": {"dtype": "F32", "shape": "64x64", "data_offsets": [0, 4]}}).encode()), "no valid shape"),
    (header(json.dumps({"w": {"dtype": "F32", "shape": [-1, 64], "data_offsets": [0, 4]}}).encode()), "no valid shape"),
])
def test_damaged_safetensors_headers_are_one_line(tmp_path, weights, message):
    with pytest.raises(UserError, match=f"model.safetensors is not a readable safetensors file: .*{message}"):
        plan(folder_with(tmp_path, weights=weights))


@pytest.mark.parametrize("config, message", [
    ([1, 2, 3], "holds a list"),
    ("just text", "holds a str"),
    ({**CONFIG, "num_attention_heads": 0}, "num_attention_heads is 0"),
    ({**CONFIG, "hidden_size": "64"}, "hidden_size is '64'"),
    ({**CONFIG, "num_hidden_layers": True}, "num_hidden_layers is True"),
    ({**CONFIG, "vocab_size": 10**15}, "vocab_size is 1000000000000000"),
    ({**CONFIG, "quantization_config": "gptq"}, "quantization_config is not an object"),
    ({**CONFIG, "quantization_config": {"quant_method": "gptq", "bits": "four"}}, "bits is 'four'"),
])
def test_damaged_config_json_is_one_line(tmp_path, config, message):
    with pytest.raises(UserError, match=message):
        plan(folder_with(tmp_path, config=config))


@pytest.mark.parametrize("index, message", [
    ("{not json", "cannot be read as a JSON object"),
    ({"weight_map": {"w": "model-00001-of-00001.safetensors"}}, "needs a 'metadata' object"),
    ({"metadata": {}, "weight_map": {}}, "needs a 'metadata' object and a 'weight_map'"),
    ({"metadata": {}, "weight_map": {"w": "../../../etc/passwd"}}, "lists '../../../etc/passwd', which is not"),
    ({"metadata": {}, "weight_map": {"w": "model-00002-of-00002.safetensors"}}, "lists 'model-00002-of-00002"),
    ({"metadata": {}, "weight_map": {"w": 5}}, "lists '5', which is not a .safetensors file"),
])
def test_a_damaged_index_of_shards_is_one_line(tmp_path, index, message):
    """A sharded checkpoint's index is checked before transformers reads it: it would open a listed path outside
    the folder, or stop at a KeyError for the missing metadata."""
    folder = folder_with(tmp_path)
    (folder / "model-00001-of-00001.safetensors").write_bytes(header(b"{}"))
    (folder / "model.safetensors.index.json").write_text(index if isinstance(index, str) else json.dumps(index))
    with pytest.raises(UserError, match=f"model.safetensors.index.json .*{message}"):
        plan(folder)


def test_an_index_transformers_does_not_read_is_left_alone(tiny_llama, tmp_path):
    """A repository may keep another format's index beside transformers' (Mistral's consolidated weights)."""
    folder = tmp_path / "model"
    shutil.copytree(tiny_llama, folder)
    (folder / "consolidated.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": "elsewhere"}}))
    assert plan(folder).backend == "hf"


@pytest.mark.parametrize("name, content, message", [
    ("tokenizer.json", [1, 2], "one of its files holds values of the wrong kind \\(TypeError"),
    ("generation_config.json", {"eos_token_id": "x"}, "end-of-sequence id 'x' is not a token id"),
    ("generation_config.json", {"eos_token_id": [2, [1]]}, "end-of-sequence id '\\[1\\]' is not a token id"),
])
def test_tokenizer_and_generation_files_of_the_wrong_kind_are_one_line(tiny_llama, tmp_path, name, content, message):
    """Valid JSON holding the wrong kinds of values: a traceback at load, or every answer failing, before."""
    folder = tmp_path / "model"
    shutil.copytree(tiny_llama, folder)
    (folder / name).write_text(json.dumps(content))
    with pytest.raises(UserError, match=message):
        loaders.load(plan(folder))


@pytest.mark.parametrize("make", ["folder", "fifo", "link loop"])
def test_weight_paths_that_are_not_files_neither_hang_nor_crash(tmp_path, make):
    folder = folder_with(tmp_path)
    weights = folder / "model.safetensors"
    if make == "folder":
        weights.mkdir()
    elif make == "fifo":
        os.mkfifo(weights)  # opening it to read would wait for a writer for ever
    else:
        weights.symlink_to(folder / "loop.safetensors")
        (folder / "loop.safetensors").symlink_to(weights)
    errors = []
    worker = threading.Thread(target=lambda: errors.append(pytest.raises(UserError, plan, folder)), daemon=True)
    worker.start()
    worker.join(20)
    assert not worker.is_alive(), "the plan hung"
    assert "not a regular file" in str(errors[0].value)


def test_a_context_larger_than_memory_is_refused_before_llamacpp_allocates_it(gemma_gguf):
    small = Machine(ram_bytes=2 * 2**30)
    with pytest.raises(UserError, match="more than this machine's 2.0 GiB of memory: lower --max_seq_len"):
        loaders.plan(flags(f"--base_model={gemma_gguf}", "--max_seq_len=1000000", "--n_gpu_layers=0"), small)
    with pytest.raises(loaders.UsageError, match="n_ctx must be a whole number"):
        loaders.plan(flags(f"--base_model={gemma_gguf}", "--llamacpp_dict={'n_ctx': 'big'}"), small)
    for value in ("0", "'big'", "True"):  # (0 failed inside llama.cpp as "Failed to create llama_context")
        with pytest.raises(loaders.UsageError, match="n_batch must be a whole number of at least 1"):
            loaders.plan(flags(f"--base_model={gemma_gguf}", f"--llamacpp_dict={{'n_batch': {value}}}"), small)


# --- fuzzing: bounded in time, so that CI runs it on every change

json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                        max_size=4), max_leaves=20)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(config=st.dictionaries(st.sampled_from([*CONFIG, "quantization_config", "text_config", "torch_dtype"]),
                              json_values, max_size=9),
       weights=st.binary(max_size=64) | json_values.map(lambda v: header(json.dumps(v).encode())))
def test_fuzzed_model_folders_end_in_one_line_or_a_plan(tmp_path_factory, config, weights):
    folder = folder_with(tmp_path_factory.mktemp("fuzz"), config={**CONFIG, **config}, weights=weights)
    try:
        plan(folder)
    except UserError as e:
        assert "\n" not in str(e)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def api_client():
    from conftest import FakeModel
    from fastapi.testclient import TestClient

    from quantchat.api import OpenAIServer
    from quantchat.engine import ChatEngine
    from quantchat.prompter import FORMATS, Prompter
    server = OpenAIServer()
    server.ready(ChatEngine(FakeModel(["a", "b", "c"]), Prompter("plain", FORMATS["plain"])))
    with TestClient(server.app) as client:
        yield client


message = st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", "developer", "tool", 5]),
                                 "content": json_values})
bodies = st.fixed_dictionaries({"messages": st.lists(message, max_size=3) | json_values},
                               optional={k: json_values for k in ("max_tokens", "temperature", "top_p", "top_k", "stop",
                                                                  "seed", "n", "stream", "response_format", "tools",
                                                                  "repetition_penalty", "logprobs", "unknown")})


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=bodies | json_values)
def test_fuzzed_api_bodies_get_an_answer_or_an_openai_shaped_4xx(api_client, body):
    response = api_client.post("/v1/chat/completions", content=json.dumps(body, allow_nan=True),
                               headers={"content-type": "application/json"})
    assert response.status_code in (200, 400, 413), response.text
    if response.status_code != 200:
        error = response.json()["error"]
        assert error["message"] and error["type"] == "invalid_request_error"
