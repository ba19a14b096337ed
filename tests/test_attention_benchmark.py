"""The attention benchmark's correctness check and FLOP count (benchmarks/test_attention.py): every
softmax attention is checked against manual with the same weights, even one with parameters of its
own, and FLOPs come from the attention where it counts them."""

import pytest
import torch
import torch.nn.functional as F
from pydantic import BaseModel
from torch import nn

import lab.plugins
from benchmarks import machine
from benchmarks import test_attention as bench
from benchmarks import test_train_step as train_bench
from lab import hookimpl
from lab.attention import SelfAttention
from lab.interfaces import Position
from lab.plugins import build_registry, registry
from lab.recipe import ModelConfig, load_recipe
from lab.testing import build


class Empty(BaseModel):
    pass


class Tempered(SelfAttention):
    """A learned temperature (a parameter manual lacks), and a bug: no causal mask."""

    def __init__(self, config, model):
        super().__init__(model)
        self.temperature = nn.Parameter(torch.ones(()))

    def attend(self, q, k, v, q_pos, k_pos, bias):
        return F.scaled_dot_product_attention(q * self.temperature, k, v)


class Fixed(Tempered):
    def attend(self, q, k, v, q_pos, k_pos, bias):
        return F.scaled_dot_product_attention(q * self.temperature, k, v, is_causal=True)


class P:
    @hookimpl
    def lab_components(self, register):
        register("attention", "tempered", Tempered, Empty, "")
        register("attention", "fixed", Fixed, Empty, "")


@pytest.fixture
def plugins(monkeypatch):
    found = build_registry({"lab-tempered": P()}, warn=False)
    monkeypatch.setattr(lab.plugins, "_registry", found)
    return found


def run_check(name, model_settings=None):
    attn, reference = bench.build_pair(name, (2, 4, 16, 8), "cpu", model_settings)
    x, pos = torch.randn(2, 16, 32), torch.arange(16)
    return bench.check(attn, reference, x, pos, Position(), "fwd+bwd")


def test_an_attention_with_parameters_of_its_own_is_checked_and_its_bug_caught(plugins):
    assert run_check("fixed").startswith("matches manual")
    with pytest.raises(AssertionError, match="differs from manual's from the first token"):
        run_check("tempered")


def test_grouped_query_attention_is_checked_against_manual(plugins):
    assert run_check("sdpa", {"n_kv_head": 2, "qk_norm": True}).startswith("matches manual")


def test_flops_come_from_the_attention():
    model = ModelConfig(n_embd=32, n_head=4, block_size=64)
    full = build(registry().get("attention", "sdpa"), model)
    B, T = 2, 64
    # the module docstring's formula, up to causality's diagonal (T(T+1)/2 pairs, not T^2/2)
    formula = bench.attention_flops(B, 4, T, 8, backward=False)
    assert full.flops(B, T) == pytest.approx(formula, rel=2 / T)
    window = build(registry().get("attention", "sliding"), model, window=8)
    pairs_full, pairs_window = T * (T + 1) / 2, 8 * 9 / 2 + (T - 8) * 8  # query i sees min(i + 1, 8) keys
    assert full.flops(B, T) - window.flops(B, T) == pytest.approx(4 * B * 4 * 8 * (pairs_full - pairs_window))
    gqa = build(registry().get("attention", "sdpa"), model.model_copy(update={"n_kv_head": 1}))
    saved = 2 * B * T * 32 * 2 * (32 - 8)  # k and v projections of 1 head instead of 4
    assert full.flops(B, T) - gqa.flops(B, T) == pytest.approx(saved)


@pytest.mark.parametrize("size", sorted(machine.SIZES))
@pytest.mark.parametrize("path", train_bench.RECIPES, ids=lambda p: p.stem)
def test_every_recipe_loads_at_every_benchmark_size(path, size):
    """`pytest benchmarks/` trains every recipe at one shape: a recipe whose layer pattern names a
    layer the shape lacks would fail there (local_global's fourth layer once did, at two layers)."""
    recipe = load_recipe(path, overrides=machine.SIZES[size].train_overrides)
    assert recipe.model.n_layer == int(machine.SIZES[size].train_overrides[0].split("=")[1])
