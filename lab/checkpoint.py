"""Checkpoints that survive anything: run_dir/checkpoints/step_NNNNNNN/ holds

    model.safetensors   the weights (safetensors: loading them can never run code)
    state.pt            optimizer, step, data position, RNG states (read with weights_only=True)
    recipe.toml         the resolved recipe that built the model
    COMPLETE            written last

A checkpoint is written into a temporary folder, every file fsynced, COMPLETE added, and the folder
renamed into place (a rename is atomic). A folder without COMPLETE is never read, so a SIGKILL at any
moment leaves the previous checkpoint whole.

state.pt is read with torch.load(weights_only=True), which unpickles only tensors and plain
containers: so the RNG states are stored as tensors and lists, never numpy objects.
"""
from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import numpy as np
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
    for debris in root.glob(".tmp_step_*"):  # half-written by a process that was killed
        shutil.rmtree(debris, ignore_errors=True)
    tmp = root / f".tmp_step_{step:07d}_{os.getpid()}"
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


# The [model] fields that make a model's weights mean what they mean. Others (dropout, loss_chunk)
# change only how it trains, and may change on resume.
SHAPE = ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "bias", "tie_embeddings")


def check_same_shape(ckpt_dir, recipe, run_dir) -> None:
    """Refuse, before anything is built, a recipe whose model differs in shape from the checkpoint's.
    (load_weights still catches what this misses, e.g. a position component with other weights.)"""
    from lab.recipe import read_toml

    saved = read_toml(str(Path(ckpt_dir) / "recipe.toml")).get("model", {})
    now = recipe.model.model_dump()
    differ = [f"{key} {saved[key]!r} there, {now[key]!r} in the recipe"
              for key in SHAPE if key in saved and saved[key] != now[key]]
    if differ:
        raise LabError(
            f"{run_dir} holds a checkpoint of another model shape than {recipe.source} builds "
            f"([model] {'; '.join(differ)}). To start over, move or delete {run_dir}, or set another "
            f"train.out_dir (e.g. --set train.out_dir=runs/{recipe.name}-2)"
        )


def rng_state() -> dict:
    """Every random generator training draws from (python, numpy, torch, CUDA), as tensors and lists."""
    version, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [version, list(mt), gauss],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


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
