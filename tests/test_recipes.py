"""Every recipe in recipes/ trains: a few steps at a shrunk shape, and the loss falls. Globbed at run
time, so a new recipe is covered without a new test."""

import json
import shutil
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
    "speedrun_small": ["optimizer.lr=0.04", "optimizer.embedding_lr=0.05", "optimizer.adamw_lr=0.05"],
}


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_trains_with_a_falling_loss(path, tmp_path, capsys):
    recipe = load_recipe(path, SHRINK + KEEP.get(path.stem, []) + [f"train.out_dir='{tmp_path}'"])
    assert train(recipe) == 0
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    val = [r["val_loss"] for r in rows if "val_loss" in r]
    assert len(val) >= 2 and val[-1] < val[0] - 0.1, f"{path.name}: val loss {val}"


def test_speedrun_recipe_resumes_exactly(tmp_path):
    """speedrun_small's extensions and NorMuon keep state (gates, skip weights, per-neuron second
    moments): a run resumed from its step-4 checkpoint logs the same losses as the straight run.
    Two layers, so the U-net skip and the value embedding's two layers are both there."""
    path = Path(__file__).resolve().parent.parent / "recipes" / "speedrun_small.toml"
    sets = SHRINK + KEEP["speedrun_small"] + ["model.n_layer=2", "train.checkpoint_interval=4"]

    def losses(out):
        assert train(load_recipe(path, [*sets, f"train.out_dir='{out}'"])) == 0
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        return [(r["step"], r["loss"], r["loss.z"]) for r in rows if "loss" in r]

    straight = losses(tmp_path / "run")
    assert [step for step, *_ in straight] == list(range(1, 9))
    shutil.copytree(tmp_path / "run", tmp_path / "again")
    shutil.rmtree(tmp_path / "again" / "checkpoints" / "step_0000008")
    assert losses(tmp_path / "again") == straight
