"""What this computer has to run a model on: GPUs (name, memory, bf16), Apple's MPS, CPU memory.

Probed once per run and handed to the load plans, so that a plan is a function of its inputs and tests describe a
machine (`Machine(gpus=(GPU(0, "H200", 141 * 2**30, 140 * 2**30, True),))`) instead of patching torch. Free GPU memory is
asked of nvidia-smi, in another process: no CUDA context is made here, and importing torch is left to the backends
that use it, since loading CUDA libraries into this process before a CUDA build of llama.cpp made llama.cpp crash.
"""
from __future__ import annotations

import os
import platform
import shutil
import subprocess
from dataclasses import dataclass


@dataclass(frozen=True)
class GPU:
    index: int               # as CUDA numbers it in this process (after CUDA_VISIBLE_DEVICES)
    name: str
    total_bytes: int
    free_bytes: int | None   # None where the driver did not say
    bf16: bool               # Ampere and newer
    uuid: str = ""           # the driver's GPU-... id, to match torch's numbering to nvidia-smi's


@dataclass(frozen=True)
class Machine:
    gpus: tuple[GPU, ...] = ()
    mps: bool = False
    ram_bytes: int | None = None

    def gpu(self, index: int) -> GPU | None:
        return self.gpus[index] if 0 <= index < len(self.gpus) else None

    def free_gpu_bytes(self, index: int) -> int | None:
        gpu = self.gpu(index)
        return gpu.free_bytes if gpu else None

    def torch_device(self, gpu_id: int = 0) -> str:
        """Where a small helper model (embeddings, reward scoring) runs: the chosen GPU, else MPS, else the CPU."""
        if self.gpus:
            return f"cuda:{gpu_id if self.gpu(gpu_id) else 0}"
        return "mps" if self.mps else "cpu"

    @classmethod
    def probe(cls, torch_view: bool = False) -> Machine:
        """The machine as the driver reports it; with torch_view, the GPUs torch can use (a CPU build of torch
        sees none, whatever the driver lists). torch_view imports torch: only for backends that run on it."""
        smi = _nvidia_smi_gpus()
        ram = _ram_bytes()
        if not torch_view:
            return cls(tuple(smi), _apple_silicon(), ram)
        try:
            import torch
        except ImportError:
            return cls((), False, ram)
        gpus = []
        if torch.cuda.is_available():
            by_uuid = {g.uuid: g for g in smi}
            for i in range(torch.cuda.device_count()):
                props = torch.cuda.get_device_properties(i)
                seen = by_uuid.get(_uuid_text(getattr(props, "uuid", ""))) or (smi[i] if i < len(smi) else None)
                gpus.append(GPU(i, props.name, props.total_memory, seen.free_bytes if seen else None,
                                props.major >= 8, seen.uuid if seen else ""))
        mps = bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
        return cls(tuple(gpus), mps, ram)


def _uuid_text(uuid) -> str:
    text = str(uuid)
    return text if text.startswith("GPU-") else f"GPU-{text}"


def _nvidia_smi_gpus() -> list[GPU]:
    """The GPUs this process may use, in CUDA's order, with free memory; [] without nvidia-smi.
    nvidia-smi lists every GPU of the host: CUDA_VISIBLE_DEVICES (indices or UUIDs) picks and orders them."""
    if not shutil.which("nvidia-smi"):
        return []
    run = subprocess.run(["nvidia-smi", "--query-gpu=index,uuid,name,memory.total,memory.free,compute_cap",
                          "--format=csv,noheader,nounits"], capture_output=True, text=True, check=False)
    rows = []
    for line in run.stdout.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) != 6:
            continue
        index, uuid, name, total, free, cap = parts
        try:
            major = int(cap.split(".")[0])
            rows.append((index, uuid, name, int(total) * 2**20, int(free) * 2**20 if free.isdigit() else None, major))
        except ValueError:
            continue
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        wanted = [v.strip() for v in visible.split(",") if v.strip()]
        chosen = []
        for v in wanted:
            match = next((r for r in rows if v in (r[0], r[1]) or (v.startswith("GPU-") and r[1].startswith(v))), None)
            if match is None:
                break  # CUDA stops at the first entry it cannot match
            chosen.append(match)
        rows = chosen
    return [GPU(i, name, total, free, major >= 8, uuid) for i, (_, uuid, name, total, free, major) in enumerate(rows)]


def _ram_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _apple_silicon() -> bool:
    return platform.system() == "Darwin" and platform.machine() == "arm64"
