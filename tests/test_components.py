"""The second family of components (rope, alibi, rmsnorm, swiglu, wsd, sliding), each against an
independent reference: a float64 formula written here, or torch's own module."""

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lab.interfaces import Position
from lab.model import GPT
from lab.plugins import registry
from lab.recipe import ModelConfig, load_recipe
from lab.testing import assert_close_to_scale, build

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
MODEL = ModelConfig(vocab_size=64, block_size=32, n_layer=2, n_head=4, n_embd=32, bias=True)


def component(slot, name, *args, **settings):
    return build(registry().get(slot, name), *args, **settings)


# --- rope --------------------------------------------------------------------------------------


def rope_reference(x, pos, theta, dims):
    """Pairs (i, i + dims/2) as complex numbers, times e^(i * pos * theta^(-2i/dims)), in float64."""
    x = x.double()
    half = dims // 2
    freqs = theta ** (-torch.arange(half, dtype=torch.float64) * 2 / dims)
    z = torch.complex(x[..., :half], x[..., half:dims]) * torch.polar(
        torch.ones(1, dtype=torch.float64), pos.double()[:, None] * freqs
    )
    return torch.cat([z.real, z.imag, x[..., dims:]], dim=-1)


@pytest.mark.parametrize("fraction", [1.0, 0.5])
def test_rope_matches_the_complex_rotation(fraction):
    rope = component("position", "rope", MODEL, theta=500.0, fraction=fraction)
    q, k = torch.randn(2, 2, 3, 4, 8)  # (B, nh, T, hs) each
    pos = torch.tensor([0, 3, 100, 5000])
    q2, k2 = rope.rotate(q, k, pos)
    dims = int(8 * fraction)
    # float32 angles, as in LLaMA: at position 5000 they are off by up to ~3e-4 radians, which moves
    # a rotated pair by that fraction of its length: a tolerance relative to the values' scale
    assert_close_to_scale(q2, rope_reference(q, pos, 500.0, dims), 5e-4, "rotated q")
    assert_close_to_scale(k2, rope_reference(k, pos, 500.0, dims), 5e-4, "rotated k")


def test_rope_scores_depend_only_on_the_distance():
    rope = component("position", "rope", MODEL)
    q, k = torch.randn(2, 1, 1, 1, 8)

    def score(m, n):
        q2, _ = rope.rotate(q, q, torch.tensor([m]))
        _, k2 = rope.rotate(k, k, torch.tensor([n]))
        return (q2 * k2).sum()

    # The float32 angles at ~1000 are off by ~1e-4 radians: relative to |q| |k|, the size of the
    # terms (the score itself may be near zero)
    assert_close_to_scale(score(7, 3), score(1007, 1003), 1e-4, "score", scale=(q.norm() * k.norm()).item())
    assert not torch.allclose(score(7, 3), score(7, 4))
    assert rope.max_len is None


# --- alibi -------------------------------------------------------------------------------------


def test_alibi_slopes_are_the_papers():
    from lab_position.alibi import alibi_slopes

    assert alibi_slopes(8).tolist() == [2.0**-i for i in range(1, 9)]
    # 6 heads: the 4-head slopes, then the odd ones of the 8-head set (Press et al.'s code)
    assert alibi_slopes(6).tolist() == [2**-2, 2**-4, 2**-6, 2**-8, 2**-1, 2**-3]


def test_alibi_bias_is_slope_times_distance():
    alibi = component("position", "alibi", MODEL)
    k_pos = torch.arange(6)
    q_pos = torch.tensor([5])  # one new token during decoding
    bias = alibi.bias(q_pos, k_pos)
    assert bias.shape == (4, 1, 6)
    for h, m in enumerate([2**-2, 2**-4, 2**-6, 2**-8]):
        assert bias[h, 0].tolist() == [-m * (5 - j) for j in range(6)]
    assert alibi.max_len is None and alibi.rotate(k_pos, k_pos, k_pos)[0] is k_pos


# --- rmsnorm -----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm_matches_torch(dtype):
    norm = component("norm", "rmsnorm", MODEL, eps=1e-6)
    torch.nn.init.normal_(norm.weight)
    reference = torch.nn.RMSNorm(32, eps=1e-6)
    reference.weight.data.copy_(norm.weight)
    x = 3 * torch.randn(2, 5, 32) + 1
    y = norm.to(dtype)(x.to(dtype))
    assert y.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 2e-2  # bfloat16 keeps 8 bits: ~0.4% per rounding
    assert_close_to_scale(y.float(), reference(x.to(dtype).float()), tol, f"{dtype} output")
    assert [n for n, _ in norm.named_parameters()] == ["weight"]  # no bias


# --- swiglu ------------------------------------------------------------------------------------


def test_swiglu_width_follows_llama():
    from lab_mlp.swiglu import SwiGLUConfig, hidden_width

    assert hidden_width(SwiGLUConfig(), 4096) == 11008  # LLaMA-7B's feed-forward width
    assert hidden_width(SwiGLUConfig(), 256) == 768
    assert hidden_width(SwiGLUConfig(multiple_of=64), 256) == 704
    assert hidden_width(SwiGLUConfig(hidden=100), 256) == 100


def test_swiglu_matches_the_formula_and_drops_biases():
    mlp = component("mlp", "swiglu", MODEL.model_copy(update={"bias": False}), multiple_of=16)
    assert all(p.dim() == 2 for p in mlp.parameters())
    x = torch.randn(2, 5, 32)
    H = mlp.proj.in_features
    wg, wu = mlp.fc.weight.double()[:H], mlp.fc.weight.double()[H:]
    xd = x.double()
    expected = (F.silu(xd @ wg.T) * (xd @ wu.T)) @ mlp.proj.weight.double().T
    assert_close_to_scale(mlp(x), expected, 1e-5, "output")  # float32 against float64: relative
    assert getattr(mlp.proj, "residual_projection", False)


# --- wsd ---------------------------------------------------------------------------------------


def test_wsd_warms_up_holds_and_decays_to_the_floor():
    wsd = component(
        "schedule", "wsd", 100, warmup_steps=10, decay_fraction=0.2, min_lr_ratio=0.1, shape="linear"
    )
    assert wsd(0) == pytest.approx(1 / 11) and wsd(9) == pytest.approx(10 / 11)
    assert [wsd(s) for s in (10, 50, 79, 80)] == [1.0] * 4
    assert wsd(90) == pytest.approx(0.55)
    assert wsd(100) == pytest.approx(0.1) and wsd(1000) == pytest.approx(0.1)


@pytest.mark.parametrize(
    "shape, at_quarter", [("sqrt", 1 - math.sqrt(0.25)), ("cosine", 0.5 * (1 + math.cos(math.pi / 4)))]
)
def test_wsd_decay_shapes(shape, at_quarter):
    wsd = component("schedule", "wsd", 100, warmup_steps=0, decay_fraction=0.2, min_lr_ratio=0.0, shape=shape)
    assert wsd(85) == pytest.approx(at_quarter)


# --- sliding -----------------------------------------------------------------------------------


def reference_attention(attn, x, window=None, bias=None):
    """Softmax attention in float64 from the module's own weights, masked to the last `window` keys."""
    B, T, C = x.shape
    nh = attn.n_head
    qkv = x.double() @ attn.qkv.weight.double().T + attn.qkv.bias.double()
    q, k, v = qkv.view(B, T, 3, nh, C // nh).permute(2, 0, 3, 1, 4)
    scores = q @ k.transpose(-2, -1) / math.sqrt(C // nh) + (0 if bias is None else bias.double())
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    seen = (j <= i) & ((i - j < window) if window else True)
    y = scores.masked_fill(~seen, float("-inf")).softmax(-1) @ v
    return y.transpose(1, 2).reshape(B, T, C) @ attn.proj.weight.double().T + attn.proj.bias.double()


def test_sliding_window_full_and_cached_match_the_reference():
    attn = component("attention", "sliding", MODEL, window=3).eval()
    x, pos = torch.randn(2, 10, 32), torch.arange(10)
    expected = reference_attention(attn, x, window=3)
    # float32 against float64, relative to the values' scale (rounding grows with it, and differs by CPU)
    assert_close_to_scale(attn(x, pos, Position()), expected, 1e-5, "full forward")
    cache = attn.new_cache(2, 10, x.device, x.dtype)
    steps = [attn(x[:, :4], pos[:4], Position(), cache)]
    steps += [attn(x[:, t : t + 1], pos[t : t + 1], Position(), cache) for t in range(4, 10)]
    assert_close_to_scale(torch.cat(steps, 1), expected, 1e-5, "cached decoding")


def test_sliding_with_a_wide_window_is_plain_causal_attention():
    attn = component("attention", "sliding", MODEL, window=64, backend="sdpa").eval()
    x = torch.randn(2, 10, 32)
    assert_close_to_scale(attn(x, torch.arange(10), Position()), reference_attention(attn, x), 1e-5, "output")


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("with_bias", [False, True])
def test_flex_sliding_kernel_matches_the_reference(with_bias):
    """The CUDA path's kernel, run here as FlexAttention runs on CPU: forward only, unfused."""
    from lab_attention.sliding import flex_sliding

    q, k, v = torch.randn(3, 1, 2, 20, 8).double().unbind(0)
    bias = torch.randn(2, 20, 20).double() if with_bias else None
    i, j = torch.arange(20)[:, None], torch.arange(20)[None, :]
    scores = q @ k.transpose(-2, -1) / math.sqrt(8) + (0 if bias is None else bias)
    expected = scores.masked_fill(~((j <= i) & (i - j < 5)), float("-inf")).softmax(-1) @ v
    with torch.no_grad():
        got = flex_sliding(q.float(), k.float(), v.float(), 5, None if bias is None else bias.float())
    assert_close_to_scale(got, expected, 1e-5, "output")  # float32 against float64: relative


# --- the llama_style recipe --------------------------------------------------------------------


def test_llama_style_builds_and_decodes_with_a_cache():
    recipe = load_recipe(
        RECIPES / "llama_style.toml",
        [
            "model.n_layer=2",
            "model.n_embd=32",
            "model.n_head=4",
            "model.vocab_size=64",
            "model.block_size=16",
        ],
    )
    assert {s: p.name for s, p in recipe.parts.items() if s in ("position", "norm", "mlp")} == {
        "position": "rope",
        "norm": "rmsnorm",
        "mlp": "swiglu",
    }
    model = GPT(recipe).eval()
    assert not any(n.endswith("bias") for n, _ in model.named_parameters())
    idx = torch.randint(0, 64, (2, 40))  # longer than block_size: rope has no length limit
    full, _ = model(idx)
    caches = model.new_caches(2, 40)
    steps = [model(idx[:, :30], caches=caches)[0]]
    steps += [model(idx[:, t : t + 1], caches=caches, start_pos=t)[0] for t in range(30, 40)]
    assert_close_to_scale(torch.cat(steps, 1), full, 1e-5, "cached logits")  # relative: logits of any size
