"""Grouped-query attention and QK-norm in lab.attention.SelfAttention: n_kv_head key/value heads
shared by groups of query heads, equal to a float64 formula and to transformers' Llama (GQA) and
Qwen 3 (GQA + QK-norm) attention with the same weights; the KV cache holds n_kv_head heads."""

import math

import pytest
import torch

from lab.commands.cli import main
from lab.errors import LabError
from lab.interfaces import Position
from lab.plugins import registry
from lab.recipe import ModelConfig
from lab.testing import build


def config(n_kv_head, qk_norm=False, bias=False):
    return ModelConfig(
        n_embd=32, n_head=4, n_kv_head=n_kv_head, qk_norm=qk_norm, block_size=16, bias=bias, dropout=0.0
    )


def reference(attn, x, qk_norm=False, rope=None):
    """float64 GQA attention from attn's weights, written out: heads h share kv head h // group."""
    x, W = x.double(), attn.qkv.weight.double()
    b = attn.qkv.bias.double() if attn.qkv.bias is not None else 0
    B, T, C = x.shape
    nh, nkv, hs = attn.n_head, attn.n_kv_head, attn.head_dim
    qkv = x @ W.T + b
    q = qkv[..., :C].view(B, T, nh, hs).transpose(1, 2)
    k = qkv[..., C : C + nkv * hs].view(B, T, nkv, hs).transpose(1, 2)
    v = qkv[..., C + nkv * hs :].view(B, T, nkv, hs).transpose(1, 2)
    if qk_norm:
        q = q / (q.pow(2).mean(-1, keepdim=True) + 1e-6).sqrt() * attn.q_norm.weight.double()
        k = k / (k.pow(2).mean(-1, keepdim=True) + 1e-6).sqrt() * attn.k_norm.weight.double()
    if rope is not None:
        q, k = rope(q), rope(k)
    group = nh // nkv
    out = torch.empty(B, nh, T, hs, dtype=torch.float64)
    mask = torch.ones(T, T, dtype=torch.bool).tril()
    for h in range(nh):
        scores = q[:, h] @ k[:, h // group].transpose(-1, -2) / math.sqrt(hs)
        out[:, h] = scores.masked_fill(~mask, float("-inf")).softmax(-1) @ v[:, h // group]
    y = out.transpose(1, 2).reshape(B, T, C)
    return y @ attn.proj.weight.double().T + (attn.proj.bias.double() if attn.proj.bias is not None else 0)


def randomize(module):
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * 0.3 + (1.0 if p.dim() == 1 and p.numel() == 8 else 0.0))
    return module


@pytest.mark.parametrize("name", ["sdpa", "manual"])
@pytest.mark.parametrize("n_kv_head, qk_norm", [(4, False), (2, False), (1, False), (2, True)])
def test_grouped_query_attention_equals_a_float64_formula(name, n_kv_head, qk_norm):
    torch.manual_seed(0)
    attn = randomize(build(registry().get("attention", name), config(n_kv_head, qk_norm, bias=True))).eval()
    x = torch.randn(2, 10, 32)
    got = attn(x, torch.arange(10), Position())
    expected = reference(attn, x, qk_norm)
    # float32 against float64: relative to the outputs' scale (about 1 here)
    torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-5 * expected.abs().max().item())


def test_the_projection_and_cache_shrink_with_kv_heads():
    sizes = {}
    for n_kv_head in (4, 2, 1):
        attn = build(registry().get("attention", "sdpa"), config(n_kv_head))
        assert attn.qkv.weight.shape == (32 + 2 * n_kv_head * 8, 32)
        cache = attn.new_cache(2, 16, "cpu", torch.float32)
        assert cache.k.shape == (2, n_kv_head, 16, 8)
        sizes[n_kv_head] = cache.k.nbytes + cache.v.nbytes
    assert sizes[2] * 2 == sizes[4] and sizes[1] * 4 == sizes[4]


def _hf_rope(hf_config, T):
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    rotary = LlamaRotaryEmbedding(hf_config)
    return rotary(torch.zeros(1, T, 1), torch.arange(T)[None])


def _copy_to_hf(attn, hf):
    C, kv = 32, attn.kv_dim
    with torch.no_grad():
        q, k, v = attn.qkv.weight.split([C, kv, kv])
        hf.q_proj.weight.copy_(q)
        hf.k_proj.weight.copy_(k)
        hf.v_proj.weight.copy_(v)
        hf.o_proj.weight.copy_(attn.proj.weight)
        if attn.qk_norm:
            hf.q_norm.weight.copy_(attn.q_norm.weight)
            hf.k_norm.weight.copy_(attn.k_norm.weight)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
@pytest.mark.parametrize("name", ["sdpa", "manual"])
def test_grouped_query_attention_equals_transformers(family, name):
    """Llama's GQA attention (n_kv_head 2 of 4) and Qwen 3's (GQA + QK-norm before rotary), same weights."""
    pytest.importorskip("transformers")
    if family == "llama":
        from transformers import LlamaConfig as Config
        from transformers.models.llama.modeling_llama import LlamaAttention as HFAttention
    else:
        from transformers import Qwen3Config as Config
        from transformers.models.qwen3.modeling_qwen3 import Qwen3Attention as HFAttention
    qk_norm = family == "qwen3"
    torch.manual_seed(0)
    hf_config = Config(
        hidden_size=32,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        attention_bias=False,
        rms_norm_eps=1e-6,
        max_position_embeddings=16,
        rope_theta=10000.0,
    )
    hf_config._attn_implementation = "eager"
    hf = HFAttention(hf_config, layer_idx=0).eval()
    attn = randomize(build(registry().get("attention", name), config(2, qk_norm))).eval()
    _copy_to_hf(attn, hf)
    rope = build(registry().get("position", "rope"), config(2, qk_norm))
    T = 12
    x = torch.randn(2, T, 32)
    mask = torch.full((T, T), float("-inf")).triu(1)[None, None]
    expected, _ = hf(x, position_embeddings=_hf_rope(hf_config, T), attention_mask=mask)
    got = attn(x, torch.arange(T), rope)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5 * expected.abs().max().item())


def test_n_kv_head_must_divide_n_head(tmp_path, gpt_small_path, capsys):
    assert main(["recipe", gpt_small_path, "--set", "model.n_kv_head=5"]) == 2
    err = capsys.readouterr().err
    assert "gpt_small.toml [model]: n_kv_head (5) must divide n_head (4)" in err
    assert "[1, 2, 4]" in err


def test_a_gqa_model_trains_and_decodes_with_the_cache(gpt_small_path):
    from lab.inference.sampling import generate
    from lab.model import GPT
    from lab.recipe import load_recipe

    recipe = load_recipe(
        gpt_small_path,
        [
            "model.n_layer=2",
            "model.n_embd=32",
            "model.n_head=4",
            "model.n_kv_head=1",
            "model.qk_norm=true",
            "model.vocab_size=64",
            "model.position.name=rope",
        ],
    )
    torch.manual_seed(0)
    model = GPT(recipe).eval()
    idx = torch.randint(0, 64, (2, 5))
    cached = generate(model, idx, 6, temperature=0.0)
    uncached = generate(model, idx, 6, temperature=0.0, use_cache=False)
    assert torch.equal(cached, uncached)
    with pytest.raises(LabError):
        load_recipe(gpt_small_path, ["model.n_kv_head=7"])
