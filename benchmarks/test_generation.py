"""Greedy generation with gpt_small's own shape: with the KV cache and without, at batch 1 and at
gpt_small's [generate] num_samples, which `lab generate` draws as one batch.

Without a cache every new token runs the whole sequence again; both paths report tokens/s (all rows
counted), and the summary compares time per token. The reference is the uncached path. Cached and
uncached must choose the same tokens.

On CPU a cached step at batch 1 is bound by reading the weights, the 51 MB LM head above all, and
every uncached step reads them too: the cache's gain is smallest there. A second row shares those
reads, so the cache's gain grows with the batch.
"""

from pathlib import Path

import pytest
import torch

from benchmarks import machine
from lab.model import GPT
from lab.recipe import load_recipe

GPT_SMALL = Path(__file__).resolve().parent.parent / "recipes" / "gpt_small.toml"
REFERENCE = "uncached"


@pytest.fixture(scope="module")
def generate():
    try:
        from lab.inference.sampling import generate
    except ImportError as e:
        pytest.skip(f"lab.inference.sampling is not importable yet ({e}): generation is not benchmarked")
    return generate


@pytest.fixture(scope="module")
def recipe():
    if not GPT_SMALL.exists():
        pytest.skip(f"{GPT_SMALL} is missing: generation is benchmarked on gpt_small's shape")
    return load_recipe(GPT_SMALL)


@pytest.fixture(scope="module")
def model(recipe, device):
    torch.manual_seed(0)
    return GPT(recipe).to(device).eval()


@pytest.fixture(scope="module", params=["one", "num_samples"])
def batch(request, recipe) -> int:
    """1, and the rows `lab generate` decodes together by default: gpt_small's num_samples."""
    return 1 if request.param == "one" else recipe.generate.num_samples


@pytest.fixture(scope="module")
def prompt(model, size, device, batch):
    generator = torch.Generator().manual_seed(0)
    return torch.randint(model.config.vocab_size, (batch, size.prompt_tokens), generator=generator).to(device)


@pytest.fixture(scope="module")
def expected(generate, model, prompt, size):
    """The uncached path's greedy tokens, made once: what both timed paths must reproduce."""
    return new_tokens(generate(model, prompt, size.new_tokens, temperature=0.0, use_cache=False), prompt)


@pytest.mark.parametrize("use_cache", [False, True], ids=["uncached", "cached"])
def test_generation(timed, benchmark, generate, model, prompt, expected, size, device, use_cache):
    n = size.new_tokens
    rows = prompt.size(0)
    benchmark.group = (
        f"generate: gpt_small, batch {rows}, prompt {prompt.size(1)}, {n} new tokens, greedy "
        f"{machine.label(device, model.tok_emb.weight.dtype)}"
    )
    benchmark.extra_info.update(
        variant="cached" if use_cache else "uncached", reference=REFERENCE, items=rows * n, batch=rows
    )

    out, mean = timed(lambda: generate(model, prompt, n, temperature=0.0, use_cache=use_cache))

    tokens = new_tokens(out, prompt)
    assert tokens.shape == (rows, n), f"asked for {rows} x {n} new tokens, got {tuple(tokens.shape)}"
    assert torch.equal(tokens, expected), (
        f"cached and uncached greedy tokens differ from position {first_difference(tokens, expected)}"
    )
    if mean:
        benchmark.extra_info["tokens_per_s"] = rows * n / mean


def new_tokens(out: torch.Tensor, prompt: torch.Tensor) -> torch.Tensor:
    """generate returns the prompt followed by the new tokens."""
    assert torch.equal(out[:, : prompt.size(1)], prompt), "generate's output does not start with the prompt"
    return out[:, prompt.size(1) :]


def first_difference(a: torch.Tensor, b: torch.Tensor) -> int:
    return int((a != b).any(dim=0).int().argmax())
