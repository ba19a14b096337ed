"""Greedy generation with gpt_small's own shape, batch 1: with the KV cache and without.

Without a cache every new token runs the whole sequence again, so that path makes fewer tokens
(see benchmarks.machine.SIZES); both report tokens/s, and the summary compares time per token.
The reference is the uncached path. Cached and uncached must choose the same tokens.
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
        from lab.generate import generate
    except ImportError as e:
        pytest.skip(f"lab.generate is not importable yet ({e}): generation is not benchmarked")
    return generate


@pytest.fixture(scope="module")
def model(device):
    if not GPT_SMALL.exists():
        pytest.skip(f"{GPT_SMALL} is missing: generation is benchmarked on gpt_small's shape")
    torch.manual_seed(0)
    return GPT(load_recipe(GPT_SMALL)).to(device).eval()


@pytest.fixture(scope="module")
def prompt(model, size, device):
    generator = torch.Generator().manual_seed(0)
    return torch.randint(model.config.vocab_size, (1, size.prompt_tokens), generator=generator).to(device)


@pytest.fixture(scope="module")
def expected(generate, model, prompt, size):
    """The uncached path's greedy tokens, made once: what both timed paths must reproduce."""
    return new_tokens(generate(model, prompt, size.uncached_tokens, temperature=0.0, use_cache=False), prompt)


@pytest.mark.parametrize("use_cache", [False, True], ids=["uncached", "cached"])
def test_generation(timed, benchmark, generate, model, prompt, expected, size, device, use_cache):
    n = size.cached_tokens if use_cache else size.uncached_tokens
    benchmark.group = (f"generate: gpt_small, batch 1, prompt {prompt.size(1)}, greedy "
                       f"{machine.label(device, model.tok_emb.weight.dtype)}")
    benchmark.extra_info.update(variant="cached" if use_cache else "uncached", reference=REFERENCE, items=n)

    out, mean = timed(lambda: generate(model, prompt, n, temperature=0.0, use_cache=use_cache))

    tokens = new_tokens(out, prompt)
    assert tokens.size(1) == n, f"asked for {n} new tokens, got {tokens.size(1)}"
    same = expected.size(1)
    assert torch.equal(tokens[:, :same], expected), (
        f"cached and uncached greedy tokens differ from position {first_difference(tokens[:, :same], expected)}")
    if mean:
        benchmark.extra_info["tokens_per_s"] = n / mean


def new_tokens(out: torch.Tensor, prompt: torch.Tensor) -> torch.Tensor:
    """generate returns the prompt followed by the new tokens."""
    assert torch.equal(out[:, :prompt.size(1)], prompt), "generate's output does not start with the prompt"
    return out[:, prompt.size(1):]


def first_difference(a: torch.Tensor, b: torch.Tensor) -> int:
    return int((a != b).any(dim=0).int().argmax())
