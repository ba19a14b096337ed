"""The assembled model is GPT-2: same logits and loss as transformers' GPT2LMHeadModel with the same
weights; sdpa agrees with the plain reference; GPT-2's initialisation and parameter count."""

import math

import pytest
import torch

from lab.model import GPT
from lab.recipe import load_recipe
from lab.testing import assert_close_to_scale


def hf_to_lab(hf_state: dict, n_layer: int) -> dict:
    """transformers' GPT-2 names -> lab's. GPT-2's Conv1D stores weights as (in, out): transpose."""
    out = {
        "tok_emb.weight": hf_state["transformer.wte.weight"],
        "position.wpe.weight": hf_state["transformer.wpe.weight"],
        "norm_f.weight": hf_state["transformer.ln_f.weight"],
        "norm_f.bias": hf_state["transformer.ln_f.bias"],
    }
    rename = {
        "ln_1": "norm_1",
        "ln_2": "norm_2",
        "attn.c_attn": "attn.qkv",
        "attn.c_proj": "attn.proj",
        "mlp.c_fc": "mlp.fc",
        "mlp.c_proj": "mlp.proj",
    }
    for i in range(n_layer):
        for hf, ours in rename.items():
            w, b = hf_state[f"transformer.h.{i}.{hf}.weight"], hf_state[f"transformer.h.{i}.{hf}.bias"]
            out[f"blocks.{i}.{ours}.weight"] = w if hf.startswith("ln") else w.t()
            out[f"blocks.{i}.{ours}.bias"] = b
    out["head.weight"] = out["tok_emb.weight"]
    return out


def test_same_logits_and_loss_as_transformers_gpt2(gpt_small_path):
    transformers = pytest.importorskip("transformers")
    recipe = load_recipe(gpt_small_path)  # the default model's shape: 6 layers, 4 heads, 256 wide
    m = recipe.model
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(
            vocab_size=m.vocab_size,
            n_positions=m.block_size,
            n_embd=m.n_embd,
            n_layer=m.n_layer,
            n_head=m.n_head,
            activation_function="gelu_new",
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            layer_norm_epsilon=1e-5,
            tie_word_embeddings=True,
        ),
    ).eval()
    ours = GPT(recipe).eval()
    ours.load_state_dict(hf_to_lab(hf.state_dict(), m.n_layer))

    idx = torch.randint(0, m.vocab_size, (2, 129), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(input_ids=idx, labels=idx)
        logits, _ = ours(idx[:, :-1])
        _, loss = ours(idx[:, :-1], targets=idx[:, 1:])
    # Relative to the logits' scale: float32 rounding grows with the values, and differs by CPU.
    assert_close_to_scale(logits, ref.logits[:, :-1], 1e-5, "logits")
    assert_close_to_scale(loss, ref.loss, 1e-6, "loss")


def twin_models(path, n_layer=2):
    """The same weights under sdpa and under the plain reference attention."""
    a = GPT(load_recipe(path, ["model.n_layer=%d" % n_layer, "model.block_size=64"]))
    b = GPT(
        load_recipe(
            path, ["model.n_layer=%d" % n_layer, "model.block_size=64", "model.attention.name=manual"]
        )
    )
    b.load_state_dict(a.state_dict())
    return a, b


def test_sdpa_matches_the_manual_reference_outputs_and_gradients(gpt_small_path):
    """At the attention itself: outputs, parameter gradients and input gradients within 1e-5 of their
    scale."""
    torch.manual_seed(0)
    fused, manual = (model.blocks[0].attn for model in twin_models(gpt_small_path))
    position = GPT(load_recipe(gpt_small_path, ["model.n_layer=1", "model.block_size=64"])).position
    x = torch.randn(2, 64, 256)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    pos = torch.arange(64)
    ya, yb = fused(xa, pos, position), manual(xb, pos, position)
    # Within 1e-5 of each tensor's scale: float32 rounding grows with the values (a weight gradient
    # sums over every position), and its amount differs from CPU to CPU (~4e-7 of the scale here).
    assert_close_to_scale(ya, yb, 1e-5, "output")
    g = torch.randn_like(ya)
    ya.backward(g)
    yb.backward(g)
    assert_close_to_scale(xa.grad, xb.grad, 1e-5, "input gradient")
    grads_b = dict(manual.named_parameters())
    for name, p in fused.named_parameters():
        assert_close_to_scale(p.grad, grads_b[name].grad, 1e-5, f"gradient of {name}")


def test_sdpa_and_manual_models_agree_end_to_end(gpt_small_path):
    torch.manual_seed(0)
    fused, manual = twin_models(gpt_small_path)
    idx = torch.randint(0, 50257, (2, 64))
    (la, _), (lb, _) = fused(idx), manual(idx)
    assert_close_to_scale(la, lb, 1e-5, "logits")  # relative: rounding grows with the values
    _, lossa = fused(idx, targets=idx)
    _, lossb = manual(idx, targets=idx)
    assert_close_to_scale(lossa, lossb, 1e-6, "loss")


def test_gpt2_initialisation(gpt_small_path):
    torch.manual_seed(0)
    model = GPT(load_recipe(gpt_small_path))
    n_layer = model.config.n_layer
    block = model.blocks[0]
    # Sample standard deviations of 65k+ draws: relative, as the stds differ in scale (noise ~0.3%).
    assert block.attn.qkv.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.tok_emb.weight.std().item() == pytest.approx(0.02, rel=0.05)
    residual_std = 0.02 / math.sqrt(2 * n_layer)
    for proj in (block.attn.proj.weight, block.mlp.proj.weight):
        assert proj.std().item() == pytest.approx(residual_std, rel=0.05)
    assert torch.all(block.attn.qkv.bias == 0) and torch.all(block.norm_1.weight == 1)
    assert model.head.weight is model.tok_emb.weight  # tied


def test_init_weights_is_separate_from_construction(gpt_small_path):
    """A model built one way and re-initialised with the same seed gets the same weights."""
    recipe = load_recipe(gpt_small_path, ["model.n_layer=1"])
    torch.manual_seed(3)
    a = GPT(recipe)
    b = GPT(recipe)
    torch.manual_seed(3)
    b.init_weights()
    torch.manual_seed(3)
    a.init_weights()
    for (n, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), n


def test_parameter_count_leaves_out_what_gpt2_leaves_out(gpt_small_path):
    model = GPT(load_recipe(gpt_small_path))
    V, T, C, L = 50257, 1024, 256, 6
    per_block = 2 * C + (3 * C * C + 3 * C) + (C * C + C) + 2 * C + (4 * C * C + 4 * C) + (4 * C * C + C)
    non_embedding = V * C + L * per_block + 2 * C  # the tied token embedding counts: it is the head
    assert model.num_params() == non_embedding
    assert model.num_params(non_embedding=False) == non_embedding + T * C  # + position embeddings


def test_untied_head_counts_the_head_not_the_lookup(gpt_small_path):
    tied = GPT(load_recipe(gpt_small_path, ["model.n_layer=1"]))
    untied = GPT(load_recipe(gpt_small_path, ["model.n_layer=1", "model.tie_embeddings=false"]))
    assert untied.head.weight is not untied.tok_emb.weight
    assert untied.num_params() == tied.num_params()
    assert untied.num_params(non_embedding=False) == tied.num_params(non_embedding=False) + 50257 * 256


def test_fused_head_loss_equals_the_plain_path(gpt_small_path):
    """model.loss_chunk (on by default) never builds the full logits; loss and every gradient must
    match the plain cross-entropy over full logits: loss within 1e-6, gradients within 1e-5 of scale."""
    torch.manual_seed(0)
    recipe = ["model.n_layer=2", "model.block_size=64"]
    fused = GPT(load_recipe(gpt_small_path, recipe + ["model.loss_chunk=48"]))  # chunks cut rows unevenly
    plain = GPT(load_recipe(gpt_small_path, recipe + ["model.loss_chunk=0"]))
    plain.load_state_dict(fused.state_dict())
    idx = torch.randint(0, 50257, (2, 64))
    targets = idx.roll(-1, dims=1)
    targets[:, -3:] = -1  # ignored positions must not count
    logits, loss_f = fused(idx, targets=targets)
    assert logits is None
    _, loss_p = plain(idx, targets=targets)
    assert_close_to_scale(loss_f, loss_p, 1e-6, "loss")
    loss_f.backward()
    loss_p.backward()
    plain_grads = dict(plain.named_parameters())
    for name, p in fused.named_parameters():
        # a gain's gradient sums over every position: ~1e-6 of its scale apart on AVX-512
        assert_close_to_scale(p.grad, plain_grads[name].grad, 1e-5, f"gradient of {name}")


@pytest.mark.parametrize("mlp", ["gelu", "relu2", "swiglu", "moe"])
def test_dropout_is_nothing_at_zero_and_drops_when_set(gpt_small_path, mlp):
    """At dropout 0 no Dropout module is left to dispatch (a cached decoding step would pay ~6 us for
    each, a dozen a token); at dropout > 0 training drops and evaluation does not."""
    base = ["model.n_layer=2", "model.n_embd=64", "model.block_size=32", f"model.mlp.name={mlp}"]
    x = torch.randint(0, 100, (2, 16))
    none = GPT(load_recipe(gpt_small_path, base + ["model.dropout=0.0"]))
    assert not any(isinstance(m, torch.nn.Dropout) for m in none.modules())
    torch.manual_seed(0)
    some = GPT(load_recipe(gpt_small_path, base + ["model.dropout=0.5"]))
    # the model's, the attention's and the MLP's dropout, in every block
    assert sum(isinstance(m, torch.nn.Dropout) for m in some.modules()) == 1 + 2 * 2
    some.train()
    assert not torch.equal(some(x)[0], some(x)[0])
    some.eval()
    assert torch.equal(some(x)[0], some(x)[0])
