"""The tiny GPT-2 recipe the training tests run: 2 layers, 32 wide, on token files they write."""

from pathlib import Path

import numpy as np


def counting_tokens(data: Path) -> Path:
    """data/train.bin and data/val.bin (uint16) of tokens that count up modulo 500, next token = this
    one + 1: a two-layer model learns them in a few steps. Returns data."""
    data.mkdir(parents=True, exist_ok=True)
    (np.arange(3000) % 500).astype(np.uint16).tofile(data / "train.bin")
    (np.arange(600) % 500).astype(np.uint16).tofile(data / "val.bin")
    return data


def write_tiny_run(folder: Path, recipe: str, file: str = "tiny.toml", out: str = "run") -> str:
    """The recipe (a tiny_recipe text) written into folder/file with {data} set to counting tokens in
    folder/data and {out} to folder/out; returns its path."""
    data = counting_tokens(folder / "data")
    path = folder / file
    path.write_text(recipe.format(data=data, out=folder / out))
    return str(path)


def tiny_recipe(name: str, rest: str, data: str = "{data}", model_extra: str = "") -> str:
    """Model shape, components, data and optimizer; `rest` adds [schedule], [train], [generate].
    Placeholders like {data} and {out} are left for the caller's .format()."""
    return (
        f'name = "{name}"\n'
        + """
[model]
block_size = 32
n_layer = 2
n_head = 2
n_embd = 32
"""
        + model_extra
        + """
[model.attention]
name = "sdpa"
[model.mlp]
name = "gelu"
[model.norm]
name = "layernorm"
[model.position]
name = "learned"
[tokenizer]
name = "gpt2"

[data]
name = "memmap"
path = \""""
        + data
        + """\"

[optimizer]
name = "adamw"
lr = 3e-3
"""
        + rest
    )


# transformers' GPT-2 cut small (tests/conftest.py's hf_model): GPT-2's vocabulary, 48 positions.
HF_SHAPE = dict(n_layer=2, n_head=2, n_embd=32, n_positions=48, vocab_size=50257)


# The [schedule], [train] and [generate] of a 4-step run into {out} (conftest's tiny_run).
TRAIN = """
[schedule]
name = "cosine"
warmup_steps = 1
[train]
batch_size = 4
precision = "fp32"
max_steps = 4
eval_interval = 2
eval_batches = 1
log_interval = 2
checkpoint_interval = 2
out_dir = "{out}"
device = "cpu"
[generate]
num_samples = 1
max_new_tokens = 4
"""
