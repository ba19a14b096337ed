"""What the benchmarks run on: the device, its dtype, the shapes each --lab-size picks, and
measuring that waits for the GPU."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Size:
    attention: tuple[tuple[int, int, int, int], ...]  # (batch, heads, T, head_dim), causal
    train_overrides: tuple[str, ...]  # --set style: every recipe gets this one shape, so they compare
    train_batch: int  # sequences of block_size tokens per step
    prompt_tokens: int  # generation: gpt_small's own shape, greedy
    new_tokens: int  # made by both the cached and the uncached path


SIZES = {
    # Two shared CPU cores: each benchmark takes seconds, the whole suite a few minutes.
    "cpu": Size(
        attention=((8, 4, 128, 32), (4, 4, 256, 64), (1, 4, 1024, 64)),
        # Four layers and 256 positions: the least that keeps every recipe's layer pattern
        # (local_global's fourth layer, and its 128-token window shorter than the context).
        train_overrides=("model.n_layer=4", "model.n_embd=128", "model.n_head=4", "model.block_size=256"),
        train_batch=2,
        prompt_tokens=16,
        new_tokens=256,
    ),
    # One modern GPU: GPT-2 small's attention and model (124M), and longer sequences.
    "gpu": Size(
        attention=((16, 12, 1024, 64), (8, 16, 2048, 128), (4, 16, 4096, 128)),
        train_overrides=("model.n_layer=12", "model.n_embd=768", "model.n_head=12", "model.block_size=1024"),
        train_batch=16,
        prompt_tokens=16,
        new_tokens=512,
    ),
}


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def dtype(dev: torch.device) -> torch.dtype:
    """bf16 on a GPU, for its tensor cores; fp32 on CPU, as `lab run` trains there."""
    return torch.bfloat16 if dev.type == "cuda" else torch.float32


def label(dev: torch.device, dt: torch.dtype) -> str:
    """'(float32, cpu)': the part of a group's name that says what it ran on."""
    return f"({str(dt).removeprefix('torch.')}, {dev.type})"


def synchronized(fn, dev: torch.device):
    """fn, waiting for the GPU at the end: CUDA calls return when the work is queued, not done."""
    if dev.type != "cuda":
        return fn

    def call():
        out = fn()
        torch.cuda.synchronize(dev)
        return out

    return call


def peak_memory_mib(fn, dev: torch.device) -> float | None:
    """Most GPU memory allocated during one call of fn (inputs and weights included); None on CPU."""
    if dev.type != "cuda":
        return None
    torch.cuda.synchronize(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    fn()
    torch.cuda.synchronize(dev)
    return torch.cuda.max_memory_allocated(dev) / 2**20
