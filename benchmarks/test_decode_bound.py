"""One cached decoding step of gpt_small at batch 1 beside the time to read the weights it uses.

A step at batch 1 multiplies one row by every weight matrix once: it cannot be faster than reading
those bytes from memory. The bound is measured on this machine as a sum over the same matrices (the
reference), then the step with the weights as trained and with the layout lab generate picks
(lab/inference/decode_layout.py), eagerly and through torch.compile (lab/inference/compiled.py,
the step lab serve runs, per-row positions). time/ref is then how far each step is from the memory
limit (1.5 is the target). The step keeps the cache at a fixed length, so every round does the same
work; the compiled variant's compile is its untimed warm-up call.

The second benchmark is the reason lab serve batches rows of different lengths with masks over a
padded cache (lab_serve/batcher.py): 16 rows at 16 different positions as one masked step, against
the same 16 rows as 16 batch-1 steps that read exactly their own keys (what a ragged cache without a
ragged kernel comes to on CPU).
"""

import copy
from pathlib import Path

import pytest
import torch

from benchmarks import machine
from lab.inference.compiled import DecodeStep
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


@pytest.mark.parametrize(
    "variant", [REFERENCE, "step, as trained", "step, decoding layout", "step, decoding layout, compiled"]
)
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
    compiled = variant.endswith("compiled")
    model = models[variant.removesuffix(", compiled")]
    caches = model.new_caches(1, PROMPT + 1)
    token = torch.zeros(1, 1, dtype=torch.long, device=device)
    with torch.inference_mode():
        model(torch.zeros(1, PROMPT, dtype=torch.long, device=device), caches=caches)
        if compiled:  # per-row positions: each round writes position PROMPT again
            decode = DecodeStep(model, compile=True)
            start = torch.full((1,), PROMPT, device=device)
            decode(token, start, caches)  # compiles, checks and times it against eager (its report)

            def step():  # the compiled function itself, even where lab would decode eagerly
                return (decode.compiled or decode)(token, start, caches)
        else:

            def step():
                for cache in caches:  # back to the prompt's length: each round decodes the same position
                    cache.length = PROMPT
                return model(token, caches=caches, start_pos=PROMPT, last_only=True)[0]

        logits, mean = timed(step)
    assert torch.isfinite(logits).all()
    if mean:
        benchmark.extra_info["tokens_per_s"] = 1 / mean


ROWS = 16
LENGTH = 256  # the running batch's cache bucket for these rows (lab serve's, positions up to 256)


@pytest.mark.parametrize("variant", ["one masked step, padded cache", "a batch-1 step per row, exact keys"])
def test_rows_at_different_positions_masks_or_one_by_one(timed, benchmark, device, models, variant):
    model = models["step, decoding layout"]
    positions = [8 + 15 * r for r in range(ROWS)]  # 8 .. 233: 16 different lengths
    benchmark.group = (
        f"decode step: gpt_small, {ROWS} rows at positions 8..233, one step each "
        f"{machine.label(device, torch.float32)}"
    )
    benchmark.extra_info.update(variant=variant, reference="one masked step, padded cache")
    tokens = torch.zeros(ROWS, 1, dtype=torch.long, device=device)
    with torch.inference_mode():
        if variant.startswith("one masked"):
            caches = model.new_caches(ROWS, LENGTH)
            start = torch.tensor(positions, device=device)

            def step():
                return model(tokens, caches=caches, start_pos=start, last_only=True)[0]
        else:
            alone = [model.new_caches(1, p + 1) for p in positions]

            def step():
                out = []
                for p, caches in zip(positions, alone):
                    for cache in caches:
                        cache.length = p
                    out.append(model(tokens[:1], caches=caches, start_pos=p, last_only=True)[0])
                return out

        _, mean = timed(step)
    if mean:
        benchmark.extra_info["tokens_per_s"] = ROWS / mean
