"""One cached decoding step of gpt_small at batch 1 beside the time to read the weights it uses.

A step at batch 1 multiplies one row by every weight matrix once: it cannot be faster than reading
those bytes from memory. The bound is measured on this machine as a sum over the same matrices (the
reference), then the step with the weights as trained and with the layout lab generate picks
(lab/inference/decode_layout.py). time/ref is then how far each step is from the memory limit (1.5 is the target).
The step keeps the cache at a fixed length, so every round does the same work.
"""

import copy
from pathlib import Path

import pytest
import torch

from benchmarks import machine
from lab.inference.decode_layout import lay_out_for_decoding
from lab.model import GPT
from lab.recipe import load_recipe

GPT_SMALL = Path(__file__).resolve().parent.parent / "recipes" / "gpt_small.toml"
REFERENCE = "read weights"
PROMPT = 64


@pytest.fixture(scope="module")
def models(device):
    torch.manual_seed(0)
    trained = GPT(load_recipe(GPT_SMALL)).to(device).eval()
    laid_out = copy.deepcopy(trained)
    lay_out_for_decoding(laid_out, rows=1)
    return {"step, as trained": trained, "step, decoding layout": laid_out}


def weights_read(model) -> list[torch.Tensor]:
    """Every matrix a step multiplies by, once each (the tied head and embedding are one)."""
    found = {id(m.weight): m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)}
    return list(found.values())


@pytest.mark.parametrize("variant", [REFERENCE, "step, as trained", "step, decoding layout"])
def test_decode_step_against_reading_its_weights(timed, benchmark, device, models, variant):
    model = models["step, as trained"]
    weights = weights_read(model)
    nbytes = sum(w.numel() * w.element_size() for w in weights)
    benchmark.group = (
        f"decode step: gpt_small, batch 1, {PROMPT} cached tokens, {nbytes / 1e6:.0f} MB of weights "
        f"{machine.label(device, weights[0].dtype)}"
    )
    benchmark.extra_info.update(variant=variant, reference=REFERENCE)
    if variant == REFERENCE:
        _, mean = timed(lambda: [w.sum() for w in weights])
        if mean:
            benchmark.extra_info["note"] = f"{nbytes / mean / 1e9:.1f} GB/s"
        return
    model = models[variant]
    caches = model.new_caches(1, PROMPT + 1)
    token = torch.zeros(1, 1, dtype=torch.long, device=device)
    with torch.inference_mode():
        model(torch.zeros(1, PROMPT, dtype=torch.long, device=device), caches=caches)

        def step():
            for cache in caches:  # back to the prompt's length: each round decodes the same position
                cache.length = PROMPT
            return model(token, caches=caches, start_pos=PROMPT, last_only=True)[0]

        logits, mean = timed(step)
    assert torch.isfinite(logits).all()
    if mean:
        benchmark.extra_info["tokens_per_s"] = 1 / mean
