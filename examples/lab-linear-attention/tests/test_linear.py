"""The linear attention against a float64 reference written as the recurrence it is, and against
lab's conformance checks for every attention."""

import pytest
import torch
import torch.nn.functional as F

from lab.interfaces import Position
from lab.plugins import registry
from lab.recipe import ModelConfig
from lab.testing import assert_close_to_scale, build, cases

MODEL = ModelConfig(vocab_size=64, block_size=32, n_layer=2, n_head=2, n_embd=16, bias=True)


def recurrent_reference(attn, x):
    """Token by token in float64: S += phi(k) v^T, z += phi(k), y = phi(q) S / (phi(q) . z)."""
    B, T, C = x.shape
    H, D = attn.n_head, attn.head_dim
    qkv = x.double() @ attn.qkv.weight.double().T + attn.qkv.bias.double()
    q, k, v = qkv.view(B, T, 3, H, D).unbind(2)  # each (B, T, nh, hs)
    q, k = F.elu(q) + 1, F.elu(k) + 1
    S, z = torch.zeros(B, H, D, D, dtype=torch.float64), torch.zeros(B, H, D, dtype=torch.float64)
    ys = []
    for t in range(T):
        S = S + k[:, t, :, :, None] * v[:, t, :, None, :]
        z = z + k[:, t]
        num = torch.einsum("bhd,bhde->bhe", q[:, t], S)
        den = torch.einsum("bhd,bhd->bh", q[:, t], z)[..., None]
        ys.append((num / (den + attn.eps)).reshape(B, C))
    y = torch.stack(ys, 1)
    return y @ attn.proj.weight.double().T + attn.proj.bias.double()


@pytest.mark.parametrize("chunk", [1, 3, 64])
def test_parallel_and_recurrent_forms_match_the_reference(chunk):
    attn = build(registry().get("attention", "linear"), MODEL, chunk=chunk).eval()
    x, pos, position = torch.randn(2, 10, 16), torch.arange(10), Position()
    expected = recurrent_reference(attn, x)
    # float32 against float64, relative to the values' scale: rounding grows with it, and differs by CPU
    assert_close_to_scale(attn(x, pos, position), expected, 1e-5, "parallel form")
    cache = attn.new_cache(2, 10, x.device, x.dtype)
    steps = [attn(x[:, :4], pos[:4], position, cache)]  # a prefill, then one token at a time
    steps += [attn(x[:, t : t + 1], pos[t : t + 1], position, cache) for t in range(4, 10)]
    assert_close_to_scale(torch.cat(steps, 1), expected, 1e-5, "recurrent form")


def test_the_cache_does_not_grow():
    attn = build(registry().get("attention", "linear"), MODEL)
    cache = attn.new_cache(1, 10_000, "cpu", torch.float32)
    assert cache.S.shape == (1, 2, 8, 8) and cache.z.shape == (1, 2, 8, 1)


@pytest.mark.parametrize("case", cases("attention", "linear"), ids=str)
def test_conformance(case):
    case()
