"""The GPU's temperature, clocks and slowdown reasons while a benchmark row runs, as nvidia-smi reports them once a
second: a row timed on a GPU that slowed itself down (heat, power cap) says so in the result file.

    with GpuWatch() as watch:
        ...  # the row
    row["gpu_state"] = watch.summary()   # None where nvidia-smi is not there
"""
from __future__ import annotations

import shutil
import subprocess
import threading

# NVML's clocks event reasons (nvidia-smi's clocks_event_reasons.active) that lower the clocks under load; idle,
# application clocks, sync boost and display clocks do not slow a running kernel
SLOWDOWNS = {0x4: "SW power cap", 0x8: "HW slowdown", 0x20: "SW thermal slowdown", 0x40: "HW thermal slowdown",
             0x80: "HW power brake"}
QUERY = "temperature.gpu,clocks.sm,clocks_event_reasons.active"


def summarize(lines: list[str]) -> dict | None:
    """Hottest temperature, lowest and highest SM clock and the slowdowns seen, from nvidia-smi's
    `--query-gpu=QUERY --format=csv,noheader,nounits` lines (the first GPU's; unreadable lines are skipped)."""
    samples = []
    for line in lines:
        fields = [field.strip() for field in line.split(",")]
        try:
            samples.append((int(fields[0]), int(fields[1]), int(fields[2], 16)))
        except (ValueError, IndexError):
            continue
    if not samples:
        return None
    reasons = 0
    for _, _, active in samples:
        reasons |= active
    return {"samples": len(samples), "max_temperature_c": max(s[0] for s in samples),
            "sm_clock_mhz": [min(s[1] for s in samples), max(s[1] for s in samples)],
            "slowdowns": [name for bit, name in SLOWDOWNS.items() if reasons & bit]}


class GpuWatch:
    """Samples GPU 0 (the one rows run on) once per period for the duration of a with block, one nvidia-smi call per
    sample from a thread: a looping nvidia-smi buffers its output and loses it when stopped."""

    def __init__(self, period_s: float = 1.0):
        self.period_s = period_s
        self.command = ["nvidia-smi", "-i", "0", f"--query-gpu={QUERY}", "--format=csv,noheader,nounits"]
        self.lines: list[str] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while True:
            run = subprocess.run(self.command, capture_output=True, text=True, check=False)
            self.lines += run.stdout.splitlines()[:1]
            if self.stop.wait(self.period_s):
                return

    def __enter__(self) -> GpuWatch:
        if shutil.which("nvidia-smi"):
            self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        if self.thread.is_alive():
            self.thread.join()

    def summary(self) -> dict | None:
        return summarize(self.lines)


def slowdowns(row: dict) -> list[str]:
    """The slowdown reasons seen while a result row ran (none where it was not watched)."""
    return (row.get("gpu_state") or {}).get("slowdowns") or []


def slowdown_note(rows: list[dict]) -> str:
    """A line under a result table naming the rows that ran on a GPU slowing itself down ('' when none did)."""
    slowed = [f"{r['row']} ({', '.join(slowdowns(r))}, up to {r['gpu_state']['max_temperature_c']} °C)"
              for r in rows if slowdowns(r)]
    return f"The GPU slowed itself down during: {'; '.join(slowed)}." if slowed else ""
