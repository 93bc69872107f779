"""bench/decode.py without a GPU: the named row sets, the check of the rows asked for, and the record of a GPU that
slowed itself down during a row (bench/gpu_watch.py)."""
import os
import subprocess
import sys
import time
from pathlib import Path

from bench.decode import GGUF_ROWS, ROW_SETS, ROWS
from bench.gpu_watch import GpuWatch, slowdown_note, summarize

ROOT = Path(__file__).resolve().parent.parent


def test_every_row_set_names_rows_the_bench_has():
    for name, rows in ROW_SETS.items():
        assert rows and all(row in ROWS or row in GGUF_ROWS for row in rows), name
    # transformers' compiled path compiles in the main thread: last in every set that has it
    static = "generate static cache + compile (transformers' own)"
    assert all(rows[-1] == static for rows in ROW_SETS.values() if static in rows)


def test_an_unknown_row_is_one_clear_error_before_any_work():
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "decode.py"), "--rows=hf,no such row"],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2
    assert "unknown rows ['no such row']" in run.stderr and "'engines'" in run.stderr


def test_a_row_on_a_gpu_that_slowed_itself_down_says_so():
    # nvidia-smi's lines as bench/gpu_watch.py asks for them: temperature, SM clock, active clocks event reasons
    hot = summarize(["86, 1710, 0x0000000000000020", "88, 1530, 0x0000000000000060", "[N/A], 1980, 0x0"])
    assert hot == {"samples": 2, "max_temperature_c": 88, "sm_clock_mhz": [1530, 1710],
                   "slowdowns": ["SW thermal slowdown", "HW thermal slowdown"]}
    idle = summarize(["54, 345, 0x0000000000000001", "60, 1980, 0x0000000000000000"])
    assert idle["slowdowns"] == [] and summarize(["nvidia-smi failed"]) is None
    rows = [{"row": "bf16", "gpu_state": hot}, {"row": "GPTQ", "gpu_state": idle}, {"row": "gguf", "gpu_state": None}]
    assert slowdown_note(rows) == ("The GPU slowed itself down during: bf16 (SW thermal slowdown, HW thermal slowdown,"
                                   " up to 88 °C).")
    assert slowdown_note(rows[1:]) == ""


def test_the_watch_samples_while_its_block_runs(tmp_path, monkeypatch):
    fake = tmp_path / "nvidia-smi"  # stands in for the driver's tool: prints one GPU's line per call
    fake.write_text("#!/bin/sh\necho '81, 1980, 0x0000000000000020'\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    with GpuWatch(period_s=0.05) as watch:
        time.sleep(0.5)
    state = watch.summary()
    assert state["samples"] >= 2 and state["slowdowns"] == ["SW thermal slowdown"]
    assert not watch.thread.is_alive()


def test_the_table_names_the_rows_timed_on_a_slowed_gpu():
    from bench.decode import table
    machine = {"gpu": "H100", "bandwidth_gb_s": 2950, "torch": "2.11", "transformers": "5.23", "bitsandbytes": "-"}
    row = {"model": "llama2-7b", "row": "quantchat fast decode", "decode_128_tokens_per_s": 102.8, "mbu_128": 0.46}
    hot = {**row, "gpu_state": summarize(["86, 1710, 0x20"])}
    assert "slowed itself down" not in table({"machine": machine, "date": "2026-11-24", "rows": [row]})
    assert table({"machine": machine, "date": "2026-11-24", "rows": [hot]}).endswith(
        "The GPU slowed itself down during: quantchat fast decode (SW thermal slowdown, up to 86 °C).")


def test_the_lookup_study_counts_the_steps_the_fast_paths_loop_takes():
    """An answer that copies the prompt after one new token: the lookup (3-4 token n-grams) has nothing until three
    copied tokens repeat a place in the prompt, then guesses up to `most` at a step, kept up to the first wrong one."""
    from bench.lookup_study import replay
    prompt = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]
    answer = [50, 1, 2, 3, 4, 5, 6, 7, 8, 60, 61]
    steps = replay(prompt, answer, longest=4, shortest=3, most=8)
    # 1, 2, 3 one a step (no 3-gram before them has occurred earlier); after 3, guesses 4..9 (room: 6 of the 7 tokens
    # left, one kept for the token after them), 4..8 kept and 60 chosen in that step; then 61 one a step
    assert steps == {"one_token_steps": 4, "verify_steps": 1, "guessed": 6, "kept": 5, "tokens_in_verify_steps": 6}
    assert steps["one_token_steps"] + steps["tokens_in_verify_steps"] == len(answer) - 1  # (answer[0]: the prefill)
    shorter = replay(prompt, answer, longest=4, shortest=1, most=8)  # a 1-gram after 1 already guesses
    assert shorter["verify_steps"] >= 1 and shorter["one_token_steps"] < steps["one_token_steps"]
