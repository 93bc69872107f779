"""The memory estimate (quantchat/memory.py) against the usual guidance and against peaks measured on an H100."""
import json
from pathlib import Path

import pytest

from bench.decode import SHAPES
from quantchat import bnb_modes, memory
from quantchat.machine import GPU, Machine

ROOT = Path(__file__).resolve().parent.parent
LLAMA2 = {  # the public Llama-2 configs' shapes
    "7B": SHAPES["llama2-7b"],
    "13B": SHAPES["llama2-13b"],
    "70B": {**SHAPES["llama2-7b"], "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
            "num_attention_heads": 64, "num_key_value_heads": 8},
}
NF4 = bnb_modes.LOW_BIT_MODES[1].bytes_per_weight
INT8 = bnb_modes.INT8.bytes_per_weight


@pytest.mark.parametrize("size, quant, low, high", [
    ("7B", None, 14 * 0.9, 14 * 1.1), ("13B", None, 26 * 0.9, 26 * 1.1), ("70B", None, 140 * 0.9, 140 * 1.1),
    ("7B", INT8, 7 * 0.9, 7 * 1.1), ("13B", INT8, 13 * 0.9, 13 * 1.1), ("70B", INT8, 70 * 0.9, 70 * 1.1),
    ("7B", NF4, 4, 5), ("13B", NF4, 7, 9), ("70B", NF4, 35, 40),
])
def test_weights_match_the_usual_guidance(size, quant, low, high):
    """Weights plus the CUDA context, in GB, where people quote 7B ~14 GB fp16, ~7 GB 8-bit, ~4-5 GB 4-bit ..."""
    config = LLAMA2[size]
    gb = (memory.weight_bytes(memory.shapes_from_config(config), "float16", quant) + memory.CUDA_CONTEXT) / 1e9
    assert low <= gb <= high, gb


def test_gptq_group_size_and_bits():
    shapes = memory.shapes_from_config(LLAMA2["7B"])

    def packed(bits, group):
        return memory.weight_bytes(shapes, "float16", memory.packed_bytes_per_weight({"bits": bits, "group_size": group}))
    g128, per_column, three_bit = packed(4, 128), packed(4, -1), packed(3, 128)
    assert three_bit < per_column < g128 < memory.weight_bytes(shapes, "float16") / 3
    assert 3.5e9 < g128 < 4.2e9   # TheBloke's 4-bit 128g Llama-2-7B GPTQ is 3.9 GB


def measured_rows():
    files = [ROOT / "bench/results/decode-h100.json", ROOT / "bench/results/decode-h100-13b.json",
             ROOT / "bench/results/decode-h100-8b.json"]
    return [row for f in files if f.exists() for row in json.loads(f.read_text())["rows"] if "prompt_tokens" in row]


@pytest.mark.parametrize("row", measured_rows(), ids=lambda row: f"{row['model']} {row['row']}")
def test_estimate_within_10_percent_of_the_measured_peak(row):
    """Peaks of torch's allocator on the H100 (bench/decode.py), random weights of Llama-2-7B's, Llama-2-13B's and
    Llama-3-8B's shapes (grouped-query attention, a 128k vocabulary), bf16 compute.
    generate's cache grows to the longest sequence of the row (the 2,048-token prompt); the fast path's static
    cache is allocated at its full length (the bench's --max_seq_len=4096)."""
    config = SHAPES[row["model"]]
    mode = bnb_modes.by_description(row["quantization"])  # a result row keeps the plan's description
    quant = mode.bytes_per_weight if mode else None
    context = 4096 if row["decode"].startswith("static cache") else row["prompt_tokens"] + 2
    need = memory.estimate(config, memory.shapes_from_config(config), "bfloat16", quant, context)
    measured = row["peak_gpu_gib"] * 2**30
    assert abs(need.allocated - measured) / measured < 0.10, (need, measured)


def llama2_7b_folder(tmp_path):
    config = {**SHAPES["llama2-7b"], "architectures": ["LlamaForCausalLM"], "model_type": "llama"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    return tmp_path


@pytest.mark.parametrize("free_gib, flags, expect", [
    (80, [], "fits"),
    (14.8, [], "shortened"),           # 12.6 GiB of weights, 15.3 GiB in all: room for a shorter KV cache
    (14.8, ["--max_seq_len=4096"], "offload"),
    (10, [], "offload"),
])
def test_a_model_that_does_not_fit_one_gpu_gets_a_plan(tmp_path, free_gib, flags, expect):
    """The plan for one GPU given its free memory (as nvidia-smi would report it): shorter context first, then
    weights on the CPU through accelerate's max_memory; the note says which."""
    from test_settings import settings

    from quantchat import loaders
    machine = Machine(gpus=(GPU(0, "test", 80 * 2**30, int(free_gib * 2**30), True),))
    p = loaders.plan(settings(f"--base_model={llama2_7b_folder(tmp_path)}", *flags), machine)
    notes = " ".join(p.notes)
    if expect == "fits":
        assert p.context_length == 4096 and p.options.max_memory is None and not notes
    elif expect == "shortened":
        assert 2048 <= p.context_length < 4096 and "context shortened" in notes and p.options.max_memory is None
        total = memory.MemoryEstimate(p.weight_bytes, p.kv_cache_bytes, p.activation_bytes, p.context_length).total
        assert total <= free_gib * 2**30
    else:
        assert p.options.device_map == "auto" and "stay on the CPU" in notes and not p.options.fast_decode
        assert p.options.max_memory[0] < free_gib * 2**30


@pytest.mark.parametrize("free_gib, expect", [(40, "fits"), (6, "offload")])
def test_several_gpus_show_each_gpus_share_and_cap_it(tmp_path, free_gib, expect):
    """--use_gpu_id=False on two GPUs: each GPU's share is shown, and accelerate gets each GPU's room for weights
    after its share of the KV cache, activations and CUDA context."""
    from test_settings import settings

    from quantchat import loaders
    machine = Machine(gpus=tuple(GPU(i, "test", 80 * 2**30, int(free_gib * 2**30), True) for i in range(2)))
    p = loaders.plan(settings(f"--base_model={llama2_7b_folder(tmp_path)}", "--use_gpu_id=False"), machine)
    need = memory.MemoryEstimate(p.weight_bytes, p.kv_cache_bytes, p.activation_bytes, p.context_length)
    share = need.weights / 2 + need.kv_cache / 2 + need.activations + memory.CUDA_CONTEXT
    assert f"cuda:0 {share / 2**30:.2f} GiB of {free_gib:.2f} GiB free, cuda:1" in p.devices, p.devices
    room = p.options.max_memory
    assert room[0] == room[1] == free_gib * 2**30 - need.kv_cache // 2 - need.activations - memory.CUDA_CONTEXT
    assert p.options.device_map == "balanced" and not p.options.fast_decode
    if expect == "fits":
        assert "cpu" not in room and not p.notes
    else:
        assert "cpu" in room and "stays on the CPU" in " ".join(p.notes) and p.devices.endswith("+ CPU (weights "
                                                                                               "that do not fit)")
