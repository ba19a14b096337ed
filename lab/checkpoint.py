"""Checkpoints that survive anything: run_dir/checkpoints/step_NNNNNNN/ holds

    model.safetensors   the weights (safetensors: loading them can never run code)
    state.pt            optimizer, step, data position, RNG states (read with weights_only=True)
    recipe.toml         the resolved recipe that built the model
    COMPLETE            written last

A checkpoint is written into a temporary folder, every file fsynced, COMPLETE added, and the folder
renamed into place (a rename is atomic). A folder without COMPLETE is never read, so a SIGKILL at any
moment leaves the previous checkpoint whole.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_model as _load_safetensors
from safetensors.torch import save_model as _save_safetensors

from lab.errors import LabError

MARKER = "COMPLETE"


def checkpoint_dirs(run_dir) -> list[Path]:
    """Complete checkpoints in a run folder, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [d for d in root.glob("step_*") if d.is_dir() and (d / MARKER).exists() and d.name[5:].isdigit()]
    return sorted(found, key=lambda d: int(d.name[5:]))


def latest(run_dir) -> Path | None:
    dirs = checkpoint_dirs(run_dir)
    return dirs[-1] if dirs else None


def save(run_dir, step: int, model: torch.nn.Module, recipe_toml: str, state: dict, keep: int = 2) -> Path:
    """Write a checkpoint atomically; keep the newest `keep` complete ones."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:07d}"
    tmp = root / f".tmp_step_{step:07d}_{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    _save_safetensors(model, str(tmp / "model.safetensors"))
    torch.save(state, tmp / "state.pt")
    (tmp / "recipe.toml").write_text(recipe_toml)
    for name in ("model.safetensors", "state.pt", "recipe.toml"):
        _fsync(tmp / name)
    (tmp / MARKER).write_text(f"{step}\n")
    _fsync(tmp / MARKER)
    _fsync(tmp)
    if final.exists():  # the same step saved again (e.g. Ctrl-C right after a periodic save)
        old = root / f".old_{final.name}_{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _fsync(root)
    for stale in checkpoint_dirs(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(stale, ignore_errors=True)
    return final


def load_weights(ckpt_dir, model: torch.nn.Module) -> None:
    """Load model.safetensors into model; a model of another shape is refused with a clear message."""
    path = Path(ckpt_dir) / "model.safetensors"
    try:
        missing, unexpected = _load_safetensors(model, str(path), strict=False)
    except RuntimeError as e:  # size mismatch
        raise LabError(
            f"the checkpoint in {ckpt_dir} holds a model of another shape than the recipe builds "
            f"({str(e).splitlines()[-1].strip()}). To start over, delete or move that run folder, "
            "or set another train.out_dir"
        ) from None
    if missing or unexpected:
        raise LabError(
            f"the checkpoint in {ckpt_dir} does not fit the recipe's model (missing: {sorted(missing)[:4]}, "
            f"unexpected: {sorted(unexpected)[:4]}). To start over, delete or move that run folder, "
            "or set another train.out_dir"
        )


def load_state(ckpt_dir) -> dict:
    return torch.load(Path(ckpt_dir) / "state.pt", map_location="cpu", weights_only=True)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load_run(run_dir, device="cpu"):
    """(recipe, model, checkpoint folder) of a run folder's newest checkpoint, the model in eval mode."""
    from lab.model import GPT
    from lab.recipe import read_toml, resolve

    if not Path(run_dir).is_dir():
        raise LabError(f"run folder not found: {run_dir}. Train one with `lab run RECIPE`, or import "
                       "GPT-2 weights with `lab import-hf HF_DIR --out RUN_DIR`")
    ckpt = latest(run_dir)
    if ckpt is None:
        raise LabError(f"{run_dir} has no complete checkpoint (looked for checkpoints/step_*/{MARKER}). "
                       "Train with `lab run RECIPE` until it saves one")
    recipe_file = ckpt / "recipe.toml"
    recipe = resolve(read_toml(str(recipe_file)), str(recipe_file))
    model = GPT(recipe)
    load_weights(ckpt, model)
    return recipe, model.to(device).eval(), ckpt
