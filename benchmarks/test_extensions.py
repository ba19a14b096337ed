"""What each of the speedrun's wiring techniques costs a training step: modern_small at the benchmark
shape with one extension ([extension.NAME], its defaults), against the same recipe with none.

The step is test_train_step's (forward, backward, clipping, the optimizer's step) on one random
batch, so the ratio is the technique's own cost: its extra parameters (a value-embedding table is a
second vocabulary-sized embedding), its hooks' ops, and for multi-token prediction a second pass
through the head. Which of them pays for itself in loss is the race's question (README, "Today's
record-setting techniques"); this is the price side.
"""

from pathlib import Path

import pytest
import torch

from benchmarks import machine
from benchmarks.test_train_step import autocast, random_batch, train_step
from lab.engine.precision import pick_dtype
from lab.model import GPT
from lab.recipe import load_recipe
from lab.roles import build_optimizer

MODERN_SMALL = Path(__file__).resolve().parent.parent / "recipes" / "modern_small.toml"
REFERENCE = "none"
EXTENSIONS = ["value_embeddings", "unet", "smear", "attention_gate", "mtp", "z_loss"]


@pytest.mark.parametrize("variant", [REFERENCE, *EXTENSIONS])
def test_train_step_with_one_extension(timed, benchmark, device, size, variant):
    extension = [] if variant == REFERENCE else [f"extension.{variant}={{}}"]
    recipe = load_recipe(MODERN_SMALL, overrides=[*size.train_overrides, *extension])
    B, T = size.train_batch, recipe.model.block_size
    dtype = pick_dtype(recipe, device)
    torch.manual_seed(0)
    model = GPT(recipe).to(device).train()
    step = train_step(model, model, build_optimizer(recipe.parts["optimizer"], model), 1.0, device, dtype)
    x, y = random_batch(B, T, recipe.model.vocab_size, device)
    m = recipe.model
    benchmark.group = (
        f"train step, modern_small + one extension: {m.n_layer} layers, n_embd {m.n_embd}, "
        f"{B}x{T} tokens {machine.label(device, dtype)}"
    )
    benchmark.extra_info.update(variant=variant, reference=REFERENCE)
    _, mean = timed(lambda: step(x, y))
    with torch.no_grad(), autocast(device, dtype):
        assert torch.isfinite(model(x, y)[1])
    if mean:
        benchmark.extra_info["tokens_per_s"] = B * T / mean
