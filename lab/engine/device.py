"""Turning a device setting ("auto", "cpu", "cuda", "cuda:1", "mps") into a torch.device."""

import torch

from lab.errors import LabError


def pick_device(name: str, where: str, fix: str) -> torch.device:
    """where: what the user wrote, for messages (e.g. "x.toml [train] device = 'cuda'");
    fix: how to choose another (e.g. 'set train.device = "cpu"')."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if torch.backends.mps.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise LabError(f"{where} is not a device; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LabError(f"{where}, but torch sees no CUDA GPU here; {fix}")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise LabError(
            f"{where}, but this machine has {torch.cuda.device_count()} GPU(s); "
            f"use cuda:0 .. cuda:{torch.cuda.device_count() - 1}"
        )
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise LabError(f"{where}, but MPS is not available here; {fix}")
    if device.type not in ("cpu", "cuda", "mps"):
        raise LabError(f"{where}: lab runs on cpu, cuda or mps; {fix}")
    return device
