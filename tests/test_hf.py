"""GPT-2 interop: a transformers GPT-2 folder imports into a run folder that generates exactly what
transformers generates, a GPT-2 run folder exports to one transformers loads with the same logits,
and anything that is not GPT-2 is refused with one message."""

import json

import pytest
import torch
from pydantic import BaseModel
from tiny import HF_SHAPE as SHAPE
from torch import nn

import lab.plugins as plugins
import lab.runs
from lab import hookimpl
from lab.commands.cli import main
from lab.inference.sampling import generate
from lab.model import GPT
from lab.recipe import load_recipe
from lab.runs import checkpoint
from lab.runs.checkpoint import save
from lab.testing import assert_close_to_scale

pytestmark = pytest.mark.usefixtures("one_thread")

transformers = pytest.importorskip("transformers")

PROMPT = "Hello, my name is"


def save_hf(model, folder, variant):
    """safetensors: what save_pretrained writes today. bin: a pickle in the layout of the original
    hub files: no "transformer." prefix, lm_head included, and the attention mask buffers."""
    if variant == "safetensors":
        model.save_pretrained(folder)
    else:
        model.config.save_pretrained(folder)
        state = {k.removeprefix("transformer."): v for k, v in model.state_dict().items()}
        n = SHAPE["n_positions"]
        for i in range(SHAPE["n_layer"]):
            state[f"h.{i}.attn.bias"] = torch.tril(torch.ones(n, n)).view(1, 1, n, n)
            state[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
        torch.save(state, folder / "pytorch_model.bin")
    return folder


def run_lab(capsys, *args):
    status = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return status, out, err


@pytest.mark.parametrize("variant", ["safetensors", "bin"])
def test_imported_gpt2_generates_what_transformers_generates(hf_model, tmp_path, capsys, variant):
    hf_dir = save_hf(hf_model, tmp_path / "hf", variant)
    assert run_lab(capsys, "import-hf", hf_dir, "--out", tmp_path / "run")[0] == 0

    recipe, model, _ = lab.runs.load(tmp_path / "run")
    tokenizer = recipe.parts["tokenizer"].build()
    assert recipe.parts["attention"].name == "sdpa" and recipe.model.block_size == 48
    idx = torch.tensor([tokenizer.encode(PROMPT)])
    with torch.no_grad():
        expected = hf_model.generate(idx, max_new_tokens=20, do_sample=False, pad_token_id=tokenizer.eot_id)
    ours = generate(model, idx, 20, temperature=0, eos_id=tokenizer.eot_id)
    assert torch.equal(ours, expected)
    assert len(set(expected[0, idx.size(1) :].tolist())) > 3  # a real sequence, not one token repeated

    new = [t for t in expected[0, idx.size(1) :].tolist() if t != tokenizer.eot_id]
    status, out, _ = run_lab(
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
    )
    assert status == 0 and out == f"--- sample 1/1 ---\n{PROMPT}{tokenizer.decode(new)}\n"


def test_exported_run_loads_in_transformers_with_the_same_logits(
    tmp_path, capsys, gpt_small_path, umask_027, file_modes
):
    """Not the default MLP settings either: exact GELU and 2x width must come out as GPT-2's
    activation_function = "gelu" and n_inner."""
    recipe = load_recipe(
        gpt_small_path,
        [
            "model.n_layer=2",
            "model.n_head=2",
            "model.n_embd=32",
            "model.block_size=48",
            "model.mlp.approximate=none",
            "model.mlp.expansion=2",
            "model.norm.eps=1e-6",
        ],
    )
    torch.manual_seed(0)
    model = GPT(recipe).eval()
    with torch.no_grad():
        for p in model.parameters():  # biases and gains too, so a misplaced one shows
            p.normal_(0, 0.1)
    save(tmp_path / "run", 0, model, recipe.to_toml(), {"step": 0})

    assert run_lab(capsys, "export-hf", tmp_path / "run", "--out", tmp_path / "hf")[0] == 0
    assert set(file_modes(tmp_path / "hf").values()) == {umask_027}  # safetensors alone would make 0600
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    assert hf.config.activation_function == "gelu" and hf.config.n_inner == 64
    idx = torch.randint(0, 50257, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        # relative to the logits' scale: float32 rounding grows with the values, and differs by CPU
        assert_close_to_scale(hf(idx).logits, model(idx)[0], 1e-5, "logits")

    tokenizer = transformers.GPT2TokenizerFast.from_pretrained(tmp_path / "hf")
    text = "Hello world, it's 2024 — naïve café"
    assert tokenizer.encode(text) == recipe.parts["tokenizer"].build().encode(text)

    # and back again: the same weights, bit for bit
    assert run_lab(capsys, "import-hf", tmp_path / "hf", "--out", tmp_path / "back")[0] == 0
    _, back, _ = lab.runs.load(tmp_path / "back")
    for name, tensor in model.state_dict().items():
        assert torch.equal(back.state_dict()[name], tensor), name


def test_export_refuses_what_gpt2_cannot_express(tmp_path, capsys, gpt_small_path, monkeypatch):
    """An MLP GPT-2 has no equivalent for, untied embeddings and no biases: all named at once."""

    class IdentityConfig(BaseModel):
        pass

    class Plugin:
        @hookimpl
        def lab_components(register):
            register("mlp", "identity", lambda config, model: nn.Identity(), IdentityConfig, "test")

    monkeypatch.setattr(plugins, "_registry", plugins.build_registry(extra_plugins={"lab-test": Plugin}))
    recipe = load_recipe(
        gpt_small_path,
        [
            "model.n_layer=1",
            "model.n_embd=32",
            "model.mlp.name=identity",
            "model.tie_embeddings=false",
            "model.bias=false",
            "model.logit_softcap=30",
            "model.n_kv_head=2",
            "model.qk_norm=true",
        ],
    )
    save(tmp_path / "run", 0, GPT(recipe), recipe.to_toml(), {"step": 0})

    status, _, err = run_lab(capsys, "export-hf", tmp_path / "run", "--out", tmp_path / "hf")
    assert status == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert "mlp 'identity' (GPT-2's is gelu)" in err
    assert "model.tie_embeddings = false" in err and "model.bias = false" in err
    assert "model.logit_softcap = 30.0 (GPT-2's logits are not capped)" in err
    assert "model.n_kv_head = 2" in err and "model.qk_norm = true" in err
    assert not (tmp_path / "hf").exists()


def write_config(folder, **config):
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda d: d / "missing", "is not a folder"),
        (lambda d: (d / "empty").mkdir() or d / "empty", "has no config.json"),
        (
            lambda d: write_config(d / "mistral", model_type="mistral"),
            "model_type = 'mistral'; import-hf reads GPT-2",
        ),
        (
            lambda d: write_config(d / "noweights", model_type="gpt2"),
            "no model.safetensors or pytorch_model.bin",
        ),
        (
            lambda d: write_config(d / "relu", model_type="gpt2", activation_function="relu"),
            "activation_function = 'relu' has no lab equivalent",
        ),
    ],
)
def test_import_refuses_what_is_not_a_gpt2_folder(tmp_path, capsys, make, message):
    status, _, err = run_lab(capsys, "import-hf", make(tmp_path), "--out", tmp_path / "run")
    assert status == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_import_does_not_overwrite_a_run(hf_model, tmp_path, capsys):
    hf_dir = save_hf(hf_model, tmp_path / "hf", "safetensors")
    assert run_lab(capsys, "import-hf", hf_dir, "--out", tmp_path / "run")[0] == 0
    status, _, err = run_lab(capsys, "import-hf", hf_dir, "--out", tmp_path / "run")
    assert status == 2 and "already holds a checkpoint" in err


def test_import_refuses_weights_that_do_not_match_config_json(hf_model, tmp_path, capsys):
    hf_dir = save_hf(hf_model, tmp_path / "hf", "safetensors")
    config = json.loads((hf_dir / "config.json").read_text())
    for change, message in (
        ({"n_embd": 64}, "do not match its config.json"),
        ({"n_layer": 3}, "has no tensor 'h.2.ln_1.weight'"),
    ):
        (hf_dir / "config.json").write_text(json.dumps({**config, **change}))
        status, _, err = run_lab(capsys, "import-hf", hf_dir, "--out", tmp_path / "run")
        assert status == 2 and message in err and "Traceback" not in err


def test_an_imported_folder_fine_tunes_with_lab_run(hf_model, tmp_path, capsys):
    """Fresh optimizer, step 0, the recipe's data: `lab run OUT/recipe.toml`, as the import suggests."""
    import numpy as np

    from lab.runs.metrics import read_metrics

    hf_dir = save_hf(hf_model, tmp_path / "hf", "safetensors")
    status, _, err = run_lab(capsys, "import-hf", hf_dir, "--out", tmp_path / "run")
    assert status == 0 and f"lab run {tmp_path / 'run' / 'recipe.toml'} --set data.path=" in err
    data = tmp_path / "data"
    data.mkdir()
    for split, n in (("train", 3000), ("val", 600)):
        (np.arange(n) % 500).astype(np.uint16).tofile(data / f"{split}.bin")
    settings = [
        f"data.path={data}",
        "train.max_steps=3",
        "train.batch_size=2",
        "train.eval_batches=1",
        "train.device=cpu",
        "generate.max_new_tokens=2",
        "generate.num_samples=1",
    ]
    args = [a for s in settings for a in ("--set", s)]
    status, out, err = run_lab(capsys, "run", tmp_path / "run" / "recipe.toml", *args)
    assert status == 0, err
    assert f"fine-tuning the weights in {tmp_path / 'run' / 'checkpoints' / 'step_0000000'}" in out
    assert checkpoint.load_state(checkpoint.latest(tmp_path / "run"))["step"] == 3
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3]

    # It trained from the imported weights: its loss before the first step is theirs, not a fresh model's.
    status, out, err = run_lab(
        capsys, "run", tmp_path / "run" / "recipe.toml", *args, "--set", f"train.out_dir={tmp_path / 'fresh'}"
    )
    assert status == 0, err
    fresh = read_metrics(tmp_path / "fresh" / "metrics.jsonl")
    assert records[0]["val_loss"] != fresh[0]["val_loss"]
