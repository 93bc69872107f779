"""bitsandbytes' weight formats as the flags choose them: --load_8bit, or --load_4bit with h2oGPT's --low_bit_mode.

One table, read by the flag's help text, the load plan, the BitsAndBytesConfig at load and the memory estimate.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BnbMode:
    bits: int                     # 8 or 4
    description: str              # what the plan and the model panel show
    quant_type: str = ""          # 4-bit: "nf4" or "fp4"
    double_quant: bool = False    # 4-bit: the block scales quantized again
    compute_in_model_dtype: bool = True  # False: bitsandbytes' default (fp32 compute)

    @property
    def bytes_per_weight(self) -> float:
        """Bytes per weight of a quantized Linear layer, scales included."""
        if self.bits == 8:
            return 1.0
        # 4 bits plus one absmax per 64 weights (fp32, or 8-bit with a second-level fp32 per 256 blocks)
        return 0.5 + (1.0 / 64 + 4 / 256 / 64 if self.double_quant else 4.0 / 64)


INT8 = BnbMode(8, "int8")
# h2oGPT's low_bit_mode values (1 and 4 are the same format there too)
LOW_BIT_MODES = {
    0: BnbMode(4, "4-bit FP4 (bitsandbytes defaults)", "fp4", False, compute_in_model_dtype=False),
    1: BnbMode(4, "4-bit NF4, double quantization", "nf4", True),
    2: BnbMode(4, "4-bit NF4", "nf4", False),
    3: BnbMode(4, "4-bit FP4, double quantization", "fp4", True),
    4: BnbMode(4, "4-bit NF4, double quantization", "nf4", True),
}


def chosen(load_8bit: bool, load_4bit: bool, low_bit_mode: int) -> BnbMode | None:
    """The format the flags ask for; None: weights stay in the model's dtype."""
    if load_8bit:
        return INT8
    return LOW_BIT_MODES[low_bit_mode] if load_4bit else None


def by_description(text: str) -> BnbMode | None:
    """The mode a plan described as `text` (result files keep the description)."""
    return next((m for m in (INT8, *LOW_BIT_MODES.values()) if m.description == text), None)


def help_text() -> str:
    return "4-bit details: " + "; ".join(
        f"{n} {m.description.removeprefix('4-bit ')}" + ("" if m.compute_in_model_dtype else ", fp32 compute")
        for n, m in LOW_BIT_MODES.items()) + " (1-4 compute in the model dtype)"
