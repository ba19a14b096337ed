"""Speed options give the same training as the plain path: bf16 autocast (what precision = "auto"
picks on CPUs with AMX) follows fp32 within 1%; the fused head + loss under autocast matches the
plain head + loss under autocast."""

import pytest
import torch

import lab.engine.precision as precision
from lab.interfaces import DataContext
from lab.model import GPT
from lab.recipe import load_recipe
from lab.roles import build_optimizer

SMALL = ["model.n_layer=2", "model.n_embd=128", "model.n_head=4", "model.block_size=128"]


def train_losses(recipe, dtype, steps=20):
    """Losses of `steps` AdamW steps on the shipped tinyshakespeare, autocast to dtype."""
    torch.manual_seed(0)
    model = GPT(recipe)
    optimizer = build_optimizer(recipe.parts["optimizer"], model)
    tokenizer = recipe.parts["tokenizer"].build()
    data = recipe.parts["data"].build(
        DataContext(recipe.model.block_size, recipe.model.vocab_size, tokenizer, 0)
    )
    losses = []
    for step in range(steps):
        x, y = data.batch("train", step, range(8))
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            _, loss = model(x, targets=y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


@pytest.mark.slow  # long training twice; test_fused_loss_under_autocast covers autocast's numerics
def test_bf16_autocast_trains_like_fp32(gpt_small_path):
    recipe = load_recipe(gpt_small_path, SMALL + ["optimizer.lr=1e-3"])
    fp32 = train_losses(recipe, torch.float32)
    bf16 = train_losses(recipe, torch.bfloat16)
    assert fp32[-1] < fp32[0] - 1.5  # it learns: the comparison below means something
    for a, b in zip(fp32, bf16):
        assert abs(a - b) <= 0.01 * a, (fp32, bf16)


def test_fused_loss_under_autocast_matches_the_plain_path(gpt_small_path):
    torch.manual_seed(0)
    fused = GPT(load_recipe(gpt_small_path, SMALL))
    plain = GPT(load_recipe(gpt_small_path, SMALL + ["model.loss_chunk=0"]))
    plain.load_state_dict(fused.state_dict())
    idx = torch.randint(0, 50257, (2, 128))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, loss_f = fused(idx, targets=idx.roll(-1, 1))
        _, loss_p = plain(idx, targets=idx.roll(-1, 1))
    assert loss_f.item() == pytest.approx(loss_p.item(), rel=1e-4)  # relative: a loss of any size
    loss_f.backward()
    loss_p.backward()
    g_f, g_p = fused.tok_emb.weight.grad, plain.tok_emb.weight.grad
    assert g_f.dtype == torch.float32  # a parameter's gradient keeps the parameter's dtype
    assert (g_f - g_p).norm() / g_p.norm() < 2e-2  # bf16 rounding, not a different gradient


@pytest.mark.parametrize(
    "flags, expected",
    [({"avx512f", "amx_bf16", "amx_tile"}, torch.bfloat16), ({"avx512f", "avx512_bf16"}, torch.float32)],
)
def test_auto_picks_bf16_only_where_the_cpu_multiplies_it_natively(
    gpt_small_path, monkeypatch, flags, expected
):
    monkeypatch.setattr(precision, "cpu_flags", lambda: flags)
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    recipe = load_recipe(gpt_small_path)
    assert precision.pick_dtype(recipe, torch.device("cpu")) == expected
    fp32 = load_recipe(gpt_small_path, ["train.precision='fp32'"])
    assert precision.pick_dtype(fp32, torch.device("cpu")) == torch.float32


@pytest.mark.parametrize(
    "isa, expected",
    [
        ("AVX2", torch.float32),
        ("avx512_core_bf16", torch.float32),
        ("AVX512_CORE_AMX", torch.bfloat16),
        ("ALL", torch.bfloat16),
    ],
)
def test_auto_stays_fp32_when_onednn_is_capped_below_amx(gpt_small_path, monkeypatch, isa, expected):
    """ONEDNN_MAX_CPU_ISA=AVX2 (how an AVX2 machine's path is tested on an AMX one) leaves bf16 emulated."""
    monkeypatch.setattr(precision, "cpu_flags", lambda: {"avx512f", "amx_bf16", "amx_tile"})
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", isa)
    assert precision.pick_dtype(load_recipe(gpt_small_path), torch.device("cpu")) == expected
