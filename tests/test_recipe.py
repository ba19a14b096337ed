"""Recipes: each plugin validates its own table; every mistake is one message and exit status 2."""

from pathlib import Path

import pytest

from lab.commands.cli import main
from lab.errors import LabError
from lab.recipe import load_recipe, parse_override, read_toml, resolve


def test_gpt_small_is_the_seed_config(gpt_small_path):
    r = load_recipe(gpt_small_path)
    m = r.model
    assert (m.block_size, m.vocab_size, m.n_layer, m.n_head, m.n_embd) == (1024, 50257, 6, 4, 256)
    assert m.tie_embeddings
    assert {s: p.name for s, p in r.parts.items()} == {
        "attention": "sdpa",
        "mlp": "gelu",
        "norm": "layernorm",
        "position": "learned",
        "tokenizer": "gpt2",
        "data": "memmap",
        "optimizer": "adamw",
        "schedule": "cosine",
    }


@pytest.mark.parametrize(
    "text, keys, value",
    [
        ("train.max_steps=100", ["train", "max_steps"], 100),
        ("optimizer.lr=3e-4", ["optimizer", "lr"], 3e-4),
        ("model.bias=false", ["model", "bias"], False),
        ('generate.prompt="Hi there"', ["generate", "prompt"], "Hi there"),
        ("model.attention.name=manual", ["model", "attention", "name"], "manual"),  # bare word: a string
        ("optimizer.betas=[0.9, 0.99]", ["optimizer", "betas"], [0.9, 0.99]),
    ],
)
def test_overrides_are_read_as_toml(text, keys, value):
    assert parse_override(text) == (keys, value)


def test_overrides_apply_and_validate(gpt_small_path):
    r = load_recipe(gpt_small_path, ["model.n_layer=2", "model.attention.name=manual", "optimizer.lr=1e-4"])
    assert r.model.n_layer == 2 and r.parts["attention"].name == "manual"
    assert r.parts["optimizer"].config.lr == 1e-4


def test_resolved_recipe_round_trips_with_every_default(gpt_small_path, tmp_path, capsys):
    assert main(["recipe", gpt_small_path, "--set", "model.n_layer=3"]) == 0
    text = capsys.readouterr().out
    assert "n_layer = 3" in text and "weight_decay" in text and "warmup_steps" in text
    (tmp_path / "resolved.toml").write_text(text)
    again = load_recipe(tmp_path / "resolved.toml")
    assert again.to_dict() == load_recipe(gpt_small_path, ["model.n_layer=3"]).to_dict()


BAD = [
    (["model.attention.name=flsh"], ["unknown attention 'flsh'", "[model.attention]", "available: ", "sdpa"]),
    (["model.attention.name=sdp"], ["Did you mean 'sdpa'"]),
    (["model.n_layr=3"], ["unknown key 'n_layr'", "[model]", "Did you mean 'n_layer'"]),
    (["model.mlp.expansoin=2"], ["unknown key 'expansoin'", "[model.mlp]", "mlp 'gelu'", "expansion"]),
    (["model.n_layer='six'"], ["[model] n_layer", "valid integer"]),
    (["model.n_embd=0"], ["[model] n_embd = 0", "greater than 0"]),
    (["train.batch_size=0"], ["[train] batch_size = 0", "greater than 0"]),
    (["model.n_head=3"], ["n_embd (256) must be divisible by n_head (3)"]),
    (["trian.max_steps=3"], ["unknown table [trian]", "Did you mean 'train'"]),
    (["optimizer.lr=-1"], ["[optimizer] lr = -1", "greater than 0"]),
    (["bogus"], ["--set expects section.key=value"]),
]


@pytest.mark.parametrize("overrides, expected", BAD)
def test_bad_recipes_get_one_clear_message_and_status_2(gpt_small_path, capsys, overrides, expected):
    args = ["recipe", gpt_small_path]
    for o in overrides:
        args += ["--set", o]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    assert "gpt_small.toml" in err or "--set" in err
    for piece in expected:
        assert piece in err


def test_missing_and_broken_files(tmp_path, capsys):
    assert main(["recipe", str(tmp_path / "nope.toml")]) == 2
    assert "recipe file not found" in capsys.readouterr().err
    broken = tmp_path / "broken.toml"
    broken.write_text("[model]\nn_layer = = 3\n")
    assert main(["recipe", str(broken)]) == 2
    err = capsys.readouterr().err
    assert "cannot parse" in err and "broken.toml" in err and "line 2" in err


def test_a_missing_component_table_names_the_table_and_the_choices(gpt_small_path):
    raw = read_toml(gpt_small_path)
    del raw["model"]["norm"]
    with pytest.raises(LabError, match=r"needs a \[model.norm\] table(.|\n)*layernorm"):
        resolve(raw, "x.toml")


def test_drop_removes_a_table_and_refuses_one_the_recipe_lacks(gpt_small_path, capsys):
    """--drop extension.NAME (or --set ~extension.NAME) takes a technique out, as an ablation does."""
    speedrun = str(Path(gpt_small_path).with_name("speedrun_small.toml"))
    names = [p.name for p in load_recipe(speedrun).extensions]
    assert names == ["value_embeddings", "unet", "smear", "attention_gate", "z_loss"]
    assert parse_override("~extension.smear")[0] == ["extension", "smear"]
    kept = [p.name for p in load_recipe(speedrun, ["~extension.smear"]).extensions]
    assert kept == [n for n in names if n != "smear"]
    assert main(["recipe", speedrun, "--drop", "extension.z_loss", "--set", "train.max_steps=3"]) == 0
    out = capsys.readouterr().out
    assert "[extension.smear]" in out and "z_loss" not in out and "max_steps = 3" in out
    assert main(["recipe", gpt_small_path, "--drop", "extension.unet"]) == 2
    assert "--drop extension.unet: the recipe has no [extension.unet] table" in capsys.readouterr().err
