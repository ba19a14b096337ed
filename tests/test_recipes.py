"""Every recipe in recipes/ trains: a few steps at a shrunk shape, and the loss falls. Globbed at run
time, so a new recipe is covered without a new test."""

import json
from pathlib import Path

import pytest

from lab.engine.trainer import train
from lab.recipe import load_recipe

RECIPES = sorted((Path(__file__).resolve().parent.parent / "recipes").glob("*.toml"))
SHRINK = [
    "model.n_layer=1",
    "model.n_head=2",
    "model.n_embd=32",
    "model.block_size=32",
    "train.batch_size=4",
    "train.grad_accum=1",
    "train.max_tokens=0",
    "train.max_steps=8",
    "train.eval_interval=100",
    "train.eval_batches=2",
    "train.checkpoint_interval=100",
    "train.log_interval=100",
    "optimizer.lr=1e-2",  # a tiny model takes a large step: the loss falls visibly in 8 steps
    "schedule.warmup_steps=2",  # a GPU recipe's long warmup would leave 8 steps at a tiny lr
    "train.device='cpu'",
    "train.compile=false",
    "generate.num_samples=1",
    "generate.max_new_tokens=4",
]


# A recipe whose point is its layer pattern keeps its depth, and a window shorter than the shrunk block.
# Muon's recipe keeps its own lrs: SHRINK's 1e-2 is an AdamW lr, too low for Muon and its AdamW groups.
KEEP = {
    "local_global": ["model.n_layer=4", "model.attention.window=8"],
    "modern_small": ["optimizer.lr=0.04", "optimizer.embedding_lr=0.05", "optimizer.adamw_lr=0.05"],
    # Their data is FineWeb's 10B-token download: here the corpus that ships with lab stands in
    # (tests/test_corpora.py trains them on a Parquet fixture in FineWeb's schema).
    "gpt2_124m_fineweb": ["data.path=''"],
    "modern_124m_fineweb": [
        "data.path=''",
        "optimizer.lr=0.04",
        "optimizer.embedding_lr=0.05",
        "optimizer.adamw_lr=0.05",
    ],
}


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_trains_with_a_falling_loss(path, tmp_path, capsys):
    recipe = load_recipe(path, SHRINK + KEEP.get(path.stem, []) + [f"train.out_dir='{tmp_path}'"])
    assert train(recipe) == 0
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    val = [r["val_loss"] for r in rows if "val_loss" in r]
    assert len(val) >= 2 and val[-1] < val[0] - 0.1, f"{path.name}: val loss {val}"
