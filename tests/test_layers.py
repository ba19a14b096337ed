"""Layer-aware components ([model.layers], model.layer in factories), settings checked against the
model when the recipe is read, and switching a component with --set SLOT.name=X."""

import pytest
import torch
from pydantic import BaseModel

from lab import hookimpl
from lab.commands.cli import main
from lab.model import GPT
from lab.plugins import build_registry
from lab.recipe import load_recipe, resolve

GEMMA_LIKE = """
name = "local_global"
[model]
n_layer = 4
n_head = 2
n_embd = 16
block_size = 32
vocab_size = 64
[model.attention]
name = "sliding"
window = 8
[model.layers.3.attention]   # every token of the last layer sees its whole context
name = "sdpa"
[model.layers."0-1".mlp]     # the first two layers' MLPs are narrower
expansion = 2
[model.mlp]
name = "gelu"
[model.norm]
name = "layernorm"
[model.position]
name = "rope"
[tokenizer]
name = "gpt2"
[data]
name = "memmap"
[optimizer]
name = "adamw"
[schedule]
name = "cosine"
"""


@pytest.fixture
def gemma_like(tmp_path):
    path = tmp_path / "local_global.toml"
    path.write_text(GEMMA_LIKE)
    return str(path)


def test_a_recipe_gives_layers_their_own_components_and_settings(gemma_like):
    recipe = load_recipe(gemma_like)
    model = GPT(recipe)
    kinds = [type(b.attn).__name__ for b in model.blocks]
    assert kinds == ["SlidingAttention"] * 3 + ["SDPAAttention"]
    assert [b.attn.window for b in model.blocks[:3]] == [8, 8, 8]
    assert [b.mlp.fc.out_features for b in model.blocks] == [32, 32, 64, 64]


def test_lab_recipe_shows_the_layers_resolved_and_reads_back_the_same(gemma_like, tmp_path, capsys):
    assert main(["recipe", gemma_like]) == 0
    text = capsys.readouterr().out
    assert '[model.layers.3.attention]\nname = "sdpa"' in text
    assert '[model.layers.0.mlp]\nname = "gelu"\nexpansion = 2' in text and "[model.layers.1.mlp]" in text
    again = tmp_path / "again.toml"
    again.write_text(text)
    assert load_recipe(str(again)).to_dict() == load_recipe(gemma_like).to_dict()


def test_lab_plugins_lists_the_per_layer_components(gemma_like, capsys):
    assert main(["plugins", gemma_like]) == 0
    out = capsys.readouterr().out
    assert "* sliding" in out and "* sdpa" in out and "(layers 3)" in out


@pytest.mark.parametrize(
    "table, message",
    [
        (
            '[model.layers.4.attention]\nname = "sdpa"',
            r"\[model.layers.4\]: the model has 4 layers \(0 to 3\)",
        ),
        ('[model.layers.1.position]\nname = "rope"', r"'position' cannot be set per layer"),
        ("[model.layers.x.mlp]\nexpansion = 2", r"'x' is not a layer"),
        (
            "[model.layers.2.mlp]\nexpanse = 2",
            r"unknown key 'expanse' in .*\[model.layers.2.mlp\] for mlp 'gelu'.*expansion",
        ),
        (
            "[model.layers.2.attention]\nwindow = 64",
            r"\[model.layers.2.attention\] \(attention 'sliding' from package "
            r"'lab'\): window = 64 is not shorter than \[model\] block_size = 32",
        ),
    ],
)
def test_a_wrong_layer_setting_names_file_table_and_fix(gemma_like, capsys, table, message):
    import re

    text = open(gemma_like).read() + "\n" + table + "\n"
    open(gemma_like, "w").write(text)
    for command in ("recipe", "run"):
        assert main([command, gemma_like]) == 2
        err = capsys.readouterr().err
        assert re.search(message, err), err
        assert "local_global.toml" in err and "Traceback" not in err


def test_factories_know_their_layer(gemma_like):
    seen = []

    class Config(BaseModel):
        pass

    def probe(config, model):
        seen.append((model.layer, model.n_layer))
        return torch.nn.Identity()

    class P:
        @hookimpl
        def lab_components(self, register):
            register("norm", "probe", probe, Config, "")

    plugins = build_registry({"lab-probe": P()}, warn=False)
    GPT(load_recipe(gemma_like, ["model.norm.name=probe"], plugins=plugins))
    # two norms per block, then the final norm, which is in no layer
    assert seen == [(0, 4), (0, 4), (1, 4), (1, 4), (2, 4), (2, 4), (3, 4), (3, 4), (None, 4)]


def test_a_window_as_long_as_the_context_is_refused_when_the_recipe_is_read(gpt_small_path, capsys):
    assert (
        main(
            [
                "recipe",
                gpt_small_path,
                "--set",
                "model.attention.name=sliding",
                "--set",
                "model.attention.window=4096",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "gpt_small.toml [model.attention] (attention 'sliding' from package 'lab'): window = 4096" in err
    assert "set window below 1024" in err


# --- switching a component with --set SLOT.name=X ------------------------------------------------


def test_switching_a_component_starts_from_its_defaults_and_says_what_it_dropped(gpt_small_path, capsys):
    assert (
        main(
            [
                "recipe",
                gpt_small_path,
                "--set",
                "model.attention.name=sliding",
                "--set",
                "model.attention.window=64",
            ]
        )
        == 0
    )
    out, err = capsys.readouterr()
    assert 'name = "sliding"\nwindow = 64\nbackend = "auto"' in out
    recipe = load_recipe(gpt_small_path, ["optimizer.name=adamw"])
    assert recipe.notes == []  # the same component: its settings stay


def test_switching_drops_the_old_components_keys(tmp_path, capsys):
    class WindowedConfig(BaseModel):
        window: int = 4

    class P:
        @hookimpl
        def lab_components(self, register):
            register("attention", "windowed", lambda c, m: None, WindowedConfig, "")

    plugins = build_registry({"lab-w": P()}, warn=False)
    raw = {
        "model": {
            "attention": {"name": "windowed", "window": 16},
            "mlp": {"name": "gelu"},
            "norm": {"name": "layernorm"},
            "position": {"name": "learned"},
        },
        "tokenizer": {"name": "gpt2"},
        "data": {"name": "memmap"},
        "optimizer": {"name": "adamw", "lr": 1e-3},
        "schedule": {"name": "cosine"},
    }
    recipe = resolve(raw, "r.toml", ["model.attention.name=sdpa"], plugins)
    assert recipe.parts["attention"].name == "sdpa"
    assert recipe.notes == [
        "--set model.attention.name=sdpa: [model.attention] starts from sdpa's defaults; "
        "dropped windowed's window"
    ]
    # the keys set on the same command line are kept, whatever their order
    recipe = resolve(raw, "r.toml", ["model.attention.window=8", "model.attention.name=windowed"], plugins)
    assert recipe.parts["attention"].config.window == 8
