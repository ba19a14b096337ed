"""Llama interop: a Llama-family run (rope, rmsnorm, swiglu, no biases, tied or untied head)
exports to a folder transformers' LlamaForCausalLM loads with the same logits, imports back bit for
bit, and a tiny Llama built by transformers imports into a run whose greedy `lab generate` is
transformers' greedy generate. Everything is built here: nothing is downloaded."""

import json
from pathlib import Path

import pytest
import torch

import lab.runs
from lab.commands.cli import main
from lab.inference.sampling import generate
from lab.model import GPT
from lab.recipe import load_recipe
from lab.runs.checkpoint import save

pytestmark = pytest.mark.usefixtures("one_thread")

transformers = pytest.importorskip("transformers")

LLAMA_STYLE = Path(__file__).resolve().parent.parent / "recipes" / "llama_style.toml"
SHRINK = [
    "model.n_layer=2",
    "model.n_head=4",
    "model.n_embd=32",
    "model.block_size=48",
    "model.mlp.multiple_of=16",
    "model.position.theta=500.0",
]
PROMPT = "Hello, my name is"


def run_lab(capsys, *args):
    status = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return status, out, err


def llama_run(folder, overrides=()):
    """A llama_style run folder at step 0, every weight (gains too) drawn large enough that a
    misplaced tensor shows in the logits."""
    recipe = load_recipe(LLAMA_STYLE, SHRINK + list(overrides))
    torch.manual_seed(0)
    model = GPT(recipe).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3 if p.dim() >= 2 else 1.0)
    save(folder, 0, model, recipe.to_toml(), {"step": 0})
    return recipe, model


@pytest.mark.parametrize(
    "tied, kv_heads", [(True, 2), (False, 4), (True, 1)], ids=["tied-gqa", "untied-mha", "tied-mqa"]
)
def test_exported_llama_loads_in_transformers_with_the_same_logits(tmp_path, capsys, tied, kv_heads):
    recipe, model = llama_run(
        tmp_path / "run", [f"model.tie_embeddings={str(tied).lower()}", f"model.n_kv_head={kv_heads}"]
    )
    status, _, err = run_lab(capsys, "export-hf", tmp_path / "run", "--out", tmp_path / "hf")
    assert status == 0, err
    assert {p.name for p in (tmp_path / "hf").iterdir()} >= {
        "config.json",
        "model.safetensors",
        "vocab.json",
        "merges.txt",
        "tokenizer_config.json",
    }
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert (
        hf.config.tie_word_embeddings == tied
        and hf.config.intermediate_size == model.blocks[0].mlp.proj.in_features
    )
    assert hf.config.num_key_value_heads == kv_heads
    idx = torch.randint(0, 50257, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = model(idx)[0], hf(idx).logits
    assert (theirs - ours).abs().max().item() < 1e-4 * max(1.0, ours.abs().max().item())

    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    text = "Hello world, it's 2024 — naïve café"
    assert tokenizer.encode(text) == recipe.parts["tokenizer"].build().encode(text)

    # and back again: the same weights, bit for bit, and the same components
    status, _, err = run_lab(capsys, "import-hf", tmp_path / "hf", "--out", tmp_path / "back")
    assert status == 0, err
    back_recipe, back, _ = lab.runs.load(tmp_path / "back")
    assert {s: p.name for s, p in back_recipe.parts.items()} == {
        s: p.name for s, p in recipe.parts.items()
    } | {"schedule": "cosine"}
    assert back.config.tie_embeddings == tied and back.config.kv_heads == kv_heads
    for name, tensor in model.state_dict().items():
        assert torch.equal(back.state_dict()[name], tensor), name


def test_a_transformers_llama_imports_and_generates_what_transformers_generates(tmp_path, capsys):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=50257,
        hidden_size=32,
        intermediate_size=80,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        rope_theta=300.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=50256,
        eos_token_id=50256,
    )
    hf = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "embed" not in name:
                p.normal_(0, 0.3 if p.dim() >= 2 else 1.0)
    hf.save_pretrained(tmp_path / "hf")
    status, _, err = run_lab(capsys, "import-hf", tmp_path / "hf", "--out", tmp_path / "run")
    assert status == 0, err

    recipe, model, _ = lab.runs.load(tmp_path / "run")
    ids = recipe.parts["tokenizer"].build().encode(PROMPT)
    idx = torch.tensor([ids])
    with torch.no_grad():
        expected = hf.generate(idx, max_new_tokens=20, do_sample=False, eos_token_id=None, pad_token_id=50256)
    assert torch.equal(generate(model, idx, 20, temperature=0), expected)

    status, out, err = run_lab(
        capsys,
        "generate",
        tmp_path / "run",
        "--prompt",
        PROMPT,
        "--temperature",
        "0",
        "--max-new-tokens",
        "20",
        "--num-samples",
        "1",
        "--ignore-eos",
    )
    assert status == 0, err
    text = recipe.parts["tokenizer"].build().decode(expected[0, len(ids) :].tolist())
    assert PROMPT + text in out


def test_export_refuses_what_llama_cannot_express(tmp_path, capsys):
    llama_run(
        tmp_path / "run",
        [
            "model.logit_softcap=30",
            "model.position.fraction=0.5",
            "model.norm.name=layernorm",
            "model.bias=true",
            "model.qk_norm=true",
        ],
    )
    status, _, err = run_lab(capsys, "export-hf", tmp_path / "run", "--out", tmp_path / "hf")
    assert status == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert "recipe.toml is not a Llama" in err
    for part in (
        "norm 'layernorm' (Llama's is rmsnorm)",
        "model.bias = true",
        "model.logit_softcap = 30.0",
        "model.position.fraction = 0.5",
        "model.qk_norm = true",
    ):
        assert part in err
    assert not (tmp_path / "hf").exists()


@pytest.mark.parametrize(
    "config, message",
    [
        ({"hidden_act": "gelu"}, "hidden_act = 'gelu'"),
        ({"attention_bias": True}, "attention_bias or mlp_bias is true"),
        ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "rope type 'llama3'"),
    ],
)
def test_import_refuses_llamas_lab_cannot_reproduce(tmp_path, capsys, config, message):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps({"model_type": "llama", **config}))
    status, _, err = run_lab(capsys, "import-hf", tmp_path / "hf", "--out", tmp_path / "run")
    assert status == 2 and message in err and "Traceback" not in err
