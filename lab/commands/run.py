"""`lab run RECIPE`: read the recipe (with the run folder's kept tokenizer files) and train it
(lab/engine/trainer.py), alone or as one process of torchrun."""

from __future__ import annotations

import shlex
import sys
import time
from pathlib import Path

from lab.engine import distributed
from lab.engine.trainer import train
from lab.errors import LabError
from lab.recipe import Recipe, apply_overrides, read_toml, resolve
from lab.runs import tokenizer_files


def cli_run(args) -> int:
    try:
        recipe = read_recipe(args.recipe, args.overrides)
        for note in recipe.notes if distributed.layout().main else ():
            print(f"note: {note}", file=sys.stderr)
        command = shlex.join(["lab", "run", args.recipe] + [a for o in args.overrides for a in ("--set", o)])
        return train(recipe, distributed.launcher() + command)
    except LabError:
        if not distributed.layout().main:
            # Rank 0 meets the same error and says what is wrong; torchrun then stops this process. Wait
            # for that, so that a rank 0 a little behind is not stopped before it has said it. Still
            # running after the wait: the error is this process's alone, and it says it itself.
            time.sleep(5)
        raise


def read_recipe(path: str, overrides) -> Recipe:
    """The recipe; resuming, its tokenizer's files are the copies the run folder keeps when the
    originals have moved (lab.runs.tokenizer_files)."""
    raw = apply_overrides(read_toml(path), overrides)
    train = raw.get("train") if isinstance(raw.get("train"), dict) else {}
    run_dir = train.get("out_dir") or f"runs/{raw.get('name') or Path(path).stem}"  # as run_folder() has it
    if isinstance(run_dir, str):  # anything else is not a folder: resolve() says so, naming the key
        tokenizer_files.use_kept(raw, run_dir, source=path)
    return resolve(raw, path)
