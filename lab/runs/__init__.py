"""The run folder: what `lab run` writes and every other command reads (generate, eval, serve,
compare, export-hf). lab.runs.layout names its files; here: telling a run folder from any other
folder, and loading a run's model. lab.runs.checkpoint, .lock, .metrics and .tokenizer_files
read and write the parts.
"""

from __future__ import annotations

from pathlib import Path

from lab.errors import LabError
from lab.model import GPT
from lab.recipe import read_toml, resolve
from lab.runs.checkpoint import load_weights, newest_intact
from lab.runs.layout import CHECKPOINTS, MARKER, METRICS, RECIPE
from lab.runs.tokenizer_files import use_kept


def is_run(path) -> bool:
    """A folder `lab run` wrote: it has metrics or checkpoints (a new run's folder holds only its lock)."""
    path = Path(path)
    return path.is_dir() and ((path / METRICS).is_file() or (path / CHECKPOINTS).is_dir())


def load(run_dir, device="cpu"):
    """(recipe, model, checkpoint folder) of a run folder's newest checkpoint, the model in eval mode.
    recipe.parts["tokenizer"].build() gives the run's tokenizer, from the files the run folder keeps."""
    if not Path(run_dir).is_dir():
        raise LabError(
            f"run folder not found: {run_dir}. Train one with `lab run RECIPE`, or import "
            "GPT-2 weights with `lab import-hf HF_DIR --out RUN_DIR`"
        )

    def build(ckpt):
        recipe_file = ckpt / RECIPE
        raw = read_toml(str(recipe_file))
        use_kept(raw, run_dir)  # the run's own copy: the original may have moved
        recipe = resolve(raw, str(recipe_file))
        model = GPT(recipe)
        load_weights(ckpt, model)
        return recipe, model

    ckpt, loaded = newest_intact(run_dir, build)
    if ckpt is None:
        raise LabError(
            f"{run_dir} has no complete checkpoint (looked for checkpoints/step_*/{MARKER}). "
            "Train with `lab run RECIPE` until it saves one"
        )
    recipe, model = loaded
    return recipe, model.to(device).eval(), ckpt
