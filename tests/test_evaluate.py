"""lab/inference/scoring.py: bits per byte, checked by hand."""

import math

import pytest

from lab.inference.scoring import bits_per_byte, utf8_bytes
from lab.plugins import registry


@pytest.fixture(scope="module")
def gpt2():
    return registry().get("tokenizer", "gpt2").factory(None)


def test_bits_per_byte_by_hand(gpt2):
    # "Hello world" is 2 GPT-2 tokens ("Hello", " world") and 11 bytes. A mean loss of 1 nat per token
    # is 2 / ln 2 = 2.885 bits in all, over 11 bytes: 0.26231 bits per byte.
    ids = gpt2.encode("Hello world")
    assert len(ids) == 2 and utf8_bytes(gpt2, ids) == 11
    assert bits_per_byte(1.0, 2, 11) == pytest.approx(2 / math.log(2) / 11)
    assert round(bits_per_byte(1.0, 2, 11), 5) == 0.26231


def test_bytes_are_utf8_bytes_not_characters(gpt2):
    import torch

    text = "café ☕"  # 6 characters, 9 bytes: é is 2 bytes, ☕ is 3
    assert utf8_bytes(gpt2, gpt2.encode(text)) == 9
    rows = torch.tensor([gpt2.encode("Hello world"), gpt2.encode("Hello world")])
    assert utf8_bytes(gpt2, rows) == 22  # a batch: every row's bytes


@pytest.mark.parametrize("softcap", [None, 0.05])  # a cap below the logits: it bites
def test_token_logprobs_are_the_models_own_loss(gpt_small_path, softcap):
    """Scoring applies the head only where it scores, soft cap included: the same numbers as forward."""
    import torch

    from lab.inference.scoring import token_logprobs
    from lab.model import GPT
    from lab.recipe import load_recipe

    cap = [f"model.logit_softcap={softcap}"] if softcap else []
    recipe = load_recipe(
        gpt_small_path, ["model.n_layer=1", "model.n_embd=32", "model.n_head=2", "model.block_size=16", *cap]
    )
    torch.manual_seed(0)
    model = GPT(recipe).eval()
    idx = torch.randint(0, 50257, (2, 16))
    targets = torch.randint(0, 50257, (2, 16))
    scored = torch.rand(2, 16) < 0.5
    with torch.no_grad():
        logits, _ = model(idx)
        expected = logits.double().log_softmax(-1).gather(-1, targets[..., None]).squeeze(-1)[scored]
        logprobs, greedy = token_logprobs(model, idx, targets, scored)
    torch.testing.assert_close(
        logprobs.double(), expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item()
    )
    assert torch.equal(greedy, (logits.argmax(-1) == targets)[scored])
