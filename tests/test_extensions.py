"""The extension slot: recipes list any number, the model calls their hooks in the recipe's order, and
lab.testing's conformance checks catch what the contract forbids (state on the module, state that
does not resume, a context that does not reach the components). Also the conformance fixes: a
factory's LabError is a skip, a parameter reached only through an extra loss passes the gradient
check, and the attention benchmark takes a declared reference."""

import unittest

import pytest
import torch
import torch.nn.functional as F
from pydantic import BaseModel
from torch import nn

from benchmarks import test_attention as bench
from lab import hookimpl
from lab.attention import SelfAttention
from lab.errors import LabError
from lab.extras import add_loss
from lab.interfaces import Extension, Position
from lab.plugins import build_registry
from lab.recipe import resolve
from lab.testing import (
    attention_gradients,
    cases,
    extension_cached_decoding,
    extension_context_metadata,
    extension_interleaved_batches,
    extension_resume,
    token_map_gradients,
    token_map_shapes_and_dtypes,
)


class Empty(BaseModel):
    pass


class Shift(Extension):
    """Adds a learned vector to the embedding and a tag to the stream after each block."""

    def __init__(self, config, model):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(model.n_embd))
        self.calls = []

    def embed(self, x, ctx):
        self.calls.append("shift.embed")
        return x + self.bias

    def block_output(self, i, x, ctx):
        self.calls.append(f"shift.block_output.{i}")
        return x


class Scale(Extension):
    def __init__(self, config, model):
        super().__init__()
        self.calls = None  # set by the test to share Shift's list

    def embed(self, x, ctx):
        self.calls.append("scale.embed")
        return 2 * x


class PreviousOnModule(Extension):
    """What the contract forbids: the previous token kept on the module (keyed by batch size), as a
    smear without new_state would. Two batches of one size decoded in turn read each other's."""

    def __init__(self, config, model):
        super().__init__()
        self.lam = nn.Parameter(torch.tensor(0.5))
        self.previous = {}

    def embed(self, x, ctx):
        B = x.size(0)
        prev = x[:, :-1]
        if ctx.start_pos > 0 and B in self.previous:
            prev = torch.cat([self.previous[B], prev], dim=1)
        self.previous[B] = x[:, -1:].detach()
        shift = x.size(1) - prev.size(1)
        return torch.cat([x[:, :shift], x[:, shift:] + self.lam * prev], dim=1)


class ForgetsTheState(PreviousOnModule):
    """Looks back one token within a forward only: decoding one token at a time loses it."""

    def embed(self, x, ctx):
        return torch.cat([x[:, :1], x[:, 1:] + self.lam * x[:, :-1]], dim=1)


class Counter(Extension):
    """A hidden Python counter that changes the output and is not in state_dict: resume differs."""

    def __init__(self, config, model):
        super().__init__()
        self.w = nn.Parameter(torch.ones(1))
        self.steps = 0

    def embed(self, x, ctx):
        if self.training:
            self.steps += 1
        return x * self.w * (1 + 0.1 * self.steps)


class DropsMeta(Extension):
    def __init__(self, config, model):
        super().__init__()

    def embed(self, x, ctx):
        ctx.meta = {}  # what no extension may do: the data's metadata is lost to those after it
        return x


class Refuses(nn.Module):
    def __init__(self, config, model):
        raise LabError("this MLP needs n_embd = 4096")


class AuxOnly(nn.Module):
    """An MLP with a parameter reached only through an extra loss term (a router's balance)."""

    def __init__(self, config, model):
        super().__init__()
        self.fc = nn.Linear(model.n_embd, model.n_embd)
        self.router = nn.Parameter(torch.ones(4))

    def forward(self, x):
        add_loss(self, "balance", self.router.square().sum(), weight=0.01)
        return self.fc(x)


class AuxAttention(SelfAttention):
    def __init__(self, config, model):
        super().__init__(model)
        self.temperature = nn.Parameter(torch.ones(()))

    def attend(self, q, k, v, q_pos, k_pos, bias):
        add_loss(self, "temperature", self.temperature.square(), 1.0)
        return F.scaled_dot_product_attention(q, k, v, is_causal=q.size(2) == k.size(2))


class Uncausal(SelfAttention):
    """Not causal: against manual it differs from the first token."""

    def __init__(self, config, model):
        super().__init__(model)

    def attend(self, q, k, v, q_pos, k_pos, bias):
        return F.scaled_dot_product_attention(q, k, v)


class DeclaredDifferent(Uncausal):
    different_function = "bidirectional on purpose"


class AgainstSdpa(SelfAttention):
    reference_attention = "sdpa"

    def __init__(self, config, model):
        super().__init__(model)

    def attend(self, q, k, v, q_pos, k_pos, bias):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


class P:
    @hookimpl
    def lab_components(self, register):
        for name, cls in [
            ("shift", Shift),
            ("scale", Scale),
            ("module_state", PreviousOnModule),
            ("forgets", ForgetsTheState),
            ("counter", Counter),
            ("drops_meta", DropsMeta),
        ]:
            register("extension", name, cls, Empty, "")
        register("mlp", "refuses", Refuses, Empty, "")
        register("mlp", "aux_only", AuxOnly, Empty, "")
        register("attention", "aux_attention", AuxAttention, Empty, "")
        register("attention", "uncausal", Uncausal, Empty, "")
        register("attention", "declared", DeclaredDifferent, Empty, "")
        register("attention", "against_sdpa", AgainstSdpa, Empty, "")


@pytest.fixture
def plugins(monkeypatch):
    import lab.plugins

    found = build_registry({"lab-test": P()}, warn=False)
    monkeypatch.setattr(lab.plugins, "_registry", found)
    return found


RECIPE = {
    "model": {
        "vocab_size": 64,
        "block_size": 16,
        "n_layer": 2,
        "n_head": 2,
        "n_embd": 16,
        **{
            slot: {"name": name}
            for slot, name in [
                ("attention", "sdpa"),
                ("mlp", "gelu"),
                ("norm", "layernorm"),
                ("position", "rope"),
            ]
        },
    },
    "optimizer": {"name": "adamw"},
    "schedule": {"name": "cosine"},
    "tokenizer": {"name": "gpt2"},
    "data": {"name": "memmap"},
    "extension": {"shift": {}, "scale": {}},
}


def test_a_recipe_lists_any_number_of_extensions_in_order(plugins):
    recipe = resolve(RECIPE, "r.toml", plugins=plugins)
    assert [p.name for p in recipe.extensions] == ["shift", "scale"]
    assert recipe.to_dict()["extension"] == {"shift": {}, "scale": {}}
    assert resolve(recipe.to_dict(), "again.toml", plugins=plugins).to_dict() == recipe.to_dict()


def test_an_unknown_extension_is_one_message_naming_the_table(plugins):
    with pytest.raises(LabError, match=r"\[extension.shfit\].*shift"):
        resolve({**RECIPE, "extension": {"shfit": {}}}, "r.toml", plugins=plugins)


def test_hooks_run_in_the_recipes_order_and_extensions_are_saved_with_the_model(plugins):
    from lab.model import GPT

    model = GPT(resolve(RECIPE, "r.toml", plugins=plugins))
    calls = model.extensions["shift"].calls
    model.extensions["scale"].calls = calls
    model(torch.randint(0, 64, (1, 5)))
    assert calls == ["shift.embed", "scale.embed", "shift.block_output.0", "shift.block_output.1"]
    assert "extensions.shift.bias" in model.state_dict()
    with torch.no_grad():
        model.extensions["shift"].bias.fill_(1.0)
    x = torch.randint(0, 64, (1, 5))
    h = model.tok_emb(x)
    assert torch.equal(
        model.extensions["scale"].embed(model.extensions["shift"].embed(h, None), None), 2 * (h + 1)
    )


def check_of(plugins, name, check):
    return check(plugins.get("extension", name))


def test_state_on_the_module_fails_the_interleaved_check(plugins):
    check_of(plugins, "shift", extension_interleaved_batches)  # stateless: passes
    with pytest.raises(AssertionError, match="decoded in turn with another"):
        check_of(plugins, "module_state", extension_interleaved_batches)


def test_an_extension_that_loses_its_look_back_fails_the_cached_decoding_check(plugins):
    with pytest.raises(AssertionError, match="cached decoding"):
        check_of(plugins, "forgets", extension_cached_decoding)


def test_state_outside_the_state_dict_fails_the_resume_check(plugins):
    check_of(plugins, "shift", extension_resume)
    with pytest.raises(AssertionError, match="after loading the state"):
        check_of(plugins, "counter", extension_resume)


def test_an_extension_that_drops_the_metadata_fails_the_context_check(plugins):
    check_of(plugins, "shift", extension_context_metadata)
    with pytest.raises(AssertionError, match="doc_ids"):
        check_of(plugins, "drops_meta", extension_context_metadata)


def test_every_extension_check_runs_for_every_installed_extension(plugins):
    ids = {str(c) for c in cases("extension", "shift", plugins=plugins)}
    assert {
        f"extension-shift-extension_{n}" for n in ("cached_decoding", "interleaved_batches", "resume")
    } <= ids


def test_a_factory_that_refuses_with_a_lab_error_is_a_skip_with_the_reason(plugins):
    with pytest.raises(unittest.SkipTest, match="needs n_embd = 4096"):
        token_map_shapes_and_dtypes(plugins.get("mlp", "refuses"))


def test_a_parameter_reached_only_through_an_extra_loss_passes_the_gradient_checks(plugins):
    token_map_gradients(plugins.get("mlp", "aux_only"))
    attention_gradients(plugins.get("attention", "aux_attention"))


def bench_note(name):
    attn, reference = bench.build_pair(name, (2, 4, 16, 8), "cpu")
    x, pos = torch.randn(2, 16, 32), torch.arange(16)
    return bench.check(attn, reference, x, pos, Position(), "fwd+bwd")


def test_the_attention_benchmark_takes_a_declared_reference_or_different_function(plugins):
    with pytest.raises(AssertionError, match="from the first token"):
        bench_note("uncausal")
    assert bench_note("declared").startswith("unchecked: computes another function")
    assert bench_note("against_sdpa").startswith("matches sdpa")
