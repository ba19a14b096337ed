"""lab_speedrun: each technique against a straightforward float64 reference written out here, then all
of them in one run that trains on document-aligned batches, resumes exactly and decodes with the
cache as without it. (lab.testing's extension checks, run by test_conformance.py for every installed
extension, add cached decoding, interleaved batches, resume and the context's metadata per extension.)"""

import math
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tiny import tiny_recipe

from lab.commands.cli import main
from lab.errors import LabError
from lab.interfaces import ForwardContext, Position, document_ids
from lab.model import GPT
from lab.plugins import registry
from lab.recipe import SECTIONS, ModelConfig, Part, Recipe
from lab.runs.metrics import read_metrics
from lab.testing import _data_context, assert_close_to_scale, build
from lab_speedrun.wiring import ValueEmbeddingsConfig, table_pattern

EOT = 50256
MODEL = ModelConfig(vocab_size=64, block_size=32, n_layer=4, n_head=4, n_kv_head=2, n_embd=32, dropout=0.0)


def component(slot, name):
    return registry().get(slot, name)


def extension(name, model=MODEL, **settings):
    torch.manual_seed(0)
    ext = build(component("extension", name), model, **settings).double()
    with torch.no_grad():  # off the initial values: a weight at 0 (smear's) would hide the formula
        for p in ext.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return ext


def context(ids, **more):
    return ForwardContext(ids=ids, pos=torch.arange(ids.size(1)), **more)


def gpt(attention="sdpa", extensions=(), position="learned", dtype=torch.float64, **model):
    parts = {
        slot: Part(component(slot, name), component(slot, name).Config())
        for slot, name in [
            ("attention", attention),
            ("mlp", "relu2"),
            ("norm", "rmsnorm"),
            ("position", position),
        ]
    }
    sections = {key: section() for key, section in SECTIONS.items()}
    shape = dict(vocab_size=64, block_size=32, n_layer=4, n_head=4, n_embd=32, tie_embeddings=True)
    sections["model"] = ModelConfig(**{**shape, **model})
    exts = [Part(component("extension", e), component("extension", e).Config(**s)) for e, s in extensions]
    torch.manual_seed(0)
    m = GPT(Recipe(name="t", source="test", parts=parts, extensions=exts, **sections)).to(dtype)
    with torch.no_grad():
        for p in m.extensions.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return m.eval()


# --- value embeddings ---------------------------------------------------------------------------


def test_value_embedding_tables_follow_the_speedruns_pattern():
    assert table_pattern(ValueEmbeddingsConfig(), 12) == [0, 1, 2] + [-1] * 6 + [0, 1, 2]
    assert table_pattern(ValueEmbeddingsConfig(tables=2), 4) == [0, 1, 0, 1]


def test_value_embeddings_mix_each_layers_values_with_its_shared_table():
    ext = extension("value_embeddings", tables=2)  # layers 0, 2 share table 0; 1, 3 table 1
    B, T = 2, 7
    ids = torch.randint(0, 64, (B, T))
    ctx = context(ids)
    q = k = torch.randn(B, 4, T, 8, dtype=torch.float64)
    v = torch.randn(B, 2, T, 8, dtype=torch.float64)  # n_kv_head = 2 of 4: the values are grouped
    for layer, table in enumerate([0, 1, 0, 1]):
        _, _, got = ext.attention_qkv(layer, None, q, k, v, ctx)
        E = ext.tables[table].weight[ids].view(B, T, 2, 8).transpose(1, 2)  # the table's rows, as v's heads
        a, b = ext.mix[layer]
        assert_close_to_scale(got, a * v + b * E, 1e-12, f"layer {layer}'s values")


def test_the_cache_keeps_the_values_with_their_embeddings_mixed_in():
    model = gpt(extensions=[("value_embeddings", {"tables": 2})], n_layer=2)
    ids = torch.randint(0, 64, (1, 6))
    caches = model.new_caches(1, 6)
    model(ids, caches=caches)
    block, ext = model.blocks[0], model.extensions["value_embeddings"]
    x = model.position.embed(model.tok_emb(ids), torch.arange(6))
    v = block.attn.qkv(block.norm_1(x))[..., -32:].view(1, 6, 4, 8).transpose(1, 2)
    E = ext.tables[0](ids).view(1, 6, 4, 8).transpose(1, 2)
    a, b = ext.mix[0]
    assert_close_to_scale(caches[0].v[:, :, :6], a * v + b * E, 1e-12, "cached values of layer 0")


# --- U-net skips -------------------------------------------------------------------------------------


@pytest.mark.parametrize("n_layer", [4, 5])
def test_unet_skips_against_the_blocks_run_by_hand(n_layer):
    model = gpt(extensions=[("unet", {})], n_layer=n_layer)
    weights = model.extensions["unet"].weights
    ids = torch.randint(0, 64, (2, 9))
    pos = torch.arange(9)
    x = model.position.embed(model.tok_emb(ids), pos)
    kept = {}
    half = n_layer // 2
    for i, block in enumerate(model.blocks):
        if i >= n_layer - half:  # the second half: the mirror block's output, weighted
            x = x + weights[n_layer - 1 - i] * kept[n_layer - 1 - i]
        x = block(x, pos, model.position)
        if i < half:
            kept[i] = x
    assert_close_to_scale(model.hidden(ids), model.norm_f(x), 1e-12, "the U-net's final hidden state")


# --- smear -------------------------------------------------------------------------------------------


def test_smear_against_its_formula_and_decoding_with_its_state():
    ext = extension("smear")
    x = torch.randn(2, 8, 32, dtype=torch.float64)
    ids = torch.zeros(2, 8, dtype=torch.long)
    want = x.clone()
    for t in range(1, 8):
        gate = torch.sigmoid(x[:, t, :12] @ ext.gate.weight.T)  # (2, 1)
        want[:, t] = x[:, t] + ext.lam * gate * x[:, t - 1]
    assert_close_to_scale(ext.embed(x, context(ids)), want, 1e-12, "smeared embeddings")
    # Decoding: the previous token comes from the per-sequence state made by new_state.
    states = {"smear": ext.new_state(2, 8, "cpu", torch.float64)}
    ctx = ForwardContext(ids=ids[:, :3], pos=torch.arange(3), states=states, extensions={"smear": ext})
    steps = [ext.embed(x[:, :3], ctx)]
    for t in range(3, 8):
        ctx = ForwardContext(
            ids=ids[:, t : t + 1],
            pos=torch.tensor([t]),
            start_pos=t,
            states=states,
            extensions={"smear": ext},
        )
        steps.append(ext.embed(x[:, t : t + 1], ctx))
    assert_close_to_scale(torch.cat(steps, dim=1), want, 1e-12, "smear decoded a token at a time")


# --- attention: gate, value embeddings and document masking stacked in one layer ----------------------


def reference_attention(attn, x, docs, v_mix=None, gate=None):
    """Written out in float64: projections, per-document causal softmax (a loop over documents, each
    attended alone), the values mixed (value embeddings), the heads gated, the output projection."""
    B, T, C = x.shape
    H, KV, D = attn.n_head, attn.n_kv_head, attn.head_dim
    q, k, v = (x @ attn.qkv.weight.T + attn.qkv.bias).split([C, KV * D, KV * D], dim=-1)
    q, k, v = (t.view(B, T, -1, D).transpose(1, 2) for t in (q, k, v))
    if v_mix is not None:
        v = v_mix(v)
    k, v = k.repeat_interleave(H // KV, dim=1), v.repeat_interleave(H // KV, dim=1)
    y = torch.zeros(B, H, T, D, dtype=x.dtype)
    for b in range(B):
        for doc in docs[b].unique():
            at = (docs[b] == doc).nonzero().squeeze(1)  # this document's tokens, in order
            s = q[b][:, at] @ k[b][:, at].transpose(-1, -2) / math.sqrt(D)
            s = s.masked_fill(torch.ones(len(at), len(at)).triu(1).bool(), float("-inf"))
            y[b][:, at] = s.softmax(-1) @ v[b][:, at]
    if gate is not None:
        y = y * gate(x).transpose(1, 2).unsqueeze(-1)
    return y.transpose(1, 2).reshape(B, T, C) @ attn.proj.weight.T + attn.proj.bias


def test_gate_value_embeddings_and_document_masking_stack_in_one_layer():
    model = MODEL.model_copy(update={"bias": True}).for_layer(2)
    torch.manual_seed(0)
    attn = build(component("attention", "per_document"), model).double()
    ve, gate = extension("value_embeddings", tables=2), extension("attention_gate")
    B, T = 2, 12
    x = torch.randn(B, T, 32, dtype=torch.float64)
    ids = torch.randint(0, 64, (B, T))
    docs = torch.tensor([[0] * 5 + [1] * 4 + [2] * 3, [0] * 12])
    ctx = context(ids, meta={"doc_ids": docs}, extensions={"ve": ve, "gate": gate})
    got = attn(x, torch.arange(T), Position(), ctx=ctx)
    E = ve.tables[0](ids).view(B, T, 2, 8).transpose(1, 2)  # layer 2 uses table 0
    want = reference_attention(
        attn,
        x,
        docs,
        v_mix=lambda v: ve.mix[2, 0] * v + ve.mix[2, 1] * E,
        gate=lambda x: torch.sigmoid(x[..., :12] @ gate.gates[2].weight.T),
    )
    assert_close_to_scale(got, want, 1e-10, "gated, value-embedded, per-document attention")


def test_the_flex_document_block_mask_gives_the_masked_sdpa_output():
    """The CUDA path's mask (FlexAttention, here uncompiled on CPU, forward only) against masked SDPA,
    with grouped heads and a window."""
    for window in (None, 5):
        model = MODEL.for_layer(0)
        torch.manual_seed(0)
        flex = build(component("attention", "per_document"), model, backend="flex", window=window).eval()
        sdpa = build(component("attention", "per_document"), model, backend="sdpa", window=window).eval()
        sdpa.load_state_dict(flex.state_dict())
        x, ids = torch.randn(2, 20, 32), torch.randint(0, 64, (2, 20))
        docs = torch.tensor([[0] * 7 + [1] * 13, [0] * 3 + [1] * 9 + [2] * 8])
        with torch.no_grad():
            got, want = (
                a(x, torch.arange(20), Position(), ctx=context(ids, meta={"doc_ids": docs}))
                for a in (flex, sdpa)
            )
        assert_close_to_scale(got, want, 1e-5, f"flex against masked SDPA, window {window}")


def test_document_masking_decodes_from_end_of_text_tokens_with_the_cache_as_without():
    model = gpt("per_document", position="rope", vocab_size=EOT + 1, n_layer=2)
    ids = torch.randint(0, 64, (2, 14))
    ids[0, 4], ids[0, 9], ids[1, 6] = EOT, EOT, EOT
    full = model(ids)[0]
    caches = model.new_caches(2, 14)
    steps = [model(ids[:, :6], caches=caches)[0]]
    steps += [model(ids[:, t : t + 1], caches=caches, start_pos=t)[0] for t in range(6, 14)]
    assert_close_to_scale(torch.cat(steps, dim=1), full, 1e-10, "cached decoding across documents")
    # The mask does something: the same ids with the data's ids saying one document differ after an EOT.
    one_doc = model(ids, meta={"doc_ids": torch.zeros_like(ids)})[0]
    assert_close_to_scale(one_doc[0, :4], full[0, :4], 1e-10, "before the first end-of-text")
    assert not torch.allclose(one_doc[0, 4:], full[0, 4:])


def test_document_masking_takes_the_tokenizers_end_of_text_when_read_from_a_recipe():
    raw = {
        "model": {
            "attention": {"name": "per_document"},
            "mlp": {"name": "gelu"},
            "norm": {"name": "layernorm"},
            "position": {"name": "rope"},
        },
        "tokenizer": {"name": "gpt2"},
        "data": {"name": "memmap"},
        "optimizer": {"name": "adamw"},
        "schedule": {"name": "cosine"},
    }
    from lab.recipe import resolve

    recipe = resolve(raw, "r.toml")
    assert recipe.parts["attention"].config.eot_id == EOT
    with pytest.raises(LabError, match="eot_id = 99999 is outside the vocabulary"):
        resolve(
            {**raw, "model": {**raw["model"], "attention": {"name": "per_document", "eot_id": 99999}}},
            "r.toml",
        )


# --- multi-token prediction and z-loss: the head --------------------------------------------------------


@pytest.mark.parametrize("loss_chunk", [0, 8])
def test_multi_token_prediction_against_float64(loss_chunk):
    model = gpt(extensions=[("mtp", {"depth": 2})], logit_softcap=10.0, loss_chunk=loss_chunk)
    x, y = torch.randint(0, 64, (2, 12)), torch.randint(0, 64, (2, 12))
    ext, h = model.extensions["mtp"], model.hidden(x)
    model(x, y)
    for d in (1, 2):
        h2 = h + ext.projs[d - 1](F.rms_norm(h, (32,), ext.norms[d - 1].weight, ext.norms[d - 1].eps))
        logits = 10.0 * torch.tanh(h2 @ model.head.weight.T / 10.0)
        ahead = torch.cat([y[:, d:], torch.full((2, d), -1)], dim=1)  # the token d + 1 places ahead
        want = F.cross_entropy(logits.flatten(0, 1), ahead.flatten(), ignore_index=-1)
        assert_close_to_scale(model.extras.terms[f"mtp_{d}"], want, 1e-5, f"mtp_{d}")
    model(x)  # no targets (decoding): no extra head runs
    assert model.extras.terms == {}


def test_z_loss_inside_the_fused_loss_against_float64():
    fused = gpt(
        extensions=[("z_loss", {"weight": 0.01})], logit_softcap=10.0, loss_chunk=7, dtype=torch.float32
    )
    reference = gpt(extensions=[("z_loss", {"weight": 0.01})], logit_softcap=10.0, loss_chunk=0)
    x, y = torch.randint(0, 64, (3, 10)), torch.randint(0, 64, (3, 10))
    _, loss = fused(x, y)
    (loss + fused.extras.loss()).backward()
    logits = reference.logits(reference.hidden(x)).flatten(0, 1)
    lse = torch.logsumexp(logits, dim=-1)
    assert_close_to_scale(fused.extras.terms["z"], lse.square().mean(), 1e-5, "the z-loss")
    (F.cross_entropy(logits, y.flatten()) + 0.01 * lse.square().mean()).backward()
    for (name, p), q in zip(fused.named_parameters(), reference.parameters()):
        assert_close_to_scale(p.grad, q.grad, 1e-4, f"gradient of {name}")


# --- document-aligned batches ----------------------------------------------------------------------------


def documents_folder(folder):
    """train.bin / val.bin of documents of 5..40 tokens, each opened by an end-of-text token."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", 300), ("val", 60)):
        docs = [np.concatenate([[EOT], rng.integers(0, 500, rng.integers(5, 40))]) for _ in range(n)]
        np.concatenate(docs).astype(np.uint16).tofile(folder / f"{split}.bin")
    return folder


def test_memmap_rows_start_at_documents_and_carry_their_ids(tmp_path):
    context = _data_context(registry())
    from dataclasses import replace

    context = replace(
        context, block_size=64, vocab_size=EOT + 1, tokenizer=build(component("tokenizer", "gpt2"))
    )
    source = build(
        component("data", "memmap"),
        context,
        path=str(documents_folder(tmp_path / "d")),
        documents=True,
        max_document_tokens=16,
    )
    x, y, meta = source.batch("train", 3, range(4))
    assert (x[:, 0] == EOT).all(), "every row starts at a document"
    assert torch.equal(source.batch("train", 3, range(4))[0], x), "a pure function of the step"
    docs = meta["doc_ids"]
    assert torch.equal(docs, document_ids(x, EOT, 16))
    assert ((x[:, 1:] == EOT) <= (docs[:, 1:] != docs[:, :-1])).all(), "a new document at every end-of-text"
    for ids in docs:
        assert max(int((ids == d).sum()) for d in ids.unique()) <= 16, "no piece longer than the cap"


def test_documents_on_text_without_end_of_text_is_one_clear_error(tmp_path):
    folder = tmp_path / "plain"
    folder.mkdir()
    for split in ("train", "val"):
        (np.arange(400) % 300).astype(np.uint16).tofile(folder / f"{split}.bin")
    context = _data_context(registry())
    from dataclasses import replace

    context = replace(context, vocab_size=EOT + 1, tokenizer=build(component("tokenizer", "gpt2")))
    with pytest.raises(LabError, match="no end-of-text token"):
        build(component("data", "memmap"), context, path=str(folder), documents=True)


def test_jsonl_rows_start_at_documents_and_resume_exactly():
    from dataclasses import replace

    context = replace(_data_context(registry()), block_size=48)
    source = build(component("data", "jsonl"), context, documents=True)
    eot = context.tokenizer.eot_id
    for step in range(3):
        x, y, meta = source.batch("train", step, range(2))
        assert (x[:, 0] == eot).all()
        assert torch.equal(meta["doc_ids"], (x == eot).long().cumsum(dim=1))
    state = source.state_dict()
    expected = [source.batch("train", s, range(2)) for s in (3, 4)]
    resumed = build(component("data", "jsonl"), context, documents=True)
    resumed.load_state_dict(state)
    for s, want in zip((3, 4), expected):
        got = resumed.batch("train", s, range(2))
        assert torch.equal(got[0], want[0]) and torch.equal(got[2]["doc_ids"], want[2]["doc_ids"])


# --- all of them in one run: train, resume exactly, decode with the cache as without ------------------------

ALL = tiny_recipe(
    "speedrun",
    """
[extension.value_embeddings]
tables = 1
[extension.unet]
[extension.smear]
[extension.attention_gate]
[extension.mtp]
[extension.z_loss]

[schedule]
name = "cosine"
warmup_steps = 2

[train]
batch_size = 2
max_steps = 6
eval_interval = 3
eval_batches = 1
log_interval = 3
checkpoint_interval = 3
out_dir = "{out}"
device = "cpu"
""",
    data="{data}",
)


def test_every_technique_in_one_run_trains_resumes_exactly_and_decodes_with_the_cache_as_without(
    tmp_path, capsys, monkeypatch
):
    data = documents_folder(tmp_path / "docs")
    recipe = tmp_path / "all.toml"
    recipe.write_text(ALL.format(out=tmp_path / "run", data=data))
    flags = [
        "--set",
        "model.attention.name=per_document",
        "--set",
        "data.documents=true",
        "--set",
        "model.position.name=rope",
        "--set",
        "model.loss_chunk=16",
    ]
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert main(["run", str(recipe), *flags]) == 0
    straight = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in straight] == [1, 2, 3, 4, 5, 6]
    assert {"loss.z", "loss.mtp_1"} <= set(straight[0]), "the extensions' terms are logged"
    # Resume from step 3: a copy of the run without its later checkpoint.
    shutil.copytree(tmp_path / "run", tmp_path / "again")
    shutil.rmtree(tmp_path / "again" / "checkpoints" / "step_0000006")
    assert main(["run", str(recipe), *flags, "--set", f"train.out_dir={tmp_path / 'again'}"]) == 0
    resumed = [r for r in read_metrics(tmp_path / "again" / "metrics.jsonl") if "loss" in r]
    assert [(r["step"], r["loss"], r["loss.z"]) for r in resumed] == [
        (r["step"], r["loss"], r["loss.z"]) for r in straight
    ]
    capsys.readouterr()
    generate = [
        "generate",
        str(tmp_path / "run"),
        "--prompt",
        "The king",
        "--max-new-tokens",
        "12",
        "--temperature",
        "0",
        "--num-samples",
        "2",
    ]
    assert main(generate) == 0
    cached = capsys.readouterr().out
    assert main([*generate, "--no-cache"]) == 0
    assert capsys.readouterr().out == cached


def test_export_hf_refuses_extensions_that_change_the_model_but_not_training_only_ones():
    from lab.recipe import resolve
    from lab_hf.export_hf import extension_refusals

    raw = {
        "model": {
            slot: {"name": name}
            for slot, name in [
                ("attention", "sdpa"),
                ("mlp", "gelu"),
                ("norm", "layernorm"),
                ("position", "learned"),
            ]
        },
        "tokenizer": {"name": "gpt2"},
        "data": {"name": "memmap"},
        "optimizer": {"name": "adamw"},
        "schedule": {"name": "cosine"},
        "extension": {"z_loss": {}, "mtp": {}, "smear": {}},
    }
    assert extension_refusals(resolve(raw, "r.toml")) == [
        "extension 'smear' (neither GPT-2 nor Llama has it)"
    ]
