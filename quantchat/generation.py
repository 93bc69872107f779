"""The allowed range of each generation setting: one home for the rule that flags (settings.validate) and API or
web requests (engine.params) both follow."""
from __future__ import annotations

import math

from .errors import UsageError, UserError

# Allowed values of the generation settings: (lowest, highest, whether the lowest itself is allowed); highest None:
# no upper bound. The one home of these rules: flags (settings.validate) and requests (engine.params) both ask here.
GENERATION_RANGES: dict[str, tuple[float, float | None, bool]] = {
    "max_new_tokens": (1, None, True), "min_new_tokens": (0, None, True), "max_time": (0, None, False),
    "temperature": (0, 100, True), "top_k": (0, 1_000_000, True), "top_p": (0, 1, False), "num_beams": (1, 64, True),
    "repetition_penalty": (0.01, 100, True), "seed": (0, 2**32 - 1, True),   # llama.cpp's seed is 32 bits
}


def check_generation(values: dict[str, float | None], as_flags: bool = False) -> None:
    """Raise one line for the first setting out of its range (flags: UsageError naming --flag; requests:
    UserError)."""
    for name, value in values.items():
        if value is None or name not in GENERATION_RANGES:
            continue
        low, high, low_ok = GENERATION_RANGES[name]
        if isinstance(value, float) and not math.isfinite(value):
            if as_flags:
                raise UsageError(f"--{name}={value}: must be a finite number")
            raise UserError(f"{name} must be a finite number (got {value})")
        if value < low or (value == low and not low_ok) or (high is not None and value > high):
            if high is not None:
                span = f"between {low} and {high}" + ("" if low_ok else f" ({low} itself excluded)")
            else:
                span = f"at least {low}" if low_ok else f"more than {low}"
            if as_flags:
                raise UsageError(f"--{name}={value}: must be {span}")
            raise UserError(f"{name} must be {span} (got {value})")
