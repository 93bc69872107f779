"""bench/decode.py's command line, without a GPU: the named row sets and the check of the rows asked for."""
import subprocess
import sys
from pathlib import Path

from bench.decode import GGUF_ROWS, ROW_SETS, ROWS

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
