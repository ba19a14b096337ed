"""How fast a run goes: model FLOPs utilisation (MFU), the share of the device's peak that the
model's own arithmetic uses. MFU = flops_per_token * tokens_per_second / peak.

The peak comes from the datasheet for GPUs we know (dense, no sparsity), and otherwise (CPUs,
unknown GPUs, MPS) from a large matmul timed at the start of the run. A machine busy with other
work times a slower matmul, which would inflate MFU; so the best rate ever timed on this machine
(same processor, torch, dtype and threads) is kept in the cache folder and used when it is higher.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass

import torch

from lab.engine.precision import cpuinfo
from lab.files import cache_folder, write_text_atomically

# (name pattern, bf16 dense tensor-core peak, fp32 peak) in FLOP/s, from NVIDIA's datasheets. The
# patterns are tried in order: the H100 PCIe and NVL come before the H100 SXM they would match.
DATASHEET = [
    (r"H100.*PCIe", 756e12, 51.2e12),
    (r"H100.*NVL", 835e12, 60e12),
    (r"H100", 989e12, 67e12),
    (r"H200", 989e12, 67e12),
    (r"A100", 312e12, 19.5e12),
    (r"L40S", 362e12, 91.6e12),
    (r"\bL4\b", 121e12, 30.3e12),
    (r"\bA10\b", 125e12, 31.2e12),
    (r"RTX 4090", 165e12, 82.6e12),
    (r"RTX 3090", 71e12, 35.6e12),
    (r"V100", None, 15.7e12),  # no bf16 tensor cores
    (r"\bT4\b", None, 8.1e12),
]


@dataclass(frozen=True)
class Peak:
    flops: float  # FLOP/s
    source: str  # what the figure is, for the log

    def mfu(self, flops_per_token: float, tokens_per_s: float) -> float:
        return flops_per_token * tokens_per_s / self.flops


def device_peak(device: torch.device, dtype: torch.dtype) -> Peak:
    """The peak MFU is measured against: the datasheet's for a known GPU, else a timed matmul."""
    kind = "bf16" if dtype == torch.bfloat16 else "fp32"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for pattern, bf16, fp32 in DATASHEET:
            figure = bf16 if kind == "bf16" else fp32
            if re.search(pattern, name) and figure:
                return Peak(figure, f"{name} datasheet {kind} peak, {figure / 1e12:.1f} TFLOP/s")
    flops, n = timed_matmul(device, dtype)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else processor_name()
    key = (
        f"{where} | torch {torch.__version__} | {kind} | {torch.get_num_threads()} threads | "
        f"{os.environ.get('ATEN_CPU_CAPABILITY', 'native')}"
    )
    best = remember_best(key, flops)
    return Peak(
        best,
        f"{where} {kind} peak measured with a {n}x{n} matmul, {best / 1e9:,.0f} GFLOP/s "
        f"(the best timed on this machine{'' if best == flops else f'; now {flops / 1e9:,.0f}'})",
    )


def timed_matmul(
    device: torch.device, dtype: torch.dtype, n: int = 1024, repeats: int = 5
) -> tuple[float, int]:
    """FLOP/s of the best of a few n x n matmuls: what this device really reaches on the op that
    dominates a transformer's arithmetic."""
    # Constant inputs: the time of a matmul does not depend on the values, and drawing random ones
    # would move the run's random number generator.
    a = torch.full((n, n), 0.5, device=device, dtype=dtype)
    b = torch.full((n, n), 0.5, device=device, dtype=dtype)
    a @ b  # warm-up: thread pools, kernel choice
    best = float("inf")
    for _ in range(repeats):
        _synchronize(device)
        start = time.perf_counter()
        a @ b
        _synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best, n


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def processor_name() -> str:
    """The CPU's model name ("AMD EPYC 9B14"), for logs and the peak cache."""
    import platform

    return cpuinfo("model name") or platform.processor() or "CPU"


def remember_best(key: str, flops: float) -> float:
    """The higher of flops and the best kept for key in the cache folder's peaks.json, which it
    updates. A cache that cannot be read or written changes nothing but that."""
    path = cache_folder() / "peaks.json"
    try:
        peaks = json.loads(path.read_text()) if path.exists() else {}
    except (OSError, ValueError):
        peaks = {}
    best = max(flops, float(peaks.get(key, 0.0)))
    if best > peaks.get(key, 0.0):
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomically(path, json.dumps({**peaks, key: best}, indent=1))
        except OSError:
            pass
    return best
