"""The modern family (modded-nanogpt, nanochat, Gemma 2): squared-ReLU MLP, soft-capped logits and
zero-initialised residual projections, each against a float64 formula written here."""

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from lab.fused_loss import chunked_cross_entropy, soft_cap
from lab.model import GPT
from lab.plugins import registry
from lab.recipe import ModelConfig, load_recipe
from lab.testing import build

MODEL = ModelConfig(vocab_size=64, block_size=32, n_layer=2, n_head=4, n_embd=32, bias=True)


def relative(a, b) -> float:
    """Largest difference over the reference's largest magnitude: a tolerance that follows the scale."""
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp(min=1e-30)).item()


# --- relu2 -------------------------------------------------------------------------------------


def test_relu2_is_the_squared_relu_formula():
    mlp = build(registry().get("mlp", "relu2"), MODEL)
    x = torch.randn(2, 5, 32)
    xd = x.double()
    hidden = (xd @ mlp.fc.weight.double().T + mlp.fc.bias.double()).clamp(min=0) ** 2
    expected = hidden @ mlp.proj.weight.double().T + mlp.proj.bias.double()
    assert relative(mlp(x), expected) < 1e-6
    assert mlp.fc.out_features == 4 * 32 and getattr(mlp.proj, "residual_projection", False)


# --- logit soft-capping ------------------------------------------------------------------------

CAP = 5.0


def capped_loss_float64(x, w, targets):
    """The formula, in float64 with autograd: mean cross-entropy of cap * tanh(x W^T / cap)."""
    x, w = x.double().detach().requires_grad_(), w.double().detach().requires_grad_()
    logits = CAP * torch.tanh(x @ w.T / CAP)
    loss = F.cross_entropy(logits, targets, ignore_index=-1)
    loss.backward()
    return loss, x.grad, w.grad


@pytest.mark.parametrize("chunk", [7, 1024])  # rows cut unevenly; one chunk
def test_softcap_fused_and_plain_equal_the_float64_formula(chunk):
    torch.manual_seed(0)
    x, w = 3 * torch.randn(40, 16), torch.randn(50, 16)  # logits of ~12: well into the cap's bend
    targets = torch.randint(0, 50, (40,))
    targets[::5] = -1
    loss64, gx64, gw64 = capped_loss_float64(x, w, targets)

    xf, wf = x.clone().requires_grad_(), w.clone().requires_grad_()
    fused = chunked_cross_entropy(xf, wf, targets, chunk=chunk, softcap=CAP)
    fused.backward()
    xp, wp = x.clone().requires_grad_(), w.clone().requires_grad_()
    plain = F.cross_entropy(soft_cap(xp @ wp.T, CAP), targets, ignore_index=-1)
    plain.backward()

    assert abs(fused.item() - plain.item()) <= 1e-6 * abs(plain.item())
    assert abs(fused.item() - loss64.item()) <= 1e-6 * abs(loss64.item())
    for got, want in ((xf.grad, xp.grad), (wf.grad, wp.grad)):
        assert relative(got, want) < 1e-6
    for got, want in ((xf.grad, gx64), (wf.grad, gw64), (xp.grad, gx64), (wp.grad, gw64)):
        assert relative(got, want) < 1e-6


def test_softcap_in_the_model_caps_training_and_sampling_logits(gpt_small_path):
    torch.manual_seed(0)
    shape = ["model.n_layer=2", "model.block_size=64", f"model.logit_softcap={CAP}"]
    fused = GPT(load_recipe(gpt_small_path, shape + ["model.loss_chunk=48"]))
    plain = GPT(load_recipe(gpt_small_path, shape + ["model.loss_chunk=0"]))
    with torch.no_grad():  # logits large enough for the cap to matter
        fused.tok_emb.weight.mul_(20)
    plain.load_state_dict(fused.state_dict())
    idx = torch.randint(0, 50257, (2, 64))
    _, loss_f = fused(idx, targets=idx.roll(-1, dims=1))
    logits, loss_p = plain(idx, targets=idx.roll(-1, dims=1))
    assert abs(loss_f.item() - loss_p.item()) <= 1e-6 * loss_p.item()
    loss_f.backward()
    loss_p.backward()
    grads = dict(plain.named_parameters())
    for name, p in fused.named_parameters():
        assert relative(p.grad, grads[name].grad) < 1e-5, name

    # what generation samples from: the model's logits, capped
    with torch.no_grad():
        uncapped = GPT(load_recipe(gpt_small_path, shape[:2]))
        uncapped.load_state_dict(plain.state_dict())
        raw, _ = uncapped(idx, last_only=True)
        sampled, _ = plain(idx, last_only=True)
    assert raw.abs().max() > 2 * CAP
    assert sampled.abs().max() <= CAP
    assert relative(sampled, CAP * torch.tanh(raw.double() / CAP)) < 1e-6


@pytest.mark.parametrize("cap", ["0", "-3"])
def test_a_softcap_that_is_not_positive_is_a_recipe_error(cap, gpt_small_path):
    done = subprocess.run(
        [sys.executable, "-m", "lab", "recipe", gpt_small_path, "--set", f"model.logit_softcap={cap}"],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr
    message = done.stderr
    assert "gpt_small.toml" in message and "[model] logit_softcap" in message and "must be > 0" in message
    assert "--set model.logit_softcap=" in message


# --- zero-initialised residual projections -----------------------------------------------------


def test_zero_init_starts_every_block_as_the_identity_and_still_learns(gpt_small_path):
    torch.manual_seed(0)
    model = GPT(
        load_recipe(
            gpt_small_path, ["model.n_layer=2", "model.block_size=16", "model.zero_init_residual=true"]
        )
    )
    projections = [m for m in model.modules() if getattr(m, "residual_projection", False)]
    assert len(projections) == 4 and all(not p.weight.any() for p in projections)
    assert model.blocks[0].mlp.fc.weight.std() > 0.01  # the rest keeps GPT-2's initialisation
    idx = torch.randint(0, 50257, (2, 16))
    with torch.no_grad():
        x = model.position.embed(model.tok_emb(idx), torch.arange(16))
        for block in model.blocks:
            assert torch.equal(block(x, torch.arange(16), model.position), x)
    _, loss = model(idx, targets=idx.roll(-1, dims=1))
    loss.backward()
    assert all(p.weight.grad.abs().sum() > 0 for p in projections)


def test_the_local_global_recipe_is_three_sliding_layers_and_one_full():
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "recipes" / "local_global.toml"
    recipe = load_recipe(
        path, ["model.vocab_size=64", "model.n_embd=32", "model.block_size=64", "model.attention.window=16"]
    )
    model = GPT(recipe)
    assert [type(b.attn).__name__ for b in model.blocks] == ["SlidingAttention"] * 3 + ["SDPAAttention"]
    assert [b.attn.window for b in model.blocks[:3]] == [16] * 3
