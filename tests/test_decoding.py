"""Weights laid out for decoding (lab/inference/decode_layout.py): another read of the same weights,
same numbers."""

import copy

import pytest
import torch

from lab.inference import decode_layout as decoding
from lab.inference.sampling import generate
from lab.model import GPT
from lab.recipe import load_recipe
from lab.testing import assert_close_to_scale

TINY = ["model.n_layer=2", "model.n_head=2", "model.n_embd=32", "model.block_size=64", "model.vocab_size=301"]


@pytest.fixture
def always_copy(monkeypatch):
    """Every layer takes the copy, whatever this machine's BLAS prefers: the path under test."""
    monkeypatch.setattr(decoding, "transposed_is_faster", lambda *args: True)


def tiny(gpt_small_path, overrides=()):
    torch.manual_seed(0)
    model = GPT(load_recipe(gpt_small_path, TINY + list(overrides))).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.3)  # spread-out logits: no near-ties for rounding to flip
    return model


@pytest.mark.parametrize(
    "overrides", [[], ["model.bias=false", "model.tie_embeddings=false"]], ids=["gpt2", "untied-no-bias"]
)
def test_same_logits_and_greedy_tokens_state_dict_untouched(gpt_small_path, always_copy, overrides):
    trained = tiny(gpt_small_path, overrides)
    laid_out = copy.deepcopy(trained)
    choices = decoding.lay_out_for_decoding(laid_out, rows=2)
    assert set(choices.values()) == {"copy"} and "head" in choices
    assert all(type(m) is decoding.DecodingLinear for n, m in laid_out.named_modules() if n in choices)
    # the state dict (what checkpoints and export-hf see) is the trained one, key for key
    assert laid_out.state_dict().keys() == trained.state_dict().keys()
    for key, value in trained.state_dict().items():
        assert torch.equal(laid_out.state_dict()[key], value), key

    prompt = torch.randint(0, 301, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        for rows in (prompt[:1, :1], prompt[:, :1]):  # one and two rows: the copy's path
            a, b = trained(rows)[0], laid_out(rows)[0]
            # Another summation order: a few ulps of the logits' scale. Measured 3.4e-7 of it with
            # AVX-512 or AVX2 kernels, 4.8e-7 with ATEN_CPU_CAPABILITY=default: checked at 1e-5.
            assert_close_to_scale(b, a, 1e-5, "logits of the laid-out model")
    assert torch.equal(
        generate(trained, prompt, 30, temperature=0), generate(laid_out, prompt, 30, temperature=0)
    )


def test_many_rows_keep_the_trained_path(gpt_small_path, always_copy, monkeypatch):
    model = tiny(gpt_small_path)
    decoding.lay_out_for_decoding(model, rows=1)
    used, linear = [], torch.nn.functional.linear
    monkeypatch.setattr(decoding.F, "linear", lambda *a: used.append(a[0].shape) or linear(*a))
    with torch.inference_mode():
        model(torch.zeros(1, 5, dtype=torch.long))  # a prefill of 5 rows
    assert used, "a prefill of many rows should read the weights as trained"


def test_a_layer_keeps_its_layout_where_the_copy_is_not_faster(gpt_small_path, monkeypatch):
    monkeypatch.setattr(
        decoding, "transposed_is_faster", lambda shape, *rest: shape[0] == 301
    )  # the head only
    model = tiny(gpt_small_path)
    choices = decoding.lay_out_for_decoding(model)
    assert choices["head"] == "copy"
    assert {c for n, c in choices.items() if n != "head"} == {"as trained"}


def test_the_measurement_runs_and_answers(gpt_small_path):
    assert decoding.transposed_is_faster((301, 32), torch.float32, "cpu", 1, 0.9) in (True, False)


def test_the_copy_serves_only_the_rows_it_was_faster_at(gpt_small_path, monkeypatch):
    """A server lays out for --max-batch rows: the copy, faster at 1 row here and slower at more,
    is used for one row only, and 3 or 8 rows read the weights as trained."""
    monkeypatch.setattr(
        decoding, "transposed_is_faster", lambda shape, dtype, device, rows, margin: rows == 1
    )
    model = tiny(gpt_small_path)
    choices = decoding.lay_out_for_decoding(model, rows=8)
    assert set(choices.values()) == {"copy at 1 rows"}
    used, linear = [], torch.nn.functional.linear
    monkeypatch.setattr(decoding.F, "linear", lambda *a: used.append(a[0].shape[0]) or linear(*a))
    with torch.inference_mode():
        for rows in (1, 3, 8):
            model(torch.zeros(rows, 1, dtype=torch.long))
    assert used and set(used) == {3, 8}
