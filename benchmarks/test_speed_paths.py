"""gpt_small's training step at its real shape, the plain path beside the fast one.

    plain        full logits + F.cross_entropy, fp32 (what nanoGPT does)
    fused_loss   model.loss_chunk: the LM head and loss in row chunks, fp32
    fast         fused_loss + precision "auto" (bf16 autocast where the hardware has it natively)

Each variant starts from the same weights and batch; before timing, its loss on that batch must
match the plain path's (1e-5 in fp32, 1% under bf16).
"""

import pytest
import torch

from benchmarks.test_train_step import loss_on, random_batch, train_step
from lab.engine.precision import pick_dtype
from lab.model import GPT
from lab.recipe import load_recipe
from lab.roles import build_optimizer

VARIANTS = {
    "plain": (["model.loss_chunk=0", "train.precision='fp32'"]),
    "fused_loss": (["train.precision='fp32'"]),
    "fast": ([]),
}
BATCH = {"cpu": 4, "gpu": 16}


@pytest.fixture(scope="module")
def reference_loss(device, size, gpt_small):
    recipe = load_recipe(gpt_small, VARIANTS["plain"])
    torch.manual_seed(0)
    model = GPT(recipe).to(device)
    x, y = random_batch(batch(size), recipe.model.block_size, recipe.model.vocab_size, device)
    return loss_on(model, x, y, device, torch.float32)


@pytest.fixture(scope="module")
def gpt_small():
    from benchmarks.test_train_step import RECIPES

    return next(p for p in RECIPES if p.stem == "gpt_small")


def batch(size) -> int:
    return BATCH["gpu" if size.train_batch > 4 else "cpu"]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_speed_path(timed, benchmark, device, size, peak, gpt_small, reference_loss, variant):
    recipe = load_recipe(gpt_small, VARIANTS[variant])
    dtype = pick_dtype(recipe, device)
    T, B = recipe.model.block_size, batch(size)
    torch.manual_seed(0)
    model = GPT(recipe).to(device).train()
    x, y = random_batch(B, T, recipe.model.vocab_size, device)
    loss = loss_on(model, x, y, device, dtype)
    tolerance = 1e-5 if dtype == torch.float32 else 0.01 * reference_loss
    assert abs(loss - reference_loss) <= tolerance, (variant, loss, reference_loss)

    optimizer = build_optimizer(recipe.parts["optimizer"], model)
    step = train_step(model, model, optimizer, recipe.train.grad_clip, device, dtype)
    benchmark.group = f"gpt_small training step, {B}x{T} tokens ({device.type})"
    benchmark.extra_info.update(variant=variant, reference="plain", dtype=str(dtype).removeprefix("torch."))
    _, mean = timed(lambda: step(x, y))
    if mean:
        tokens_per_s = B * T / mean
        benchmark.extra_info.update(
            tokens_per_s=tokens_per_s, mfu=peak(dtype).mfu(model.flops_per_token(T), tokens_per_s)
        )
