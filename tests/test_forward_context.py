"""The forward context (lab.interfaces.ForwardContext): what it carries, who gets it, and the head
inside the fused loss (a chunk_loss term's value and gradient against a float64 reference)."""

import pytest
import torch
import torch.nn.functional as F
from pydantic import BaseModel
from torch import nn

from lab import hookimpl
from lab.engine.trainer import micro_backward
from lab.interfaces import Extension, ForwardContext, document_ids
from lab.model import GPT
from lab.plugins import build_registry, registry
from lab.recipe import SECTIONS, ModelConfig, Part, Recipe
from lab.testing import assert_close_to_scale


class Empty(BaseModel):
    pass


class ContextMLP(nn.Module):
    """An MLP that opts in to the context and keeps what it saw."""

    wants_context = True

    def __init__(self, config, model):
        super().__init__()
        self.fc = nn.Linear(model.n_embd, model.n_embd)
        self.seen = []

    def forward(self, x, ctx=None):
        self.seen.append(ctx)
        return self.fc(x)


class ContextNorm(nn.LayerNorm):
    wants_context = True

    def __init__(self, config, model):
        super().__init__(model.n_embd)
        self.seen = []

    def forward(self, x, ctx=None):
        self.seen.append(ctx)
        return super().forward(x)


class LogitPenalty(Extension):
    """A term of the full logits (mean of logits^2 over the vocabulary): the generic path."""

    reads_logits = True

    def __init__(self, config=None, model=None):
        super().__init__()

    def chunk_loss(self, chunk, ctx):
        return {"logit_l2": (chunk.logits.float().square().mean(dim=-1), 0.01)}


class LseSquare(Extension):
    def __init__(self, config=None, model=None):
        super().__init__()

    def chunk_loss(self, chunk, ctx):
        # z-loss plus a term of the target logit: both folded into the cross-entropy's own gradient
        return {"z": (chunk.lse.square(), 0.05), "t": (chunk.target_logit.square(), 0.02)}


class P:
    @hookimpl
    def lab_components(self, register):
        register("mlp", "ctx_mlp", ContextMLP, Empty, "")
        register("norm", "ctx_norm", ContextNorm, Empty, "")
        register("extension", "logit_l2", LogitPenalty, Empty, "")
        register("extension", "lse_square", LseSquare, Empty, "")


@pytest.fixture(scope="module")
def plugins():
    return build_registry({"test": P()}, warn=False)  # the installed components and these


def gpt(plugins, mlp="gelu", norm="layernorm", extensions=(), **model):
    parts = {
        "attention": Part(plugins.get("attention", "manual"), plugins.get("attention", "manual").Config()),
        "mlp": Part(plugins.get("mlp", mlp), plugins.get("mlp", mlp).Config()),
        "norm": Part(plugins.get("norm", norm), plugins.get("norm", norm).Config()),
        "position": Part(plugins.get("position", "rope"), plugins.get("position", "rope").Config()),
    }
    sections = {key: section() for key, section in SECTIONS.items()}
    shape = dict(vocab_size=70, block_size=16, n_layer=2, n_head=2, n_embd=16, tie_embeddings=False)
    sections["model"] = ModelConfig(**{**shape, **model})
    exts = [Part(plugins.get("extension", e), Empty()) for e in extensions]
    torch.manual_seed(0)
    return GPT(Recipe(name="t", source="test", parts=parts, extensions=exts, **sections))


def test_components_that_ask_get_the_context_with_the_data_sources_metadata(plugins):
    model = gpt(plugins, mlp="ctx_mlp", norm="ctx_norm")
    x, y = torch.randint(0, 70, (2, 10)), torch.randint(0, 70, (2, 10))
    meta = {"doc_ids": torch.arange(20).view(2, 10) // 4}
    micro_backward(model, model, x, y, accum=1, meta=meta)  # the trainer's path
    mlp, norm = model.blocks[0].mlp, model.blocks[1].norm_2
    for seen in (mlp.seen, norm.seen):
        ctx = seen[-1]
        assert isinstance(ctx, ForwardContext)
        assert ctx.ids is x and ctx.targets is y and ctx.start_pos == 0
        assert torch.equal(ctx.meta["doc_ids"], meta["doc_ids"])
        assert torch.equal(ctx.pos, torch.arange(10))
    assert mlp.seen[-1] is norm.seen[-1], "one context per forward, shared by every component"


def test_components_that_do_not_ask_are_called_as_before(plugins):
    model = gpt(plugins)  # gelu and layernorm: forward(x) only
    x = torch.randint(0, 70, (2, 10))
    logits, _ = model(x)
    assert logits.shape == (2, 10, 70)


def test_the_context_knows_the_decoding_position_and_the_head(plugins):
    model = gpt(plugins, mlp="ctx_mlp", logit_softcap=3.0).eval()
    x = torch.randint(0, 70, (1, 6))
    caches = model.new_caches(1, 6)
    model(x[:, :4], caches=caches)
    model(x[:, 4:5], caches=caches, start_pos=4)
    ctx = model.blocks[0].mlp.seen[-1]
    assert ctx.start_pos == 4 and torch.equal(ctx.pos, torch.tensor([4])) and ctx.targets is None
    assert ctx.states == {}, "the caches' per-sequence states (no extension here: none)"
    h = torch.randn(3, 16, dtype=torch.float64)
    model.double()
    want = 3.0 * torch.tanh((h @ model.head.weight.T) / 3.0)  # the soft-capped head, written out
    assert_close_to_scale(ctx.logits(h), want, 1e-6)  # soft_cap takes its tanh in float32


def test_new_caches_is_still_one_cache_per_block_with_the_states_beside(plugins):
    model = gpt(plugins)
    caches = model.new_caches(2, 8)
    assert len(caches) == 2 and caches.states == {}


def reference_total(model, x, y, terms):
    """float64: cross-entropy + sum of weight x mean over the tokens of each term, from full logits."""
    logits = model.logits(model.hidden(x)).double().flatten(0, 1)
    lse = torch.logsumexp(logits, dim=-1)
    target = logits.gather(1, y.flatten()[:, None]).squeeze(1)
    total = F.cross_entropy(logits, y.flatten())
    if "z" in terms:
        total = total + 0.05 * lse.square().mean() + 0.02 * target.square().mean()
    if "logit_l2" in terms:
        total = total + 0.01 * logits.square().mean(dim=-1).mean()
    return total


@pytest.mark.parametrize("extension", ["lse_square", "logit_l2"])
@pytest.mark.parametrize("softcap", [None, 4.0])
def test_a_chunk_loss_inside_the_fused_loss_matches_float64_full_logits(plugins, extension, softcap):
    """The term's value is logged, and its gradient rides on the loss's backward: the gradient of
    (loss + extras.loss()) is that of cross-entropy + weight x term, computed on the full logits in
    float64. Both kinds: a term of lse / target logit (folded, free) and one of the whole logits."""
    fused = gpt(plugins, extensions=[extension], loss_chunk=7, logit_softcap=softcap)
    x, y = torch.randint(0, 70, (3, 10)), torch.randint(0, 70, (3, 10))
    _, loss = fused(x, y)
    (loss + fused.extras.loss()).backward()
    reference = gpt(plugins, extensions=[extension], loss_chunk=0, logit_softcap=softcap).double()
    total = reference_total(reference, x, y, {"lse_square": "z", "logit_l2": "logit_l2"}[extension])
    total.backward()
    for (name, p), (_, q) in zip(fused.named_parameters(), reference.named_parameters()):
        assert_close_to_scale(p.grad, q.grad, 1e-4, f"gradient of {name}")
    # The unfused path (model.loss_chunk = 0) adds the same terms with ordinary autograd.
    plain = gpt(plugins, extensions=[extension], loss_chunk=0, logit_softcap=softcap)
    _, plain_loss = plain(x, y)
    for name, value in fused.extras.terms.items():
        assert_close_to_scale(
            value, plain.extras.terms[name], 1e-5, f"term {name}, fused against full logits"
        )
    assert_close_to_scale(loss, plain_loss, 1e-5, "the cross-entropy itself")


def test_document_ids_against_a_loop():
    eot = 0
    x = torch.tensor([[5, 0, 3, 4, 4, 4, 4, 0, 1], [0, 1, 2, 3, 4, 5, 6, 7, 8]])

    def by_hand(row, cap):
        out, doc, since = [], 0, 0
        for i, t in enumerate(row.tolist()):
            if t == eot:
                doc, since = doc + 1, 0
            elif cap and since == cap:
                doc, since = doc + 1, 0  # a new piece of the same document
            since += 1
            out.append(doc)
        return out

    for cap in (None, 3):
        got = document_ids(x, eot, cap)
        for row, ids in zip(x, got):
            # only which tokens share a document matters: compare the partitions
            want = torch.tensor(by_hand(row, cap))
            assert torch.equal(ids[:, None] == ids[None, :], want[:, None] == want[None, :]), (cap, ids, want)


def test_the_registry_has_the_extension_slot():
    assert "extension" in registry().components
