"""Which dtype autocast runs in: `train.precision` = "auto" | "bf16" | "fp32"."""

from __future__ import annotations

import os

import torch

from lab.errors import LabError


def pick_dtype(recipe, device: torch.device) -> torch.dtype:
    """The autocast dtype (float32: no autocast). auto: bf16 where the hardware multiplies bf16
    matrices natively — a CUDA GPU that supports it, or a CPU with AMX (Sapphire Rapids and later),
    where bf16 autocast trains gpt_small ~1.4x faster than fp32 with the loss within 1%
    (tests/test_precision.py). Elsewhere fp32: emulated bf16 is slower than fp32."""
    precision = recipe.train.precision
    if precision == "auto":
        return torch.bfloat16 if native_bf16(device) else torch.float32
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise LabError(
            f'{recipe.source} [train] precision = "bf16", but {torch.cuda.get_device_name(device)} '
            'has no bf16 support; set precision = "fp32" or "auto"'
        )
    return torch.bfloat16 if precision == "bf16" else torch.float32


def native_bf16(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return "amx_bf16" in cpu_flags() and onednn_may_use_amx()
    return False


def onednn_may_use_amx() -> bool:
    """False when ONEDNN_MAX_CPU_ISA (or its old name DNNL_MAX_CPU_ISA) caps oneDNN, which runs CPU
    bf16 matmuls, below AMX (e.g. AVX2, as when testing an AVX2 machine's path): bf16 is then
    emulated, several times slower than fp32."""
    isa = (os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "ALL").upper()
    return isa == "ALL" or "AMX" in isa


def cpu_flags() -> set[str]:
    """The CPU's feature flags on Linux (torch has no public query for AMX); empty elsewhere."""
    return set((cpuinfo("flags") or "").split())


def cpuinfo(key: str) -> str | None:
    """A field of the first processor in /proc/cpuinfo ("flags", "model name"); None off Linux."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                name, _, value = line.partition(":")
                if name.strip() == key:
                    return value.strip()
    except OSError:
        pass
    return None
