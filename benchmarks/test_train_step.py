"""One training step of every recipe in recipes/, all at the same shape, against gpt_small.

A step is what `lab run` does per step: forward (under the recipe's autocast, compiled where the
recipe compiles), backward, gradient clipping, optimizer step. The batches are random tokens: the
data plugin is not part of the step. MFU = model.flops_per_token * tokens/s / the peak `lab run`
uses (see lab.engine.peak).
"""

import math
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch

from benchmarks import machine
from lab.engine.precision import pick_dtype
from lab.model import GPT
from lab.recipe import load_recipe
from lab.roles import build_optimizer

RECIPES = sorted((Path(__file__).resolve().parent.parent / "recipes").glob("*.toml"))
REFERENCE = "gpt_small"


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_train_step(timed, benchmark, device, size, peak, path):
    recipe = load_recipe(path, overrides=size.train_overrides)
    m, B, T = recipe.model, size.train_batch, recipe.model.block_size
    dtype = pick_dtype(recipe, device)
    torch.manual_seed(0)
    model = GPT(recipe).to(device).train()
    optimizer = build_optimizer(recipe.parts["optimizer"], model)
    compiled = recipe.train.compile is True or (recipe.train.compile == "auto" and device.type == "cuda")
    forward = torch.compile(model) if compiled else model
    step = train_step(model, forward, optimizer, recipe.train.grad_clip, device, dtype)
    x, y = random_batch(B, T, m.vocab_size, device)
    loss_before = loss_on(model, x, y, device, dtype)

    benchmark.group = (
        f"train step: {m.n_layer} layers, n_embd {m.n_embd}, {B}x{T} tokens {machine.label(device, dtype)}"
    )
    benchmark.extra_info.update(variant=path.stem, reference=REFERENCE, compiled=compiled)
    _, mean = timed(lambda: step(x, y))

    # Every step trained on this one batch: the loss must have come down.
    loss_after = loss_on(model, x, y, device, dtype)
    assert math.isfinite(loss_after) and loss_after < loss_before, (loss_before, loss_after)
    if mean:
        tokens_per_s = B * T / mean
        flops_per_token = model.flops_per_token(T)
        device_peak = peak(dtype)
        benchmark.extra_info.update(
            tokens_per_s=tokens_per_s,
            mfu=device_peak.mfu(flops_per_token, tokens_per_s),
            flops_per_token=flops_per_token,
            peak_source=device_peak.source,
        )


def train_step(model, forward, optimizer, grad_clip: float, device, dtype):
    """step(x, y): one optimizer step, as lab.engine.trainer takes it."""

    def step(x, y):
        with autocast(device, dtype):
            _, loss = forward(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip or math.inf)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


@torch.no_grad()
def loss_on(model, x, y, device, dtype) -> float:
    with autocast(device, dtype):
        return model(x, y)[1].item()


def autocast(device, dtype):
    return nullcontext() if dtype == torch.float32 else torch.autocast(device.type, dtype=dtype)


def random_batch(B: int, T: int, vocab_size: int, device):
    tokens = torch.randint(vocab_size, (B, T + 1), generator=torch.Generator().manual_seed(0))
    tokens = tokens.to(device)
    return tokens[:, :-1], tokens[:, 1:]
